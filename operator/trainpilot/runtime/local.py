"""LocalRuntime: the Runtime protocol with local processes and a run directory.

`trainpilot run` drives it with the very loop the operator uses (`trainpilot.loop.run_cycle`).
Where the Kubernetes runtime has Jobs, ConfigMaps, Events and the status subresource, this one
has child processes and files:

    <run_dir>/experiment.yaml            the manifest, copied on the first run
    <run_dir>/status.json                the experiment's status (atomic replace)
    <run_dir>/ledger.jsonl               every decision, one JSON line each (append + fsync)
    <run_dir>/prompts.jsonl              every exchange with Claude: exact prompt, answer, usage
    <run_dir>/cycles.jsonl               each cycle's policy input, for `trainpilot replay`
    <run_dir>/approvals/<id>.<verdict>.json  a human's approve or reject of a held decision
    <run_dir>/trials/<trial>/config.json   the TrialConfig the trainer reads
    <run_dir>/trials/<trial>/control.json  in-place changes (atomic replace)
    <run_dir>/trials/<trial>/log.txt       the trainer's stdout and stderr
    <run_dir>/trials/<trial>/metrics.jsonl one line per scrape: the metrics history for reports
    <run_dir>/checkpoints/<trial>/       the trial's checkpoints

Every method is idempotent like the protocol asks: a second launch of a running trial, a second
stop, or a second record with the same id does nothing.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, RetainedPart, TrialStatus
from trainpilot.api.metrics import TrialMetrics
from trainpilot.api.trial import ControlFile, TrialConfig
from trainpilot.core import cycle_log
from trainpilot.core import ledger as ledger_format
from trainpilot.core.approvals import Approval
from trainpilot.core.cycle_log import CycleEntry
from trainpilot.core.decision import DecisionRecord
from trainpilot.core.observation import Observation, TrialObservation
from trainpilot.runtime.base import Departure, LedgerConflict, PermanentFailure, RuntimeFailure
from trainpilot.runtime.clock import local_now
from trainpilot.runtime.files import atomic_write
from trainpilot.runtime.scrape import scrape_all

logger = logging.getLogger(__name__)

# Environment variables of the agent (Claude's key and endpoint) that trial processes never see.
AGENT_SECRET_PREFIXES = ("ANTHROPIC_",)

TRAINER_MODULE = "trainpilot_trainer"
PROMPTS_NAME = "prompts.jsonl"
CYCLES_NAME = "cycles.jsonl"
DEFAULT_RUNS_DIR = "trainpilot-runs"  # `trainpilot run` puts <experiment>/ here unless given --run-dir
KILL_AFTER_SECONDS = 30.0
_PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR, errno.EISDIR})
# torchrun's failure summary names each failed rank's exit code.
_TORCHRUN_EXITCODE = re.compile(r"rank\s*:\s*0\b.*?exitcode\s*:\s*(-?\d+)", re.DOTALL)


def count_gpus() -> int:
    """CUDA devices on this machine; 0 when torch is not importable or sees none."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - any import failure means no usable GPU here
        return 0
    try:
        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001
        return 0


