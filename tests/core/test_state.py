"""fold_observation and apply_record: status moves forward from plain data, and only once."""

from __future__ import annotations

import math

import pytest

from tests.support.builders import EXPERIMENT, NOW, at, make_spec, observation, seen, status_of, trial
from trainpilot.api.experiment import MAX_STATUS_DECISIONS, MAX_TRIAL_HISTORY, AgentExperimentStatus
from trainpilot.core.decision import Decision, DecisionRecord, decision_id
from trainpilot.core.state import apply_record, fold_observation


def fold(spec, status, *observed, time=NOW):
    return fold_observation(spec, status, observation(*observed, time=time), time)


def record(seq: int, decision: Decision, outcome="executed", new_trial=None) -> DecisionRecord:
    return DecisionRecord(
        id=decision_id(EXPERIMENT, seq),
        seq=seq,
        time=NOW,
        experiment=EXPERIMENT,
        decision=decision,
        outcome=outcome,
        new_trial=new_trial,
    )


def launch(**fields) -> Decision:
    fields.setdefault("hyperparameters", {"lr": 0.01, "weight_decay": 0.0})
    return Decision(action="launch", policy="test", reason="test", **fields)


# ---- fold_observation: phases ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "exit_reason", "expected"),
    [
        ("Pending", None, "Pending"),
        ("Running", None, "Running"),
        ("Succeeded", "completed", "Succeeded"),
        ("Failed", "diverged", "Diverged"),
        ("Failed", "crashed", "Failed"),
        ("Missing", None, "Failed"),
    ],
)
def test_runtime_phase_maps_to_trial_state(phase, exit_reason, expected):
    spec = make_spec()
    status = status_of(spec, trial("t0", state="Pending"))
    folded = fold(spec, status, seen("t0", phase, exit_reason))
    assert folded.trials[0].state == expected
    if expected in ("Failed", "Diverged", "Succeeded"):
        assert folded.trials[0].finished_at == NOW
    if phase == "Missing":
        assert "disappeared" in folded.trials[0].message


def test_terminated_trial_stays_terminated_when_its_process_exits():
    spec = make_spec()
    status = status_of(spec, trial("t0", state="Terminated", message="asha-rung", step=40))
    folded = fold(spec, status, seen("t0", "Failed", "terminated", step=55))
    assert folded.trials[0].state == "Terminated"
    assert folded.trials[0].step == 40


def test_fold_returns_a_copy():
    spec = make_spec()
    status = status_of(spec, trial("t0"))
    fold(spec, status, seen("t0", step=10, val_loss=2.0))
    assert status.trials[0].step == 0 and status.trials[0].objective is None


def test_started_at_set_once_running():
    spec = make_spec()
    status = status_of(spec, trial("t0", state="Pending"))
    status = fold(spec, status, seen("t0", "Pending"), time=at(10))
    assert status.trials[0].started_at is None
    status = fold(spec, status, seen("t0", "Running"), time=at(20))
    status = fold(spec, status, seen("t0", "Running"), time=at(30))
    assert status.trials[0].started_at == at(20)


# ---- fold_observation: metrics --------------------------------------------------------------


def test_metrics_are_copied():
    spec = make_spec()
    status = status_of(spec, trial("t0"))
    folded = fold(
        spec,
        status,
        seen(
            "t0",
            step=120,
            train_loss=2.5,
            val_loss=2.7,
            checkpoint=100,
            nonfinite=0,
            max_steps=300,
            loss_floor=1.2,
            control_generation=2,
        ),
    )
    t0 = folded.trials[0]
    assert (t0.step, t0.train_loss, t0.objective, t0.best_objective) == (120, 2.5, 2.7, 2.7)
    assert (t0.checkpoint_step, t0.max_steps, t0.loss_floor, t0.control_generation) == (100, 300, 1.2, 2)
    assert t0.history == [[120.0, 2.7]]


def test_checkpoint_minus_one_means_none_yet():
    spec = make_spec()
    folded = fold(spec, status_of(spec, trial("t0")), seen("t0", step=5, checkpoint=-1))
    assert folded.trials[0].checkpoint_step is None


