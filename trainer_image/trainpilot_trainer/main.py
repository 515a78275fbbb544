"""Entry point: `python -m trainpilot_trainer [--config PATH]`, alone or under torchrun.

Order matters: everything that can make a config invalid (the file, the fields, the device,
the resume checkpoint, the data) is checked before DeepSpeed starts, so an invalid trial
ends in about a second with exit code 2 and one line on stderr naming the field.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from trainpilot.api import contract
from trainpilot.api.metrics import TrialMetrics

from .config import (
    check_resume,
    control_file_path,
    metrics_endpoint,
    read_trial_config,
    resolve_device,
    resolve_precision,
)
from .control import ControlWatcher
from .data import build_dataset
from .distributed import prepare_environment
from .errors import ConfigError
from .exitcodes import EXIT_CRASHED, EXIT_INVALID_CONFIG, EXIT_REASONS
from .metrics import Metrics


def print_result(fields: dict) -> None:
    """The final summary, one JSON object on one stdout line, for runtimes that read our output."""
    print(contract.RESULT_PREFIX + json.dumps(fields, separators=(",", ":")), flush=True)


def write_termination_message(summary: dict, path: str | None) -> None:
    """The final gauges under their contract names, for the pod status (the kubelet keeps 4 KiB)."""
    if not path:
        return
    metrics = TrialMetrics.from_result(summary)
    try:
        with open(path, "w") as handle:
            handle.write(json.dumps(metrics.values if metrics else {}, separators=(",", ":"))[:4096])
    except OSError as error:  # a read-only or absent path must not turn a finished run into a crash
        print(f"trainpilot: could not write the termination message to {path}: {error}", file=sys.stderr)


def fail_config(message: str) -> int:
    print(f"trainpilot: {message}", file=sys.stderr, flush=True)
    print_result(
        {"exit_code": EXIT_INVALID_CONFIG, "exit_reason": EXIT_REASONS[EXIT_INVALID_CONFIG], "message": message}
    )
    return EXIT_INVALID_CONFIG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainpilot_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"trial config JSON (default: ${contract.ENV_TRIAL_CONFIG})")
    args = parser.parse_args(argv)

    # Until the signal handlers are installed below, a signal ends the process the default way:
    # nothing has been trained yet, so there is nothing to save.
    try:
        config = read_trial_config(args.config or os.environ.get(contract.ENV_TRIAL_CONFIG))
        hp = config.hyperparameters
        endpoint = metrics_endpoint(os.environ)
        dist_env = prepare_environment(os.environ)
        resume_tag = (
            check_resume(config.resume_from, hp.zero_stage, dist_env.world_size) if config.resume_from else None
        )
        import torch  # only now: the checks above must not wait for torch to import

        device = resolve_device(hp, torch.cuda.is_available())
        bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
        precision = resolve_precision(hp, device, bf16_supported=bf16)
        dataset = build_dataset(hp)
    except ConfigError as error:
        return fail_config(str(error))

    from .trainer import StopRequest, Trainer  # imports deepspeed: slow, and only needed from here on

    stop = StopRequest()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    metrics = Metrics(hp.max_steps, dataset.loss_floor, cuda=device == "cuda")
    if dist_env.is_main:
        try:
            port = metrics.serve(endpoint.addr, endpoint.port)
        except OSError as error:  # the port is taken: the environment's fault, not the config's
            print(
                f"trainpilot: cannot serve metrics on {endpoint.addr}:{endpoint.port}: {error}",
                file=sys.stderr,
                flush=True,
            )
            print_result({"exit_code": EXIT_CRASHED, "exit_reason": EXIT_REASONS[EXIT_CRASHED], "message": str(error)})
            return EXIT_CRASHED
        print(
            f"trial {config.experiment}/{config.trial}: {dataset.description}; device {device} {precision}, "
            f"{dist_env.world_size} rank(s); metrics on http://{endpoint.addr}:{port}{contract.DEFAULT_METRICS_PATH}",
            flush=True,
        )
    control = ControlWatcher(control_file_path(config, os.environ))
    trainer = None
    try:
        trainer = Trainer(config, dataset, dist_env, device, precision, metrics, control, stop)
        if dist_env.is_main:
            print(f"model: {trainer.num_parameters:,} parameters, {hp.n_layer} layers x {hp.n_embd} wide", flush=True)
        if resume_tag is not None:
            trainer.resume(config.resume_from, resume_tag)
        result = trainer.run()
        code = result.exit_code
        summary = {"experiment": config.experiment, "trial": config.trial, **result.as_dict()}
    except ConfigError as error:  # e.g. a checkpoint that does not fit this model (all ranks see it)
        code = fail_config(str(error)) if dist_env.is_main else EXIT_INVALID_CONFIG
        summary = None
    except Exception:
        import traceback

        traceback.print_exc()
        code = EXIT_CRASHED
        summary = {
            "experiment": config.experiment,
            "trial": config.trial,
            "exit_code": code,
            "exit_reason": EXIT_REASONS[code],
            "step": trainer.step if trainer else 0,
        }
    if dist_env.is_main:
        if summary is not None:
            print_result(summary)
            write_termination_message(summary, os.environ.get(contract.ENV_TERMINATION_LOG))
        linger(config.metrics_linger_seconds, stop)
    metrics.close()
    _shutdown_process_group()
    return code


def linger(seconds: float, stop) -> None:
    """Keep /metrics up so the last values can be scraped. A signal the training loop did not
    act on (it arrived after the loop last looked) cuts it short."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.unhandled:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _shutdown_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
