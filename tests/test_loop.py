"""The shared agent loop over an in-memory runtime: ordering, recovery after a crash, suspend."""

from __future__ import annotations

import pytest

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentStatus, CheckpointVolume, parse_spec
from trainpilot.api.metrics import TrialMetrics
from trainpilot.core.approvals import Approval
from trainpilot.core.decision import Decision, DecisionRecord
from trainpilot.core.observation import Observation, TrialObservation
from trainpilot.core.policy import HeuristicPolicy
from trainpilot.loop import LoopMemory, run_cycle
from trainpilot.runtime.base import Departure, LedgerConflict, PermanentFailure, RuntimeFailure


class Crash(Exception):
    pass


class MemoryRuntime:
    """Records calls; trials report whatever the test scripts for them.

    `refuse[(call, trial)] = message` makes that call fail for good (a 403 from the API server);
    `fail_ledger` / `fail_save` make every ledger append / status save fail (transiently);
    `sneak` is a record another writer appends under the same id just before this one does;
    a stopped trial in `lingering` still has processes (departed() is None), and `reported_steps`
    holds the checkpoint step each stopped trial reported on its way out.
    """

    name = "memory"
    removable: frozenset[str] = frozenset()  # the retention tests say what it may delete

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.records: list[DecisionRecord] = []
        self.saved: AgentExperimentStatus | None = None
        self.saves = 0
        self.metrics: dict[str, dict[str, float]] = {}
        self.exits: dict[str, int] = {}
        self.crash_on_launch = False
        self.announced: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.refuse: dict[tuple[str, str], str] = {}
        self.fail_ledger: str | None = None
        self.fail_save: str | None = None
        self.sneak: DecisionRecord | None = None
        self.lingering: set[str] = set()
        self.fail_observe: RuntimeFailure | None = None
        self.scrape_errors: dict[str, str] = {}
        self.reported_steps: dict[str, int] = {}
        self.sign_offs: list[Approval] = []

    def checkpoint_dir(self, trial, spec):
        return f"/ckpt/{trial}"

    def _maybe_refuse(self, call, trial):
        message = self.refuse.get((call, trial))
        if message is not None:
            self.calls.append((f"refused {call}", trial))
            raise PermanentFailure(message)

    async def observe(self, status):
        if self.fail_observe is not None:
            raise self.fail_observe
        observation = Observation(time="t")
        for trial in status.launched_trials:
            code = self.exits.get(trial.name)
            phase = "Running" if code is None else ("Succeeded" if code == 0 else "Failed")
            reason = None if code is None else contract.EXIT_REASONS[code]
            metrics = TrialMetrics(values=self.metrics.get(trial.name, {}))
            error = self.scrape_errors.get(trial.name)
            observation.trials[trial.name] = TrialObservation(
                name=trial.name,
                phase=phase,
                exit_reason=reason,
                exit_code=code,
                metrics=None if error else metrics,
                scrape_error=error,
            )
        return observation

    async def launch(self, trial, config, spec):
        if self.crash_on_launch:
            raise Crash("operator killed mid-cycle")
        self._maybe_refuse("launch", trial.name)
        self.calls.append(("launch", trial.name))
        self.configs = getattr(self, "configs", {}) | {trial.name: config}
        self.specs = getattr(self, "specs", {}) | {trial.name: spec}

    async def stop(self, trial, reason):
        self._maybe_refuse("stop", trial)
        self.calls.append(("stop", trial))

    async def departed(self, trial):
        if trial in self.lingering:
            return None
        return Departure(checkpoint_step=self.reported_steps.get(trial))

    async def remove(self, trial, part, spec):
        self.calls.append((f"remove {part}", trial))

    async def set_control(self, trial, control):
        self._maybe_refuse("control", trial)
        self.calls.append(("control", trial))

    async def record(self, record):
        if self.fail_ledger:
            raise RuntimeFailure(self.fail_ledger)
        if self.sneak is not None and self.sneak.id == record.id:
            self.records.append(self.sneak)
            self.sneak = None
        stored = next((r for r in self.records if r.id == record.id), None)
        if stored is not None and stored != record:
            raise LedgerConflict(record, stored)
        self.announced.append(record.id)
        if stored is None:
            self.records.append(record)

    async def ledger(self, since=0):
        return [r for r in self.records if r.seq >= since]

    async def approvals(self):
        return list(self.sign_offs)

    async def log_cycle(self, entry):
        self.cycles = [*getattr(self, "cycles", []), entry]

    async def announce(self, reason, message):
        self.events.append((reason, message))

    async def save_status(self, status):
        if self.fail_save:
            raise RuntimeFailure(self.fail_save)
        self.saved = status
        self.saves += 1


SPEC = parse_spec(
    {
        "searchSpace": [{"name": "lr", "min": 1e-4, "max": 5.0, "log": True}],
        "initialTrials": [{"lr": 5.0}, {"lr": 0.003}],
        "trialTemplate": {"hyperparameters": {"max_steps": 300, "checkpoint_interval": 50}},
        "budget": {"maxTrials": 4, "parallelTrials": 2},
    }
)


async def cycle(runtime, status, now="2026-11-22T06:00:00Z", spec=SPEC):
    return await run_cycle("exp", spec, status, runtime, HeuristicPolicy(), now, generation=3)


async def test_first_cycle_launches_initial_trials_records_before_acting_and_saves():
    runtime = MemoryRuntime()
    result = await cycle(runtime, AgentExperimentStatus())
    assert [c for c in runtime.calls] == [("launch", "exp-t000"), ("launch", "exp-t001")]
    assert [r.id for r in runtime.records] == ["exp-d00000", "exp-d00001"]
    assert runtime.saved == result.status
    assert result.status.decisions_made == 2 and result.status.observed_generation == 3
    assert {t.hyperparameters["lr"] for t in result.status.trials} == {5.0, 0.003}
    config = runtime.configs["exp-t000"]
    assert config.hyperparameters.lr == 5.0 and config.hyperparameters.max_steps == 300
    assert config.checkpoint_dir == "/ckpt/exp-t000" and config.resume_from is None


async def test_divergence_is_terminated_and_relaunched_from_its_checkpoint():
    runtime = MemoryRuntime()
    status = (await cycle(runtime, AgentExperimentStatus())).status
    runtime.metrics["exp-t000"] = {
        contract.METRIC_STEP: 60,
        contract.METRIC_NONFINITE_LOSS: 1,
        contract.METRIC_CHECKPOINT_STEP: 50,
    }
    runtime.metrics["exp-t001"] = {contract.METRIC_STEP: 60, contract.METRIC_VAL_LOSS: 2.0}
    runtime.calls.clear()
    result = await cycle(runtime, status, now="2026-11-22T06:00:10Z")
    assert ("stop", "exp-t000") in runtime.calls
    assert ("launch", "exp-t002") in runtime.calls
    child = result.status.trial("exp-t002")
    assert child.parent == "exp-t000" and child.hyperparameters["lr"] == pytest.approx(0.5)
    assert runtime.configs["exp-t002"].resume_from == "/ckpt/exp-t000"
    reasons = [r.decision.reason for r in runtime.records[2:]]
    assert reasons[0] == "nonfinite-loss" and "relaunch" in reasons[1]


