"""Scraping trainer /metrics endpoints: concurrent, quick to give up, and distrustful.

A trainer that is not serving yet, or has gone, is "no data yet" (None), never an error. What a
trainer serves is data: only unlabelled `trainpilot_*` samples are kept, the body size and the
sample count are bounded, and nothing in it is interpreted beyond a float.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
from collections.abc import Mapping

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from trainpilot.api.metrics import TrialMetrics

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_SAMPLES = 256
PREFIX = "trainpilot_"
# Histogram internals are not gauges a policy reasons about.
SKIPPED_SUFFIXES = ("_bucket", "_created")


def metrics_url(host: str, port: int, path: str) -> str:
    """The URL of a trainer's /metrics; an IPv6 address (a dual-stack or IPv6 pod) goes in brackets."""
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name
    return f"http://{host}:{port}{path}"


def parse_metrics(text: str) -> TrialMetrics:
    """Keep unlabelled trainpilot_* samples; malformed exposition yields whatever parsed before it."""
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if len(values) >= MAX_SAMPLES:
                    break
                if not sample.name.startswith(PREFIX) or sample.labels:
                    continue
                if sample.name.endswith(SKIPPED_SUFFIXES):
                    continue
                value = float(sample.value)
                if math.isnan(value) or math.isinf(value) or -1e300 < value < 1e300:
                    values[sample.name] = value
    except (ValueError, TypeError, IndexError) as error:
        logger.debug("malformed metrics exposition: %s", error)
    return TrialMetrics(values=values)


async def read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to `limit` bytes (and one more, so a caller can tell it was longer). A single
    read returns what has arrived so far: a body that comes in pieces is read to its end."""
    body = bytearray()
    while len(body) <= limit:
        chunk = await content.read(limit + 1 - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


async def scrape(
    session: aiohttp.ClientSession, url: str, timeout: float, errors: dict[str, str] | None = None
) -> TrialMetrics | None:
    """The trainer's metrics, or None (and, when `errors` is given, why in errors[url])."""
    try:
        async with asyncio.timeout(timeout):
            async with session.get(url) as response:
                if response.status != 200:
                    if errors is not None:
                        errors[url] = f"HTTP {response.status}"
                    return None
                body = await read_bounded(response.content, MAX_BODY_BYTES)
    except (aiohttp.ClientError, TimeoutError, OSError) as error:
        logger.debug("scrape of %s gave no data: %s", url, type(error).__name__)
        if errors is not None:
            errors[url] = f"no answer within {timeout:g} s" if isinstance(error, TimeoutError) else type(error).__name__
        return None
    return parse_metrics(body[:MAX_BODY_BYTES].decode("utf-8", errors="replace"))


async def scrape_all(
    urls: Mapping[str, str], timeout: float, errors: dict[str, str] | None = None
) -> dict[str, TrialMetrics | None]:
    """Scrape every trial's endpoint at once; one slow or dead trainer costs at most `timeout`.
    `errors`, when given, gets why each URL that gave nothing failed."""
    if not urls:
        return {}
    client_timeout = aiohttp.ClientTimeout(total=timeout, connect=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        results = await asyncio.gather(*(scrape(session, url, timeout, errors) for url in urls.values()))
    return dict(zip(urls.keys(), results, strict=True))


def failure_reason(error: str) -> str:
    """A bounded label for why a read of a trial's metrics gave nothing (the operator's
    trainpilot_operator_scrape_failures_total), from the error this module or runtime.prometheus
    wrote: timeout, http, connection; prometheus-unreachable, prometheus-auth, prometheus-not-scraped,
    prometheus-lagging, prometheus-scrape-failed, no-prometheus."""
    if "no Prometheus server" in error:
        return "no-prometheus"
    if error.startswith("Prometheus at "):
        return "prometheus-auth" if "HTTP 401" in error or "HTTP 403" in error else "prometheus-unreachable"
    if error.startswith("Prometheus has no scrape"):
        return "prometheus-not-scraped"
    if error.startswith("Prometheus's latest scrape"):
        return "prometheus-scrape-failed" if error.endswith("failed (up 0)") else "prometheus-lagging"
    what = error.rsplit(": ", 1)[-1]  # direct: "<url>: <why>"
    if what.startswith("no answer within"):
        return "timeout"
    if what.startswith("HTTP "):
        return "http"
    return "connection"
