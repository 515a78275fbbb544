"""Arithmetic on the ISO 8601 times the loop passes around (status, records, observations)."""

from __future__ import annotations

from datetime import datetime, timedelta


def seconds_between(earlier: str | None, later: str | None) -> float | None:
    """`later - earlier` in seconds; None when either is missing or not a time."""
    if earlier is None or later is None:
        return None
    try:
        return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()
    except (TypeError, ValueError):
        return None


def plus_seconds(time: str, seconds: float) -> str:
    """`time` + `seconds`, written the way `time` is (whole seconds with a Z stay so)."""
    moment = datetime.fromisoformat(time) + timedelta(seconds=seconds)
    if time.endswith("Z"):
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return moment.isoformat()
