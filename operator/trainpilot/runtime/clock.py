"""Now, as the two runtimes write it (ISO 8601, UTC)."""

from __future__ import annotations

from datetime import UTC, datetime


def cluster_now() -> str:
    """Whole seconds with a Z, as Kubernetes writes metav1.Time (conditions, Events, status)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def local_now() -> str:
    """Microseconds: a run directory orders scrapes and decisions that fall within one second."""
    return datetime.now(UTC).isoformat()
