"""How a run ends: the divergence test and the TRAINPILOT_RESULT summary. Pure, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .exitcodes import EXIT_REASONS

# In fp32 (and bf16, with the same exponent range) a run with a wild lr rarely reaches inf or NaN:
# Adam moves each weight by about lr per step and LayerNorm keeps activations bounded, so the loss
# climbs to thousands of nats and stays finite for hundreds of steps (lr=10 on the tiny model:
# 36 nats at step 2, 10^4 by step 20, never NaN). Uniform guessing scores ln(vocab); a loss this
# many times higher only comes from numerical blow-up, so it counts as non-finite.
DIVERGENCE_FACTOR = 10.0


def loss_ceiling(vocab_size: int) -> float:
    """Losses above this are treated like NaN/inf (see DIVERGENCE_FACTOR)."""
    return DIVERGENCE_FACTOR * max(math.log(vocab_size), 1.0)


def is_nonfinite(loss: float, ceiling: float) -> bool:
    return not math.isfinite(loss) or loss > ceiling


@dataclass
class RunResult:
    """The end of a run. `as_dict` is the TRAINPILOT_RESULT line: the gauges' last values under
    short names (JSON null where the gauge would be NaN) plus why and when the run ended."""

    exit_code: int
    step: int
    max_steps: int
    train_loss: float
    val_loss: float
    eval_step: int
    loss_floor: float | None
    checkpoint_step: int
    learning_rate: float
    weight_decay: float
    grad_norm: float
    tokens_per_second: float
    nonfinite_loss_total: int
    control_generation: int
    tokens: int
    seconds: float

    def as_dict(self) -> dict:
        def number(value: float | None) -> float | None:  # JSON has no NaN
            return value if value is not None and math.isfinite(value) else None

        return {
            "exit_code": self.exit_code,
            "exit_reason": EXIT_REASONS[self.exit_code],
            "step": self.step,
            "max_steps": self.max_steps,
            "train_loss": number(self.train_loss),
            "val_loss": number(self.val_loss),
            "eval_step": self.eval_step,
            "loss_floor": number(self.loss_floor),
            "checkpoint_step": self.checkpoint_step,
            "learning_rate": number(self.learning_rate),
            "weight_decay": self.weight_decay,
            "grad_norm": number(self.grad_norm),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "nonfinite_loss_total": self.nonfinite_loss_total,
            "control_generation": self.control_generation,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
        }
