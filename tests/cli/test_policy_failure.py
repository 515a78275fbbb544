"""`trainpilot run` with a policy that cannot work (optuna missing, as a new user met it): the run
says so on the console and ends Failed with the error within spec.policy.maxConsecutiveFailures,
instead of sitting in Pending forever."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from argparse import Namespace

from tests.support.localkit import FAKE_TRAINER, quickstart_raw, write_yaml
from trainpilot.cli import run as localrun
from trainpilot.core import ledger as ledger_format


def test_a_policy_that_keeps_failing_ends_the_run_failed_with_its_error_on_the_console(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ModuleNotFoundError
    monkeypatch.setattr(localrun, "trainer_command", lambda: [sys.executable, str(FAKE_TRAINER)])
    doc = quickstart_raw()
    doc["spec"]["policy"].update(intervalSeconds=1, maxConsecutiveFailures=2)
    path = write_yaml(tmp_path / "experiment.yaml", doc)
    args = Namespace(experiment=str(path), run_dir=str(tmp_path / "run"), resume=None, cpu=False, plain=True)
    prepared = localrun.prepare(args, gpus=0, cores=2)
    out = io.StringIO()
    started = time.monotonic()
    try:
        run = localrun.drive(prepared, live=False, write_report=False, out=out)
        code = asyncio.run(asyncio.wait_for(run, timeout=30))  # Pending forever would fail here, not hang
    finally:
        import os

        os.close(prepared.lock_fd)
    seconds = time.monotonic() - started
    console = out.getvalue()

    assert code == localrun.EXIT_FAILED, console
    assert seconds < 20, console  # two 1-second cycles, not forever
    [said] = [line for line in console.splitlines() if "PolicyHealthy is False (PolicyFailing)" in line]
    assert "ModuleNotFoundError" in said and "optuna" in said
    final = next(line for line in console.splitlines() if line.startswith("experiment quickstart"))
    assert "Failed" in final and "maxConsecutiveFailures 2" in final and "optuna" in final

    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["phase"] == "Failed" and status["policyFailures"] == 2
    health = next(c for c in status["conditions"] if c["type"] == "PolicyHealthy")
    assert health["status"] == "False" and "optuna" in health["message"]
    records, _ = ledger_format.decode((tmp_path / "run" / "ledger.jsonl").read_text())
    [failed] = records
    assert (failed.decision.action, failed.decision.policy, failed.decision.outcome) == (
        "complete",
        "trainpilot",
        "failed",
    )
