"""What a trainer reports: its Prometheus gauges and its final summary, reduced to the contract.

The trainer writes these (rank 0's /metrics, the result line, the termination message) and both
runtimes read them back, so the reading lives with the contract rather than in either side.
Values are data only: nothing in them is ever read as an instruction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from trainpilot.api import contract

# Short names the trainer's final summary uses for the contract's gauges.
RESULT_ALIASES = {
    "step": contract.METRIC_STEP,
    "train_loss": contract.METRIC_TRAIN_LOSS,
    "val_loss": contract.METRIC_VAL_LOSS,
    "eval_step": contract.METRIC_EVAL_STEP,
    "rung_step": contract.METRIC_RUNG_STEP,
    "rung_val_loss": contract.METRIC_RUNG_VAL_LOSS,
    "learning_rate": contract.METRIC_LEARNING_RATE,
    "lr": contract.METRIC_LEARNING_RATE,
    "grad_norm": contract.METRIC_GRAD_NORM,
    "tokens_per_second": contract.METRIC_TOKENS_PER_SECOND,
    "nonfinite_loss_total": contract.METRIC_NONFINITE_LOSS,
    "nonfinite_losses": contract.METRIC_NONFINITE_LOSS,
    "loss_spikes_total": contract.METRIC_LOSS_SPIKES,
    "checkpoint_step": contract.METRIC_CHECKPOINT_STEP,
    "loss_floor": contract.METRIC_LOSS_FLOOR,
    "max_steps": contract.METRIC_MAX_STEPS,
    "control_generation": contract.METRIC_CONTROL_GENERATION,
    "weight_decay": contract.METRIC_WEIGHT_DECAY,
    "validation_fingerprint": contract.METRIC_VALIDATION_FINGERPRINT,
}


# When several ranks of one pod report why they stopped (they share its termination message), the
# reason that says most wins; on a tie the first one written stays (the rank that failed first).
# A crash outranks a stop (a stop that crashed lost its checkpoint); the reasons every rank agrees
# on (invalid config, divergence) outrank a crash that only followed from another rank's exit.
EXIT_REASON_PRECEDENCE = {
    contract.EXIT_REASONS[contract.EXIT_COMPLETED]: 0,
    contract.EXIT_REASONS[contract.EXIT_STOPPED]: 1,
    contract.EXIT_REASONS[contract.EXIT_CRASHED]: 2,
    contract.EXIT_REASONS[contract.EXIT_DIVERGED]: 3,
    contract.EXIT_REASONS[contract.EXIT_INVALID_CONFIG]: 4,
}
_EXIT_CODES = {reason: code for code, reason in contract.EXIT_REASONS.items()}


class TrainerExit(BaseModel):
    """Why the trainer says it stopped, from its final summary (result line or termination message).

    Under torchrun this is the only trustworthy account: torchrun exits 1 whatever its workers
    did, so a diverged or invalid multi-process trial would otherwise read as a crash."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(description="One of the contract's EXIT_REASONS values.")
    code: int = Field(description="The trainer's own exit code for that reason.")
    message: str = Field("", max_length=1024, description="The trainer's one-line explanation, if any.")

    @classmethod
    def from_result(cls, fields: Any) -> TrainerExit | None:
        """The exit reason a summary states (`exit_reason`, else `exit_code`); None when it states none."""
        if not isinstance(fields, Mapping):
            return None
        reason, code = fields.get("exit_reason"), fields.get("exit_code")
        if isinstance(code, bool) or not isinstance(code, int):
            code = None
        if reason not in _EXIT_CODES:
            if code not in contract.EXIT_REASONS:
                return None
            reason = contract.EXIT_REASONS[code]
        message = fields.get("message")
        return cls(
            reason=reason,
            code=_EXIT_CODES[reason],
            message=message[:1024] if isinstance(message, str) else "",
        )


class TrialMetrics(BaseModel):
    """One scrape of a trainer's rank-0 /metrics, reduced to the contract's gauges."""

    model_config = ConfigDict(extra="forbid")

    values: dict[str, float] = Field(default_factory=dict, description="trainpilot_* samples by name.")

    @classmethod
    def from_result(cls, fields: Any) -> TrialMetrics | None:
        """The gauges in a trainer's final summary (result line or termination message); None if none."""
        if not isinstance(fields, Mapping):
            return None
        values: dict[str, float] = {}
        for key, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # null (JSON has no NaN), text, nested data: not a gauge
            name = key if str(key).startswith("trainpilot_") else RESULT_ALIASES.get(key)
            if name:
                values[name] = float(value)
        return cls(values=values) if values else None

    def get(self, name: str) -> float | None:
        value = self.values.get(name)
        return None if value is None else float(value)

    @property
    def step(self) -> int:
        return int(self.get(contract.METRIC_STEP) or 0)

    @property
    def train_loss(self) -> float | None:
        return self.get(contract.METRIC_TRAIN_LOSS)

    @property
    def nonfinite_losses(self) -> int:
        return int(self.get(contract.METRIC_NONFINITE_LOSS) or 0)

    @property
    def loss_spikes(self) -> int:
        return int(self.get(contract.METRIC_LOSS_SPIKES) or 0)

    @property
    def checkpoint_step(self) -> int | None:
        value = self.get(contract.METRIC_CHECKPOINT_STEP)
        return None if value is None or value < 0 else int(value)

    @property
    def loss_floor(self) -> float | None:
        return self.get(contract.METRIC_LOSS_FLOOR)

    @property
    def validation_fingerprint(self) -> str | None:
        """The validation set's fingerprint as 12 hex digits; None from a trainer that exports none."""
        value = self.get(contract.METRIC_VALIDATION_FINGERPRINT)
        if value is None or not 0 <= value < 2**48 or value != int(value):
            return None
        return f"{int(value):012x}"

    @property
    def control_generation(self) -> int:
        return int(self.get(contract.METRIC_CONTROL_GENERATION) or 0)

    @property
    def max_steps(self) -> int | None:
        value = self.get(contract.METRIC_MAX_STEPS)
        return None if value is None else int(value)

    def objective(self, metric: str) -> float | None:
        """The objective's latest value; None until the trainer has measured it."""
        value = self.get(contract.objective_metric(metric))
        # The trainer reports NaN until its first measurement; divergence is read from the counter.
        return value if value is not None and math.isfinite(value) else None