def test_non_finite_metrics_never_reach_status():
    spec = make_spec()
    status = fold(spec, status_of(spec, trial("t0")), seen("t0", step=10, train_loss=3.0, val_loss=3.1))
    folded = fold(spec, status, seen("t0", step=math.nan, train_loss=math.inf, val_loss=math.nan, nonfinite=2))
    t0 = folded.trials[0]
    assert (t0.step, t0.train_loss, t0.objective) == (10, 3.0, 3.1)
    assert t0.nonfinite_losses == 2


def test_best_objective_follows_direction():
    for direction, values, best in (("minimize", [3.0, 2.0, 2.5], 2.0), ("maximize", [0.3, 0.7, 0.5], 0.7)):
        spec = make_spec(objective={"metric": "val_loss", "direction": direction})
        status = status_of(spec, trial("t0"))
        for step, value in enumerate(values, start=1):
            status = fold(spec, status, seen("t0", step=step * 10, val_loss=value))
        assert status.trials[0].best_objective == best
        assert status.best_objective == best


def test_history_appends_only_new_points_and_keeps_the_newest():
    spec = make_spec()
    status = status_of(spec, trial("t0"))
    status = fold(spec, status, seen("t0", step=1, val_loss=5.0))
    status = fold(spec, status, seen("t0", step=2, val_loss=5.0))  # same evaluation, read again
    assert status.trials[0].history == [[1.0, 5.0]]
    for step in range(3, 40):
        status = fold(spec, status, seen("t0", step=step, val_loss=5.0 - step / 100))
    history = status.trials[0].history
    assert len(history) == MAX_TRIAL_HISTORY
    assert history[-1] == [39.0, pytest.approx(4.61)]


def test_smoothed_train_loss_is_an_ema_over_new_steps():
    spec = make_spec(policy={"heuristic": {"smoothing": 0.5}})
    status = status_of(spec, trial("t0"))
    status = fold(spec, status, seen("t0", step=1, train_loss=4.0))
    status = fold(spec, status, seen("t0", step=2, train_loss=2.0))
    status = fold(spec, status, seen("t0", step=2, train_loss=2.0))  # no new step: no new sample
    t0 = status.trials[0]
    assert t0.smoothed_train_loss == pytest.approx(3.0)
    assert t0.best_train_loss == 2.0


def test_the_trainers_loss_spike_counter_marks_the_trial_unstable_where_it_first_rises_and_never_goes_back():
    spec = make_spec()
    status = status_of(spec, trial("t0"))
    status = fold(spec, status, seen("t0", step=10, train_loss=2.0, loss_spikes_total=0))
    assert status.trials[0].loss_spikes == 0 and status.trials[0].unstable_since is None
    status = fold(spec, status, seen("t0", step=20, train_loss=2.1, loss_spikes_total=3))
    assert status.trials[0].loss_spikes == 3 and status.trials[0].unstable_since == 20
    # a restarted process counts from 0 again: status keeps what was seen
    status = fold(spec, status, seen("t0", step=30, train_loss=2.0, loss_spikes_total=0))
    assert status.trials[0].loss_spikes == 3 and status.trials[0].unstable_since == 20


def test_rung_objective_recorded_the_first_time_the_rung_is_passed():
    spec = make_spec(policy={"heuristic": {"rungs": [0.25, 0.5]}})  # max_steps 200: rungs at 50, 100
    status = status_of(spec, trial("t0"))
    status = fold(spec, status, seen("t0", step=40, val_loss=3.0))
    assert status.trials[0].rung_objectives == {}
    status = fold(spec, status, seen("t0", step=60, val_loss=2.8))
    status = fold(spec, status, seen("t0", step=80, val_loss=2.6))
    assert status.trials[0].rung_objectives == {"50": 2.8}
    status = fold(spec, status, seen("t0", step=120, val_loss=2.4))
    assert status.trials[0].rung_objectives == {"50": 2.8, "100": 2.4}


