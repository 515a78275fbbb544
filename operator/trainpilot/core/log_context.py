"""What a log line is about: the experiment, trial and decision the code that logs is working on.

Context variables, so every line logged while a cycle runs (or while a decision is carried out)
carries them without each call site passing them; each experiment's daemon is its own asyncio
task, so one experiment's context never leaks into another's. The JSON log format
(controller.logs) writes them on every line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_EXPERIMENT: ContextVar[str | None] = ContextVar("trainpilot_experiment", default=None)
_TRIAL: ContextVar[str | None] = ContextVar("trainpilot_trial", default=None)
_DECISION: ContextVar[str | None] = ContextVar("trainpilot_decision", default=None)
_FIELDS = (("experiment", _EXPERIMENT), ("trial", _TRIAL), ("decision", _DECISION))


@contextlib.contextmanager
def about(experiment: str | None = None, trial: str | None = None, decision: str | None = None) -> Iterator[None]:
    """Lines logged inside are about these (those given; the others stay as they were)."""
    tokens = [
        (variable, variable.set(value))
        for value, (_, variable) in zip((experiment, trial, decision), _FIELDS, strict=True)
        if value is not None
    ]
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)


def set_experiment(experiment: str) -> None:
    """For the rest of this task (an experiment's daemon): its lines are about this experiment."""
    _EXPERIMENT.set(experiment)


def current() -> dict[str, str]:
    """The fields set now: experiment, trial, decision."""
    return {name: value for name, variable in _FIELDS if (value := variable.get()) is not None}
