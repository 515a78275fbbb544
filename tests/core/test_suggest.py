"""Suggester: initial trials first, then seeded TPE that stays in the space and learns from status."""

from __future__ import annotations

import math
import random
import statistics

from tests.support.builders import make_spec, status_of, trial
from trainpilot.core.suggest import Suggester

MIXED_SPACE = [
    {"name": "lr", "min": 1e-5, "max": 1.0, "log": True},
    {"name": "weight_decay", "min": 0.0, "max": 0.2},
    {"name": "n_layer", "min": 1, "max": 6},
    {"name": "micro_batch", "values": [4, 8, 16]},
]


def test_suggestions_are_plain_values_inside_the_space():
    spec = make_spec(searchSpace=MIXED_SPACE)
    points = Suggester(spec, status_of(spec)).suggest(12)
    assert len(points) == 12
    for point in points:
        assert set(point) == {"lr", "weight_decay", "n_layer", "micro_batch"}
        for parameter in spec.search_space:
            assert parameter.contains(point[parameter.name])
        assert type(point["n_layer"]) is int and type(point["micro_batch"]) is int
        assert type(point["lr"]) is float
    # A batch asked at once is spread out, not one point repeated.
    assert len({point["lr"] for point in points}) == 12


def test_same_inputs_same_suggestions_and_the_seed_matters():
    spec = make_spec(searchSpace=MIXED_SPACE)
    status = status_of(
        spec,
        trial(
            "a",
            0,
            "Succeeded",
            best_objective=2.0,
            hyperparameters={"lr": 0.01, "weight_decay": 0.1, "n_layer": 2, "micro_batch": 8},
        ),
    )
    assert Suggester(spec, status).suggest(3) == Suggester(spec, status).suggest(3)
    assert Suggester(spec, status, seed=1).suggest(3) != Suggester(spec, status, seed=2).suggest(3)


def test_a_new_cycle_does_not_repeat_the_point_just_launched():
    spec = make_spec()
    first = Suggester(spec, status_of(spec)).suggest(1)[0]
    status = status_of(spec, trial("a", 0, "Running", hyperparameters=first))
    assert Suggester(spec, status).suggest(1)[0] != first


def test_initial_trials_come_first_and_are_used_once():
    spec = make_spec(initialTrials=[{"lr": 0.3, "weight_decay": 0.0}, {"lr": 0.003}])
    points = Suggester(spec, status_of(spec)).suggest(3)
    assert points[0] == {"lr": 0.3, "weight_decay": 0.0}
    assert points[1]["lr"] == 0.003 and 0.0 <= points[1]["weight_decay"] <= 0.1  # the gap is sampled
    # One fresh trial exists: the first initial trial is used; a relaunch child does not count.
    status = status_of(
        spec,
        trial("a", 0, "Diverged", hyperparameters={"lr": 0.3, "weight_decay": 0.0}),
        trial("b", 1, "Running", parent="a", hyperparameters={"lr": 0.03, "weight_decay": 0.0}),
    )
    suggester = Suggester(spec, status)
    assert suggester.initial_remaining == [{"lr": 0.003}]
    assert suggester.suggest(1)[0]["lr"] == 0.003


def test_trials_outside_a_changed_space_are_left_out():
    spec = make_spec()
    status = status_of(spec, trial("a", 0, "Succeeded", best_objective=1.0, hyperparameters={"lr": 50.0}))
    point = Suggester(spec, status).suggest(1)[0]
    assert spec.parameter("lr").contains(point["lr"])


def _toy_loss(lr: float) -> float:
    return (math.log10(lr) + 2.5) ** 2  # best at lr = 10^-2.5


# Uniform in log10(lr) over [-5, 0], the mean distance to -2.5 is 1.25 decades.
RANDOM_MEAN_DISTANCE = 1.25


def _distances(seed: int, rounds: int = 30) -> list[float]:
    spec = make_spec(
        searchSpace=[{"name": "lr", "min": 1e-5, "max": 1.0, "log": True}],
        policy={"heuristic": {"seed": seed, "startup_trials": 5}},
    )
    trials = []
    for index in range(rounds):
        point = Suggester(spec, status_of(spec, *trials)).suggest(1)[0]
        trials.append(
            trial(f"t{index}", index, "Succeeded", hyperparameters=point, best_objective=_toy_loss(point["lr"]))
        )
    return [abs(math.log10(t.hyperparameters["lr"]) + 2.5) for t in trials]


def test_tpe_moves_toward_the_good_region():
    runs = [_distances(seed) for seed in (0, 7, 11)]
    startup = statistics.mean(d for run in runs for d in run[:5])
    late = statistics.mean(d for run in runs for d in run[-10:])
    assert late < startup
    assert late < 0.8 * RANDOM_MEAN_DISTANCE


