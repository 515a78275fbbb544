"""The operator's own metrics: what an SRE scrapes from --metrics-port."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.builders import NOW
from trainpilot.api import contract
from trainpilot.controller import metrics
from trainpilot.core.decision import Decision, DecisionRecord


def sample(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return value or 0.0


def record(seq: int, policy: str, outcome: str = "executed", action: str = "launch") -> DecisionRecord:
    decision = Decision(action=action, policy=policy, reason="r")
    return DecisionRecord(id=f"exp-d{seq:05d}", seq=seq, time=NOW, experiment="exp", decision=decision, outcome=outcome)


def test_policy_labels_are_a_bounded_set_whatever_the_fallback_says():
    assert metrics.policy_kind("heuristic") == "heuristic"
    assert metrics.policy_kind("claude") == "claude"
    assert metrics.policy_kind("heuristic (fallback: HTTP 529 overloaded_error)") == "heuristic-fallback"
    assert metrics.policy_kind("heuristic (fallback: timed out)") == "heuristic-fallback"


def test_decisions_are_counted_by_action_policy_and_outcome_and_fallbacks_separately():
    name = contract.METRIC_OPERATOR_DECISIONS
    before = {
        key: sample(name, action=a, policy=p, outcome=o)
        for key, (a, p, o) in {
            "claude": ("launch", "claude", "executed"),
            "rejected": ("scale", "claude", "rejected"),
            "fallback": ("launch", "heuristic-fallback", "executed"),
        }.items()
    }
    fallbacks = sample(contract.METRIC_OPERATOR_LLM_FALLBACKS)
    metrics.count_decisions(
        [
            record(0, "claude"),
            record(1, "claude", "rejected", "scale"),
            record(2, "heuristic (fallback: timed out)"),
            record(3, "heuristic (fallback: timed out)"),
        ]
    )
    assert sample(name, action="launch", policy="claude", outcome="executed") == before["claude"] + 1
    assert sample(name, action="scale", policy="claude", outcome="rejected") == before["rejected"] + 1
    assert sample(name, action="launch", policy="heuristic-fallback", outcome="executed") == before["fallback"] + 2
    assert sample(contract.METRIC_OPERATOR_LLM_FALLBACKS) == fallbacks + 2


def test_exchanges_count_calls_latency_and_tokens():
    calls = sample(contract.METRIC_OPERATOR_LLM_CALLS + "", model="m", result="answered")
    failed = sample(contract.METRIC_OPERATOR_LLM_CALLS, model="m", result="failed")
    tokens_in = sample(contract.METRIC_OPERATOR_LLM_TOKENS, direction="input")
    seconds = sample(contract.METRIC_OPERATOR_LLM_SECONDS + "_count")
    metrics.observe_exchange({"model": "m", "seconds": 1.5, "input_tokens": 700, "output_tokens": 30})
    metrics.observe_exchange({"model": "m", "seconds": 30.0, "error": "timed out"})
    assert sample(contract.METRIC_OPERATOR_LLM_CALLS, model="m", result="answered") == calls + 1
    assert sample(contract.METRIC_OPERATOR_LLM_CALLS, model="m", result="failed") == failed + 1
    assert sample(contract.METRIC_OPERATOR_LLM_TOKENS, direction="input") == tokens_in + 700
    assert sample(contract.METRIC_OPERATOR_LLM_SECONDS + "_count") == seconds + 2


def test_metrics_are_served_over_http():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics.serve(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "trainpilot_operator_cycle_seconds",
        "trainpilot_operator_decisions",
        "trainpilot_operator_llm_calls",
    } <= names


def test_api_requests_are_labelled_by_verb_and_resource_a_bounded_set():
    from kubernetes import client

    from trainpilot.runtime.kubernetes.api import request_kind

    core, batch, custom = client.CoreV1Api, client.BatchV1Api, client.CustomObjectsApi
    group, version = contract.GROUP, contract.VERSION
    assert request_kind(batch.list_namespaced_job, ("default",)) == ("list", "jobs")
    assert request_kind(core.create_namespaced_event, ("default", {})) == ("create", "events")
    assert request_kind(core.read_namespaced_pod_log, ("p", "default")) == ("read", "pods/log")
    assert request_kind(core.replace_namespaced_config_map, ("c", "default", {})) == ("replace", "configmaps")
    assert request_kind(core.delete_collection_namespaced_pod, ("default",)) == ("delete_collection", "pods")
    status = custom.patch_namespaced_custom_object_status
    assert request_kind(status, (group, version, "jobs", "agentexperiments", "x", {})) == (
        "patch",
        "agentexperiments/status",
    )  # a namespace named like a resource is not taken for one
    assert request_kind(custom.list_cluster_custom_object, (group, version, "quotapolicies")) == (
        "list",
        "quotapolicies",
    )
    assert request_kind(custom.list_namespaced_custom_object, ("g", "v", "ns", "whatever-users-made")) == (
        "list",
        "other",
    )
    assert request_kind(print, ()) == ("other", "other")


async def test_every_request_through_kube_api_is_counted_and_the_failed_ones_by_code():
    from kubernetes.client.exceptions import ApiException

    from trainpilot.runtime.kubernetes.api import KubeApi, NotFound

    seen: list[tuple[str, str, str]] = []
    api = KubeApi(object(), observe=lambda *labels: seen.append(labels))  # type: ignore[arg-type]

    def read_namespaced_pod(name: str, namespace: str) -> str:
        if name == "gone":
            raise ApiException(status=404, reason="Not Found")
        return "pod"

    assert await api.call("a pod", read_namespaced_pod, "p", "default") == "pod"
    with pytest.raises(NotFound):
        await api.call("a pod", read_namespaced_pod, "gone", "default")
    assert seen == [("read", "pods", "ok"), ("read", "pods", "404")]
    before = sample(contract.METRIC_OPERATOR_API_ERRORS, verb="read", resource="pods", code="404")
    requests = sample(contract.METRIC_OPERATOR_API_REQUESTS, verb="read", resource="pods")
    for labels in seen:
        metrics.count_api_request(*labels)
    assert sample(contract.METRIC_OPERATOR_API_REQUESTS, verb="read", resource="pods") == requests + 2
    assert sample(contract.METRIC_OPERATOR_API_ERRORS, verb="read", resource="pods", code="404") == before + 1


def test_scrape_failures_have_a_bounded_reason_whatever_the_url_or_pod():
    from trainpilot.runtime.prometheus import NO_PROMETHEUS
    from trainpilot.runtime.scrape import failure_reason

    cases = {
        "http://10.0.0.7:9400/metrics: no answer within 2 s": "timeout",
        "http://10.0.0.7:9400/metrics: HTTP 404": "http",
        "http://[fd00::7]:9400/metrics: ClientConnectorError": "connection",
        "Prometheus at http://prom:9090: HTTP 403 (check the bearer token)": "prometheus-auth",
        "Prometheus at http://prom:9090: no answer within 5 s": "prometheus-unreachable",
        "Prometheus has no scrape of pod x-0-abc in the last 120 s (maxSampleAgeSeconds)": "prometheus-not-scraped",
        "Prometheus's latest scrape of pod x-0-abc is 300 s old (maxSampleAgeSeconds 120)": "prometheus-lagging",
        "Prometheus's latest scrape of pod x-0-abc failed (up 0)": "prometheus-scrape-failed",
        NO_PROMETHEUS: "no-prometheus",
    }
    assert {error: failure_reason(error) for error in cases} == cases
    before = sample(contract.METRIC_OPERATOR_SCRAPE_FAILURES, reason="timeout")
    metrics.count_scrape_failures(["timeout", "timeout"])
    assert sample(contract.METRIC_OPERATOR_SCRAPE_FAILURES, reason="timeout") == before + 2


def test_experiments_are_counted_by_their_phase_until_forgotten():
    def count(phase: str) -> float:
        return sample(contract.METRIC_OPERATOR_EXPERIMENTS, phase=phase)

    before = {phase: count(phase) for phase in ("Running", "Succeeded", "Invalid")}
    metrics.experiment_phase("ml", "a", "Running")
    metrics.experiment_phase("ml", "b", "Running")
    metrics.experiment_phase("ml", "b", "Succeeded")
    metrics.experiment_phase("other", "a", "Invalid")
    assert {phase: count(phase) - before[phase] for phase in before} == {"Running": 1, "Succeeded": 1, "Invalid": 1}
    for namespace, name in (("ml", "a"), ("ml", "b"), ("other", "a")):
        metrics.experiment_phase(namespace, name, None)
    assert {phase: count(phase) for phase in before} == before
