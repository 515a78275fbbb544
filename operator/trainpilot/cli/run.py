"""`trainpilot run`: the same AgentExperiment, the same agent loop, on this machine.

Reads the YAML a cluster would get, checks it and the run directory, then calls
`trainpilot.loop.run_cycle` (the operator's loop) with a `LocalRuntime` every
spec.policy.intervalSeconds until the experiment succeeds or fails. Ctrl-C stops the trials
cleanly (they checkpoint) and `--resume` continues without repeating a trial.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainpilot.api.experiment import AgentExperiment, AgentExperimentSpec, AgentExperimentStatus
from trainpilot.cli.hints import shell_command
from trainpilot.cli.manifest import ManifestError, load_experiment
from trainpilot.cli.progress import Progress, fmt
from trainpilot.core import spec_edits
from trainpilot.core.policy import Policy
from trainpilot.runtime.clock import local_now
from trainpilot.runtime.local import DEFAULT_RUNS_DIR, TRAINER_MODULE, LocalRuntime, count_gpus, prompt_archive
from trainpilot.runtime.policies import make_policy

logger = logging.getLogger("trainpilot.cli.run")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
STOP_GRACE_SECONDS = 40.0
SAMPLE_SECONDS = 0.25  # metrics history for the report, between the loop's own scrapes
LOCK_NAME = "run.lock"
MANIFEST_NAME = "experiment.yaml"


class UsageError(Exception):
    """Bad input: one line for the user, exit 2, nothing in the run directory touched."""


@dataclass
class LocalLimits:
    """What this machine can give, passed to the guardrails like a cluster's QuotaPolicy.

    The guardrails read quota fields duck-typed (a missing one is unlimited), so the GPUs of this
    machine are never over-subscribed by any policy's proposal.
    """

    max_gpus: int
    max_parallel_trials: int | None = None


@dataclass
class Prepared:
    run_dir: Path
    experiment: AgentExperiment
    spec: AgentExperimentSpec
    resumed: bool
    gpus: int
    cpu_only: bool
    cores: int
    lock_fd: int
    notes: list[str] = field(default_factory=list)
    policy: Policy | None = None  # made in prepare(), so a missing API key is a usage error


def trainer_command() -> list[str]:
    """How one trial process starts. Tests replace it with a fake trainer."""
    return [sys.executable, "-m", TRAINER_MODULE]


def _trainer_installed() -> bool:
    try:
        return importlib.util.find_spec(f"{TRAINER_MODULE}.__main__") is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------------------------------------
# Checking the input and the run directory (nothing is written until every check passed)
# ------------------------------------------------------------------------------------------


def _load(path: str | Path) -> AgentExperiment:
    try:
        return load_experiment(path)
    except ManifestError as error:
        # One line, even when the YAML parser's message quotes the offending source lines.
        lines = [line.strip() for line in str(error).splitlines()]
        raise UsageError(" ".join(line for line in lines if line and set(line) != {"^"})) from None


def _same_experiment(a: AgentExperiment, b: AgentExperiment) -> bool:
    return a.name == b.name and a.spec.wire() == b.spec.wire()


def spec_changes(before: AgentExperiment, after: AgentExperiment, limit: int = 4) -> str:
    """What an edit changed, field by field: `spec.budget.maxTrials: 8 -> 12`."""
    old, new = _leaves(before.spec.wire(), "spec"), _leaves(after.spec.wire(), "spec")
    changed = [
        f"{path}: {old.get(path, '(unset)')} -> {new.get(path, '(unset)')}"
        for path in sorted(old.keys() | new.keys())
        if old.get(path) != new.get(path)
    ]
    more = f"; and {len(changed) - limit} more" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more


def _leaves(value: Any, path: str) -> dict[str, str]:
    if isinstance(value, dict):
        return {leaf: shown for key, item in value.items() for leaf, shown in _leaves(item, f"{path}.{key}").items()}
    return {path: json.dumps(value, separators=(",", ":"))}


def _read_status(run_dir: Path) -> AgentExperimentStatus:
    path = run_dir / "status.json"
    if not path.exists():
        return AgentExperimentStatus()
    try:
        return AgentExperimentStatus.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(
            f"{path}: unreadable status ({type(error).__name__}); the run directory needs repair"
        ) from None


def _lock_holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return "unknown"
    return text.split()[0] if text else "unknown"


def _acquire_lock(run_dir: Path, create: bool) -> int | None:
    """flock run.lock for the whole run; UsageError naming the holder's pid when it is taken."""
    path = run_dir / LOCK_NAME
    if not create and not path.exists():
        return None
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(
            f"{run_dir} is in use by another trainpilot run (pid {_lock_holder(path)}); "
            "wait for it to finish, stop it with Ctrl-C, or pass a different --run-dir"
        ) from None
    return fd


