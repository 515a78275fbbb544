"""The benchmark's figures, from finished experiments: compute to the target, best loss at the budget,
waste, how fast divergence is stopped, spread over seeds, and paired significance tests.

Compute is trial-steps (optimizer steps summed over trials, each counting what it trained itself),
the unit of spec.budget.maxTrialSteps; GPU-hours follow at a stated rate per device-step.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainpilot.core.state import COMPLETE_REASON, is_diverged, steps_trained


def steps_to_target(trajectory: Sequence[tuple[int, float]], target: float) -> int | None:
    """Trial-steps spent when the best loss seen first reached `target`; None if it never did."""
    for spent, best in trajectory:
        if math.isfinite(best) and best <= target:
            return spent
    return None


def final_best(trajectory: Sequence[tuple[int, float]]) -> float:
    finite = [best for _, best in trajectory if math.isfinite(best)]
    return min(finite) if finite else math.inf


@dataclass(frozen=True)
class Waste:
    total: int  # trial-steps
    diverged: int  # on trials that diverged or showed a bad sign (non-finite or spiking loss), stopped or not
    stopped: int  # on trials a policy stopped early for another reason (rungs, plateaus, median, exploit)


def waste(result: dict[str, Any]) -> Waste:
    total = diverged = stopped = 0
    for trial in result["trials"]:
        steps = trial["steps"]
        total += steps
        if trial["diverged"] or trial["name"] in result["first_bad_sign"]:
            diverged += steps
        elif trial["state"] == "Terminated" and trial["message"] != COMPLETE_REASON:
            stopped += steps
    return Waste(total, diverged, stopped)


def stop_delays(result: dict[str, Any]) -> tuple[list[int], int]:
    """Cycles (decision intervals) from each trial's first bad sign to its stop, and how many bad
    trials were never stopped by the policy (they ran to their end or to the experiment's)."""
    delays, never = [], 0
    for trial, first in result["first_bad_sign"].items():
        stopped = result["terminated_at"].get(trial)
        if stopped is None:
            never += 1
        else:
            delays.append(max(stopped - first, 0))
    return delays, never


EXACT_PAIRS = 16  # up to here every sign flip is enumerated; beyond, a seeded Monte Carlo sample
MONTE_CARLO_FLIPS = 100_000


def paired_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided sign-flip permutation test of mean(a - b) = 0 over paired seeds (the same seed runs
    both policies): exact up to EXACT_PAIRS pairs, a seeded sample of MONTE_CARLO_FLIPS beyond."""
    differences = np.array([x - y for x, y in zip(a, b, strict=True)], dtype=float)
    if not len(differences) or not differences.any():
        return 1.0
    observed = abs(differences.sum()) - 1e-12
    if len(differences) <= EXACT_PAIRS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(differences))))
    else:
        signs = np.random.default_rng(0).choice((1.0, -1.0), size=(MONTE_CARLO_FLIPS, len(differences)))
    return float((np.abs(signs @ differences) >= observed).mean())


@dataclass(frozen=True)
class Summary:
    """One policy on one task over its seeds."""

    policy: str
    task: str
    seeds: int
    reached: int
    to_target: list[int | None]  # per seed
    spent: list[int]  # per seed, trial-steps in all
    best: list[float]  # per seed, at the end of the budget
    waste: Waste
    delays: list[int]
    never_stopped: int
    device_steps: int
    wall_seconds: float

    @property
    def censored(self) -> list[float]:
        """Compute to the target per seed, a seed that never reached it counted at its whole spend:
        a lower bound on its cost, so comparisons with it are conservative."""
        return [
            float(value if value is not None else spent)
            for value, spent in zip(self.to_target, self.spent, strict=True)
        ]

    @property
    def median_to_target(self) -> float | None:
        reached = [value for value in self.to_target if value is not None]
        return statistics.median(reached) if len(reached) * 2 > self.seeds else None


def summarize(results: Sequence[dict[str, Any]], target: float) -> Summary:
    """`results`: one policy's experiments on one task (bench.policies.plain), one per seed."""
    wastes = [waste(result) for result in results]
    delays: list[int] = []
    never = 0
    for result in results:
        found, missed = stop_delays(result)
        delays += found
        never += missed
    to_target = [steps_to_target(result["trajectory"], target) for result in results]
    device = [result["device_trajectory"][-1][0] for result in results if result.get("device_trajectory")]
    return Summary(
        policy=results[0]["policy"],
        task=results[0]["task"],
        seeds=len(results),
        reached=sum(value is not None for value in to_target),
        to_target=to_target,
        spent=[result["trajectory"][-1][0] if result["trajectory"] else 0 for result in results],
        best=[final_best(result["trajectory"]) for result in results],
        waste=Waste(sum(w.total for w in wastes), sum(w.diverged for w in wastes), sum(w.stopped for w in wastes)),
        delays=delays,
        never_stopped=never,
        device_steps=sum(device),
        wall_seconds=sum(result["wall_seconds"] for result in results),
    )


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    q1, q2, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return q1, q2, q3


def trial_rows(trials: Sequence[Any]) -> list[dict[str, Any]]:
    """What the figures need of each trial in a final status (TrialStatus), as plain data."""
    return [
        {
            "name": t.name,
            "steps": steps_trained(t),
            "nodes": t.nodes,
            "diverged": is_diverged(t),
            "state": t.state,
            "message": t.message,
        }
        for t in trials
    ]


def decision_counts(records: Sequence[Any]) -> dict[str, int]:
    """Executed decisions (DecisionRecord) by action:reason, the completion left out."""
    counts: dict[str, int] = {}
    for record in records:
        if record.outcome == "executed" and record.decision.action != "complete":
            key = f"{record.decision.action}:{record.decision.reason}"
            counts[key] = counts.get(key, 0) + 1
    return counts
