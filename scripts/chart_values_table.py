"""The chart README's values table, generated from values.yaml's comments and defaults.

    python scripts/chart_values_table.py          # rewrite the table in helm/trainpilot/README.md
    python scripts/chart_values_table.py --check  # exit 1 when the README's table is stale

values.yaml's convention: the comment lines right above a key (no blank line between) document
it. Comment lines indented by two more spaces are an example of the value (YAML); the table shows
it as JSON. A mapping whose keys have comments of their own is a section: each key gets a row.
A mapping whose keys have none (resources.requests, podSecurityContext, ...) is one value, shown
whole in the Default column.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "trainpilot"
BEGIN = "<!-- BEGIN VALUES TABLE: generated from values.yaml by scripts/chart_values_table.py; do not edit -->"
END = "<!-- END VALUES TABLE -->"
_KEY = re.compile(r"""^(?P<indent> *)(?P<key>"[^"]*"|'[^']*'|[^\s#'"\-][^:#]*?):(?:\s|$)""")
_COMMENT = re.compile(r"^(?P<indent> *)#(?P<text>.*)$")


@dataclass(frozen=True)
class Entry:
    """One key of values.yaml: its path, comment (prose and example) and default."""

    keys: tuple[str, ...]
    prose: str
    example: Any
    has_example: bool
    default: Any
    section: bool  # a mapping whose keys are documented one by one

    @property
    def path(self) -> str:
        return ".".join(self.keys)


def _lookup(values: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        values = values[key]
    return values


def _split_comment(lines: list[str]) -> tuple[str, Any, bool]:
    """(prose, example, has_example) of one comment block (its lines without the `#`)."""
    prose: list[str] = []
    example: list[str] = []
    for line in lines:
        text = line[1:] if line.startswith(" ") else line
        if text.startswith("  ") and prose:
            example.append(text)
        elif example:
            raise ValueError(f"prose after an example in a values.yaml comment: {line!r}")
        else:
            prose.append(text.strip())
    if not example:
        return " ".join(prose), None, False
    return " ".join(prose), yaml.safe_load(textwrap.dedent("\n".join(example))), True


def parse(text: str) -> list[Entry]:
    """Every key of a values.yaml, in file order, with the comment right above it."""
    values = yaml.safe_load(text) or {}
    comments: dict[tuple[str, ...], list[str]] = {}
    pending: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing keys
    inside_value: int | None = None  # the indent of a key whose value is not a mapping
    for line in text.splitlines():
        if not line.strip():
            pending = []
            continue
        comment = _COMMENT.match(line)
        if comment:
            pending.append(comment.group("text"))
            continue
        indent = len(line) - len(line.lstrip(" "))
        if inside_value is not None and indent > inside_value:
            pending = []
            continue
        inside_value = None
        key = _KEY.match(line)
        if key is None:
            raise ValueError(f"values.yaml: cannot read the key of {line!r}")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        name = key.group("key")
        stack.append((indent, yaml.safe_load(name) if name[0] in "'\"" else name))
        path = tuple(k for _, k in stack)
        comments[path] = pending
        pending = []
        if not isinstance(_lookup(values, path), dict):
            inside_value = indent
    entries: list[Entry] = []
    for path, lines in comments.items():
        default = _lookup(values, path)
        children = [p for p in comments if p[:-1] == path]
        section = isinstance(default, dict) and any(comments[c] for c in children)
        prose, example, has_example = _split_comment(lines)
        entries.append(Entry(path, prose, example, has_example, default, section))
    return entries


def rows(entries: list[Entry]) -> list[Entry]:
    """The entries the table shows: sections and values, not the keys inside a value."""
    values = [e.keys for e in entries if not e.section]
    return [e for e in entries if not any(e.keys[: len(v)] == v and e.keys != v for v in values)]


def _code(value: Any) -> str:
    return "`" + json.dumps(value, separators=(", ", ": ")).replace("|", "\\|") + "`"


def table(entries: list[Entry]) -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for entry in rows(entries):
        meaning = entry.prose.replace("|", "\\|")
        if entry.has_example:
            meaning += " " + _code(entry.example)
        lines.append(f"| `{entry.path}` | {'' if entry.section else _code(entry.default)} | {meaning} |")
    return "\n".join(lines)


def update(readme: str, values_text: str) -> str:
    """The README with the text between the markers replaced by the table for values_text."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README needs the markers\n{BEGIN}\n{END}")
    return readme[: start + len(BEGIN)] + "\n" + table(parse(values_text)) + "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, default=CHART, help="the chart directory (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="only check: exit 1 when the table is stale")
    args = parser.parse_args(argv)
    readme_path = args.chart / "README.md"
    readme = readme_path.read_text()
    updated = update(readme, (args.chart / "values.yaml").read_text())
    if args.check:
        if updated != readme:
            print(f"{readme_path}: the values table is stale; run python scripts/chart_values_table.py")
            return 1
        return 0
    if updated != readme:
        readme_path.write_text(updated)
        print(f"{readme_path}: values table updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
