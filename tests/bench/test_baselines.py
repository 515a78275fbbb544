"""The benchmark's baseline policies, each rule on a small hand-worked case in plain data."""

from __future__ import annotations

import math
import statistics

import pytest

from bench.policybench.baselines import (
    ASHA,
    BASELINES,
    CMAES,
    PBT,
    TPE,
    GridSearch,
    MedianStopping,
    RandomSearch,
    random_point,
)
from tests.support.builders import EXPERIMENT, at, context, make_spec, observation, seen, status_of, trial
from trainpilot.api.experiment import AgentExperimentSpec
from trainpilot.core import guardrails
from trainpilot.core.engine import plan
from trainpilot.core.state import fold_observation

SPACE = [
    {"name": "lr", "min": 1e-4, "max": 1.0, "log": True},
    {"name": "micro_batch", "values": [4, 8, 16, 32]},
    {"name": "warmup_steps", "min": 0, "max": 100},
]
HP = {"lr": 0.01, "micro_batch": 8, "warmup_steps": 10}


def bench_spec(**changes) -> AgentExperimentSpec:
    return make_spec(searchSpace=SPACE, **changes)


def by(decisions, action=None, reason=None):
    return [d for d in decisions if (action is None or d.action == action) and (reason is None or d.reason == reason)]


def in_space(spec: AgentExperimentSpec, point: dict[str, float]) -> bool:
    return set(point) == {p.name for p in spec.search_space} and all(
        spec.parameter(name).contains(value) and (not spec.parameter(name).is_integer or float(value).is_integer())
        for name, value in point.items()
    )


def curve(*values: float, every: int = 10) -> list[list[float]]:
    """History points at steps every, 2 x every, ..."""
    return [[float(every * (i + 1)), value] for i, value in enumerate(values)]


def run(name: str, index: int, values: list[float], state: str = "Running", **fields) -> object:
    """A trial with these evaluations (every 10 steps), standing at its last one."""
    fields.setdefault("hyperparameters", dict(HP))
    history = curve(*values)
    fields.setdefault("step", int(history[-1][0]) if history else 0)
    best = min(values) if values else None
    return trial(
        name, index, state, history=history, objective=values[-1] if values else None, best_objective=best, **fields
    )


async def decide(policy, spec, status, limits=None):
    return await policy.decide(context(spec, status, limits=limits))


# ---- the registry and what every baseline shares --------------------------------------------


def test_registry_names_every_baseline_by_its_policy_name():
    assert list(BASELINES) == ["random", "grid", "median-stopping", "asha", "pbt", "tpe", "cmaes"]
    for name, make in BASELINES.items():
        policy = make(3)
        assert policy.name == name and policy.seed == 3


@pytest.mark.parametrize("name", list(BASELINES))
async def test_every_baseline_fills_the_free_slots_with_points_of_the_space(name):
    spec = bench_spec(budget={"parallelTrials": 3})
    decisions = await decide(BASELINES[name](0), spec, status_of(spec))
    launches = by(decisions, "launch")
    assert len(launches) == guardrails.launch_capacity(spec, status_of(spec)) == 3
    assert all(in_space(spec, d.hyperparameters) and d.policy == name and d.rationale for d in launches)
    assert "0 running of parallelTrials 3, 0 of maxTrials 8 launched" in launches[0].rationale
    assert "2 of maxTrials 8 launched" in launches[2].rationale


@pytest.mark.parametrize("name", list(BASELINES))
async def test_every_baseline_completes_once_max_trials_are_launched_and_none_runs(name):
    spec = bench_spec(budget={"maxTrials": 2, "parallelTrials": 2})
    one_running = status_of(spec, run("a", 0, [2.0], "Succeeded"), run("b", 1, [2.5]))
    assert by(await decide(BASELINES[name](0), spec, one_running), "complete") == []
    done = status_of(spec, run("a", 0, [2.0], "Succeeded"), run("b", 1, [2.5], "Succeeded"))
    [complete] = await decide(BASELINES[name](0), spec, done)
    assert (complete.action, complete.reason, complete.outcome) == ("complete", "budget-spent", "succeeded")
    assert "all 2 trials launched (maxTrials 2)" in complete.rationale and "best val_loss 2 by a" in complete.rationale


