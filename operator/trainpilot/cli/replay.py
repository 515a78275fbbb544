"""`trainpilot replay <run-dir | experiment> [--policy heuristic|claude]`: where a policy would have
decided differently from the recorded run, cycle by cycle.

Reads the cycle log (each cycle's exact policy input) and the ledger, from a run directory or, for
a cluster experiment, from its ConfigMaps. `--policy claude` asks the model the SDK's environment
points at (ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL); with `--from-archive` it answers each prompt the
run already asked from the run's own prompt archive instead (no key, no network). Exit 0 when
every cycle replays the same, 1 when any differs, 2 when the run cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from trainpilot.cli.hints import needs_cluster_extra
from trainpilot.core import cycle_log
from trainpilot.core import ledger as ledger_format
from trainpilot.core.cycle_log import CycleEntry
from trainpilot.core.decision import DecisionRecord
from trainpilot.core.replay import ReplayReport, replay


class _Unreadable(Exception):
    pass


def main_replay(args: argparse.Namespace) -> int:
    target = Path(args.target)
    try:
        if target.is_dir():
            entries, records, exchanges = _from_run_dir(target)
        else:
            entries, records, exchanges = _from_cluster(args.target, args.namespace)
        if not entries:
            raise _Unreadable("no cycles recorded (the cycle log is empty or missing)")
        policy = _policy(entries[-1], args.policy, args.from_archive, exchanges)
    except _Unreadable as error:
        print(f"trainpilot replay: {error}", file=sys.stderr)
        return 2
    report = asyncio.run(replay(entries, {record.id: record for record in records}, policy))
    print(_render(report, args.policy or entries[-1].spec.get("policy", {}).get("type", "heuristic")))
    return 1 if report.differences else 0


def _from_run_dir(run_dir: Path) -> tuple[list[CycleEntry], list[DecisionRecord], list[dict[str, Any]]]:
    from trainpilot.runtime.local import CYCLES_NAME, PROMPTS_NAME

    def read(name: str) -> str:
        path = run_dir / name
        try:
            return path.read_text(encoding="utf-8") if path.exists() else ""
        except OSError as error:
            raise _Unreadable(f"{path}: {error.strerror or error}") from None

    entries, problems = cycle_log.decode(read(CYCLES_NAME))
    for problem in problems:
        print(f"warning: {run_dir / CYCLES_NAME}: {problem}", file=sys.stderr)
    records, _ = ledger_format.decode(read("ledger.jsonl"))
    return entries, records, _exchanges(read(PROMPTS_NAME))


def _from_cluster(
    name: str, namespace: str | None
) -> tuple[list[CycleEntry], list[DecisionRecord], list[dict[str, Any]]]:
    try:
        from trainpilot.runtime.kubernetes.logs import read_run
    except ImportError as error:
        raise _Unreadable(needs_cluster_extra(name, error)) from None
    try:
        cycles, records, prompts = read_run(name, namespace)
    except Exception as error:  # noqa: BLE001 - any cluster failure is one line for the user
        raise _Unreadable(f"cannot read experiment {name!r}: {type(error).__name__}: {error}") from None
    entries, _ = cycle_log.decode(cycles)
    return entries, records, _exchanges(prompts)


def _exchanges(text: str) -> list[dict[str, Any]]:
    import json

    found = []
    for line in text.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def _policy(last: CycleEntry, chosen: str | None, from_archive: bool, exchanges: list[dict[str, Any]]) -> Any:
    from trainpilot.api.experiment import AgentExperimentSpec
    from trainpilot.core.policy import HeuristicPolicy

    spec = AgentExperimentSpec.model_validate(last.spec)
    kind = chosen or spec.policy.type
    if kind == "heuristic":
        return HeuristicPolicy()
    from trainpilot.core.policy.claude import ClaudePolicy

    if from_archive:
        from trainpilot.runtime.archived_model import ArchivedModel

        return ClaudePolicy(ArchivedModel(exchanges))
    from trainpilot.runtime.policies import make_policy

    try:
        return make_policy(spec.model_copy(update={"policy": spec.policy.model_copy(update={"type": "claude"})}))
    except ValueError as error:  # no key: say how to replay without one
        raise _Unreadable(f"{error}; or replay the recorded answers with --from-archive") from None


def _render(report: ReplayReport, policy: str) -> str:
    lines = [
        f"replayed {report.cycles} cycle(s) with the {policy} policy: {report.recorded_decisions} decision(s) "
        f"recorded, {report.replayed_decisions} replayed, {len(report.differences)} cycle(s) differ"
    ]
    for difference in report.differences:
        lines.append(f"{difference.time}:")
        lines.append("  recorded: " + ("; ".join(difference.recorded) or "nothing"))
        lines.append("  replayed: " + ("; ".join(difference.replayed) or "nothing"))
    if report.missing:
        lines.append(
            f"warning: {len(report.missing)} recorded id(s) not in the ledger: {', '.join(report.missing[:5])}"
        )
    return "\n".join(lines)
