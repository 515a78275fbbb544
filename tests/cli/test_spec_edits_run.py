"""`trainpilot run --resume RUN_DIR edited.yaml` (docs/spec-edits.md): a stopped run resumes with the
edits the table allows, a trial that was running resumes as it was launched, and new trials take
the edited template. Trials are the fake trainer."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
from argparse import Namespace
from pathlib import Path

from tests.support.localkit import FAKE_TRAINER, quickstart_raw, write_yaml
from trainpilot.cli import run as localrun


async def _interrupt_after_a_checkpoint(run_dir: Path) -> None:
    """What Ctrl-C does, once a trial has saved a checkpoint."""
    while not list((run_dir / "checkpoints").glob("*/latest")):
        await asyncio.sleep(0.2)
    signal.raise_signal(signal.SIGINT)


def drive(path: Path, run_dir: Path, resume: bool, interrupt: bool = False) -> tuple[int, str]:
    args = Namespace(
        experiment=str(path),
        run_dir=None if resume else str(run_dir),
        resume=str(run_dir) if resume else None,
        cpu=False,
        plain=True,
    )
    prepared = localrun.prepare(args, gpus=0, cores=2)
    out = io.StringIO()

    async def go() -> int:
        watcher = asyncio.create_task(_interrupt_after_a_checkpoint(run_dir)) if interrupt else None
        try:
            return await asyncio.wait_for(localrun.drive(prepared, live=False, write_report=False, out=out), 90)
        finally:
            if watcher is not None:
                watcher.cancel()

    try:
        return asyncio.run(go()), out.getvalue()
    finally:
        os.close(prepared.lock_fd)


def trial_env(run_dir: Path, trial: str) -> dict[str, str]:
    return json.loads((run_dir / "trials" / trial / "env.json").read_text())


def test_resume_with_an_edited_yaml_applies_the_edits_and_resumes_the_running_trial_as_launched(tmp_path, monkeypatch):
    monkeypatch.setattr(localrun, "trainer_command", lambda: [sys.executable, str(FAKE_TRAINER)])
    doc = quickstart_raw()
    doc["spec"]["initialTrials"] = [{"lr": 0.01}]
    doc["spec"]["budget"] = {"maxTrials": 2, "parallelTrials": 1, "maxFailedTrials": 1}
    doc["spec"]["policy"]["intervalSeconds"] = 1
    doc["spec"]["trialTemplate"]["env"] = {"FAKE_STEP_SECONDS": "0.03"}
    run_dir = tmp_path / "run"
    code, console = drive(write_yaml(tmp_path / "experiment.yaml", doc), run_dir, resume=False, interrupt=True)
    assert code == 130, console
    status = json.loads((run_dir / "status.json").read_text())
    [running] = [t["name"] for t in status["trials"] if t["state"] in ("Pending", "Running")]

    doc["spec"]["budget"]["maxTrials"] = 3  # next cycle
    doc["spec"]["trialTemplate"]["env"]["FAKE_EDITED"] = "yes"  # new trials only
    code, console = drive(write_yaml(tmp_path / "edited.yaml", doc), run_dir, resume=True)
    assert code == 0, console
    assert "spec.budget.maxTrials (next cycle), spec.trialTemplate.env (new trials)" in console

    final = json.loads((run_dir / "status.json").read_text())
    assert final["phase"] == "Succeeded" and final["trialsLaunched"] == 3  # the raised budget
    assert "FAKE_EDITED" not in trial_env(run_dir, running)  # restarted as it was launched
    later = [t["name"] for t in final["trials"] if t["name"] != running and t["index"] > 0]
    assert later and all(trial_env(run_dir, name).get("FAKE_EDITED") == "yes" for name in later)
    assert (run_dir / "experiment.yaml").read_text() == (tmp_path / "edited.yaml").read_text()
    assert (run_dir / "experiment.1.yaml").exists()
