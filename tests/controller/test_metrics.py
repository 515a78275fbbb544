"""The operator's own metrics: what an SRE scrapes from --metrics-port."""

from __future__ import annotations

import socket
import urllib.request

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
