"""The policy an experiment names, wired to what it needs from outside (Claude: the SDK client)."""

from __future__ import annotations

from trainpilot.api.experiment import AgentExperimentSpec
from trainpilot.core.policy import HeuristicPolicy, Policy
from trainpilot.core.policy.claude import ClaudePolicy


def make_policy(spec: AgentExperimentSpec, environ: dict[str, str] | None = None) -> Policy:
    """spec.policy.type's policy. A ValueError names what is missing (the key, for Claude)."""
    if spec.policy.type == "claude":
        from trainpilot.runtime.claude import AnthropicModel

        return ClaudePolicy(AnthropicModel(spec.policy.claude, environ))
    return HeuristicPolicy()
