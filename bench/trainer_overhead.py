"""Overhead of the trainer's loop over a bare DeepSpeed loop (target: at most 2 %).

Both loops drive the SAME engine on the SAME data in one process, interleaved repeat by repeat
(the order alternates, so slow drift of a shared machine hits both equally):

- trainer: `Trainer.train()` as a trial runs it: lr schedule written into the optimizer, loss
  read back, divergence check, control file stat'ed every step, every gauge and the step-time
  histogram updated, a progress line every log_interval steps, /metrics served (and scraped
  once a second by a background thread, like a Prometheus that scrapes often); eval and
  checkpoints off.
- bare: `loss = engine(x, y); engine.backward(loss); engine.step()` on the same batches.

Shared CPUs are noisy (other processes steal whole time slices), so it times many short
interleaved blocks, compares each trainer block with the bare block next to it, and reports the
median of those paired ratios, by wall clock and by this process's CPU time (which other
processes cannot inflate). Torch runs one intra-op thread by default for the same reason.
Last, it times both loops once more with the engine replaced by a stub that does nothing: the
difference is the trainer's own bookkeeping per step, a figure that load hardly moves.

Run:  DS_ACCELERATOR=cpu .venv/bin/python bench/trainer_overhead.py [--steps 100 --repeats 21]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per block")
    parser.add_argument("--repeats", type=int, default=21, help="blocks of each loop, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed steps of each loop first")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=32)
    parser.add_argument("--n-head", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch  # after argparse: --help stays instant

    if args.threads:
        torch.set_num_threads(args.threads)

    from trainpilot.api.trial import TrialConfig
    from trainpilot_trainer.config import resolve_device, resolve_precision
    from trainpilot_trainer.control import ControlWatcher
    from trainpilot_trainer.data import build_dataset
    from trainpilot_trainer.distributed import prepare_environment
    from trainpilot_trainer.metrics import Metrics
    from trainpilot_trainer.trainer import Trainer

    workdir = Path(tempfile.mkdtemp(prefix="trainer-overhead-"))
    control_path = workdir / "control.json"
    control_path.write_text(json.dumps({"generation": 0}))
    config = TrialConfig(
        trial="bench",
        control_file=str(control_path),
        hyperparameters={
            "n_layer": args.n_layer,
            "n_head": args.n_head,
            "n_embd": args.n_embd,
            "block_size": args.block_size,
            "micro_batch": args.micro_batch,
            "vocab_size": 16,
            "synthetic_order": 1,
            "device": args.device,
            # Long enough never to end, eval never due: only the step loop is measured.
            "max_steps": 100_000_000,
            "eval_interval": 100_000_000,
            "lr": 1e-3,
            "warmup_steps": 10,
        },
    )
    hp = config.hyperparameters
    device = resolve_device(hp, torch.cuda.is_available())
    precision = resolve_precision(hp, device, bf16_supported=device == "cuda" and torch.cuda.is_bf16_supported())
    dist_env = prepare_environment(os.environ)
    dataset = build_dataset(hp)
    metrics = Metrics(hp.max_steps, dataset.loss_floor, cuda=device == "cuda")
    port = metrics.serve("127.0.0.1", 0)
    sink = open(os.devnull, "w")  # progress lines are formatted and written, just not shown
    trainer = Trainer(
        config,
        dataset,
        dist_env,
        device,
        precision,
        metrics,
        ControlWatcher(config.control_file),
        log=lambda *a, **k: print(*a, file=sink, **k),
    )
    engine = trainer.engine
    bare_position = 10**9  # its own stretch of (seed, rank, position) batches

    def bare(steps: int) -> None:
        nonlocal bare_position
        for _ in range(steps * hp.grad_accum):
            x, y = dataset.train_batch(0, bare_position)
            bare_position += 1
            loss = engine(torch.from_numpy(x).to(trainer.device), torch.from_numpy(y).to(trainer.device))
            engine.backward(loss)
            engine.step()

    def full(steps: int) -> None:
        assert trainer.train(trainer.step + steps) is None

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(loop, steps: int) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) for `steps` steps of `loop`."""
        synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        loop(steps)
        synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    stop_scraping = threading.Event()

    def scrape_every_second() -> None:
        while not stop_scraping.wait(1.0):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()

    scraper = threading.Thread(target=scrape_every_second, daemon=True)
    scraper.start()

    full(args.warmup)
    bare(args.warmup)
    trainer_times, bare_times = [], []  # (wall, cpu) per block
    for repeat in range(args.repeats):
        order = [(full, trainer_times), (bare, bare_times)]
        for loop, times in order if repeat % 2 == 0 else reversed(order):
            times.append(timed(loop, args.steps))
        print(
            f"block {repeat + 1}/{args.repeats}: trainer {args.steps / trainer_times[-1][0]:.1f} steps/s, "
            f"bare {args.steps / bare_times[-1][0]:.1f} steps/s (wall)",
            file=sys.stderr,
            flush=True,
        )
    stop_scraping.set()
    metrics.close()

    def summary(index: int) -> tuple[float, float, float]:
        trainer_median = statistics.median(t[index] for t in trainer_times)
        bare_median = statistics.median(b[index] for b in bare_times)
        paired = statistics.median(t[index] / b[index] - 1 for t, b in zip(trainer_times, bare_times, strict=True))
        return args.steps / trainer_median, args.steps / bare_median, 100 * paired

    bookkeeping = bookkeeping_seconds(trainer, dataset, torch)

    tokens = trainer.tokens_per_step
    print(
        f"device {device} {precision}, {torch.get_num_threads()} torch thread(s), model {trainer.num_parameters:,} "
        f"parameters, {tokens} tokens/step, {args.repeats} interleaved blocks of {args.steps} steps per loop"
    )
    for label, index in (("wall clock", 0), ("CPU time", 1)):
        trainer_rate, bare_rate, overhead = summary(index)
        print(
            f"{label:>10}: bare DeepSpeed {bare_rate:7.1f} steps/s {bare_rate * tokens:10,.0f} tokens/s | "
            f"trainer {trainer_rate:7.1f} steps/s {trainer_rate * tokens:10,.0f} tokens/s | "
            f"overhead {overhead:+.2f} % (median of paired blocks; target <= 2 %)"
        )
    bare_step = statistics.median(b[1] for b in bare_times) / args.steps
    print(
        f"bookkeeping: {1e6 * bookkeeping:.1f} us/step with the engine stubbed out = "
        f"{100 * bookkeeping / bare_step:.2f} % of a bare step ({1e3 * bare_step:.2f} ms CPU)"
    )
    print(f"(the trainer loop reached step {trainer.step}; /metrics was scraped once a second throughout)")


