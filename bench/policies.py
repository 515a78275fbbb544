"""Does the agent save compute? Whole experiments under each policy, same budget, same seeds, one table.

The fast family plays each trial on the learning-curve surrogate fitted to the real trainer's
curves (bench/policybench/surrogate.py), through the operator's own loop and guardrails
(bench/policybench/harness.py): hundreds of experiments in minutes. The real family runs the
project's trainer on this machine's CPU through `trainpilot run`'s runtime (bench/policybench/real.py).

    .venv/bin/python -m bench.policies                              # fast family, both tasks, 10 seeds
    .venv/bin/python -m bench.policies --family real --seeds 3      # real trainers (about 25 minutes on 2 cores)
    .venv/bin/python -m bench.policies --policies heuristic,random --tasks synthetic --seeds 3
    ANTHROPIC_API_KEY=... .venv/bin/python -m bench.policies --policies claude --live

Compute is trial-steps (spec.budget.maxTrialSteps, the budget every policy gets); GPU-hours are
device-steps at --gpu-seconds-per-step, a stated rate, not a measurement. BENCHMARKS.md has the
figures and the machine they came from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from bench.policybench import oracle
from bench.policybench.baselines import BASELINES
from bench.policybench.figures import Summary, decision_counts, paired_p_value, quartiles, summarize, trial_rows
from bench.policybench.tasks import TASKS, Task
from trainpilot.core.policy import HeuristicPolicy, Policy

FAST_POLICIES = ["random", "grid", "median-stopping", "asha", "pbt", "tpe", "cmaes", "heuristic", "claude"]
REAL_POLICIES = ["random", "asha", "tpe", "cmaes", "heuristic"]
BASELINE = "random"  # the ratios' reference
CLOSE = 0.25  # relative difference in median compute below which two policies get a significance test


def _top_level(text: str, separator: str) -> list[str]:
    """`text` split at `separator` outside brackets: heuristic:rungs=[0.11,0.33];exploit=false,random."""
    return re.split(rf"{re.escape(separator)}(?![^\[]*\])", text)


def make_policy(name: str, seed: int, live: bool = False, replay: Path | None = None) -> Policy:
    if name == "heuristic" or name.startswith("heuristic:"):
        return HeuristicPolicy()
    if name == "claude":
        from trainpilot.core.policy.claude import ClaudePolicy

        if live:
            from trainpilot.runtime.claude import AnthropicModel

            return ClaudePolicy(AnthropicModel(_claude_settings()))
        from bench.policybench.claude_replay import RecordedModel

        return ClaudePolicy(RecordedModel(replay))
    return BASELINES[name](seed)


def _claude_settings() -> Any:
    from trainpilot.api.experiment import ClaudeSettings

    return ClaudeSettings()


def budget_for(task: Task, trials: int, parallel: int) -> dict[str, Any]:
    """The same compute for every policy: `trials` full trials' worth of trial-steps. maxTrials is
    out of the way, so a policy that stops trials early may spend what it saved on more of them."""
    return {
        "maxTrials": 500,
        "parallelTrials": parallel,
        "maxFailedTrials": 500,
        "maxTrialSteps": trials * task.max_steps,
    }


def policy_spec(name: str) -> dict[str, Any]:
    """spec.policy for a policy name; `heuristic:key=value,...` sets spec.policy.heuristic fields (an ablation)."""
    if name == "claude":
        return {"type": "claude", "claude": {"minIntervalSeconds": 0, "overrideShare": 0.3}}
    if name.startswith("heuristic:"):
        settings = dict(item.split("=", 1) for item in _top_level(name.split(":", 1)[1], ";"))
        return {"heuristic": {key: yaml.safe_load(value) for key, value in settings.items()}}
    return {}


def _run_fast(job: tuple[str, str, int, dict[str, Any], bool, str | None]) -> dict[str, Any]:
    """One experiment in a worker process; returns its summary inputs as plain data."""
    from bench.policybench.harness import run_experiment

    task_name, policy_name, seed, budget, live, replay = job
    task = TASKS[task_name]
    policy = make_policy(policy_name, seed, live, Path(replay) if replay else None)
    result = asyncio.run(run_experiment(task, policy, seed, budget, policy_spec=policy_spec(policy_name)))
    return plain(result, policy_name)


def plain(result: Any, policy_name: str) -> dict[str, Any]:
    """What the figures need of one experiment, picklable and JSON-able."""
    return {
        "policy": policy_name,
        "task": result.task,
        "seed": result.seed,
        "phase": result.status.phase,
        "trajectory": result.trajectory,
        "device_trajectory": getattr(result, "device_trajectory", []),
        "first_bad_sign": result.first_bad_sign,
        "terminated_at": result.terminated_at,
        "trials": trial_rows(result.status.trials),
        "decisions": decision_counts(result.records),
        "wall_seconds": result.wall_seconds,
        "tokens": result.status.model_usage.input_tokens + result.status.model_usage.output_tokens,
    }


def run_all(
    family: str,
    tasks: Sequence[str],
    policies: Sequence[str],
    seeds: Sequence[int],
    trials: int,
    parallel: int,
    workers: int,
    live: bool,
    replay: str | None,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    jobs = [
        (task, policy, seed, budget_for(TASKS[task], trials, parallel), live, replay)
        for task in tasks
        for policy in policies
        for seed in seeds
    ]
    if family == "real":
        from bench.policybench.real import run_real

        results = []
        for job in jobs:
            results.append(run_real(*job[:4], make_policy=make_policy, policy_spec=policy_spec(job[1])))
            progress(_progress_line(results[-1], len(results), len(jobs)))
        return results
    results = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for done in pool.map(_run_fast, jobs, chunksize=1):
            results.append(done)
            progress(_progress_line(done, len(results), len(jobs)))
    return results


def _progress_line(done: dict[str, Any], count: int, total: int) -> str:
    best = min((b for _, b in done["trajectory"] if math.isfinite(b)), default=math.inf)
    return (
        f"[{count}/{total}] {done['task']} {done['policy']} seed {done['seed']}: {done['phase']}, "
        f"best {best:.4f}, {done['trajectory'][-1][0] if done['trajectory'] else 0} trial-steps, "
        f"{done['wall_seconds']:.1f} s"
    )


# ---- the table -------------------------------------------------------------------------------


def table(results: list[dict[str, Any]], gpu_seconds_per_step: float) -> str:
    lines: list[str] = []
    for task_name in dict.fromkeys(r["task"] for r in results):
        task = TASKS[task_name]
        by_policy: dict[str, list[dict[str, Any]]] = {}
        for result in results:
            if result["task"] == task_name:
                by_policy.setdefault(result["policy"], []).append(result)
        real = any("fresh_curves" in result for result in results)
        target = task.target if real else oracle.surrogate_target(task)
        summaries = {name: summarize(group, target) for name, group in by_policy.items()}
        mine = [result for result in results if result["task"] == task_name]
        limit = oracle.best_run_seen(task, mine) if real else oracle.steps_to_target(task, target)
        lines += _task_table(task, target, real, summaries, limit, gpu_seconds_per_step)
        lines += _significance(summaries)
        lines.append("")
    return "\n".join(lines)


def _task_table(
    task: Task, target: float, real: bool, summaries: dict[str, Summary], limit: oracle.Oracle, rate: float
) -> list[str]:
    any_seeds = next(iter(summaries.values())).seeds
    floor = f"floor {task.floor:.4f}; " if task.floor is not None else ""
    why = (
        task.target_reason
        if real
        else f"on the real trainer {task.target:.4f}, {task.target_reason}; here as far above the surrogate's best"
    )
    lines = [
        f"## {task.name} ({'real' if real else 'fast'}): target val_loss {target:.4f} ({floor}{why})",
        f"oracle: {limit.describe()}",
        f"{any_seeds} seeds each; compute = trial-steps until the best model reaches the target, median over seeds "
        f"[quartiles], a seed that never does counted at its whole spend; GPU-h at {rate:g} s per device-step",
        "",
        "| policy | reached | trial-steps to target | x random | x oracle | GPU-h to target | best val_loss at budget "
        "| diverged share | stopped share | bad sign -> stop (cycles: median, max, never) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference = summaries.get(BASELINE)
    reference_median = statistics.median(reference.censored) if reference is not None else None
    for name, summary in summaries.items():
        median = statistics.median(summary.censored)
        q1, _, q3 = quartiles(summary.censored)
        # With half the seeds or more short of the target, the median is a spend, not a cost: a bound.
        bound = ">= " if summary.reached * 2 <= summary.seeds else ""
        compute = f"{bound}{median:.0f} [{q1:.0f}, {q3:.0f}]"
        ratio = f"{bound}{median / reference_median:.2f}" if reference_median else "-"
        oracle_ratio = f"{bound}{median / limit.steps:.2f}" if limit.steps else "-"
        gpu = f"{bound}{median * rate / 3600 * _device_factor(summary):.3f}"
        best_mean = statistics.mean(summary.best)
        best_sd = statistics.pstdev(summary.best) if len(summary.best) > 1 else 0.0
        total = max(summary.waste.total, 1)
        delays = summary.delays
        delay = (
            f"{statistics.median(delays):.0f}, {max(delays)}, {summary.never_stopped}"
            if delays
            else f"-, -, {summary.never_stopped}"
        )
        lines.append(
            f"| {name} | {summary.reached}/{summary.seeds} | {compute} | {ratio} | {oracle_ratio} | {gpu} | "
            f"{best_mean:.4f} ± {best_sd:.4f} | {summary.waste.diverged / total:.1%} | "
            f"{summary.waste.stopped / total:.1%} | {delay} |"
        )
    return lines


def _device_factor(summary: Summary) -> float:
    """Device-steps per trial-step (above 1 where a policy scaled trials onto more nodes)."""
    return summary.device_steps / summary.waste.total if summary.waste.total and summary.device_steps else 1.0


def _significance(summaries: dict[str, Summary]) -> list[str]:
    """A paired test (same seeds) wherever the heuristic and another policy are close."""
    mine = summaries.get("heuristic")
    if mine is None:
        return []
    lines = []
    for name, other in summaries.items():
        if name == "heuristic" or other.seeds != mine.seeds:
            continue
        a, b = mine.censored, other.censored
        ma, mb = statistics.median(a), statistics.median(b)
        if mb and abs(ma - mb) / mb <= CLOSE:
            p = paired_p_value(a, b)
            lines.append(
                f"heuristic vs {name}: compute to target (unreached counted at its whole spend) median "
                f"{ma:.0f} vs {mb:.0f}, paired sign-flip test p = {p:.3f}"
            )
        p_best = paired_p_value(mine.best, other.best)
        if p_best < 1 and abs(statistics.mean(mine.best) - statistics.mean(other.best)) < 0.01:
            lines.append(
                f"heuristic vs {name}: best val_loss at budget {statistics.mean(mine.best):.4f} vs "
                f"{statistics.mean(other.best):.4f}, paired sign-flip test p = {p_best:.3f}"
            )
    return ["", *lines] if lines else []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("fast", "real"), default="fast")
    parser.add_argument("--tasks", default="synthetic,text")
    parser.add_argument("--policies", default=None, help="comma-separated (default: the family's list)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: 10 fast, 3 real)")
    parser.add_argument("--trials", type=int, default=12, help="budget: this many full trials' worth of trial-steps")
    parser.add_argument("--parallel", type=int, default=2, help="parallelTrials")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="fast family: processes")
    parser.add_argument("--gpu-seconds-per-step", type=float, default=0.5, help="the stated rate for GPU-hours")
    parser.add_argument("--live", action="store_true", help="claude: ask the real model (ANTHROPIC_API_KEY)")
    parser.add_argument("--replay", default=None, help="claude: a prompts.jsonl archive to answer from")
    parser.add_argument("--out", default=None, help="also write every experiment's figures as JSON here")
    parser.add_argument("--load", default=None, help="print the table of a JSON file --out wrote, running nothing")
    args = parser.parse_args(argv)
    if args.load:
        print(table(json.loads(Path(args.load).read_text()), args.gpu_seconds_per_step))
        return 0
    policies = _top_level(args.policies or ",".join(FAST_POLICIES if args.family == "fast" else REAL_POLICIES), ",")
    unknown = [p for p in policies if p not in {*BASELINES, "heuristic", "claude"} and not p.startswith("heuristic:")]
    if unknown:
        parser.error(f"--policies: unknown {unknown}; known: {sorted({*BASELINES, 'heuristic', 'claude'})}")
    if args.live and not os.environ.get("ANTHROPIC_API_KEY"):
        parser.error("--live asks the real Claude: set ANTHROPIC_API_KEY")
    tasks = args.tasks.split(",")
    seeds = range(args.seeds if args.seeds is not None else (10 if args.family == "fast" else 3))
    started = time.monotonic()
    results = run_all(
        args.family,
        tasks,
        policies,
        list(seeds),
        args.trials,
        args.parallel,
        args.workers,
        args.live,
        args.replay,
        lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(table(results, args.gpu_seconds_per_step))
    print(
        f"{len(results)} experiments in {time.monotonic() - started:.0f} s on {os.cpu_count()} cores "
        f"({args.family} family, budget {args.trials} trials' worth of trial-steps, parallelTrials {args.parallel})"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
