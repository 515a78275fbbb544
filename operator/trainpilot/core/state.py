"""The experiment's state machine: fold what the runtime saw, and what was decided, into status.

Two pure functions move status forward, both returning a new copy:
- `fold_observation`: one cycle's observation (trial phases and metrics) in,
- `apply_record`: one decision record's effect in (idempotent by the record's sequence number).
Everything derived (counters, best trial, phase) is recomputed from the trials after either.
"""

from __future__ import annotations

import math
from typing import Protocol, TypeVar

from trainpilot.api import contract
from trainpilot.api.experiment import (
    MAX_SETTLED_SIGN_OFFS,
    MAX_STATUS_DECISIONS,
    MAX_TRIAL_HISTORY,
    AgentExperimentSpec,
    AgentExperimentStatus,
    BestTrial,
    DecisionSummary,
    LaunchSettings,
    QuotaWait,
    SignOff,
    SignOffState,
    TrialState,
    TrialStatus,
)
from trainpilot.api.metrics import TrialMetrics
from trainpilot.api.trial import Hyperparameters
from trainpilot.core.decision import CLEAN_UP, DecisionRecord
from trainpilot.core.observation import Observation, TrialObservation, evaluation_step, new_evaluation
from trainpilot.core.times import plus_seconds, seconds_between


class _Settles(Protocol):
    @property
    def state(self) -> str: ...


T = TypeVar("T", bound=_Settles)

# A terminate with one of these reasons means "it diverged": the heuristic relaunches it lower, and
# the suggester tells it to Optuna as failed even though it was stopped before the trainer gave up.
DIVERGED_REASON = "nonfinite-loss"
SPIKE_REASON = "loss-spike"
DIVERGED_REASONS = frozenset({DIVERGED_REASON, SPIKE_REASON})
COMPLETE_REASON = "experiment-complete"
# A terminate with this reason (core.pending) stops a trial whose pods never started: it failed.
PENDING_TIMEOUT_REASON = "pending-timeout"
PENDING_PREFIX = "pending: "
DEFAULT_MAX_STEPS: int = Hyperparameters.model_fields["max_steps"].default


def is_diverged(trial: TrialStatus) -> bool:
    """The trainer exited on a non-finite loss, or a policy stopped it for one or for a loss spike."""
    return trial.state == "Diverged" or (trial.state == "Terminated" and trial.message in DIVERGED_REASONS)


def is_scored(trial: TrialStatus) -> bool:
    """Its objective counts: measured, and the trial neither crashed nor diverged.

    Crashed and diverged trials never finished what their settings asked for, so they are never
    the best (the suggester still tells a diverged one to TPE as a bad outcome: divergedToldAs).
    """
    return trial.best_objective is not None and trial.state != "Failed" and not is_diverged(trial)


def reference_fingerprint(trials: list[TrialStatus]) -> str | None:
    """The validation set trials are ranked on: the first-launched trial's that reported one."""
    return next(
        (
            trial.validation_fingerprint
            for trial in sorted(trials, key=lambda t: t.index)
            if trial.validation_fingerprint
        ),
        None,
    )


def comparable(trial: TrialStatus, reference: str | None) -> bool:
    """Scored on the reference validation set (or on one nobody reported: a custom trainer's)."""
    return reference is None or trial.validation_fingerprint in (None, reference)


def incomparable_trials(trials: list[TrialStatus]) -> str | None:
    """What says that some trials were scored on other data than the reference, or None."""
    reference = reference_fingerprint(trials)
    apart = [trial for trial in trials if not comparable(trial, reference)]
    if not apart:
        return None
    first = min((trial for trial in trials if trial.validation_fingerprint == reference), key=lambda t: t.index)
    listed = ", ".join(f"{trial.name} ({trial.validation_fingerprint})" for trial in apart[:5])
    more = f" and {len(apart) - 5} more" if len(apart) > 5 else ""
    return (
        f"{listed}{more} scored on another validation set than {first.name}'s ({reference}): left out of "
        "the ranking, ASHA rungs and the best trial. Give every trial the same data settings, block_size "
        "and eval_windows (trainpilot_validation_fingerprint says which set a trial used)"
    )


