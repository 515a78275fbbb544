"""The limit: an oracle that trains only the best configuration in the space uses the least compute
possible. On the fast family that is a dense sweep of the surrogate's noise-free curves; the oracle
then pays for one trial, up to the first evaluation at which that configuration reaches the target.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.policybench.tasks import Task, load_curves

LR_POINTS = 61  # the lr axis of the sweep, log-spaced: about 15 points per decade over 1e-4..1
INT_POINTS = 11  # an integer range's axis


@dataclass(frozen=True)
class Oracle:
    hyperparameters: dict[str, float]
    final: float  # its noise-free val_loss at max_steps
    steps: int | None  # trial-steps to the target: its first evaluation at or under it; None: never
    swept: int  # configurations swept (the real family: fresh runs seen)
    kind: str = "sweep"

    def describe(self) -> str:
        if self.kind != "sweep":
            reach = f"reached the target at step {self.steps}" if self.steps is not None else "none reached the target"
            return f"the best of {self.swept} fresh runs the policies made {reach}: the least compute seen"
        values = ", ".join(f"{name}={value:g}" for name, value in self.hyperparameters.items())
        reach = f"reaches the target at step {self.steps}" if self.steps is not None else "never reaches the target"
        return (
            f"the best of {self.swept} configurations swept on the surrogate ({values}) ends at {self.final:.4f} "
            f"and {reach}: the least compute possible"
        )


def axis(parameter: dict[str, Any]) -> list[float]:
    if "values" in parameter:
        return [float(v) for v in parameter["values"]]
    low, high = float(parameter["min"]), float(parameter["max"])
    if parameter.get("log"):
        return list(np.geomspace(low, high, LR_POINTS))
    if float(low).is_integer() and float(high).is_integer():
        return sorted({float(round(v)) for v in np.linspace(low, high, INT_POINTS)})
    return list(np.linspace(low, high, INT_POINTS))


def surrogate_target(task: Task) -> float:
    """The fast family's target: as far above the surrogate's best achievable loss (the sweep's best
    final) as task.target sits above the best run recorded from the real trainer. A fitted curve
    model is off by a few thousandths in level; its landscape, not its level, is what it is for."""
    best_recorded = min(
        min(value for value in run["val"] if value == value)
        for run in load_curves(task.name)["runs"]
        if any(value == value for value in run["val"])
    )
    return _best_swept(task)[0] + (task.target - best_recorded)


def steps_to_target(task: Task, target: float | None = None) -> Oracle:
    """The oracle of `task` at `target` (default task.target): one trial of the sweep's best
    configuration, up to its first evaluation at or under the target."""
    final, point, curve, swept = _best_swept(task)
    interval = int(task.template["eval_interval"])
    goal = task.target if target is None else target
    evaluated = [*range(interval, len(curve), interval), len(curve) - 1]
    reached = next((step for step in evaluated if curve[step] <= goal), None)
    return Oracle(point, final, reached, swept)


_SWEPT: dict[str, tuple[float, dict[str, float], list[float], int]] = {}


def _best_swept(task: Task) -> tuple[float, dict[str, float], list[float], int]:
    """(final, values, noise-free curve, configurations swept) of the best configuration; swept once per process."""
    if task.name not in _SWEPT:
        _SWEPT[task.name] = _sweep(task)
    return _SWEPT[task.name]


def _sweep(task: Task) -> tuple[float, dict[str, float], list[float], int]:
    from bench.policybench.surrogate import expected_curve

    names = [parameter["name"] for parameter in task.search_space]
    best: tuple[float, dict[str, float], list[float]] | None = None
    swept = 0
    for values in itertools.product(*(axis(parameter) for parameter in task.search_space)):
        point = dict(zip(names, values, strict=True))
        curve = expected_curve(task, point)
        swept += 1
        final = curve[-1]
        if math.isfinite(final) and (best is None or final < best[0]):
            best = (final, point, curve)
    assert best is not None, "every configuration diverges"
    return (*best, swept)


def best_run_seen(task: Task, results: list[dict[str, Any]]) -> Oracle:
    """The real family's limit: of every fresh trial any policy ran, the one that reached the target
    in the fewest steps (its own evaluations, as status kept them)."""
    best: tuple[int, float] | None = None
    for result in results:
        for curve in result.get("fresh_curves", []):
            reached = next((int(step) for step, value in curve if value <= task.target), None)
            if reached is not None and (best is None or reached < best[0]):
                best = (reached, min(value for _, value in curve))
    if best is None:
        return Oracle({}, math.inf, None, 0, kind="the best run seen")
    return Oracle({}, best[1], best[0], sum(len(r.get("fresh_curves", [])) for r in results), kind="the best run seen")
