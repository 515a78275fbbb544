"""Helpers for the one-machine tests: a fake trainer, experiment specs, run-dir snapshots."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from tests.support.paths import QUICKSTART_PATH as QUICKSTART
from tests.support.paths import REPO  # noqa: F401 - for callers
from trainpilot.api.experiment import AgentExperimentSpec

FAKE_TRAINER = Path(__file__).parent / "fake_trainer.py"


@pytest.fixture
def fake_command() -> list[str]:
    return [sys.executable, str(FAKE_TRAINER)]


def quickstart_raw() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


@pytest.fixture
def quickstart_doc() -> dict:
    return quickstart_raw()


def make_spec(env: dict[str, str] | None = None, **template_hp) -> AgentExperimentSpec:
    raw = quickstart_raw()["spec"]
    if env:
        raw["trialTemplate"]["env"] = env
    raw["trialTemplate"]["hyperparameters"].update(template_hp)
    return AgentExperimentSpec.model_validate(raw)


@pytest.fixture
def spec_factory():
    return make_spec


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (run.lock excluded: its pid line is the holder's)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "run.lock"
    }


HOSTILE = '<script>alert("pwned")</script> & <b>bold</b>'


def synthetic_run(run_dir: Path, experiment: str = "quickstart") -> dict:
    """A finished run directory as `trainpilot run` leaves it, with made-up but plausible curves."""
    import json
    import math

    from trainpilot.api.experiment import AgentExperimentStatus, BestTrial, TrialStatus
    from trainpilot.core import ledger as ledger_format
    from trainpilot.core.decision import Decision, DecisionRecord

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "experiment.yaml").write_text(QUICKSTART.read_text())
    floor = 1.31
    t = [f"{experiment}-t{i:03d}" for i in range(4)]

    def time_at(second: int) -> str:
        return f"2026-01-01T00:{second // 60:02d}:{second % 60:02d}+00:00"

    def curve(trial: str, lr: float, start: int, end: int, t0: int, diverge_at: int | None = None) -> None:
        lines = []
        val = float("nan")
        for i, step in enumerate(range(start, end + 1, 5)):
            train = floor + 1.4 * math.exp(-step * min(lr, 0.02) / 1.5) + 0.02 * math.sin(step)
            if diverge_at is not None and step >= diverge_at:
                train = float("nan") if step > diverge_at + 5 else 40.0
            if step % 50 == 0 and step:
                val = train + 0.04
            values = {
                "trainpilot_step": step,
                "trainpilot_train_loss": train if math.isfinite(train) else "nan",
                "trainpilot_val_loss": val if math.isfinite(val) else "nan",
                "trainpilot_loss_floor": floor,
            }
            lines.append(json.dumps({"time": time_at(t0 + i), "step": step, "values": values}))
        folder = run_dir / "trials" / trial
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    curve(t[0], 5.0, 0, 30, 0, diverge_at=20)
    curve(t[1], 0.03, 0, 300, 0)
    curve(t[2], 0.006, 0, 300, 8)
    curve(t[3], 0.0008, 0, 160, 70)

    def rec(seq, second, action, trial=None, new_trial=None, reason="r", rationale="", outcome="executed", **kw):
        return DecisionRecord(
            id=f"{experiment}-d{seq:05d}",
            seq=seq,
            time=time_at(second),
            experiment=experiment,
            decision=Decision(action=action, policy="heuristic", reason=reason, rationale=rationale, trial=trial, **kw),
            outcome=outcome,
            new_trial=new_trial,
            verdict="" if outcome == "executed" else "quota max_gpus is 0",
        )

    records = [
        rec(
            0,
            0,
            "launch",
            new_trial=t[0],
            reason="initial-trial",
            rationale="first initial trial",
            hyperparameters={"lr": 5.0},
        ),
        rec(
            1,
            0,
            "launch",
            new_trial=t[1],
            reason="initial-trial",
            rationale="second initial trial",
            hyperparameters={"lr": 0.003},
        ),
        rec(2, 6, "terminate", trial=t[0], reason="nonfinite-loss", rationale="loss became NaN at step 25"),
        rec(
            3,
            8,
            "launch",
            new_trial=t[2],
            reason="relaunch-after-divergence",
            rationale="lr 5 x 0.1 = 0.5",
            hyperparameters={"lr": 0.5},
            parent=t[0],
        ),
        rec(
            4,
            40,
            "mutate",
            trial=t[1],
            reason="plateau",
            rationale="lower lr in place",
            hyperparameters={"lr": 0.002},
            mode="in-place",
        ),
        rec(5, 50, "scale", trial=t[1], reason="wants-gpus", rationale="more GPUs", outcome="rejected", nodes=2),
        rec(
            6,
            70,
            "launch",
            new_trial=t[3],
            reason="suggestion",
            rationale="TPE suggestion",
            hyperparameters={"lr": 0.0008},
        ),
        rec(7, 90, "terminate", trial=t[3], reason="asha-rung", rationale=HOSTILE),
        rec(8, 100, "complete", reason="budget-spent", rationale="all trials done"),
    ]
    # The last one ends the experiment with success.
    records[-1] = records[-1].model_copy(
        update={"decision": records[-1].decision.model_copy(update={"outcome": "succeeded"})}
    )
    (run_dir / "ledger.jsonl").write_text("".join(ledger_format.encode(r) for r in records))

    def trial(i, lr, state, step, best, parent=None):
        return TrialStatus(
            name=t[i],
            index=i,
            hyperparameters={"lr": lr, "weight_decay": 0.0},
            state=state,
            step=step,
            max_steps=300,
            best_objective=best,
            objective=best,
            parent=parent,
            decision=records[[0, 1, 3, 6][i]].id,
            loss_floor=floor,
        )

    status = AgentExperimentStatus(
        phase="Succeeded",
        message="budget spent",
        trials=[
            trial(0, 5.0, "Diverged", 30, None),
            trial(1, 0.002, "Succeeded", 300, 1.36),
            trial(2, 0.5, "Succeeded", 300, 1.42, parent=t[0]),
            trial(3, 0.0008, "Terminated", 160, 1.9),
        ],
        best_trial=BestTrial(name=t[1], objective=1.36, step=300, hyperparameters={"lr": 0.002, "weight_decay": 0.0}),
        trials_launched=4,
        decisions_made=len(records),
    )
    (run_dir / "status.json").write_text(json.dumps(status.wire(), indent=2))
    return {"records": records, "trials": t, "status": status}


def no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """count_gpus() imports torch; the tests never need CUDA, and the answer must not depend on the box."""
    monkeypatch.setattr("trainpilot.runtime.local.count_gpus", lambda: 0)
    monkeypatch.setattr("trainpilot.cli.run.count_gpus", lambda: 0)
