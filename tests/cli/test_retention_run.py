"""spec.retention with `trainpilot run`: the checkpoints of finished trials it need not keep are
deleted from the run directory, each deletion a ledger record first. Trials are the fake trainer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.cli.test_spec_edits_run import drive
from tests.support.localkit import FAKE_TRAINER, quickstart_raw, write_yaml
from trainpilot.cli import run as localrun
from trainpilot.core import ledger as ledger_format


def run(tmp_path, max_trials: int, checkpoint_trials: int) -> tuple[Path, str]:
    """A finished run of fake trials, one at a time, under spec.retention.checkpointTrials."""
    doc = quickstart_raw()
    doc["spec"]["initialTrials"] = [{"lr": 0.01}, {"lr": 0.02}]
    doc["spec"]["budget"] = {"maxTrials": max_trials, "parallelTrials": 1, "maxFailedTrials": 1}
    doc["spec"]["policy"]["intervalSeconds"] = 1
    doc["spec"]["retention"] = {"checkpointTrials": checkpoint_trials}
    run_dir = tmp_path / "run"
    code, console = drive(write_yaml(tmp_path / "experiment.yaml", doc), run_dir, resume=False)
    assert code == 0, console  # the results stand, whatever became of the clean-ups
    return run_dir, console


def test_a_run_keeps_only_the_checkpoints_retention_asks_for(tmp_path, monkeypatch):
    monkeypatch.setattr(localrun, "trainer_command", lambda: [sys.executable, str(FAKE_TRAINER)])
    run_dir, console = run(tmp_path, max_trials=3, checkpoint_trials=1)

    status = json.loads((run_dir / "status.json").read_text())
    trials = {t["name"]: t for t in status["trials"]}
    best = status["bestTrial"]["name"]
    last = max(trials.values(), key=lambda t: (t["finishedAt"], t["index"]))["name"]
    kept = {best, last}
    on_disk = {p.name for p in (run_dir / "checkpoints").iterdir() if (p / "latest").exists()}
    saved = {name for name, t in trials.items() if t.get("checkpointStep") is not None}
    assert on_disk == kept & saved and saved - kept, (on_disk, saved, kept)
    records, problems = ledger_format.decode((run_dir / "ledger.jsonl").read_text())
    assert problems == []
    cleaned = sorted(r.decision.trial for r in records if r.decision.action == "clean-up")
    assert cleaned == sorted(saved - kept)
    assert all(r.decision.removes == "checkpoints" for r in records if r.decision.action == "clean-up")
    assert sorted(name for name, t in trials.items() if "checkpoints" in t.get("removed", [])) == cleaned
    for name in cleaned:
        assert f"{name}: checkpoints deleted" in console
        assert (run_dir / "trials" / name / "log.txt").exists()  # its record stays


def test_a_checkpoint_folder_that_cannot_be_deleted_is_said_once_and_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(localrun, "trainer_command", lambda: [sys.executable, str(FAKE_TRAINER)])

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("trainpilot.runtime.local.shutil.rmtree", refuse)
    run_dir, console = run(tmp_path, max_trials=2, checkpoint_trials=0)
    folder = run_dir / "checkpoints" / "quickstart-t000"
    said = f"checkpoints in {folder} not deleted: [Errno 13] Permission denied"
    assert console.count(said) >= 1 and "ActionsHealthy is False (DecisionFailed)" in console
    assert (folder / "latest").exists()
    records, problems = ledger_format.decode((run_dir / "ledger.jsonl").read_text())
    assert problems == []
    clean_ups = [r for r in records if r.decision.action == "clean-up"]
    assert [r.outcome for r in clean_ups] == ["executed", "failed"]  # tried once, never again
    assert clean_ups[1].verdict.startswith("deleting the checkpoints of quickstart-t000 failed: ")
    status = json.loads((run_dir / "status.json").read_text())
    trial = next(t for t in status["trials"] if t["name"] == "quickstart-t000")
    assert trial["state"] == "Succeeded" and said in trial["message"]
    assert status["phase"] == "Succeeded"
