"""Record learning curves from the real trainer for the policy benchmark's surrogate.

    DS_ACCELERATOR=cpu .venv/bin/python -m bench.record_curves --task synthetic [--jobs 2]
    DS_ACCELERATOR=cpu .venv/bin/python -m bench.record_curves --task text

Runs `python -m trainpilot_trainer --config trial.json` (one process per run, one thread each,
`--jobs` at once) with the task's fixed trial template (bench/policybench/tasks.py) over a grid:
lr in {1e-4, 3e-4, ..., 0.3, 1.0} x micro_batch {4, 32} x warmup_steps {0, 100} at seed 0, plus
seeds 1 and 2 at three points (a low lr, a good one, one near the edge of stability) to measure
seed-to-seed noise. `fail_fast` is off, so a diverging run goes on and its whole curve is seen.

Every run's stdout is parsed: the train loss of every step (`log_interval: 1`), every evaluation's
val_loss, and the TRAINPILOT_RESULT line (exit reason, first bad step, non-finite count, loss
floor). Written to bench/curves/TASK.json, compact: losses rounded to 1e-4, non-finite ones null.
Then fit the surrogate with `python -m bench.policybench.surrogate --fit TASK`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.policybench.tasks import CURVES_DIR, TASKS

LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
MICRO_BATCHES = [4, 32]
WARMUPS = [0, 100]
# (lr, micro_batch, warmup_steps) run again with seeds 1 and 2.
NOISE_POINTS = [(3e-4, 4, 0), (3e-3, 32, 0), (3e-2, 4, 100)]
NOISE_SEEDS = [1, 2]

STEP_LINE = re.compile(r"^step (\d+)/\d+ \| loss (\S+) \|")
EVAL_LINE = re.compile(r"^eval step (\d+) \| val_loss (\S+)")
RESULT_PREFIX = "TRAINPILOT_RESULT "


def grid(task: str) -> list[dict[str, Any]]:
    points = [
        {"lr": lr, "micro_batch": mb, "warmup_steps": wu, "seed": 0}
        for lr in LRS
        for mb in MICRO_BATCHES
        for wu in WARMUPS
    ]
    points += [
        {"lr": lr, "micro_batch": mb, "warmup_steps": wu, "seed": seed}
        for lr, mb, wu in NOISE_POINTS
        for seed in NOISE_SEEDS
    ]
    return points


def _number(text: str) -> float | None:
    value = float(text)
    return round(value, 4) if math.isfinite(value) else None


def run_one(task: str, point: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One trainer process; its curve as one compact record."""
    name = f"lr{point['lr']:g}-mb{point['micro_batch']}-wu{point['warmup_steps']}-s{point['seed']}"
    config = {
        "experiment": f"curves-{task}",
        "trial": name,
        "hyperparameters": {**TASKS[task].template, **point},
        "metrics_linger_seconds": 0,
        "log_interval": 1,
    }
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TRAINPILOT_METRICS_PORT": "0",
        "TRAINPILOT_METRICS_ADDR": "127.0.0.1",
    }
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "trainpilot_trainer", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    train: list[float | None] = []
    eval_steps: list[int] = []
    val: list[float | None] = []
    result: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        if match := STEP_LINE.match(line):
            step = int(match.group(1))
            assert step == len(train) + 1, (name, step, len(train))
            train.append(_number(match.group(2)))
        elif match := EVAL_LINE.match(line):
            eval_steps.append(int(match.group(1)))
            val.append(_number(match.group(2)))
        elif line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
    if not result:
        raise RuntimeError(f"{name}: no result line (exit {done.returncode}):\n{done.stderr[-2000:]}")
    record = {
        "hp": point,
        "exit_reason": result["exit_reason"],
        "first_bad_step": result.get("first_bad_step"),
        "nonfinite": result.get("nonfinite_loss_total", 0),
        "eval_steps": eval_steps,
        "val": val,
        "train": train,
        "train_seconds": result.get("seconds"),
        "wall_seconds": round(wall, 2),
        "loss_floor": result.get("loss_floor"),
    }
    bad = "" if record["first_bad_step"] is None else f" first bad step {record['first_bad_step']}"
    last = next((v for v in reversed(val) if v is not None), None)
    print(f"{name}: {record['exit_reason']}, final val {last}{bad}, {wall:.1f} s", flush=True)
    return record


def record(task: str, jobs: int) -> dict[str, Any]:
    points = grid(task)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"curves-{task}-") as tmp, ThreadPoolExecutor(jobs) as pool:
        runs = list(pool.map(lambda point: run_one(task, point, Path(tmp)), points))
    floors = {run["loss_floor"] for run in runs}
    assert len(floors) == 1, floors  # one validation set for every run
    floor = floors.pop()
    for run in runs:
        del run["loss_floor"]
    return {
        "task": task,
        "template": TASKS[task].template,
        "loss_floor": floor,
        "recorded_with": "python -m bench.record_curves --task " + task,
        "jobs": jobs,
        "total_seconds": round(time.perf_counter() - started, 1),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--jobs", type=int, default=2, help="trainer processes at once (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="default bench/curves/TASK.json")
    args = parser.parse_args(argv)
    data = record(args.task, args.jobs)
    out = args.out or CURVES_DIR / f"{args.task}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {out} ({out.stat().st_size // 1024} KB, {len(data['runs'])} runs, {data['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
