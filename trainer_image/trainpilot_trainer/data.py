"""Training and validation data: synthetic Markov chains, text files, or pre-tokenized bins.

Everything here is numpy only (no torch), so bad data settings fail fast, before DeepSpeed starts.

Three rules hold for every dataset:
- train and validation never share tokens (separate streams, or a held-out tail);
- validation is a FIXED list of `eval_windows` windows, identical at every evaluation and in every
  trial with the same data settings and block_size, whatever its micro_batch, seed, grad_accum or
  world size; its fingerprint (a hash of the exact tokens) says so to the operator;
- training batch number `position` of rank `rank` is a pure function of (seed, rank, position),
  so a resumed run draws exactly the batches it would have drawn had it never stopped.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainpilot.api.trial import SYNTHETIC_DEFAULT_VOCAB, Hyperparameters

from .errors import ConfigError

# Fixed, so every trial of every experiment sees the same chain, train stream and validation set:
# the loss floor and the validation losses of different trials are then directly comparable.
DATA_SEED = 1_234_567
TRAIN_STREAM = 1
VAL_STREAM = 2
# Synthetic training text, generated once at start-up: large enough that a small model cannot
# memorise it, small enough to generate in a fraction of a second.
SYNTHETIC_TRAIN_TOKENS = 2**22
SYNTHETIC_CHAIN_LENGTH = 4096


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats along the last axis; 0 log 0 counts as 0."""
    logs = np.log(probabilities, where=probabilities > 0, out=np.zeros_like(probabilities))
    return -(probabilities * logs).sum(axis=-1)


