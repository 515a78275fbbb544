"""What spec.retention deletes of finished trials, and when: pure, from the spec and the status.

Two parts of a finished trial go (the third, a trial's older checkpoint tags, is its trainer's own
business: keep_checkpoint_tags):
- its checkpoints, unless it is the best trial, one of the last `checkpointTrials` to finish, or
  a trial an active one resumes from (its parent: a relaunch, a restart);
- its children (Job and pods, Service, ConfigMaps), `childrenAfterSeconds` after it finished,
  unless an active trial still waits for its pods to go.
Its status, its ledger records and its logs are never deleted. Each deletion is a ledger record
(core.engine.clean_up_record), so what `due` returns is also what a replay checks a record against.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, RetainedPart, TrialStatus
from trainpilot.core.observation import Observation
from trainpilot.core.times import seconds_between

# What to do about a clean-up that cannot run, said with each one (RetentionApplied=False).
STALLED_HINT = (
    "a ReadWriteOnce claim mounts on one node at a time, so a clean-up waits while a trial on another node "
    "uses it (a ReadWriteMany claim avoids that); a failed clean-up stays until you delete its Job "
    "(kubectl delete job NAME), after deleting the folder by hand or fixing the cause"
)


@dataclass(frozen=True)
class Removal:
    trial: str
    removes: RetainedPart
    why: str


def due(
    spec: AgentExperimentSpec, status: AgentExperimentStatus, now: str, parts: Collection[RetainedPart]
) -> list[Removal]:
    """The deletions spec.retention calls for now, among `parts` (what the runtime can delete)."""
    retention = spec.retention
    finished = [trial for trial in status.trials if trial.finished]
    removals: list[Removal] = []
    if "checkpoints" in parts and retention.checkpoint_trials is not None:
        kept = _kept_checkpoints(status, finished, retention.checkpoint_trials)
        for trial in finished:
            if trial.name not in kept and trial.checkpoint_step is not None and "checkpoints" not in trial.removed:
                why = (
                    f"not the best trial, not among the last {retention.checkpoint_trials} to finish, and no active "
                    "trial resumes from it (spec.retention.checkpointTrials)"
                )
                removals.append(Removal(trial.name, "checkpoints", why))
    if "children" in parts and retention.children_after_seconds is not None:
        waited_for = {trial.waiting_for for trial in status.active_trials if trial.waiting_for}
        grace = retention.children_after_seconds
        for trial in finished:
            since = seconds_between(trial.finished_at, now)
            if (
                since is not None
                and since >= grace
                and trial.name not in waited_for
                and "children" not in trial.removed
            ):
                why = f"finished {since:.0f} s ago, spec.retention.childrenAfterSeconds is {grace}"
                removals.append(Removal(trial.name, "children", why))
    return removals


def seconds_until_due(spec: AgentExperimentSpec, status: AgentExperimentStatus, now: str) -> float | None:
    """How long until the next finished trial's children are due (0: now); None when none will be."""
    grace = spec.retention.children_after_seconds
    if grace is None:
        return None
    waits = [
        grace - since
        for trial in status.trials
        if trial.finished and "children" not in trial.removed
        if (since := seconds_between(trial.finished_at, now)) is not None
    ]
    return max(0.0, min(waits)) if waits else None


def _kept_checkpoints(status: AgentExperimentStatus, finished: list[TrialStatus], count: int) -> set[str]:
    latest = sorted(finished, key=lambda trial: (trial.finished_at or "", trial.index), reverse=True)[:count]
    kept = {trial.name for trial in latest}
    if status.best_trial is not None:
        kept.add(status.best_trial.name)
    kept.update(trial.parent for trial in status.active_trials if trial.parent)
    return kept


def stalled(spec: AgentExperimentSpec, observation: Observation, now: str) -> str | None:
    """Why RetentionApplied is False: the clean-ups that failed, or that have not run within
    spec.trialTemplate.pendingTimeoutSeconds of being started; None when none has."""
    limit = spec.trial_template.pending_timeout_seconds
    problems = []
    for trial, seen in sorted(observation.clean_ups.items()):
        waited = seconds_between(seen.since, now)
        if seen.failed:
            problems.append(f"{trial}: Job {seen.job} failed to delete {seen.directory}: {seen.reason or 'failed'}")
        elif waited is not None and waited >= limit:
            problems.append(
                f"{trial}: Job {seen.job} has not deleted {seen.directory} in {waited:.0f} s "
                f"(spec.trialTemplate.pendingTimeoutSeconds {limit}): {seen.reason or 'not started'}"
            )
    if not problems:
        return None
    return "; ".join(problems) + f"; {STALLED_HINT}"
