"""QuotaPolicy: matching namespaces and combining policies, strictest first."""

from __future__ import annotations

import pytest

from trainpilot.api.quota import (
    QuotaLimits,
    QuotaPolicy,
    effective_limits,
    gpus_held,
    image_allowed,
    parse_quota_policy,
    service_account_allowed,
    workload_refusal,
)


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
        "periodDays": 7,
    }
    assert parsed.name == "w" and parsed.spec.applies_to("ml") and not parsed.spec.applies_to("web")


def test_each_max_gpus_policy_is_a_pool_shared_by_the_namespaces_it_matches() -> None:
    policies = [
        policy("cluster", maxGPUs=32),
        policy("team", ["ml", "research"], maxGPUs=8),
        policy("web-only", ["web"], maxGPUs=4),
    ]
    # GPUs that experiments other than the one asking hold, per namespace.
    elsewhere = {"ml": 6, "research": 1, "web": 3, "lab": 10}
    limits = effective_limits(policies, "ml", elsewhere)
    assert [(p.policy, p.max_gpus, p.used_elsewhere) for p in limits.gpu_pools] == [
        ("cluster", 32, 20),
        ("team", 8, 7),
    ]
    assert limits.max_gpus == 8 and limits.sources["max_gpus"] == "team"
    # Without usage (the local runner, a first cycle) the pools start empty, never absent.
    assert [(p.policy, p.used_elsewhere) for p in effective_limits(policies, "web").gpu_pools] == [
        ("cluster", 0),
        ("web-only", 0),
    ]
    assert effective_limits([policy("no-gpu-limit", maxParallelTrials=2)], "ml", elsewhere).gpu_pools == []


def test_gpus_held_counts_unfinished_trials_from_a_saved_status() -> None:
    status = {
        "phase": "Running",
        "trials": [
            {"name": "a-t000", "state": "Running", "nodes": 2, "gpusPerNode": 4},
            {"name": "a-t001", "state": "Pending", "nodes": 1, "gpusPerNode": 1},
            {"name": "a-t002", "state": "Succeeded", "nodes": 4, "gpusPerNode": 8},
            {"name": "a-t003", "state": "Diverged", "nodes": 1, "gpusPerNode": 8},
            {"name": "a-t004", "state": "Running", "nodes": 1, "gpusPerNode": 0},
            {"name": "a-t005", "state": "Running", "gpusPerNode": 2},  # nodes defaults to 1
            "not a trial",
        ],
        "kopf": {"progress": {}},
    }
    assert gpus_held(status) == 2 * 4 + 1 + 2
    assert gpus_held(None) == gpus_held({}) == gpus_held({"trials": "garbage"}) == 0


def test_allowed_images_intersect_as_prefixes_and_name_their_policies() -> None:
    policies = [
        policy("a", allowedImages=["ghcr.io/org/", "docker.io/library/"]),
        policy("b", ["ml"], allowedImages=["ghcr.io/org/trainer:", "quay.io/", "ghcr.io/org/tools/"]),
        policy("c", ["ml"], maxGPUs=4),
    ]
    limits = effective_limits(policies, "ml")
    # An image passes both only where one prefix extends the other: the longer one is what is left.
    assert limits.allowed_images == ["ghcr.io/org/tools/", "ghcr.io/org/trainer:"]
    assert limits.sources["allowed_images"] == "a, b"
    assert effective_limits(policies, "web").allowed_images == ["docker.io/library/", "ghcr.io/org/"]
    assert effective_limits(policies[2:], "ml").allowed_images is None
    assert effective_limits([*policies, policy("d", allowedImages=["quay.io/"])], "ml").allowed_images == []
    assert not limits.unlimited and effective_limits(policies[2:], "web").unlimited


def test_allowed_service_accounts_intersect_and_the_default_always_passes() -> None:
    policies = [
        policy("a", allowedServiceAccounts=["trainer", "ci"]),
        policy("b", ["ml"], allowedServiceAccounts=["trainer", "admin"]),
    ]
    limits = effective_limits(policies, "ml")
    assert limits.allowed_service_accounts == ["trainer"]
    assert limits.sources["allowed_service_accounts"] == "a, b"
    assert service_account_allowed("trainer", limits.allowed_service_accounts)
    assert not service_account_allowed("admin", limits.allowed_service_accounts)
    assert not service_account_allowed("ci", limits.allowed_service_accounts)
    # An unset serviceAccountName runs as the namespace's default, which every policy allows.
    assert service_account_allowed(None, []) and service_account_allowed("default", [])
    assert not service_account_allowed("trainer", [])
    assert service_account_allowed("anyone", None)
    assert effective_limits([policy("only-default", allowedServiceAccounts=[])], "ml").allowed_service_accounts == []


@pytest.mark.parametrize(
    ("image", "prefixes", "allowed"),
    [
        ("ghcr.io/org/trainer:1.0", ["ghcr.io/org/trainer:"], True),
        ("ghcr.io/org/trainer@sha256:abc", ["ghcr.io/org/trainer@"], True),
        # A prefix is a prefix: end it with ':' or '@' for one repository, '/' for a path.
        ("ghcr.io/org/trainer-evil:1.0", ["ghcr.io/org/trainer:"], False),
        ("ghcr.io/org/trainer-evil:1.0", ["ghcr.io/org/trainer"], True),
        ("ghcr.io/organisation/x:1", ["ghcr.io/org/"], False),
        ("ghcr.io/organisation/x:1", ["ghcr.io/org"], True),
        # Matched as written: a short Docker Hub name is not rewritten to docker.io/...
        ("trainpilot/trainer:0.1.0", ["docker.io/trainpilot/"], False),
        ("trainpilot/trainer:0.1.0", ["trainpilot/trainer:"], True),
        ("anything", None, True),
        ("anything", [], False),
    ],
)
def test_image_prefixes(image: str, prefixes: list[str] | None, allowed: bool) -> None:
    assert image_allowed(image, prefixes) is allowed


def test_workload_refusal_names_the_policy_the_field_and_the_fix() -> None:
    limits = effective_limits(
        [policy("images", allowedImages=["ghcr.io/org/trainer:"]), policy("accounts", allowedServiceAccounts=[])],
        "ml",
    )
    refusal = workload_refusal(limits, "evil.io/miner:latest", None)
    assert refusal is not None
    for words in ("trialTemplate.image 'evil.io/miner:latest'", "QuotaPolicy images", "allowedImages"):
        assert words in refusal
    refusal = workload_refusal(limits, "ghcr.io/org/trainer:1", "cluster-admin")
    assert refusal is not None
    for words in ("trialTemplate.serviceAccountName 'cluster-admin'", "QuotaPolicy accounts", "unset it"):
        assert words in refusal
    assert workload_refusal(limits, "ghcr.io/org/trainer:1", None) is None
    assert workload_refusal(limits, "ghcr.io/org/trainer:1", "default") is None
    assert workload_refusal(None, "evil.io/miner", "cluster-admin") is None
    assert workload_refusal(effective_limits([], "ml"), "evil.io/miner", "cluster-admin") is None
