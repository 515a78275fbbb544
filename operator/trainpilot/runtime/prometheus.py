"""Trial metrics through a Prometheus server's HTTP API (spec.metrics.source: prometheus).

For clusters where the operator may not reach pod IPs (NetworkPolicies, a service mesh) and the
trainers are already scraped, by the chart's PodMonitor or an equivalent scrape configuration that
relabels the pods' trainpilot.dev/experiment and trainpilot.dev/trial labels to `experiment` and
`trial` (and, as every PodMonitor does, the pod's name to `pod` and its namespace to `namespace`).

One query per cycle per experiment, for all its trials: every `trainpilot_*` series and `up` of
the experiment's targets over the last maxSampleAgeSeconds, as raw samples. The observation model
is the direct scrape's: a trial's metrics are the samples of Prometheus's latest *successful*
scrape of its current rank-0 pod. No data (never a wrong value) when
- that pod has no `up` sample in the window (not scraped yet, or the server lags by more than it;
  said as an error, as a direct scrape that gets no answer, so that MetricsReachable can tell),
- its latest scrape failed (`up` 0: the trainer is gone or not serving, as a failed direct scrape),
- a series has no sample from that latest scrape (the trainer stopped exporting it: stale),
- a series belongs to another pod (an earlier incarnation of the trial).

What the server returns is data: label values are only compared, never interpreted, and the body
and the number of series are bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from trainpilot.api.metrics import TrialMetrics
from trainpilot.runtime.scrape import MAX_SAMPLES, PREFIX, SKIPPED_SUFFIXES, read_bounded

logger = logging.getLogger(__name__)

ENV_URL = "TRAINPILOT_PROMETHEUS_URL"
ENV_TOKEN = "TRAINPILOT_PROMETHEUS_TOKEN"  # from a Secret (the chart's prometheus.bearerTokenSecret)
MAX_BODY_BYTES = 16 << 20
MAX_SERIES = 20_000
# Labels a trainer's own samples carry besides the target's: histogram and summary internals.
INTERNAL_LABELS = frozenset({"le", "quantile"})


NO_PROMETHEUS = (
    "spec.metrics.source is prometheus, but this operator was given no Prometheus server: set the Helm value "
    "prometheus.url (trainpilot operator --prometheus-url), or use spec.metrics.source direct"
)


def check_metrics_source(source: str, server: PrometheusServer | None) -> None:
    """ValueError (the spec is invalid for this operator) when it asks for a server the operator lacks."""
    if source == "prometheus" and server is None:
        raise ValueError(NO_PROMETHEUS)


class PrometheusError(Exception):
    """The query gave no answer to read: unreachable, an HTTP error, or not a Prometheus reply."""


@dataclass(frozen=True)
class PrometheusServer:
    url: str
    token: str | None = field(default=None, repr=False)  # never in a log line or a message
    timeout_seconds: float = 5.0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> PrometheusServer | None:
        environ = os.environ if environ is None else environ
        url = environ.get(ENV_URL, "").strip()
        if not url:
            return None
        return cls(url=url.rstrip("/"), token=environ.get(ENV_TOKEN) or None)

    async def trial_metrics(
        self, namespace: str, experiment: str, pods: Mapping[str, str], max_age_seconds: float
    ) -> tuple[dict[str, TrialMetrics | None], dict[str, str]]:
        """Each trial's metrics (trial -> its current rank-0 pod's name), and why each that has
        none has none. A query that fails is every trial's error."""
        if not pods:
            return {}, {}
        now = time.time()  # the window ends here, so a server that lags shows as old samples
        try:
            series = await self.query(experiment_selector(namespace, experiment, max_age_seconds), now)
        except PrometheusError as error:
            message = f"Prometheus at {self.url}: {error}"
            return dict.fromkeys(pods), dict.fromkeys(pods, message)
        return latest_scrapes(series, pods, max_age_seconds, now)

    async def query(self, promql: str, at: float) -> list[dict[str, Any]]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = aiohttp.ClientTimeout(total=self.timeout_seconds, connect=self.timeout_seconds)
        try:
            async with asyncio.timeout(self.timeout_seconds):
                async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
                    async with session.get(
                        f"{self.url}/api/v1/query", params={"query": promql, "time": f"{at:.3f}"}
                    ) as response:
                        body = await read_bounded(response.content, MAX_BODY_BYTES)
                        status = response.status
        except TimeoutError as error:
            raise PrometheusError(f"no answer within {self.timeout_seconds:g} s") from error
        except (aiohttp.ClientError, OSError) as error:
            raise PrometheusError(type(error).__name__) from error
        if len(body) > MAX_BODY_BYTES:
            raise PrometheusError(f"the answer is larger than {MAX_BODY_BYTES >> 20} MiB")
        if status != 200:
            raise PrometheusError(f"HTTP {status}" + (" (check the bearer token)" if status in (401, 403) else ""))
        return _result(body)


