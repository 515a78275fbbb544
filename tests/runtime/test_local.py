"""LocalRuntime against a fake trainer: processes, files, metrics, exit codes, signals, GPUs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.localkit import make_spec
from trainpilot.api.experiment import AgentExperimentStatus, TrialStatus
from trainpilot.api.trial import ControlFile
from trainpilot.core import ledger as ledger_format
from trainpilot.core.decision import Decision, DecisionRecord
from trainpilot.core.trials import build_trial_config
from trainpilot.runtime.base import Departure, LedgerConflict, PermanentFailure, RuntimeFailure
from trainpilot.runtime.files import atomic_write
from trainpilot.runtime.local import LocalRuntime, parse_result_line

EXPERIMENT = "quickstart"


def record(seq: int, action: str = "launch", trial: str | None = None, rationale: str = "why not") -> DecisionRecord:
    return DecisionRecord(
        id=f"{EXPERIMENT}-d{seq:05d}",
        seq=seq,
        time="2026-01-01T00:00:00+00:00",
        experiment=EXPERIMENT,
        decision=Decision(action=action, policy="heuristic", reason="initial-trial", rationale=rationale, trial=trial),
        outcome="executed",
        new_trial=trial if action == "launch" else None,
    )


def make_runtime(tmp_path: Path, fake_command, env=None, **kwargs) -> LocalRuntime:
    spec = make_spec(env=env, max_steps=kwargs.pop("max_steps", 40), eval_interval=10, checkpoint_interval=10)
    return LocalRuntime(tmp_path / "run", EXPERIMENT, spec, command=fake_command, cores=2, **kwargs)


def trial_status(name: str, lr: float = 0.003, index: int = 0, **extra) -> TrialStatus:
    return TrialStatus(
        name=name, index=index, hyperparameters={"lr": lr, "weight_decay": 0.0}, state="Running", **extra
    )


async def launch(runtime: LocalRuntime, trial: TrialStatus, seq: int = 0) -> None:
    config = build_trial_config(EXPERIMENT, runtime.spec, trial, runtime.checkpoint_dir(trial.name), None)
    launched = trial.model_copy(update={"decision": record(seq, "launch", trial.name).id})
    await runtime.launch(launched, config, runtime.spec)


def long_runtime(tmp_path: Path, fake_command, env=None, **kwargs) -> LocalRuntime:
    """A trainer that steps every 50 ms and would run for minutes: it is stopped, not finished."""
    env = {"FAKE_STEP_SECONDS": "0.05", **(env or {})}
    return make_runtime(tmp_path, fake_command, env=env, max_steps=10_000, **kwargs)


async def start_running(runtime: LocalRuntime) -> tuple[TrialStatus, AgentExperimentStatus]:
    """Launch one trial and wait until it serves metrics."""
    trial = trial_status("quickstart-t000")
    status = AgentExperimentStatus(trials=[trial])
    await launch(runtime, trial)
    await observe_until(runtime, status, trial.name, {"Running"}, with_metrics=True)
    return trial, status


async def observe_until(
    runtime: LocalRuntime, status: AgentExperimentStatus, name: str, phases, timeout=20.0, with_metrics=False
):
    deadline = time.monotonic() + timeout
    while True:
        observation = (await runtime.observe(status)).trials[name]
        if observation.phase in phases and (observation.metrics is not None or not with_metrics):
            return observation
        assert time.monotonic() < deadline, f"{name} stuck in {observation.phase}"
        await asyncio.sleep(0.1)


async def test_launch_runs_to_completion_with_files_and_metrics(tmp_path, fake_command):
    runtime = make_runtime(tmp_path, fake_command, env={"FAKE_STEP_SECONDS": "0.05"})
    trial = trial_status("quickstart-t000")
    status = AgentExperimentStatus(trials=[trial])
    await launch(runtime, trial)
    directory = runtime.run_dir / "trials" / trial.name
    config = json.loads((directory / "config.json").read_text())
    assert config["trial"] == trial.name
    assert config["checkpoint_dir"] == str(runtime.run_dir / "checkpoints" / trial.name)
    assert config["control_file"] == str(directory / "control.json")
    assert ControlFile.model_validate_json((directory / "control.json").read_text()).generation == 0

    running = await observe_until(runtime, status, trial.name, {"Running"})
    assert running.exit_reason is None
    # A scrape with data arrives while it trains.
    deadline = time.monotonic() + 10
    while True:
        observation = (await runtime.observe(status)).trials[trial.name]
        if observation.metrics is not None and observation.metrics.step > 0:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    finished = await observe_until(runtime, status, trial.name, {"Succeeded", "Failed"})
    assert finished.phase == "Succeeded" and finished.exit_reason == "completed" and finished.exit_code == 0
    assert finished.metrics is not None and finished.metrics.step == 40
    lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert lines and {"time", "step", "values"} <= set(lines[0])
    assert lines[-1]["values"]["trainpilot_max_steps"] == 40
    log = (directory / "log.txt").read_text()
    assert "starting quickstart-t000" in log and "TRAINPILOT_RESULT" in log
    env = json.loads((directory / "env.json").read_text())
    assert env["TRAINPILOT_METRICS_ADDR"] == "127.0.0.1"
    assert env["TRAINPILOT_TRIAL_CONFIG"] == str(directory / "config.json")
    assert env["TRAINPILOT_CONTROL_FILE"] == str(directory / "control.json")
    assert env["DS_ACCELERATOR"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["OMP_NUM_THREADS"] == "1"  # 2 cores, 2 parallel trials
    await runtime.close()


@pytest.mark.parametrize(
    ("code", "reason"), [(3, "diverged"), (2, "invalid-config"), (1, "crashed"), (4, "terminated"), (9, "crashed")]
)
async def test_exit_codes_become_exit_reasons(tmp_path, fake_command, code, reason):
    runtime = make_runtime(tmp_path, fake_command, env={"FAKE_EXIT": str(code), "FAKE_LINGER": "0"})
    trial = trial_status("quickstart-t000")
    await launch(runtime, trial)
    observation = await observe_until(
        runtime, AgentExperimentStatus(trials=[trial]), trial.name, {"Failed", "Succeeded"}
    )
    assert (observation.phase, observation.exit_reason, observation.exit_code) == ("Failed", reason, code)
    # The process is gone and /metrics with it, yet the final values survive (TRAINPILOT_RESULT line).
    assert observation.metrics is not None and observation.metrics.step == 3


async def test_killed_process_is_crashed(tmp_path, fake_command):
    runtime = make_runtime(tmp_path, fake_command, env={"FAKE_STEP_SECONDS": "0.2"})
    trial = trial_status("quickstart-t000")
    await launch(runtime, trial)
    os.kill(runtime.trials[trial.name].pid, signal.SIGKILL)
    observation = await observe_until(runtime, AgentExperimentStatus(trials=[trial]), trial.name, {"Failed"})
    assert observation.exit_reason == "crashed" and observation.exit_code == -signal.SIGKILL


async def test_final_values_from_last_metrics_line_without_result(tmp_path, fake_command):
    runtime = make_runtime(tmp_path, fake_command)
    directory = runtime.trial_dir("quickstart-t000")
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text(
        json.dumps({"time": "t", "step": 7, "values": {"trainpilot_step": 7, "trainpilot_val_loss": 1.5}}) + "\n"
    )
    assert runtime._last_metrics_line("quickstart-t000").get("trainpilot_val_loss") == 1.5
    parsed = parse_result_line('noise\nTRAINPILOT_RESULT {"step": 12, "val_loss": 2.0, "trainpilot_grad_norm": 0.5}\n')
    assert parsed.values == {"trainpilot_step": 12.0, "trainpilot_val_loss": 2.0, "trainpilot_grad_norm": 0.5}
    assert parse_result_line("TRAINPILOT_RESULT {not json") is None


async def test_children_start_in_their_own_session(tmp_path, fake_command):
    runtime = make_runtime(tmp_path, fake_command, env={"FAKE_STEP_SECONDS": "0.2"})
    trial = trial_status("quickstart-t000")
    await launch(runtime, trial)
    pid = runtime.trials[trial.name].pid
    assert os.getsid(pid) == pid != os.getsid(0)
    await runtime.close(grace=10)


async def test_launch_is_idempotent(tmp_path, fake_command):
    runtime = make_runtime(tmp_path, fake_command, env={"FAKE_STEP_SECONDS": "0.2"})
    trial = trial_status("quickstart-t000")
    await launch(runtime, trial)
    pid = runtime.trials[trial.name].pid
    await launch(runtime, trial)
    assert runtime.trials[trial.name].pid == pid and len(runtime.trials) == 1
    await runtime.close(grace=10)


async def test_stop_sends_sigterm_and_trial_checkpoints(tmp_path, fake_command):
    runtime = long_runtime(tmp_path, fake_command)
    trial, status = await start_running(runtime)
    await asyncio.sleep(0.3)
    await runtime.stop(trial.name, "asha-rung")
    await runtime.stop(trial.name, "asha-rung")  # a second stop is a no-op
    observation = await observe_until(runtime, status, trial.name, {"Failed"})
    assert observation.exit_reason == "terminated" and observation.exit_code == 4
    assert runtime.has_checkpoint(trial.name)
    await runtime.stop("never-launched", "x")  # already gone is success


async def test_a_stopped_trial_has_departed_once_its_process_is_gone_with_the_step_it_saved(tmp_path, fake_command):
    runtime = long_runtime(tmp_path, fake_command, env={"FAKE_LINGER": "1"})
    trial, status = await start_running(runtime)
    await asyncio.sleep(0.3)
    await runtime.stop(trial.name, "restart")
    assert await runtime.departed(trial.name) is None  # saving, then lingering a second before it exits
    await observe_until(runtime, status, trial.name, {"Failed"})
    departure = await runtime.departed(trial.name)
    saved = int((Path(runtime.checkpoint_dir(trial.name)) / "latest").read_text())
    assert departure is not None and departure.checkpoint_step == saved > 0
    assert await runtime.departed("never-launched") == Departure(checkpoint_step=None)


async def test_sigkill_escalation_after_grace(tmp_path, fake_command):
    runtime = long_runtime(tmp_path, fake_command, env={"FAKE_IGNORE_TERM": "1"}, kill_after=0.5)
    messages: list[str] = []
    runtime.on_message = messages.append
    trial, status = await start_running(runtime)
    await runtime.stop(trial.name, "terminate")
    await asyncio.sleep(0.7)
    assert runtime.running()
    observation = await observe_until(runtime, status, trial.name, {"Failed"}, timeout=10)
    assert observation.exit_code == -signal.SIGKILL and observation.exit_reason == "crashed"
    assert any("SIGKILL" in message for message in messages)


async def test_close_stops_everything_within_grace(tmp_path, fake_command):
    runtime = make_runtime(tmp_path, fake_command, env={"FAKE_IGNORE_TERM": "1"}, max_steps=10_000)
    for index in range(2):
        await launch(runtime, trial_status(f"quickstart-t00{index}", index=index), seq=index)
    await asyncio.sleep(0.5)
    started = time.monotonic()
    await runtime.close(grace=1.0)
    assert not runtime.running() and time.monotonic() - started < 8


async def test_set_control_is_atomic_json(tmp_path, fake_command):
    runtime = make_runtime(tmp_path, fake_command)
    await runtime.set_control("quickstart-t000", ControlFile(generation=2, lr=0.01))
    path = runtime.trial_dir("quickstart-t000") / "control.json"
    assert ControlFile.model_validate_json(path.read_text()) == ControlFile(generation=2, lr=0.01)
    assert [p.name for p in path.parent.iterdir()] == ["control.json"]


async def test_in_place_control_reaches_the_trainer(tmp_path, fake_command):
    runtime = long_runtime(tmp_path, fake_command)
    trial, status = await start_running(runtime)
    await runtime.set_control(trial.name, ControlFile(generation=1, lr=0.0005))
    deadline = time.monotonic() + 10
    while True:
        metrics = (await runtime.observe(status)).trials[trial.name].metrics
        if metrics is not None and metrics.control_generation == 1:
            assert metrics.get("trainpilot_learning_rate") == 0.0005
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    await runtime.close(grace=10)


async def test_ledger_append_is_idempotent_and_survives_a_torn_line(tmp_path, fake_command):
    runtime = make_runtime(tmp_path, fake_command)
    seen: list[str] = []
    runtime.on_record = lambda r: seen.append(r.id)
    first, second = record(0, "launch", "quickstart-t000"), record(1, "launch", "quickstart-t001")
    await runtime.record(first)
    await runtime.record(first)
    await runtime.record(second)
    assert [r.id for r in await runtime.ledger()] == [first.id, second.id]
    assert seen == [first.id, second.id]
    text = runtime.ledger_path.read_text()
    assert text == ledger_format.encode(first) + ledger_format.encode(second)
    # A crash mid-append leaves a torn line; a new runtime keeps what was whole and appends cleanly.
    runtime.ledger_path.write_text(text + '{"id": "quickstart-d000')
    again = make_runtime(tmp_path, fake_command)
    await again.record(second)  # already there: no-op
    third = record(2, "terminate", "quickstart-t000")
    await again.record(third)
    assert [r.id for r in await again.ledger()] == [first.id, second.id, third.id]


async def test_a_different_record_under_a_taken_id_is_a_conflict_and_since_reads_the_tail(tmp_path, fake_command):
    runtime = make_runtime(tmp_path, fake_command)
    for seq in range(3):
        await runtime.record(record(seq, "launch", f"quickstart-t00{seq}"))
    assert [r.seq for r in await runtime.ledger(since=1)] == [1, 2]
    other = record(1, "terminate", "quickstart-t000", rationale="decided elsewhere")
    for writer in (runtime, make_runtime(tmp_path, fake_command)):  # this one, and a new one after a restart
        with pytest.raises(LedgerConflict, match="quickstart-d00001 is already in the ledger"):
            await writer.record(other)
    assert [r.decision.action for r in await runtime.ledger()] == ["launch"] * 3


async def test_a_trainer_that_cannot_start_is_refused_for_good(tmp_path):
    runtime = make_runtime(tmp_path, [str(tmp_path / "no-such-python"), "-m", "trainpilot_trainer"])
    with pytest.raises(PermanentFailure, match="cannot start quickstart-t000"):
        await launch(runtime, trial_status("quickstart-t000"))


async def test_save_status_is_atomic(tmp_path, fake_command, monkeypatch):
    runtime = make_runtime(tmp_path, fake_command)
    status = AgentExperimentStatus(phase="Running", trials=[trial_status("quickstart-t000")], decisions_made=3)
    await runtime.save_status(status)
    stored = json.loads(runtime.status_path.read_text())
    assert stored["phase"] == "Running" and stored["decisionsMade"] == 3
    assert runtime.load_status() == status

    # A failure mid-write leaves the previous status whole.
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(RuntimeFailure, match="disk full"):  # the loop's to report, as a cluster's 5xx would be
        await runtime.save_status(status.model_copy(update={"phase": "Succeeded"}))
    assert json.loads(runtime.status_path.read_text())["phase"] == "Running"


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "x.json"
    atomic_write(path, "one")
    atomic_write(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


async def test_gpus_are_handed_out_and_never_oversubscribed(tmp_path, fake_command):
    runtime = make_runtime(tmp_path, fake_command, env={"FAKE_STEP_SECONDS": "0.2"}, gpus=2, max_steps=10_000)
    for index in range(2):
        await launch(runtime, trial_status(f"quickstart-t00{index}", index=index, gpusPerNode=1), seq=index)
    assert runtime.gpu_table == {0: "quickstart-t000", 1: "quickstart-t001"}
    with pytest.raises(RuntimeFailure, match="GPU"):
        await launch(runtime, trial_status("quickstart-t002", index=2, gpusPerNode=1), seq=2)
    await asyncio.sleep(0.5)
    for index in range(2):
        env = json.loads((runtime.trial_dir(f"quickstart-t00{index}") / "env.json").read_text())
        assert env["CUDA_VISIBLE_DEVICES"] == str(index)
        assert (
            "DS_ACCELERATOR" not in env or env["DS_ACCELERATOR"] != "cpu" or os.environ.get("DS_ACCELERATOR") == "cpu"
        )
    await runtime.stop("quickstart-t000", "terminate")
    status = AgentExperimentStatus(trials=[trial_status("quickstart-t000")])
    await observe_until(runtime, status, "quickstart-t000", {"Failed"})
    assert runtime.gpu_table == {1: "quickstart-t001"}
    await launch(runtime, trial_status("quickstart-t002", index=2, gpusPerNode=1), seq=2)
    assert runtime.gpu_table == {0: "quickstart-t002", 1: "quickstart-t001"}
    await runtime.close(grace=10)


async def test_cpu_only_runs_gpu_trials_without_gpus(tmp_path, fake_command):
    runtime = make_runtime(tmp_path, fake_command, gpus=0, cpu_only=True)
    await launch(runtime, trial_status("quickstart-t000", gpusPerNode=2))
    assert runtime.gpu_table == {} and runtime.trials["quickstart-t000"].processes == 1
    await runtime.close(grace=10)


async def test_resume_trial_restarts_from_own_checkpoint(tmp_path, fake_command):
    runtime = long_runtime(tmp_path, fake_command)
    trial, status = await start_running(runtime)
    await asyncio.sleep(0.3)
    await runtime.close(grace=10)  # what Ctrl-C does: SIGTERM, checkpoint, exit
    assert runtime.has_checkpoint(trial.name)
    step = int((runtime.run_dir / "checkpoints" / trial.name / "latest").read_text())

    later = long_runtime(tmp_path, fake_command)
    notes: list[str] = []
    later.on_message = notes.append
    assert await later.resume_trial(trial, later.spec)
    config = json.loads((later.trial_dir(trial.name) / "config.json").read_text())
    assert config["resume_from"] == str(later.run_dir / "checkpoints" / trial.name)
    deadline = time.monotonic() + 10
    while True:
        metrics = (await later.observe(status)).trials[trial.name].metrics
        if metrics is not None:
            assert metrics.step >= step
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    log = (later.trial_dir(trial.name) / "log.txt").read_text()
    assert log.count("starting quickstart-t000") == 2 and "resumed run" in log
    assert any("restarted" in note for note in notes)
    await later.close(grace=10)


async def test_unknown_active_trial_is_missing(tmp_path, fake_command):
    runtime = make_runtime(tmp_path, fake_command)
    observation = await runtime.observe(AgentExperimentStatus(trials=[trial_status("quickstart-t009")]))
    assert observation.trials["quickstart-t009"].phase == "Missing"


def test_restarted_trial_nan_objective_is_not_measured_yet(tmp_path, fake_command):
    from trainpilot.api.metrics import TrialMetrics
    from trainpilot.runtime.local import LocalTrial

    runtime = make_runtime(tmp_path, fake_command)
    local = LocalTrial(
        name="t", directory=tmp_path, process=None, port=1, gpus=[], processes=1, started=0.0, restarted=True
    )  # type: ignore[arg-type]
    nan = float("nan")
    loading = TrialMetrics(values={"trainpilot_step": 0, "trainpilot_val_loss": nan})
    assert runtime._as_observed(local, loading) is None
    resumed = TrialMetrics(values={"trainpilot_step": 812, "trainpilot_val_loss": nan, "trainpilot_train_loss": 2.5})
    assert runtime._as_observed(local, resumed).values == {"trainpilot_step": 812, "trainpilot_train_loss": 2.5}
    measured = TrialMetrics(values={"trainpilot_step": 900, "trainpilot_val_loss": 2.4})
    assert runtime._as_observed(local, measured) == measured
    # Once it has measured, a NaN is news again (divergence), never hidden.
    assert runtime._as_observed(local, resumed) == resumed
    fresh = LocalTrial(name="u", directory=tmp_path, process=None, port=1, gpus=[], processes=1, started=0.0)  # type: ignore[arg-type]
    assert runtime._as_observed(fresh, loading) == loading


async def test_sampler_keeps_a_dense_history(tmp_path, fake_command):
    runtime = make_runtime(tmp_path, fake_command, env={"FAKE_STEP_SECONDS": "0.02"}, max_steps=100)
    trial = trial_status("quickstart-t000")
    await launch(runtime, trial)
    task = asyncio.create_task(runtime.run_sampler(0.1))
    await observe_until(runtime, AgentExperimentStatus(trials=[trial]), trial.name, {"Succeeded"})
    task.cancel()
    lines = (runtime.trial_dir(trial.name) / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 8
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(steps) and steps[-1] == 100


def test_torchrun_exit_reason_comes_from_rank_0(tmp_path, fake_command):
    from trainpilot.runtime.local import LocalTrial

    runtime = make_runtime(tmp_path, fake_command)
    directory = runtime.trial_dir("t")
    directory.mkdir(parents=True)
    local = LocalTrial(name="t", directory=directory, process=None, port=1, gpus=[], processes=2, started=0.0)  # type: ignore[arg-type]
    local.exit_code = 1  # torchrun's own code whatever the workers said
    (directory / "log.txt").write_text('TRAINPILOT_RESULT {"exit_code": 3, "exit_reason": "diverged", "step": 5}\n')
    assert runtime._exit_reason(local) == "diverged"
    (directory / "log.txt").write_text(
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
        "  time      : 2026-01-01\n  host      : box\n  rank      : 0 (local_rank: 0)\n  exitcode  : 2 (pid: 1)\n"
    )
    assert runtime._exit_reason(local) == "invalid-config"
    local.stop_requested = 1.0
    (directory / "log.txt").write_text("")
    assert runtime._exit_reason(local) == "terminated"


def test_trial_processes_inherit_no_credential_of_the_agent(tmp_path, fake_command, monkeypatch):
    """The trainer runs the user's code: Claude's key and endpoint stay with the agent."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-secret")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://gateway")
    monkeypatch.setenv("TRAINPILOT_SOMETHING_ELSE", "kept")
    runtime = make_runtime(tmp_path, fake_command)
    env = runtime._environment(
        {"config": tmp_path / "c.json", "control": tmp_path / "k.json", "port": 9400, "gpus": [], "processes": 1},
        runtime.spec,
    )
    assert not [name for name in env if name.startswith("ANTHROPIC_")]
    assert env["TRAINPILOT_SOMETHING_ELSE"] == "kept"