async def test_a_crash_between_record_and_save_is_recovered_without_repeats():
    runtime = MemoryRuntime()
    runtime.crash_on_launch = True
    with pytest.raises(Crash):
        await cycle(runtime, AgentExperimentStatus())
    assert len(runtime.records) == 1 and runtime.saved is None  # recorded, never acted on or saved

    runtime.crash_on_launch = False  # "restart": status as last saved (nothing), ledger intact
    result = await cycle(runtime, AgentExperimentStatus())
    assert [r.id for r in result.recovered] == ["exp-d00000"]
    assert runtime.announced.count("exp-d00000") == 2  # the lost announcement is made again
    launched = [name for call, name in runtime.calls if call == "launch"]
    assert launched == sorted(set(launched))  # no trial launched twice
    assert [r.seq for r in runtime.records] == list(range(len(runtime.records)))
    assert result.status.decisions_made == len(runtime.records)
    assert len(result.status.trials) == len(launched) == 2


async def test_suspend_makes_no_decisions_and_resuming_continues():
    runtime = MemoryRuntime()
    suspended = SPEC.model_copy(update={"suspend": True})
    result = await cycle(runtime, AgentExperimentStatus(), spec=suspended)
    assert result.status.phase == "Suspended" and runtime.calls == [] and runtime.records == []
    result = await cycle(runtime, result.status)
    assert result.status.phase == "Running" and len(runtime.calls) == 2


async def test_a_failing_policy_costs_a_cycle_not_the_loop(caplog):
    class Broken:
        name = "broken"

        async def decide(self, context):
            raise RuntimeError("model returned garbage")

    runtime = MemoryRuntime()
    result = await run_cycle("exp", SPEC, AgentExperimentStatus(), runtime, Broken(), "2026-11-22T06:00:00Z")
    assert runtime.calls == [] and runtime.saved == result.status
    assert "policy broken failed" in caplog.text


def test_daemons_spread_over_the_interval():
    from trainpilot.controller.agent import slot_wait

    waits = [slot_wait("default", f"exp-{i}", 30.0, now=1000.0) for i in range(200)]
    assert all(15.0 <= wait < 45.0 for wait in waits)
    assert slot_wait("default", "exp-1", 30.0, 1000.0) == slot_wait("default", "exp-1", 30.0, 1000.0)
    slots = {round((1000.0 + wait) % 30.0) for wait in waits}
    assert len(slots) > 20  # not one burst: the phases cover the interval


# ---- nothing wedges, nothing spins silently -------------------------------------------------

FORBIDDEN = 'jobs.batch is forbidden: User "system:serviceaccount:trainpilot:trainpilot" cannot create resource "jobs"'


def condition(status, type_):
    return next((c for c in status.conditions if c.type == type_), None)


async def test_a_launch_refused_for_good_fails_that_trial_with_the_api_message_and_the_loop_goes_on():
    runtime = MemoryRuntime()
    runtime.refuse[("launch", "exp-t000")] = FORBIDDEN
    status = (await cycle(runtime, AgentExperimentStatus())).status

    failed = status.trial("exp-t000")
    assert failed.state == "Failed" and FORBIDDEN in failed.message
    assert ("launch", "exp-t001") in runtime.calls  # the other decision of the cycle was carried out
    follow_up = runtime.records[-1]
    assert follow_up.outcome == "failed" and follow_up.follows == "exp-d00000" and follow_up.seq == 2
    assert follow_up.event_reason() == contract.REASON_DECISION_FAILED and FORBIDDEN in follow_up.verdict
    assert status.decisions[-1].outcome == "failed" and status.decisions_made == 3
    health = condition(status, contract.CONDITION_ACTIONS_HEALTHY)
    assert health.status == "False" and health.reason == "DecisionFailed" and FORBIDDEN in health.message
    assert runtime.saved == status

    # The next cycle fills the slot again, and the refusal is not retried.
    runtime.calls.clear()
    status = (await cycle(runtime, status, now="2026-11-22T06:00:10Z")).status
    assert [call for call in runtime.calls if call[0] == "launch"] == [("launch", "exp-t002")]
    assert condition(status, contract.CONDITION_ACTIONS_HEALTHY).status == "True"


async def test_a_refused_launch_is_not_retried_when_its_follow_up_is_replayed():
    runtime = MemoryRuntime()
    runtime.refuse[("launch", "exp-t000")] = FORBIDDEN
    await cycle(runtime, AgentExperimentStatus())
    runtime.calls.clear()
    # A restart with nothing saved: the ledger holds the launch and the follow-up that refused it.
    status = (await cycle(runtime, AgentExperimentStatus(), now="2026-11-22T06:00:10Z")).status
    assert ("refused launch", "exp-t000") not in runtime.calls
    assert status.trial("exp-t000").state == "Failed"
    assert [r.seq for r in runtime.records] == list(range(len(runtime.records)))


async def test_a_stop_refused_for_good_fails_that_trial():
    runtime = MemoryRuntime()
    status = (await cycle(runtime, AgentExperimentStatus())).status
    runtime.metrics["exp-t000"] = {contract.METRIC_STEP: 60, contract.METRIC_NONFINITE_LOSS: 1}
    runtime.refuse[("stop", "exp-t000")] = "jobs.batch is forbidden: cannot delete"
    status = (await cycle(runtime, status, now="2026-11-22T06:00:10Z")).status
    trial = status.trial("exp-t000")
    assert trial.state == "Failed" and "stopping exp-t000 failed" in trial.message and "cannot delete" in trial.message
    assert any(r.outcome == "failed" and r.decision.action == "terminate" for r in runtime.records)


class MutateInPlace:
    name = "scripted"

    async def decide(self, context):
        if not context.status.trials:
            return [Decision(action="launch", policy=self.name, reason="t", hyperparameters={"lr": 0.01})]
        trial = context.status.trials[0]
        return [
            Decision(
                action="mutate",
                policy=self.name,
                reason="t",
                trial=trial.name,
                mode="in-place",
                hyperparameters={"lr": 0.002},
            )
        ]


async def test_a_control_update_refused_for_good_leaves_the_trial_as_it_runs():
    runtime = MemoryRuntime()
    policy = MutateInPlace()
    status = (await run_cycle("exp", SPEC, AgentExperimentStatus(), runtime, policy, "2026-11-22T06:00:00Z")).status
    runtime.refuse[("control", "exp-t000")] = 'configmaps "exp-t000-control" is forbidden'
    status = (await run_cycle("exp", SPEC, status, runtime, policy, "2026-11-22T06:00:10Z")).status
    trial = status.trial("exp-t000")
    assert trial.state == "Running" and trial.hyperparameters == {"lr": 0.01} and trial.control_generation == 0
    assert "changing exp-t000 failed" in trial.message and runtime.records[-1].outcome == "failed"


async def test_a_ledger_that_cannot_be_written_stops_all_acting_and_fails_the_experiment_after_the_limit(caplog):
    from trainpilot.loop import MAX_UNRECORDED_CYCLES, LoopMemory

    runtime, memory = MemoryRuntime(), LoopMemory()
    runtime.fail_ledger = 'configmaps "exp-ledger" is forbidden: cannot update'
    status = AgentExperimentStatus()
    for number in range(1, MAX_UNRECORDED_CYCLES + 1):
        result = await run_cycle(
            "exp", SPEC, status, runtime, HeuristicPolicy(), f"2026-11-22T06:00:{number:02d}Z", memory=memory
        )
        status = result.status
        assert runtime.calls == [] and runtime.records == []  # write-ahead: nothing it could not record
        assert "cannot update" in result.unrecorded
        assert runtime.events[-1][0] == contract.REASON_RECORDING_FAILED and "cannot update" in runtime.events[-1][1]
        assert "exp: could not write its ledger: " in caplog.text and f"({number} cycle(s) in a row" in caplog.text
        health = condition(runtime.saved, contract.CONDITION_RECORDING_HEALTHY)
        assert health.status == "False" and "cannot update" in health.message
        assert (status.phase == "Failed") == (number == MAX_UNRECORDED_CYCLES)
    assert "cannot update" in runtime.saved.message and runtime.saved.phase == "Failed"


