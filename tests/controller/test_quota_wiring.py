"""The operator's quota inputs: the index of GPUs every experiment holds, combined into the loop's limits.

Plain calls of the kopf handler functions (no kopf, no API server): fast, like tests/core.
"""

from __future__ import annotations

from typing import Any

import pytest

from trainpilot.api.experiment import parse_spec
from trainpilot.api.quota import QuotaLimits, effective_limits
from trainpilot.controller import agent, handlers


def running(name: str, nodes: int, gpus: int, state: str = "Running") -> dict[str, Any]:
    return {"name": name, "state": state, "nodes": nodes, "gpusPerNode": gpus}


def test_the_index_holds_each_experiments_gpus_by_namespace() -> None:
    status = {"trials": [running("a-t000", 2, 4), running("a-t001", 1, 8, state="Succeeded")]}
    assert handlers.experiment_gpus(namespace="ml", name="a", status=status) == {"ml": {"name": "a", "gpus": 8}}
    assert handlers.experiment_gpus(namespace="ml", name="new", status={}) == {"ml": {"name": "new", "gpus": 0}}


def test_gpus_elsewhere_leaves_out_only_the_experiment_asking() -> None:
    index = {
        "ml": [{"name": "a", "gpus": 8}, {"name": "b", "gpus": 2}],
        "web": [{"name": "a", "gpus": 5}],
    }
    assert handlers.gpus_elsewhere(index, "ml", "a") == {"ml": 2, "web": 5}
    assert handlers.gpus_elsewhere(index, "web", "a") == {"ml": 10, "web": 0}


async def test_the_daemon_hands_the_loop_limits_with_every_experiments_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    captured: dict[str, Any] = {}

    async def drive(body: Any, stopped: Any, api: Any, quota_limits: Any) -> None:
        captured["limits"] = quota_limits

    monkeypatch.setattr(handlers.agent, "drive", drive)
    policies = {
        None: [
            {"metadata": {"name": "team"}, "spec": {"namespaceSelector": {"matchNames": ["ml"]}, "maxGPUs": 8}},
            {"metadata": {"name": "images"}, "spec": {"allowedImages": ["ghcr.io/org/"]}},
        ]
    }
    gpus = {"ml": [{"name": "a", "gpus": 4}, {"name": "b", "gpus": 3}], "web": [{"name": "c", "gpus": 16}]}
    body = {"metadata": {"name": "a", "namespace": "ml"}}
    await handlers.run_agent(body=body, stopped=None, memo=type("Memo", (), {"api": None})(), quota_policies=policies,
                             experiment_gpus=gpus)  # fmt: skip
    limits = captured["limits"]("ml")
    assert isinstance(limits, QuotaLimits)
    # Experiment "a" counts its own GPUs live; the pool holds what "b" holds, not "c" (another namespace).
    assert [(pool.policy, pool.max_gpus, pool.used_elsewhere) for pool in limits.gpu_pools] == [("team", 8, 3)]
    assert limits.allowed_images == ["ghcr.io/org/"] and limits.sources["allowed_images"] == "images"


def test_an_experiment_a_policy_refuses_is_invalid_before_any_cycle() -> None:
    """The daemon's validation step: a refused image or service account becomes Valid=False, naming the policy."""
    spec = parse_spec({"searchSpace": [{"name": "lr", "min": 0.001, "max": 0.1}], "trialTemplate": {"image": "x/y:1"}})
    refusing = {"metadata": {"name": "images"}, "spec": {"allowedImages": ["ghcr.io/org/"]}}
    with pytest.raises(ValueError, match=r"trialTemplate.image 'x/y:1' is not allowed by QuotaPolicy images"):
        agent.check_quota_allows(spec, "ml", lambda namespace: effective_limits([refusing], namespace))
    agent.check_quota_allows(spec, "ml", lambda namespace: effective_limits([], namespace))
    agent.check_quota_allows(spec, "ml", None)

    def broken(namespace: str) -> QuotaLimits:
        raise ValueError("QuotaPolicy broken: spec.maxGPUs: ...")

    # A broken policy holds decisions (the loop's own path), it does not make the user's spec invalid.
    agent.check_quota_allows(spec, "ml", broken)
