"""The heuristic policy: each rule fires on the data it is for, and stays quiet on healthy runs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from tests.support.builders import NOW, context, healthy, heuristic, make_spec, observation, seen, status_of, trial
from trainpilot.api.experiment import SignOff
from trainpilot.core.policy import HeuristicPolicy
from trainpilot.core.policy.heuristic import count_reversals, plateau

HP = {"lr": 0.01, "weight_decay": 0.0}


def by(decisions, action=None, reason=None):
    return [d for d in decisions if (action is None or d.action == action) and (reason is None or d.reason == reason)]


async def test_healthy_trials_are_left_alone_and_free_slots_filled():
    spec = make_spec(budget={"parallelTrials": 3})
    decisions = await heuristic(spec, status_of(spec, healthy("a", 0), healthy("b", 1)))
    assert by(decisions, "terminate") == [] and by(decisions, "complete") == []
    [launch] = by(decisions, "launch")
    assert launch.reason == "suggested" and "1 launch slot(s) free" in launch.rationale
    assert all(d.rationale and d.policy == "heuristic" for d in decisions)


async def test_initial_trials_are_launched_first():
    spec = make_spec(initialTrials=[{"lr": 0.5, "weight_decay": 0.0}, {"lr": 0.003, "weight_decay": 0.01}])
    decisions = await heuristic(spec, status_of(spec))
    assert [d.reason for d in decisions] == ["initial-trial", "initial-trial"]
    assert [d.hyperparameters for d in decisions] == [
        {"lr": 0.5, "weight_decay": 0.0},
        {"lr": 0.003, "weight_decay": 0.01},
    ]
    assert "spec.initialTrials[1]" in decisions[1].rationale


# ---- 1. divergence --------------------------------------------------------------------------


async def test_divergence_terminates_and_relaunches_with_lower_lr_from_the_checkpoint():
    spec = make_spec()
    status = status_of(
        spec,
        healthy("a", 0, hyperparameters={"lr": 0.5, "weight_decay": 0.02}, nonfinite_losses=1, checkpoint_step=100),
    )
    decisions = await heuristic(spec, status)
    [stop] = by(decisions, "terminate")
    assert (stop.trial, stop.reason) == ("a", "nonfinite-loss")
    [relaunch] = by(decisions, "launch", "relaunch-after-divergence")
    assert relaunch.hyperparameters == {"lr": pytest.approx(0.05), "weight_decay": 0.02}
    assert (relaunch.parent, relaunch.resume_from) == ("a", "a")
    assert "0.5 x 0.1" in relaunch.rationale and "step 100" in relaunch.rationale


async def test_finished_diverged_trial_is_relaunched_once_from_scratch_without_checkpoint():
    spec = make_spec()
    diverged = trial("a", 0, "Diverged", hyperparameters={"lr": 0.3, "weight_decay": 0.0})
    [relaunch, *_] = by(await heuristic(spec, status_of(spec, diverged)), "launch")
    assert relaunch.reason == "relaunch-after-divergence" and relaunch.resume_from is None
    assert relaunch.hyperparameters["lr"] == pytest.approx(0.03)
    # Once its child exists, nothing more.
    child = trial("b", 1, "Running", parent="a", hyperparameters={"lr": 0.03, "weight_decay": 0.0})
    decisions = await heuristic(spec, status_of(spec, diverged, child))
    assert by(decisions, reason="relaunch-after-divergence") == []


async def test_relaunch_lr_is_clamped_into_the_space():
    spec = make_spec()  # lr in [1e-4, 1]
    diverged = trial("a", 0, "Diverged", hyperparameters={"lr": 3e-4, "weight_decay": 0.0})
    [relaunch, *_] = by(await heuristic(spec, status_of(spec, diverged)), "launch")
    assert relaunch.hyperparameters["lr"] == pytest.approx(1e-4)
    # At the floor already: a lower lr is impossible, so the relaunch takes a fresh suggestion.
    floor = trial("a", 0, "Diverged", hyperparameters={"lr": 1e-4, "weight_decay": 0.0})
    [relaunch, *_] = by(await heuristic(spec, status_of(spec, floor)), "launch")
    assert relaunch.parent == "a" and "lowest allowed" in relaunch.rationale
    assert spec.parameter("lr").contains(relaunch.hyperparameters["lr"])


async def test_relaunches_per_lineage_are_limited():
    spec = make_spec(policy={"heuristic": {"maxRelaunches": 2}}, budget={"maxFailedTrials": 0})
    chain = [
        trial("a", 0, "Diverged", hyperparameters={"lr": 0.9, "weight_decay": 0.0}),
        trial("b", 1, "Diverged", parent="a", hyperparameters={"lr": 0.09, "weight_decay": 0.0}),
    ]
    [relaunch, *_] = by(await heuristic(spec, status_of(spec, *chain)), "launch")
    assert relaunch.parent == "b" and "relaunch 2 of 2" in relaunch.rationale
    chain.append(trial("c", 2, "Diverged", parent="b", hyperparameters={"lr": 0.009, "weight_decay": 0.0}))
    decisions = await heuristic(spec, status_of(spec, *chain))
    assert by(decisions, reason="relaunch-after-divergence") == []


async def test_nan_objective_counts_as_divergence_only_after_a_first_evaluation():
    spec = make_spec()
    before_eval = trial("a", 0, "Running", step=5)
    nan_seen = observation(seen("a", step=5, val_loss=math.nan))
    assert by(await heuristic(spec, status_of(spec, before_eval), nan_seen), "terminate") == []
    after_eval = healthy("a", 0)
    [stop] = by(await heuristic(spec, status_of(spec, after_eval), nan_seen), "terminate")
    assert stop.reason == "nonfinite-loss" and "val_loss is nan" in stop.rationale
    inf_seen = observation(seen("a", step=5, val_loss=math.inf))
    assert by(await heuristic(spec, status_of(spec, before_eval), inf_seen), "terminate", "nonfinite-loss")


async def test_a_trainer_that_resumed_a_checkpoint_is_not_diverged_before_its_first_evaluation_in_the_new_process():
    """After a Kueue preemption or an eviction, the pod resumes its checkpoint: NaN with
    trainpilot_eval_step -1 until it measures again, though the trial has a history."""
    spec = make_spec()
    resumed = healthy("a", 0)
    assert resumed.history
    waiting = observation(seen("a", step=105, val_loss=math.nan, eval_step=-1))
    assert by(await heuristic(spec, status_of(spec, resumed), waiting), "terminate") == []
    measured = observation(seen("a", step=150, val_loss=math.nan, eval_step=150))
    [stop] = by(await heuristic(spec, status_of(spec, resumed), measured), "terminate")
    assert stop.reason == "nonfinite-loss"


# ---- 2. loss spike --------------------------------------------------------------------------


async def test_loss_spike_is_terminated():
    spec = make_spec()  # spikeFactor 3
    status = status_of(spec, healthy("a", smoothed_train_loss=6.5, best_train_loss=2.0))
    [stop] = by(await heuristic(spec, status), "terminate")
    assert stop.reason == "loss-spike" and "6.5" in stop.rationale and "3.25x" in stop.rationale


async def test_loss_spike_is_relaunched_with_a_lower_lr_from_the_checkpoint_before_it():
    spec = make_spec()  # divergenceLrFactor 0.1
    spiking = healthy(
        "a", 0, smoothed_train_loss=6.5, best_train_loss=2.0, checkpoint_step=40, unstable_since=45, step=50
    )
    decisions = await heuristic(spec, status_of(spec, spiking))
    [relaunch] = by(decisions, "launch", "relaunch-after-divergence")
    assert relaunch.hyperparameters["lr"] == pytest.approx(0.001) and relaunch.parent == "a"
    assert relaunch.resume_from == "a" and "checkpoint at step 40" in relaunch.rationale
    assert "3.25x" in relaunch.rationale  # the symptom, quoted


async def test_loss_spike_checkpointed_after_the_first_bad_sign_relaunches_from_scratch():
    spec = make_spec()
    spiking = healthy(
        "a", 0, smoothed_train_loss=6.5, best_train_loss=2.0, checkpoint_step=50, unstable_since=45, step=55
    )
    [relaunch] = by(await heuristic(spec, status_of(spec, spiking)), "launch", "relaunch-after-divergence")
    assert relaunch.resume_from is None
    assert "from scratch" in relaunch.rationale and "after the first bad sign at step 45" in relaunch.rationale


async def test_a_trial_stopped_for_a_spike_is_relaunched_later_and_counts_against_max_relaunches():
    spec = make_spec(policy={"heuristic": {"maxRelaunches": 1}})
    stopped = trial("a", 0, "Terminated", message="loss-spike", checkpoint_step=20, unstable_since=30)
    [relaunch] = by(await heuristic(spec, status_of(spec, stopped)), "launch", "relaunch-after-divergence")
    assert "stopped on a loss spike" in relaunch.rationale and relaunch.resume_from == "a"
    child = trial("b", 1, "Terminated", message="loss-spike", parent="a", hyperparameters={"lr": 0.001})
    decisions = await heuristic(spec, status_of(spec, stopped, child))
    assert by(decisions, "launch", "relaunch-after-divergence") == []  # maxRelaunches 1 is used up


async def test_a_spike_the_trainer_saw_between_two_scrapes_stops_the_trial_at_once():
    """The scraped EMA is still below spikeFactor x best (one sample per cycle); the trainer's
    counter, kept at every step, says it spiked."""
    spec = make_spec()  # spikeFactor 3
    spiking = healthy("a", 0, smoothed_train_loss=2.4, best_train_loss=2.0, loss_spikes=2, step=50)
    decisions = await heuristic(spec, status_of(spec, spiking))
    [stop] = by(decisions, "terminate")
    assert stop.reason == "loss-spike" and "the trainer saw 2 step(s)" in stop.rationale
    assert by(decisions, "launch", "relaunch-after-divergence")  # relaunched lower, like any spike


async def test_loss_below_the_spike_factor_is_fine():
    spec = make_spec()
    status = status_of(spec, healthy("a", smoothed_train_loss=5.9, best_train_loss=2.0))
    assert by(await heuristic(spec, status), "terminate") == []


# ---- 3. oscillation -------------------------------------------------------------------------


def points(*values: float) -> list[list[float]]:
    return [[float(10 * i), value] for i, value in enumerate(values)]


async def test_oscillating_validation_loss_is_terminated():
    spec = make_spec()  # window 6, 4 reversals, 5% amplitude
    status = status_of(spec, healthy("a", history=points(2.0, 2.4, 1.9, 2.5, 1.8, 2.6)))
    [stop] = by(await heuristic(spec, status), "terminate")
    assert stop.reason == "oscillating-val-loss" and "4 times" in stop.rationale


@pytest.mark.parametrize(
    "values",
    [
        (2.0, 2.01, 1.99, 2.0, 1.98, 2.0),  # noise below the amplitude
        (3.0, 2.6, 2.7, 2.3, 2.2, 2.0),  # one bump on the way down
        (2.0, 2.4, 1.9, 2.5),  # too few points
    ],
)
async def test_noise_and_bumps_are_not_oscillation(values):
    spec = make_spec()
    status = status_of(spec, healthy("a", history=points(*values)))
    assert by(await heuristic(spec, status), "terminate") == []


def test_count_reversals():
    assert count_reversals([1.0, 2.0, 1.0, 2.0], 0.05) == (2, 1.0)
    assert count_reversals([1.0, 0.9, 0.8], 0.05)[0] == 0


# ---- 4. ASHA rungs --------------------------------------------------------------------------


async def test_asha_stops_running_trials_outside_the_top_fraction():
    spec = make_spec(budget={"parallelTrials": 4})  # max_steps 200, rung 0.25 -> step 50, eta 3
    status = status_of(
        spec,
        trial("best", 0, "Succeeded", step=200, rung_objectives={"50": 2.0}, best_objective=1.5),
        healthy("mid", 1, step=60, rung_objectives={"50": 2.5}),
        healthy("bad", 2, step=60, rung_objectives={"50": 3.0}),
        healthy("fresh", 3, step=20),
    )
    stops = by(await heuristic(spec, status), "terminate", "asha-rung")
    assert [stop.trial for stop in stops] == ["mid", "bad"]
    assert "3 at rung 0.25 (step 50)" in stops[1].rationale and "best 1 of 3" in stops[1].rationale
    assert "cutoff 2" in stops[1].rationale


async def test_asha_waits_for_enough_peers_and_keeps_the_leader():
    spec = make_spec()
    alone = status_of(spec, healthy("a", 0, step=60, rung_objectives={"50": 9.0}), healthy("b", 1, step=20))
    assert by(await heuristic(spec, alone), "terminate") == []
    pair = status_of(
        spec,
        healthy("a", 0, step=60, rung_objectives={"50": 2.0}),
        healthy("b", 1, step=60, rung_objectives={"50": 2.0}),
    )
    assert by(await heuristic(spec, pair), "terminate") == []  # a tie at the cutoff survives


async def test_asha_judges_a_trial_at_its_latest_rung_only():
    spec = make_spec(budget={"parallelTrials": 3})
    status = status_of(
        spec,
        # Promoted past rung 100 before better peers arrived at rung 50: not demoted.
        healthy("early", 0, step=120, rung_objectives={"50": 2.6, "100": 2.1}),
        trial("b", 1, "Terminated", rung_objectives={"50": 2.0}),
        trial("c", 2, "Terminated", rung_objectives={"50": 2.1}),
    )
    assert by(await heuristic(spec, status), "terminate") == []


async def test_a_rung_loser_is_replaced_by_a_perturbed_child_of_the_best_trial_there_from_its_checkpoint():
    spec = make_spec(
        budget={"parallelTrials": 3},
        searchSpace=[
            {"name": "lr", "min": 1e-4, "max": 1.0, "log": True},
            {"name": "micro_batch", "values": [4, 8, 16]},
            {"name": "warmup_steps", "min": 0, "max": 100},
        ],
    )
    hp = {"lr": 0.01, "micro_batch": 8, "warmup_steps": 50}
    status = status_of(
        spec,
        healthy("lead", 0, step=80, checkpoint_step=75, rung_objectives={"50": 2.0}, hyperparameters=hp),
        healthy("mid", 1, step=60, rung_objectives={"50": 2.5}, hyperparameters=hp),
        healthy("bad", 2, step=60, checkpoint_step=50, rung_objectives={"50": 3.0}, hyperparameters=hp),
    )
    decisions = await heuristic(spec, status)
    assert [(d.action, d.reason, d.trial) for d in decisions if d.action == "terminate"] == [
        ("terminate", "asha-rung", "mid"),
        ("terminate", "asha-rung", "bad"),
    ]
    exploits = by(decisions, "launch", "pbt-exploit")
    assert len(exploits) == 2 and by(decisions, "launch", "suggested") == []
    for child in exploits:
        assert (child.parent, child.resume_from) == ("lead", "lead")
        values = child.hyperparameters
        assert values["lr"] in (pytest.approx(0.008), pytest.approx(0.012))
        assert values["micro_batch"] in (4, 16)  # a listed choice moves to a neighbour
        assert values["warmup_steps"] in (40, 60)
        assert "exploit lead" in child.rationale and "checkpoint at step 75" in child.rationale
    # The draws are seeded per loser: the same status gives the same children.
    assert exploits == by(await heuristic(spec, status), "launch", "pbt-exploit")


async def test_no_exploit_without_a_checkpoint_to_resume_or_when_switched_off():
    spec = make_spec(budget={"parallelTrials": 3})
    status = status_of(
        spec,
        healthy("lead", 0, step=80, rung_objectives={"50": 2.0}),  # no checkpoint yet
        healthy("mid", 1, step=60, rung_objectives={"50": 2.5}),
        healthy("bad", 2, step=60, rung_objectives={"50": 3.0}),
    )
    decisions = await heuristic(spec, status)
    assert by(decisions, "launch", "pbt-exploit") == [] and len(by(decisions, "launch", "suggested")) == 2
    finished = status.model_copy(deep=True)  # its last checkpoint has no steps left to train
    finished.trials[0] = trial("lead", 0, "Succeeded", step=200, checkpoint_step=200, rung_objectives={"50": 2.0})
    assert by(await heuristic(spec, finished), "launch", "pbt-exploit") == []
    deleted = status.model_copy(deep=True)  # spec.retention deleted its checkpoints
    deleted.trials[0] = healthy(
        "lead", 0, step=80, checkpoint_step=75, rung_objectives={"50": 2.0}, removed=["checkpoints"]
    )
    assert by(await heuristic(spec, deleted), "launch", "pbt-exploit") == []
    off = make_spec(budget={"parallelTrials": 3}, policy={"heuristic": {"exploit": False}})
    status.trials[0].checkpoint_step = 75
    decisions = await heuristic(off, status)
    assert by(decisions, "launch", "pbt-exploit") == [] and len(by(decisions, "launch", "suggested")) == 2


# ---- population exploit (PBT's truncation selection among the running trials) ---------------


def pbt_spec(**heuristic_settings: object):
    # max_steps 200: exploitInterval 0.2 is 40 steps of a trial's own; no rungs, so only this rule stops
    return make_spec(budget={"parallelTrials": 4}, policy={"heuristic": {"rungs": [], **heuristic_settings}})


async def test_the_bottom_running_trial_exploits_the_best_ones_checkpoint_once_it_trained_an_interval():
    spec = pbt_spec()
    status = status_of(
        spec,
        healthy("lead", 0, step=90, objective=2.0, checkpoint_step=75),
        healthy("second", 1, step=80, objective=2.3, checkpoint_step=75),
        healthy("third", 2, step=70, objective=2.4, checkpoint_step=50),
        healthy("last", 3, step=60, objective=2.9, checkpoint_step=50),
    )
    decisions = await heuristic(spec, status)
    # exploitQuantile 0.25 of 4 running: one bottom trial, one top
    [stop] = by(decisions, "terminate")
    assert (stop.trial, stop.reason) == ("last", "pbt-exploit")
    assert "bottom 1 of 4 running trials" in stop.rationale and "exploitInterval 0.2 x max_steps = 40" in stop.rationale
    [child] = by(decisions, "launch", "pbt-exploit")
    assert (child.parent, child.resume_from) == ("lead", "lead") and "checkpoint at step 75" in child.rationale
    assert child.hyperparameters["lr"] in (pytest.approx(0.008), pytest.approx(0.012))
    assert decisions == await heuristic(spec, status)  # seeded: the same status decides the same


async def test_no_population_exploit_before_the_interval_without_a_checkpoint_or_when_off():
    spec = pbt_spec()
    lead = healthy("lead", 0, step=90, objective=2.0, checkpoint_step=75)
    young = healthy("young", 1, step=30, objective=2.9)  # 30 of its own steps < 40
    assert by(await heuristic(spec, status_of(spec, lead, young)), "terminate") == []
    child = healthy("child", 1, step=130, objective=2.9, resumed_from_step=100, parent="other")  # 30 since it resumed
    assert by(await heuristic(spec, status_of(spec, lead, child)), "terminate") == []
    unsaved = healthy("lead", 0, step=90, objective=2.0)  # nothing to resume
    old = healthy("old", 1, step=80, objective=2.9)
    assert by(await heuristic(spec, status_of(spec, unsaved, old)), "terminate") == []
    for off in (pbt_spec(exploitInterval=0), pbt_spec(exploit=False)):
        assert by(await heuristic(off, status_of(off, lead, old)), "terminate") == []
    # no launch left (maxTrials): nothing could take its place, so it trains on
    spent = make_spec(budget={"maxTrials": 2, "parallelTrials": 2}, policy={"heuristic": {"rungs": []}})
    assert by(await heuristic(spent, status_of(spent, lead, old)), "terminate") == []
    # a child of the leader copies it again only from a newer checkpoint than the one it came from
    copy = healthy("copy", 1, step=120, objective=2.9, resumed_from_step=75, parent="lead")
    assert by(await heuristic(spec, status_of(spec, lead, copy)), "terminate") == []
    newer = healthy("lead", 0, step=130, objective=2.0, checkpoint_step=125)
    [stop] = by(await heuristic(spec, status_of(spec, newer, copy)), "terminate")
    assert stop.trial == "copy"


# ---- 5. plateau -----------------------------------------------------------------------------

FLAT = points(3.0, 2.5, 2.3, 2.31, 2.305, 2.302, 2.301)  # best 2.3, then four evaluations no better


async def test_a_plateau_first_cuts_the_lr_in_place():
    spec = make_spec()
    status = status_of(spec, healthy("a", 0, step=70, history=FLAT, objective=2.301, best_objective=2.3))
    [cut] = by(await heuristic(spec, status), "mutate")
    assert (cut.reason, cut.mode, cut.trial, cut.hyperparameters) == ("plateau-lr-cut", "in-place", "a", {"lr": 0.005})
    assert "last 4 evaluations, 2.301, does not improve on 2.3" in cut.rationale
    assert "lr 0.01 x 0.5 = 0.005 in place (change 1 of maxLrCuts 1)" in cut.rationale


async def test_after_the_cut_a_trial_still_stuck_for_as_many_evaluations_is_stopped():
    spec = make_spec()
    # Cut at step 60 (the 7th point); judged only on evaluations after it.
    after = points(3.0, 2.5, 2.3, 2.31, 2.305, 2.302, 2.301, 2.31, 2.305, 2.303)
    cut = dict(control_generation=1, changed_at_step=60, hyperparameters={"lr": 0.005, "weight_decay": 0.0})
    too_soon = status_of(spec, healthy("a", 0, step=100, history=after, best_objective=2.3, **cut))
    assert by(await heuristic(spec, too_soon), "terminate") == []  # 3 evaluations since the cut
    stuck = status_of(spec, healthy("a", 0, step=110, history=[*after, [110.0, 2.302]], best_objective=2.3, **cut))
    [stop] = by(await heuristic(spec, stuck), "terminate")
    assert stop.reason == "stagnated" and "after 1 in-place change(s) (maxLrCuts 1)" in stop.rationale
    better = status_of(spec, healthy("a", 0, step=110, history=[*after, [110.0, 2.25]], best_objective=2.25, **cut))
    assert by(await heuristic(spec, better), "terminate") == []


async def test_a_plateau_stops_the_trial_when_the_lr_cannot_be_cut_and_nothing_when_switched_off():
    no_mutate = make_spec(policy={"allowedActions": ["launch", "terminate", "complete"]})
    status = status_of(no_mutate, healthy("a", 0, step=70, history=FLAT, best_objective=2.3))
    assert [d.reason for d in by(await heuristic(no_mutate, status), "terminate")] == ["stagnated"]
    off = make_spec(policy={"heuristic": {"stagnationEvaluations": 0}})
    assert by(await heuristic(off, status_of(off, healthy("a", 0, history=FLAT))), "terminate") == []
    assert by(await heuristic(off, status_of(off, healthy("a", 0, history=FLAT))), "mutate") == []


def test_plateau_compares_the_recent_window_with_the_best_before_it():
    assert plateau(FLAT, None, 4, 0.002, "minimize") == (2.3, 2.301)
    assert plateau(FLAT, None, 4, 0.0, "minimize") == (2.3, 2.301)  # no gain at all is a plateau
    assert plateau(points(3.0, 2.5, 2.3, 2.2, 2.1), None, 4, 0.002, "minimize") is None
    assert plateau(FLAT[:4], None, 4, 0.002, "minimize") is None  # nothing before the window
    assert plateau(FLAT, 40, 4, 0.002, "minimize") is None  # the window starts at or before the change
    rising = points(0.5, 0.7, 0.8, 0.79, 0.8, 0.8, 0.8)
    assert plateau(rising, None, 4, 0.002, "maximize") == (0.8, 0.8)


# ---- scaling the leader ----------------------------------------------------------------------


def leading(spec, lead_objective=2.0, **lead):
    return status_of(
        spec,
        healthy("lead", 0, best_objective=lead_objective, checkpoint_step=40, **lead),
        trial("b", 1, "Terminated", best_objective=2.2),
        trial("c", 2, "Succeeded", best_objective=2.3),
    )


async def test_a_clear_leader_gets_the_idle_slot_as_nodes_once_no_trial_can_be_launched():
    spec = make_spec(budget={"maxTrials": 3}, policy={"heuristic": {"scaleLeaderNodes": 2}})
    [scale] = by(await heuristic(spec, leading(spec)), "scale")
    assert (scale.trial, scale.nodes, scale.reason) == ("lead", 2, "scale-leader")
    assert "0.2 ahead of the next best 2.2 (scaleLead 2.0%)" in scale.rationale and "1 -> 2 node(s)" in scale.rationale


async def test_no_scale_when_switched_off_close_behind_zero_3_already_scaled_or_a_trial_can_still_be_launched():
    on = {"policy": {"heuristic": {"scaleLeaderNodes": 2}}}
    spec = make_spec(budget={"maxTrials": 3}, **on)
    assert by(await heuristic(make_spec(budget={"maxTrials": 3}), leading(spec)), "scale") == []  # default: off
    assert by(await heuristic(spec, leading(spec, lead_objective=2.19)), "scale") == []  # 0.5% ahead only
    assert by(await heuristic(spec, leading(spec, nodes=2)), "scale") == []
    zero3 = make_spec(budget={"maxTrials": 3}, trialTemplate={"hyperparameters": {"zero_stage": 3}}, **on)
    assert by(await heuristic(zero3, leading(zero3)), "scale") == []
    room = make_spec(budget={"maxTrials": 4}, **on)
    decisions = await heuristic(room, leading(room))
    assert by(decisions, "scale") == [] and len(by(decisions, "launch")) == 1


# ---- 6. finish ------------------------------------------------------------------------------


async def test_goal_reached_completes_and_stops_the_rest():
    spec = make_spec(objective={"goal": 1.6})
    status = status_of(spec, trial("a", 0, "Succeeded", best_objective=1.55), healthy("b", 1))
    decisions = await heuristic(spec, status)
    assert [(d.action, d.trial, d.reason) for d in decisions] == [
        ("terminate", "b", "experiment-complete"),
        ("complete", None, "goal-reached"),
    ]
    assert decisions[-1].outcome == "succeeded" and "1.55" in decisions[-1].rationale


async def test_goal_not_reached_does_not_complete():
    spec = make_spec(objective={"goal": 1.0})
    status = status_of(spec, trial("a", 0, "Succeeded", best_objective=1.55))
    assert by(await heuristic(spec, status), "complete") == []


async def test_too_many_failures_fails_the_experiment():
    spec = make_spec(budget={"maxFailedTrials": 1})
    tolerated = status_of(spec, trial("a", 0, "Failed"), trial("b", 1, "Diverged"), healthy("c", 2))
    assert not [
        d for d in await heuristic(spec, tolerated) if d.action == "complete"
    ]  # 1 crash, diverged ones don't count
    status = status_of(spec, trial("a", 0, "Failed"), trial("b", 1, "Failed"), healthy("c", 2))
    decisions = await heuristic(spec, status)
    assert decisions[-1].action == "complete" and decisions[-1].outcome == "failed"
    assert decisions[-1].reason == "too-many-failures" and "maxFailedTrials 1" in decisions[-1].rationale
    assert by(decisions, "launch") == []


async def test_budget_spent_completes_once_nothing_runs():
    spec = make_spec(budget={"maxTrials": 2, "parallelTrials": 2})
    running = status_of(spec, trial("a", 0, "Succeeded", best_objective=2.0), healthy("b", 1))
    assert await heuristic(spec, running) == []  # waits for b; no launch either
    done = status_of(spec, trial("a", 0, "Succeeded", best_objective=2.0), trial("b", 1, "Terminated"))
    [complete] = await heuristic(spec, done)
    assert (complete.reason, complete.outcome) == ("budget-spent", "succeeded")
    nothing = status_of(spec, trial("a", 0, "Failed"), trial("b", 1, "Terminated"))
    assert (await heuristic(spec, nothing))[0].outcome == "failed"


async def test_gpu_hours_spent_stops_running_trials_too():
    spec = make_spec(budget={"maxGPUHours": 1.0})
    status = status_of(spec, healthy("a", 0, gpu_seconds=3700.0, best_objective=2.0))
    decisions = await heuristic(spec, status)
    assert [(d.action, d.reason) for d in decisions] == [
        ("terminate", "experiment-complete"),
        ("complete", "budget-spent"),
    ]


async def test_trial_steps_spent_completes_once_the_rest_cannot_pay_for_a_trial_and_nothing_runs():
    spec = make_spec(budget={"maxTrialSteps": 500}, trialTemplate={"hyperparameters": {"max_steps": 200}})
    running = status_of(spec, trial("a", 0, "Succeeded", step=200, best_objective=2.0), healthy("b", 1, step=50))
    assert await heuristic(spec, running) == []  # 100 left after b's 200: not a trial; waits for b
    stopped = status_of(
        spec, trial("a", 0, "Succeeded", step=200, best_objective=2.0), trial("b", 1, "Terminated", step=50)
    )
    [launch] = await heuristic(spec, stopped)  # b stopped at 50: 250 left, one more trial
    assert launch.action == "launch"
    done = status_of(
        spec, trial("a", 0, "Succeeded", step=200, best_objective=2.0), trial("b", 1, "Terminated", step=150)
    )
    [complete] = await heuristic(spec, done)
    assert (complete.reason, complete.outcome) == ("budget-spent", "succeeded")
    assert "350 trial-steps used (maxTrialSteps 500): 150 left, less than a trial's 200" in complete.rationale


# ---- 6. launch ------------------------------------------------------------------------------


async def test_a_slot_freed_this_cycle_is_refilled_relaunches_first():
    spec = make_spec(budget={"parallelTrials": 2})
    status = status_of(
        spec,
        healthy("a", 0, hyperparameters={"lr": 0.5, "weight_decay": 0.0}, nonfinite_losses=3),
        healthy("b", 1, smoothed_train_loss=9.0, best_train_loss=2.0),
    )
    decisions = await heuristic(spec, status)
    assert [(d.action, d.reason) for d in decisions] == [
        ("terminate", "nonfinite-loss"),
        ("terminate", "loss-spike"),
        ("launch", "relaunch-after-divergence"),
        ("launch", "relaunch-after-divergence"),  # a loss spike is a divergence too
    ]
    assert [d.parent for d in decisions[2:]] == ["a", "b"]


async def test_launches_respect_the_quota():
    spec = make_spec(budget={"parallelTrials": 4}, trialTemplate={"gpusPerNode": 1})
    decisions = await heuristic(spec, status_of(spec), limits=SimpleNamespace(max_gpus=1))
    assert len(by(decisions, "launch")) == 1


# ---- never proposing what cannot happen -----------------------------------------------------


async def test_disallowed_actions_are_not_proposed():
    spec = make_spec(policy={"allowedActions": ["launch"]})
    status = status_of(spec, healthy("a", 0, nonfinite_losses=2, hyperparameters={"lr": 0.5, "weight_decay": 0.0}))
    decisions = await heuristic(spec, status)
    # No terminate, and no relaunch while the diverging trial still runs.
    assert [d.reason for d in decisions] == ["suggested"]


@pytest.mark.parametrize(("state", "proposed"), [("Pending", False), ("Rejected", False), ("Expired", True)])
async def test_a_decision_awaiting_approval_or_rejected_by_a_human_is_not_proposed_again(state, proposed):
    spec = make_spec()
    held = SignOff(
        id="exp-d00000",
        action="terminate",
        trial="a",
        policy="heuristic",
        reason="loss-spike",
        held_at=NOW,
        expires_at=NOW,
        state=state,
    )
    status = status_of(spec, healthy("a", 0, smoothed_train_loss=9.0, best_train_loss=2.0), sign_offs=[held])
    # Expired: nobody said no, so it may be held again.
    assert bool(by(await heuristic(spec, status), "terminate")) is proposed


async def test_explicit_settings_override_the_spec():
    spec = make_spec()
    status = status_of(spec, healthy("a", smoothed_train_loss=2.5, best_train_loss=2.0))
    settings = spec.policy.heuristic.model_copy(update={"spike_factor": 1.1})
    decisions = await HeuristicPolicy(settings).decide(context(spec, status))
    assert by(decisions, "terminate", "loss-spike")


def test_a_suggestion_names_the_one_sampler_that_chose_it():
    from trainpilot.core.policy.heuristic import suggestion_words

    early = suggestion_words(scored=2, startup_trials=4)
    assert early == "Optuna random sample (2 of the 4 scored trials TPE starts from)" and "TPE suggestion" not in early
    late = suggestion_words(scored=5, startup_trials=4)
    assert late == "Optuna TPE suggestion from 5 scored trials" and "random" not in late


async def test_asha_compares_only_trials_scored_on_the_same_validation_set():
    spec = make_spec(budget={"parallelTrials": 4})
    same, other = "0000000000aa", "0000000000bb"
    status = status_of(
        spec,
        healthy("a", 0, step=60, rung_objectives={"50": 2.0}, validation_fingerprint=same),
        healthy("b", 1, step=60, rung_objectives={"50": 2.0}, validation_fingerprint=same),
        healthy("elsewhere", 2, step=60, rung_objectives={"50": 1.0}, validation_fingerprint=other),
    )
    # elsewhere's 1.0 was measured on other data: counted as a peer it would stop a and b (cutoff
    # 1.0); among the comparable two, a tie at the cutoff survives. elsewhere is not judged either.
    assert by(await heuristic(spec, status), "terminate") == []
    comparable = status.model_copy(deep=True)
    comparable.trials[2].validation_fingerprint = same
    assert [stop.trial for stop in by(await heuristic(spec, comparable), "terminate", "asha-rung")] == ["a", "b"]