async def test_recording_recovers_before_the_limit():
    from trainpilot.loop import LoopMemory

    runtime, memory = MemoryRuntime(), LoopMemory()
    runtime.fail_ledger = "etcdserver: request timed out"
    status = (
        await run_cycle("exp", SPEC, AgentExperimentStatus(), runtime, HeuristicPolicy(), "t0", memory=memory)
    ).status
    runtime.fail_ledger = None
    status = (await run_cycle("exp", SPEC, status, runtime, HeuristicPolicy(), "t1", memory=memory)).status
    assert memory.unrecorded_cycles == 0 and len(status.trials) == 2
    assert condition(runtime.saved, contract.CONDITION_RECORDING_HEALTHY).status == "True"


async def test_a_status_that_cannot_be_saved_fails_the_experiment_in_the_ledger_after_the_limit(caplog):
    from trainpilot.loop import MAX_UNRECORDED_CYCLES, LoopMemory

    runtime, memory = MemoryRuntime(), LoopMemory()
    runtime.fail_save = 'agentexperiments.trainpilot.dev "exp" is invalid: status.trials: Too many'
    status = AgentExperimentStatus()
    for number in range(MAX_UNRECORDED_CYCLES):
        result = await run_cycle(
            "exp", SPEC, status, runtime, HeuristicPolicy(), f"2026-11-22T06:00:{number:02d}Z", memory=memory
        )
        status = result.status
        assert "could not write its status" in caplog.text and "Too many" in result.unrecorded
    assert status.phase == "Failed" and "Too many" in status.message
    last = runtime.records[-1]
    assert (last.decision.action, last.decision.policy, last.decision.outcome) == ("complete", "trainpilot", "failed")
    assert ("stop", "exp-t000") in runtime.calls  # the failing is recorded, so it is carried out
    assert runtime.saved is None


class Broken:
    name = "broken"

    def __init__(self, failures: int = 10**6) -> None:
        self.failures = failures

    async def decide(self, context):
        if self.failures:
            self.failures -= 1
            raise ModuleNotFoundError("No module named 'optuna'")
        return []


async def test_a_policy_that_keeps_raising_is_reported_and_fails_the_experiment_after_the_limit(caplog):
    spec = SPEC.model_copy(deep=True)
    spec.policy.max_consecutive_failures = 3
    runtime, status = MemoryRuntime(), AgentExperimentStatus()
    for number in range(1, 4):
        status = (await run_cycle("exp", spec, status, runtime, Broken(), f"2026-11-22T06:00:0{number}Z")).status
        health = condition(status, contract.CONDITION_POLICY_HEALTHY)
        assert health.status == "False" and health.reason == "PolicyFailing"
        assert "No module named 'optuna'" in health.message and f"failed {number} cycle(s) in a row" in health.message
        assert runtime.events[-1][0] == contract.REASON_POLICY_FAILING
        assert f"exp: policy broken failed {number} cycle(s)" in caplog.text
        assert (status.phase == "Failed") == (number == 3)
    assert "maxConsecutiveFailures 3" in status.message and "optuna" in status.message
    [record] = runtime.records
    assert record.decision.policy == "trainpilot" and record.event_reason() == contract.REASON_EXPERIMENT_FAILED


async def test_a_policy_that_recovers_is_healthy_again():
    runtime, status, policy = MemoryRuntime(), AgentExperimentStatus(), Broken(failures=2)
    for number in range(3):
        status = (await run_cycle("exp", SPEC, status, runtime, policy, f"2026-11-22T06:00:0{number}Z")).status
    health = condition(status, contract.CONDITION_POLICY_HEALTHY)
    assert health.status == "True" and status.policy_failures == 0 and status.phase == "Pending"


# ---- the ledger is data: replayed records are checked again -----------------------------------


def forged(seq: int, **decision) -> DecisionRecord:
    decision.setdefault("policy", "heuristic")
    decision.setdefault("reason", "initial-trial")
    return DecisionRecord(
        id=f"exp-d{seq:05d}",
        seq=seq,
        time="2026-11-22T05:00:00Z",
        experiment="exp",
        decision=Decision(**decision),
        outcome="executed",
        new_trial=f"exp-t{seq:03d}" if decision["action"] == "launch" else None,
    )


async def test_a_forged_executed_record_is_rejected_on_replay_and_never_carried_out():
    runtime = MemoryRuntime()
    # Written into the ledger by someone who may edit ConfigMaps, beyond what status has seen.
    runtime.records.append(forged(0, action="launch", hyperparameters={"lr": 1e9}))
    status = (await cycle(runtime, AgentExperimentStatus())).status

    assert ("launch", "exp-t000") not in runtime.calls or status.trial("exp-t000").hyperparameters["lr"] != 1e9
    assert all(t.hyperparameters["lr"] != 1e9 for t in status.trials)
    [rejection] = [r for r in runtime.records if r.follows == "exp-d00000"]
    assert rejection.outcome == "rejected" and rejection.event_reason() == contract.REASON_DECISION_REJECTED
    assert "no longer passes the guardrails" in rejection.verdict and "searchSpace" in rejection.verdict
    assert status.decisions[0].outcome == "rejected"
    assert [r.seq for r in runtime.records] == list(range(len(runtime.records)))

    # Replayed again after another restart: still never carried out, and no second rejection.
    runtime.calls.clear()
    await cycle(runtime, AgentExperimentStatus(), now="2026-11-22T06:00:10Z")
    assert [r.follows for r in runtime.records].count("exp-d00000") == 1
    assert all(c[1] != "exp-t000" or runtime.configs[c[1]].hyperparameters.lr != 1e9 for c in runtime.calls)


async def test_a_replayed_record_naming_a_trial_the_engine_would_not_is_rejected():
    runtime = MemoryRuntime()
    hijack = forged(0, action="launch", hyperparameters={"lr": 0.01}).model_copy(update={"new_trial": "kube-system"})
    runtime.records.append(hijack)
    status = (await cycle(runtime, AgentExperimentStatus())).status
    assert status.trial("kube-system") is None and ("launch", "kube-system") not in runtime.calls
    [rejection] = [r for r in runtime.records if r.follows == "exp-d00000"]
    assert "names new trial 'kube-system'" in rejection.verdict


async def test_a_replayed_action_the_spec_no_longer_allows_is_rejected():
    runtime = MemoryRuntime()
    runtime.records.append(forged(0, action="launch", hyperparameters={"lr": 0.01}))
    spec = SPEC.model_copy(deep=True)
    spec.policy.allowed_actions = ["terminate", "complete"]
    status = (await cycle(runtime, AgentExperimentStatus(), spec=spec)).status
    assert runtime.calls == [] and status.trials == []
    assert "allowedActions" in runtime.records[-1].verdict


async def test_a_genuine_record_beyond_status_is_still_carried_out():
    runtime = MemoryRuntime()
    runtime.records.append(forged(0, action="launch", hyperparameters={"lr": 0.01}))
    status = (await cycle(runtime, AgentExperimentStatus())).status
    assert ("launch", "exp-t000") in runtime.calls and status.trial("exp-t000").hyperparameters == {"lr": 0.01}
    assert not any(r.follows for r in runtime.records)