def test_evaluations_sit_at_the_step_the_trainer_measured_them_and_a_rung_takes_only_its_own():
    spec = make_spec(policy={"heuristic": {"rungs": [0.25, 0.5]}})  # max_steps 200: rungs at 50, 100
    status = status_of(spec, trial("t0"))
    status = fold(spec, status, seen("t0", step=30, val_loss=math.nan, eval_step=-1))
    assert status.trials[0].history == [] and status.trials[0].rung_objectives == {}
    status = fold(spec, status, seen("t0", step=63, val_loss=2.8, eval_step=40))
    # Scraped past rung 50, but measured before it: the rung waits.
    assert status.trials[0].history == [[40.0, 2.8]] and status.trials[0].rung_objectives == {}
    status = fold(spec, status, seen("t0", step=71, val_loss=2.8, eval_step=40))
    status = fold(spec, status, seen("t0", step=85, val_loss=2.7, eval_step=80))
    # Measured at 80, not at 50: a later evaluation never stands in for the rung's own.
    assert status.trials[0].history == [[40.0, 2.8], [80.0, 2.7]] and status.trials[0].rung_objectives == {}
    status = fold(spec, status, seen("t0", step=101, val_loss=2.5, eval_step=100))
    assert status.trials[0].rung_objectives == {"100": 2.5}
    assert status.best_trial.step == 100


def test_the_rung_gauges_carry_a_rungs_evaluation_past_later_ones():
    """Tried as a new user would with intervalSeconds 2: by the next scrape the trainer had evaluated
    at rung 150 and again at 200. Rung 150 holds the step-150 value, not the step-200 one."""
    spec = make_spec(policy={"heuristic": {"rungs": [0.75]}})  # max_steps 200: rung at 150
    status = status_of(spec, trial("t0"))
    values = {"val_loss": 2.4, "eval_step": 200, "rung_step": 150, "rung_val_loss": 2.6}
    status = fold(spec, status, seen("t0", step=203, **values))
    assert status.trials[0].rung_objectives == {"150": 2.6}
    assert status.trials[0].history == [[200.0, 2.4]]


def test_a_resumed_trials_final_value_fills_no_rung_it_did_not_evaluate_at():
    spec = make_spec(policy={"heuristic": {"rungs": [0.375, 0.75]}})  # max_steps 200: rungs at 75, 150
    status = status_of(spec, trial("t0", resumed_from_step=160))
    status = fold(spec, status, seen("t0", step=200, val_loss=2.2, eval_step=200, rung_step=-1))
    assert status.trials[0].rung_objectives == {}


def test_a_trainer_that_does_not_say_where_it_measured_fills_a_rung_with_its_first_evaluation_past_it():
    spec = make_spec(policy={"heuristic": {"rungs": [0.25, 0.5]}})  # max_steps 200: rungs at 50, 100
    status = status_of(spec, trial("t0"))
    status = fold(spec, status, seen("t0", step=60, val_loss=2.8))
    status = fold(spec, status, seen("t0", step=80, val_loss=2.6))
    assert status.trials[0].rung_objectives == {"50": 2.8}


def test_a_per_step_objective_ignores_the_evaluation_step():
    spec = make_spec(objective={"metric": "train_loss"})
    status = fold(spec, status_of(spec, trial("t0")), seen("t0", step=63, train_loss=2.8, eval_step=40))
    assert status.trials[0].history == [[63.0, 2.8]]


def test_rungs_use_the_max_steps_the_trainer_reports():
    spec = make_spec(policy={"heuristic": {"rungs": [0.5]}})
    status = fold(spec, status_of(spec, trial("t0")), seen("t0", step=60, val_loss=2.0, max_steps=100))
    assert status.trials[0].rung_objectives == {"50": 2.0}


# ---- fold_observation: derived fields -------------------------------------------------------


def test_counters_summary_and_best_trial_over_all_trials():
    spec = make_spec()
    status = status_of(
        spec,
        trial("t0", 0, "Succeeded", best_objective=2.0, step=200, history=[[150.0, 2.0]]),
        trial("t1", 1, "Diverged"),
        trial("t2", 2, "Terminated", best_objective=2.5),
        trial("t3", 3, "Running", best_objective=2.2),
        trial("t4", 4, "Failed"),
    )
    assert (status.trials_launched, status.trials_running, status.trials_succeeded) == (5, 1, 1)
    assert (status.trials_failed, status.trials_diverged, status.trials_terminated) == (1, 1, 1)
    assert status.trials_summary == "4/8"
    assert status.best_trial.name == "t0" and status.best_trial.step == 150
    assert status.best_objective == 2.0
    assert status.phase == "Running"


