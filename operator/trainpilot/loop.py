"""One turn of the agent loop over any Runtime: recover, observe, decide, act, record.

The same function drives the Kubernetes operator (from a kopf daemon) and `trainpilot run` (local
processes). Crash safety comes from the ordering: every decision is appended to the durable
ledger *before* it is acted on, and status (which counts decisions made) is saved after. A cycle
that starts and finds ledger records beyond status's count finishes their effects first, with
the same names and ids, so a restart neither loses nor repeats a decision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus
from trainpilot.api.trial import ControlFile
from trainpilot.core.conditions import set_condition
from trainpilot.core.decision import DecisionRecord
from trainpilot.core.engine import plan
from trainpilot.core.policy import Policy
from trainpilot.core.state import apply_record, fold_observation
from trainpilot.core.trials import build_trial_config
from trainpilot.runtime.base import Runtime

logger = logging.getLogger(__name__)


@dataclass
class CycleResult:
    status: AgentExperimentStatus
    records: list[DecisionRecord] = field(default_factory=list)
    recovered: list[DecisionRecord] = field(default_factory=list)


async def run_cycle(
    experiment: str,
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    runtime: Runtime,
    policy: Policy,
    now: str,
    generation: int | None = None,
    limits: object | None = None,
) -> CycleResult:
    result = CycleResult(status=status)
    if status.started_at is None:
        status = status.model_copy(update={"started_at": now})

    # 1. Recover: finish what a previous, interrupted cycle recorded but did not save.
    for record in await runtime.ledger():
        if record.seq >= status.decisions_made:
            logger.info("recovering decision %s recorded before a restart", record.id)
            await runtime.record(record)  # idempotent: re-posts an Event or annotation that was lost
            status = await _act(experiment, spec, status, runtime, record, now)
            result.recovered.append(record)

    # 2. Observe.
    observation = await runtime.observe(status)
    status = fold_observation(spec, status, observation, now)
    status = _with_generation(status, generation, now)

    # 3. Decide, unless the experiment is over or paused.
    if status.finished:
        result.status = status
        await runtime.save_status(status)
        return result
    if spec.suspend:
        status = status.model_copy(update={"phase": "Suspended", "message": "suspended by spec.suspend"})
        result.status = status
        await runtime.save_status(status)
        return result
    if status.phase == "Suspended":
        status = status.model_copy(update={"phase": "Running" if status.active_trials else "Pending", "message": ""})

    records, _ = await plan(
        experiment,
        spec,
        status,
        observation,
        policy,
        now,
        limits,
        on_policy_error=_log_policy_error(experiment, policy),
    )

    # 4. Record first (write-ahead), then act, then fold the effect into status.
    for record in records:
        await runtime.record(record)
        status = await _act(experiment, spec, status, runtime, record, now)
        result.records.append(record)

    result.status = status
    await runtime.save_status(status)
    return result


async def _act(
    experiment: str,
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    runtime: Runtime,
    record: DecisionRecord,
    now: str,
) -> AgentExperimentStatus:
    """Carry out an executed record (idempotently) and return status with its effect applied."""
    before = status
    status = apply_record(spec, status, record, now)
    if record.outcome != "executed":
        return status
    decision = record.decision
    action = decision.action
    restarts = action == "scale" or (action == "mutate" and decision.mode == "restart")

    if action == "terminate" or restarts:
        if decision.trial:
            await runtime.stop(decision.trial, decision.reason)
    if action == "complete":
        for trial in before.active_trials:
            await runtime.stop(trial.name, "experiment-complete")
    if action == "mutate" and decision.mode == "in-place" and decision.trial:
        trial = status.trial(decision.trial)
        if trial is not None:
            control = ControlFile(
                generation=trial.control_generation,
                lr=trial.hyperparameters.get("lr"),
                weight_decay=trial.hyperparameters.get("weight_decay"),
            )
            await runtime.set_control(trial.name, control)
    if (action == "launch" or restarts) and record.new_trial:
        trial = status.trial(record.new_trial)
        if trial is not None:
            source = decision.resume_from or (decision.trial if restarts else None)
            source_trial = before.trial(source) if source else None
            if source_trial is None or source_trial.checkpoint_step is None:
                source = None  # nothing saved yet: start fresh rather than fail on a missing checkpoint
            config = build_trial_config(
                experiment,
                spec,
                trial,
                checkpoint_dir=runtime.checkpoint_dir(trial.name),
                resume_from=runtime.checkpoint_dir(source) if source else None,
            )
            await runtime.launch(trial, config, record)
    return status


def _log_policy_error(experiment: str, policy: Policy):
    def log(error: BaseException) -> None:
        # A failing policy costs this cycle's decisions, never the loop: log it and go on.
        logger.error("%s: policy %s failed, no decisions this cycle: %r", experiment, policy.name, error)

    return log


def _with_generation(status: AgentExperimentStatus, generation: int | None, now: str) -> AgentExperimentStatus:
    """Mark the spec generation this cycle acted on (kubectl and Argo CD read it)."""
    status = set_condition(
        status,
        type="Valid",
        value="True",
        reason="SpecAccepted",
        message="spec passed validation",
        generation=generation,
        now=now,
    )
    if generation is not None:
        status = status.model_copy(update={"observed_generation": generation})
    return status