def max_steps(spec: AgentExperimentSpec, trial: TrialStatus) -> int:
    """What the trial will run: reported by the trainer, else searched, else the template's."""
    for candidate in (
        trial.max_steps,
        trial.hyperparameters.get("max_steps"),
        spec.trial_template.hyperparameters.get("max_steps"),
    ):
        if isinstance(candidate, (int, float)) and math.isfinite(candidate) and candidate > 0:
            return int(candidate)
    return DEFAULT_MAX_STEPS


def steps_trained(trial: TrialStatus) -> int:
    """Optimizer steps the trial trained itself: not those of the checkpoint it resumed."""
    return max(trial.step - (trial.resumed_from_step or 0), 0)


def steps_committed(spec: AgentExperimentSpec, trial: TrialStatus) -> int:
    """What the trial costs of spec.budget.maxTrialSteps: its steps once finished, all it will run until then."""
    if trial.finished:
        return steps_trained(trial)
    return max(max_steps(spec, trial) - (trial.resumed_from_step or 0), steps_trained(trial))


def rung_step(spec: AgentExperimentSpec, trial: TrialStatus, fraction: float) -> int:
    return max(1, round(fraction * max_steps(spec, trial)))


# --------------------------------------------------------------------------------------------
# Observations
# --------------------------------------------------------------------------------------------


def fold_observation(
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    observation: Observation,
    now: str,
) -> AgentExperimentStatus:
    status = status.model_copy(deep=True)
    elapsed = _seconds_between(status.last_cycle_time, now)
    for trial in status.trials:
        if not trial.finished:
            _fold_trial(spec, trial, observation.trials.get(trial.name), now, elapsed)
    status.last_cycle_time = now
    return _recount(spec, status)


def _fold_trial(
    spec: AgentExperimentSpec,
    trial: TrialStatus,
    seen: TrialObservation | None,
    now: str,
    elapsed: float,
) -> None:
    was_running = trial.state == "Running"
    if seen is not None:
        if seen.scrape_error is not None:
            trial.failed_scrapes += 1
        elif seen.metrics is not None:
            trial.failed_scrapes = 0
        # Metrics first: a trial that just finished still reports its last step and losses.
        if seen.metrics is not None:
            _fold_metrics(spec, trial, seen.metrics)
        trial.state, message = _next_state(seen)
        if message:
            trial.message = message
        elif trial.state == "Pending" and seen.pending_reason:
            trial.message = PENDING_PREFIX + seen.pending_reason  # why it waits (a queue, the scheduler)
        elif trial.message.startswith(PENDING_PREFIX):
            trial.message = ""  # it waits no more
    # Conservative: a trial that started or stopped during the interval is charged all of it,
    # so a GPU-hour budget errs on the side of stopping early.
    if was_running or trial.state == "Running":
        trial.gpu_seconds += trial.nodes * trial.gpus_per_node * elapsed
    if trial.state == "Running" and trial.started_at is None:
        trial.started_at = now
    if trial.finished:
        trial.started_at = trial.started_at or now
        trial.finished_at = now


def _next_state(seen: TrialObservation) -> tuple[TrialState, str]:
    if seen.phase in ("Pending", "Running", "Succeeded"):
        return seen.phase, ""
    if seen.phase == "Missing":
        return "Failed", "its workload disappeared" + (f": {seen.message}" if seen.message else "")
    reason = seen.exit_reason or "unknown"
    detail = seen.message or f"trainer exited ({reason}, code {seen.exit_code})"
    return ("Diverged" if reason == "diverged" else "Failed"), detail


