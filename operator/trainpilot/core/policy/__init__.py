"""Policies: what to do next, given the experiment's state. Each proposes; guardrails decide."""

from __future__ import annotations

from trainpilot.api.experiment import AgentExperimentSpec
from trainpilot.core.policy.base import Policy, PolicyContext
from trainpilot.core.policy.heuristic import HeuristicPolicy

__all__ = ["HeuristicPolicy", "Policy", "PolicyContext", "make_policy"]


def make_policy(spec: AgentExperimentSpec) -> Policy:
    """The policy spec.policy.type names. The heuristic reads its settings from the spec each cycle."""
    kind = spec.policy.type
    if kind == "heuristic":
        return HeuristicPolicy()
    raise ValueError(f"spec.policy.type {kind!r} is not available in this build; use 'heuristic'")