def experiment_selector(namespace: str, experiment: str, max_age_seconds: float) -> str:
    """The one query: raw samples of the experiment's trainpilot_* series and up, over the window."""
    labels = f'namespace="{_quoted(namespace)}",experiment="{_quoted(experiment)}"'
    return f'{{__name__=~"{PREFIX}.+|up",{labels}}}[{max(1, math.ceil(max_age_seconds))}s]'


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _result(body: bytes) -> list[dict[str, Any]]:
    try:
        reply = json.loads(body)
    except ValueError as error:
        raise PrometheusError("the answer is not JSON") from error
    if not isinstance(reply, dict) or reply.get("status") != "success":
        what = reply.get("error") if isinstance(reply, dict) else None
        raise PrometheusError(f"the query failed: {str(what)[:200]!r}" if what else "not a Prometheus answer")
    data = reply.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "matrix" or not isinstance(data.get("result"), list):
        raise PrometheusError("the answer is not a range vector")
    return data["result"][:MAX_SERIES]


def latest_scrapes(
    series: list[dict[str, Any]], pods: Mapping[str, str], max_age_seconds: float, now: float
) -> tuple[dict[str, TrialMetrics | None], dict[str, str]]:
    """The samples of each trial's latest successful scrape (see the module's docstring), as of
    `now` (Unix seconds: the time the query was evaluated at)."""
    up: dict[str, tuple[float, float]] = {}  # trial -> (time, value) of its pod's newest up sample
    newest: dict[str, dict[str, tuple[float, float]]] = {}  # trial -> name -> newest (time, value)
    for entry in series:
        labels, sample = _last_sample(entry)
        if labels is None or sample is None:
            continue
        trial, name = labels.get("trial"), labels.get("__name__")
        if trial not in pods or labels.get("pod") != pods[trial] or not isinstance(name, str):
            continue  # not one of these trials' current rank-0 pods
        if name == "up":
            if trial not in up or sample[0] > up[trial][0]:
                up[trial] = sample
            continue
        if not name.startswith(PREFIX) or name.endswith(SKIPPED_SUFFIXES) or INTERNAL_LABELS & labels.keys():
            continue
        kept = newest.setdefault(trial, {})
        if (name in kept or len(kept) < MAX_SAMPLES) and (name not in kept or sample[0] > kept[name][0]):
            kept[name] = sample
    metrics: dict[str, TrialMetrics | None] = {}
    errors: dict[str, str] = {}
    for trial, pod in pods.items():
        scraped = up.get(trial)
        if scraped is None or now - scraped[0] > max_age_seconds:
            # Not scraped yet (or never: no PodMonitor selects it), or the server lags: no data.
            metrics[trial] = None
            errors[trial] = (
                f"Prometheus has no scrape of pod {pod} in the last {max_age_seconds:g} s (maxSampleAgeSeconds)"
                if scraped is None
                else f"Prometheus's latest scrape of pod {pod} is {now - scraped[0]:.0f} s old "
                f"(maxSampleAgeSeconds {max_age_seconds:g})"
            )
            continue
        if scraped[1] != 1:
            metrics[trial] = None
            errors[trial] = f"Prometheus's latest scrape of pod {pod} failed (up 0)"
            continue
        # Every sample of one scrape carries that scrape's time; one older than it has gone stale.
        values = {name: value for name, (at, value) in newest.get(trial, {}).items() if at >= scraped[0] - 1e-3}
        metrics[trial] = TrialMetrics(values=values)
    return metrics, errors


def _last_sample(entry: Any) -> tuple[dict[str, str] | None, tuple[float, float] | None]:
    if not isinstance(entry, dict):
        return None, None
    labels, values = entry.get("metric"), entry.get("values")
    if not isinstance(labels, dict) or not isinstance(values, list) or not values:
        return None, None
    last = values[-1]
    try:
        at, value = float(last[0]), float(last[1])
    except (TypeError, ValueError, IndexError):
        return None, None
    if not math.isfinite(at) or not (math.isnan(value) or math.isinf(value) or -1e300 < value < 1e300):
        return None, None
    return {str(key): str(item) for key, item in labels.items()}, (at, value)
