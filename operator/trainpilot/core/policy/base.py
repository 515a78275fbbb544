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