async def test_nothing_scored_completes_as_failed():
    spec = bench_spec(budget={"maxTrials": 2, "parallelTrials": 2})
    status = status_of(
        spec, trial("a", 0, "Diverged", hyperparameters=HP), trial("b", 1, "Diverged", hyperparameters=HP)
    )
    [complete] = await decide(RandomSearch(), spec, status)
    assert (complete.reason, complete.outcome) == ("budget-spent", "failed")
    assert "no trial was scored" in complete.rationale


async def test_completes_when_max_trial_steps_no_longer_pays_for_a_trial_and_none_runs():
    # maxTrialSteps 500, trials of 200 steps: two trained 400, the 100 left do not pay for a third.
    spec = bench_spec(budget={"maxTrialSteps": 500, "maxTrials": 8})
    running = status_of(spec, run("a", 0, [2.0], "Succeeded", step=200), run("b", 1, [2.5], step=100))
    assert await decide(RandomSearch(), spec, running) == []  # b still runs (and holds its 200 steps)
    done = status_of(spec, run("a", 0, [2.0], "Succeeded", step=200), run("b", 1, [2.5], "Succeeded", step=200))
    [complete] = await decide(RandomSearch(), spec, done)
    assert (complete.reason, complete.outcome) == ("budget-spent", "succeeded")
    assert "400 trial-steps used (maxTrialSteps 500): 100 left, less than a trial's 200" in complete.rationale
    roomy = bench_spec(budget={"maxTrialSteps": 600, "maxTrials": 8})
    assert [d.action for d in await decide(RandomSearch(), roomy, status_of(roomy, *done.trials))] == ["launch"]


async def test_the_goal_ends_the_experiment_with_success():
    spec = bench_spec(objective={"goal": 2.1})
    status = status_of(spec, run("a", 0, [2.4, 2.05], "Succeeded"), run("b", 1, [2.5]))
    decisions = await decide(ASHA(), spec, status)
    assert [(d.action, d.reason) for d in decisions] == [
        ("terminate", "experiment-complete"),
        ("complete", "goal-reached"),
    ]
    assert decisions[-1].outcome == "succeeded" and "val_loss 2.05 (goal 2.1)" in decisions[-1].rationale


async def test_actions_the_spec_does_not_allow_are_not_proposed():
    spec = bench_spec(policy={"allowedActions": ["launch", "terminate"]}, budget={"maxTrials": 1, "parallelTrials": 1})
    assert await decide(RandomSearch(), spec, status_of(spec, run("a", 0, [2.0], "Succeeded"))) == []


# ---- random search --------------------------------------------------------------------------


async def draws(policy, spec: AgentExperimentSpec, count: int) -> list[dict[str, float]]:
    """The points `policy` launches as trial 0, 1, ..., count - 1 (one slot per cycle)."""
    points = []
    for _ in range(count):
        status = status_of(spec, *[trial(f"t{i}", i, "Succeeded", hyperparameters=p) for i, p in enumerate(points)])
        [launch] = by(await decide(policy, spec, status), "launch")
        points.append(launch.hyperparameters)
    return points


async def test_random_search_is_seeded_and_inside_the_space():
    spec = bench_spec(budget={"maxTrials": 40, "parallelTrials": 1})
    points = await draws(RandomSearch(7), spec, 12)
    assert points == await draws(RandomSearch(7), spec, 12)
    assert points[:3] != await draws(RandomSearch(8), spec, 3)
    assert all(in_space(spec, p) for p in points) and len({tuple(sorted(p.items())) for p in points}) == 12
    # The policy's n-th launch is random_point(spec, seed, n): the sampling helper every baseline shares.
    assert points == [random_point(spec, 7, n) for n in range(12)]


