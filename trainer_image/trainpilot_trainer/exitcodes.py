"""The trainer's exit codes, re-exported from the shared contract so both sides read one table."""

from trainpilot.api.contract import (
    EXIT_COMPLETED,
    EXIT_CRASHED,
    EXIT_DIVERGED,
    EXIT_INVALID_CONFIG,
    EXIT_REASONS,
    EXIT_STOPPED,
)

__all__ = [
    "EXIT_COMPLETED",
    "EXIT_CRASHED",
    "EXIT_DIVERGED",
    "EXIT_INVALID_CONFIG",
    "EXIT_REASONS",
    "EXIT_STOPPED",
]
