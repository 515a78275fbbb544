"""Launches and scales that wait for room under a QuotaPolicy bound instead of failing.

A bound that running trials or time give back (a policy's maxGPUs shared with other experiments,
maxParallelTrials, maxGPUs, GPU-hours in a rolling period) holds a decision as `waiting`: one
record when it starts waiting, none while it waits (the policy asking again is not recorded
again), and one when it proceeds (the guardrails pass: carried out, or held for approval) or is
dropped (it no longer passes for another reason: the trial finished, the budget is spent).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus
from trainpilot.core import guardrails
from trainpilot.core.decision import DecisionRecord
from trainpilot.core.engine import follow_up
from trainpilot.core.state import apply_record


def resume(
    experiment: str,
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    held: Mapping[str, DecisionRecord],
    now: str,
    limits: Any = None,
) -> list[DecisionRecord]:
    """A record for each waiting decision that can proceed now or must be dropped, oldest first."""
    records: list[DecisionRecord] = []
    provisional = status
    for wait in status.waiting_for_quota:
        record = held.get(wait.id)
        if record is None:
            continue
        verdict = guardrails.check(record.decision, spec, provisional, limits)
        if verdict.outcome == "waiting":
            continue
        why = "" if verdict.outcome != "rejected" else f"dropped while waiting for quota: {verdict.reason}"
        settled = follow_up(experiment, provisional, record, verdict, now, why)
        records.append(settled)
        provisional = apply_record(spec, provisional, settled, now)
    return records