def _write_lock_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())


def _processes_per_trial(spec: AgentExperimentSpec) -> int:
    template = spec.trial_template
    return max(1, template.nodes) * template.processes


def prepare(args: argparse.Namespace, gpus: int | None = None, cores: int | None = None) -> Prepared:
    """Check the experiment, this machine and the run directory, then claim the run directory.

    Every check runs before anything is written: bad input raises UsageError and leaves the
    run directory as it was.
    """
    notes: list[str] = []
    cpu_only = bool(getattr(args, "cpu", False))
    resume: str | None = getattr(args, "resume", None)
    experiment, run_dir, edits = _choose_experiment(args, resume)
    notes.extend(edits)
    gpus = count_gpus() if gpus is None else gpus
    cores = cores or os.cpu_count() or 1
    spec = _fit_gpus(experiment.spec, gpus, cpu_only, notes)
    try:
        policy = make_policy(spec, archive=prompt_archive(run_dir.resolve()))
    except ValueError as error:  # what the policy needs is missing (Claude: the API key)
        raise UsageError(str(error)) from None
    lock_fd = _claim_run_dir(run_dir, experiment, resume)
    if not resume:
        assert args.experiment
        _write_manifest(run_dir, args.experiment)
    elif edits:
        _keep_previous_manifest(run_dir)
        _write_manifest(run_dir, args.experiment)
    spec = _fit_parallel_trials(spec, cores, gpus, notes)
    notes.insert(0, _cluster_fields_note(experiment, _processes_per_trial(spec)))
    if spec.metrics.source == "prometheus":
        notes.append("local run: spec.metrics.source prometheus is for clusters; each trainer is read directly here")
    return Prepared(
        run_dir=run_dir.resolve(),
        experiment=experiment,
        spec=spec,
        resumed=bool(resume),
        gpus=gpus,
        cpu_only=cpu_only,
        cores=cores,
        lock_fd=lock_fd,
        notes=notes,
        policy=policy,
    )


def _choose_experiment(args: argparse.Namespace, resume: str | None) -> tuple[AgentExperiment, Path, list[str]]:
    """The experiment to run, its run directory, and what an edited YAML given with --resume
    changes (one line per field, with its effect; empty when there is no edit)."""
    if not resume:
        if not args.experiment:
            raise UsageError("give an experiment YAML (trainpilot run EXPERIMENT.yaml), or --resume RUN_DIR")
        experiment = _load(args.experiment)
        run_dir = Path(args.run_dir) if args.run_dir else Path(DEFAULT_RUNS_DIR) / experiment.name
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"--run-dir {run_dir}: exists and is not a directory")
        return experiment, run_dir, []
    run_dir = Path(resume)
    if not run_dir.is_dir():
        raise UsageError(f"--resume {run_dir}: no such run directory")
    manifest = run_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise UsageError(
            f"--resume {run_dir}: no {MANIFEST_NAME} there, so it is not a trainpilot run directory; "
            f"start a new run with: trainpilot run EXPERIMENT.yaml --run-dir {run_dir}"
        )
    if args.run_dir and Path(args.run_dir).resolve() != run_dir.resolve():
        raise UsageError("give either --resume RUN_DIR or --run-dir, not both")
    experiment = _load(manifest)
    if not args.experiment:
        return experiment, run_dir, []
    edited = _load(args.experiment)
    if _same_experiment(edited, experiment):
        return experiment, run_dir, []
    return edited, run_dir, _accepted_edits(run_dir, experiment, edited, args.experiment)


