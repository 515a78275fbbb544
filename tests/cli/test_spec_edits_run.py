"""`trainpilot run --resume RUN_DIR edited.yaml` through every row of docs/spec-edits.md: a run is
stopped (Ctrl-C), its YAML edited and resumed, again and again; each edit is checked for the effect
its row states, and an edit the table refuses exits 2 naming each field and changes nothing. Trials
are the fake trainer. The rows a local run has no use for (queue, pendingTimeoutSeconds: there is no
scheduler) are applied, named with their effect, and otherwise ignored, as for any cluster field."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.emulator import merge_patch
from tests.support.localkit import FAKE_TRAINER, quickstart_raw, snapshot, write_yaml
from tests.support.spec_edit_cases import (
    COMPARED_ON,
    edited_fields,
    leaves,
    names_refusal,
    rows_not_edited,
    undo,
)
from trainpilot.api.experiment import AgentExperimentStatus
from trainpilot.cli import run as localrun
from trainpilot.core import ledger as ledger_format
from trainpilot.core.approvals import Approval
from trainpilot.runtime.sign_off_files import write_sign_off

T0, T1, T2 = (f"quickstart-t{i:03d}" for i in range(3))


def args_for(path: Path, run_dir: Path, resume: bool) -> Namespace:
    return Namespace(
        experiment=str(path),
        run_dir=None if resume else str(run_dir),
        resume=str(run_dir) if resume else None,
        cpu=False,
        plain=True,
    )


def read_status(run_dir: Path) -> AgentExperimentStatus | None:
    try:
        return AgentExperimentStatus.model_validate_json((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None


def drive(
    path: Path,
    run_dir: Path,
    resume: bool,
    until: Callable[[AgentExperimentStatus], bool] | None = None,
    approve: bool = False,
) -> tuple[int, str]:
    """One `trainpilot run`: Ctrl-C once `until(status)` holds; with `approve`, every launch held
    for sign-off is approved, as `trainpilot approve` from a second terminal does."""
    prepared = localrun.prepare(args_for(path, run_dir, resume), gpus=0, cores=2)
    out = io.StringIO()

    async def watch() -> None:
        approved: set[str] = set()
        while True:
            await asyncio.sleep(0.2)
            status = read_status(run_dir)
            if status is None:
                continue
            for held in status.sign_offs:
                if approve and held.state == "Pending" and held.id not in approved:
                    write_sign_off(run_dir, Approval(decision=held.id, verdict="approve", by="alice"))
                    approved.add(held.id)
            if until is not None and until(status):
                signal.raise_signal(signal.SIGINT)
                return

    async def go() -> int:
        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.wait_for(localrun.drive(prepared, live=False, write_report=False, out=out), 90)
        finally:
            watcher.cancel()

    try:
        return asyncio.run(go()), out.getvalue()
    finally:
        os.close(prepared.lock_fd)


def trial_of(status: AgentExperimentStatus, name: str):
    return next((trial for trial in status.trials if trial.name == name), None)


def trial_file(run_dir: Path, trial: str, name: str) -> dict:
    return json.loads((run_dir / "trials" / trial / name).read_text())


def samples(run_dir: Path, trial: str) -> list[str]:
    """The trial's successful scrapes, one line each."""
    path = run_dir / "trials" / trial / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def test_resume_with_edits_through_every_row_of_the_edit_table(tmp_path, monkeypatch):
    monkeypatch.setattr(localrun, "trainer_command", lambda: [sys.executable, str(FAKE_TRAINER)])
    doc = quickstart_raw()
    spec = doc["spec"]
    spec["initialTrials"] = [{"lr": 0.01}]
    spec["budget"] = {"maxTrials": 1, "parallelTrials": 1, "maxFailedTrials": 1}
    spec["policy"].update(intervalSeconds=1, heuristic={"minPeersAtRung": 10})  # no ASHA stop: the curves are fake
    spec["trialTemplate"]["env"] = {"FAKE_STEP_SECONDS": "0.03", "FAKE_METRICS_PATH": "/metrics"}
    spec["trialTemplate"]["checkpoints"] = {"claimName": "ckpt"}
    allowed = {
        "trialTemplate": {"env": {"FAKE_STEP_SECONDS": "0.01", "FAKE_EDITED": "yes", "FAKE_METRICS_PATH": "/m2"}},
        # source prometheus: a cluster's; trainpilot run reads its trainers directly all the same
        "metrics": {"path": "/m2", "scrapeTimeoutSeconds": 0.001, "source": "prometheus", "maxSampleAgeSeconds": 60},
        "queue": {"name": "team-a"},
        "retention": {"checkpointTags": 1, "checkpointTrials": 0},
        "initialTrials": [{"lr": 0.01}, {"lr": 0.02}],
        "searchSpace": [{"name": "lr", "min": 0.005, "max": 0.05}, {"name": "weight_decay", "values": [0.05]}],
        "budget": {"maxTrials": 3},
    }
    refused = merge_patch(COMPARED_ON, {"trialTemplate": {"checkpoints": {"claimName": "ckpt2"}}})
    pause = {"metrics": {"scrapeTimeoutSeconds": None}, "suspend": True, "policy": {"requireApprovalFor": ["launch"]}}
    go_on = {"suspend": False, "trialTemplate": {"pendingTimeoutSeconds": 5}, "budget": {"maxTrials": 5}}
    goal = {"objective": {"goal": 10.0}, "policy": {"requireApprovalFor": None}}
    assert rows_not_edited([allowed, refused, pause, go_on, goal]) == []
    run_dir = tmp_path / "run"

    def edit(name: str, patch: dict) -> Path:
        doc["spec"] = merge_patch(doc["spec"], patch)
        return write_yaml(tmp_path / name, doc)

    # Stopped while its first trial runs.
    code, console = drive(
        write_yaml(tmp_path / "experiment.yaml", doc),
        run_dir,
        resume=False,
        until=lambda s: (trial_of(s, T0) is not None and trial_of(s, T0).checkpoint_step or -1) >= 0,
    )
    assert code == 130, console
    assert trial_file(run_dir, T0, "config.json")["keep_checkpoint_tags"] == 3  # the default

    # Refused (what trials are compared on; the checkpoint volume while a trial is active):
    # exit 2, each field named, nothing changed.
    before = snapshot(run_dir)
    with pytest.raises(localrun.UsageError) as refusal:
        localrun.prepare(args_for(edit("refused.yaml", refused), run_dir, resume=True), gpus=0, cores=2)
    for field, wanted in leaves(COMPARED_ON):
        assert names_refusal(str(refusal.value), field, wanted), field
    assert "spec.trialTemplate.checkpoints {'claimName': 'ckpt2'" in str(refusal.value)
    assert str(refusal.value).endswith("(nothing was changed)")
    assert snapshot(run_dir) == before
    doc["spec"] = merge_patch(doc["spec"], undo(refused, spec))

    # Allowed: the effect of each is named. The running trial restarts as it was launched (its
    # env, its metrics path) and is scraped within the edited timeout (next cycle): 1 ms is too short.
    code, console = drive(
        edit("edited.yaml", allowed),
        run_dir,
        resume=True,
        until=lambda s: trial_of(s, T0).failed_scrapes >= 2,
    )
    assert code == 130, console
    for field in edited_fields(allowed):
        assert f"spec.{field} (" in console, field
    assert "no answer within 0.001 s" in (run_dir / "cycles.jsonl").read_text()
    assert "FAKE_EDITED" not in trial_file(run_dir, T0, "env.json")
    assert (run_dir / "experiment.yaml").read_text() == (tmp_path / "edited.yaml").read_text()
    assert (run_dir / "experiment.1.yaml").read_text() == (tmp_path / "experiment.yaml").read_text()

    # suspend (next cycle): no decision, the running trial goes on to its end and is scraped again,
    # on /metrics, the only path it serves.
    scraped = len(samples(run_dir, T0))
    code, console = drive(
        edit("paused.yaml", pause),
        run_dir,
        resume=True,
        until=lambda s: s.phase == "Suspended" and trial_of(s, T0).state == "Succeeded",
    )
    assert code == 130, console
    status = read_status(run_dir)
    assert [t.name for t in status.trials] == [T0] and trial_of(status, T0).step == 300
    assert len(samples(run_dir, T0)) > scraped

    # Resumed: launches are held for sign-off (policy, next cycle) and approved; T1 is initialTrials'
    # new entry, T2 a point of the edited search space; both take the edited template and retention.
    code, console = drive(
        edit("resumed.yaml", go_on), run_dir, resume=True, approve=True, until=lambda s: trial_of(s, T2) is not None
    )
    assert code == 130, console
    status = read_status(run_dir)
    assert [s.action for s in status.sign_offs] == ["launch", "launch"]
    assert trial_of(status, T1).hyperparameters["lr"] == 0.02 and trial_of(status, T1).state == "Succeeded"
    assert samples(run_dir, T1)  # scraped on /m2, the only path its trainer serves
    searched = trial_of(status, T2).hyperparameters
    assert 0.005 <= searched["lr"] <= 0.05 and searched["weight_decay"] == 0.05
    assert trial_file(run_dir, T1, "env.json")["FAKE_EDITED"] == "yes"
    assert trial_file(run_dir, T1, "config.json")["keep_checkpoint_tags"] == 1
    # retention (next cycle): T0 is neither the best nor kept by checkpointTrials 0.
    assert not (run_dir / "checkpoints" / T0).exists() and (run_dir / "checkpoints" / T1).exists()

    # objective.goal (next cycle): a finished trial has reached it; the experiment ends there.
    code, console = drive(edit("goal.yaml", goal), run_dir, resume=True)
    assert code == 0, console
    status = read_status(run_dir)
    assert status.phase == "Succeeded" and status.trials_launched == 3
    records, problems = ledger_format.decode((run_dir / "ledger.jsonl").read_text())
    assert problems == []
    assert records[-1].decision.action == "complete" and records[-1].decision.reason == "goal-reached"
    cleaned = [r.decision.trial for r in records if r.decision.action == "clean-up"]
    assert T0 in cleaned and T1 not in cleaned  # T1 is the best
