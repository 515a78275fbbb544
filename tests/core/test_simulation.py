"""A whole experiment, in memory: fold -> plan -> apply over many cycles with a toy trainer.

The toy trainer's validation loss is a smooth function of lr and step (best near lr = 0.01), and
any lr above DIVERGENT_LR produces non-finite losses a few steps in (like fail_fast=false: it
keeps running until someone stops it); an lr above SPIKING_LR makes the loss spike, finite, a bit
later. The core must notice, stop it, relaunch it lower from its
last checkpoint, and finish with a best trial.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import pytest

from tests.support.builders import EXPERIMENT, at, make_spec
from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus
from trainpilot.api.metrics import TrialMetrics
from trainpilot.core.decision import DecisionRecord
from trainpilot.core.engine import plan_cycle
from trainpilot.core.observation import Observation, TrialObservation
from trainpilot.core.policy import HeuristicPolicy
from trainpilot.core.state import apply_record, fold_observation

DIVERGENT_LR = 0.2
DIVERGES_AT = 30
SPIKING_LR = 0.1  # above this (and up to DIVERGENT_LR) the loss spikes, finite, from SPIKES_AT on
SPIKES_AT = 45
CHECKPOINT_EVERY = 20
EVAL_EVERY = 20
STEPS_PER_CYCLE = 10
MAX_STEPS = 200


def val_loss(lr: float, step: int) -> float:
    return 1.5 + 0.5 * (math.log10(lr) + 2) ** 2 + 2.0 * math.exp(-step / 40)


@dataclass
class ToyTrainer:
    lr: float
    step: int = 0
    started: bool = False
    stopped: bool = False
    checkpoint: int = -1
    nonfinite: int = 0
    last_eval: float = math.nan

    def advance(self) -> None:
        if not self.started:
            self.started = True  # Pending for one cycle, like a pod being scheduled
            return
        for _ in range(STEPS_PER_CYCLE):
            if self.step >= MAX_STEPS:
                return
            self.step += 1
            if self.lr > DIVERGENT_LR and self.step >= DIVERGES_AT:
                self.nonfinite += 1  # the diverged state is never checkpointed
                continue
            if self.step % CHECKPOINT_EVERY == 0:
                self.checkpoint = self.step
            if self.step % EVAL_EVERY == 0:
                self.last_eval = val_loss(self.lr, self.step)

    def observe(self, name: str) -> TrialObservation:
        if self.stopped:
            return TrialObservation(name=name, phase="Failed", exit_reason="terminated", exit_code=4)
        train = math.nan if self.nonfinite else val_loss(self.lr, self.step) - 0.05
        if self.lr > SPIKING_LR and self.step >= SPIKES_AT:
            train *= 8
        metrics = TrialMetrics(
            values={
                contract.METRIC_STEP: self.step,
                contract.METRIC_TRAIN_LOSS: train,
                contract.METRIC_VAL_LOSS: self.last_eval,
                contract.METRIC_NONFINITE_LOSS: self.nonfinite,
                contract.METRIC_CHECKPOINT_STEP: self.checkpoint,
                contract.METRIC_MAX_STEPS: MAX_STEPS,
            }
        )
        if not self.started:
            return TrialObservation(name=name, phase="Pending")
        if self.step >= MAX_STEPS:
            return TrialObservation(name=name, phase="Succeeded", exit_reason="completed", exit_code=0, metrics=metrics)
        return TrialObservation(name=name, phase="Running", metrics=metrics)


class ToyCluster:
    """Plays the runtime: starts, stops and observes toy trainers as records say."""

    def __init__(self) -> None:
        self.trainers: dict[str, ToyTrainer] = {}

    def tick(self) -> None:
        for trainer in self.trainers.values():
            if not trainer.stopped:
                trainer.advance()

    def observe(self, status: AgentExperimentStatus, now: str) -> Observation:
        return Observation(
            time=now,
            trials={t.name: self.trainers[t.name].observe(t.name) for t in status.trials if not t.finished},
        )

    def act(self, record: DecisionRecord, status: AgentExperimentStatus) -> None:
        if record.outcome != "executed":
            return
        decision = record.decision
        if decision.action == "terminate":
            self.trainers[decision.trial].stopped = True
        if decision.action == "complete":
            for trainer in self.trainers.values():
                trainer.stopped = True
        if record.new_trial:
            child = status.trial(record.new_trial)
            source = self.trainers.get(decision.resume_from or "")
            resume = source.checkpoint if source and source.checkpoint >= 0 else 0
            self.trainers[child.name] = ToyTrainer(lr=child.hyperparameters["lr"], step=resume, checkpoint=resume - 1)


async def simulate(spec: AgentExperimentSpec, max_cycles: int = 300):
    cluster, policy = ToyCluster(), HeuristicPolicy()
    status, history = AgentExperimentStatus(), []
    for cycle in range(max_cycles):
        now = at(30 * cycle)
        cluster.tick()
        status = fold_observation(spec, status, cluster.observe(status, now), now)
        if status.finished:
            break
        planned = await plan_cycle(EXPERIMENT, spec, status, Observation(time=now), policy, now)
        status = planned.status
        for record in planned.records:
            status = apply_record(spec, status, record, now)
            cluster.act(record, status)
        assert status == planned.provisional  # what the engine predicted is what applying the records gives
        history.extend(planned.records)
    return status, history


def spec_for(**changes) -> AgentExperimentSpec:
    base = dict(
        searchSpace=[{"name": "lr", "min": 1e-4, "max": 1.0, "log": True}],
        initialTrials=[{"lr": 0.5}, {"lr": 0.02}],
        trialTemplate={"hyperparameters": {"max_steps": MAX_STEPS}},
        budget={"maxTrials": 10, "parallelTrials": 2, "maxFailedTrials": 4},
    )
    base.update(changes)
    return make_spec(**base)


async def test_experiment_stops_divergence_relaunches_lower_and_reaches_the_goal():
    spec = spec_for(objective={"goal": 1.6})
    status, records = await simulate(spec)
    executed = [r for r in records if r.outcome == "executed"]

    [stop] = [r for r in executed if r.decision.reason == "nonfinite-loss"]
    assert stop.decision.trial == "exp-t000"
    [relaunch] = [r for r in executed if r.decision.parent == "exp-t000"]
    assert relaunch.decision.reason == "relaunch-after-divergence"
    assert relaunch.decision.hyperparameters["lr"] == pytest.approx(0.05)
    assert relaunch.decision.resume_from == "exp-t000"
    child = status.trial(relaunch.new_trial)
    assert child.resumed_from_step == CHECKPOINT_EVERY and child.generation == 1

    assert status.phase == "Succeeded" and executed[-1].decision.reason == "goal-reached"
    assert status.best_trial is not None and status.best_trial.objective <= 1.6
    assert status.trials_running == 0

    # The audit trail is gap-free, and nothing was done twice.
    assert [r.seq for r in records] == list(range(len(records)))
    stops = Counter(r.decision.trial for r in executed if r.decision.action == "terminate")
    assert max(stops.values()) == 1
    assert status.trials_launched <= spec.budget.max_trials


async def test_experiment_without_a_goal_spends_its_budget_and_succeeds():
    spec = spec_for(budget={"maxTrials": 6, "parallelTrials": 2, "maxFailedTrials": 4})
    status, records = await simulate(spec)
    assert status.phase == "Succeeded"
    assert status.trials_launched == 6 and status.trials_running == 0
    assert records[-1].decision.action == "complete" and records[-1].decision.reason == "budget-spent"
    best = status.best_trial
    assert best is not None and val_loss(best.hyperparameters["lr"], MAX_STEPS) < val_loss(0.05, MAX_STEPS)
    assert all(r.outcome == "executed" for r in records)  # the heuristic never proposes what guardrails refuse


async def test_a_loss_spike_is_relaunched_lower_from_the_checkpoint_before_it():
    # No PBT among the running trials: it would replace the lr 0.15 trial, 40 steps in and behind, before it spikes.
    spec = spec_for(
        initialTrials=[{"lr": 0.15}, {"lr": 0.02}],
        objective={"goal": 1.6},
        policy={"heuristic": {"exploitInterval": 0}},
    )
    status, records = await simulate(spec)
    executed = [r for r in records if r.outcome == "executed"]

    [stop] = [r for r in executed if r.decision.reason == "loss-spike"]
    assert stop.decision.trial == "exp-t000"
    spiked = status.trial("exp-t000")
    assert spiked.unstable_since == 50 and spiked.checkpoint_step == 40
    [relaunch] = [r for r in executed if r.decision.parent == "exp-t000"]
    assert relaunch.decision.reason == "relaunch-after-divergence"
    assert relaunch.decision.hyperparameters["lr"] == pytest.approx(0.015)
    assert relaunch.decision.resume_from == "exp-t000"
    child = status.trial(relaunch.new_trial)
    assert child.resumed_from_step == 40 and child.generation == 1  # the last checkpoint before the spike

    assert status.phase == "Succeeded" and status.trials_diverged == 1
    assert status.best_trial is not None and status.best_trial.name != "exp-t000"
