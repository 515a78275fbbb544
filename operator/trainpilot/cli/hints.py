"""The `trainpilot` a hint should name: one the user's shell runs as printed.

After `bash scripts/quickstart.sh` the command lives in .venv/bin, which the user's shell does
not have on PATH: a hint saying `trainpilot report ...` would answer "command not found".
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path


def shell_command(path: str | None = None, cwd: str | None = None, executable: str | None = None) -> str:
    """`trainpilot` when PATH finds this very one; else its path (relative when under the working
    directory); else this interpreter with `-m trainpilot.cli`."""
    here = Path(executable or sys.executable).parent / "trainpilot"
    found = shutil.which("trainpilot", path=path if path is not None else os.environ.get("PATH"))
    if found and Path(found).resolve() == here.resolve():
        return "trainpilot"
    if here.is_file():
        relative = os.path.relpath(here, cwd or os.getcwd())
        shown = relative if not relative.startswith("..") else str(here)
        return shlex.quote(shown if "/" in shown else f"./{shown}")
    return f"{shlex.quote(executable or sys.executable)} -m trainpilot.cli"


def needs_cluster_extra(target: str, error: ImportError) -> str:
    """Why a name that is not a run directory here cannot be read as a cluster experiment."""
    missing = getattr(error, "name", None) or str(error)
    return (
        f"{target!r} is not a run directory here, so it is read as a cluster experiment, which needs the "
        f"cluster extra (missing: {missing}); install it from the checkout with: pip install -e '.[operator]'"
    )
