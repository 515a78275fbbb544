"""QuotaPolicy: matching namespaces and combining policies, strictest first."""

from __future__ import annotations

import pytest

from trainpilot.api.quota import QuotaLimits, QuotaPolicy, effective_limits, parse_quota_policy


def policy(name: str, namespaces: list[str] | None = None, **spec) -> dict:
    if namespaces is not None:
        spec["namespaceSelector"] = {"matchNames": namespaces}
    return {
        "apiVersion": "trainpilot.dev/v1alpha1",
        "kind": "QuotaPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def test_no_policy_means_unlimited() -> None:
    limits = effective_limits([], "ml")
    assert limits == QuotaLimits()
    assert limits.unlimited
    assert limits.allows("scale") and not limits.needs_approval("scale")


def test_policy_without_selector_applies_everywhere_and_selector_narrows() -> None:
    policies = [policy("everyone", maxGPUs=32), policy("team", ["ml", "research"], maxGPUs=8)]
    assert effective_limits(policies, "ml").max_gpus == 8
    assert effective_limits(policies, "research").max_gpus == 8
    assert effective_limits(policies, "web").max_gpus == 32
    assert effective_limits([policy("team", ["ml"], maxGPUs=8)], "web").unlimited


def test_strictest_value_of_each_limit_wins_and_says_where_it_comes_from() -> None:
    policies = [
        policy("a", maxGPUs=16, maxParallelTrials=4, maxGPUHoursPerExperiment=100.0, maxNodesPerTrial=8),
        policy("b", ["ml"], maxGPUs=64, maxParallelTrials=2, maxTrialsPerExperiment=50, maxGPUsPerNode=4),
        policy("c", ["ml"], maxGPUHoursPerExperiment=12.5),
    ]
    limits = effective_limits(policies, "ml")
    assert (limits.max_gpus, limits.max_parallel_trials, limits.max_trials_per_experiment) == (16, 2, 50)
    assert (limits.max_gpu_hours_per_experiment, limits.max_nodes_per_trial, limits.max_gpus_per_node) == (
        12.5,
        8,
        4,
    )
    assert limits.sources == {
        "max_gpus": "a",
        "max_parallel_trials": "b",
        "max_trials_per_experiment": "b",
        "max_gpu_hours_per_experiment": "c",
        "max_nodes_per_trial": "a",
        "max_gpus_per_node": "b",
    }
    # Order of the input does not matter.
    assert effective_limits(list(reversed(policies)), "ml") == limits


def test_zero_is_a_limit_not_unlimited() -> None:
    limits = effective_limits([policy("freeze", maxGPUs=0), policy("other", maxGPUs=4)], "ml")
    assert limits.max_gpus == 0 and limits.sources["max_gpus"] == "freeze"
    assert not limits.unlimited


def test_actions_intersect_and_approvals_add_up() -> None:
    policies = [
        policy("a", allowedActions=["launch", "terminate", "mutate", "complete"], requireApprovalFor=["mutate"]),
        policy("b", ["ml"], allowedActions=["complete", "terminate", "scale", "launch"], requireApprovalFor=["launch"]),
        policy("c", ["ml"], requireApprovalFor=["launch"]),
    ]
    limits = effective_limits(policies, "ml")
    assert limits.allowed_actions == ["launch", "terminate", "complete"]  # canonical order
    assert limits.require_approval_for == ["launch", "mutate"]
    assert limits.allows("terminate") and not limits.allows("scale") and not limits.allows("mutate")
    assert limits.needs_approval("launch") and not limits.needs_approval("terminate")
    assert limits.sources["allowed_actions"] == "b"
    assert limits.sources["require_approval_for"] == "a, b"
    # A policy with no allowedActions does not widen anything; an empty list forbids everything.
    assert effective_limits(policies[2:], "ml").allowed_actions is None
    assert effective_limits([policy("none", allowedActions=[])], "ml").allowed_actions == []


def test_models_and_dicts_mix() -> None:
    model = QuotaPolicy.model_validate(policy("m", maxGPUs=3))
    assert effective_limits([model, policy("d", maxGPUs=5)], "x").max_gpus == 3


def test_invalid_policy_raises_instead_of_lifting_a_limit() -> None:
    with pytest.raises(ValueError, match=r"QuotaPolicy broken: spec.maxGPUs: .*greater than or equal to 0"):
        effective_limits([policy("broken", maxGPUs=-2)], "ml")
    with pytest.raises(ValueError, match=r"spec.allowedActions.0"):
        parse_quota_policy(policy("bad", allowedActions=["explode"]))


def test_wire_names() -> None:
    parsed = parse_quota_policy(policy("w", ["ml"], maxGPUs=1, maxGPUHoursPerExperiment=2, maxGPUsPerNode=1))
    assert parsed.spec.wire() == {
        "namespaceSelector": {"matchNames": ["ml"]},
        "maxGPUs": 1,
        "maxGPUHoursPerExperiment": 2.0,
        "maxGPUsPerNode": 1,
        "requireApprovalFor": [],
    }
    assert parsed.name == "w" and parsed.spec.applies_to("ml") and not parsed.spec.applies_to("web")
