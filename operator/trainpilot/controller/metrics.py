"""The operator's own Prometheus metrics, on `--metrics-port` (8081 in the chart).

What an SRE watches, named as controller operators name theirs: decision cycles by result and
how long they take, API requests and errors by verb and resource, watches restarted, trainer
scrapes that failed by reason, experiments by phase, decisions by action, policy and outcome
(rejections included), and the LLM's calls, latency, tokens and fallbacks. Labels are bounded sets
(verbs, resources, HTTP codes, reasons, phases, actions, outcomes, policy kinds, models): never an
experiment or trial name, which users choose.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
CYCLES = Counter(
    contract.METRIC_OPERATOR_CYCLES,
    "Decision cycles, by result: ok, api-error (retried), crash (a bug; retried).",
    ["result"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    contract.METRIC_OPERATOR_API_REQUESTS,
    "Requests to the Kubernetes API server, by verb and resource.",
    ["verb", "resource"],
    registry=REGISTRY,
)
API_ERRORS = Counter(
    contract.METRIC_OPERATOR_API_ERRORS,
    "Requests that failed, by verb, resource and code (an HTTP status, no-answer, refused-by-client).",
    ["verb", "resource", "code"],
    registry=REGISTRY,
)
WATCH_RESTARTS = Counter(
    contract.METRIC_OPERATOR_WATCH_RESTARTS,
    "Watches of stopping trials' pods started again, by resource and reason (expired, gone).",
    ["resource", "reason"],
    registry=REGISTRY,
)
SCRAPE_FAILURES = Counter(
    contract.METRIC_OPERATOR_SCRAPE_FAILURES,
    "Reads of a running trial's metrics that gave nothing, by reason (runtime.scrape.failure_reason).",
    ["reason"],
    registry=REGISTRY,
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


def count_api_request(verb: str, resource: str, outcome: str) -> None:
    """A KubeApi request observer: every request, and the failed ones by code."""
    API_REQUESTS.labels(verb, resource).inc()
    if outcome != "ok":
        API_ERRORS.labels(verb, resource, outcome).inc()


def count_watch_restart(resource: str, reason: str) -> None:
    WATCH_RESTARTS.labels(resource, reason).inc()


def count_scrape_failures(reasons: Iterable[str]) -> None:
    for reason in reasons:
        SCRAPE_FAILURES.labels(reason).inc()


class _Phases(Collector):
    """trainpilot_operator_experiments{phase}: the experiments this operator serves, by their phase
    after their last cycle (one that is deleted, or served by another replica, is forgotten)."""

    def __init__(self) -> None:
        self.phases: dict[tuple[str, str], str] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            contract.METRIC_OPERATOR_EXPERIMENTS, "Experiments this operator serves, by phase.", labels=["phase"]
        )
        counts: dict[str, int] = {}
        for phase in list(self.phases.values()):
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in sorted(counts.items()):
            family.add_metric([phase], count)
        yield family


EXPERIMENTS = _Phases()
REGISTRY.register(EXPERIMENTS)


def experiment_phase(namespace: str, name: str, phase: str | None) -> None:
    """Where an experiment stands now; None: this operator no longer serves it."""
    if phase is None:
        EXPERIMENTS.phases.pop((namespace, name), None)
    else:
        EXPERIMENTS.phases[(namespace, name)] = phase
