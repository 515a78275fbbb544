"""Plain-data builders for core tests: specs, trials, metrics and observations in one line each."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, TrialStatus, parse_spec
from trainpilot.api.metrics import TrialMetrics
from trainpilot.core.observation import Observation, TrialObservation
from trainpilot.core.policy import HeuristicPolicy, PolicyContext
from trainpilot.core.state import fold_observation
from trainpilot.core.suggest import Suggester

EXPERIMENT = "exp"
START = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float = 0) -> str:
    """An RFC 3339 time `seconds` after the test epoch."""
    return (START + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


NOW = at(0)


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_spec(**changes: Any) -> AgentExperimentSpec:
    """A small valid spec (camelCase wire names); keyword arguments deep-merge over it."""
    base = {
        "objective": {"metric": "val_loss", "direction": "minimize"},
        "searchSpace": [
            {"name": "lr", "min": 1e-4, "max": 1.0, "log": True},
            {"name": "weight_decay", "min": 0.0, "max": 0.1},
        ],
        "trialTemplate": {"hyperparameters": {"max_steps": 200}},
        "budget": {"maxTrials": 8, "parallelTrials": 2, "maxFailedTrials": 3},
    }
    return parse_spec(_merge(base, changes))


def trial(name: str, index: int = 0, state: str = "Running", **fields: Any) -> TrialStatus:
    fields.setdefault("hyperparameters", {"lr": 0.01, "weight_decay": 0.0})
    return TrialStatus(name=name, index=index, state=state, **fields)


def status_of(spec: AgentExperimentSpec, *trials: TrialStatus, **fields: Any) -> AgentExperimentStatus:
    """A status with these trials and consistent counters (folded with an empty observation)."""
    fields.setdefault("last_cycle_time", NOW)
    status = AgentExperimentStatus(trials=list(trials), **fields)
    return fold_observation(spec, status, Observation(time=status.last_cycle_time), status.last_cycle_time)


def metrics(
    step: int | None = None,
    train_loss: float | None = None,
    val_loss: float | None = None,
    nonfinite: int | None = None,
    checkpoint: int | None = None,
    max_steps: int | None = None,
    **others: float,
) -> TrialMetrics:
    names = {
        contract.METRIC_STEP: step,
        contract.METRIC_TRAIN_LOSS: train_loss,
        contract.METRIC_VAL_LOSS: val_loss,
        contract.METRIC_NONFINITE_LOSS: nonfinite,
        contract.METRIC_CHECKPOINT_STEP: checkpoint,
        contract.METRIC_MAX_STEPS: max_steps,
    }
    values = {name: float(value) for name, value in names.items() if value is not None}
    values.update({f"trainpilot_{name}": value for name, value in others.items()})
    return TrialMetrics(values=values)


def seen(name: str, phase: str = "Running", exit_reason: str | None = None, **metric_values: Any) -> TrialObservation:
    return TrialObservation(
        name=name,
        phase=phase,
        exit_reason=exit_reason,
        metrics=metrics(**metric_values) if metric_values else None,
    )


def observation(*trials: TrialObservation, time: str = NOW) -> Observation:
    return Observation(time=time, trials={t.name: t for t in trials})


def context(
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    observed: Observation | None = None,
    limits: Any = None,
) -> PolicyContext:
    return PolicyContext(
        experiment=EXPERIMENT,
        spec=spec,
        status=status,
        observation=observed or observation(),
        now=NOW,
        suggester=Suggester(spec, status),
        limits=limits,
    )


async def heuristic(spec, status, observed=None, limits=None):
    """The heuristic policy's decisions for this state."""
    return await HeuristicPolicy().decide(context(spec, status, observed, limits))


def healthy(name: str, index: int = 0, **fields: Any) -> TrialStatus:
    """A running trial whose loss falls steadily."""
    values: dict[str, Any] = dict(
        hyperparameters={"lr": 0.01, "weight_decay": 0.0},
        step=40,
        train_loss=2.0,
        smoothed_train_loss=2.1,
        best_train_loss=2.0,
        objective=2.2,
        best_objective=2.2,
        history=[[10.0, 3.0], [20.0, 2.7], [30.0, 2.5], [40.0, 2.3], [45.0, 2.25], [50.0, 2.2]],
    )
    values.update(fields)
    return trial(name, index, "Running", **values)