def _fold_metrics(spec: AgentExperimentSpec, trial: TrialStatus, metrics: TrialMetrics) -> None:
    # Metrics are untrusted trainer output: anything non-finite or missing leaves the field as it was.
    previous_step = trial.step
    step = _number(metrics, contract.METRIC_STEP)
    if step is not None and step >= 0:
        trial.step = int(step)
    reported_max = _number(metrics, contract.METRIC_MAX_STEPS)
    if reported_max is not None and reported_max > 0:
        trial.max_steps = int(reported_max)
    checkpoint = _number(metrics, contract.METRIC_CHECKPOINT_STEP)
    if checkpoint is not None and checkpoint >= 0:  # the trainer reports -1 before its first save
        trial.checkpoint_step = int(checkpoint)
    floor = _number(metrics, contract.METRIC_LOSS_FLOOR)
    if floor is not None:
        trial.loss_floor = floor
    if (fingerprint := metrics.validation_fingerprint) is not None:
        trial.validation_fingerprint = fingerprint
    # Counters never go backwards; the control generation in status is the one *requested*, which
    # may run ahead of what the trainer reports having applied.
    nonfinite = _number(metrics, contract.METRIC_NONFINITE_LOSS)
    if nonfinite is not None:
        if nonfinite > trial.nonfinite_losses:
            _mark_unstable(trial)
        trial.nonfinite_losses = max(trial.nonfinite_losses, int(nonfinite))
    spikes = _number(metrics, contract.METRIC_LOSS_SPIKES)
    if spikes is not None:
        if spikes > trial.loss_spikes:
            _mark_unstable(trial)
        trial.loss_spikes = max(trial.loss_spikes, int(spikes))
    _count_evaluation(trial, _number(metrics, contract.METRIC_EVAL_STEP))
    generation = _number(metrics, contract.METRIC_CONTROL_GENERATION)
    if generation is not None:
        trial.control_generation = max(trial.control_generation, int(generation))

    loss = _number(metrics, contract.METRIC_TRAIN_LOSS)
    if loss is not None:
        best = trial.best_train_loss
        if best is not None and best > 0 and loss > spec.policy.heuristic.spike_factor * best:
            _mark_unstable(trial)
        trial.train_loss = loss
        trial.best_train_loss = loss if trial.best_train_loss is None else min(trial.best_train_loss, loss)
        # Only a new step is a new sample: re-reading the same gauge would drag the EMA toward it.
        if trial.smoothed_train_loss is None:
            trial.smoothed_train_loss = loss
        elif trial.step > previous_step:
            weight = spec.policy.heuristic.smoothing
            trial.smoothed_train_loss = weight * loss + (1 - weight) * trial.smoothed_train_loss

    objective = metrics.objective(spec.objective.metric)
    if objective is not None:
        trial.objective = objective
        if trial.best_objective is None or spec.objective.better(objective, trial.best_objective):
            trial.best_objective = objective
        last = trial.history[-1] if trial.history else None
        evaluation = new_evaluation(metrics.values, spec.objective.metric, trial.step, last)
        if evaluation is not None:
            trial.history = [*trial.history, [float(evaluation[0]), evaluation[1]]][-MAX_TRIAL_HISTORY:]
    _fold_rungs(spec, trial, metrics)


def _fold_rungs(spec: AgentExperimentSpec, trial: TrialStatus, metrics: TrialMetrics) -> None:
    """ASHA compares like with like: a rung holds the evaluation made at exactly its step. The
    trainer's rung gauges hold it until the next rung; an evaluation scraped at that step counts
    too. Only a trainer that does not say where it measured (no trainpilot_eval_step) has its first
    evaluation at or after the rung stand in for it."""
    rungs = {rung_step(spec, trial, fraction) for fraction in spec.policy.heuristic.rungs}
    measured: dict[int, float] = {}
    rung_at, rung_value = (
        _number(metrics, contract.METRIC_RUNG_STEP),
        _number(metrics, contract.rung_metric(spec.objective.metric)),
    )
    if rung_at is not None and rung_value is not None and math.isfinite(rung_value):
        measured[int(rung_at)] = rung_value
    if trial.history:
        evaluated_at, value = int(trial.history[-1][0]), trial.history[-1][1]
        if evaluation_step(metrics.values, spec.objective.metric) is not None:
            measured.setdefault(evaluated_at, value)
        else:
            measured.update({rung: value for rung in rungs if evaluated_at >= rung and rung not in measured})
    for rung in rungs & measured.keys():
        trial.rung_objectives.setdefault(str(rung), measured[rung])


