"""Reading what a trainer wrote in its pod's termination message (its final summary, as JSON)."""

from __future__ import annotations

import json
from typing import Any

from trainpilot.api.metrics import TrainerExit, TrialMetrics


def _termination_fields(termination_message: str | None) -> Any:
    try:
        return json.loads(termination_message or "")
    except ValueError:
        return None


def final_metrics(termination_message: str | None) -> TrialMetrics | None:
    """The trainer's last values from the pod's termination message."""
    return TrialMetrics.from_result(_termination_fields(termination_message))


def trainer_exit(termination_message: str | None) -> TrainerExit | None:
    """Why the trainer says it stopped, from the pod's termination message; None if it does not say."""
    return TrainerExit.from_result(_termination_fields(termination_message))