def test_crashed_and_diverged_trials_are_never_the_best():
    spec = make_spec()
    status = status_of(
        spec,
        trial("crashed", 0, "Failed", best_objective=1.0),
        trial("diverged", 1, "Diverged", best_objective=1.1),
        trial("stopped-diverging", 2, "Terminated", best_objective=1.2, message="nonfinite-loss"),
        trial("pruned", 3, "Terminated", best_objective=2.5),
        trial("running", 4, "Running", best_objective=2.2),
    )
    assert status.best_trial.name == "running" and status.best_objective == 2.2
    only_crashed = status_of(spec, trial("crashed", 0, "Failed", best_objective=1.0))
    assert only_crashed.best_trial is None and only_crashed.best_objective is None


def test_gpu_hours_accrue_for_running_trials_only():
    spec = make_spec()
    status = status_of(
        spec,
        trial("t0", 0, "Running", nodes=2, gpus_per_node=4),
        trial("t1", 1, "Pending", nodes=1, gpus_per_node=8),
        last_cycle_time=at(0),
    )
    status = fold(spec, status, seen("t0"), seen("t1", "Pending"), time=at(900))
    assert status.trials[0].gpu_seconds == 2 * 4 * 900
    assert status.trials[1].gpu_seconds == 0
    assert status.gpu_hours_used == pytest.approx(2.0)
    assert status.last_cycle_time == at(900)


def test_final_phase_is_never_reopened():
    spec = make_spec()
    status = status_of(spec, trial("t0"), phase="Succeeded")
    assert fold(spec, status, seen("t0")).phase == "Succeeded"


# ---- apply_record ---------------------------------------------------------------------------


def test_launch_adds_a_pending_trial_and_counts_it():
    spec = make_spec(trialTemplate={"nodes": 2, "gpusPerNode": 1})
    status = apply_record(spec, AgentExperimentStatus(), record(0, launch(), new_trial="exp-t000"), NOW)
    t0 = status.trials[0]
    assert (t0.name, t0.index, t0.state, t0.decision) == ("exp-t000", 0, "Pending", "exp-d00000")
    assert (t0.nodes, t0.gpus_per_node, t0.generation, t0.parent) == (2, 1, 0, None)
    assert status.trials_launched == 1 and status.trials_running == 1
    assert status.decisions_made == 1
    assert status.decisions[-1].trial == "exp-t000" and status.decisions[-1].outcome == "executed"


def test_relaunch_child_records_lineage_and_resume_step():
    spec = make_spec()
    status = status_of(spec, trial("exp-t000", 0, "Diverged", checkpoint_step=100, generation=1))
    decision = launch(parent="exp-t000", resume_from="exp-t000")
    status = apply_record(spec, status, record(0, decision, new_trial="exp-t001"), NOW)
    child = status.trial("exp-t001")
    assert (child.parent, child.generation, child.resumed_from_step, child.index) == ("exp-t000", 2, 100, 1)


def test_applying_the_same_record_twice_changes_nothing():
    spec = make_spec()
    once = apply_record(spec, AgentExperimentStatus(), record(0, launch(), new_trial="exp-t000"), NOW)
    twice = apply_record(spec, once, record(0, launch(), new_trial="exp-t000"), NOW)
    assert twice == once
    assert len(twice.trials) == 1 and len(twice.decisions) == 1


def test_rejected_record_is_summarised_but_has_no_effect():
    spec = make_spec()
    status = apply_record(spec, AgentExperimentStatus(), record(4, launch(), outcome="rejected"), NOW)
    assert status.trials == [] and status.decisions_made == 5
    assert status.decisions[-1].outcome == "rejected"


def test_terminate_marks_the_trial_terminated_with_the_reason():
    spec = make_spec()
    status = status_of(spec, trial("exp-t000"))
    decision = Decision(action="terminate", policy="test", reason="loss-spike", trial="exp-t000")
    status = apply_record(spec, status, record(0, decision), at(5))
    t0 = status.trials[0]
    assert (t0.state, t0.message, t0.finished_at) == ("Terminated", "loss-spike", at(5))
    assert status.trials_terminated == 1 and status.trials_running == 0


