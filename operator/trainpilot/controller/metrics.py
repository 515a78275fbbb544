"""The operator's own Prometheus metrics, on `--metrics-port` (8081 in the chart).

What an SRE watches: decision cycles (how long, how many failed), decisions by action, policy and
outcome (rejections included), and the LLM's calls, latency, tokens and fallbacks. Labels are
bounded sets (actions, outcomes, policy kinds, models): never an experiment or trial name, which
users choose.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from trainpilot.api import contract
from trainpilot.core.decision import DecisionRecord

REGISTRY = CollectorRegistry()
CYCLE_SECONDS = Histogram(
    contract.METRIC_OPERATOR_CYCLE_SECONDS,
    "Wall time of one decision cycle (observe, decide, act, record).",
    registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CYCLE_ERRORS = Counter(
    contract.METRIC_OPERATOR_CYCLE_ERRORS, "Cycles that failed and were retried, by kind.", ["kind"], registry=REGISTRY
)
DECISIONS = Counter(
    contract.METRIC_OPERATOR_DECISIONS,
    "Decisions recorded, by action, policy and outcome.",
    ["action", "policy", "outcome"],
    registry=REGISTRY,
)
LLM_CALLS = Counter(
    contract.METRIC_OPERATOR_LLM_CALLS, "Calls to the LLM, by model and result.", ["model", "result"], registry=REGISTRY
)
LLM_SECONDS = Histogram(
    contract.METRIC_OPERATOR_LLM_SECONDS,
    "Wall time of one LLM call, retries included.",
    registry=REGISTRY,
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120),
)
LLM_TOKENS = Counter(
    contract.METRIC_OPERATOR_LLM_TOKENS, "LLM tokens, by direction (input, output).", ["direction"], registry=REGISTRY
)
LLM_FALLBACKS = Counter(
    contract.METRIC_OPERATOR_LLM_FALLBACKS, "Decisions the heuristic made because the LLM could not.", registry=REGISTRY
)


def serve(port: int) -> None:
    start_http_server(port, registry=REGISTRY)


def policy_kind(policy: str) -> str:
    """A bounded label: `heuristic`, `claude`, `trainpilot`, or `<voice>-fallback`."""
    voice, _, rest = policy.partition(" (")
    return f"{voice}-fallback" if rest.startswith("fallback") else voice


def count_decisions(records: Iterable[DecisionRecord]) -> None:
    for record in records:
        kind = policy_kind(record.decision.policy)
        DECISIONS.labels(record.decision.action, kind, record.outcome).inc()
        if kind.endswith("-fallback"):
            LLM_FALLBACKS.inc()


def observe_exchange(exchange: dict[str, Any]) -> None:
    """An archive (runtime.claude.Archive) that counts each exchange with the LLM."""
    LLM_CALLS.labels(exchange.get("model", ""), "failed" if "error" in exchange else "answered").inc()
    LLM_SECONDS.observe(float(exchange.get("seconds", 0.0)))
    LLM_TOKENS.labels("input").inc(int(exchange.get("input_tokens", 0)))
    LLM_TOKENS.labels("output").inc(int(exchange.get("output_tokens", 0)))