def free_port(host: str = "127.0.0.1", avoid: set[int] | None = None) -> int:
    """A port nobody listens on right now (the OS picks it)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if not avoid or port not in avoid:
            return port
    raise RuntimeFailure("no free TCP port on 127.0.0.1")


def prompt_archive(run_dir: str | Path) -> Callable[[dict[str, Any]], None]:
    """Appends each exchange with an LLM policy to <run_dir>/prompts.jsonl (one JSON line each)."""
    path = Path(run_dir) / PROMPTS_NAME

    def keep(exchange: dict[str, Any]) -> None:
        with open(path, "a", encoding="utf-8") as archive:
            archive.write(json.dumps(exchange, sort_keys=True) + "\n")

    return keep


def result_fields(text: str) -> dict[str, Any] | None:
    """The JSON object of the last `TRAINPILOT_RESULT {json}` line of a trainer log."""
    for line in reversed(text.splitlines()):
        position = line.find(contract.RESULT_PREFIX)
        if position < 0:
            continue
        try:
            raw = json.loads(line[position + len(contract.RESULT_PREFIX) :])
        except json.JSONDecodeError:
            continue
        if isinstance(raw, dict):
            return raw
    return None


def parse_result_line(text: str) -> TrialMetrics | None:
    """The last `TRAINPILOT_RESULT {json}` line of a trainer log, as metrics; None without one."""
    return TrialMetrics.from_result(result_fields(text))


def _tail(path: Path, limit: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (torchrun puts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses; split after the last ')'.
        try:
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


@dataclass
class LocalTrial:
    """One trial's process in this session, and what the runtime knows about it."""

    name: str
    directory: Path
    process: subprocess.Popen[bytes]
    port: int
    gpus: list[int]
    processes: int
    started: float
    metrics_path: str = contract.DEFAULT_METRICS_PATH  # as launched: an edit does not move where it serves
    log: Any = None
    stop_requested: float | None = None
    stop_reason: str = ""
    killed: bool = False
    exit_code: int | None = None
    exited_at: float | None = None
    last_metrics: TrialMetrics | None = None
    final_metrics: TrialMetrics | None = None
    # Restarted under its old name (a resumed run): until this process has measured the objective
    # itself, its NaN means "not measured yet", not divergence, and step 0 means "still loading".
    restarted: bool = False
    measured: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.metrics_path}"

    def poll(self) -> int | None:
        if self.exit_code is None:
            code = self.process.poll()
            if code is not None:
                self.exit_code = code
                self.exited_at = time.monotonic()
                if self.log is not None:
                    self.log.close()
                    self.log = None
        return self.exit_code


