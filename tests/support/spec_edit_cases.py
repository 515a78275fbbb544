"""The edits the end-to-end spec-edit tests make (tests/controller/test_spec_edits_operator.py on the
emulated cluster, tests/cli/test_spec_edits_run.py with `trainpilot run --resume`): between them
every row of docs/spec-edits.md (core.spec_edits.RULES) is edited, which `rows_edited` checks.

Edits are JSON merge patches (RFC 7386) of the spec, what `kubectl patch --type merge` sends and
what the tests apply to a YAML for `--resume` with the emulator's own `merge_patch`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

from trainpilot.core.spec_edits import RULES, WHOLE_MAPS, rule_for

# Refused once a trial has launched: what trials are compared on. Valid values, all of them
# different from the quickstart's, so that only the edit table refuses them.
COMPARED_ON: dict[str, Any] = {
    "objective": {"metric": "train_loss", "direction": "maximize"},
    "trialTemplate": {
        "hyperparameters": {
            "vocab_size": 17,
            "block_size": 16,
            "dataset": "text",
            "data_path": ["/data"],
            "eval_windows": 96,
            "synthetic_concentration": 0.2,
            "synthetic_order": 2,
            "text_level": "char",
            "val_fraction": 0.2,
        }
    },
}


def undo(patch: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that sets every field `patch` edits back to its value in `spec` (null if absent)."""
    back: dict[str, Any] = {}
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            back[key] = undo(value, spec[key])
        else:
            back[key] = copy.deepcopy(spec.get(key))
    return back


def leaves(patch: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(field, value) of each edit in a merge patch, the field a dotted path at the depth the edit
    table decides on."""
    for key, value in patch.items():
        field = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value and field not in WHOLE_MAPS:
            yield from leaves(value, field)
        else:
            yield field, value


def edited_fields(patch: dict[str, Any]) -> Iterator[str]:
    """The spec fields a merge patch edits."""
    return (field for field, _ in leaves(patch))


def names_refusal(message: str, field: str, wanted: Any) -> bool:
    """Whether a SpecEditsApplied message names the refused edit of `field` to `wanted`, alone or
    among its siblings (core.spec_edits.EditReview.message)."""
    parent, _, leaf = field.rpartition(".")
    alone = f"spec.{field} {wanted!r} (in force: " in message
    return alone or (f"spec.{parent}: " in message and f"{leaf} {wanted!r} (in force: " in message)


def rows_edited(patches: Iterable[dict[str, Any]]) -> set[str]:
    """The rows of the edit table (RULES' fields) that the patches exercise."""
    return {rule_for(field).field for patch in patches for field in edited_fields(patch)}


def rows_not_edited(patches: Iterable[dict[str, Any]]) -> list[str]:
    return sorted({rule.field for rule in RULES} - rows_edited(patches))