def _accepted_edits(run_dir: Path, stored: AgentExperiment, edited: AgentExperiment, path: str) -> list[str]:
    """What `edited` changes in the stopped run, field by field with its effect (docs/spec-edits.md);
    UsageError naming each field the table refuses, and then nothing is changed."""
    if edited.name != stored.name:
        raise UsageError(
            f"{path}: metadata.name {edited.name!r} is not {stored.name!r}, the experiment {run_dir} holds; "
            "a run directory holds one experiment: pass a new --run-dir to start that one (nothing was changed)"
        )
    review = spec_edits.review(edited.spec, _read_status(run_dir))
    if review.refused:
        raise UsageError(f"--resume {run_dir} {path}: {review.message} (nothing was changed)")
    fields = spec_edits.changed_fields(stored.spec, edited.spec)
    described = ", ".join(f"spec.{field} ({spec_edits.rule_for(field).effect})" for field in fields)
    return [f"applying the edits of {path}: {described} (docs/spec-edits.md says what each does)"]


def _write_manifest(run_dir: Path, source: str) -> None:
    tmp = run_dir / f".{MANIFEST_NAME}.tmp"
    shutil.copyfile(source, tmp)
    os.replace(tmp, run_dir / MANIFEST_NAME)


def _keep_previous_manifest(run_dir: Path) -> None:
    """experiment.yaml as it was before an edit, as experiment.<n>.yaml (1, 2, ... in edit order)."""
    stem, suffix = MANIFEST_NAME.rsplit(".", 1)
    number = 1
    while (run_dir / f"{stem}.{number}.{suffix}").exists():
        number += 1
    shutil.copyfile(run_dir / MANIFEST_NAME, run_dir / f"{stem}.{number}.{suffix}")


def _fit_gpus(spec: AgentExperimentSpec, gpus: int, cpu_only: bool, notes: list[str]) -> AgentExperimentSpec:
    """The spec as this machine can run it: GPU trials on the CPU with --cpu, else refused if they do not fit."""
    template = spec.trial_template
    if template.gpus_per_node == 0:
        return spec
    if cpu_only:
        notes.append(
            f"--cpu: trialTemplate.gpusPerNode {template.gpus_per_node} is treated as 0; trials run on the CPU"
        )
        return spec.model_copy(update={"trial_template": template.model_copy(update={"gpus_per_node": 0})})
    if gpus == 0:
        raise UsageError(
            f"trialTemplate.gpusPerNode is {template.gpus_per_node} but this machine has no GPU; "
            "pass --cpu to run the trials on the CPU instead"
        )
    per_trial_gpus = template.nodes * template.gpus_per_node
    if per_trial_gpus > gpus:
        raise UsageError(
            f"one trial needs trialTemplate.nodes x gpusPerNode = {per_trial_gpus} GPUs but this machine has "
            f"{gpus}; lower trialTemplate.gpusPerNode, or pass --cpu to run on the CPU"
        )
    return spec