def _mark_unstable(trial: TrialStatus) -> None:
    """The first bad sign (a non-finite loss, or a raw loss above spikeFactor x its best): checkpoints
    saved from here on may hold the unstable state, so a relaunch never resumes them."""
    if trial.unstable_since is None:
        trial.unstable_since = trial.step


def _count_evaluation(trial: TrialStatus, eval_step: float | None) -> None:
    """One more evaluation each time trainpilot_eval_step advances (it is -1 before the first)."""
    if eval_step is None or eval_step < 0:
        return
    if trial.eval_step is None or eval_step > trial.eval_step:
        trial.evaluations += 1
        trial.eval_step = int(eval_step)


def _number(metrics: TrialMetrics, name: str) -> float | None:
    value = metrics.values.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _seconds_between(earlier: str | None, later: str) -> float:
    return max(seconds_between(earlier, later) or 0.0, 0.0)


# --------------------------------------------------------------------------------------------
# Decision records
# --------------------------------------------------------------------------------------------


def apply_record(
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    record: DecisionRecord,
    now: str,
) -> AgentExperimentStatus:
    status = status.model_copy(deep=True)
    # Records are applied in sequence; one below the count has already been applied (a retried cycle).
    if record.seq < status.decisions_made:
        return status
    status.decisions_made = record.seq + 1
    summary = DecisionSummary(
        id=record.id,
        action=record.decision.action,
        trial=record.trial,
        policy=record.decision.policy,
        outcome=record.outcome,
        reason=record.decision.reason,
        time=record.time,
    )
    status.decisions = [*status.decisions, summary][-MAX_STATUS_DECISIONS:]
    if record.outcome == "executed":
        _apply_effect(spec, status, record, now)
    elif record.outcome == "failed":
        _apply_failure(status, record, now)
    _apply_sign_off(spec, status, record)
    _apply_quota_wait(status, record)
    return _recount(spec, status)


SETTLED_STATES: dict[str, SignOffState] = {"approved": "Approved", "rejected": "Rejected", "expired": "Expired"}


def _apply_sign_off(spec: AgentExperimentSpec, status: AgentExperimentStatus, record: DecisionRecord) -> None:
    """Hold a decision for approval, or settle one; an experiment that ends ends what it still held."""
    decision = record.decision
    if record.outcome == "pending-approval":
        held = SignOff(
            id=record.id,
            action=decision.action,
            trial=decision.trial,
            policy=decision.policy,
            reason=decision.reason,
            hyperparameters=dict(decision.hyperparameters),
            held_at=record.time,
            expires_at=plus_seconds(record.time, spec.policy.approval_timeout_seconds),
        )
        status.sign_offs = [*status.sign_offs, held]
    settling = status.sign_off(record.follows) if record.follows and record.sign_off is not None else None
    if settling is not None and settling.state == "Pending" and record.sign_off is not None:
        settling.state, settling.by = SETTLED_STATES[record.sign_off.verdict], record.sign_off.by
        settling.settled_at, settling.settled_by_decision = record.time, record.id
    if record.outcome == "executed" and decision.action == "complete":
        for left in status.awaiting_approval:
            left.state, left.settled_at, left.settled_by_decision = "Expired", record.time, record.id
    status.sign_offs = _open_and_recent(status.sign_offs, "Pending")


def _apply_quota_wait(status: AgentExperimentStatus, record: DecisionRecord) -> None:
    """Start waiting for a QuotaPolicy bound, or stop: it proceeded, was dropped, or the experiment ended."""
    decision = record.decision
    if record.outcome == "waiting":
        wait = QuotaWait(
            id=record.id,
            action=decision.action,
            trial=decision.trial,
            reason=decision.reason,
            since=record.time,
            bound=record.verdict,
        )
        status.quota_waits = [*status.quota_waits, wait]
    waiting = next((w for w in status.waiting_for_quota if w.id == record.follows), None) if record.follows else None
    if waiting is not None and record.sign_off is None:
        waiting.state = "Proceeded" if record.outcome in ("executed", "pending-approval") else "Dropped"
        waiting.settled_by_decision = record.id
    if record.outcome == "executed" and decision.action == "complete":
        for left in status.waiting_for_quota:
            left.state, left.settled_by_decision = "Dropped", record.id
    status.quota_waits = _open_and_recent(status.quota_waits, "Waiting")


