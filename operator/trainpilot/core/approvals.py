"""Human sign-off: what a human's approve or reject does to a decision held for approval.

A decision whose action spec.policy.requireApprovalFor (or a QuotaPolicy) lists is recorded as
pending-approval and has no effect. Each cycle, `settle` turns the sign-offs the runtime read
(annotations in a cluster, files in a run directory) into records that follow the held one:
- approved: the same decision, checked against the guardrails as things stand now (a slot may
  have filled, a trial finished, a quota tightened), then executed, or rejected saying why;
- rejected: rejected, with who rejected it;
- nobody's word within spec.policy.approvalTimeoutSeconds: expired (rejected), so a decision taken
  on an old picture is never carried out late.
Who signed off is what the runtime vouches for (in a cluster, the API server's admission policy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, SignOff
from trainpilot.core import guardrails
from trainpilot.core.decision import DecisionRecord, SignOffNote
from trainpilot.core.engine import follow_up
from trainpilot.core.guardrails import Verdict
from trainpilot.core.state import apply_record
from trainpilot.core.times import seconds_between


@dataclass(frozen=True)
class Approval:
    """One human's word on one held decision, as a runtime read it."""

    decision: str
    verdict: Literal["approve", "reject"]
    by: str

    def __str__(self) -> str:
        return f"{self.verdict} {self.decision} by {self.by or '(nobody named)'}"


@dataclass
class Settlement:
    records: list[DecisionRecord] = field(default_factory=list)
    ignored: list[tuple[Approval, str]] = field(default_factory=list)  # with why


def awaiting(status: AgentExperimentStatus, decision: str) -> SignOff:
    """The decision awaiting approval under id `decision`; ValueError naming the ones that are."""
    sign_off = status.sign_off(decision)
    if sign_off is not None and sign_off.state == "Pending":
        return sign_off
    waiting = ", ".join(held.id for held in status.awaiting_approval) or "none"
    if sign_off is not None:
        settled = sign_off.state.lower() + (f" by {sign_off.by}" if sign_off.by else "")
        raise ValueError(f"{decision} is no longer awaiting approval ({settled}); awaiting now: {waiting}")
    raise ValueError(f"{decision} is not a decision awaiting approval; awaiting now: {waiting}")


def expired(sign_off: SignOff, now: str) -> bool:
    left = seconds_between(now, sign_off.expires_at)
    return sign_off.state == "Pending" and left is not None and left <= 0


def wanted(status: AgentExperimentStatus, approvals: Sequence[Approval], now: str) -> list[str]:
    """Ids of the held decisions this cycle settles: named by a sign-off, or expired."""
    pending = {sign_off.id for sign_off in status.awaiting_approval}
    named = [approval.decision for approval in approvals if approval.decision in pending]
    return sorted(set(named) | {sign_off.id for sign_off in status.awaiting_approval if expired(sign_off, now)})


def settle(
    experiment: str,
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    held: Mapping[str, DecisionRecord],
    approvals: Sequence[Approval],
    now: str,
    limits: Any = None,
) -> Settlement:
    """Records settling the held decisions named in `approvals` (rejections first), then the expired
    ones; `held` maps a held decision's id to its pending-approval record from the ledger."""
    settlement = Settlement()
    provisional = status
    for approval in sorted(approvals, key=lambda approval: approval.verdict != "reject"):
        sign_off = provisional.sign_off(approval.decision)
        if sign_off is None:
            settlement.ignored.append((approval, f"{approval.decision} is not a decision held for approval"))
            continue
        if sign_off.state != "Pending":
            continue  # settled already; its annotation (or file) is simply still there
        record = held.get(approval.decision)
        if record is None or record.outcome != "pending-approval":
            settlement.ignored.append((approval, f"the ledger holds no held decision {approval.decision}"))
            continue
        if not approval.by:
            settlement.ignored.append((approval, "it names nobody: a sign-off must say who gave it"))
            continue
        settled = _approved(experiment, spec, provisional, record, approval.by, now, limits)
        if approval.verdict == "reject":
            settled = _follow_up(provisional, record, f"rejected by {approval.by}", now, "rejected", approval.by)
        settlement.records.append(settled)
        provisional = apply_record(spec, provisional, settled, now)
    for sign_off in provisional.awaiting_approval:
        record = held.get(sign_off.id)
        if record is not None and expired(sign_off, now):
            timeout = spec.policy.approval_timeout_seconds
            why = f"expired: nobody approved it within spec.policy.approvalTimeoutSeconds ({timeout} s)"
            settled = _follow_up(provisional, record, why, now, "expired", None)
            settlement.records.append(settled)
            provisional = apply_record(spec, provisional, settled, now)
    return settlement


def _approved(
    experiment: str,
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    held: DecisionRecord,
    by: str,
    now: str,
    limits: Any,
) -> DecisionRecord:
    verdict = guardrails.check(held.decision, spec, status, limits, approved=True)
    note = SignOffNote(verdict="approved", by=by)
    if verdict.outcome == "waiting":  # approved, and now it waits for the quota like any launch
        return follow_up(experiment, status, held, verdict, now, sign_off=note)
    rejected = Verdict("rejected", verdict.reason)
    why = f"approved by {by}, but it no longer passes the guardrails: {verdict.reason}"
    return follow_up(experiment, status, held, verdict if verdict.executed else rejected, now, why, note)


def _follow_up(
    status: AgentExperimentStatus,
    held: DecisionRecord,
    why: str,
    now: str,
    verdict: Literal["approved", "rejected", "expired"],
    by: str | None,
) -> DecisionRecord:
    note = SignOffNote(verdict=verdict, by=by)
    return follow_up(held.experiment, status, held, Verdict("rejected", why), now, why, note)