def test_diverged_trials_are_told_as_failures_not_scores():
    spec = make_spec(searchSpace=[{"name": "lr", "min": 1e-5, "max": 1.0, "log": True}])
    status = status_of(
        spec,
        trial("a", 0, "Diverged", best_objective=0.1, hyperparameters={"lr": 0.9}),
        trial("b", 1, "Terminated", message="nonfinite-loss", best_objective=0.1, hyperparameters={"lr": 0.8}),
        trial("c", 2, "Succeeded", best_objective=2.0, hyperparameters={"lr": 0.001}),
        trial("d", 3, "Running", hyperparameters={"lr": 0.01}),
    )
    summary = Suggester(spec, status).state_summary()
    assert summary["best"] == {"trial": "c", "value": 2.0, "params": {"lr": 0.001}}
    assert (summary["trials"], summary["complete"], summary["failed"], summary["running"]) == (4, 1, 2, 1)
    assert summary["sampler"] == "TPESampler"


CLIFF = 0.1  # lr above it diverges; below it, higher is better: the best points sit at the edge


def _diverging_share(seed: int, told_as: str, rounds: int = 30, startup: int = 5) -> float:
    """Share of TPE's suggestions (after the random start) that land where trials diverge."""
    spec = make_spec(
        searchSpace=[{"name": "lr", "min": 1e-5, "max": 1.0, "log": True}],
        policy={"heuristic": {"seed": seed, "startup_trials": startup, "divergedToldAs": told_as}},
    )
    trials = []
    for index in range(rounds):
        point = Suggester(spec, status_of(spec, *trials)).suggest(1)[0]
        lr = point["lr"]
        outcome = {"state": "Diverged"} if lr > CLIFF else {"state": "Succeeded", "best_objective": -math.log10(lr)}
        trials.append(trial(f"t{index}", index, hyperparameters=point, **outcome))
    return statistics.mean(t.hyperparameters["lr"] > CLIFF for t in trials[startup:])


def test_diverged_trials_told_as_the_worst_score_steer_tpe_away_from_the_region_that_diverged():
    seeds = (0, 3, 7, 11)
    worst = statistics.mean(_diverging_share(seed, "worst") for seed in seeds)
    fail = statistics.mean(_diverging_share(seed, "fail") for seed in seeds)
    # Told as FAIL, TPE never sees them: it keeps sampling around its best points, across the cliff.
    assert worst < 0.6 * fail, (worst, fail)


def test_a_diverged_trial_is_told_as_the_worst_scored_objective_or_fail_before_anything_scored():
    spec = make_spec(searchSpace=[{"name": "lr", "min": 1e-5, "max": 1.0, "log": True}])
    diverged = trial("a", 0, "Diverged", hyperparameters={"lr": 0.9})
    import optuna

    def told(*trials):
        suggester = Suggester(spec, status_of(spec, *trials))
        distributions = {"lr": optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)}
        return suggester._told(optuna, trials[0], distributions, suggester._worst_scored())

    assert told(diverged).state == optuna.trial.TrialState.FAIL
    scored = [trial(f"s{v}", 1, "Succeeded", best_objective=v, hyperparameters={"lr": 0.01}) for v in (1.5, 2.5)]
    assert told(diverged, *scored).value == 2.5


def test_state_summary_lists_the_top_five_best_first():
    spec = make_spec(objective={"direction": "maximize"})
    trials = [trial(f"t{i}", i, "Succeeded", best_objective=float(i)) for i in range(8)]
    summary = Suggester(spec, status_of(spec, *trials)).state_summary()
    assert [entry["trial"] for entry in summary["top"]] == ["t7", "t6", "t5", "t4", "t3"]


def test_running_trials_push_suggestions_away_from_themselves():
    """TPE's constant liar: points being tried count as bad while they run, so the next suggestions
    do not pile onto them (with Optuna's default, constant_liar off, they land about twice as close)."""
    spec = make_spec(searchSpace=[{"name": "lr", "min": 1e-5, "max": 1.0, "log": True}])
    distances = []
    for seed in range(20):
        rng = random.Random(seed)
        done = [10 ** rng.uniform(-5, 0) for _ in range(12)]
        trials = [
            trial(f"d{i}", i, "Succeeded", best_objective=abs(math.log10(lr) + 2), hyperparameters={"lr": lr})
            for i, lr in enumerate(done)
        ]
        # Four trials are running right at the optimum (lr = 0.01) and have no result yet.
        trials += [
            trial(f"r{i}", 12 + i, "Running", hyperparameters={"lr": lr})
            for i, lr in enumerate((0.01, 0.011, 0.009, 0.0105))
        ]
        points = Suggester(spec, status_of(spec, *trials), seed=seed).suggest(4)
        distances.append(statistics.median(abs(math.log10(point["lr"]) + 2) for point in points))
    assert statistics.median(distances) > 0.75, distances