def _claim_run_dir(run_dir: Path, experiment: AgentExperiment, resume: str | None) -> int:
    """Check the run directory's state under its lock, then create it; returns the held lock."""
    lock_fd = _acquire_lock(run_dir, create=False) if run_dir.is_dir() else None
    try:
        if resume:
            status = _read_status(run_dir)
            if status.finished:
                raise _AlreadyFinished(run_dir, status)
        elif run_dir.is_dir():
            _refuse_occupied_run_dir(run_dir, experiment)
        if not _trainer_installed() and trainer_command()[-1] == TRAINER_MODULE:
            raise UsageError(
                f"the trainer ({TRAINER_MODULE}) is not installed in this Python; "
                "install it with: pip install 'trainpilot[trainer]' (torch first)"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        if lock_fd is None:
            lock_fd = _acquire_lock(run_dir, create=True)
        assert lock_fd is not None
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    _write_lock_pid(lock_fd)
    return lock_fd


def _refuse_occupied_run_dir(run_dir: Path, experiment: AgentExperiment) -> None:
    """A new run goes into an empty directory only; say how to continue what is already there."""
    manifest = run_dir / MANIFEST_NAME
    if not manifest.exists():
        if any(entry.name != LOCK_NAME for entry in run_dir.iterdir()):
            raise UsageError(f"{run_dir} is not empty and is not a trainpilot run directory; pass a new --run-dir")
        return
    try:
        stored: AgentExperiment | None = load_experiment(manifest)
    except ManifestError:
        stored = None
    status = _read_status(run_dir)
    if stored is not None and stored.name == experiment.name and not _same_experiment(stored, experiment):
        changes = spec_changes(stored, experiment)
        raise UsageError(
            f"{run_dir} holds a run of {experiment.name!r} started from a different spec ({changes}); "
            f"continue that run as it started with `{shell_command()} run --resume {run_dir}`, or pass a new "
            "--run-dir to run the edited one (nothing was changed)"
        )
    if stored is None or not _same_experiment(stored, experiment):
        held = f"experiment {stored.name!r}" if stored else "an unreadable experiment"
        raise UsageError(
            f"{run_dir} already holds a different run ({held}); pass --resume {run_dir} to continue "
            "that one, or a new --run-dir for this one (nothing was changed)"
        )
    if status.finished:
        raise UsageError(
            f"{run_dir} already holds a finished run of {experiment.name!r} ({status.phase}); "
            f"pass a new --run-dir to run it again (see `{shell_command()} report {run_dir}`)"
        )
    raise UsageError(
        f"{run_dir} already holds a stopped run of {experiment.name!r}; continue it with "
        f"`{shell_command()} run --resume {run_dir}`, or pass a new --run-dir (nothing was changed)"
    )


def _fit_parallel_trials(spec: AgentExperimentSpec, cores: int, gpus: int, notes: list[str]) -> AgentExperimentSpec:
    """Parallel trials bounded by the cores (and the GPUs) of this machine."""
    processes = _processes_per_trial(spec)
    wanted = spec.budget.parallel_trials
    parallel = min(wanted, max(1, cores // processes))
    why = f"{cores} CPU cores / {processes} process(es) per trial"
    gpus_per_trial = spec.trial_template.nodes * spec.trial_template.gpus_per_node
    if gpus_per_trial > 0 and gpus // gpus_per_trial < parallel:
        parallel = max(1, gpus // gpus_per_trial)
        why = f"{gpus} GPUs / {gpus_per_trial} per trial"
    if parallel >= wanted:
        return spec
    notes.append(f"running {parallel} trial(s) at a time instead of budget.parallelTrials {wanted} ({why})")
    return spec.model_copy(update={"budget": spec.budget.model_copy(update={"parallel_trials": parallel})})


def _cluster_fields_note(experiment: AgentExperiment, processes: int) -> str:
    template = experiment.spec.trial_template
    return (
        f"local run: trialTemplate.image ({template.image}) and command are for clusters and are ignored here; "
        f"each trial runs `{Path(sys.executable).name} -m {TRAINER_MODULE}` from this Python environment"
        + (" (under torch.distributed.run; several nodes become several local processes)" if processes > 1 else "")
    )


class _AlreadyFinished(Exception):
    def __init__(self, run_dir: Path, status: AgentExperimentStatus) -> None:
        super().__init__(f"{run_dir}: already finished ({status.phase})")
        self.run_dir = run_dir
        self.status = status


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


class _ProgressHandler(logging.Handler):
    """Warnings from the loop and the core, shown through the progress display."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(level=logging.WARNING)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.message(f"{record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # noqa: BLE001 - logging must never break the run
            pass


def _setup_logging(run_dir: Path, progress: Progress) -> list[logging.Handler]:
    root = logging.getLogger("trainpilot")
    root.setLevel(logging.INFO)
    file_handler = logging.FileHandler(run_dir / "trainpilot.log", encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    display = _ProgressHandler(progress)
    root.addHandler(file_handler)
    root.addHandler(display)
    root.propagate = False
    return [file_handler, display]


def _teardown_logging(handlers: list[logging.Handler]) -> None:
    root = logging.getLogger("trainpilot")
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()
    root.propagate = True


async def drive(prepared: Prepared, *, live: bool, write_report: bool, out: Any = None) -> int:
    """Run the experiment to its end (or to Ctrl-C), then print where everything is."""
    out = out or sys.stdout
    progress = Progress(prepared.experiment.name, prepared.spec, live=live, stream=out)
    handlers = _setup_logging(prepared.run_dir, progress)
    runtime = _local_runtime(prepared, progress)
    stop = asyncio.Event()
    remove_signal_handlers = _stop_on_signals(stop, progress, runtime)
    progress.start()
    sampler = asyncio.create_task(runtime.run_sampler(SAMPLE_SECONDS))
    try:
        status = await _start(prepared, runtime, progress)
        status = await _cycle_until_done(prepared, runtime, progress, status, stop)
        exit_code = await _shut_down(runtime, progress, status, interrupted=stop.is_set() and not status.finished)
    except BaseException:
        logger.exception("trainpilot run failed")
        runtime.kill_all()
        await runtime.close(grace=5.0)
        raise
    finally:
        sampler.cancel()
        progress.stop()
        remove_signal_handlers()
        _teardown_logging(handlers)

    _final_words(prepared, status, exit_code, write_report, out)
    return exit_code


def _local_runtime(prepared: Prepared, progress: Progress) -> LocalRuntime:
    spec = prepared.spec
    runtime = LocalRuntime(
        prepared.run_dir,
        prepared.experiment.name,
        spec,
        gpus=prepared.gpus,
        cpu_only=prepared.cpu_only,
        cores=prepared.cores,
        parallel_trials=spec.budget.parallel_trials,
        command=trainer_command(),
        on_record=progress.decision,
        on_message=progress.message,
    )
    progress.fresh_metrics = lambda: runtime.latest
    return runtime


def _stop_on_signals(stop: asyncio.Event, progress: Progress, runtime: LocalRuntime) -> Callable[[], None]:
    """First Ctrl-C (or SIGTERM): finish the cycle, then stop the trials so they checkpoint.
    The second kills them at once. Returns the function that removes the handlers."""
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_interrupt(signame: str) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            stop.set()
            progress.message(
                f"{signame}: finishing this cycle, then stopping every trial so it checkpoints "
                "(press Ctrl-C again to kill them at once)"
            )
        else:
            progress.message(f"{signame} again: killing every trial now")
            runtime.kill_all()

    signals = ((signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM"))
    for signum, signame in signals:
        loop.add_signal_handler(signum, on_interrupt, signame)

    def remove() -> None:
        for signum, _ in signals:
            loop.remove_signal_handler(signum)

    return remove


async def _start(prepared: Prepared, runtime: LocalRuntime, progress: Progress) -> AgentExperimentStatus:
    """Status to start from: fresh, or a stopped run's, with its interrupted trials restarted."""
    status = runtime.load_status()
    for note in prepared.notes:
        progress.message(note)
    name, run_dir = prepared.experiment.name, prepared.run_dir
    if not prepared.resumed:
        progress.message(f"running {name}: run directory {run_dir}")
        return status
    progress.remember(status)
    progress.message(
        f"resuming {name} from {run_dir}: {status.decisions_made} decisions so far, "
        f"{len(status.active_trials)} trial(s) to restart"
    )
    for trial in status.active_trials:
        await runtime.resume_trial(trial, status.spec_for(prepared.spec, trial.name))
    return status


async def _cycle_until_done(
    prepared: Prepared,
    runtime: LocalRuntime,
    progress: Progress,
    status: AgentExperimentStatus,
    stop: asyncio.Event,
) -> AgentExperimentStatus:
    """One agent-loop cycle every spec.policy.intervalSeconds until the experiment ends or `stop` is set."""
    from trainpilot.loop import LoopMemory, run_cycle
    from trainpilot.runtime.base import RuntimeFailure

    spec, name = prepared.spec, prepared.experiment.name
    limits = LocalLimits(max_gpus=prepared.gpus, max_parallel_trials=spec.budget.parallel_trials)
    policy = prepared.policy or make_policy(spec)
    interval = float(spec.policy.interval_seconds)
    memory = LoopMemory()
    while True:
        started = time.monotonic()
        try:
            result = await run_cycle(name, spec, status, runtime, policy, local_now(), limits=limits, memory=memory)
            status = result.status
        except RuntimeFailure as error:
            progress.message(f"cycle failed, retrying next cycle: {error}")
        progress.update(status)
        if status.finished or stop.is_set():
            return status
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(0.05, interval - (time.monotonic() - started)))
        except TimeoutError:
            pass
        if stop.is_set():
            return status


async def _shut_down(
    runtime: LocalRuntime, progress: Progress, status: AgentExperimentStatus, *, interrupted: bool
) -> int:
    """Stop what still runs (trainers checkpoint on SIGTERM) and choose the exit code."""
    if not interrupted:
        # Finished: the loop stopped what was running; let the trainers exit (they linger briefly).
        await runtime.close(grace=STOP_GRACE_SECONDS)
        return EXIT_OK if status.phase == "Succeeded" else EXIT_FAILED
    running = runtime.running()
    if running:
        progress.message(f"stopping {len(running)} trial(s): SIGTERM, they checkpoint and exit")
    await runtime.close(grace=STOP_GRACE_SECONDS)
    await runtime.save_status(status)
    return EXIT_INTERRUPTED


def _final_words(
    prepared: Prepared, status: AgentExperimentStatus, exit_code: int, write_report: bool, out: Any
) -> None:
    run_dir = prepared.run_dir
    spec = prepared.spec
    lines: list[str] = []
    if exit_code == EXIT_INTERRUPTED:
        lines.append(f"stopped after {status.decisions_made} decisions; trials checkpointed where they could.")
        lines.append(f"resume with: {shell_command()} run --resume {run_dir}")
    else:
        lines.append(f"experiment {prepared.experiment.name} {status.phase}: {status.message}".rstrip(": "))
    best = status.best_trial
    if best is not None:
        values = ", ".join(f"{k}={v:g}" for k, v in sorted(best.hyperparameters.items()))
        lines.append(
            f"best trial: {best.name} {spec.objective.metric}={fmt(best.objective)} at step {best.step} ({values})"
        )
    else:
        lines.append("best trial: none yet")
    lines.append(f"run directory: {run_dir}")
    lines.append(f"ledger:        {run_dir / 'ledger.jsonl'}  ({shell_command()} history {run_dir})")
    if write_report and exit_code != EXIT_INTERRUPTED:
        try:
            from trainpilot.cli.report import write_report as make_report

            png, html = make_report(run_dir, run_dir)
            lines.append(f"report:        {html}  (plot: {png})")
        except Exception as error:  # noqa: BLE001 - the run itself is done and recorded
            lines.append(
                f"report:        not written ({type(error).__name__}: {error}); try: {shell_command()} report {run_dir}"
            )
    else:
        lines.append(f"report:        {shell_command()} report {run_dir}")
    out.write("\n".join(lines) + "\n")
    out.flush()


def main_run(args: argparse.Namespace) -> int:
    try:
        prepared = prepare(args)
    except UsageError as error:
        print(f"trainpilot run: {error}", file=sys.stderr)
        return EXIT_USAGE
    except _AlreadyFinished as done:
        best = done.status.best_trial
        print(
            f"trainpilot run: {done.run_dir} already finished ({done.status.phase})"
            + (f"; best trial {best.name} ({fmt(best.objective)})" if best else "")
            + f"; nothing to resume. See: {shell_command()} report {done.run_dir}",
            file=sys.stderr,
        )
        return EXIT_OK
    live = sys.stdout.isatty() and not getattr(args, "plain", False)
    try:
        return asyncio.run(drive(prepared, live=live, write_report=not getattr(args, "no_report", False)))
    finally:
        os.close(prepared.lock_fd)