async def test_a_record_decided_apart_from_the_ledger_is_recorded_as_rejected_and_never_carried_out():
    runtime = MemoryRuntime()
    # Another writer, with a status of its own, recorded a different decision under the same id.
    runtime.sneak = forged(0, action="launch", hyperparameters={"lr": 0.2})
    result = await cycle(runtime, AgentExperimentStatus())
    assert runtime.calls == [] and runtime.saved is None  # stale: nothing acted on, nothing saved
    rejection = runtime.records[-1]
    assert rejection.seq == 1 and rejection.outcome == "rejected" and rejection.decision.hyperparameters == {"lr": 5.0}
    assert "two writers decided apart" in rejection.verdict and rejection.follows is None
    # The next cycle replays what the ledger holds: the other writer's launch, then the rejection.
    status = (await cycle(runtime, result.status, now="2026-11-22T06:00:10Z")).status
    assert status.trial("exp-t000").hyperparameters == {"lr": 0.2}
    assert status.decisions[1].outcome == "rejected"
    assert [r.seq for r in runtime.records] == list(range(len(runtime.records)))


# ---- what the trainer never exports ---------------------------------------------------------


async def test_an_objective_the_trainer_never_exports_fails_the_experiment_naming_what_it_does():
    from trainpilot.core.engine import MAX_EVALUATIONS_WITHOUT_OBJECTIVE

    spec = SPEC.model_copy(deep=True)
    spec.objective.metric = "accuracy"
    runtime, status = MemoryRuntime(), AgentExperimentStatus()
    status = (await cycle(runtime, status, spec=spec)).status
    for evaluation in range(MAX_EVALUATIONS_WITHOUT_OBJECTIVE):
        assert status.phase != "Failed"
        for trial in status.active_trials:
            runtime.metrics[trial.name] = {
                contract.METRIC_STEP: 50 * (evaluation + 1),
                contract.METRIC_EVAL_STEP: 50 * (evaluation + 1),
                contract.METRIC_VAL_LOSS: 2.0,
            }
        status = (await cycle(runtime, status, now=f"2026-11-22T06:0{evaluation + 1}:00Z", spec=spec)).status
    assert status.phase == "Failed"
    assert "'accuracy'" in status.message and "trainpilot_accuracy" in status.message
    assert "trainpilot_val_loss" in status.message and "val_loss" in status.message
    assert f"advanced {MAX_EVALUATIONS_WITHOUT_OBJECTIVE} times" in status.message
    assert runtime.records[-1].decision.reason == "objective-not-exported"


async def test_an_exported_objective_never_trips_the_limit():
    runtime, status = MemoryRuntime(), AgentExperimentStatus()
    status = (await cycle(runtime, status)).status
    for evaluation in range(6):
        for trial in status.active_trials:
            runtime.metrics[trial.name] = {
                contract.METRIC_STEP: 40 * (evaluation + 1),
                contract.METRIC_EVAL_STEP: 40 * (evaluation + 1),
                contract.METRIC_VAL_LOSS: 2.0 - 0.1 * evaluation,
            }
        status = (await cycle(runtime, status, now=f"2026-11-22T06:0{evaluation + 1}:00Z")).status
    assert status.phase == "Running" and status.trials[1].evaluations == 6


# ---- a trial that ran all its steps ---------------------------------------------------------


async def test_a_trial_that_ran_all_its_steps_is_succeeded_when_the_experiment_completes():
    spec = SPEC.model_copy(deep=True)
    spec.objective.goal = 1.5
    runtime = MemoryRuntime()
    status = (await cycle(runtime, AgentExperimentStatus(), spec=spec)).status
    runtime.metrics["exp-t000"] = {
        contract.METRIC_STEP: 300,
        contract.METRIC_VAL_LOSS: 1.4,
        contract.METRIC_EVAL_STEP: 300,
    }
    runtime.metrics["exp-t001"] = {
        contract.METRIC_STEP: 120,
        contract.METRIC_VAL_LOSS: 2.0,
        contract.METRIC_EVAL_STEP: 100,
    }
    status = (await cycle(runtime, status, now="2026-11-22T06:00:10Z", spec=spec)).status
    assert status.phase == "Succeeded"
    assert status.trial("exp-t000").state == "Succeeded" and status.trial("exp-t001").state == "Terminated"
    assert status.trials_succeeded == 1 and status.best_trial.name == "exp-t000"


async def test_a_replayed_stop_of_a_trial_gone_since_keeps_its_reason():
    runtime = MemoryRuntime()
    saved = (await cycle(runtime, AgentExperimentStatus())).status
    runtime.metrics["exp-t000"] = {contract.METRIC_STEP: 60, contract.METRIC_NONFINITE_LOSS: 1}
    crashed_after = await cycle(runtime, saved, now="2026-11-22T06:00:10Z")  # stop carried out; status never saved
    assert ("stop", "exp-t000") in runtime.calls and crashed_after.records
    runtime.exits["exp-t000"] = 4  # its process is gone since: stopped by us, not crashed
    status = (await cycle(runtime, saved, now="2026-11-22T06:00:20Z")).status
    stopped = status.trial("exp-t000")
    assert (stopped.state, stopped.message) == ("Terminated", "nonfinite-loss") and status.trials_failed == 0
    assert not any(r.outcome == "rejected" for r in runtime.records)


async def test_a_replayed_launch_into_a_slot_freed_since_the_last_save_stands():
    runtime = MemoryRuntime()
    saved = (await cycle(runtime, AgentExperimentStatus())).status  # two trials, parallelTrials 2
    runtime.exits["exp-t000"] = 0  # it finished; the next cycle fills its slot, then the operator dies
    await cycle(runtime, saved, now="2026-11-22T06:00:10Z")
    assert ("launch", "exp-t002") in runtime.calls
    runtime.calls.clear()
    status = (await cycle(runtime, saved, now="2026-11-22T06:00:20Z")).status  # restarted from the older status
    assert status.trial("exp-t002") is not None and ("launch", "exp-t002") in runtime.calls
    assert not any(r.outcome == "rejected" for r in runtime.records)


async def test_a_forged_record_under_another_id_cannot_take_a_genuine_records_place():
    runtime = MemoryRuntime()
    impostor = forged(0, action="launch", hyperparameters={"lr": 0.01}).model_copy(update={"id": "exp-d00000-x"})
    runtime.records.extend([impostor, forged(0, action="launch", hyperparameters={"lr": 0.02})])
    status = (await cycle(runtime, AgentExperimentStatus())).status
    assert status.trial("exp-t000").hyperparameters == {"lr": 0.02}  # the genuine one was carried out
    [rejection] = [r for r in runtime.records if r.follows == "exp-d00000-x"]
    assert rejection.outcome == "rejected" and "is not an id of exp's decisions" in rejection.verdict
    await cycle(runtime, AgentExperimentStatus(), now="2026-11-22T06:00:10Z")  # replayed again: no second rejection
    assert [r.follows for r in runtime.records].count("exp-d00000-x") == 1


# ---- the hand-off of a restart: the child starts once the parent's pods are gone ---------------


class Scripted:
    """Proposes the decisions it is given, one per cycle."""

    name = "scripted"

    def __init__(self, *decisions: Decision) -> None:
        self.queue = list(decisions)

    async def decide(self, context):
        return [self.queue.pop(0)] if self.queue else []


RESTART = Decision(
    action="mutate", policy="scripted", reason="lower-lr", trial="exp-t000", mode="restart",
    hyperparameters={"lr": 0.001},
)  # fmt: skip


