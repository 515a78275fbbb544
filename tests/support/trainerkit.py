"""Helpers for running the real trainer as a subprocess and reading what it reports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.paths import EXAMPLES, REPO  # noqa: F401 - REPO for callers
from trainpilot.api.contract import RESULT_PREFIX

# A model that trains in milliseconds per step on one CPU core.
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "micro_batch": 8}
# An order-1 chain over 16 symbols: the tiny model gets within hundredths of a nat of its floor in
# 300 steps (order-2 chains need a model that has learned to attend, which takes longer).
EASY_DATA = {"dataset": "synthetic", "vocab_size": 16, "synthetic_order": 1, "synthetic_concentration": 0.1}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def trainer_env(port: int | None = None, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.pop("TRAINPILOT_TRIAL_CONFIG", None)
    env.pop("TRAINPILOT_CONTROL_FILE", None)
    env.update(
        DS_ACCELERATOR="cpu",
        # One intra-op thread per trainer: on a small shared machine, torch's thread pool spinning
        # against other processes' threads makes tiny steps 10x slower (torchrun does the same).
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TRAINPILOT_METRICS_ADDR="127.0.0.1",
        TRAINPILOT_METRICS_PORT=str(port if port is not None else free_port()),
    )
    env.update(extra)
    return env


def write_config(path: Path, hyperparameters: dict | None = None, **fields) -> Path:
    config = {"metrics_linger_seconds": 0, "log_interval": 50, **fields}
    config["hyperparameters"] = {**TINY, **EASY_DATA, **(hyperparameters or {})}
    path.write_text(json.dumps(config))
    return path


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict:
        lines = [line for line in self.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        assert len(lines) == 1, f"expected one result line:\n{self.stdout}\n{self.stderr}"
        return json.loads(lines[0][len(RESULT_PREFIX) :])


class TrainerProcess:
    """A trainer running in the background, with its metrics port."""

    def __init__(self, args: list[str], env: dict[str, str], port: int, cwd: Path):
        self.port = port
        self.stdout_path = cwd / f"stdout-{port}.txt"
        self.stderr_path = cwd / f"stderr-{port}.txt"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=err)

    def scrape(self) -> dict[str, float] | None:
        """Every sample on /metrics by name, or None while the endpoint is not up."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return None
        return {
            sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples
        }

    def wait_for_metrics(self, predicate, timeout: float = 120.0) -> dict[str, float]:
        """Poll /metrics until predicate(samples) holds; fail with the trainer's output otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            samples = self.scrape()
            if samples is not None and predicate(samples):
                return samples
            if self.process.poll() is not None and samples is None:
                break
            time.sleep(0.1)
        self.process.kill()
        raise AssertionError(f"metrics condition not met; last scrape {samples}\n{self.output()}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 120.0) -> Finished:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"trainer did not exit within {timeout} s\n{self.output()}") from None
        return Finished(self.process.returncode, self.stdout_path.read_text(), self.stderr_path.read_text())

    def output(self) -> str:
        return f"--- stdout\n{self.stdout_path.read_text()}\n--- stderr\n{self.stderr_path.read_text()}"


@pytest.fixture
def start_trainer(tmp_path):
    """start_trainer(config_path, torchrun=0, **env) -> TrainerProcess; killed at teardown if still running."""
    started: list[TrainerProcess] = []

    def start(config: Path, nproc: int = 0, **env: str) -> TrainerProcess:
        port = free_port()
        if nproc:
            args = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(nproc),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(free_port()),
                "-m",
                "trainpilot_trainer",
                "--config",
                str(config),
            ]
        else:
            args = [sys.executable, "-m", "trainpilot_trainer", "--config", str(config)]
        process = TrainerProcess(args, trainer_env(port, **env), port, tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait()


def run_trainer(
    config: Path | None, cwd: Path, timeout: float = 180.0, args: list[str] | None = None, **env: str
) -> Finished:
    """Run the trainer to completion (config via --config, or via env when `config` is None)."""
    command = [sys.executable, "-m", "trainpilot_trainer", *(args if args is not None else ["--config", str(config)])]
    completed = subprocess.run(
        command, env=trainer_env(**env), cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    return Finished(completed.returncode, completed.stdout, completed.stderr)
