"""`trainpilot history <run-dir | experiment>`: the decision ledger, as a table or JSON lines.

A directory is a `trainpilot run` run directory (its ledger.jsonl). Anything else names an
AgentExperiment in the cluster, whose ledger the Kubernetes runtime keeps in ConfigMaps.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from trainpilot.cli.hints import needs_cluster_extra
from trainpilot.core import ledger as ledger_format
from trainpilot.core.decision import DecisionRecord


def _from_run_dir(run_dir: Path) -> list[DecisionRecord] | str:
    path = run_dir / "ledger.jsonl"
    if not path.exists():
        if not (run_dir / "experiment.yaml").exists():
            return f"{run_dir}: not a trainpilot run directory (no ledger.jsonl or experiment.yaml)"
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        return f"{path}: cannot read it ({error.strerror or error})"
    records, problems = ledger_format.decode(text)
    for problem in problems:
        print(f"warning: {path}: {problem}", file=sys.stderr)
    return records


def _from_cluster(name: str, namespace: str | None) -> list[DecisionRecord] | str:
    try:
        from trainpilot.runtime.kubernetes.ledger import read_ledger
    except ImportError as error:
        return needs_cluster_extra(name, error)
    try:
        return list(read_ledger(name, namespace))
    except Exception as error:  # noqa: BLE001 - any cluster failure is one line for the user
        return f"cannot read the ledger of experiment {name!r}: {type(error).__name__}: {error}"


def main_history(args: argparse.Namespace) -> int:
    target = Path(args.target)
    if target.is_dir():
        result = _from_run_dir(target)
    elif target.exists():
        result = f"{target}: a file, not a run directory (give the folder `trainpilot run` wrote)"
    else:
        result = _from_cluster(args.target, getattr(args, "namespace", None))
    if isinstance(result, str):
        print(f"trainpilot history: {result}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        sys.stdout.write("".join(ledger_format.encode(record) for record in result))
        return 0
    if not result:
        print("no decisions recorded yet")
        return 0
    width = shutil.get_terminal_size((160, 24)).columns
    print(ledger_format.format_table(result, width=max(width, 80)))
    return 0
