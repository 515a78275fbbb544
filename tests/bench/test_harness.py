"""The policy benchmark's harness: whole experiments through trainpilot.loop.run_cycle over the
SimulatedRuntime, which plays the trainer's contract over the fitted learning-curve surrogate of
the synthetic task. These check the harness (what the runtime does with configs, stops, control
changes and hand-offs, and what it accounts), not the surrogate's fit (test_surrogate.py)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from bench.policybench.harness import BAD_SIGN_FACTOR, CHECKPOINT_ROOT, SimulatedRuntime, run_experiment
from bench.policybench.tasks import TASKS, Task
from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, TrialStatus, parse_spec
from trainpilot.api.trial import ControlFile
from trainpilot.core.decision import Decision
from trainpilot.core.policy import HeuristicPolicy
from trainpilot.core.trials import build_trial_config, trial_hyperparameters

SYNTHETIC = TASKS["synthetic"]
MAX_STEPS = SYNTHETIC.max_steps
BUDGET = {"maxTrials": 6, "parallelTrials": 2, "maxFailedTrials": 4}
# The space's corner that diverges at once (the surrogate's critical lr is lowest there: small batch,
# no warm-up), and a sound configuration.
DIVERGING = {"lr": 1.0, "micro_batch": 4, "warmup_steps": 0}
SOUND = {"lr": 0.01, "micro_batch": 8, "warmup_steps": 10}


@dataclasses.dataclass(frozen=True)
class Seeded(Task):
    """A task whose spec starts with given initialTrials (the benchmark's tasks start with none)."""

    initial: tuple[dict[str, float], ...] = ()

    def spec(self, *, policy: dict, budget: dict, seed: int) -> AgentExperimentSpec:
        raw = super().spec(policy=policy, budget=budget, seed=seed).model_dump(by_alias=True, exclude_none=True)
        return parse_spec({**raw, "initialTrials": [dict(trial) for trial in self.initial]})


def seeded(*initial: dict[str, float], **template: Any) -> Seeded:
    fields = {field.name: getattr(SYNTHETIC, field.name) for field in dataclasses.fields(SYNTHETIC)}
    fields["template"] = {**SYNTHETIC.template, **template}
    return Seeded(**fields, initial=initial)


async def experiment(policy, task: Task = SYNTHETIC, budget=None, **options):
    return await run_experiment(task, policy, 0, budget or BUDGET, max_cycles=400, **options)


def own_steps(run) -> int:
    return run.step - run.resumed_from_step if run is not None else 0


async def test_a_heuristic_experiment_finishes_gap_free_and_each_trial_runs_what_its_record_says():
    result = await experiment(HeuristicPolicy())
    status, runtime = result.status, result.runtime
    assert result.finished and status.phase == "Succeeded" and result.cycles < 400
    assert [record.seq for record in result.records] == list(range(len(result.records)))
    assert status.decisions_made == len(result.records)

    launched = [r for r in result.records if r.outcome == "executed" and r.new_trial]
    assert len(launched) == len(status.trials) == len(runtime.trials) == BUDGET["maxTrials"]
    for record in launched:
        trial = status.trial(record.new_trial)
        sim = runtime.trials[trial.name]
        searched = record.decision.hyperparameters
        if record.decision.action != "launch":  # a restart: the parent's values with the changed ones
            searched = {**record.before, **searched}
        assert trial.hyperparameters == pytest.approx(searched)
        assert sim.config.hyperparameters == trial_hyperparameters(status.spec_for(result.spec, trial.name), trial)
        if sim.run is not None:
            for name, value in searched.items():
                assert sim.run.hyperparameters[name] == pytest.approx(round(value) if name != "lr" else value)
        if record.decision.resume_from and trial.resumed_from_step is not None:
            assert sim.resumed_from == (record.decision.resume_from, trial.resumed_from_step)

    # Accounting: from the runs' own step counts, equal to what status charged against maxTrialSteps.
    spent = sum(own_steps(sim.run) for sim in runtime.trials.values())
    assert result.trial_steps == spent == status.trial_steps_used > 0
    assert result.device_trajectory[-1][0] == spent  # one process each
    steps = [steps for steps, _ in result.trajectory]
    bests = [best for _, best in result.trajectory]
    assert steps == sorted(steps) and math.isinf(bests[0])
    evaluated = [value for sim in runtime.trials.values() for _, value in sim.evaluations]
    # The best-evaluated model is the user's pick; the trajectory holds what it is really worth (no
    # noise), which the luckiest of many noisy evaluations understates.
    assert runtime.best_observed == min(evaluated) <= status.best_objective
    assert bests[-1] == runtime.best_val >= TASKS["synthetic"].floor


async def test_a_diverging_trial_is_stopped_and_the_cycles_of_its_first_bad_sign_and_stop_are_recorded():
    result = await experiment(HeuristicPolicy(), seeded(DIVERGING, SOUND))
    diverged = result.runtime.trials["bench-t000"]
    # launched in cycle 0, Pending in 1, steps 1-10 in cycle 2: its loss spikes there (3x its best),
    # and goes non-finite a step or two later
    assert diverged.first_bad_step <= 10 and result.first_bad_sign["bench-t000"] == 2
    stopped = result.terminated_at["bench-t000"]
    assert stopped - 2 <= 1  # the heuristic stops it within one decision interval
    [stop] = [r for r in result.records if r.decision.action == "terminate" and r.trial == "bench-t000"]
    # the trainer's spike counter, or the non-finite loss, whichever the scrape at the cycle's end sees first
    assert stop.decision.reason in ("loss-spike", "nonfinite-loss")
    assert result.trials["bench-t000"].stop_reason == stop.decision.reason
    assert diverged.exit_code == contract.EXIT_STOPPED and diverged.step == 10 * (stopped - 1)  # and no more
    assert diverged.checkpoint_step is None  # nothing saved at or after the bad loss (the first save is due at 25)
    assert "bench-t001" not in result.first_bad_sign  # the sound one never looked bad


async def test_a_trainer_with_fail_fast_exits_diverged_by_itself():
    # no spike rule (the heuristic would stop it at the spike, before its trainer exits)
    no_spikes = {"heuristic": {"spikeFactor": 1000}}
    result = await experiment(HeuristicPolicy(), seeded(DIVERGING, SOUND, fail_fast=True), policy_spec=no_spikes)
    assert result.status.trial("bench-t000").state == "Diverged" and "bench-t000" not in result.terminated_at
    first = result.trials["bench-t000"]
    # It exits at its first non-finite loss, a step or two after the spike the benchmark counts as its first bad sign.
    assert first.exit_reason == "diverged" and first.first_bad_step <= first.step == first.steps_trained <= 20


class Scripted:
    """Launches SOUND, then once it has trained `at` steps proposes `then(trial)` once."""

    name = "scripted"

    def __init__(self, at: int, then) -> None:
        self.at, self.then, self.done = at, then, False

    async def decide(self, context):
        status = context.status
        if not status.trials:
            return [Decision(action="launch", policy=self.name, reason="first", hyperparameters=SOUND)]
        if not self.done and status.trials[0].step >= self.at:
            self.done = True
            return [self.then(status.trials[0])]
        if not status.active_trials:
            return [Decision(action="complete", policy=self.name, reason="done", outcome="succeeded")]
        return []


def mutate(mode: str, lr: float):
    return lambda trial: Decision(
        action="mutate", policy="scripted", reason=mode, trial=trial.name, mode=mode, hyperparameters={"lr": lr}
    )


async def test_an_in_place_mutate_reaches_the_run_from_its_next_step():
    alone = await experiment(Scripted(10**6, None), budget={"maxTrials": 1, "parallelTrials": 1})
    result = await experiment(Scripted(100, mutate("in-place", 0.002)), budget={"maxTrials": 1, "parallelTrials": 1})
    sim = result.runtime.trials["bench-t000"]
    assert [values for _, values in sim.controls] == [{"lr": 0.002}]
    assert sim.run.hyperparameters["lr"] == 0.002 and sim.run.schedule.peak == 0.002
    assert sim.control_generation == 1 and sim.step == MAX_STEPS
    trial = result.status.trial("bench-t000")
    assert trial.control_generation == 1 and trial.state == "Succeeded" and trial.hyperparameters["lr"] == 0.002
    # The same run, same noise: equal up to the change, different after it.
    unchanged = alone.runtime.trials["bench-t000"].evaluations
    assert sim.evaluations[:4] == unchanged[:4] and sim.evaluations[-1] != unchanged[-1]


async def test_a_restart_resumed_child_continues_from_its_parents_checkpoint_step():
    result = await experiment(Scripted(120, mutate("restart", 0.02)), budget={"maxTrials": 2, "parallelTrials": 1})
    parent, child = result.runtime.trials["bench-t000"], result.runtime.trials["bench-t001"]
    assert parent.exit_code == contract.EXIT_STOPPED and parent.step == 120
    assert parent.checkpoint_step == 120  # saved on SIGTERM at the step it stopped at, not at 100
    assert child.resumed_from == ("bench-t000", 120) and child.run.resumed_from_step == 120
    assert child.config.resume_from == f"{CHECKPOINT_ROOT}/bench-t000" and child.config.resume_tag == "step120"
    assert child.step == MAX_STEPS and own_steps(child.run) == MAX_STEPS - 120
    assert child.run.hyperparameters["lr"] == 0.02
    # It goes on where the parent was, not from scratch (ln 16 = 2.77 nats).
    assert abs(child.evaluations[0][1] - parent.evaluations[-1][1]) < 0.2
    status = result.status
    assert status.trial("bench-t001").resumed_from_step == 120 and status.trial("bench-t001").state == "Succeeded"
    assert status.trial_steps_used == result.trial_steps == MAX_STEPS


async def test_a_scaled_child_runs_at_its_new_world_size_from_the_parents_step():
    scale = Scripted(60, lambda t: Decision(action="scale", policy="scripted", reason="lead", trial=t.name, nodes=2))
    result = await experiment(scale, budget={"maxTrials": 2, "parallelTrials": 1})
    parent, child = result.runtime.trials["bench-t000"], result.runtime.trials["bench-t001"]
    assert parent.world_size == 1 and child.world_size == child.run.world_size == 2
    assert child.run.batch == 2 * parent.run.batch
    assert child.resumed_from == ("bench-t000", 60)
    assert result.trajectory[-1][0] == MAX_STEPS and result.device_trajectory[-1][0] == 60 + 2 * (MAX_STEPS - 60)


# ---- the runtime alone -----------------------------------------------------------------------


def launched(runtime: SimulatedRuntime, spec: AgentExperimentSpec, name: str, **resume: Any):
    trial = TrialStatus(name=name, index=len(runtime.trials), hyperparameters=SOUND)
    config = build_trial_config("bench", spec, trial, runtime.checkpoint_dir(name, spec), **resume)
    return trial, config


async def test_the_runtime_exports_what_the_trainer_does_pending_then_running_then_stopped():
    spec = SYNTHETIC.spec(policy={"heuristic": {"rungs": [0.2]}}, budget=BUDGET, seed=0)  # a rung at step 60
    runtime = SimulatedRuntime(SYNTHETIC, 0)
    trial, config = launched(runtime, spec, "t0", resume_from=None)
    assert config.eval_at_steps == [60]
    await runtime.launch(trial, config, spec)
    await runtime.launch(trial, config, spec)  # idempotent
    status = AgentExperimentStatus(trials=[trial])
    runtime.tick()
    seen = (await runtime.observe(status)).trials["t0"]
    assert seen.phase == "Pending" and seen.metrics is None
    runtime.tick()
    values = (await runtime.observe(status)).trials["t0"].metrics.values
    assert values[contract.METRIC_STEP] == 10 and values[contract.METRIC_MAX_STEPS] == MAX_STEPS
    assert math.isnan(values[contract.METRIC_VAL_LOSS]) and values[contract.METRIC_EVAL_STEP] == -1
    assert values[contract.METRIC_CHECKPOINT_STEP] == -1 and values[contract.METRIC_LOSS_FLOOR] == SYNTHETIC.floor
    assert values[contract.METRIC_NONFINITE_LOSS] == 0 and math.isfinite(values[contract.METRIC_TRAIN_LOSS])
    for _ in range(6):
        runtime.tick()
    values = (await runtime.observe(status)).trials["t0"].metrics.values
    assert values[contract.METRIC_STEP] == 70 and values[contract.METRIC_EVAL_STEP] == 60  # the rung, besides 25, 50
    assert values[contract.METRIC_RUNG_STEP] == 60 and values[contract.METRIC_CHECKPOINT_STEP] == 50
    assert [step for step, _ in runtime.trials["t0"].evaluations] == [25, 50, 60]
    assert runtime.now == "2026-01-01T00:04:00Z"  # 8 cycles of 30 s
    await runtime.set_control("t0", ControlFile(generation=1, lr=0.004))
    runtime.tick()
    values = (await runtime.observe(status)).trials["t0"].metrics.values
    assert values[contract.METRIC_CONTROL_GENERATION] == 1 and runtime.trials["t0"].run.hyperparameters["lr"] == 0.004
    await runtime.stop("t0", "asha-rung")
    assert (await runtime.departed("t0")).checkpoint_step == 80
    seen = (await runtime.observe(status)).trials["t0"]
    assert (seen.phase, seen.exit_reason, seen.exit_code) == ("Failed", "terminated", contract.EXIT_STOPPED)
    runtime.tick()
    assert runtime.trials["t0"].step == 80  # a stopped run trains no more
    assert (await runtime.departed("never-launched")).checkpoint_step is None


async def test_a_resume_tag_that_was_never_saved_fails_the_trial_as_the_trainer_would():
    spec = SYNTHETIC.spec(policy={}, budget=BUDGET, seed=0)
    runtime = SimulatedRuntime(SYNTHETIC, 0)
    trial, config = launched(runtime, spec, "t0", resume_from=None)
    await runtime.launch(trial, config, spec)
    child, config = launched(runtime, spec, "t1", resume_from=runtime.checkpoint_dir("t0", spec), resume_step=40)
    await runtime.launch(child, config, spec)
    seen = (await runtime.observe(AgentExperimentStatus(trials=[child]))).trials["t1"]
    assert (seen.phase, seen.exit_reason) == ("Failed", "invalid-config") and "no checkpoint" in seen.message


def test_the_bad_sign_factor_is_the_heuristics_default_spike_factor():
    from trainpilot.api.experiment import HeuristicSettings

    assert HeuristicSettings().spike_factor == BAD_SIGN_FACTOR


async def test_an_experiment_whose_policy_never_completes_ends_when_it_stalls():
    class LaunchOnce:
        name = "once"

        async def decide(self, context):
            if context.status.trials:
                return []
            return [Decision(action="launch", policy=self.name, reason="first", hyperparameters=SOUND)]

    result = await run_experiment(SYNTHETIC, LaunchOnce(), 0, BUDGET, stall_cycles=5)
    assert not result.finished and result.status.trials[0].state == "Succeeded"
    # cycle 0 launches it, 1 sees it Pending, 2-31 train it (31 sees it succeed), 31-35 are idle
    assert result.cycles == 2 + MAX_STEPS // 10 + 4
