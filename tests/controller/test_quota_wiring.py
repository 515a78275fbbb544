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
    status = {
        "trials": [running("a-t000", 2, 4), running("a-t001", 1, 8, state="Succeeded")],
        "gpuHoursUsed": 3.5,
        "modelUsage": {"calls": 2, "inputTokens": 900, "outputTokens": 100},
    }
    indexed = handlers.experiment_gpus(namespace="ml", name="a", uid="u1", status=status)
    assert indexed == {"ml": {"name": "a", "uid": "u1", "gpus": 8, "gpu_hours": 3.5, "tokens": 1000}}
    fresh = handlers.experiment_gpus(namespace="ml", name="new", uid="u2", status={})
    assert fresh == {"ml": {"name": "new", "uid": "u2", "gpus": 0, "gpu_hours": 0.0, "tokens": 0}}


def test_the_accounting_timer_writes_what_the_namespaces_spent_into_the_policys_status() -> None:
    body = {"metadata": {"name": "team"}, "spec": {"namespaceSelector": {"matchNames": ["ml"]}}, "status": {}}
    index = {
        "ml": [{"name": "a", "uid": "u1", "gpus": 4, "gpu_hours": 2.0, "tokens": 500}],
        "web": [{"name": "b", "uid": "u2", "gpus": 8, "gpu_hours": 9.0, "tokens": 0}],
    }
    patch: dict[str, Any] = {}

    class Patch:
        status = patch

    handlers.account_usage(body=body, patch=Patch(), experiment_gpus=index)
    assert patch["usage"] == [{"namespace": "ml", "gpusNow": 4, "gpuHoursInPeriod": 2.0, "tokensToday": 500}]
    assert patch["accounted"] == [{"uid": "u1", "namespace": "ml", "gpuHours": 2.0, "tokens": 500}]
    # The next tick starts from what this one wrote (a restarted operator reads it from the status).
    body["status"] = dict(patch)
    index["ml"][0] = {**index["ml"][0], "gpu_hours": 2.5}
    handlers.account_usage(body=body, patch=Patch(), experiment_gpus=index)
    assert patch["usage"][0]["gpuHoursInPeriod"] == 2.5 and patch["totals"]["gpusNow"] == 4


def test_gpus_elsewhere_leaves_out_only_the_experiment_asking() -> None:
    index = {
        "ml": [{"name": "a", "gpus": 8}, {"name": "b", "gpus": 2}],
        "web": [{"name": "a", "gpus": 5}],
    }
    assert handlers.gpus_elsewhere(index, "ml", "a") == {"ml": 2, "web": 5}
    assert handlers.gpus_elsewhere(index, "web", "a") == {"ml": 10, "web": 0}


async def test_the_daemon_hands_the_loop_limits_with_every_experiments_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    captured: dict[str, Any] = {}

    async def drive(body: Any, stopped: Any, api: Any, quota_limits: Any, pool: Any, leader: Any = None) -> None:
        captured["limits"], captured["pool"] = quota_limits, pool

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
    # What "b" held after its last cycle in this operator counts before its saved status catches up.
    captured["pool"].holds("ml", "b", 6)
    assert [pool.used_elsewhere for pool in captured["limits"]("ml").gpu_pools] == [6]


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