def _open_and_recent(items: list[T], open_state: str) -> list[T]:
    """Every item still in `open_state`, and the last MAX_SETTLED_SIGN_OFFS settled ones, in order."""
    settled = [item for item in items if item.state != open_state]
    keep = {id(item) for item in settled[-MAX_SETTLED_SIGN_OFFS:]}
    return [item for item in items if item.state == open_state or id(item) in keep]


def _apply_effect(spec: AgentExperimentSpec, status: AgentExperimentStatus, record: DecisionRecord, now: str) -> None:
    decision = record.decision
    target = status.trial(decision.trial) if decision.trial else None
    if decision.action == "launch":
        # A relaunch from a trial's checkpoint runs as that trial was launched (its checkpoint must
        # load); a fresh trial takes the spec as it is now.
        source = status.trial(decision.resume_from) if decision.resume_from else None
        launch = _launch_settings(spec, status, source)
        template = launch.trial_template
        _add_trial(
            status,
            record,
            hyperparameters=dict(decision.hyperparameters),
            parent=decision.parent,
            resume_from=decision.resume_from,
            nodes=decision.nodes if decision.nodes is not None else template.nodes,
            gpus_per_node=decision.gpus_per_node if decision.gpus_per_node is not None else template.gpus_per_node,
            launch=launch,
        )
    elif decision.action == "terminate":
        _stop(spec, target, decision.reason, now)
        if target is not None and decision.reason == PENDING_TIMEOUT_REASON and target.state == "Terminated":
            target.state, target.message = "Failed", decision.rationale  # it never ran: a failure, with why
    elif decision.action == "mutate" and decision.mode == "in-place":
        if target is not None and not target.finished:
            target.hyperparameters = {**target.hyperparameters, **decision.hyperparameters}
            target.control_generation += 1
            target.changed_at_step = target.step
    elif decision.action in ("mutate", "scale") and target is not None:
        # A restart: the old trial stops (checkpointing on SIGTERM) and a child resumes from it,
        # started only once the old one's pods are gone (the loop's hand-off), never mid-save.
        _stop(spec, target, decision.reason, now)
        _add_trial(
            status,
            record,
            hyperparameters={**target.hyperparameters, **decision.hyperparameters},
            parent=target.name,
            resume_from=None,
            nodes=decision.nodes if decision.nodes is not None else target.nodes,
            gpus_per_node=decision.gpus_per_node if decision.gpus_per_node is not None else target.gpus_per_node,
            waiting_for=(target.name, now),
            launch=_launch_settings(spec, status, target),
        )
    elif decision.action == CLEAN_UP and target is not None and decision.removes is not None:
        if decision.removes not in target.removed:
            target.removed = [*target.removed, decision.removes]
    elif decision.action == "complete":
        for trial in status.trials:
            _stop(spec, trial, COMPLETE_REASON, now)
        status.phase = "Failed" if decision.outcome == "failed" else "Succeeded"
        status.message = decision.rationale or decision.reason
        status.finished_at = now


def _launch_settings(
    spec: AgentExperimentSpec, status: AgentExperimentStatus, source: TrialStatus | None
) -> LaunchSettings:
    """A new trial's launch settings: `source`'s when it resumes one that has them (a restart, a
    relaunch from a checkpoint), else the spec's as it is now."""
    inherited = status.settings_of(source.name) if source is not None else None
    return inherited if inherited is not None else LaunchSettings.of(spec)


def _add_trial(
    status: AgentExperimentStatus,
    record: DecisionRecord,
    *,
    hyperparameters: dict[str, float],
    parent: str | None,
    resume_from: str | None,
    nodes: int,
    gpus_per_node: int,
    launch: LaunchSettings,
    waiting_for: tuple[str, str] | None = None,
) -> None:
    """`waiting_for`: (the trial whose pods must go first, since when)."""
    if record.new_trial is None or status.trial(record.new_trial) is not None:
        return
    parent_trial = status.trial(parent) if parent else None
    source = status.trial(resume_from) if resume_from else None
    status.trials.append(
        TrialStatus(
            name=record.new_trial,
            index=len(status.trials),
            hyperparameters=hyperparameters,
            state="Pending",
            decision=record.id,
            parent=parent,
            generation=parent_trial.generation + 1 if parent_trial else 0,
            resumed_from_step=source.checkpoint_step if source else None,
            waiting_for=waiting_for[0] if waiting_for else None,
            waiting_since=waiting_for[1] if waiting_for else None,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            launch=launch.key,
        )
    )
    status.launch_settings.setdefault(launch.key, launch)


