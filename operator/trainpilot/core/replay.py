"""Replay: the recorded cycles fed, in order, to a policy, and where it would have decided otherwise.

The auditor's tool, and how a prompt or rule change is tried before it is deployed. Each cycle
log entry is the exact input the live policy had; the replayed policy's proposals go through the
same checks (engine.propose), and each cycle's outcome is compared with the records its live
proposals became. The state follows what really happened (the recorded status), so one difference
does not cascade into all later cycles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from trainpilot.core.cycle_log import CycleEntry
from trainpilot.core.decision import DecisionRecord
from trainpilot.core.engine import propose
from trainpilot.core.policy.base import Policy


@dataclass(frozen=True)
class Difference:
    time: str
    recorded: list[str]
    replayed: list[str]


@dataclass
class ReplayReport:
    cycles: int = 0
    recorded_decisions: int = 0
    replayed_decisions: int = 0
    differences: list[Difference] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # ids a cycle names that the ledger lacks


def signature(record: DecisionRecord) -> tuple[object, ...]:
    """What a decision did, without who said it or why: the same move decided twice compares equal."""
    decision = record.decision
    values = tuple(sorted((name, float(f"{value:.9g}")) for name, value in decision.hyperparameters.items()))
    return (
        decision.action,
        decision.trial,
        record.new_trial,
        values,
        decision.mode,
        decision.parent,
        decision.resume_from,
        decision.nodes,
        decision.gpus_per_node,
        decision.outcome,
        record.outcome,
    )


def describe(record: DecisionRecord) -> str:
    decision = record.decision
    target = f" {record.trial}" if record.trial else ""
    values = ", ".join(f"{name}={value:g}" for name, value in sorted(decision.hyperparameters.items()))
    return f"{decision.action}{target}{' ' + values if values else ''} ({decision.reason}; {record.outcome})"


async def replay(entries: Sequence[CycleEntry], ledger: Mapping[str, DecisionRecord], policy: Policy) -> ReplayReport:
    report = ReplayReport()
    for entry in entries:
        spec, asked = entry.policy_input()
        replayed = await propose(entry.experiment, spec, asked, policy)
        recorded = [ledger[id] for id in entry.decided if id in ledger]
        report.missing.extend(id for id in entry.decided if id not in ledger)
        report.cycles += 1
        report.recorded_decisions += len(recorded)
        report.replayed_decisions += len(replayed)
        if [signature(r) for r in recorded] != [signature(r) for r in replayed]:
            report.differences.append(
                Difference(entry.time, [describe(r) for r in recorded], [describe(r) for r in replayed])
            )
    return report
