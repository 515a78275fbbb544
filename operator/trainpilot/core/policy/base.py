"""What every policy sees and what it must return.

A policy proposes; it never acts. The engine checks each proposal against the guardrails and
records it, so a policy (an LLM above all) needs no trust beyond being able to make suggestions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus
from trainpilot.core.decision import Decision
from trainpilot.core.observation import Observation
from trainpilot.core.suggest import Suggester


@dataclass(frozen=True)
class PolicyContext:
    experiment: str
    spec: AgentExperimentSpec
    status: AgentExperimentStatus  # already folded with `observation`
    observation: Observation
    now: str
    suggester: Suggester
    # The admin's quota (duck-typed, see guardrails), so a policy can avoid proposing what will be
    # rejected every cycle. Guardrails enforce it regardless.
    limits: Any = None


class Policy(Protocol):
    name: str

    async def decide(self, context: PolicyContext) -> list[Decision]: ...


def may_propose(
    context: PolicyContext,
    action: str,
    trial: str | None,
    reason: str,
    hyperparameters: dict[str, float] | None = None,
) -> bool:
    """Not an action the spec or quota forbids, nor one awaiting approval, nor one a human rejected.

    Guardrails would reject or hold these anyway; proposing them every cycle would only flood
    the ledger with the same record. (An expired one may be proposed again: nobody said no.)
    """
    if action not in context.spec.policy.allowed_actions:
        return False
    limits = context.limits
    allowed = getattr(limits, "allowed_actions", None) if limits is not None else None
    if allowed is not None and action not in allowed:
        return False
    for sign_off in context.status.sign_offs:
        if (sign_off.action, sign_off.trial, sign_off.reason) != (action, trial, reason):
            continue
        if sign_off.state == "Pending":
            return False
        if sign_off.state == "Rejected" and (hyperparameters is None or sign_off.hyperparameters == hyperparameters):
            return False
    return True
