"""The policy an experiment names, wired to what it needs from outside (Claude: the SDK client)."""

from __future__ import annotations

from collections.abc import Mapping

from trainpilot.api.experiment import AgentExperimentSpec
from trainpilot.core.policy import HeuristicPolicy, Policy
from trainpilot.core.policy.claude import ClaudePolicy
from trainpilot.runtime.claude import Archive


def make_policy(
    spec: AgentExperimentSpec, environ: Mapping[str, str] | None = None, archive: Archive | None = None
) -> Policy:
    """spec.policy.type's policy. A ValueError names what is missing (the key, for Claude).

    `archive` receives every exchange with Claude (see runtime.claude.Archive)."""
    if spec.policy.type == "claude":
        from trainpilot.runtime.claude import AnthropicModel

        return ClaudePolicy(AnthropicModel(spec.policy.claude, environ, archive))
    return HeuristicPolicy()
