"""Whole experiments over the learning-curve surrogate, through the operator's own loop.

`SimulatedRuntime` implements `trainpilot.runtime.base.Runtime` in memory: each launched trial is a
`SurrogateRun` that plays the built-in trainer's contract (docs/trainer.md) one optimizer step at a
time, so guardrails, hand-offs (scale, restart-mutate), in-place control changes, retention, the
ledger and status all behave as under `trainpilot run`:

- a launched trial is Pending for one cycle (scheduling), then Running; each `tick()` advances every
  running trial `steps_per_cycle` optimizer steps (a data-parallel step takes the same time on more
  ranks; the run is told its world size, which is what its batch is);
- it exports what the trainer exports: step, max steps, train loss (NaN before the first step),
  val loss (NaN before the first evaluation) with its eval step (-1 before), the rung gauges, the
  non-finite count, the newest complete checkpoint step (-1 before one), the control generation
  applied, the loss floor when the task knows it;
- it evaluates every eval_interval (the surrogate's own evaluations), at the config's eval_at_steps
  (the ASHA rung steps) and at max_steps;
- a step's loss is bad when it is non-finite (the surrogate counts the trainer's ceiling too) or,
  with the config's loss_spike_factor, when its moving average exceeds that multiple of the run's
  best; from the first bad loss on no checkpoint is saved, and with fail_fast the first
  non-finite loss ends it (exit 3, diverged);
- `stop()` is SIGTERM: the run saves a checkpoint at its current step (unless its loss went bad or
  it never trained) and exits 4 (terminated) at once; `departed()` then reports that checkpoint's
  step, so a restart's child starts in the same cycle;
- `remove()` deletes a finished trial's checkpoints as spec.retention asks (like `trainpilot run`,
  whose removable part this is); keep_checkpoint_tags prunes old tags as the trainer does;
- a config that resumes (resume_from: another trial's checkpoint directory, resume_tag: `step<N>`)
  starts from exactly that saved checkpoint, at the world size the trial is launched with
  (nodes x processes per node: a scale's child runs at its new size); a tag that was never saved,
  or was deleted, fails the trial as the trainer does (exit 2, invalid-config);
- `set_control()` hands lr and weight_decay to the run in place, from its next step.

A simulated clock: cycle k happens at `cycle_seconds * k` after a fixed epoch, so the times and
GPU-seconds the policy sees are consistent with the steps trained; nothing sleeps.

`run_experiment()` builds the task's spec and calls `trainpilot.loop.run_cycle` until the
experiment finishes (or `max_cycles` pass, or it stalls), recording, from the runs themselves rather than from status:
the trial-steps and device-steps spent against the best evaluated val_loss so far, each trial's
first bad sign (a non-finite train loss, or one above BAD_SIGN_FACTOR x its best) and the cycle it
was stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, RetainedPart, TrialStatus
from trainpilot.api.metrics import TrialMetrics
from trainpilot.api.trial import ControlFile, TrialConfig
from trainpilot.core.approvals import Approval
from trainpilot.core.cycle_log import CycleEntry
from trainpilot.core.decision import DecisionRecord
from trainpilot.core.observation import Observation, TrialObservation
from trainpilot.core.policy import Policy
from trainpilot.loop import LoopMemory, run_cycle
from trainpilot.runtime.base import Departure, LedgerConflict

if TYPE_CHECKING:
    from bench.policybench.tasks import Task

# The benchmark's own reading of "a bad sign", the same for every policy: a non-finite train loss, or
# one above this multiple of the run's best (the heuristic's default spikeFactor, on the raw loss as
# core.state marks a trial unstable).
BAD_SIGN_FACTOR = 3.0
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
EXPERIMENT = "bench"
CHECKPOINT_ROOT = "/sim/checkpoints"


class Run(Protocol):
    """What the runtime needs of a run (bench.policybench.surrogate.SurrogateRun is one)."""

    step: int
    max_steps: int
    finished: bool
    train_loss: float
    val_loss: float | None
    eval_step: int
    nonfinite_losses: int
    checkpoint: Any  # surrogate.Checkpoint (step, state) | None

    def advance(self, steps: int) -> None: ...

    def set_hyperparameters(self, values: dict[str, float]) -> None: ...


# (task, hyperparameters, seed, resume checkpoint or None, world size, *, spike_factor, smoothing) -> a run;
# the last two are the config's loss_spike_factor and loss_spike_smoothing (the trainer's save rule).
RunFactory = Callable[..., Run]


def surrogate_run(
    task: Any,
    hyperparameters: dict[str, float],
    seed: int,
    resume: Any,
    world_size: int,
    *,
    spike_factor: float | None = None,
    smoothing: float = 0.5,
) -> Run:
    from bench.policybench.surrogate import SurrogateRun

    return SurrogateRun(
        task,
        hyperparameters,
        seed,
        resume=resume,
        world_size=world_size,
        spike_factor=spike_factor,
        smoothing=smoothing,
    )


def run_seed(seed: int, trainer_seed: int) -> int:
    """The noise seed of a run: the experiment's seed and the trainer's `seed` hyperparameter. The same
    configuration in one experiment replays the same curve, as the trainer (deterministic given its
    seed) would; another experiment seed draws other noise."""
    return (seed * 1_000_003 + trainer_seed) % 2**31


def numeric_hyperparameters(config: TrialConfig) -> dict[str, float]:
    """The trainer's whole config as numbers (template values and searched ones): what the run gets."""
    values = config.hyperparameters.model_dump()
    return {
        name: value for name, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


@dataclass
class SimTrial:
    """One trial's run and what the runtime knows of it, as the trainer would report it."""

    name: str
    config: TrialConfig
    run: Run | None  # None: it could not start (exit 2, `message` says why)
    hyperparameters: dict[str, float]
    world_size: int
    launched_cycle: int
    start_step: int = 0
    resumed_from: tuple[str, int] | None = None  # (trial, step) of the checkpoint it resumed
    scheduled: int = 0  # ticks since launch: Pending through the first, Running (training) from the second
    exit_code: int | None = None
    message: str = ""
    ended_cycle: int | None = None
    stop_reason: str | None = None
    saved: dict[int, Any] = field(default_factory=dict)  # complete checkpoints in its directory, by step
    checkpoint_step: int | None = None
    trained: bool = False  # a step was taken in this process (train loss is NaN before)
    # The trainer's own rule: from the first bad loss on, nothing is saved.
    bad: bool = False
    best_loss: float | None = None
    smoothed_loss: float | None = None
    nonfinite: int = 0
    spikes: int = 0  # steps at which the trainer's spike rule held (trainpilot_loss_spikes_total)
    # The benchmark's reading (BAD_SIGN_FACTOR), on raw losses.
    first_bad_step: int | None = None
    first_bad_cycle: int | None = None
    sign_best: float | None = None
    val_loss: float | None = None
    eval_step: int = -1
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    rung_step: int = -1
    rung_val_loss: float | None = None
    control_generation: int = 0
    controls: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (cycle, values applied)

    @property
    def pending(self) -> bool:
        """Being scheduled: the first tick after its launch."""
        return self.exit_code is None and self.scheduled < 2

    @property
    def running(self) -> bool:
        return self.exit_code is None and self.scheduled >= 2

    @property
    def step(self) -> int:
        return self.run.step if self.run is not None else self.start_step

    @property
    def steps_trained(self) -> int:
        return max(self.step - self.start_step, 0)

    @property
    def device_steps(self) -> int:
        return self.steps_trained * self.world_size


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the runtime ran it, for figures."""

    name: str
    hyperparameters: dict[str, float]
    world_size: int
    resumed_from: tuple[str, int] | None
    start_step: int
    step: int
    steps_trained: int
    device_steps: int
    launched_cycle: int
    ended_cycle: int | None
    exit_reason: str | None  # contract.EXIT_REASONS value; None: still running when the run ended
    stop_reason: str | None  # why it was stopped (the decision's reason), if it was
    first_bad_step: int | None
    first_bad_cycle: int | None
    best_val_loss: float | None
    final_val_loss: float | None


class SimulatedRuntime:
    """The Runtime protocol over surrogate runs, in memory, on a simulated clock."""

    name = "simulated"
    removable: frozenset[RetainedPart] = frozenset({"checkpoints"})  # as `trainpilot run`'s

    def __init__(
        self,
        task: Any,
        seed: int,
        *,
        steps_per_cycle: int = 10,
        cycle_seconds: float = 30.0,
        run_factory: RunFactory | None = None,
        keep_cycle_log: bool = False,
    ) -> None:
        self.task = task
        self.seed = seed
        self.steps_per_cycle = steps_per_cycle
        self.cycle_seconds = cycle_seconds
        self.run_factory = run_factory or surrogate_run
        self.cycle = 0
        self.trials: dict[str, SimTrial] = {}
        self.records: list[DecisionRecord] = []
        self._record_ids: dict[str, DecisionRecord] = {}
        self.status: AgentExperimentStatus | None = None
        self.saves = 0
        self.cycle_entries: list[CycleEntry] = []
        self.cycles_logged = 0
        self.keep_cycle_log = keep_cycle_log
        self.events: list[tuple[str, str]] = []
        self.sign_offs: list[Approval] = []
        self.stopped: dict[str, int] = {}  # trial -> cycle stop() was first called for it
        # The model a user would pick (the best evaluation so far) and what it is really worth (its
        # noise-free loss): the minimum of many noisy evaluations alone sits below the floor by luck.
        self.best_observed: float = math.inf
        self.best_val: float = math.inf
        floor = getattr(task, "floor", None)
        self.loss_floor = float(floor) if isinstance(floor, (int, float)) else None

    # ---------------------------------------------------------------- the clock

    @property
    def now(self) -> str:
        moment = EPOCH + timedelta(seconds=self.cycle * self.cycle_seconds)
        return moment.isoformat().replace("+00:00", "Z")

    def tick(self) -> None:
        """One cycle of simulated time: every running trial trains up to steps_per_cycle steps."""
        self.cycle += 1
        for trial in self.trials.values():
            if trial.exit_code is not None:
                continue
            trial.scheduled += 1
            if trial.running:  # the first tick schedules it (observed Pending), the next ones train
                self._train(trial)

    def _train(self, trial: SimTrial) -> None:
        run = trial.run
        assert run is not None
        for _ in range(self.steps_per_cycle):
            if run.finished:
                break
            self._step(trial, run)
            if trial.exit_code is not None:
                return
        if run.finished:
            self._complete(trial, run)

    def _step(self, trial: SimTrial, run: Run) -> None:
        before = run.nonfinite_losses
        run.advance(1)
        trial.trained = True
        step, loss = run.step, float(run.train_loss)
        nonfinite = run.nonfinite_losses > before or not math.isfinite(loss)
        self._read_sign(trial, step, loss, nonfinite)
        if nonfinite:
            trial.nonfinite += 1
            trial.bad = True
        else:
            self._spike_rule(trial, loss)
        if nonfinite and trial.config.hyperparameters.fail_fast:
            self._exit(trial, contract.EXIT_DIVERGED, f"non-finite loss at step {step} (fail_fast)")
            return
        self._read_evaluation(trial, run, step)
        # A periodic save lands in its own directory (one a run resumed from elsewhere is not its own).
        checkpoint = run.checkpoint
        if trial.bad or checkpoint is None:
            return
        if checkpoint.step > trial.start_step and checkpoint.step not in trial.saved:
            self._keep(trial, checkpoint)

    def _read_sign(self, trial: SimTrial, step: int, loss: float, nonfinite: bool) -> None:
        """The benchmark's first bad sign of this run (BAD_SIGN_FACTOR on raw losses)."""
        if trial.first_bad_step is None:
            spiking = not nonfinite and trial.sign_best is not None and loss > BAD_SIGN_FACTOR * trial.sign_best
            if nonfinite or spiking:
                trial.first_bad_step, trial.first_bad_cycle = step, self.cycle
        if not nonfinite and (trial.sign_best is None or loss < trial.sign_best):
            trial.sign_best = loss

    def _spike_rule(self, trial: SimTrial, loss: float) -> None:
        """The trainer's loss_spike_factor rule (docs/trainer.md, Divergence): no checkpoint after it."""
        config = trial.config
        weight = config.loss_spike_smoothing
        smoothed = loss if trial.smoothed_loss is None else weight * loss + (1 - weight) * trial.smoothed_loss
        trial.smoothed_loss = smoothed
        trial.best_loss = loss if trial.best_loss is None else min(trial.best_loss, loss)
        factor = config.loss_spike_factor
        if factor is not None and trial.best_loss > 0 and smoothed > factor * trial.best_loss:
            trial.bad = True
            trial.spikes += 1

    def _read_evaluation(self, trial: SimTrial, run: Run, step: int) -> None:
        """The run's own evaluations (every eval_interval), and the trainer's extra ones: at each of
        eval_at_steps (ASHA's rungs; at max_steps see _complete)."""
        rung = step in trial.config.eval_at_steps
        if run.eval_step == step and run.val_loss is not None:
            self._evaluated(trial, run, step, float(run.val_loss))
        elif rung:
            self._evaluate(trial, run)
        if rung and trial.eval_step == step and trial.val_loss is not None:
            trial.rung_step, trial.rung_val_loss = step, trial.val_loss

    def _evaluate(self, trial: SimTrial, run: Run) -> None:
        value = _evaluate(run)
        if value is not None:
            self._evaluated(trial, run, run.step, value)

    def _evaluated(self, trial: SimTrial, run: Run, step: int, value: float) -> None:
        if step == trial.eval_step:
            return
        trial.val_loss, trial.eval_step = value, step
        trial.evaluations.append((step, value))
        if math.isfinite(value) and value < self.best_observed:
            self.best_observed = value
            true_loss = getattr(run, "expected_loss_now", None)
            self.best_val = float(true_loss()) if callable(true_loss) else value

    def _keep(self, trial: SimTrial, checkpoint: Any) -> None:
        """A complete save: the newest tag, older ones pruned as keep_checkpoint_tags says."""
        trial.saved[int(checkpoint.step)] = checkpoint
        trial.checkpoint_step = int(checkpoint.step)
        keep = trial.config.keep_checkpoint_tags
        if keep is not None and len(trial.saved) > keep:
            for old in sorted(trial.saved)[:-keep]:
                del trial.saved[old]

    def _save_now(self, trial: SimTrial) -> None:
        """The save on SIGTERM, or at the end of a completed run: the current step, unless bad."""
        run = trial.run
        if run is None or trial.bad or not trial.trained and trial.start_step == 0:
            return
        save = getattr(run, "stop_checkpoint", None) or getattr(run, "save", None)
        checkpoint = save() if callable(save) else run.checkpoint  # without either: its last periodic one
        if checkpoint is not None and checkpoint.step not in trial.saved:
            self._keep(trial, checkpoint)

    def _complete(self, trial: SimTrial, run: Run) -> None:
        """max_steps reached (or resumed at it): evaluate there, save when checkpoint_interval > 0, exit 0."""
        if trial.eval_step != run.step:
            self._evaluate(trial, run)
        if trial.config.hyperparameters.checkpoint_interval > 0:
            self._save_now(trial)
        self._exit(trial, contract.EXIT_COMPLETED, f"ran all {run.max_steps} steps")

    def _exit(self, trial: SimTrial, code: int, message: str) -> None:
        trial.exit_code, trial.message, trial.ended_cycle = code, message, self.cycle

    # ---------------------------------------------------------------- Runtime

    def checkpoint_dir(self, trial: str, spec: AgentExperimentSpec | None = None) -> str | None:
        return f"{CHECKPOINT_ROOT}/{trial}"

    async def observe(self, status: AgentExperimentStatus) -> Observation:
        observation = Observation(time=self.now)
        for trial in status.launched_trials:
            observation.trials[trial.name] = self._observe(trial.name)
        return observation

    def _observe(self, name: str) -> TrialObservation:
        trial = self.trials.get(name)
        if trial is None:
            return TrialObservation(name=name, phase="Missing", message="no run for this trial")
        if trial.pending:
            return TrialObservation(name=name, phase="Pending")
        metrics = self.metrics(trial)
        if trial.exit_code is None:
            return TrialObservation(name=name, phase="Running", metrics=metrics)
        reason = contract.EXIT_REASONS[trial.exit_code]
        return TrialObservation(
            name=name,
            phase="Succeeded" if trial.exit_code == contract.EXIT_COMPLETED else "Failed",
            exit_reason=reason,
            exit_code=trial.exit_code,
            metrics=metrics,
            message=f"trainer exited with code {trial.exit_code} ({reason}): {trial.message}",
        )

    def metrics(self, trial: SimTrial) -> TrialMetrics:
        """The trial's gauges as the trainer exports them."""
        run = trial.run
        nan = math.nan
        values = {
            contract.METRIC_STEP: float(trial.step),
            contract.METRIC_MAX_STEPS: float(
                run.max_steps if run is not None else trial.config.hyperparameters.max_steps
            ),
            contract.METRIC_TRAIN_LOSS: float(run.train_loss) if run is not None and trial.trained else nan,
            contract.METRIC_VAL_LOSS: trial.val_loss if trial.val_loss is not None else nan,
            contract.METRIC_EVAL_STEP: float(trial.eval_step),
            contract.METRIC_RUNG_STEP: float(trial.rung_step),
            contract.METRIC_RUNG_VAL_LOSS: trial.rung_val_loss if trial.rung_val_loss is not None else nan,
            contract.METRIC_NONFINITE_LOSS: float(trial.nonfinite),
            contract.METRIC_LOSS_SPIKES: float(trial.spikes),
            contract.METRIC_CHECKPOINT_STEP: float(trial.checkpoint_step if trial.checkpoint_step is not None else -1),
            contract.METRIC_CONTROL_GENERATION: float(trial.control_generation),
        }
        if self.loss_floor is not None:
            values[contract.METRIC_LOSS_FLOOR] = self.loss_floor
        return TrialMetrics(values=values)

    async def launch(self, trial: TrialStatus, config: TrialConfig, spec: AgentExperimentSpec) -> None:
        if trial.name in self.trials:
            return  # already started: idempotent
        template = spec.trial_template
        world_size = max(1, trial.nodes) * (template.processes_per_node or max(trial.gpus_per_node, 1))
        hyperparameters = numeric_hyperparameters(config)
        sim = SimTrial(
            name=trial.name,
            config=config,
            run=None,
            hyperparameters=hyperparameters,
            world_size=world_size,
            launched_cycle=self.cycle,
        )
        self.trials[trial.name] = sim
        resume = None
        if config.resume_from is not None:
            found = self._checkpoint(config)
            if isinstance(found, str):
                sim.ended_cycle = self.cycle
                sim.exit_code, sim.message = contract.EXIT_INVALID_CONFIG, found
                return
            source, resume = found
            sim.resumed_from, sim.start_step = (source, int(resume.step)), int(resume.step)
        seed = run_seed(self.seed, config.hyperparameters.seed)
        sim.run = self.run_factory(
            self.task,
            hyperparameters,
            seed,
            resume,
            world_size,
            spike_factor=config.loss_spike_factor,
            smoothing=config.loss_spike_smoothing,
        )
        sim.start_step = sim.run.step

    def _checkpoint(self, config: TrialConfig) -> tuple[str, Any] | str:
        """(source trial, checkpoint) that the config resumes, or why the trainer would refuse it."""
        directory = config.resume_from or ""
        source = self.trials.get(directory.removeprefix(CHECKPOINT_ROOT + "/"))
        if source is None or not source.saved:
            return f"resume_from: no checkpoint in {directory!r} (no 'latest' file)"
        if config.resume_tag is None:
            return source.name, source.saved[max(source.saved)]
        tag = config.resume_tag
        step = tag.removeprefix(contract.CHECKPOINT_TAG_PREFIX)
        checkpoint = source.saved.get(int(step)) if step.isdigit() else None
        if checkpoint is None:
            return f"resume_tag: {directory}/{tag} is not a checkpoint folder there"
        return source.name, checkpoint

    async def stop(self, trial: str, reason: str) -> None:
        sim = self.trials.get(trial)
        if sim is None or sim.exit_code is not None:
            return
        self.stopped.setdefault(trial, self.cycle)
        sim.stop_reason = reason
        if sim.running:
            self._save_now(sim)  # SIGTERM: finish the step, checkpoint (unless bad), exit
        self._exit(sim, contract.EXIT_STOPPED, f"stopped by SIGTERM ({reason})")

    async def remove(self, trial: str, part: RetainedPart, spec: AgentExperimentSpec) -> None:
        sim = self.trials.get(trial)
        if part == "checkpoints" and sim is not None:
            sim.saved.clear()  # the gauge it reported stays what it was

    async def departed(self, trial: str) -> Departure | None:
        sim = self.trials.get(trial)
        if sim is None:
            return Departure()  # never started: departed
        if sim.exit_code is None:
            return None
        return Departure(checkpoint_step=sim.checkpoint_step)

    async def set_control(self, trial: str, control: ControlFile) -> None:
        sim = self.trials.get(trial)
        if sim is None or sim.exit_code is not None or control.generation <= sim.control_generation:
            return
        values = {
            name: float(value)
            for name, value in (("lr", control.lr), ("weight_decay", control.weight_decay))
            if value is not None
        }
        if sim.run is not None and values:
            sim.run.set_hyperparameters(values)
            sim.hyperparameters = {**sim.hyperparameters, **values}
        sim.control_generation = control.generation
        sim.controls.append((self.cycle, values))

    async def record(self, record: DecisionRecord) -> None:
        stored = self._record_ids.get(record.id)
        if stored is not None:
            if stored != record:
                raise LedgerConflict(record, stored)
            return
        self._record_ids[record.id] = record
        self.records.append(record)

    async def ledger(self, since: int = 0) -> list[DecisionRecord]:
        records = self.records
        if 0 <= since < len(records) and records[since].seq == since:
            return records[since:]  # the usual case: seq == position
        return [record for record in records if record.seq >= since]

    async def approvals(self) -> list[Approval]:
        return list(self.sign_offs)

    async def log_cycle(self, entry: CycleEntry) -> None:
        self.cycles_logged += 1
        if self.keep_cycle_log:
            self.cycle_entries.append(entry)

    async def announce(self, reason: str, message: str) -> None:
        self.events.append((reason, message))

    async def save_status(self, status: AgentExperimentStatus) -> None:
        self.status = status
        self.saves += 1

    # ---------------------------------------------------------------- accounting

    @property
    def trial_steps(self) -> int:
        return sum(trial.steps_trained for trial in self.trials.values())

    @property
    def device_steps(self) -> int:
        return sum(trial.device_steps for trial in self.trials.values())

    def trial_records(self) -> dict[str, TrialRecord]:
        records = {}
        for name, trial in self.trials.items():
            finite = [value for _, value in trial.evaluations if math.isfinite(value)]
            records[name] = TrialRecord(
                name=name,
                hyperparameters=dict(trial.hyperparameters),
                world_size=trial.world_size,
                resumed_from=trial.resumed_from,
                start_step=trial.start_step,
                step=trial.step,
                steps_trained=trial.steps_trained,
                device_steps=trial.device_steps,
                launched_cycle=trial.launched_cycle,
                ended_cycle=trial.ended_cycle,
                exit_reason=contract.EXIT_REASONS[trial.exit_code] if trial.exit_code is not None else None,
                stop_reason=trial.stop_reason,
                first_bad_step=trial.first_bad_step,
                first_bad_cycle=trial.first_bad_cycle,
                best_val_loss=min(finite) if finite else None,
                final_val_loss=trial.val_loss,
            )
        return records


def _evaluate(run: Run) -> float | None:
    """One evaluation at the run's current step, outside its own eval_interval (the trainer's
    eval_at_steps): the run's evaluate(), else none."""
    evaluate = getattr(run, "evaluate", None)
    return float(evaluate()) if callable(evaluate) else None


@dataclass
class ExperimentResult:
    policy: str
    task: str
    seed: int
    status: AgentExperimentStatus  # final
    records: list[DecisionRecord]  # the whole ledger
    # (trial-steps spent so far, the noise-free val_loss of the best-evaluated model so far), after each cycle
    trajectory: list[tuple[int, float]]
    first_bad_sign: dict[str, int]  # trial -> cycle at which its loss first went non-finite or spiked
    terminated_at: dict[str, int]  # trial -> cycle at which it was stopped
    wall_seconds: float
    # Besides the shared interface:
    device_trajectory: list[tuple[int, float]] = field(default_factory=list)  # (steps x world size, best)
    cycles: int = 0  # cycles run
    cycle_seconds: float = 30.0  # simulated seconds per cycle
    trials: dict[str, TrialRecord] = field(default_factory=dict)
    spec: AgentExperimentSpec | None = None
    runtime: SimulatedRuntime | None = field(default=None, repr=False)  # its runs, for tests and figures

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def trial_steps(self) -> int:
        return self.trajectory[-1][0] if self.trajectory else 0

    @property
    def best_val_loss(self) -> float:
        return self.trajectory[-1][1] if self.trajectory else math.inf

    def steps_to_reach(self, target: float) -> int | None:
        """Trial-steps spent when the best val_loss first reached `target`; None: never reached."""
        return next((steps for steps, best in self.trajectory if best <= target), None)


async def run_experiment(
    task: Task,
    policy: Policy,
    seed: int,
    budget: dict,
    *,
    policy_spec: dict | None = None,
    steps_per_cycle: int = 10,
    max_cycles: int = 5000,
    cycle_seconds: float | None = None,
    limits: object | None = None,
    run_factory: RunFactory | None = None,
    experiment: str = EXPERIMENT,
    stall_cycles: int = 100,
) -> ExperimentResult:
    """One whole experiment of `task` under `policy`, through the operator's run_cycle, until it
    finishes (status.finished), `max_cycles` pass, or it stalls: no trial active and no decision
    recorded for `stall_cycles` cycles in a row (a policy that never completes); the result then
    says finished False.

    `cycle_seconds`: simulated time per cycle (default: the spec's policy.intervalSeconds);
    `limits`: a quota passed to the guardrails (duck-typed like trainpilot run's LocalLimits);
    `run_factory`: what makes a run (default: the surrogate)."""
    started = time.perf_counter()
    spec = task.spec(policy=policy_spec or {}, budget=budget, seed=seed)
    seconds = float(cycle_seconds if cycle_seconds is not None else spec.policy.interval_seconds)
    runtime = SimulatedRuntime(
        task, seed, steps_per_cycle=steps_per_cycle, cycle_seconds=seconds, run_factory=run_factory
    )
    status, memory = AgentExperimentStatus(), LoopMemory()
    trajectory: list[tuple[int, float]] = []
    device_trajectory: list[tuple[int, float]] = []
    cycles = idle = 0
    for cycle in range(max_cycles):
        if cycle:
            runtime.tick()
        recorded = len(runtime.records)
        result = await run_cycle(experiment, spec, status, runtime, policy, runtime.now, limits=limits, memory=memory)
        status = result.status
        cycles = cycle + 1
        trajectory.append((runtime.trial_steps, runtime.best_val))
        device_trajectory.append((runtime.device_steps, runtime.best_val))
        if status.finished:
            break
        idle = idle + 1 if not status.active_trials and len(runtime.records) == recorded else 0
        if idle >= stall_cycles:
            break
    first_bad = {name: t.first_bad_cycle for name, t in runtime.trials.items() if t.first_bad_cycle is not None}
    return ExperimentResult(
        policy=getattr(policy, "name", type(policy).__name__),
        task=getattr(task, "name", "?"),
        seed=seed,
        status=status,
        records=list(runtime.records),
        trajectory=trajectory,
        first_bad_sign=first_bad,
        terminated_at=dict(runtime.stopped),
        wall_seconds=time.perf_counter() - started,
        device_trajectory=device_trajectory,
        cycles=cycles,
        cycle_seconds=seconds,
        trials=runtime.trial_records(),
        spec=spec,
        runtime=runtime,
    )
