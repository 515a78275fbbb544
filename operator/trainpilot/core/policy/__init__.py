"""Policies: what to do next, given the experiment's state. Each proposes; guardrails decide.

Which one an experiment gets, wired to its I/O, is trainpilot.runtime.policies.make_policy."""

from __future__ import annotations

from trainpilot.core.policy.base import Policy, PolicyContext
from trainpilot.core.policy.heuristic import HeuristicPolicy

__all__ = ["HeuristicPolicy", "Policy", "PolicyContext"]