class MarkovChain:
    """An order-k chain over `vocab_size` symbols with Dirichlet-drawn transition rows.

    A state is the last k symbols, numbered in base `vocab_size` with the oldest symbol most
    significant; row `state` of `transitions` is the distribution of the next symbol.
    """

    def __init__(self, transitions: np.ndarray, order: int):
        self.vocab_size = transitions.shape[1]
        self.order = order
        self.n_states = self.vocab_size**order
        if transitions.shape != (self.n_states, self.vocab_size):
            raise ValueError(f"an order-{order} chain needs a ({self.n_states}, {self.vocab_size}) transition table")
        self.transitions = transitions
        self.stationary = self._stationary_distribution()
        # Inverse-CDF sampling for all states at once: row r's cumulative sums shifted by r form
        # one increasing array, so one searchsorted samples every sequence's next symbol.
        cumulative = np.cumsum(self.transitions, axis=1)
        cumulative[:, -1] = 1.0  # rounding must never leave a gap at the top of a row
        self._shifted_cdf = (cumulative + np.arange(self.n_states)[:, None]).ravel()

    @classmethod
    def random(cls, vocab_size: int, order: int, concentration: float, seed: int = DATA_SEED) -> MarkovChain:
        """Rows drawn from a symmetric Dirichlet: the lower the concentration, the peakier each row."""
        rng = np.random.default_rng((seed, vocab_size, order))
        return cls(rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size**order), order)

    def _step_distribution(self, state_probabilities: np.ndarray) -> np.ndarray:
        """One step of the chain on a distribution over states: (a, rest) -> (rest, next)."""
        flow = state_probabilities[:, None] * self.transitions  # (n_states, V)
        return flow.reshape(self.vocab_size, -1).sum(axis=0)  # drop the oldest symbol

    def _stationary_distribution(self, tolerance: float = 1e-13, max_iterations: int = 100_000) -> np.ndarray:
        # Power iteration on the lazy chain (half stay, half step): same stationary distribution,
        # and it converges even if the chain happens to be periodic.
        probabilities = np.full(self.n_states, 1.0 / self.n_states)
        for _ in range(max_iterations):
            updated = 0.5 * (probabilities + self._step_distribution(probabilities))
            if np.abs(updated - probabilities).sum() < tolerance:
                return updated / updated.sum()
            probabilities = updated
        raise ConfigError(
            "hyperparameters.synthetic_concentration: this chain mixes too slowly for its stationary "
            "distribution (and so its loss floor) to be computed; use a larger synthetic_concentration"
        )

    @property
    def entropy_rate(self) -> float:
        """Nats per symbol given the full past: the best loss any model can reach on this data."""
        return float(self.stationary @ entropy(self.transitions))

    def window_floor(self, block_size: int) -> float:
        """The expected best mean loss over a window of `block_size` predictions, over all windows.

        The first k-1 predictions of a window lack a full context, so they cost more than the
        entropy rate: H(X_1..X_k | X_0) more in total, from the stationary k-symbol marginals.
        """
        if block_size < self.order - 1:
            raise ValueError("block_size must be at least synthetic_order - 1")
        first_symbol = self.stationary.reshape(self.vocab_size, -1).sum(axis=1)
        warm_up = float(entropy(self.stationary)) - float(entropy(first_symbol))
        return (warm_up + (block_size - self.order + 1) * self.entropy_rate) / block_size

    def losses(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The chain's own loss, -log p(y_t | x_0..x_t), of each prediction of windows (x, y): what
        the best possible model scores on exactly these windows, knowing only each window's prefix.

        A prediction with at least k symbols of context uses the transition row of the last k; one
        with c < k uses the stationary marginals of c and c+1 consecutive symbols (their ratio)."""
        windows, length = x.shape
        vocab, order = self.vocab_size, self.order
        losses = np.empty((windows, length))
        full = np.arange(length) >= order - 1
        if full.any():
            # The state before predicting y_t: x_{t-k+1}..x_t, oldest most significant.
            states = np.zeros((windows, length), dtype=np.int64)
            for lag in range(order):
                shifted = np.zeros_like(states)
                shifted[:, lag:] = x[:, : length - lag]
                states += shifted * vocab**lag
            p = self.transitions[states[:, full], y[:, full]]
            losses[:, full] = -np.log(p)
        marginal = self.stationary.reshape((vocab,) * order)
        for t in range(min(order - 1, length)):  # context of c = t + 1 symbols
            c = t + 1
            joint = marginal.sum(axis=tuple(range(c + 1, order)))  # (c + 1) consecutive symbols
            context = joint.sum(axis=-1)
            index = tuple(x[:, j] for j in range(c))
            losses[:, t] = -np.log(joint[(*index, y[:, t])] / context[index])
        return losses

    def sample(self, rng: np.random.Generator, n_sequences: int, length: int) -> np.ndarray:
        """`n_sequences` independent stationary runs of the chain, `length` symbols each."""
        dtype = np.uint8 if self.vocab_size <= 256 else np.uint16
        out = np.empty((n_sequences, max(length, self.order)), dtype=dtype)
        state = rng.choice(self.n_states, size=n_sequences, p=self.stationary)
        for position in range(self.order):  # the start state's symbols, oldest first
            out[:, position] = (state // self.vocab_size ** (self.order - 1 - position)) % self.vocab_size
        for position in range(self.order, length):
            flat = np.searchsorted(self._shifted_cdf, state + rng.random(n_sequences), side="right")
            symbol = flat - state * self.vocab_size
            out[:, position] = symbol
            state = (state * self.vocab_size + symbol) % self.n_states
        return out[:, :length]


@dataclass(frozen=True)
class TokenStore:
    """A 1-D token array cut into equal, independent segments; windows never cross a segment."""

    tokens: np.ndarray
    segment: int

    @classmethod
    def whole(cls, tokens: np.ndarray) -> TokenStore:
        return cls(tokens, len(tokens))

    @property
    def n_segments(self) -> int:
        return len(self.tokens) // self.segment

    def windows(self, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and next-token targets for windows of `length` + 1 tokens at `starts`."""
        block = np.asarray(self.tokens[starts[:, None] + np.arange(length + 1)], dtype=np.int64)
        return block[:, :-1], block[:, 1:]


@dataclass
class Dataset:
    """Batches for one trial; shared by every rank (each draws its own training batches)."""

    name: str
    vocab_size: int
    block_size: int
    micro_batch: int
    seed: int
    train: TokenStore
    val: TokenStore
    val_starts: np.ndarray  # (eval_windows,) window starts, fixed for the whole run
    eval_batch_size: int
    # The source's own loss on exactly the validation windows, when the source is known: the best
    # any trial can score there (the entropy rate differs from it by the sampling error of the set).
    loss_floor: float | None = None
    entropy_rate: float | None = None  # the source's, in nats per token, when known
    description: str = ""
    # Token ids come from a file (tokens): each batch is checked against vocab_size, so an id out of
    # range is a clear exit 2 naming the field, not a device-side assert inside the embedding.
    check_token_ids: bool = False

    @property
    def eval_windows(self) -> int:
        return len(self.val_starts)

    @property
    def eval_batches(self) -> int:
        """Forward passes per evaluation: eval_windows in batches of eval_batch_size, the last one short."""
        return -(-self.eval_windows // self.eval_batch_size)

    @property
    def validation_tokens(self) -> int:
        """Predictions scored per evaluation."""
        return self.eval_windows * self.block_size

    @functools.cached_property
    def validation_fingerprint(self) -> int:
        """A 48-bit hash of every validation window's tokens, in order: equal for two trials exactly
        when they are scored on the same data. 48 bits fit a Prometheus float exactly."""
        digest = hashlib.sha256(f"{self.block_size}:{self.eval_windows}:".encode())
        for first in range(0, self.eval_windows, 4096):
            x, y = self.val.windows(self.val_starts[first : first + 4096], self.block_size)
            digest.update(np.ascontiguousarray(x, dtype=np.int64).tobytes())
            digest.update(np.ascontiguousarray(y[:, -1], dtype=np.int64).tobytes())
        return int.from_bytes(digest.digest()[:6], "big")

    def train_batch(self, rank: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Micro-batch number `position` of `rank`: random windows, reproducible from the numbers alone."""
        rng = np.random.default_rng((self.seed, rank, position))
        window = self.block_size + 1
        segments = rng.integers(0, self.train.n_segments, self.micro_batch)
        offsets = rng.integers(0, self.train.segment - window + 1, self.micro_batch)
        return self._checked(self.train.windows(segments * self.train.segment + offsets, self.block_size), "train.bin")

    def val_batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Validation batch `index` of eval_batches: windows index x eval_batch_size onwards."""
        first = index * self.eval_batch_size
        windows = self.val.windows(self.val_starts[first : first + self.eval_batch_size], self.block_size)
        return self._checked(windows, "val.bin")

    def _checked(self, windows: tuple[np.ndarray, np.ndarray], where: str) -> tuple[np.ndarray, np.ndarray]:
        if self.check_token_ids:
            x, y = windows
            top = int(max(x.max(), y.max()))
            if top >= self.vocab_size:
                raise ConfigError(
                    f"hyperparameters.vocab_size: {where} holds token id {top}, and ids must be below "
                    f"vocab_size {self.vocab_size}; set vocab_size to the tokenizer's (at least {top + 1})"
                )
        return windows


def build_dataset(hp: Hyperparameters) -> Dataset:
    """The dataset `hp` asks for; ConfigError (naming the field) when the data cannot serve it."""
    builders = {"synthetic": _synthetic, "text": _text, "tokens": _tokens}
    return builders[hp.dataset](hp)


def _synthetic(hp: Hyperparameters) -> Dataset:
    vocab_size = hp.vocab_size or SYNTHETIC_DEFAULT_VOCAB
    chain = MarkovChain.random(vocab_size, hp.synthetic_order, hp.synthetic_concentration)
    window = hp.block_size + 1
    # Train: long independent chains started at stationarity, so every window is stationary.
    chain_length = max(SYNTHETIC_CHAIN_LENGTH, 2 * window)
    n_chains = max(1, SYNTHETIC_TRAIN_TOKENS // chain_length)
    train = chain.sample(np.random.default_rng((DATA_SEED, TRAIN_STREAM)), n_chains, chain_length)
    # Validation: one fresh chain per window, from a different stream than training.
    count = hp.eval_windows
    val = chain.sample(np.random.default_rng((DATA_SEED, VAL_STREAM)), count, window)
    rate = chain.entropy_rate
    floor = float(chain.losses(val[:, :-1], val[:, 1:]).mean())
    return Dataset(
        name="synthetic",
        vocab_size=vocab_size,
        block_size=hp.block_size,
        micro_batch=hp.micro_batch,
        seed=hp.seed,
        train=TokenStore(train.ravel(), chain_length),
        val=TokenStore(val.ravel(), window),
        val_starts=np.arange(count) * window,
        eval_batch_size=hp.eval_batch_size,
        loss_floor=floor,
        entropy_rate=rate,
        description=(
            f"synthetic order-{hp.synthetic_order} Markov chain over {vocab_size} symbols "
            f"(concentration {hp.synthetic_concentration}), entropy rate {rate:.4f} nats, "
            f"the chain's own loss on the validation windows {floor:.4f}"
        ),
    )


def default_text_root() -> Path:
    """The Python standard library's own sources: real text that every machine has."""
    return Path(sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__))


def text_files(paths: list[str]) -> list[Path]:
    """The files to read, in a deterministic order (sorted within each folder, folders in order given).

    With no paths: every .py file under the standard library, minus installed packages (which
    differ between machines). A folder given by the user contributes every file below it except
    hidden ones and __pycache__.
    """
    if not paths:
        root = default_text_root()
        return sorted(
            path
            for path in root.rglob("*.py")
            if not {"site-packages", "dist-packages"} & set(path.relative_to(root).parts) and path.is_file()
        )
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                sorted(
                    found
                    for found in path.rglob("*")
                    if found.is_file()
                    and not any(part.startswith(".") or part == "__pycache__" for part in found.relative_to(path).parts)
                )
            )
        else:
            raise ConfigError(f"hyperparameters.data_path: no such file or folder: {name!r}")
    return files


def _text(hp: Hyperparameters) -> Dataset:
    files = text_files(hp.data_path)
    if not files:
        raise ConfigError(f"hyperparameters.data_path: no files found in {hp.data_path or [str(default_text_root())]}")
    try:
        raw = b"".join(path.read_bytes() for path in files)
    except OSError as error:
        raise ConfigError(f"hyperparameters.data_path: cannot read {error.filename!r}: {error.strerror}") from None
    if hp.text_level == "byte":
        tokens, needed = np.frombuffer(raw, dtype=np.uint8), 256
    else:
        # Characters numbered by code point order; the alphabet is taken from the whole corpus
        # (validation included) so every validation character has a token.
        codepoints = np.frombuffer(raw.decode("utf-8", errors="replace").encode("utf-32-le"), dtype=np.uint32)
        alphabet = np.flatnonzero(np.bincount(codepoints)) if len(codepoints) else np.zeros(0, np.int64)
        lookup = np.zeros(int(alphabet.max()) + 1 if len(alphabet) else 1, dtype=np.int32)
        lookup[alphabet] = np.arange(len(alphabet))
        needed = len(alphabet)
        tokens = lookup[codepoints].astype(np.uint16 if needed <= 65536 else np.int32)
    vocab_size = hp.vocab_size or needed
    if vocab_size < needed:
        raise ConfigError(
            f"hyperparameters.vocab_size: {hp.text_level}-level text needs at least {needed} tokens "
            f"(got {hp.vocab_size}); leave vocab_size unset to derive it"
        )
    # Validation is the contiguous tail of the corpus (files concatenated in sorted order).
    n_val = int(len(tokens) * hp.val_fraction)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    _check_long_enough("text corpus", len(train), len(val), hp.block_size)
    return _dataset_from_arrays(
        hp,
        "text",
        vocab_size,
        train,
        val,
        f"{len(files)} text files, {len(tokens):,} {hp.text_level} tokens "
        f"(vocab {vocab_size}), last {hp.val_fraction:.0%} held out for validation",
    )


def _tokens(hp: Hyperparameters) -> Dataset:
    if len(hp.data_path) != 1:
        raise ConfigError(
            f"hyperparameters.data_path: the tokens dataset takes exactly one folder (got {len(hp.data_path)})"
        )
    folder = Path(hp.data_path[0])
    arrays = {}
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        if not path.is_file():
            raise ConfigError(
                f"hyperparameters.data_path: {str(path)!r} not found (tokens needs train.bin and val.bin)"
            )
        # memmap: the corpus may be far larger than memory; windows are read on demand.
        arrays[split] = np.memmap(path, dtype=np.uint16, mode="r") if path.stat().st_size else np.zeros(0, np.uint16)
    _check_long_enough(str(folder), len(arrays["train"]), len(arrays["val"]), hp.block_size)
    assert hp.vocab_size is not None  # the config model requires it for tokens
    dataset = _dataset_from_arrays(
        hp,
        "tokens",
        hp.vocab_size,
        arrays["train"],
        arrays["val"],
        f"tokens from {folder}: {len(arrays['train']):,} train, {len(arrays['val']):,} val (uint16)",
    )
    dataset.check_token_ids = True
    for index in range(dataset.eval_batches):  # the whole validation set now, training batches as drawn
        dataset.val_batch(index)
    return dataset


def _check_long_enough(what: str, n_train: int, n_val: int, block_size: int) -> None:
    if min(n_train, n_val) < block_size + 1:
        raise ConfigError(
            f"hyperparameters.block_size: {what} has {n_train} train and {n_val} validation tokens; "
            f"each split needs at least block_size + 1 = {block_size + 1}"
        )


def _dataset_from_arrays(
    hp: Hyperparameters, name: str, vocab_size: int, train: np.ndarray, val: np.ndarray, description: str
) -> Dataset:
    # Fixed validation windows spread evenly over the held-out tokens (overlapping if it is short).
    count = hp.eval_windows
    starts = np.linspace(0, len(val) - hp.block_size - 1, count).round().astype(np.int64)
    return Dataset(
        name=name,
        vocab_size=vocab_size,
        block_size=hp.block_size,
        micro_batch=hp.micro_batch,
        seed=hp.seed,
        train=TokenStore.whole(train),
        val=TokenStore.whole(val),
        val_starts=starts,
        eval_batch_size=hp.eval_batch_size,
        description=description,
    )