def test_sampling_is_log_uniform_on_log_ranges_uniform_on_integers_and_choices():
    spec = bench_spec()
    points = [random_point(spec, 0, n) for n in range(2000)]
    assert all(in_space(spec, p) for p in points)
    lrs = [p["lr"] for p in points]
    # Log-uniform on [1e-4, 1]: a quarter per decade.
    assert 0.45 < sum(lr < 1e-2 for lr in lrs) / len(lrs) < 0.55
    assert 0.2 < sum(lr < 1e-3 for lr in lrs) / len(lrs) < 0.3
    batches = [p["micro_batch"] for p in points]
    assert all(0.2 < batches.count(b) / len(batches) < 0.3 for b in (4, 8, 16, 32))
    warmups = [p["warmup_steps"] for p in points]
    assert {0, 100} <= set(warmups) and 47 < statistics.fmean(warmups) < 53


async def test_a_rejected_launch_is_proposed_again_with_the_same_values():
    spec = bench_spec()
    policy = RandomSearch(1)
    first = await decide(policy, spec, status_of(spec))
    assert await decide(policy, spec, status_of(spec)) == first


# ---- grid -----------------------------------------------------------------------------------


def test_grid_is_sized_to_max_trials_and_covers_every_combination_in_a_fixed_order():
    spec = bench_spec(budget={"maxTrials": 16})
    grid = GridSearch().grid(spec)
    assert GridSearch().counts(spec) == [4, 2, 2] and len(grid) == 16
    assert grid == GridSearch(seed=5).grid(spec)  # no randomness
    lrs = sorted({p["lr"] for p in grid})
    assert lrs == pytest.approx([1e-4, 10 ** (-8 / 3), 10 ** (-4 / 3), 1.0])
    assert {p["micro_batch"] for p in grid} == {4, 32} and {p["warmup_steps"] for p in grid} == {0, 100}
    assert len({tuple(sorted(p.items())) for p in grid}) == 16 and all(in_space(spec, p) for p in grid)
    # The last dimension moves fastest.
    assert [(p["micro_batch"], p["warmup_steps"]) for p in grid[:4]] == [(4, 0), (4, 100), (32, 0), (32, 100)]
    assert all(p["lr"] == 1e-4 for p in grid[:4])


def test_grid_with_a_fixed_count_per_dimension_and_a_step_budget():
    spec = bench_spec(budget={"maxTrials": 100})
    fixed = GridSearch(points=3)
    assert fixed.counts(spec) == [3, 3, 3]
    assert sorted({p["micro_batch"] for p in fixed.grid(spec)}) == [4, 16, 32]
    assert sorted({p["warmup_steps"] for p in fixed.grid(spec)}) == [0, 50, 100]
    # maxTrialSteps 1000 pays for 5 full trials of 200 steps: the grid is sized to that, not to maxTrials.
    spec = bench_spec(budget={"maxTrials": 100, "maxTrialSteps": 1000})
    assert GridSearch().counts(spec) == [2, 2, 1] and GridSearch().grid(spec)[0]["warmup_steps"] == 50
    single = make_spec(
        searchSpace=[{"name": "lr", "min": 1e-4, "max": 1e-2, "log": True}],
        budget={"maxTrials": 1, "parallelTrials": 1},
    )
    assert GridSearch().grid(single) == [{"lr": pytest.approx(1e-3)}]


async def test_grid_launches_its_points_in_order_then_completes_when_all_ran():
    spec = bench_spec(budget={"maxTrials": 8, "parallelTrials": 3})
    policy = GridSearch(points=2)
    grid = policy.grid(spec)
    assert len(grid) == 8
    first = await decide(policy, spec, status_of(spec))
    assert [d.hyperparameters for d in first] == grid[:3]
    assert "grid point 1 of 8 (2 lr x 2 micro_batch x 2 warmup_steps)" in first[0].rationale
    small = bench_spec(budget={"maxTrials": 8, "parallelTrials": 2})
    done = status_of(
        small, *[trial(f"t{i}", i, "Succeeded", hyperparameters=grid[i], best_objective=2.0) for i in range(2)]
    )
    policy = GridSearch(points=1)  # one point: the grid is the middle of the space
    assert policy.grid(small) == [{"lr": pytest.approx(1e-2), "micro_batch": 8, "warmup_steps": 50}]
    [complete] = await decide(policy, small, done)
    assert (complete.reason, complete.outcome) == ("grid-exhausted", "succeeded")
    assert "all 1 grid points launched" in complete.rationale


