"""`trainpilot replay`: a recorded run's cycles, fed again to its policy, give its decisions exactly;
a policy that would decide otherwise is shown cycle by cycle."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from argparse import Namespace

from tests.support.localkit import FAKE_TRAINER, REPO, quickstart_raw, write_yaml
from trainpilot.cli import run as localrun
from trainpilot.core import cycle_log
from trainpilot.core import ledger as ledger_format
from trainpilot.core.decision import Decision
from trainpilot.core.replay import replay


def recorded_run(tmp_path, monkeypatch):
    """The quickstart (its first trial diverges, is stopped and relaunched) with the fake trainer."""
    monkeypatch.setattr(localrun, "trainer_command", lambda: [sys.executable, str(FAKE_TRAINER)])
    doc = quickstart_raw()
    doc["spec"]["policy"].update(intervalSeconds=1)
    path = write_yaml(tmp_path / "experiment.yaml", doc)
    run_dir = tmp_path / "run"
    args = Namespace(experiment=str(path), run_dir=str(run_dir), resume=None, cpu=False, plain=True)
    prepared = localrun.prepare(args, gpus=0, cores=2)
    try:
        code = asyncio.run(
            asyncio.wait_for(localrun.drive(prepared, live=False, write_report=False, out=io.StringIO()), 90)
        )
    finally:
        os.close(prepared.lock_fd)
    assert code == 0
    return run_dir


def test_a_recorded_run_replays_to_the_same_decisions_and_a_different_policy_shows_where(tmp_path, monkeypatch):
    run_dir = recorded_run(tmp_path, monkeypatch)
    records, _ = ledger_format.decode((run_dir / "ledger.jsonl").read_text())
    entries, problems = cycle_log.decode((run_dir / "cycles.jsonl").read_text())
    assert problems == [] and len(entries) >= 3
    # Every decision the policy made is tied to the cycle that made it.
    decided = [id for entry in entries for id in entry.decided]
    assert decided == [r.id for r in records if r.decision.policy == "heuristic"]
    assert any("divergence" in r.decision.reason or r.decision.reason == "nonfinite-loss" for r in records)

    done = subprocess.run(
        [sys.executable, "-m", "trainpilot.cli", "replay", str(run_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        f"replayed {len(entries)} cycle(s) with the heuristic policy: {len(decided)} decision(s) recorded, "
        in done.stdout
    )
    assert f"{len(decided)} replayed, 0 cycle(s) differ" in done.stdout

    class Idle:
        """A policy that never does anything: every cycle the heuristic acted in differs."""

        name = "idle"

        async def decide(self, context):
            return []

    report = asyncio.run(replay(entries, {r.id: r for r in records}, Idle()))
    acted = [entry for entry in entries if entry.decided]
    assert len(report.differences) == len(acted) and report.replayed_decisions == 0
    first = report.differences[0]
    assert first.replayed == [] and first.recorded[0].startswith("launch") and first.time == acted[0].time

    class Reckless:
        name = "reckless"

        async def decide(self, context):
            return [Decision(action="launch", policy="reckless", reason="more", hyperparameters={"lr": 99.0})]

    report = asyncio.run(replay(entries[:1], {r.id: r for r in records}, Reckless()))
    # The replayed proposal passes the same guardrails: out of the space, it is rejected.
    assert "launch lr=99 (more; rejected)" in report.differences[0].replayed


def test_replay_of_a_directory_with_no_cycle_log_says_so(tmp_path):
    (tmp_path / "ledger.jsonl").write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "trainpilot.cli", "replay", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 2 and "no cycles recorded" in done.stderr
