"""The benchmark's arithmetic on hand-worked cases: compute to the target, waste, stop delays, the paired test."""

from __future__ import annotations

import math

import pytest

from bench.policybench.figures import Waste, paired_p_value, steps_to_target, stop_delays, summarize, waste


def experiment(**fields):
    base = {
        "policy": "p",
        "task": "t",
        "seed": 0,
        "trajectory": [(0, math.inf), (100, 1.5), (250, 1.3), (400, 1.2)],
        "device_trajectory": [(0, math.inf), (400, 1.2)],
        "first_bad_sign": {},
        "terminated_at": {},
        "trials": [],
        "wall_seconds": 1.0,
    }
    return base | fields


def trial(name, steps, state="Succeeded", diverged=False, message=""):
    return {"name": name, "steps": steps, "nodes": 1, "diverged": diverged, "state": state, "message": message}


def test_compute_to_target_is_the_spend_when_the_best_first_reaches_it():
    trajectory = [(0, math.inf), (100, 1.5), (250, 1.3), (400, 1.2)]
    assert steps_to_target(trajectory, 1.3) == 250
    assert steps_to_target(trajectory, 1.25) == 400
    assert steps_to_target(trajectory, 1.0) is None


def test_waste_splits_diverged_and_early_stopped_compute():
    result = experiment(
        trials=[
            trial("a", 300),
            trial("b", 40, "Terminated", diverged=True, message="nonfinite-loss"),
            trial("c", 75, "Terminated", message="asha-rung"),
            trial("d", 120, "Terminated", message="experiment-complete"),  # cut by the end, not a policy's stop
            trial("e", 300),  # spiked, never stopped
        ],
        first_bad_sign={"b": 3, "e": 10},
    )
    assert waste(result) == Waste(total=835, diverged=340, stopped=75)


def test_stop_delays_count_cycles_from_the_first_bad_sign_and_trials_never_stopped():
    result = experiment(first_bad_sign={"b": 3, "e": 10, "f": 7}, terminated_at={"b": 5, "f": 7, "g": 2})
    assert stop_delays(result) == ([2, 0], 1)


def test_the_paired_sign_flip_test_is_exact():
    # Every difference positive over 5 pairs: only the all-plus and all-minus flips are as extreme.
    assert paired_p_value([2, 3, 4, 5, 6], [1, 1, 1, 1, 1]) == pytest.approx(2 / 32)
    assert paired_p_value([1, 2], [1, 2]) == 1.0
    # Mixed signs of equal size cancel: nothing is extreme but the observed zero-sum flips.
    assert paired_p_value([1, 0], [0, 1]) == 1.0


def test_summaries_count_seeds_that_reached_and_censor_the_rest_at_their_spend():
    reached = experiment(seed=0)
    missed = experiment(seed=1, trajectory=[(0, math.inf), (400, 1.4)], trials=[trial("a", 400)])
    summary = summarize([reached, missed], target=1.3)
    assert (summary.seeds, summary.reached, summary.to_target) == (2, 1, [250, None])
    assert summary.median_to_target is None  # not reached in most seeds
    assert summary.censored == [250.0, 400.0]  # the miss counted at its whole spend: a lower bound
