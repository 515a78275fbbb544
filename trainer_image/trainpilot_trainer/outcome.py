"""How a run ends: the divergence test, the watch for the first bad loss and the TRAINPILOT_RESULT
summary. Pure, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

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


@dataclass(frozen=True)
class BadLoss:
    kind: Literal["non-finite", "spike"]
    description: str


class LossWatch:
    """The first bad sign in this run's training loss, after which no checkpoint is ever saved.

    Step by step, with L the step's loss (the mean over ranks):
    - non-finite: L is NaN, infinite or above the ceiling (`is_nonfinite`); such an L is not folded
      into the two numbers below;
    - spike (only with a `spike_factor`): S > spike_factor * B, where S is the exponential moving
      average of L (S = L at this run's first step, then S = w * L + (1 - w) * S with w =
      `smoothing`) and B > 0 is the lowest L of this run. That is the policy's loss-spike rule
      (spikeFactor, smoothing), applied at every step rather than at every scrape, so the trainer
      sees a spike no later than the policy does.
    """

    def __init__(self, ceiling: float, spike_factor: float | None = None, smoothing: float = 0.5) -> None:
        self.ceiling = ceiling
        self.spike_factor = spike_factor
        self.smoothing = smoothing
        self.smoothed: float | None = None
        self.best: float | None = None
        self.first_bad_step: int | None = None
        self.first_bad: BadLoss | None = None

    def observe(self, step: int, loss: float) -> BadLoss | None:
        """This step's bad sign, None when there is none; the first one is kept."""
        if is_nonfinite(loss, self.ceiling):
            bad = BadLoss(
                "non-finite", f"loss {loss:.4g} is not finite or above the divergence ceiling {self.ceiling:.4g}"
            )
        else:
            self.smoothed = (
                loss if self.smoothed is None else self.smoothing * loss + (1 - self.smoothing) * self.smoothed
            )
            self.best = loss if self.best is None else min(self.best, loss)
            factor = self.spike_factor
            if factor is None or self.best <= 0 or self.smoothed <= factor * self.best:
                return None
            bad = BadLoss(
                "spike",
                f"loss spike: smoothed loss {self.smoothed:.4g} is {self.smoothed / self.best:.2f}x "
                f"the best {self.best:.4g} (loss_spike_factor {factor:g})",
            )
        if self.first_bad_step is None:
            self.first_bad_step, self.first_bad = step, bad
        return bad

    @property
    def safe_to_save(self) -> bool:
        return self.first_bad_step is None


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
    checkpoint_tag: str | None
    first_bad_step: int | None
    evaluations: dict[int, float]
    learning_rate: float
    weight_decay: float
    grad_norm: float
    tokens_per_second: float
    nonfinite_loss_total: int
    loss_spikes_total: int
    control_generation: int
    tokens: int
    seconds: float
    validation_fingerprint: int | None = None

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
            "checkpoint_tag": self.checkpoint_tag,
            "first_bad_step": self.first_bad_step,
            "eval_at": {str(step): number(value) for step, value in sorted(self.evaluations.items())},
            # The last rung's evaluation, as the rung gauges hold it (see contract.METRIC_RUNG_STEP).
            "rung_step": max(self.evaluations, default=-1),
            "rung_val_loss": number(self.evaluations[max(self.evaluations)]) if self.evaluations else None,
            "learning_rate": number(self.learning_rate),
            "weight_decay": self.weight_decay,
            "grad_norm": number(self.grad_norm),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "nonfinite_loss_total": self.nonfinite_loss_total,
            "loss_spikes_total": self.loss_spikes_total,
            "control_generation": self.control_generation,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "validation_fingerprint": self.validation_fingerprint,
        }
