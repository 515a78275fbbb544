"""spec.metrics.source prometheus, end to end: the operator reads every trial's metrics from a real
Prometheus server that scrapes the fake node's trainer pods with the chart's PodMonitor relabelings.

The operator is installed as the chart installs it with `prometheus.url` set (its Deployment's
environment, exactly the chart's RBAC); a sync task plays Prometheus's pod discovery: the pods the
PodMonitor selects (rank 0 of a trial, Running, with an IP) become its targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.controller.test_operator_e2e import HANDLERS, events_of, experiment, finished, ledger_of, manifest
from tests.support.chart import OperatorRelease
from tests.support.kube import Kube, aeventually, run_kopf_operator
from tests.support.prometheus import PrometheusProcess, pod_target
from trainpilot.api import contract

pytestmark = pytest.mark.slow


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


@pytest.fixture
def kube_release(prometheus: PrometheusProcess) -> OperatorRelease:
    return OperatorRelease(
        values={"watchNamespace": "default", "prometheus": {"url": prometheus.url}}, namespace="trainpilot-system"
    )


def monitored_targets(kube: Kube) -> list[dict]:
    """What the chart's PodMonitor selects: rank-0 pods of trials, on their `metrics` container port."""
    selector = f"{contract.LABEL_COMPLETION_INDEX}=0,{contract.LABEL_EXPERIMENT},{contract.LABEL_TRIAL}"
    targets = []
    for pod in kube.core_v1().list_namespaced_pod("default", label_selector=selector).items:
        if pod.status.phase != "Running" or not pod.status.pod_ip:
            continue
        ports = {port.name: port.container_port for port in pod.spec.containers[0].ports or []}
        labels = pod.metadata.labels
        targets.append(
            pod_target(
                f"{pod.status.pod_ip}:{ports['metrics']}",
                namespace=pod.metadata.namespace,
                pod=pod.metadata.name,
                experiment=labels[contract.LABEL_EXPERIMENT],
                trial=labels[contract.LABEL_TRIAL],
                path=(pod.metadata.annotations or {}).get("prometheus.io/path", "/metrics"),
            )
        )
    return targets


async def discover(kube: Kube, prometheus: PrometheusProcess) -> None:
    while True:
        prometheus.set_targets(await asyncio.to_thread(monitored_targets, kube))
        await asyncio.sleep(0.5)


def queries_served(prometheus: PrometheusProcess) -> float:
    """Prometheus's own count of the instant queries it answered (from its /metrics)."""
    with urllib.request.urlopen(f"{prometheus.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "prometheus_http_requests_total" and sample.labels.get("handler") == "/api/v1/query"
    )


async def test_the_quickstart_read_through_prometheus_ends_as_with_the_direct_scrape(
    kube: Kube, fake_node, kube_release: OperatorRelease, prometheus: PrometheusProcess, monkeypatch
) -> None:
    assert kube_release.operator_env["TRAINPILOT_PROMETHEUS_URL"] == prometheus.url  # the kube fixture set it
    applied = manifest(metrics={"port": 9400, "path": "/metrics", "source": "prometheus", "maxSampleAgeSeconds": 30})
    discovery = asyncio.create_task(discover(kube, prometheus))
    try:
        async with run_kopf_operator(HANDLERS, **kube_release.kopf_options()):
            kube.apply(applied)
            status = await aeventually(lambda: finished(kube, "quickstart"), timeout=240, interval=1)
    finally:
        discovery.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await discovery

    assert status["phase"] == "Succeeded", status.get("message")
    assert [d.attributes for d in kube.forbidden()] == []
    assert status["bestTrial"]["objective"] < 2.0
    records = ledger_of(kube, "quickstart")
    diverging = next(r for r in records if r.decision.action == "terminate" and r.decision.trial == "quickstart-t000")
    # lr 5 blows up within a few steps: the trainer's spike counter, or its first non-finite loss
    assert diverging.decision.reason in ("nonfinite-loss", "loss-spike")
    relaunch = next(r for r in records if r.decision.parent == "quickstart-t000")
    assert relaunch.decision.hyperparameters["lr"] == pytest.approx(0.5)
    assert records[-1].decision.action == "complete"
    uid = experiment(kube, "quickstart")["metadata"]["uid"]
    assert sorted(e.metadata.name for e in events_of(kube, "quickstart")) == sorted(f"{r.id}.{uid}" for r in records)
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    assert conditions.get(contract.CONDITION_METRICS_REACHABLE, {}).get("status") != "False", conditions
    # The metrics came through Prometheus: it served the operator's queries, and it holds the trials' series.
    assert queries_served(prometheus) > 5
    trials = {s["metric"]["trial"] for s in prometheus.series('trainpilot_step{experiment="quickstart"}[10m]')}
    assert {"quickstart-t000", "quickstart-t001"} <= trials


async def test_an_operator_without_a_prometheus_server_rejects_the_experiment_with_what_to_do(
    kube: Kube, fake_node, monkeypatch
) -> None:
    monkeypatch.delenv("TRAINPILOT_PROMETHEUS_URL", raising=False)
    applied = manifest(metrics={"port": 9400, "path": "/metrics", "source": "prometheus"})
    async with run_kopf_operator(HANDLERS, namespace="default"):
        kube.apply(applied)

        def invalid() -> dict | None:
            status = experiment(kube, "quickstart").get("status") or {}
            return status if status.get("phase") == "Invalid" else None

        status = await aeventually(invalid, timeout=60, interval=0.5)
    [valid] = [c for c in status["conditions"] if c["type"] == "Valid"]
    assert valid["status"] == "False" and "set the Helm value prometheus.url" in valid["message"]
    assert kube.batch_v1().list_namespaced_job("default").items == []  # nothing ran blind
