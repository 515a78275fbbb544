"""QuotaPolicy on the emulated cluster, with the chart's RBAC: one policy's GPUs shared by
experiments in two namespaces, and its status accounting what each namespace spent, across an
operator restart. Trials are the fake trainer on a fake node with 2 GPUs."""

from __future__ import annotations

import asyncio
import copy

import pytest

from tests.controller.test_operator_e2e import HANDLERS, QUICKSTART
from tests.support.chart import ALL_NAMESPACES
from tests.support.kube import Kube, aeventually, run_kopf_operator
from tests.support.localkit import FAKE_TRAINER
from trainpilot.api import contract

pytestmark = pytest.mark.slow

POLICY = "team"


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


@pytest.fixture
def kube_release():
    return ALL_NAMESPACES


def experiment(name: str, namespace: str) -> dict:
    body = copy.deepcopy(QUICKSTART)
    body["metadata"] = {"name": name, "namespace": namespace}
    spec = body["spec"]
    spec["initialTrials"] = [{"lr": 0.01}, {"lr": 0.02}]
    spec["budget"] = {"maxTrials": 3, "parallelTrials": 2, "maxFailedTrials": 1}
    spec["policy"] = {"type": "heuristic", "intervalSeconds": 1}
    spec["trialTemplate"].update(
        command=["python", str(FAKE_TRAINER)], gpusPerNode=1, env={"FAKE_STEP_SECONDS": "0.02"}
    )
    return body


def status_of(kube: Kube, name: str, namespace: str) -> dict:
    obj = kube.custom().get_namespaced_custom_object(
        contract.GROUP, contract.VERSION, namespace, contract.EXPERIMENT_PLURAL, name
    )
    return obj.get("status") or {}


def held_gpus(status: dict) -> int:
    return sum(
        t.get("nodes", 1) * t.get("gpusPerNode", 0)
        for t in status.get("trials", [])
        if t.get("state") not in ("Succeeded", "Failed", "Terminated", "Diverged")
    )


def policy_status(kube: Kube) -> dict:
    obj = kube.custom().get_cluster_custom_object(contract.GROUP, contract.VERSION, contract.QUOTA_PLURAL, POLICY)
    return obj.get("status") or {}


async def test_one_policys_gpus_are_shared_within_and_across_namespaces_and_its_usage_survives_a_restart(
    kube: Kube, make_fake_node
) -> None:
    make_fake_node(extended_resources={"nvidia.com/gpu": 4})
    kube.ensure_namespace("lab")
    kube.apply(
        [
            {
                "apiVersion": contract.API_VERSION,
                "kind": contract.QUOTA_KIND,
                "metadata": {"name": POLICY},
                "spec": {"namespaceSelector": {"matchNames": ["default", "lab"]}, "maxGPUs": 2},
            }
        ]
    )
    peak = 0

    # Two experiments in one namespace and one in another, all under the same policy.
    experiments = [("alpha", "default"), ("gamma", "default"), ("beta", "lab")]

    async def watch_the_pool() -> None:
        nonlocal peak
        while True:
            peak = max(peak, sum(held_gpus(status_of(kube, name, namespace)) for name, namespace in experiments))
            await asyncio.sleep(0.2)

    def all_done() -> bool:
        phases = [status_of(kube, name, namespace).get("phase") for name, namespace in experiments]
        return all(phase in ("Succeeded", "Failed") for phase in phases)

    async with run_kopf_operator(HANDLERS, clusterwide=True):
        kube.apply([experiment(name, namespace) for name, namespace in experiments])
        watcher = asyncio.create_task(watch_the_pool())
        try:
            await aeventually(all_done, timeout=240, interval=1)
        finally:
            watcher.cancel()
        final = {name: status_of(kube, name, namespace) for name, namespace in experiments}
        assert all(s["phase"] == "Succeeded" for s in final.values()), {n: s.get("message") for n, s in final.items()}
        # Each experiment wanted 2 GPUs at once; the policy's 2 were never passed, within or across namespaces.
        assert peak <= 2
        spent = {
            "default": final["alpha"]["gpuHoursUsed"] + final["gamma"]["gpuHoursUsed"],
            "lab": final["beta"]["gpuHoursUsed"],
        }
        assert all(hours > 0 for hours in spent.values())

        def accounted() -> dict | None:
            usage = {u["namespace"]: u for u in policy_status(kube).get("usage", [])}
            ok = all(abs(usage.get(ns, {}).get("gpuHoursInPeriod", -1) - hours) < 1e-4 for ns, hours in spent.items())
            return usage if ok else None

        await aeventually(accounted, timeout=60, interval=1)  # the timer's next tick

    before = policy_status(kube)
    async with run_kopf_operator(HANDLERS, clusterwide=True):  # a restarted operator
        await aeventually(lambda: policy_status(kube).get("accountedAt") != before.get("accountedAt"), timeout=60)
    after = policy_status(kube)
    # The new operator started from the stored accounting: nothing was counted twice.
    # (The buckets keep GPU-hours to 6 decimals.)
    assert {u["namespace"]: u["gpuHoursInPeriod"] for u in after["usage"]} == pytest.approx(spent, abs=1e-4)
    assert after["totals"]["gpuHoursInPeriod"] == pytest.approx(sum(spent.values()), abs=1e-4)
    assert after["totals"]["gpusNow"] == 0
    assert [denied.attributes for denied in kube.forbidden()] == []
