"""The real family: one whole experiment with the project's trainer on this machine, as
`trainpilot run` runs it (its runtime, its loop, its run directory), under any policy.

The figures come from the run directory afterwards, as a user would read them: the cycle log
(cycles.jsonl) has the status each cycle's policy saw, so the trajectory (trial-steps used, best
objective) and each trial's first bad sign are read from it; the ledger says when each trial was stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.policybench.figures import decision_counts, trial_rows
from bench.policybench.tasks import TASKS
from trainpilot.api.experiment import AgentExperimentStatus
from trainpilot.core import cycle_log
from trainpilot.core import ledger as ledger_format
from trainpilot.core.state import is_diverged

SPIKE_FACTOR = 3.0  # a smoothed train loss this far above its best is a bad sign (the heuristic's default)
EXPERIMENT = "bench"


def run_real(
    task_name: str,
    policy_name: str,
    seed: int,
    budget: dict[str, Any],
    *,
    make_policy: Callable[[str, int], Any],
    policy_spec: dict[str, Any],
    interval_seconds: float = 1.0,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Runs it to its end and returns bench.policies.plain's fields."""
    from trainpilot.cli.run import drive, prepare

    task = TASKS[task_name]
    spec = task.spec(policy={"intervalSeconds": interval_seconds, **policy_spec}, budget=budget, seed=seed)
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=f"bench-{task_name}-{policy_name}-{seed}-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "experiment.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "trainpilot.dev/v1alpha1",
                "kind": "AgentExperiment",
                "metadata": {"name": EXPERIMENT},
                "spec": spec.wire(),
            }
        )
    )
    run_dir = work / "run"
    args = argparse.Namespace(experiment=str(manifest), run_dir=str(run_dir), resume=None, cpu=True, plain=True)
    started = time.monotonic()
    prepared = prepare(args)
    prepared.policy = make_policy(policy_name, seed)
    try:
        asyncio.run(drive(prepared, live=False, write_report=False, out=io.StringIO()))
    finally:
        os.close(prepared.lock_fd)
    return read_run(run_dir, task_name, policy_name, seed, time.monotonic() - started)


def read_run(run_dir: Path, task: str, policy: str, seed: int, wall_seconds: float) -> dict[str, Any]:
    entries, _ = cycle_log.decode((run_dir / "cycles.jsonl").read_text())
    statuses = [AgentExperimentStatus.model_validate(entry.status) for entry in entries]
    records, _ = ledger_format.decode((run_dir / "ledger.jsonl").read_text())
    final = AgentExperimentStatus.model_validate_json((run_dir / "status.json").read_text())
    statuses.append(final)
    trajectory, first_bad = [], {}
    best = math.inf
    for cycle, status in enumerate(statuses):
        for trial in status.trials:
            if trial.best_objective is not None and not is_diverged(trial) and trial.state != "Failed":
                best = min(best, trial.best_objective)
            bad = trial.nonfinite_losses > 0 or (
                trial.smoothed_train_loss is not None
                and trial.best_train_loss
                and trial.smoothed_train_loss > SPIKE_FACTOR * trial.best_train_loss
            )
            if bad and trial.name not in first_bad:
                first_bad[trial.name] = cycle
        trajectory.append((status.trial_steps_used, best))
    cycle_of = {record_id: cycle for cycle, entry in enumerate(entries) for record_id in entry.decided}
    stopped = {
        record.decision.trial: cycle_of.get(record.id, len(entries))
        for record in records
        if record.outcome == "executed" and record.decision.action == "terminate" and record.decision.trial
    }
    return {
        "policy": policy,
        "task": task,
        "seed": seed,
        "phase": final.phase,
        "trajectory": trajectory,
        "device_trajectory": [],
        "first_bad_sign": first_bad,
        "terminated_at": stopped,
        "trials": trial_rows(final.trials),
        "decisions": decision_counts(records),
        "fresh_curves": fresh_curves(final),
        "wall_seconds": wall_seconds,
        "tokens": final.model_usage.input_tokens + final.model_usage.output_tokens,
    }


def fresh_curves(status: AgentExperimentStatus) -> list[list[list[float]]]:
    """The evaluations of every trial that trained from scratch and neither crashed nor diverged:
    the real family's oracle is the best of them (one configuration, trained alone)."""
    return [
        [list(point) for point in trial.history]
        for trial in status.trials
        if trial.parent is None
        and trial.resumed_from_step is None
        and trial.state != "Failed"
        and not is_diverged(trial)
    ]