def _stop(spec: AgentExperimentSpec, trial: TrialStatus | None, reason: str, now: str) -> None:
    if trial is None or trial.finished:
        return
    steps = max_steps(spec, trial)
    if reason == COMPLETE_REASON and trial.step >= steps:
        # It ran all its steps and was only finishing up (final evaluation, checkpoint) when the
        # experiment completed: it succeeded, it was not cut short.
        trial.state, trial.message = "Succeeded", f"ran all {steps} steps"
    else:
        trial.state, trial.message = "Terminated", reason
    trial.finished_at = now
    trial.started_at = trial.started_at or now


def _apply_failure(status: AgentExperimentStatus, record: DecisionRecord, now: str) -> None:
    """A follow-up record: the world refused for good what an executed record asked of this trial."""
    target = status.trial(record.trial) if record.trial else None
    if target is None:
        return
    decision = record.decision
    if decision.action == "mutate" and decision.mode == "in-place":
        # Its trainer never got the new values: status keeps saying what it runs.
        target.hyperparameters = {k: float(v) for k, v in record.before.items() if isinstance(v, (int, float))}
        target.control_generation = max(target.control_generation - 1, 0)
        target.message = record.verdict
        return
    if decision.action == CLEAN_UP:
        # The trial's results stand; what was not deleted is said here, never tried again (no loop).
        target.message = record.verdict
        return
    # A launch that never happened, or a trial that could not be stopped: either way it is out of
    # the experiment's hands, and counts as failed (maxFailedTrials ends an experiment that keeps this up).
    target.state = "Failed"
    target.message = record.verdict
    target.finished_at = now
    target.started_at = target.started_at or now


# --------------------------------------------------------------------------------------------
# Derived fields
# --------------------------------------------------------------------------------------------


def _recount(spec: AgentExperimentSpec, status: AgentExperimentStatus) -> AgentExperimentStatus:
    trials = status.trials
    status.trials_launched = len(trials)
    status.trials_running = sum(not trial.finished for trial in trials)
    status.trials_succeeded = sum(trial.state == "Succeeded" for trial in trials)
    status.trials_failed = sum(trial.state == "Failed" for trial in trials)
    status.trials_diverged = sum(trial.state == "Diverged" or is_diverged(trial) for trial in trials)
    status.trials_terminated = sum(trial.state == "Terminated" for trial in trials)
    status.trials_summary = f"{len(trials) - status.trials_running}/{spec.budget.max_trials}"
    status.gpu_hours_used = sum(trial.gpu_seconds for trial in trials) / 3600
    status.trial_steps_used = sum(steps_trained(trial) for trial in trials)
    status.best_trial = best_trial(spec, trials)
    status.best_objective = status.best_trial.objective if status.best_trial else None
    # Suspended is the loop's to set and clear; final phases never go back.
    if status.trials_running and status.phase not in ("Succeeded", "Failed", "Suspended"):
        status.phase = "Running"
    return status


def best_trial(spec: AgentExperimentSpec, trials: list[TrialStatus]) -> BestTrial | None:
    best: TrialStatus | None = None
    reference = reference_fingerprint(trials)
    for trial in trials:
        if not is_scored(trial) or not comparable(trial, reference):
            continue
        if best is None or spec.objective.better(trial.best_objective, best.best_objective):  # type: ignore[arg-type]
            best = trial
    if best is None or best.best_objective is None:
        return None
    step = next((int(point[0]) for point in best.history if point[1] == best.best_objective), best.step)
    return BestTrial(
        name=best.name,
        objective=best.best_objective,
        step=step,
        hyperparameters=dict(best.hyperparameters),
    )