# ---- median stopping ------------------------------------------------------------------------

# Completed trials' evaluations at steps 10..50; their running averages up to step 40 are
# a (3.0+2.5+2.2+2.0)/4 = 2.425, b (3.2+2.8+2.5+2.3)/4 = 2.7, c (3.4+3.0+2.8+2.6)/4 = 2.95: median 2.7.
A, B, C = [3.0, 2.5, 2.2, 2.0, 1.9], [3.2, 2.8, 2.5, 2.3, 2.2], [3.4, 3.0, 2.8, 2.6, 2.5]


async def test_median_stopping_stops_exactly_the_trial_worse_than_the_median_at_its_step():
    spec = bench_spec(budget={"parallelTrials": 4, "maxTrials": 20})
    status = status_of(
        spec,
        run("a", 0, A, "Succeeded"),
        run("b", 1, B, "Succeeded"),
        run("c", 2, C, "Succeeded"),
        run("d", 3, [3.5, 3.2, 3.0, 2.9]),  # best 2.9 > 2.7: stopped
        run("e", 4, [3.3, 2.9, 2.7, 2.6]),  # best 2.6 < 2.7: goes on
        run("f", 5, [3.3, 2.9, 2.8, 2.7]),  # best 2.7 = the median: not strictly worse, goes on
        run("g", 6, [9.0, 9.0, 9.0]),  # 3 evaluations, below startStep 4: not judged yet
    )
    [stop] = by(await decide(MedianStopping(), spec, status), "terminate")
    assert (stop.trial, stop.reason) == ("d", "median-stop")
    assert "best val_loss 2.9 by step 40 is worse than 2.7" in stop.rationale
    assert "a 2.425, b 2.7, c 2.95" in stop.rationale and "minTrialsRequired 3" in stop.rationale


async def test_median_stopping_waits_for_min_trials_required_completed_trials():
    spec = bench_spec(budget={"parallelTrials": 4, "maxTrials": 20})
    two_done = status_of(
        spec, run("a", 0, A, "Succeeded"), run("b", 1, B, "Succeeded"), run("c", 2, C), run("d", 3, [9.0] * 4)
    )
    assert by(await decide(MedianStopping(), spec, two_done), "terminate") == []
    # A trial stopped early is not a completed one either.
    stopped = status_of(
        spec,
        run("a", 0, A, "Succeeded"),
        run("b", 1, B, "Succeeded"),
        run("c", 2, C, "Terminated", message="median-stop"),
        run("d", 3, [9.0] * 4),
    )
    assert by(await decide(MedianStopping(), spec, stopped), "terminate") == []
    assert by(await decide(MedianStopping(min_trials_required=2), spec, stopped), "terminate", "median-stop")


async def test_median_stopping_remembers_evaluations_status_no_longer_holds():
    spec = bench_spec(budget={"parallelTrials": 4, "maxTrials": 20})
    policy = MedianStopping()
    early = status_of(spec, run("a", 0, A[:4]), run("b", 1, B[:4]), run("c", 2, C[:4]))
    await decide(policy, spec, early)
    # Status now keeps only their last point; the running averages still use all five.
    late = status_of(
        spec,
        trial("a", 0, "Succeeded", hyperparameters=HP, step=50, history=[[50.0, 1.9]], best_objective=1.9),
        trial("b", 1, "Succeeded", hyperparameters=HP, step=50, history=[[50.0, 2.2]], best_objective=2.2),
        trial("c", 2, "Succeeded", hyperparameters=HP, step=50, history=[[50.0, 2.5]], best_objective=2.5),
        run("d", 3, [3.5, 3.2, 3.0, 2.9]),
    )
    [stop] = by(await decide(policy, spec, late), "terminate")
    assert stop.trial == "d" and "worse than 2.7" in stop.rationale
    assert by(await decide(MedianStopping(), spec, late), "terminate") == []  # no memory: no averages to step 40


