"""Entry point: `python -m trainpilot_trainer [--config PATH]`, alone or under torchrun.

Order matters: everything that can make a config invalid (the file, the fields, the device,
the resume checkpoint, the data) is checked before DeepSpeed starts, so an invalid trial
ends in about a second with exit code 2 and one line on stderr naming the field. SIGTERM and
SIGINT are caught from the first instruction (see signals.py): a stop asked for during start-up
ends the run at the next phase boundary with exit code 4, before DeepSpeed starts when it can.

Every way out goes through `Report.finish`: the result line on stdout (rank 0; every rank that
fails before the process group exists), the termination message (every rank, merged, see
termination.py) and the linger that keeps /metrics up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from trainpilot.api import contract

from .config import (
    PINS_FOLDER,
    check_resume,
    check_resume_fits,
    control_file_path,
    describe_fast_path,
    find_compiler,
    metrics_endpoint,
    native_bf16,
    own_checkpoint,
    pin_checkpoint,
    read_trial_config,
    resolve_device,
    resolve_fast_path,
    resolve_precision,
    saved_settings,
)
from .control import ControlWatcher
from .data import build_dataset
from .distributed import prepare_environment
from .errors import ConfigError
from .exitcodes import EXIT_CRASHED, EXIT_INVALID_CONFIG, EXIT_REASONS, EXIT_STOPPED
from .flops import peak_flops
from .metrics import Metrics
from .signals import StopRequest, install_stop_handlers
from .termination import write_termination_message


def print_result(fields: dict) -> None:
    """The final summary, one JSON object on one stdout line, for runtimes that read our output."""
    print(contract.RESULT_PREFIX + json.dumps(fields, separators=(",", ":")), flush=True)


class Report:
    """How this process tells the world it is done."""

    def __init__(self, env: os._Environ | dict, stop: StopRequest) -> None:
        self.env = env
        self.stop = stop
        # Before prepare_environment runs, torchrun's RANK is all there is; without it, we are alone.
        self.rank = _int(env.get("RANK"), 0)
        self.prints_result = True  # every rank until the process group exists, then rank 0 only
        self.experiment = "local"
        self.trial = "trial-0"

    def finish(self, summary: dict, linger_seconds: float = 0.0) -> int:
        summary = {"experiment": self.experiment, "trial": self.trial, **summary}
        if self.prints_result:
            print_result(summary)
        write_termination_message(summary, self.env.get(contract.ENV_TERMINATION_LOG), self.rank)
        if self.rank == 0 and linger_seconds:
            linger(linger_seconds, self.stop)
        return int(summary["exit_code"])

    def invalid_config(self, message: str, linger_seconds: float = 0.0) -> int:
        if self.prints_result:
            print(f"trainpilot: {message}", file=sys.stderr, flush=True)
        return self.finish(_exit(EXIT_INVALID_CONFIG, message), linger_seconds)

    def crashed(self, step: int | None = None, linger_seconds: float = 0.0) -> int:
        """Call from an `except` block: the traceback goes to stderr, its last line to the summary."""
        traceback.print_exc()
        error = sys.exc_info()[1]
        summary = _exit(EXIT_CRASHED, f"{type(error).__name__}: {error}"[:512])
        if step is not None:
            summary["step"] = step
        return self.finish(summary, linger_seconds)

    def stopped_during_startup(self, phase: str) -> int:
        message = f"stopped by {self.stop.describe()} {phase}, before training"
        print(f"trainpilot: {message}", file=sys.stderr, flush=True)
        return self.finish(_exit(EXIT_STOPPED, message))


def _exit(code: int, message: str) -> dict:
    return {"exit_code": code, "exit_reason": EXIT_REASONS[code], "message": message}


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def main(argv: list[str] | None = None, stop: StopRequest | None = None) -> int:
    stop = stop if stop is not None else install_stop_handlers()
    parser = argparse.ArgumentParser(prog="python -m trainpilot_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"trial config JSON (default: ${contract.ENV_TRIAL_CONFIG})")
    args = parser.parse_args(argv)
    report = Report(os.environ, stop)
    try:
        return _main(args.config or os.environ.get(contract.ENV_TRIAL_CONFIG), stop, report)
    except Exception:  # an unexpected error outside the training loop: still a result line and a reason
        return report.crashed()


def _main(config_path: str | None, stop: StopRequest, report: Report) -> int:
    pins: list[Path] = []  # this process's pinned copy of another trial's checkpoint, if any
    try:
        return _run(config_path, stop, report, pins)
    finally:
        for folder in pins:
            shutil.rmtree(folder, ignore_errors=True)


def _run(config_path: str | None, stop: StopRequest, report: Report, pins_made: list[Path]) -> int:
    pin_note: str | None = None
    try:
        config = read_trial_config(config_path)
        report.experiment, report.trial = config.experiment, config.trial
        hp = config.hyperparameters
        endpoint = metrics_endpoint(os.environ)
        dist_env = prepare_environment(os.environ)
        resume = own_checkpoint(config, hp.zero_stage, dist_env.world_size)
        if resume is None and config.resume_from:
            resume = check_resume(config.resume_from, config.resume_tag, hp.zero_stage, dist_env.world_size)
            # Another trial's checkpoint: pinned, since that trial may go on and remove the tag.
            pinned = Path(config.resume_from).parent / PINS_FOLDER / f"{config.trial}-rank{dist_env.rank}-{os.getpid()}"
            pins_made.append(pinned)
            resume, pin_note = pin_checkpoint(resume, pinned, hp.zero_stage, dist_env.world_size)
        if stop.check():
            return report.stopped_during_startup("while checking the config")
        import torch  # only now: the checks above must not wait for torch to import

        device = resolve_device(hp, torch.cuda.is_available())
        # Native bf16 only (Ampere and later): emulated bf16 on older GPUs is slower than their fp16.
        bf16 = device == "cuda" and native_bf16(torch.cuda.get_device_capability(dist_env.local_rank))
        precision = resolve_precision(hp, device, bf16_supported=bf16)
        fast, fast_notes = resolve_fast_path(hp, device, find_compiler(os.environ))
        dataset = build_dataset(hp)
    except ConfigError as error:
        return report.invalid_config(str(error))

    from .trainer import DEEPSPEED_VERSION, Trainer  # imports deepspeed: slow, and only needed from here on

    if resume is not None:
        try:
            check_resume_fits(resume, precision, DEEPSPEED_VERSION)
        except ConfigError as error:
            return report.invalid_config(str(error))
        fast, kept = saved_settings(resume, fast, hp, precision)
        fast_notes += kept
    if stop.check():  # the process group does not exist yet: each rank decides for itself
        return report.stopped_during_startup("while loading torch, DeepSpeed and the data")

    fingerprint = dataset.validation_fingerprint
    device_name = torch.cuda.get_device_name(dist_env.local_rank) if device == "cuda" else "cpu"
    peak = peak_flops(device_name, precision, fast.tf32) if device == "cuda" else None
    metrics = Metrics(
        hp.max_steps,
        dataset.loss_floor,
        cuda=device == "cuda",
        validation=(fingerprint, dataset.validation_tokens),
        entropy_rate=dataset.entropy_rate,
        mfu=peak is not None,
    )
    if dist_env.is_main:
        try:
            port = metrics.serve(endpoint.addr, endpoint.port)
        except OSError as error:  # the port is taken: the environment's fault, not the config's
            print(
                f"trainpilot: cannot serve metrics on {endpoint.addr}:{endpoint.port}: {error}",
                file=sys.stderr,
                flush=True,
            )
            return report.finish(_exit(EXIT_CRASHED, f"cannot serve metrics: {error}"))
        print(
            f"trial {config.experiment}/{config.trial}: {dataset.description}; validation "
            f"{dataset.eval_windows} windows, {dataset.validation_tokens:,} tokens, fingerprint {fingerprint:012x}; "
            f"device {device} {precision}, "
            f"{dist_env.world_size} rank(s); metrics on http://{endpoint.addr}:{port}{contract.DEFAULT_METRICS_PATH}",
            flush=True,
        )
        print(f"fast path: {describe_fast_path(fast)}; {_peak_line(device_name, precision, peak)}", flush=True)
        for note in [*fast_notes, *([pin_note] if pin_note else [])]:
            print(f"trainpilot: {note}", flush=True)
    control = ControlWatcher(control_file_path(config, os.environ))
    trainer = None
    try:
        # How it runs: the fast path, the device's peak (MFU), and whether the resume is universal.
        runs = {"fast": fast, "peak": peak, "universal_resume": resume is not None and resume.universal}
        trainer = Trainer(config, dataset, dist_env, device, precision, metrics, control, stop, **runs)
        # From here on all ranks decide together (the per-step agreement); rank 0 speaks for them.
        report.prints_result = dist_env.is_main
        if dist_env.is_main:
            print(f"model: {trainer.num_parameters:,} parameters, {hp.n_layer} layers x {hp.n_embd} wide", flush=True)
        if resume is not None:
            trainer.resume(resume.directory, resume.tag, universal=resume.universal, origin=resume.origin)
            for folder in pins_made:  # loaded: the links would only keep the other trial's old tag on disk
                shutil.rmtree(folder, ignore_errors=True)
        result = trainer.run()
        code = report.finish(result.as_dict(), config.metrics_linger_seconds)
    except ConfigError as error:  # e.g. a checkpoint that does not fit this model (all ranks see it)
        code = report.invalid_config(str(error), config.metrics_linger_seconds)
    except Exception:
        code = report.crashed(trainer.step if trainer else 0, config.metrics_linger_seconds)
    metrics.close()
    _shutdown_process_group(together=code == 0)
    return code


def _peak_line(device_name: str, precision: str, peak: float | None) -> str:
    if device_name == "cpu":
        return "MFU: not measured on a CPU"
    if peak is None:
        return f"MFU: not exported, no {precision} peak known for {device_name} (flops.PEAKS)"
    return f"MFU against {peak / 1e12:,.0f} TFLOP/s dense {precision} peak of {device_name}"


def linger(seconds: float, stop: StopRequest) -> None:
    """Keep /metrics up so the last values can be scraped. A signal the training loop did not
    act on (it arrived after the loop last looked) cuts it short."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.unhandled:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _shutdown_process_group(together: bool) -> None:
    """Leave the process group. After a clean run every rank first waits for the others: a rank
    that tears gloo down while a peer still talks to it can abort ("terminate called without an
    active exception") and turn a finished trial into a failed torchrun. After a failure no rank
    waits, since a peer may never arrive."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if together and dist.get_world_size() > 1:
            with contextlib.suppress(Exception):
                dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
