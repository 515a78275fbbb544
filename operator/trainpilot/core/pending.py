"""Trials that can never run do not hold a slot forever.

A trial whose pods wait longer than spec.trialTemplate.pendingTimeoutSeconds (unschedulable, an
image that cannot be pulled, a missing ConfigMap: the runtime says why in
`TrialObservation.pending_reason`) is stopped by the loop itself, before the policy is asked, and
fails with the pod's reason (core.state turns a PENDING_TIMEOUT_REASON terminate into Failed). Like
any decision it is recorded in the ledger and posted as an Event. It is the operator applying a
limit the user set, not a proposal, so it is not checked against the policy's allowed actions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime
from typing import Any

from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus
from trainpilot.core.decision import SYSTEM_POLICY, Decision, DecisionRecord, decision_id
from trainpilot.core.engine import CyclePlan, plan_cycle
from trainpilot.core.observation import Observation
from trainpilot.core.policy.base import Policy
from trainpilot.core.state import PENDING_TIMEOUT_REASON, apply_record


def _seconds(since: str, now: str) -> float | None:
    try:
        return (datetime.fromisoformat(now) - datetime.fromisoformat(since)).total_seconds()
    except (TypeError, ValueError):
        return None


def pending_timeouts(
    spec: AgentExperimentSpec, status: AgentExperimentStatus, observation: Observation, now: str
) -> list[Decision]:
    """A terminate for each active trial whose pods have waited past the limit."""
    limit = spec.trial_template.pending_timeout_seconds
    decisions = []
    for trial in status.active_trials:
        seen = observation.trials.get(trial.name)
        waited = _seconds(seen.pending_since, now) if seen is not None and seen.pending_since else None
        if seen is None or waited is None or waited < limit:
            continue
        why = seen.pending_reason or "its pods are still Pending"
        decisions.append(
            Decision(
                action="terminate",
                policy=SYSTEM_POLICY,
                trial=trial.name,
                reason=PENDING_TIMEOUT_REASON,
                rationale=(
                    f"its pods did not start within spec.trialTemplate.pendingTimeoutSeconds ({limit} s; "
                    f"waiting since {seen.pending_since}): {why}"
                )[:2000],
            )
        )
    return decisions


def timeout_records(
    experiment: str, spec: AgentExperimentSpec, status: AgentExperimentStatus, observation: Observation, now: str
) -> tuple[list[DecisionRecord], AgentExperimentStatus]:
    """This cycle's pending-timeout records, numbered from status, and status with them applied."""
    records = []
    for decision in pending_timeouts(spec, status, observation, now):
        seq = status.decisions_made
        seen = observation.trials[decision.trial or ""]
        record = DecisionRecord(
            id=decision_id(experiment, seq),
            seq=seq,
            time=now,
            experiment=experiment,
            decision=decision,
            outcome="executed",
            observation={"pendingSince": seen.pending_since, "pendingReason": seen.pending_reason},
        )
        records.append(record)
        status = apply_record(spec, status, record, now)
    return records, status


async def plan_with_timeouts(
    experiment: str,
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    observation: Observation,
    policy: Policy,
    now: str,
    limits: Any = None,
    on_policy_error: Callable[[Exception], None] | None = None,
) -> CyclePlan:
    """engine.plan_cycle, after the pending timeouts: the policy sees their slots free.

    The plan's status already holds the timeouts' effects; applying their records to it again is a
    no-op (records apply once, by sequence number), so the caller records and carries out all of them.
    """
    timeouts, status = timeout_records(experiment, spec, status, observation, now)
    planned = await plan_cycle(experiment, spec, status, observation, policy, now, limits, on_policy_error)
    return dataclasses.replace(planned, records=timeouts + planned.records)