class StubEngine:
    """Just enough of a DeepSpeed engine for the loops to run: no model work at all."""

    def __init__(self, engine, torch):
        self.optimizer, self.module = engine.optimizer, engine.module
        self._loss = torch.tensor(1.0)

    def __call__(self, x, y):
        return self._loss

    def backward(self, loss):
        pass

    def step(self):
        pass

    def get_global_grad_norm(self):
        return None


def bookkeeping_seconds(trainer, dataset, torch, steps: int = 2000, repeats: int = 5) -> float:
    """Per-step time of trainer.train() minus the bare loop's, both around a stub engine."""
    real, trainer.engine = trainer.engine, StubEngine(trainer.engine, torch)
    position = 2 * 10**9

    def bare() -> None:
        nonlocal position
        for _ in range(steps):
            x, y = dataset.train_batch(0, position)
            position += 1
            loss = trainer.engine(torch.from_numpy(x), torch.from_numpy(y))
            trainer.engine.backward(loss)
            trainer.engine.step()

    differences = []
    for _ in range(repeats):
        started = time.process_time()
        trainer.train(trainer.step + steps)
        middle = time.process_time()
        bare()
        differences.append(((middle - started) - (time.process_time() - middle)) / steps)
    trainer.engine = real
    return statistics.median(differences)


if __name__ == "__main__":
    main()