async def restarted_while_the_parent_lingers(runtime, checkpoint_step=100):
    """exp-t000 launched, then restarted while its process is still saving its checkpoint."""
    launch = Decision(action="launch", policy="scripted", reason="initial-trial", hyperparameters={"lr": 0.003})
    policy = Scripted(launch, RESTART)
    status = (await run_cycle("exp", SPEC, AgentExperimentStatus(), runtime, policy, "2026-11-22T06:00:00Z")).status
    runtime.metrics["exp-t000"] = {contract.METRIC_STEP: 120}
    if checkpoint_step is not None:
        runtime.metrics["exp-t000"][contract.METRIC_CHECKPOINT_STEP] = checkpoint_step
    runtime.lingering.add("exp-t000")
    status = (await run_cycle("exp", SPEC, status, runtime, policy, "2026-11-22T06:00:10Z")).status
    return status, policy


async def test_a_restarted_trials_child_starts_after_its_parent_is_gone_from_the_step_it_reported():
    runtime = MemoryRuntime()
    status, policy = await restarted_while_the_parent_lingers(runtime)
    assert ("stop", "exp-t000") in runtime.calls and ("launch", "exp-t001") not in runtime.calls
    child = status.trial("exp-t001")
    assert (child.state, child.waiting_for, child.parent) == ("Pending", "exp-t000", "exp-t000")
    assert runtime.saved.trial("exp-t001").waiting_for == "exp-t000"  # a restarted operator waits too

    status = (await run_cycle("exp", SPEC, status, runtime, policy, "2026-11-22T06:00:20Z")).status
    assert ("launch", "exp-t001") not in runtime.calls  # still saving: still waiting

    runtime.lingering.clear()
    runtime.reported_steps["exp-t000"] = 130  # its save on SIGTERM, after the last scrape (100)
    status = (await run_cycle("exp", SPEC, status, runtime, policy, "2026-11-22T06:00:30Z")).status
    assert ("launch", "exp-t001") in runtime.calls
    config = runtime.configs["exp-t001"]
    assert (config.resume_from, config.resume_tag) == ("/ckpt/exp-t000", contract.checkpoint_tag(130))
    assert config.hyperparameters.lr == 0.001
    child = status.trial("exp-t001")
    assert (child.waiting_for, child.resumed_from_step) == (None, 130)
    assert child.message == "resumed exp-t000's checkpoint at step 130"
    assert runtime.saved.trial("exp-t001").resumed_from_step == 130


@pytest.mark.parametrize(("scraped", "tag"), [(100, contract.checkpoint_tag(100)), (None, None)])
async def test_a_parent_that_reported_nothing_on_its_way_out_hands_off_what_it_reported_before(scraped, tag):
    runtime = MemoryRuntime()
    status, policy = await restarted_while_the_parent_lingers(runtime, checkpoint_step=scraped)
    runtime.lingering.clear()  # gone, its last report unseen (the operator restarted meanwhile, say)
    status = (await run_cycle("exp", SPEC, status, runtime, policy, "2026-11-22T06:00:20Z")).status
    config = runtime.configs["exp-t001"]
    assert config.resume_tag == tag and config.resume_from == ("/ckpt/exp-t000" if scraped else None)
    assert status.trial("exp-t001").resumed_from_step == scraped


async def test_a_parent_whose_pods_never_go_holds_its_child_back_only_up_to_the_handoff_timeout():
    runtime = MemoryRuntime()
    status, policy = await restarted_while_the_parent_lingers(runtime)
    status = (await run_cycle("exp", SPEC, status, runtime, policy, "2026-11-22T06:04:59Z")).status
    assert ("launch", "exp-t001") not in runtime.calls
    status = (await run_cycle("exp", SPEC, status, runtime, policy, "2026-11-22T06:05:10Z")).status
    assert ("launch", "exp-t001") in runtime.calls
    assert runtime.configs["exp-t001"].resume_tag == contract.checkpoint_tag(100)  # complete by then
    assert "still there 300 s after its stop" in status.trial("exp-t001").message


async def test_a_child_that_cannot_be_launched_after_the_handoff_fails_with_the_api_message():
    runtime = MemoryRuntime()
    status, policy = await restarted_while_the_parent_lingers(runtime)
    runtime.lingering.clear()
    runtime.refuse[("launch", "exp-t001")] = "jobs.batch is forbidden"
    status = (await run_cycle("exp", SPEC, status, runtime, policy, "2026-11-22T06:00:20Z")).status
    child = status.trial("exp-t001")
    assert child.state == "Failed" and "jobs.batch is forbidden" in child.message
    [failed] = [r for r in runtime.records if r.outcome == "failed"]
    assert failed.follows == child.decision and failed.new_trial == "exp-t001"


# ---- trials that cannot be observed -------------------------------------------------------------


async def test_trials_refused_for_good_to_be_observed_fail_the_experiment_after_the_limit():
    from trainpilot.loop import MAX_UNOBSERVED_CYCLES, LoopMemory

    runtime, memory = MemoryRuntime(), LoopMemory()
    status = (
        await run_cycle("exp", SPEC, AgentExperimentStatus(), runtime, HeuristicPolicy(), "2026-11-22T06:00:00Z")
    ).status
    runtime.fail_observe = PermanentFailure(
        'list trial pods: API error 403: pods is forbidden: cannot list resource "pods"'
    )
    for n in range(1, MAX_UNOBSERVED_CYCLES):
        now = f"2026-11-22T06:0{n}:00Z"
        status = (await run_cycle("exp", SPEC, status, runtime, HeuristicPolicy(), now, memory=memory)).status
        observed = condition(status, contract.CONDITION_OBSERVATION_HEALTHY)
        assert (observed.status, observed.reason) == ("False", contract.REASON_OBSERVATION_FAILED)
        assert f"({n} cycle(s) in a row; the limit is {MAX_UNOBSERVED_CYCLES})" in observed.message
        assert "pods is forbidden" in runtime.events[-1][1] and status.phase == "Running"
        assert runtime.saved == status  # the condition is on the object for kubectl describe
    status = (
        await run_cycle("exp", SPEC, status, runtime, HeuristicPolicy(), "2026-11-22T06:09:00Z", memory=memory)
    ).status
    assert status.phase == "Failed" and "pods is forbidden" in status.message
    assert [t.state for t in status.trials] == ["Terminated", "Terminated"]
    assert runtime.records[-1].decision.reason == "observation-failing"


async def test_an_api_server_that_does_not_answer_is_waited_out_and_said_so():
    from trainpilot.loop import MAX_UNOBSERVED_CYCLES, LoopMemory

    runtime, memory = MemoryRuntime(), LoopMemory()
    status = (
        await run_cycle("exp", SPEC, AgentExperimentStatus(), runtime, HeuristicPolicy(), "2026-11-22T06:00:00Z")
    ).status
    runtime.fail_observe = RuntimeFailure("list trial jobs: no answer from the API server (ConnectionRefusedError)")
    for n in range(2 * MAX_UNOBSERVED_CYCLES):
        status = (
            await run_cycle(
                "exp", SPEC, status, runtime, HeuristicPolicy(), f"2026-11-22T06:{10 + n}:00Z", memory=memory
            )
        ).status
    assert status.phase == "Running" and condition(status, contract.CONDITION_OBSERVATION_HEALTHY).status == "False"
    assert runtime.events[-1][0] == contract.REASON_OBSERVATION_FAILED and "no answer" in runtime.events[-1][1]
    runtime.fail_observe = None
    status = (
        await run_cycle("exp", SPEC, status, runtime, HeuristicPolicy(), "2026-11-22T06:30:00Z", memory=memory)
    ).status
    assert condition(status, contract.CONDITION_OBSERVATION_HEALTHY).status == "True"


