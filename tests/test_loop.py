"""The shared agent loop over an in-memory runtime: ordering, recovery after a crash, suspend."""

from __future__ import annotations

import pytest

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentStatus, parse_spec
from trainpilot.api.metrics import TrialMetrics
from trainpilot.core.decision import DecisionRecord
from trainpilot.core.observation import Observation, TrialObservation
from trainpilot.core.policy import HeuristicPolicy
from trainpilot.loop import run_cycle


class Crash(Exception):
    pass


class MemoryRuntime:
    """Records calls; trials report whatever the test scripts for them."""

    name = "memory"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.records: list[DecisionRecord] = []
        self.saved: AgentExperimentStatus | None = None
        self.metrics: dict[str, dict[str, float]] = {}
        self.exits: dict[str, int] = {}
        self.crash_on_launch = False
        self.announced: list[str] = []

    def checkpoint_dir(self, trial):
        return f"/ckpt/{trial}"

    async def observe(self, status):
        observation = Observation(time="t")
        for trial in status.active_trials:
            code = self.exits.get(trial.name)
            phase = "Running" if code is None else ("Succeeded" if code == 0 else "Failed")
            reason = None if code is None else contract.EXIT_REASONS[code]
            metrics = TrialMetrics(values=self.metrics.get(trial.name, {}))
            observation.trials[trial.name] = TrialObservation(
                name=trial.name, phase=phase, exit_reason=reason, exit_code=code, metrics=metrics
            )
        return observation

    async def launch(self, trial, config, record):
        if self.crash_on_launch:
            raise Crash("operator killed mid-cycle")
        self.calls.append(("launch", trial.name))
        self.configs = getattr(self, "configs", {}) | {trial.name: config}

    async def stop(self, trial, reason):
        self.calls.append(("stop", trial))

    async def set_control(self, trial, control):
        self.calls.append(("control", trial))

    async def record(self, record):
        self.announced.append(record.id)
        if record.id not in {r.id for r in self.records}:
            self.records.append(record)

    async def ledger(self):
        return list(self.records)

    async def save_status(self, status):
        self.saved = status


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
