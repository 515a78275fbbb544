"""Sign-offs in a run directory: `trainpilot approve|reject <run dir> <id>` from a second terminal.

One JSON file per sign-off, `<run dir>/approvals/<decision id>.<verdict>.json`, written atomically
by the CLI with the local user's login name; the run's loop reads them each cycle. On one machine
the operating system says who may write there, as RBAC does in a cluster.
"""

from __future__ import annotations

import getpass
import json
import logging
from pathlib import Path

from trainpilot.core.approvals import Approval
from trainpilot.runtime.base import RuntimeFailure
from trainpilot.runtime.files import atomic_write

logger = logging.getLogger(__name__)

FOLDER = "approvals"


def local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (a container with an unnamed uid)
        import os

        return f"uid {os.getuid()}"


def write_sign_off(run_dir: str | Path, approval: Approval) -> Path:
    folder = Path(run_dir) / FOLDER
    folder.mkdir(exist_ok=True)
    path = folder / f"{approval.decision}.{approval.verdict}.json"
    atomic_write(path, json.dumps({"decision": approval.decision, "verdict": approval.verdict, "by": approval.by}))
    return path


def read_sign_offs(run_dir: str | Path) -> list[Approval]:
    """Every sign-off written so far, oldest first; an unreadable file is skipped with a warning."""
    folder = Path(run_dir) / FOLDER
    try:
        paths = sorted(folder.glob("*.json"), key=lambda path: path.stat().st_mtime_ns)
    except FileNotFoundError:
        return []
    except OSError as error:
        raise RuntimeFailure(f"sign-offs in {folder}: {error}") from error
    found = []
    for path in paths:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            verdict = raw["verdict"]
            if verdict not in ("approve", "reject"):
                raise ValueError(f"verdict {verdict!r} is neither approve nor reject")
            found.append(Approval(decision=str(raw["decision"]), verdict=verdict, by=str(raw.get("by") or "")))
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("sign-off %s skipped: %s", path, error)
    return found
