"""How far one model's validation score moves with the draw of the validation set.

The true Markov source is scored (its exact per-token loss, no training) on fresh draws of N
validation windows, as the trainer cuts them; the standard deviation over draws is the noise a
comparison of two trials carries at that eval_windows. docs/trainer.md quotes its table.

    .venv/bin/python bench/validation_noise.py [--draws 40]
"""

from __future__ import annotations

import argparse

import numpy as np

from trainpilot_trainer.data import MarkovChain

SOURCES = {  # (vocab_size, synthetic_order, synthetic_concentration, block_size)
    "quickstart": (16, 1, 0.1, 32),
    "defaults": (32, 2, 0.3, 64),
}
WINDOWS = (128, 512, 1024, 4096)


def true_loss(chain: MarkovChain, windows: np.ndarray) -> float:
    """The source's own mean loss over each window's predictions with a full context."""
    x = windows.astype(np.int64)
    state = np.zeros(len(x), dtype=np.int64)
    for position in range(chain.order):
        state = state * chain.vocab_size + x[:, position]
    total = 0.0
    for position in range(chain.order, x.shape[1]):
        total += float(-np.log(chain.transitions[state, x[:, position]]).sum())
        state = (state * chain.vocab_size + x[:, position]) % chain.n_states
    return total / (len(x) * (x.shape[1] - chain.order))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=40)
    args = parser.parse_args()
    print(f"{'source':<12} {'windows':>8} {'sd over draws (nats)':>22} {'vs 128 windows':>15}")
    for name, (vocab, order, concentration, block) in SOURCES.items():
        chain = MarkovChain.random(vocab, order, concentration)
        baseline = None
        for count in WINDOWS:
            scores = [
                true_loss(chain, chain.sample(np.random.default_rng((9, count, draw)), count, block + 1))
                for draw in range(args.draws)
            ]
            sd = float(np.std(scores))
            baseline = baseline or sd
            print(f"{name:<12} {count:>8} {sd:>22.4f} {sd / baseline:>14.2f}x")


if __name__ == "__main__":
    main()