# ---- metrics the operator cannot reach -------------------------------------------------------


async def test_metrics_that_cannot_be_reached_say_which_url_and_what_to_do_then_clear():
    from trainpilot.core.reachability import MAX_FAILED_SCRAPES

    runtime = MemoryRuntime()
    status = (await cycle(runtime, AgentExperimentStatus())).status
    url = "http://10.244.0.7:9400/metrics"
    runtime.scrape_errors = {"exp-t000": f"{url}: ClientConnectorError", "exp-t001": "http://x/metrics: timeout"}
    # Starting up (torch and DeepSpeed load before /metrics answers): failed scrapes are expected.
    for n in range(1, MAX_FAILED_SCRAPES + 2):
        status = (await cycle(runtime, status, now=f"2026-11-22T06:00:{10 * n}Z")).status
    assert not any(c.type == contract.CONDITION_METRICS_REACHABLE for c in status.conditions)
    for n in range(1, MAX_FAILED_SCRAPES + 1):
        status = (await cycle(runtime, status, now=f"2026-11-22T06:0{n + 2}:00Z")).status
    reachable = next(c for c in status.conditions if c.type == contract.CONDITION_METRICS_REACHABLE)
    assert (reachable.status, reachable.reason) == ("False", contract.REASON_METRICS_UNREACHABLE)
    assert f"scrapes in a row failed, the last: {url}" in reachable.message
    assert "(and 1 more trial(s))" in reachable.message and "run it in the cluster" in reachable.message
    assert runtime.events[-1][0] == contract.REASON_METRICS_UNREACHABLE
    runtime.scrape_errors = {}
    runtime.metrics["exp-t000"] = {contract.METRIC_STEP: 10}
    status = (await cycle(runtime, status, now="2026-11-22T06:09:00Z")).status
    reachable = next(c for c in status.conditions if c.type == contract.CONDITION_METRICS_REACHABLE)
    assert reachable.status == "True" and status.trial("exp-t000").failed_scrapes == 0


# ---- human sign-off -----------------------------------------------------------------------


async def test_a_held_launch_waits_says_so_and_starts_once_a_human_approves():
    spec = SPEC.model_copy(update={"policy": SPEC.policy.model_copy(update={"require_approval_for": ["launch"]})})
    runtime = MemoryRuntime()
    result = await cycle(runtime, AgentExperimentStatus(), spec=spec)
    # Both initial trials are held, each on its own.
    assert runtime.calls == [] and [r.outcome for r in runtime.records] == ["pending-approval"] * 2
    awaiting = next(c for c in result.status.conditions if c.type == contract.CONDITION_AWAITING_APPROVAL)
    assert awaiting.status == "True" and "trainpilot approve exp <id>" in awaiting.message
    assert "exp-d00000 (launch" in awaiting.message and "exp-d00001 (launch" in awaiting.message
    # The heuristic does not flood the ledger: the next cycle holds nothing new.
    result = await cycle(runtime, result.status, now="2026-11-22T06:00:10Z", spec=spec)
    assert len(runtime.records) == 2

    runtime.sign_offs = [Approval("exp-d00000", "approve", "alice")]
    result = await cycle(runtime, result.status, now="2026-11-22T06:00:20Z", spec=spec)
    approved = runtime.records[2]
    assert approved.follows == "exp-d00000" and approved.sign_off.by == "alice" and approved.outcome == "executed"
    assert runtime.calls[0] == ("launch", approved.new_trial)
    assert result.status.sign_off("exp-d00000").state == "Approved"
    # Still there next cycle (an annotation stays until someone removes it): nothing happens twice.
    calls = len(runtime.calls)
    result = await cycle(runtime, result.status, now="2026-11-22T06:00:30Z", spec=spec)
    assert [c for c in runtime.calls[calls:] if c == ("launch", approved.new_trial)] == []


async def test_an_approval_recorded_before_a_crash_is_carried_out_once_after_the_restart():
    spec = SPEC.model_copy(update={"policy": SPEC.policy.model_copy(update={"require_approval_for": ["launch"]})})
    runtime = MemoryRuntime()
    held = (await cycle(runtime, AgentExperimentStatus(), spec=spec)).status
    runtime.sign_offs = [Approval("exp-d00000", "approve", "alice")]
    runtime.crash_on_launch = True
    with pytest.raises(Crash):
        await cycle(runtime, held, now="2026-11-22T06:00:20Z", spec=spec)
    runtime.crash_on_launch = False  # restarted from the status saved before the approval
    result = await cycle(runtime, held, now="2026-11-22T06:00:30Z", spec=spec)
    launched = [name for call, name in runtime.calls if call == "launch"]
    assert launched == sorted(set(launched)) and "exp-t000" in launched
    follows = [r for r in runtime.records if r.follows == "exp-d00000"]
    assert len(follows) == 1 and result.status.sign_off("exp-d00000").state == "Approved"


async def test_a_sign_off_naming_no_held_decision_is_announced_once():
    runtime = MemoryRuntime()
    runtime.sign_offs = [Approval("exp-d00042", "approve", "alice")]
    status, memory = AgentExperimentStatus(), LoopMemory()
    for second in (0, 10, 20):
        status = (
            await run_cycle(
                "exp", SPEC, status, runtime, HeuristicPolicy(), f"2026-11-22T06:00:{second:02d}Z", memory=memory
            )
        ).status
    ignored = [m for reason, m in runtime.events if reason == contract.REASON_SIGN_OFF_IGNORED]
    assert len(ignored) == 1 and "exp-d00042 is not a decision held for approval" in ignored[0]


async def test_a_model_that_refuses_the_operator_for_good_is_announced_once_and_stays_a_condition():
    class Refused(HeuristicPolicy):
        def health(self):
            return False, "Claude refused the operator's calls (HTTP 401 authentication_error)"

    runtime, status, memory = MemoryRuntime(), AgentExperimentStatus(), LoopMemory()
    for second in (0, 10):
        now = f"2026-11-22T06:00:{second:02d}Z"
        status = (await run_cycle("exp", SPEC, status, runtime, Refused(), now, memory=memory)).status
    said = [m for reason, m in runtime.events if reason == contract.REASON_MODEL_REFUSED]
    assert said == ["Claude refused the operator's calls (HTTP 401 authentication_error)"]
    condition = next(c for c in status.conditions if c.type == contract.CONDITION_MODEL_AVAILABLE)
    assert condition.status == "False" and runtime.records  # the heuristic went on deciding


# ---- waiting for quota ----------------------------------------------------------------------


class Insistent:
    """Asks for two launches every cycle, whatever the quota says."""

    name = "insistent"

    def __init__(self) -> None:
        self.asked = 0

    async def decide(self, context):
        self.asked += 1
        lr = 0.001 * self.asked  # a fresh point each time, as an optimizer would propose
        return [
            Decision(action="launch", policy="insistent", reason="more", hyperparameters={"lr": lr}),
            Decision(action="launch", policy="insistent", reason="more", hyperparameters={"lr": lr * 2}),
        ]