def test_mutate_in_place_updates_values_and_requests_a_new_generation():
    spec = make_spec()
    status = status_of(spec, trial("exp-t000", control_generation=1))
    decision = Decision(
        action="mutate", policy="test", reason="r", trial="exp-t000", mode="in-place", hyperparameters={"lr": 0.001}
    )
    status = apply_record(spec, status, record(0, decision), NOW)
    t0 = status.trials[0]
    assert t0.hyperparameters["lr"] == 0.001 and t0.control_generation == 2 and t0.state == "Running"
    # The trainer has not applied it yet: folding its older generation must not move status back.
    status = fold(spec, status, seen("exp-t000", step=5, control_generation=1))
    assert status.trials[0].control_generation == 2


@pytest.mark.parametrize("action", ["mutate", "scale"])
def test_restart_stops_the_old_trial_and_launches_a_child(action):
    spec = make_spec()
    status = status_of(spec, trial("exp-t000", nodes=1, gpus_per_node=1, checkpoint_step=80))
    if action == "mutate":
        decision = Decision(
            action="mutate",
            policy="test",
            reason="r",
            trial="exp-t000",
            mode="restart",
            hyperparameters={"weight_decay": 0.05},
        )
    else:
        decision = Decision(action="scale", policy="test", reason="r", trial="exp-t000", nodes=4)
    status = apply_record(spec, status, record(0, decision, new_trial="exp-t001"), NOW)
    old, child = status.trials
    assert old.state == "Terminated"
    assert (child.parent, child.generation, child.state) == ("exp-t000", 1, "Pending")
    # It starts once exp-t000's pods are gone, from the step exp-t000 reports then (the loop's hand-off).
    assert (child.waiting_for, child.waiting_since, child.resumed_from_step) == ("exp-t000", NOW, None)
    assert status.launched_trials == [] and status.active_trials == [child]
    if action == "mutate":
        assert child.hyperparameters == {"lr": 0.01, "weight_decay": 0.05} and child.nodes == 1
    else:
        assert child.hyperparameters == old.hyperparameters and (child.nodes, child.gpus_per_node) == (4, 1)


def test_complete_finishes_the_experiment_and_its_trials():
    spec = make_spec()
    status = status_of(spec, trial("exp-t000"))
    decision = Decision(
        action="complete", policy="test", reason="goal-reached", rationale="t0 reached 1.5", outcome="succeeded"
    )
    status = apply_record(spec, status, record(0, decision), at(9))
    assert (status.phase, status.finished_at, status.message) == ("Succeeded", at(9), "t0 reached 1.5")
    assert status.trials[0].state == "Terminated" and status.trials_running == 0


def test_status_keeps_only_the_newest_decision_summaries():
    spec = make_spec()
    status = AgentExperimentStatus()
    for seq in range(MAX_STATUS_DECISIONS + 5):
        status = apply_record(spec, status, record(seq, launch(), outcome="rejected"), NOW)
    assert len(status.decisions) == MAX_STATUS_DECISIONS
    assert status.decisions[-1].id == decision_id(EXPERIMENT, MAX_STATUS_DECISIONS + 4)


def test_a_trial_that_ran_all_its_steps_is_succeeded_not_terminated_when_the_experiment_completes():
    spec = make_spec()  # max_steps 200
    status = status_of(spec, trial("exp-t000", 0, step=200), trial("exp-t001", 1, step=120))
    decision = Decision(action="complete", policy="test", reason="goal-reached", outcome="succeeded")
    status = apply_record(spec, status, record(0, decision), at(9))
    assert [t.state for t in status.trials] == ["Succeeded", "Terminated"]
    assert status.trials[0].message == "ran all 200 steps" and status.trials_succeeded == 1
    # The same for the terminate the heuristic sends each running trial before it completes.
    status = status_of(spec, trial("exp-t000", 0, step=200))
    stop = Decision(action="terminate", policy="test", reason="experiment-complete", trial="exp-t000")
    assert apply_record(spec, status, record(0, stop), at(9)).trials[0].state == "Succeeded"
    other = Decision(action="terminate", policy="test", reason="asha-rung", trial="exp-t000")
    assert apply_record(spec, status, record(0, other), at(9)).trials[0].state == "Terminated"


