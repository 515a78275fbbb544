"""The ledger's line format: one DecisionRecord per JSON line, shared by every runtime.

The cluster keeps these lines in ConfigMaps and `trainpilot run` in a file; `trainpilot history`
renders either with `format_table`.
"""

from __future__ import annotations

import json
import textwrap

from pydantic import ValidationError

from trainpilot.core.decision import DecisionRecord


def encode(record: DecisionRecord) -> str:
    """One compact JSON line, newline-terminated, keys in a stable order."""
    return json.dumps(record.model_dump(mode="json"), separators=(",", ":"), sort_keys=True) + "\n"


def decode(text: str) -> tuple[list[DecisionRecord], list[str]]:
    """Records in file order, and a description of every line that could not be read.

    A torn last line (a crash mid-append) is reported, not fatal: everything before it is kept.
    Duplicate ids (a retried append) keep the first copy.
    """
    records: list[DecisionRecord] = []
    problems: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = DecisionRecord.model_validate(json.loads(line))
        except (json.JSONDecodeError, ValidationError) as error:
            problems.append(f"line {number}: unreadable ledger entry ({type(error).__name__})")
            continue
        if record.id not in seen:
            seen.add(record.id)
            records.append(record)
    return records, problems


def format_table(records: list[DecisionRecord], width: int = 120) -> str:
    """A plain-text table, oldest first: time, id, policy, action, trial, outcome, why."""
    header = ("TIME", "ID", "POLICY", "ACTION", "TRIAL", "OUTCOME", "WHY")
    rows = [header]
    for record in records:
        decision = record.decision
        why = decision.reason + (f": {decision.rationale}" if decision.rationale else "")
        if record.verdict:
            why += f" [{record.verdict}]"
        values = ", ".join(f"{k}={v:g}" for k, v in sorted(decision.hyperparameters.items()))
        action = decision.action + (f" ({values})" if values else "")
        rows.append(
            (
                record.time[11:19] or record.time,
                record.id,
                decision.policy,
                action,
                record.trial or "-",
                record.outcome,
                why,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        fixed = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1]))
        room = max(width - len(fixed) - 2, 20)
        # The why is what a reader came for: wrapped under its column, never cut.
        wrapped = textwrap.wrap(row[-1], room, break_long_words=True, break_on_hyphens=False) or [""]
        lines.append(f"{fixed}  {wrapped[0]}".rstrip())
        lines.extend(" " * (len(fixed) + 2) + more for more in wrapped[1:])
    return "\n".join(lines)