async def test_a_launch_past_the_quota_waits_on_one_record_and_proceeds_once_there_is_room():
    from trainpilot.api.quota import QuotaLimits

    spec = SPEC.model_copy(update={"initial_trials": [], "budget": SPEC.budget.model_copy(update={"max_trials": 6})})
    limits = QuotaLimits(max_parallel_trials=1, sources={"max_parallel_trials": "team-ml"})
    runtime, policy, memory, status = MemoryRuntime(), Insistent(), LoopMemory(), AgentExperimentStatus()
    for second in range(4):
        now = f"2026-11-22T06:00:{second * 10:02d}Z"
        status = (await run_cycle("exp", spec, status, runtime, policy, now, limits=limits, memory=memory)).status
    # Four cycles of asking for two: one launch ran, one waits, and nothing else was recorded.
    assert [r.outcome for r in runtime.records] == ["executed", "waiting"]
    waiting = runtime.records[1]
    assert "QuotaPolicy team-ml max_parallel_trials is 1" in waiting.verdict
    assert waiting.event_reason() == contract.REASON_QUOTA_EXCEEDED  # its Event's reason
    condition = next(c for c in status.conditions if c.type == contract.CONDITION_QUOTA_AVAILABLE)
    assert condition.status == "False" and condition.reason == contract.REASON_QUOTA_EXCEEDED
    assert waiting.id in condition.message and "team-ml" in condition.message
    assert [w.state for w in status.quota_waits] == ["Waiting"]
    # kubectl describe shows every bound in force and the policy that set it.
    assert status.quota_limits == {"maxParallelTrials": "1 (QuotaPolicy team-ml)"}

    runtime.exits["exp-t000"] = 0  # the running trial finishes: its slot frees up
    status = (
        await run_cycle("exp", spec, status, runtime, policy, "2026-11-22T06:01:00Z", limits=limits, memory=memory)
    ).status
    proceeded = runtime.records[2]
    assert proceeded.follows == waiting.id and proceeded.outcome == "executed"
    assert proceeded.decision.hyperparameters == waiting.decision.hyperparameters  # what waited, not a new point
    assert ("launch", proceeded.new_trial) in runtime.calls
    assert status.quota_waits[0].state == "Proceeded"
    # The policy's fresh asks wait again, on one new record.
    assert [r.outcome for r in runtime.records[3:]] == ["waiting"]


async def test_a_waiting_decision_that_no_longer_passes_is_dropped_with_why():
    from trainpilot.api.quota import QuotaLimits

    spec = SPEC.model_copy(update={"initial_trials": [], "budget": SPEC.budget.model_copy(update={"max_trials": 2})})
    limits = QuotaLimits(max_parallel_trials=1, sources={"max_parallel_trials": "team-ml"})
    runtime, memory = MemoryRuntime(), LoopMemory()

    class Once:
        name = "once"
        asked = False

        async def decide(self, context):
            if self.asked:
                return []
            self.asked = True
            return [Decision(action="launch", policy="once", reason="r", hyperparameters={"lr": 0.01})] * 2

    policy = Once()
    status = (
        await run_cycle(
            "exp", spec, AgentExperimentStatus(), runtime, policy, "2026-11-22T06:00:00Z", limits=limits, memory=memory
        )
    ).status
    assert [r.outcome for r in runtime.records] == ["executed", "waiting"]
    # The budget shrinks (a spec edit) to the one trial already launched: the wait can never be met.
    smaller = spec.model_copy(update={"budget": spec.budget.model_copy(update={"max_trials": 1, "parallel_trials": 1})})
    status = (
        await run_cycle("exp", smaller, status, runtime, policy, "2026-11-22T06:00:10Z", limits=limits, memory=memory)
    ).status
    dropped = runtime.records[2]
    assert dropped.outcome == "rejected" and dropped.follows == runtime.records[1].id
    assert "dropped while waiting for quota: spec.budget.maxTrials is 1" in dropped.verdict
    assert status.quota_waits[0].state == "Dropped"


async def test_a_quota_policy_raised_or_deleted_mid_run_lets_what_waits_proceed_next_cycle():
    from trainpilot.api.quota import QuotaLimits

    budget = SPEC.budget.model_copy(update={"max_trials": 8, "parallel_trials": 4})
    spec = SPEC.model_copy(update={"initial_trials": [], "budget": budget})
    runtime, policy, memory = MemoryRuntime(), Insistent(), LoopMemory()
    tight = QuotaLimits(max_parallel_trials=1, sources={"max_parallel_trials": "team-ml"})
    status = AgentExperimentStatus()
    status = (
        await run_cycle("exp", spec, status, runtime, policy, "2026-11-22T06:00:00Z", limits=tight, memory=memory)
    ).status
    assert [r.outcome for r in runtime.records] == ["executed", "waiting"]
    # The admin edits the policy to 2 parallel trials: the waiting launch goes first, then one fresh ask waits.
    edited = QuotaLimits(max_parallel_trials=2, sources={"max_parallel_trials": "team-ml"})
    status = (
        await run_cycle("exp", spec, status, runtime, policy, "2026-11-22T06:00:10Z", limits=edited, memory=memory)
    ).status
    assert [r.outcome for r in runtime.records[2:]] == ["executed", "waiting"]
    assert runtime.records[2].follows == runtime.records[1].id
    # The admin deletes the policy: what waits proceeds, and nothing waits any more.
    status = (
        await run_cycle("exp", spec, status, runtime, policy, "2026-11-22T06:00:20Z", limits=None, memory=memory)
    ).status
    assert runtime.records[4].follows == runtime.records[3].id and runtime.records[4].outcome == "executed"
    assert status.waiting_for_quota == []
    condition = next(c for c in status.conditions if c.type == contract.CONDITION_QUOTA_AVAILABLE)
    assert condition.status == "True"


# ---- trials scored on different validation sets ------------------------------------------------


async def test_trials_scored_on_another_validation_set_are_announced_once_and_left_out_of_the_best():
    runtime = MemoryRuntime()
    status = (await cycle(runtime, AgentExperimentStatus())).status  # launches exp-t000 and exp-t001
    runtime.metrics["exp-t000"] = {contract.METRIC_STEP: 10, contract.METRIC_VALIDATION_FINGERPRINT: 0xAA}
    runtime.metrics["exp-t001"] = {contract.METRIC_STEP: 10, contract.METRIC_VALIDATION_FINGERPRINT: 0xAA}
    status = (await cycle(runtime, status, now="2026-11-22T06:01:00Z")).status
    assert not any(c.type == contract.CONDITION_TRIALS_COMPARABLE for c in status.conditions)  # unset while fine
    runtime.metrics["exp-t001"][contract.METRIC_VALIDATION_FINGERPRINT] = 0xBB
    runtime.metrics["exp-t001"][contract.METRIC_VAL_LOSS] = 0.5  # better, but measured on other data
    runtime.metrics["exp-t001"][contract.METRIC_EVAL_STEP] = 10
    for minute in (2, 3):
        status = (await cycle(runtime, status, now=f"2026-11-22T06:0{minute}:00Z")).status
    comparable = next(c for c in status.conditions if c.type == contract.CONDITION_TRIALS_COMPARABLE)
    assert (comparable.status, comparable.reason) == ("False", contract.REASON_VALIDATION_MISMATCH)
    assert "exp-t001 (0000000000bb) scored on another validation set than exp-t000's (0000000000aa)" in (
        comparable.message
    )
    assert [event for event in runtime.events if event[0] == contract.REASON_VALIDATION_MISMATCH] == [
        (contract.REASON_VALIDATION_MISMATCH, comparable.message)
    ]  # one Event, not one per cycle
    assert status.best_trial is None or status.best_trial.name != "exp-t001"


# ---- spec edits (docs/spec-edits.md) -----------------------------------------------------------


