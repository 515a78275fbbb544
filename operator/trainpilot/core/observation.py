"""Observations: what a runtime saw of each trial in one cycle, as plain data.

A runtime (Kubernetes or local processes) fills these in; the core folds them into the
experiment's status and hands them to the policy. Metric values come from trainer output and
are data only: nothing in them is ever read as an instruction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from trainpilot.api import contract
from trainpilot.api.metrics import TrialMetrics

# What the workload is doing, independent of where it runs.
RuntimePhase = Literal["Pending", "Running", "Succeeded", "Failed", "Missing"]
# Why a finished trainer stopped, from its exit code (see trainpilot_trainer.exitcodes).
ExitReason = Literal["completed", "diverged", "invalid-config", "crashed", "terminated", "unknown"]


def evaluation_step(values: Mapping[str, float], objective: str) -> int | None:
    """The step an objective's current value was measured at, when the trainer says.

    None for per-step gauges and for exporters without trainpilot_eval_step: the step of the
    scrape then stands in for it.
    """
    if contract.objective_metric(objective) in contract.PER_STEP_METRICS:
        return None
    value = values.get(contract.METRIC_EVAL_STEP)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return int(value)


def new_evaluation(
    values: Mapping[str, float], objective: str, scrape_step: int, last: Sequence[float] | None
) -> tuple[int, float] | None:
    """(step, value) of the objective in one scrape when it is an evaluation not seen before.

    The gauge keeps showing the last evaluation. Where the trainer says at which step it measured,
    a new step is a new evaluation; otherwise a changed value is, placed at the scrape's step.
    `last` is the previous evaluation's (step, value).
    """
    value = values.get(contract.objective_metric(objective))
    if value is None or not math.isfinite(value):
        return None  # NaN until the trainer's first measurement
    measured_at = evaluation_step(values, objective)
    if last is not None and (last[0] == measured_at if measured_at is not None else last[1] == value):
        return None
    return (scrape_step if measured_at is None else measured_at), float(value)


class TrialObservation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    phase: RuntimePhase
    exit_reason: ExitReason | None = None
    exit_code: int | None = None
    metrics: TrialMetrics | None = Field(None, description="None: no data yet (not a failure).")
    message: str = ""
    pending_since: str | None = Field(
        None, description="RFC 3339: since when a pod of the trial has been waiting to run; None when none is."
    )
    pending_reason: str = Field("", description="Why it waits, as Kubernetes says (Unschedulable: ..., ...).")
    scrape_error: str | None = Field(
        None, description="Its metrics endpoint could not be read this cycle: the URL and why; None when it was."
    )


class CleanUpObservation(BaseModel):
    """A deletion spec.retention asked for that a runtime started and has not seen done: on a
    cluster, the Job deleting a trial's checkpoint folder on the claim."""

    model_config = ConfigDict(extra="forbid")

    job: str
    directory: str = Field(description="The folder it deletes.")
    since: str = Field(description="RFC 3339: when it was started.")
    failed: bool = False
    reason: str = Field("", description="Why it has not run yet (its pod's reason), or how it failed.")


class Observation(BaseModel):
    """Everything a runtime saw in one cycle."""

    model_config = ConfigDict(extra="forbid")

    time: str = Field(description="RFC 3339, UTC.")
    trials: dict[str, TrialObservation] = Field(default_factory=dict)
    clean_ups: dict[str, CleanUpObservation] = Field(
        default_factory=dict, description="By trial: its checkpoint clean-up, while it has not succeeded."
    )
