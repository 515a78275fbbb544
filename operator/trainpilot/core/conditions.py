"""metav1.Condition bookkeeping: a condition's lastTransitionTime moves only when its status does."""

from __future__ import annotations

from typing import Literal

from trainpilot.api.experiment import AgentExperimentStatus, Condition

ConditionValue = Literal["True", "False", "Unknown"]
MAX_CONDITION_MESSAGE = 1000


def set_condition(
    status: AgentExperimentStatus,
    *,
    type: str,
    value: ConditionValue,
    reason: str,
    message: str,
    now: str,
    generation: int | None = None,
) -> AgentExperimentStatus:
    previous = next((c for c in status.conditions if c.type == type), None)
    transition = previous.last_transition_time if previous and previous.status == value else now
    condition = Condition(
        type=type,
        status=value,
        reason=reason,
        message=message[:MAX_CONDITION_MESSAGE],
        last_transition_time=transition,
        observed_generation=generation,
    )
    others = [c for c in status.conditions if c.type != type]
    return status.model_copy(update={"conditions": [*others, condition]})
