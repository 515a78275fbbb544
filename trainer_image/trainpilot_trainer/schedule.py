"""The learning-rate schedule: linear warm-up, then cosine decay to a floor.

The trainer computes it itself and writes the result into the optimizer's param groups before
every step (no DeepSpeed scheduler), so an in-place lr change is one multiplication: the whole
curve is scaled so that its peak becomes the new lr, and the run stays where it is on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Schedule:
    peak: float  # lr at the end of warm-up
    floor: float  # lr reached at max_steps
    warmup_steps: int
    max_steps: int

    @classmethod
    def from_hyperparameters(cls, hp) -> Schedule:
        return cls(peak=hp.lr, floor=hp.effective_min_lr, warmup_steps=hp.warmup_steps, max_steps=hp.max_steps)

    def lr(self, step: int) -> float:
        """The lr of optimizer step `step` (0-based: the first step of a fresh run is step 0)."""
        if step < self.warmup_steps:
            # (step + 1): the very first step already moves; a zero lr would waste it.
            return self.peak * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.peak - self.floor)

    def with_peak(self, peak: float) -> Schedule:
        """The same curve scaled by peak / self.peak: warm-up and cosine shape, and the
        floor-to-peak ratio, are kept; only the height changes."""
        return replace(self, peak=peak, floor=self.floor * peak / self.peak)