# ---- ASHA -----------------------------------------------------------------------------------


def asha_spec(**changes) -> AgentExperimentSpec:
    # max_steps 270, eta 3: gracePeriod 270 / 9 = 30, rungs at steps 30 and 90 (270 is the end).
    return bench_spec(trialTemplate={"hyperparameters": {"max_steps": 270}}, **changes)


def test_asha_rungs_are_grace_period_times_powers_of_eta_below_max_steps():
    assert ASHA().milestones(270) == pytest.approx([30, 90])
    assert ASHA(grace_period=10).milestones(270) == pytest.approx([10, 30, 90])
    assert ASHA(grace_period=100).milestones(1000) == pytest.approx([100, 300, 900])


async def test_asha_nine_trials_at_rung_zero_three_continue():
    """Trials reach rung 0 one after another with val_loss 3, 2, 1, 4, 5, ..., 9. Each is judged
    against the ones recorded before it: stopped when worse than their 33.3rd percentile (the
    66.7th of rewards). The first three improve on all before them; the other six do not."""
    spec = asha_spec(budget={"maxTrials": 20, "parallelTrials": 9})
    policy = ASHA()
    arrivals = [3.0, 2.0, 1.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    stopped: dict[str, str] = {}
    for count in range(1, len(arrivals) + 1):
        trials = [
            trial(
                f"t{i}",
                i,
                "Terminated" if f"t{i}" in stopped else "Running",
                hyperparameters=HP,
                step=30,
                history=[[30.0, value]],
                objective=value,
                best_objective=value,
            )
            for i, value in enumerate(arrivals[:count])
        ]
        for decision in by(await decide(policy, spec, status_of(spec, *trials)), "terminate"):
            assert decision.reason == "asha-rung"
            stopped[decision.trial] = decision.rationale
    assert sorted(stopped) == ["t3", "t4", "t5", "t6", "t7", "t8"]
    assert sorted(policy.rungs[30.0].values(), reverse=True) == [-value for value in sorted(arrivals)]
    # t3 (4.0) against 1, 2, 3: the 33.3rd percentile is 1 + 0.667 x (2 - 1) = 1.667.
    assert "val_loss 4 at step 30" in stopped["t3"] and "cutoff 1.667" in stopped["t3"]
    assert "33.3th percentile of the 3 trials recorded there" in stopped["t3"]


async def test_asha_promotion_at_a_higher_rung_and_a_trial_judged_at_the_highest_rung_it_reached():
    spec = asha_spec(budget={"maxTrials": 20, "parallelTrials": 6})
    policy = ASHA()
    # Three trials passed rung 1 (step 90) with 1.0, 1.2, 1.4: cutoff 1 + 0.667 x 0.2 = 1.133.
    ahead = [
        trial(f"r{i}", i, "Running", hyperparameters=HP, step=90, history=[[30.0, 2.0], [90.0, v]], objective=v)
        for i, v in enumerate([1.0, 1.2, 1.4])
    ]
    await decide(policy, spec, status_of(spec, *ahead))
    assert policy.rungs[30.0] and len(policy.rungs[90.0]) == 3
    late = [
        trial("x", 3, "Running", hyperparameters=HP, step=90, history=[[30.0, 1.5], [90.0, 1.3]], objective=1.3),
        trial("y", 4, "Running", hyperparameters=HP, step=90, history=[[30.0, 1.5], [90.0, 1.1]], objective=1.1),
        # First evaluated at step 100: judged at rung 1 only, never recorded at rung 0.
        trial("z", 5, "Running", hyperparameters=HP, step=100, history=[[100.0, 1.35]], objective=1.35),
    ]
    decisions = by(await decide(policy, spec, status_of(spec, *ahead, *late)), "terminate")
    assert [d.trial for d in decisions] == ["x", "z"]
    assert "cutoff 1.133" in decisions[0].rationale and "rung 1 (step 90" in decisions[0].rationale
    assert "z" not in policy.rungs[30.0] and "z" in policy.rungs[90.0]
    # y survived rung 0 (1.5 against 2.0 x 3: not the worst third) and rung 1 (1.1 <= 1.133).
    assert "y" in policy.rungs[30.0] and "y" in policy.rungs[90.0]


async def test_asha_maximize_keeps_the_highest():
    spec = asha_spec(objective={"direction": "maximize"}, budget={"maxTrials": 20, "parallelTrials": 4})
    policy = ASHA()
    trials = []
    for i, v in enumerate([0.5, 0.6, 0.7, 0.55]):
        trials.append(trial(f"t{i}", i, "Running", hyperparameters=HP, step=30, history=[[30.0, v]], objective=v))
        stops = by(await decide(policy, spec, status_of(spec, *trials)), "terminate")
        assert [d.trial for d in stops] == ([] if i < 3 else ["t3"])  # 0.55 < 0.633, the 66.7th percentile


# ---- PBT ------------------------------------------------------------------------------------


def member(name: str, index: int, value: float, checkpoint: int | None = 100, **fields) -> object:
    fields.setdefault("hyperparameters", dict(HP))
    return trial(
        name, index, "Running", step=100, objective=value, best_objective=value, checkpoint_step=checkpoint, **fields
    )


async def test_pbt_exploit_copies_a_top_trial_and_explores_by_0_8_or_1_2():
    spec = bench_spec(budget={"maxTrials": 20, "parallelTrials": 4})
    population = [member("a", 0, 2.0), member("b", 1, 2.5), member("c", 2, 3.0), member("d", 3, 3.5)]
    status = status_of(spec, *population)
    seen_values = set()
    for seed in range(12):
        decisions = await decide(PBT(seed, ready_steps=50), spec, status)
        assert [(d.action, d.trial, d.reason) for d in decisions] == [
            ("terminate", "d", "pbt-exploit"),
            ("launch", None, "pbt-explore"),
        ]
        child = decisions[1]
        assert (child.parent, child.resume_from) == ("a", "a")
        assert child.hyperparameters["lr"] in (pytest.approx(0.008), pytest.approx(0.012))
        assert child.hyperparameters["micro_batch"] in (4, 16)
        assert child.hyperparameters["warmup_steps"] in (8, 12)
        seen_values.add(tuple(sorted(child.hyperparameters.items())))
        assert "val_loss 3.5 at step 100 is in the bottom 25%" in decisions[0].rationale
        assert "checkpoint at step 100" in child.rationale and "lr 0.01 x " in child.rationale
    assert len(seen_values) > 3  # the factors and neighbours are drawn, per dimension


async def test_pbt_explore_clamps_into_the_space():
    spec = bench_spec(budget={"maxTrials": 20, "parallelTrials": 4})
    edge = {"lr": 1.0, "micro_batch": 32, "warmup_steps": 100}
    population = [
        member("a", 0, 2.0, hyperparameters=edge),
        member("b", 1, 2.5),
        member("c", 2, 3.0),
        member("d", 3, 3.5),
    ]
    outcomes = set()
    for seed in range(16):
        [_, child] = await decide(PBT(seed, ready_steps=50), spec, status_of(spec, *population))
        values = child.hyperparameters
        assert values["lr"] in (pytest.approx(0.8), 1.0) and values["micro_batch"] in (16, 32)
        assert values["warmup_steps"] in (80, 100) and in_space(spec, values)
        outcomes.add((values["lr"], values["micro_batch"], values["warmup_steps"]))
    assert sorted({round(lr, 9) for lr, _, _ in outcomes}) == [0.8, 1.0]


async def test_pbt_takes_a_top_quantile_winner_that_has_a_checkpoint():
    spec = bench_spec(budget={"maxTrials": 20, "parallelTrials": 8})
    # Eight members: bottom 2 (g, h), top 2 (a, b); a leads but has saved nothing yet.
    values = [2.0, 2.1, 2.5, 2.6, 2.7, 2.8, 3.4, 3.5]
    population = [member(chr(97 + i), i, v, checkpoint=None if i == 0 else 100) for i, v in enumerate(values)]
    for seed in range(6):
        decisions = await decide(PBT(seed, ready_steps=50), spec, status_of(spec, *population))
        assert [d.trial for d in by(decisions, "terminate")] == ["g", "h"]
        assert {(d.parent, d.resume_from) for d in by(decisions, "launch")} == {("b", "b")}
    nobody_saved = [member(chr(97 + i), i, v, checkpoint=None) for i, v in enumerate(values)]
    assert await decide(PBT(ready_steps=50), spec, status_of(spec, *nobody_saved)) == []


async def test_pbt_acts_only_on_ready_trials_and_within_max_trials():
    spec = bench_spec(budget={"maxTrials": 20, "parallelTrials": 4})
    population = [member("a", 0, 2.0), member("b", 1, 2.5), member("c", 2, 3.0)]
    # The worst resumed at step 80 and trained 20 steps only: not ready.
    child = member("d", 3, 3.5, resumed_from_step=80, parent="a")
    assert await decide(PBT(ready_steps=50), spec, status_of(spec, *population, child)) == []
    policy = PBT(ready_steps=50)
    ready = status_of(spec, *population, member("d", 3, 3.5))
    assert len(await decide(policy, spec, ready)) == 2
    # Ready again only 50 steps after that.
    assert await decide(policy, spec, ready) == []
    full = bench_spec(budget={"maxTrials": 4, "parallelTrials": 4})
    assert await decide(PBT(ready_steps=50), full, status_of(full, *population, member("d", 3, 3.5))) == []


async def test_pbt_refills_a_finished_members_slot_with_a_fresh_one_while_the_budget_lasts():
    spec = bench_spec(budget={"maxTrials": 4, "parallelTrials": 3})
    start = await decide(PBT(2), spec, status_of(spec))
    assert [d.reason for d in start] == ["pbt-population"] * 3
    assert [d.hyperparameters for d in start] == [
        d.hyperparameters for d in await decide(RandomSearch(2), spec, status_of(spec))
    ]
    one_left = status_of(spec, run("a", 0, [2.0], "Succeeded"), run("b", 1, [2.2], "Diverged"), run("c", 2, [2.1]))
    [refill] = await decide(PBT(2, ready_steps=500), spec, one_left)  # maxTrials 4: one more
    assert (refill.action, refill.reason, refill.parent) == ("launch", "pbt-population", None)
    done = status_of(
        spec,
        run("a", 0, [2.0], "Succeeded"),
        run("b", 1, [2.2], "Diverged"),
        run("c", 2, [2.1], "Succeeded"),
        run("d", 3, [2.3], "Succeeded"),
    )
    [complete] = await decide(PBT(2), spec, done)
    assert (complete.reason, complete.outcome) == ("budget-spent", "succeeded")


# ---- Optuna samplers, through the engine and its guardrails ---------------------------------


def bowl(point: dict[str, float]) -> float:
    """A val_loss with its minimum at lr 1e-2, warmup 30, micro_batch 16."""
    return (
        2.0
        + (math.log10(point["lr"]) + 2) ** 2
        + ((point["warmup_steps"] - 30) / 50) ** 2
        + 0.1 * abs(math.log2(point["micro_batch"] / 16))
    )


async def drive(policy, spec: AgentExperimentSpec, diverges=lambda point: False, cycles: int = 100):
    """Each launched trial finishes in the next cycle with val_loss bowl(values), or diverges.
    Returns the launches, in order, and the final status. Every proposal must execute."""
    status = status_of(spec)
    launched = []
    for cycle in range(cycles):
        now = at(60 * cycle)
        finishing = [
            seen(t.name, "Failed", exit_reason="diverged")
            if diverges(t.hyperparameters)
            else seen(t.name, "Succeeded", step=200, val_loss=bowl(t.hyperparameters))
            for t in status.active_trials
        ]
        observed = observation(*finishing, time=now)
        status = fold_observation(spec, status, observed, now)
        records, status = await plan(EXPERIMENT, spec, status, observed, policy, now)
        assert all(record.outcome == "executed" for record in records), [r.verdict for r in records]
        launched += [r.decision for r in records if r.decision.action == "launch"]
        if status.finished:
            return launched, status
    raise AssertionError("the experiment never finished")


@pytest.mark.parametrize("make", [TPE, CMAES])
async def test_samplers_are_deterministic_per_seed_and_stay_inside_the_space(make):
    spec = bench_spec(budget={"maxTrials": 12, "parallelTrials": 2})
    launches, status = await drive(make(seed=4), spec)
    points = [d.hyperparameters for d in launches]
    assert len(points) == 12 and all(in_space(spec, p) for p in points)
    assert points == [d.hyperparameters for d in (await drive(make(seed=4), spec))[0]]
    assert points != [d.hyperparameters for d in (await drive(make(seed=5), spec))[0]]
    assert status.phase == "Succeeded" and status.decisions[-1].reason == "budget-spent"


async def test_tpe_tells_unscored_trials_as_failed_and_models_the_space_after_startup():
    spec = bench_spec(budget={"maxTrials": 10, "parallelTrials": 2}, policy={"heuristic": {"startupTrials": 4}})
    policy = TPE(seed=1)
    launches, _ = await drive(policy, spec, diverges=lambda p: p["lr"] > 0.3)
    points = [d.hyperparameters for d in launches]
    states = [t.state.name for t in policy.search.study.trials]
    diverged = [p["lr"] > 0.3 for p in points]
    assert states == ["FAIL" if d else "COMPLETE" for d in diverged] and len(states) == 10
    values = [t.value for t in policy.search.study.trials if t.value is not None]
    assert values == [bowl(p) for p, d in zip(points, diverged, strict=True) if not d]


async def test_cmaes_carries_its_state_from_one_generation_to_the_next():
    spec = bench_spec(budget={"maxTrials": 14, "parallelTrials": 2})
    policy = CMAES(seed=0, popsize=4)
    launches, _ = await drive(policy, spec)
    search = policy.search
    generations = [search.system_attrs(t).get("cma:generation") for t in search.study.trials]
    # Trials 0 and 1 (asked together, before any was told) are the random start-up; then each
    # generation of 4 told trials moves the distribution the next generation is drawn from.
    assert generations[:2] == [None, None] and generations[2:6] == [0, 0, 0, 0]
    assert max(g for g in generations if g is not None) >= 2
    assert "independent RandomSampler (startup)" in launches[0].rationale
    assert "generation 0 for the ranges, its independent RandomSampler for values lists" in launches[2].rationale
    # A rebuilt study (core/suggest.py's way) would have lost that: CMA-ES would restart each cycle.
    assert len(search.study.trials) == len(launches) == 14


async def test_a_sampler_proposes_a_launch_the_guardrails_held_back_again_and_tells_foreign_trials():
    spec = bench_spec(budget={"maxTrials": 8, "parallelTrials": 2})
    policy = TPE(seed=3)
    first = by(await decide(policy, spec, status_of(spec)), "launch")
    assert by(await decide(policy, spec, status_of(spec)), "launch") == first  # nothing launched: the same two
    assert len(policy.search.study.trials) == 2
    # One of them launched, and a trial the study never asked for finished meanwhile.
    launched = trial("t0", 0, "Running", hyperparameters=first[1].hyperparameters)
    foreign = trial("t1", 1, "Succeeded", hyperparameters=HP, best_objective=2.5)
    again = by(await decide(policy, spec, status_of(spec, launched, foreign)), "launch")
    assert [d.hyperparameters for d in again] == [first[0].hyperparameters]  # the one never launched
    told = [(t.params, t.value) for t in policy.search.study.trials if t.state.name == "COMPLETE"]
    assert told == [({"lr": 0.01, "micro_batch": 8, "warmup_steps": 10}, 2.5)]
