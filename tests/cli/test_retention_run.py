"""spec.retention with `trainpilot run`: the checkpoints of finished trials it need not keep are
deleted from the run directory, each deletion a ledger record first. Trials are the fake trainer."""

from __future__ import annotations

import json
import sys

from tests.cli.test_spec_edits_run import drive
from tests.support.localkit import FAKE_TRAINER, quickstart_raw, write_yaml
from trainpilot.cli import run as localrun
from trainpilot.core import ledger as ledger_format


def test_a_run_keeps_only_the_checkpoints_retention_asks_for(tmp_path, monkeypatch):
    monkeypatch.setattr(localrun, "trainer_command", lambda: [sys.executable, str(FAKE_TRAINER)])
    doc = quickstart_raw()
    doc["spec"]["initialTrials"] = [{"lr": 0.01}, {"lr": 0.02}]
    doc["spec"]["budget"] = {"maxTrials": 3, "parallelTrials": 1, "maxFailedTrials": 1}
    doc["spec"]["policy"]["intervalSeconds"] = 1
    doc["spec"]["retention"] = {"checkpointTrials": 1}
    run_dir = tmp_path / "run"
    code, console = drive(write_yaml(tmp_path / "experiment.yaml", doc), run_dir, resume=False)
    assert code == 0, console

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
