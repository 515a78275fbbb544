"""The operator's log lines: plain text, or one JSON object per line (`--log-format json`).

A JSON line has time, level, logger, message, and the experiment, trial and decision it is about
(core.log_context; for kopf's own lines, the object kopf names), so a log pipeline can select
everything about one experiment or one decision. Values are the operator's own: names and ids that
the API server validated, never a trainer's output.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from trainpilot.core import log_context

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_kopf_object(record))
        line.update(log_context.current())
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def _kopf_object(record: logging.LogRecord) -> dict[str, str]:
    """kopf's per-object loggers put the object's reference on the record (k8s_ref)."""
    ref = getattr(record, "k8s_ref", None)
    if not isinstance(ref, dict) or not ref.get("name"):
        return {}
    namespace = ref.get("namespace")
    return {"experiment": f"{namespace}/{ref['name']}" if namespace else str(ref["name"])}


def configure(log_format: str, verbose: bool) -> None:
    """The root logger's one handler, in the format asked for."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