def edited(**template) -> object:
    """SPEC with trialTemplate fields changed (and its hyperparameters merged)."""
    hyperparameters = {**SPEC.trial_template.hyperparameters, **template.pop("hyperparameters", {})}
    return SPEC.model_copy(
        update={
            "trial_template": SPEC.trial_template.model_copy(update={"hyperparameters": hyperparameters, **template})
        }
    )


async def test_a_template_edit_reaches_fresh_trials_while_a_relaunch_resumes_as_its_source_was_launched():
    runtime = MemoryRuntime()
    status = (await cycle(runtime, AgentExperimentStatus())).status
    assert runtime.specs["exp-t000"].trial_template.image == SPEC.trial_template.image
    new_spec = edited(image="trainer:2", hyperparameters={"warmup_steps": 25})
    runtime.metrics["exp-t000"] = {
        contract.METRIC_STEP: 60,
        contract.METRIC_NONFINITE_LOSS: 1,
        contract.METRIC_CHECKPOINT_STEP: 50,
    }
    runtime.metrics["exp-t001"] = {contract.METRIC_STEP: 60, contract.METRIC_VAL_LOSS: 2.0}
    runtime.exits["exp-t001"] = 0
    result = await cycle(runtime, status, now="2026-11-22T06:00:10Z", spec=new_spec)
    relaunch = result.status.trial("exp-t002")
    assert relaunch is not None and relaunch.parent == "exp-t000"
    assert runtime.configs["exp-t002"].resume_from == "/ckpt/exp-t000"
    # The relaunch resumes exp-t000's checkpoint: it runs exp-t000's template, not the edited one.
    assert runtime.specs["exp-t002"].trial_template == SPEC.trial_template
    assert runtime.configs["exp-t002"].hyperparameters.warmup_steps == SPEC.trial_template.hyperparameters.get(
        "warmup_steps", 10
    )
    fresh = [name for name in runtime.configs if name not in ("exp-t000", "exp-t001", "exp-t002")]
    assert fresh, runtime.calls  # the slot exp-t001 freed goes to a fresh trial
    assert runtime.specs[fresh[0]].trial_template.image == "trainer:2"
    assert runtime.configs[fresh[0]].hyperparameters.warmup_steps == 25
    assert condition(result.status, contract.CONDITION_SPEC_EDITS_APPLIED) is None  # nothing refused


async def test_a_refused_edit_keeps_the_value_in_force_says_so_once_and_clears_when_set_back():
    runtime = MemoryRuntime()
    status = (await cycle(runtime, AgentExperimentStatus())).status
    first = runtime.configs["exp-t000"].hyperparameters
    wrong = edited(hyperparameters={"block_size": first.block_size * 2, "warmup_steps": 30})
    wrong = wrong.model_copy(update={"objective": wrong.objective.model_copy(update={"direction": "maximize"})})
    runtime.exits["exp-t001"] = 0  # frees a slot: a fresh trial is launched under the spec in force
    runtime.metrics["exp-t001"] = {contract.METRIC_STEP: 300, contract.METRIC_VAL_LOSS: 2.0}
    for second in range(10, 40, 10):
        status = (await cycle(runtime, status, now=f"2026-11-22T06:00:{second}Z", spec=wrong)).status
    refused = condition(status, contract.CONDITION_SPEC_EDITS_APPLIED)
    assert refused.status == "False" and refused.reason == contract.REASON_SPEC_EDIT_REFUSED
    assert "spec.objective.direction 'maximize' (in force: 'minimize')" in refused.message
    doubled = first.block_size * 2
    assert f"spec.trialTemplate.hyperparameters.block_size {doubled} (in force: " in refused.message
    assert [reason for reason, _ in runtime.events].count(contract.REASON_SPEC_EDIT_REFUSED) == 1
    fresh = [name for name in runtime.configs if name not in ("exp-t000", "exp-t001")]
    assert fresh
    for name in fresh:  # the allowed edit applies, the refused one does not
        assert runtime.configs[name].hyperparameters.block_size == first.block_size
        assert runtime.configs[name].hyperparameters.warmup_steps == 30
    assert status.best_trial is None or status.best_trial.objective == 2.0  # still minimised

    status = (await cycle(runtime, status, now="2026-11-22T06:01:00Z", spec=edited(hyperparameters={}))).status
    assert condition(status, contract.CONDITION_SPEC_EDITS_APPLIED).status == "True"


async def test_an_edit_held_while_trials_run_applies_in_the_cycle_that_sees_the_last_one_finish():
    runtime = MemoryRuntime()
    launched = edited(checkpoints=CheckpointVolume(claim_name="ckpt"))
    status = (await cycle(runtime, AgentExperimentStatus(), spec=launched)).status
    moved = edited(checkpoints=CheckpointVolume(claim_name="other"))
    status = (await cycle(runtime, status, now="2026-11-22T06:00:10Z", spec=moved)).status
    assert condition(status, contract.CONDITION_SPEC_EDITS_APPLIED).status == "False"
    for trial in ("exp-t000", "exp-t001"):
        runtime.exits[trial] = 0
        runtime.metrics[trial] = {contract.METRIC_STEP: 300, contract.METRIC_VAL_LOSS: 2.0}
    status = (await cycle(runtime, status, now="2026-11-22T06:00:20Z", spec=moved)).status
    # The cycle that sees both finish launches the next trials on the new volume, not the old one.
    fresh = [name for name in runtime.specs if name not in ("exp-t000", "exp-t001")]
    assert fresh and all(runtime.specs[name].trial_template.checkpoints.claim_name == "other" for name in fresh)
    assert condition(status, contract.CONDITION_SPEC_EDITS_APPLIED).status == "True"


# ---- retention ------------------------------------------------------------------------------------


async def test_retention_records_each_deletion_before_it_acts_and_never_repeats_one():
    runtime = MemoryRuntime()
    runtime.removable = frozenset({"checkpoints", "children"})
    spec = SPEC.model_copy(
        update={"retention": SPEC.retention.model_copy(update={"checkpoint_trials": 0, "children_after_seconds": 30})}
    )
    status = (await cycle(runtime, AgentExperimentStatus(), spec=spec)).status
    runtime.metrics["exp-t001"] = {
        contract.METRIC_STEP: 300,
        contract.METRIC_VAL_LOSS: 2.0,
        contract.METRIC_CHECKPOINT_STEP: 300,
    }
    runtime.exits["exp-t001"] = 0
    status = (await cycle(runtime, status, now="2026-11-22T06:00:10Z", spec=spec)).status
    assert status.trial("exp-t001").state == "Succeeded"
    # Its checkpoints go at once (checkpointTrials 0) unless it is the best: exp-t001 is, so they stay.
    assert ("remove checkpoints", "exp-t001") not in runtime.calls
    runtime.calls.clear()
    for second in (20, 50, 55):
        status = (await cycle(runtime, status, now=f"2026-11-22T06:00:{second}Z", spec=spec)).status
    assert [c for c in runtime.calls if c[0].startswith("remove")] == [("remove children", "exp-t001")]
    [record] = [r for r in runtime.records if r.decision.action == "clean-up"]
    assert record.decision.trial == "exp-t001" and record.decision.removes == "children"
    assert runtime.records.index(record) == record.seq  # in the sequence, written before it acted
    assert status.trial("exp-t001").removed == ["children"]
    assert (
        record.event_reason() == contract.REASON_TRIAL_CLEANED_UP and "childrenAfterSeconds is 30" in record.message()
    )