class LocalRuntime:
    """Trials as local processes, the ledger and status as files in a run directory."""

    name = "local"
    # A finished trial's process is gone with it; its folder (config, log, metrics) is the record.
    removable: frozenset[RetainedPart] = frozenset({"checkpoints"})

    def __init__(
        self,
        run_dir: str | Path,
        experiment: str,
        spec: AgentExperimentSpec,
        *,
        gpus: int = 0,
        cpu_only: bool = False,
        cores: int | None = None,
        parallel_trials: int | None = None,
        command: list[str] | None = None,
        on_record: Callable[[DecisionRecord], None] | None = None,
        on_message: Callable[[str], None] | None = None,
        kill_after: float = KILL_AFTER_SECONDS,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.experiment = experiment
        self.spec = spec
        self.total_gpus = gpus
        self.cpu_only = cpu_only
        self.cores = cores or os.cpu_count() or 1
        self.parallel_trials = parallel_trials or spec.budget.parallel_trials
        # What a trial runs; tests point it at a fake trainer. torchrun wraps it for several processes.
        self.command = command or [sys.executable, "-m", TRAINER_MODULE]
        self.on_record = on_record
        self.on_message = on_message
        self.kill_after = kill_after
        self.trials: dict[str, LocalTrial] = {}
        self.gpu_table: dict[int, str] = {}  # GPU index -> trial holding it
        self.latest: dict[str, TrialMetrics] = {}  # last metrics seen per trial, for the display
        (self.run_dir / "trials").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.ledger_path = self.run_dir / "ledger.jsonl"
        self.status_path = self.run_dir / "status.json"
        self._ledger: dict[str, DecisionRecord] = {}  # every record in the file, by id
        self._ledger_problems: list[str] = []
        if self.ledger_path.exists():
            records, problems = ledger_format.decode(self.ledger_path.read_text(encoding="utf-8"))
            self._ledger = {record.id: record for record in records}
            self._ledger_problems = problems
            for problem in problems:
                logger.warning("ledger %s: %s", self.ledger_path, problem)
            self._repair_torn_tail()

    # ---------------------------------------------------------------------------- paths

    def trial_dir(self, trial: str) -> Path:
        return self.run_dir / "trials" / trial

    def checkpoint_dir(self, trial: str, spec: AgentExperimentSpec | None = None) -> str | None:
        """Under the run directory, whatever the spec (trialTemplate.checkpoints is the cluster's)."""
        path = self.run_dir / "checkpoints" / trial
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def has_checkpoint(self, trial: str) -> bool:
        return (self.run_dir / "checkpoints" / trial / "latest").is_file()

    # ---------------------------------------------------------------------------- messages

    def _say(self, text: str) -> None:
        logger.info("%s", text)
        if self.on_message is not None:
            self.on_message(text)

    # ---------------------------------------------------------------------------- launch

    def processes_for(self, trial: TrialStatus, spec: AgentExperimentSpec) -> int:
        """`spec`: the one the trial runs under (its launch settings)."""
        template = spec.trial_template
        gpus_per_node = 0 if self.cpu_only else trial.gpus_per_node
        per_node = template.processes_per_node or max(gpus_per_node, 1)
        return max(1, trial.nodes) * per_node

    def gpus_for(self, trial: TrialStatus) -> int:
        if self.cpu_only:
            return 0
        return max(1, trial.nodes) * trial.gpus_per_node

    def _allocate_gpus(self, trial: str, count: int) -> list[int]:
        if count == 0:
            return []
        free = [index for index in range(self.total_gpus) if index not in self.gpu_table]
        if count > len(free):
            raise RuntimeFailure(
                f"{trial} needs {count} GPU(s) but only {len(free)} of {self.total_gpus} are free; "
                "it starts once running trials release theirs"
            )
        chosen = free[:count]
        for index in chosen:
            self.gpu_table[index] = trial
        return chosen

    def _release_gpus(self, trial: str) -> None:
        for index in [index for index, holder in self.gpu_table.items() if holder == trial]:
            del self.gpu_table[index]

    def _environment(self, local: dict[str, Any], spec: AgentExperimentSpec) -> dict[str, str]:
        # The trainer runs the user's training code: it gets no credential of the agent's.
        env = {name: value for name, value in os.environ.items() if not name.startswith(AGENT_SECRET_PREFIXES)}
        env.update(spec.trial_template.env)
        env[contract.ENV_TRIAL_CONFIG] = str(local["config"])
        env[contract.ENV_CONTROL_FILE] = str(local["control"])
        env[contract.ENV_METRICS_ADDR] = "127.0.0.1"
        env[contract.ENV_METRICS_PORT] = str(local["port"])
        env["PYTHONUNBUFFERED"] = "1"
        threads = max(1, self.cores // max(1, self.parallel_trials * local["processes"]))
        env["OMP_NUM_THREADS"] = str(threads)
        if local["gpus"]:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index) for index in local["gpus"])
        else:
            # Hide any GPU from a CPU trial, so none is used behind the allocation table's back.
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["DS_ACCELERATOR"] = "cpu"
        return env

    def _argv(self, processes: int) -> list[str]:
        if processes <= 1:
            return list(self.command)
        # torchrun wraps the trainer module; nodes x processes per node become local processes.
        module = self.command[-1] if self.command[-2:-1] == ["-m"] else TRAINER_MODULE
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            "-m",
            module,
        ]

    async def launch(self, trial: TrialStatus, config: TrialConfig, spec: AgentExperimentSpec) -> None:
        existing = self.trials.get(trial.name)
        if existing is not None:
            return  # already started in this session: idempotent
        directory = self.trial_dir(trial.name)
        note = ""
        if (directory / "config.json").exists():
            # Started by an earlier session that is gone (a recovered decision after a restart):
            # start it again under the same name, from its own checkpoint when it has one.
            note = "restarted after the previous `trainpilot run` stopped"
            if self.has_checkpoint(trial.name):
                config = config.model_copy(update={"resume_from": self.checkpoint_dir(trial.name)})
        self._start(trial, config, spec, note=note, decision=trial.decision, restarted=bool(note))

    async def resume_trial(self, trial: TrialStatus, spec: AgentExperimentSpec) -> bool:
        """Restart an active trial of a stopped run under the same name, under `spec` (the one it was
        launched with); False when it cannot be."""
        if trial.name in self.trials:
            return True
        path = self.trial_dir(trial.name) / "config.json"
        try:
            config = TrialConfig.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            self._say(
                f"{trial.name}: cannot restart it ({type(error).__name__}: {error}); the loop will see it missing"
            )
            return False
        if self.has_checkpoint(trial.name):
            config = config.model_copy(update={"resume_from": self.checkpoint_dir(trial.name)})
            where = f"from its own checkpoint ({self.checkpoint_dir(trial.name)})"
        elif config.resume_from:
            where = f"from {config.resume_from}, as first launched (no checkpoint of its own yet)"
        else:
            where = "from scratch (no checkpoint yet)"
        self._start(trial, config, spec, note=f"resumed run: restarted {where}", restarted=True)
        self._say(f"{trial.name}: restarted {where} (resumed run)")
        return True

    def _start(
        self,
        trial: TrialStatus,
        config: TrialConfig,
        spec: AgentExperimentSpec,
        note: str = "",
        decision: str = "",
        restarted: bool = False,
    ) -> None:
        directory = self.trial_dir(trial.name)
        directory.mkdir(parents=True, exist_ok=True)
        control = directory / "control.json"
        config = config.model_copy(update={"control_file": str(control)})
        config_path = directory / "config.json"
        atomic_write(config_path, config.model_dump_json(indent=2) + "\n")
        if not control.exists():
            atomic_write(control, ControlFile(generation=0).model_dump_json() + "\n")
        processes = self.processes_for(trial, spec)
        gpus = self._allocate_gpus(trial.name, self.gpus_for(trial))
        used_ports = {local.port for local in self.trials.values() if local.exit_code is None}
        port = free_port(avoid=used_ports)
        local = {"config": config_path, "control": control, "port": port, "processes": processes, "gpus": gpus}
        argv = self._argv(processes)
        log = open(directory / "log.txt", "ab")  # noqa: SIM115 - closed when the process exits
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        header = f"==== trainpilot {stamp}: starting {trial.name}"
        if decision:
            header += f" (decision {decision})"
        if note:
            header += f"; {note}"
        header += f"\n==== {' '.join(argv)} (port {port}, gpus {gpus or 'none'})\n"
        log.write(header.encode())
        log.flush()
        try:
            process = subprocess.Popen(  # noqa: S603 - argv built here, never from user text
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=directory,
                env=self._environment(local, spec),
                start_new_session=True,  # a terminal Ctrl-C reaches us, not the trainers
            )
        except OSError as error:
            log.close()
            self._release_gpus(trial.name)
            # A missing or unrunnable program stays that way; anything else (no memory, too many
            # processes) may pass.
            failure = PermanentFailure if error.errno in _PERMANENT_ERRNOS else RuntimeFailure
            raise failure(f"cannot start {trial.name}: {error}") from error
        self.trials[trial.name] = LocalTrial(
            name=trial.name,
            directory=directory,
            process=process,
            port=port,
            gpus=gpus,
            processes=processes,
            metrics_path=spec.metrics.path,
            started=time.monotonic(),
            log=log,
            restarted=restarted,
        )
        logger.info("started %s (pid %d, port %d, %d process(es))", trial.name, process.pid, port, processes)

    # ---------------------------------------------------------------------------- observe

    def _exit_reason(self, local: LocalTrial) -> str:
        code = local.exit_code
        assert code is not None
        if local.processes > 1 and code != 0:
            # torchrun exits 1 whatever its workers said: rank 0's result line, or torchrun's
            # failure summary, has the trainer's own code.
            text = _tail(local.directory / "log.txt")
            fields = result_fields(text)
            match = _TORCHRUN_EXITCODE.search(text)
            if fields is not None and isinstance(fields.get("exit_code"), int):
                code = fields["exit_code"]
            elif match:
                code = int(match.group(1))
        if code < 0:
            if local.stop_requested is not None and not local.killed:
                return "terminated"
            return "crashed"
        if local.stop_requested is not None and code == 1 and local.processes > 1:
            return "terminated"  # torchrun stopped by our SIGTERM
        return contract.EXIT_REASONS.get(code, "crashed")

    def _as_observed(self, local: LocalTrial, metrics: TrialMetrics) -> TrialMetrics | None:
        """What the loop sees of a scrape. A trial restarted under its old name starts a fresh
        process: before it has loaded its checkpoint (step 0) there is no data yet, and before it
        has evaluated, its NaN objective is "not measured yet" (the contract's meaning), which the
        loop must not read as a divergence of a trial that had measured before the restart."""
        if not local.restarted or local.measured:
            return metrics
        objective = contract.objective_metric(self.spec.objective.metric)
        value = metrics.values.get(objective)
        if value is not None and math.isfinite(value):
            local.measured = True
            return metrics
        if metrics.step == 0:
            return None
        return TrialMetrics(values={k: v for k, v in metrics.values.items() if k != objective})

    def _final_metrics(self, local: LocalTrial) -> TrialMetrics | None:
        if local.final_metrics is None:
            result = parse_result_line(_tail(local.directory / "log.txt"))
            if result is None:
                result = self._last_metrics_line(local.name)
            if result is not None and local.last_metrics is not None:
                # Keep what the last scrape saw and let the result line overwrite it.
                result = TrialMetrics(values={**local.last_metrics.values, **result.values})
            local.final_metrics = result or local.last_metrics
        return local.final_metrics

    def _last_metrics_line(self, trial: str) -> TrialMetrics | None:
        text = _tail(self.trial_dir(trial) / "metrics.jsonl", 16 * 1024)
        for line in reversed(text.splitlines()):
            try:
                raw = json.loads(line)
                return TrialMetrics(values={k: float(v) for k, v in raw["values"].items()})
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        return None

    def _append_metrics(self, trial: str, metrics: TrialMetrics, now: str) -> None:
        line = {
            "time": now,
            "step": metrics.step,
            "values": {k: (v if math.isfinite(v) else str(v)) for k, v in sorted(metrics.values.items())},
        }
        path = self.trial_dir(trial) / "metrics.jsonl"
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, separators=(",", ":")) + "\n")

    def _escalate(self) -> None:
        """SIGKILL what ignored a SIGTERM for `kill_after` seconds."""
        moment = time.monotonic()
        for local in self.trials.values():
            if local.poll() is not None or local.stop_requested is None or local.killed:
                continue
            if moment - local.stop_requested >= self.kill_after:
                self._say(f"{local.name}: still running {self.kill_after:.0f}s after SIGTERM; sending SIGKILL")
                self._kill(local)

    async def observe(self, status: AgentExperimentStatus) -> Observation:
        now = local_now()
        self._escalate()
        for local in self.trials.values():
            if local.poll() is not None:
                self._release_gpus(local.name)
        names = [trial.name for trial in status.launched_trials]
        urls = {name: self.trials[name].metrics_url for name in names if name in self.trials}
        errors: dict[str, str] = {}
        scraped = await scrape_all(urls, self.spec.metrics.scrape_timeout_seconds, errors)
        observations: dict[str, TrialObservation] = {}
        for name in names:
            local = self.trials.get(name)
            if local is None:
                observations[name] = TrialObservation(
                    name=name, phase="Missing", message="no process for this trial in this run"
                )
                continue
            metrics = scraped.get(name)
            if metrics is not None and metrics.values:
                self._append_metrics(name, metrics, now)
                local.last_metrics = metrics
                metrics = self._as_observed(local, metrics)
            else:
                metrics = None
            code = local.poll()
            if code is None:
                phase = "Running"
                observation = TrialObservation(name=name, phase=phase, metrics=metrics)
                if local.metrics_url in errors:  # counted like a cluster's: MetricsReachable says so
                    observation.scrape_error = f"{local.metrics_url}: {errors[local.metrics_url]}"
            else:
                self._release_gpus(name)
                if metrics is None:
                    metrics = self._final_metrics(local)
                reason = self._exit_reason(local)
                phase = "Succeeded" if reason == "completed" else "Failed"
                observation = TrialObservation(
                    name=name,
                    phase=phase,
                    exit_reason=reason,
                    exit_code=code,
                    metrics=metrics,
                    message=f"process exited with code {code} ({reason})",
                )
            if observation.metrics is not None:
                self.latest[name] = observation.metrics
            observations[name] = observation
        return Observation(time=now, trials=observations)

    async def sample(self) -> None:
        """Scrape every live trial once and keep it in metrics.jsonl (the report's history).

        observe() scrapes once per cycle, which is all the policy needs; a trial of a few seconds
        needs a few scrapes a second for its curve. Decisions never read these samples.
        """
        urls = {
            local.name: local.metrics_url
            for local in self.trials.values()
            if local.exit_code is None and local.process.poll() is None
        }
        if not urls:
            return
        now = local_now()
        scraped = await scrape_all(urls, min(self.spec.metrics.scrape_timeout_seconds, 1.0))
        for name, metrics in scraped.items():
            if metrics is not None and metrics.values:
                self._append_metrics(name, metrics, now)
                self.trials[name].last_metrics = metrics
                self.latest[name] = metrics

    async def run_sampler(self, interval: float = 0.25) -> None:
        """sample() every `interval` seconds until cancelled."""
        while True:
            started = time.monotonic()
            try:
                await self.sample()
            except Exception as error:  # noqa: BLE001 - a history sample must never stop the run
                logger.debug("metrics sample failed: %s", error)
            await asyncio.sleep(max(0.05, interval - (time.monotonic() - started)))

    # ---------------------------------------------------------------------------- stop

    def _signal(self, local: LocalTrial, signum: int) -> None:
        try:
            os.killpg(local.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                local.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def _kill(self, local: LocalTrial) -> None:
        local.killed = True
        for pid in _descendants(local.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._signal(local, signal.SIGKILL)

    async def remove(self, trial: str, part: RetainedPart, spec: AgentExperimentSpec) -> None:
        if part == "checkpoints":
            folder = self.run_dir / "checkpoints" / trial
            try:
                shutil.rmtree(folder)
            except FileNotFoundError:
                pass
            except OSError as error:  # said like any action refused for good (ActionsHealthy)
                raise PermanentFailure(f"{trial}: checkpoints in {folder} not deleted: {error}") from error
            self._say(f"{trial}: checkpoints deleted (spec.retention.checkpointTrials)")

    async def stop(self, trial: str, reason: str) -> None:
        local = self.trials.get(trial)
        if local is None or local.poll() is not None or local.stop_requested is not None:
            return
        local.stop_requested = time.monotonic()
        local.stop_reason = reason
        logger.info("stopping %s (%s): SIGTERM to process group %d", trial, reason, local.pid)
        self._signal(local, signal.SIGTERM)

    async def departed(self, trial: str) -> Departure | None:
        local = self.trials.get(trial)
        if local is not None and local.poll() is None:
            return None  # still running (saving its checkpoint after SIGTERM, say)
        if local is not None:
            final = self._final_metrics(local)
        else:  # started by an earlier `trainpilot run`, which is gone: its log has the last word
            final = parse_result_line(_tail(self.trial_dir(trial) / "log.txt"))
        return Departure(checkpoint_step=final.checkpoint_step if final is not None else None)

    async def set_control(self, trial: str, control: ControlFile) -> None:
        try:
            atomic_write(self.trial_dir(trial) / "control.json", control.model_dump_json() + "\n")
        except OSError as error:
            failure = PermanentFailure if error.errno in _PERMANENT_ERRNOS else RuntimeFailure
            raise failure(f"control file of {trial}: {error}") from error

    # ---------------------------------------------------------------------------- ledger and status

    def _repair_torn_tail(self) -> None:
        """A crash mid-append can leave a last line without its newline; end it so appends stay whole."""
        try:
            with open(self.ledger_path, "rb+") as handle:
                handle.seek(0, os.SEEK_END)
                if handle.tell() == 0:
                    return
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
                    handle.flush()
                    os.fsync(handle.fileno())
        except OSError:
            pass

    async def record(self, record: DecisionRecord) -> None:
        stored = self._ledger.get(record.id)
        if stored is not None:
            if stored != record:
                raise LedgerConflict(record, stored)
            return
        try:
            with open(self.ledger_path, "a", encoding="utf-8") as handle:
                handle.write(ledger_format.encode(record))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:  # a full or read-only disk: nothing this cycle may act on it
            raise RuntimeFailure(f"ledger {self.ledger_path}: {error}") from error
        self._ledger[record.id] = record
        logger.info("%s", record.message())
        if self.on_record is not None:
            self.on_record(record)

    async def ledger(self, since: int = 0) -> list[DecisionRecord]:
        try:
            text = self.ledger_path.read_text(encoding="utf-8") if self.ledger_path.exists() else ""
        except OSError as error:
            raise RuntimeFailure(f"ledger {self.ledger_path}: {error}") from error
        records, _ = ledger_format.decode(text)
        return [record for record in records if record.seq >= since]

    async def approvals(self) -> list[Approval]:
        from trainpilot.runtime.sign_off_files import read_sign_offs  # it imports this module

        return read_sign_offs(self.run_dir)

    async def log_cycle(self, entry: CycleEntry) -> None:
        try:
            with open(self.run_dir / CYCLES_NAME, "a", encoding="utf-8") as handle:
                handle.write(cycle_log.encode(entry))
        except OSError as error:
            raise RuntimeFailure(f"cycle log {self.run_dir / CYCLES_NAME}: {error}") from error

    async def announce(self, reason: str, message: str) -> None:
        # The loop's own warning already reaches the console; this keeps the run's log complete.
        logger.info("event %s: %s", reason, message)

    async def save_status(self, status: AgentExperimentStatus) -> None:
        try:
            atomic_write(self.status_path, json.dumps(status.wire(), indent=2, sort_keys=False) + "\n")
        except OSError as error:
            raise RuntimeFailure(f"status {self.status_path}: {error}") from error

    def load_status(self) -> AgentExperimentStatus:
        if not self.status_path.exists():
            return AgentExperimentStatus()
        return AgentExperimentStatus.model_validate_json(self.status_path.read_text(encoding="utf-8"))

    # ---------------------------------------------------------------------------- lifecycle

    def running(self) -> list[LocalTrial]:
        return [local for local in self.trials.values() if local.poll() is None]

    async def wait_all(self, timeout: float) -> bool:
        """Wait for every process to exit; True when they all did within `timeout`."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def close(self, grace: float = 40.0) -> None:
        """Stop everything: SIGTERM (they checkpoint), wait up to `grace` seconds, then SIGKILL."""
        for local in self.running():
            await self.stop(local.name, "shutdown")
        if not await self.wait_all(grace):
            for local in self.running():
                self._say(f"{local.name}: did not exit {grace:.0f}s after SIGTERM; sending SIGKILL")
                self._kill(local)
            await self.wait_all(5.0)
        for local in self.trials.values():
            local.poll()
            self._release_gpus(local.name)

    def kill_all(self) -> None:
        """No more waiting: SIGKILL every trial now (a second Ctrl-C)."""
        for local in self.running():
            self._kill(local)
