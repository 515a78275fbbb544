"""The termination message: the final summary as JSON in the file Kubernetes shows in the pod status.

Under torchrun every worker of a pod shares the container's one terminationMessagePath, and
torchrun's own exit status is 1 whatever the workers did, so this file is the only place the
trainer's exit reason survives. Every rank writes it, under an exclusive lock, merging rather than
replacing what another rank wrote first:

- the exit reason (with its code, rank and message) that says most wins, by
  trainpilot.api.metrics.EXIT_REASON_PRECEDENCE; on a tie the one written first stays, because the
  rank that failed first wrote first (the others fail after it, in a collective or on torchrun's
  SIGTERM);
- the gauges are rank 0's when rank 0 wrote (it serves /metrics), else the first writer's.

The kubelet keeps 4 KiB; the message is kept below that.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from typing import Any

from trainpilot.api.metrics import EXIT_REASON_PRECEDENCE, TrialMetrics

TERMINATION_MESSAGE_LIMIT = 4096
# Fields of a summary that describe the exit, kept together from one rank.
EXIT_FIELDS = ("exit_code", "exit_reason", "rank", "message")
# Text fields kept besides the gauges: which checkpoint the step gauge names.
TEXT_FIELDS = ("checkpoint_tag",)


def termination_fields(summary: dict[str, Any], rank: int) -> dict[str, Any]:
    """What one rank would write alone: its exit, the gauges under their contract names, the tag."""
    fields: dict[str, Any] = {key: summary[key] for key in EXIT_FIELDS if summary.get(key) is not None}
    fields["rank"] = rank
    if isinstance(fields.get("message"), str):
        fields["message"] = fields["message"][:512]
    for key in TEXT_FIELDS:
        if isinstance(summary.get(key), str):
            fields[key] = summary[key]
    metrics = TrialMetrics.from_result(summary)
    fields.update(metrics.values if metrics else {})
    return fields


def merge_termination(existing: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """`new` (one rank's fields) merged into what the file already holds (see the module doc)."""
    if not existing:
        return new
    gauges_from, other = (new, existing) if new.get("rank") == 0 else (existing, new)
    merged = {**other, **gauges_from}
    keep_reason = _precedence(existing) >= _precedence(new)
    exit_from = existing if keep_reason else new
    for key in EXIT_FIELDS:
        merged.pop(key, None)
        if key in exit_from:
            merged[key] = exit_from[key]
    return merged


def _precedence(fields: dict[str, Any]) -> int:
    return EXIT_REASON_PRECEDENCE.get(fields.get("exit_reason"), -1)  # type: ignore[arg-type]


def write_termination_message(summary: dict[str, Any], path: str | None, rank: int = 0) -> None:
    """Merge this rank's summary into the termination message at `path` (no path: nothing to do)."""
    if not path:
        return
    fields = termination_fields(summary, rank)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:  # a read-only or absent path must not turn a finished run into a crash
        print(f"trainpilot: could not write the termination message to {path}: {error}", file=sys.stderr)
        return
    try:
        with os.fdopen(fd, "r+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
            try:
                existing = json.loads(handle.read() or "null")
            except ValueError:
                existing = None
            merged = merge_termination(existing if isinstance(existing, dict) else None, fields)
            handle.seek(0)
            handle.truncate()
            handle.write(_bounded_json(merged))
            handle.flush()
    except OSError as error:
        print(f"trainpilot: could not write the termination message to {path}: {error}", file=sys.stderr)


def _bounded_json(fields: dict[str, Any]) -> str:
    """Compact JSON under the kubelet's limit: the message is shortened first, never cut mid-JSON."""
    text = json.dumps(fields, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT and isinstance(fields.get("message"), str):
        fields = {**fields, "message": fields["message"][:64]}
        text = json.dumps(fields, separators=(",", ":"))
    return (
        text
        if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
        else json.dumps({key: fields[key] for key in EXIT_FIELDS if key in fields}, separators=(",", ":"))
    )
