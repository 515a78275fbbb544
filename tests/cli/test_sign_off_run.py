"""Human sign-off with `trainpilot run`: held launches wait; `trainpilot approve|reject <run dir> <id>`
from a second terminal (a second process) carries one out or drops it, signed with the local login
name; one nobody approves in time expires."""

from __future__ import annotations

import asyncio
import getpass
import io
import json
import os
import subprocess
import sys
import threading
import time
from argparse import Namespace

from tests.support.localkit import FAKE_TRAINER, REPO, quickstart_raw, write_yaml
from trainpilot.cli import run as localrun
from trainpilot.core import ledger as ledger_format


def trainpilot(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainpilot.cli", *argv], cwd=REPO, capture_output=True, text=True, timeout=60
    )


class SecondTerminal(threading.Thread):
    """Signs off held decisions as they appear: the first approved, the second rejected, the third left
    to expire, every later one approved."""

    def __init__(self, run_dir) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.done, self.said, self.seen = run_dir, threading.Event(), {}, []

    def run(self) -> None:
        while not self.done.is_set():
            try:
                status = json.loads((self.run_dir / "status.json").read_text())
            except (OSError, ValueError):
                status = {}
            for held in status.get("signOffs", []):
                id = held["id"]
                if held["state"] != "Pending" or id in self.seen:
                    continue
                self.seen.append(id)
                if len(self.seen) != 3:
                    verdict = "reject" if len(self.seen) == 2 else "approve"
                    self.said[id] = trainpilot(verdict, str(self.run_dir), id, "--wait", "20")
            time.sleep(0.3)


def test_held_launches_are_approved_rejected_and_expire_from_a_second_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(localrun, "trainer_command", lambda: [sys.executable, str(FAKE_TRAINER)])
    doc = quickstart_raw()
    doc["spec"]["initialTrials"] = [{"lr": 0.01}, {"lr": 0.02}]
    doc["spec"]["budget"] = {"maxTrials": 3, "parallelTrials": 2, "maxFailedTrials": 2}
    doc["spec"]["policy"].update(intervalSeconds=1, requireApprovalFor=["launch"], approvalTimeoutSeconds=4)
    path = write_yaml(tmp_path / "experiment.yaml", doc)
    run_dir = tmp_path / "run"
    args = Namespace(experiment=str(path), run_dir=str(run_dir), resume=None, cpu=False, plain=True)
    prepared = localrun.prepare(args, gpus=0, cores=2)
    terminal = SecondTerminal(run_dir)
    terminal.start()
    out = io.StringIO()
    try:
        code = asyncio.run(asyncio.wait_for(localrun.drive(prepared, live=False, write_report=False, out=out), 90))
    finally:
        terminal.done.set()
        os.close(prepared.lock_fd)
    console = out.getvalue()
    assert code == 0, console

    records, problems = ledger_format.decode((run_dir / "ledger.jsonl").read_text())
    assert problems == []
    by_id = {record.id: record for record in records}
    me = getpass.getuser()
    settled = {record.follows: record for record in records if record.sign_off is not None}
    first, second, third = terminal.seen[:3]
    approved, rejected, expired = settled[first], settled[second], settled[third]
    assert approved.outcome == "executed" and approved.sign_off.by == me and approved.new_trial
    assert rejected.outcome == "rejected" and rejected.verdict == f"rejected by {me}" and rejected.new_trial is None
    assert expired.outcome == "rejected" and expired.sign_off.verdict == "expired"
    assert "approvalTimeoutSeconds (4 s)" in expired.verdict
    assert by_id[third].outcome == "pending-approval"
    # Every trial that ran was launched on a human's approval, and nothing ran twice.
    launched = [record.new_trial for record in records if record.new_trial]
    assert len(launched) == len(set(launched)) == 3
    assert all(record.sign_off is not None for record in records if record.new_trial)

    # What the second terminal printed, and what the console said.
    said = terminal.said[first]
    assert said.returncode == 0 and f"{first}: approved by {me}" in said.stdout
    assert f"{second}: rejected by {me}" in terminal.said[second].stdout
    assert "AwaitingApproval is True (DecisionPendingApproval)" in console
    assert "trainpilot approve quickstart <id>" in console

    # Settled already, or never held: refused, naming what does await approval.
    again = trainpilot("approve", str(run_dir), second)
    assert again.returncode == 2 and "no longer awaiting approval (rejected by" in again.stderr
    unknown = trainpilot("reject", str(run_dir), "quickstart-d00099")
    assert unknown.returncode == 2 and "not a decision awaiting approval; awaiting now: none" in unknown.stderr