def test_a_refused_launch_fails_its_trial_and_a_refused_control_update_is_undone():
    spec = make_spec()
    status = apply_record(spec, AgentExperimentStatus(), record(0, launch(), new_trial="exp-t000"), NOW)
    refused = record(1, launch(), outcome="failed", new_trial="exp-t000").model_copy(
        update={"verdict": "launching exp-t000 failed: 403 forbidden", "follows": "exp-d00000"}
    )
    after = apply_record(spec, status, refused, NOW)
    assert (after.trials[0].state, after.trials[0].message) == ("Failed", "launching exp-t000 failed: 403 forbidden")
    assert after.trials_failed == 1 and after.decisions[-1].outcome == "failed"

    mutate = Decision(
        action="mutate", policy="t", reason="t", trial="exp-t000", mode="in-place", hyperparameters={"lr": 0.002}
    )
    changed = apply_record(
        spec, status, record(1, mutate).model_copy(update={"before": {"lr": 0.01, "weight_decay": 0.0}}), NOW
    )
    assert changed.trials[0].hyperparameters["lr"] == 0.002 and changed.trials[0].control_generation == 1
    undone = apply_record(
        spec,
        changed,
        record(2, mutate, outcome="failed").model_copy(
            update={"verdict": "changing exp-t000 failed: 403", "before": {"lr": 0.01, "weight_decay": 0.0}}
        ),
        NOW,
    )
    assert undone.trials[0].hyperparameters == {"lr": 0.01, "weight_decay": 0.0}
    assert undone.trials[0].control_generation == 0 and undone.trials[0].state == "Pending"


def test_evaluations_are_counted_as_the_evaluation_step_advances():
    spec = make_spec()
    status = status_of(spec, trial("t0", 0))
    for step, eval_step in ((10, -1), (50, 40), (60, 40), (90, 80), (130, 120)):
        status = fold(spec, status, seen("t0", step=step, eval_step=eval_step))
    assert (status.trials[0].evaluations, status.trials[0].eval_step) == (3, 120)


def test_the_first_bad_sign_is_remembered():
    spec = make_spec()  # spikeFactor 3
    status = status_of(spec, trial("t0", 0))
    status = fold(spec, status, seen("t0", step=10, train_loss=2.0))
    status = fold(spec, status, seen("t0", step=20, train_loss=5.0))  # below 3 x 2.0
    assert status.trials[0].unstable_since is None
    status = fold(spec, status, seen("t0", step=30, train_loss=7.0))
    status = fold(spec, status, seen("t0", step=40, train_loss=9.0, nonfinite=1))
    assert status.trials[0].unstable_since == 30  # the first one, not the latest
    status = status_of(spec, trial("t1", 0))
    assert fold(spec, status, seen("t1", step=25, nonfinite=2)).trials[0].unstable_since == 25


def test_a_pending_trial_says_why_it_waits_until_it_runs():
    from trainpilot.core.observation import TrialObservation

    spec = make_spec()
    status = status_of(spec, trial(f"{EXPERIMENT}-t000", 0, "Pending"))
    why = "waiting for Kueue to admit it in LocalQueue team-a: couldn't assign flavors"
    queued = TrialObservation(name=f"{EXPERIMENT}-t000", phase="Pending", pending_reason=why)
    status = fold(spec, status, queued)
    assert status.trials[0].message == f"pending: {why}"
    status = fold(spec, status, seen(f"{EXPERIMENT}-t000", step=3), time=at(10))
    assert status.trials[0].state == "Running" and status.trials[0].message == ""


def test_only_trials_scored_on_the_reference_validation_set_can_be_the_best():
    """The first-launched trial's fingerprint is the reference; a trial scored on other data (a
    different block_size, say) is never the best, however low its number."""
    spec = make_spec()
    status = status_of(
        spec,
        trial("reference", 0, "Succeeded", best_objective=2.0, validation_fingerprint="00000000000a"),
        trial("other-data", 1, "Succeeded", best_objective=1.0, validation_fingerprint="00000000000b"),
        trial("custom-trainer", 2, "Succeeded", best_objective=3.0),  # exports no fingerprint
    )
    assert status.best_trial.name == "reference"
    status = fold(
        spec, status_of(spec, trial("t", 0, "Running")), seen("t", step=5, **{"validation_fingerprint": 10.0})
    )
    assert status.trials[0].validation_fingerprint == "00000000000a"
