"""Trainer throughput and MFU: the fast path against the path with every part of it off, in one run.

Each variant runs in its own process (torchrun with --gpus > 1), on the same model, batch and data
(random tokens, so GPT-2's 50257-token vocabulary needs no tokenizer): untimed warm-up steps (for
torch.compile, the first is the compile), then timed steps between device synchronisations. It
prints, per variant, tokens/s for the whole job and per GPU, MFU (trainer_image/trainpilot_trainer/
flops.py: 6N + 12LdT FLOPs per token against the GPU's dense peak) and peak GPU memory, then the
fast path's speed-up over the baseline measured in the same run.

On one GPU (GPT-2 small, 124M):
    DS_ACCELERATOR=cuda .venv/bin/python bench/gpu_throughput.py
On eight:
    DS_ACCELERATOR=cuda .venv/bin/python bench/gpu_throughput.py --gpus 8
A CPU smoke run (what the test suite runs; no figures worth reading):
    DS_ACCELERATOR=cpu .venv/bin/python bench/gpu_throughput.py --size tiny --steps 3 --warmup 1 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {
    # GPT-2 small: 12 x 768, 12 heads, 1024 positions, GPT-2's vocabulary.
    "gpt2-small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50257},
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 97},
}
VARIANTS = ("baseline", "fast")
RESULT = "GPU_THROUGHPUT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="gpt2-small")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU (default 16; tiny: 4)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compile, allocator)")
    parser.add_argument("--gpus", type=int, default=1, help="processes (GPUs) per variant, through torchrun")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child
    parser.add_argument("--data", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.variant:
        run_variant(args)
        return
    with tempfile.TemporaryDirectory(prefix="gpu-throughput-") as data:
        write_random_tokens(Path(data), SIZES[args.size]["vocab_size"])
        results = {variant: launch(args, variant, data) for variant in VARIANTS}
    print_table(args, results)


def write_random_tokens(folder: Path, vocab_size: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    rng.integers(0, vocab_size, 2**22, dtype=np.uint16).tofile(folder / "train.bin")
    rng.integers(0, vocab_size, 2**16, dtype=np.uint16).tofile(folder / "val.bin")


def launch(args: argparse.Namespace, variant: str, data: str) -> dict:
    """One variant in its own process(es); rank 0's result line."""
    own = [a for a in sys.argv[1:]]
    script = [str(Path(__file__).resolve()), *own, "--variant", variant, "--data", data]
    if args.gpus > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"]
        command += script
    else:
        command = [sys.executable, *script]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer_image")])}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in finished.stdout.splitlines() if line.startswith(RESULT)]
    if finished.returncode != 0 or not lines:
        sys.exit(f"{variant}: exit {finished.returncode}\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(RESULT))


def run_variant(args: argparse.Namespace) -> None:
    import torch

    from trainpilot.api.trial import TrialConfig
    from trainpilot_trainer.config import (
        BASELINE_PATH,
        describe_fast_path,
        find_compiler,
        native_bf16,
        resolve_device,
        resolve_fast_path,
        resolve_precision,
    )
    from trainpilot_trainer.data import build_dataset
    from trainpilot_trainer.distributed import prepare_environment
    from trainpilot_trainer.flops import peak_flops
    from trainpilot_trainer.metrics import Metrics
    from trainpilot_trainer.trainer import Trainer

    size = SIZES[args.size]
    micro_batch = args.micro_batch or (4 if args.size == "tiny" else 16)
    config = TrialConfig(
        trial=f"bench-{args.variant}",
        hyperparameters={
            **size,
            "dataset": "tokens",
            "data_path": [args.data],
            "micro_batch": micro_batch,
            "max_steps": 10**8,
            "eval_interval": 10**8,  # never: only training steps are timed
            "eval_windows": 8,
            "device": args.device,
            "precision": args.precision,
        },
    )
    hp = config.hyperparameters
    dist_env = prepare_environment(os.environ)
    device = resolve_device(hp, torch.cuda.is_available())
    bf16 = device == "cuda" and native_bf16(torch.cuda.get_device_capability(dist_env.local_rank))
    precision = resolve_precision(hp, device, bf16_supported=bf16)
    fast, notes = resolve_fast_path(hp, device, find_compiler(os.environ))
    if args.variant == "baseline":  # the path before the fast path: every part of it off
        fast = BASELINE_PATH
    name = torch.cuda.get_device_name(dist_env.local_rank) if device == "cuda" else "cpu"
    peak = peak_flops(name, precision, fast.tf32) if device == "cuda" else None
    trainer = Trainer(
        config,
        build_dataset(hp),
        dist_env,
        device,
        precision,
        Metrics(hp.max_steps),
        log=lambda *a, **k: None,
        fast=fast,
        peak=peak,
    )

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    assert trainer.train(args.warmup) is None
    synchronize()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    assert trainer.train(args.warmup + args.steps) is None
    synchronize()
    seconds = time.perf_counter() - started
    tokens_per_second = args.steps * trainer.tokens_per_step / seconds
    per_gpu = tokens_per_second / dist_env.world_size
    if dist_env.is_main:
        result = {
            "device": name,
            "precision": precision,
            "world_size": dist_env.world_size,
            "fast_path": describe_fast_path(fast),
            "notes": notes,
            "tokens_per_second": tokens_per_second,
            "tokens_per_second_per_gpu": per_gpu,
            "mfu": None if peak is None else per_gpu * trainer.flops_per_token / peak,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "ms_per_step": 1000 * seconds / args.steps,
            "loss": trainer.train_loss,
        }
        print(RESULT + json.dumps(result), flush=True)


def print_table(args: argparse.Namespace, results: dict[str, dict]) -> None:
    first = results["baseline"]
    print(
        f"{args.size}, micro_batch {args.micro_batch or (4 if args.size == 'tiny' else 16)} per GPU, "
        f"{first['world_size']} x {first['device']}, {first['precision']}, {args.steps} timed steps"
    )
    print(f"{'variant':<10} {'tokens/s':>12} {'per GPU':>12} {'MFU':>7} {'peak GiB':>9} {'ms/step':>9}  parts")
    for variant, result in results.items():
        mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
        memory = "n/a" if result["peak_memory_gib"] is None else f"{result['peak_memory_gib']:.2f}"
        print(
            f"{variant:<10} {result['tokens_per_second']:>12,.0f} {result['tokens_per_second_per_gpu']:>12,.0f} "
            f"{mfu:>7} {memory:>9} {result['ms_per_step']:>9.1f}  {result['fast_path']}"
        )
        for note in result["notes"]:
            print(f"{'':<10} note: {note}")
    ratio = results["fast"]["tokens_per_second"] / results["baseline"]["tokens_per_second"]
    print(f"fast path / baseline: {ratio:.2f}x tokens/s")


if __name__ == "__main__":
    main()
