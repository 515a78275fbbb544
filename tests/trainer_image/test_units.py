"""The trainer's pure parts, without DeepSpeed: data, loss floor, schedule, config mapping,
control file, metrics exposition, result line. Milliseconds each."""

from __future__ import annotations

import itertools
import json
import math
import os
import urllib.request
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trainpilot.api.trial import ControlFile, Hyperparameters, TrialConfig
from trainpilot_trainer.config import (
    COMPLETE_MARKER,
    check_resume,
    check_resume_fits,
    completion_record,
    control_file_path,
    deepspeed_config,
    metrics_endpoint,
    pin_checkpoint,
    remove_tag,
    resolve_device,
    resolve_precision,
    tags_to_remove,
)
from trainpilot_trainer.control import ControlWatcher
from trainpilot_trainer.data import MarkovChain, build_dataset, default_text_root, entropy, text_files
from trainpilot_trainer.errors import ConfigError
from trainpilot_trainer.exitcodes import EXIT_DIVERGED
from trainpilot_trainer.metrics import Metrics
from trainpilot_trainer.outcome import LossWatch, RunResult, is_nonfinite, loss_ceiling
from trainpilot_trainer.schedule import Schedule
from trainpilot_trainer.termination import merge_termination, termination_fields, write_termination_message


def binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


# ------------------------------------------------------------------ the synthetic chain and its floor


def test_entropy_rate_of_a_two_state_chain_matches_the_hand_computation():
    # P(next | current): from 0 stay with 0.9, from 1 go to 0 with 0.4.
    chain = MarkovChain(np.array([[0.9, 0.1], [0.4, 0.6]]), order=1)
    # Stationary: pi0 * 0.1 = pi1 * 0.4  ->  pi = (0.8, 0.2).
    assert chain.stationary == pytest.approx([0.8, 0.2], abs=1e-12)
    expected = 0.8 * binary_entropy(0.1) + 0.2 * binary_entropy(0.4)
    assert chain.entropy_rate == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.394669, abs=1e-6)
    # Order 1: every prediction in a window has its full context.
    assert chain.window_floor(32) == pytest.approx(expected, abs=1e-12)


def test_order_two_floor_and_window_floor_by_hand():
    # Next symbol copies the one two back, flipped with probability 0.1: every row has entropy
    # H(0.1), and by symmetry the four pair states are equally likely.
    flip = 0.1
    rows = []
    for state in range(4):  # state = 2 * older + newer
        older = state // 2
        rows.append([1 - flip, flip] if older == 0 else [flip, 1 - flip])
    chain = MarkovChain(np.array(rows), order=2)
    assert chain.stationary == pytest.approx([0.25] * 4, abs=1e-12)
    assert chain.entropy_rate == pytest.approx(binary_entropy(flip), abs=1e-12)
    # The first prediction of a window sees one symbol: it costs H(X1|X0) = ln 2 (the pair is
    # uniform), the other T-1 cost the entropy rate.
    block = 8
    assert chain.window_floor(block) == pytest.approx((math.log(2) + (block - 1) * binary_entropy(flip)) / block)


def _brute_force_losses(chain: MarkovChain, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """-log p(y_t | x_0..x_t) from the probability of whole sequences, each prefix's probability summed
    over every way to complete it to k symbols: no conditional formula, only the chain's definition."""
    k, vocab = chain.order, chain.vocab_size

    def probability(sequence: tuple[int, ...]) -> float:
        if len(sequence) < k:
            return sum(
                probability(sequence + rest) for rest in itertools.product(range(vocab), repeat=k - len(sequence))
            )
        state = 0
        for symbol in sequence[:k]:
            state = state * vocab + symbol
        p = chain.stationary[state]
        for symbol in sequence[k:]:
            p *= chain.transitions[state, symbol]
            state = (state * vocab + symbol) % chain.n_states
        return float(p)

    losses = np.empty(x.shape)
    for window in range(x.shape[0]):
        for t in range(x.shape[1]):
            prefix = tuple(int(v) for v in x[window, : t + 1])
            losses[window, t] = -math.log(probability((*prefix, int(y[window, t]))) / probability(prefix))
    return losses


@pytest.mark.parametrize("order", [1, 2, 3])
def test_the_chains_own_loss_on_given_windows_matches_a_brute_force_computation(order):
    chain = MarkovChain.random(vocab_size=3, order=order, concentration=0.5)
    windows = chain.sample(np.random.default_rng(order), 20, 7).astype(np.int64)
    x, y = windows[:, :-1], windows[:, 1:]
    assert chain.losses(x, y) == pytest.approx(_brute_force_losses(chain, x, y), abs=1e-10)


def test_the_exported_floor_is_the_chains_own_loss_on_the_validation_windows():
    hp = Hyperparameters(vocab_size=16, synthetic_order=1, synthetic_concentration=0.1, block_size=32, eval_windows=128)
    data = build_dataset(hp)
    chain = MarkovChain.random(16, 1, 0.1)
    x, y = data.val.windows(data.val_starts, data.block_size)
    assert data.loss_floor == pytest.approx(float(chain.losses(x, y).mean()), abs=1e-12)
    assert data.entropy_rate == pytest.approx(chain.entropy_rate, abs=1e-12)
    # The quickstart's set: its sampling error puts the exact floor well away from the entropy rate.
    assert abs(data.loss_floor - data.entropy_rate) > 0.005


def test_sampled_stream_has_the_computed_entropy_rate():
    chain = MarkovChain.random(vocab_size=8, order=2, concentration=0.3)
    stream = chain.sample(np.random.default_rng(0), 64, 4096).astype(np.int64)
    context = stream[:, :-2] * 8 + stream[:, 1:-1]
    counts = np.bincount((context * 8 + stream[:, 2:]).ravel(), minlength=8**3).reshape(64, 8).astype(float)
    conditional = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    empirical = float((counts.sum(axis=1) * entropy(conditional)).sum() / counts.sum())
    assert empirical == pytest.approx(chain.entropy_rate, abs=0.01)
    # Started at stationarity, the pair frequencies match the stationary distribution.
    frequencies = np.bincount(context.ravel(), minlength=64) / context.size
    assert np.abs(frequencies - chain.stationary).sum() < 0.02


def test_synthetic_dataset_is_fixed_and_its_splits_differ():
    hp = Hyperparameters(
        vocab_size=16, synthetic_order=1, block_size=16, micro_batch=4, eval_windows=12, eval_batch_size=5
    )
    first, second = build_dataset(hp), build_dataset(hp)
    assert first.loss_floor == second.loss_floor
    assert first.entropy_rate == pytest.approx(MarkovChain.random(16, 1, 0.3).entropy_rate)
    for index in range(3):  # the same validation batches every time
        assert np.array_equal(first.val_batch(index)[0], second.val_batch(index)[0])
    x, y = first.train_batch(rank=0, position=7)
    assert x.shape == y.shape == (4, 16) and np.array_equal(x[:, 1:], y[:, :-1])
    assert np.array_equal(x, second.train_batch(0, 7)[0])  # a pure function of (seed, rank, position)
    assert not np.array_equal(x, first.train_batch(1, 7)[0])  # ranks draw different batches
    assert not np.array_equal(first.val.tokens[:1000], first.train.tokens[:1000])  # separate streams


def test_a_different_seed_changes_the_training_order_but_not_the_data():
    base = build_dataset(Hyperparameters(synthetic_order=1, block_size=16, seed=0))
    other = build_dataset(Hyperparameters(synthetic_order=1, block_size=16, seed=1))
    assert base.loss_floor == other.loss_floor
    assert np.array_equal(base.val_batch(0)[0], other.val_batch(0)[0])
    assert not np.array_equal(base.train_batch(0, 0)[0], other.train_batch(0, 0)[0])


# ------------------------------------------------------------------ text and tokens


def test_text_split_is_the_contiguous_tail(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"0123456789" * 30)
    (tmp_path / "a.txt").write_bytes(b"abcdefghij" * 30)
    (tmp_path / ".hidden").write_bytes(b"never read")
    hp = Hyperparameters(
        dataset="text", data_path=[str(tmp_path)], block_size=8, micro_batch=2, eval_windows=4, val_fraction=0.2
    )
    data = build_dataset(hp)
    corpus = b"abcdefghij" * 30 + b"0123456789" * 30  # sorted file order
    assert data.vocab_size == 256 and data.loss_floor is None
    assert bytes(data.train.tokens) == corpus[:480] and bytes(data.val.tokens) == corpus[480:]
    for index in range(2):
        x, y = data.val_batch(index)
        assert all(bytes(row.astype(np.uint8)) in corpus[480:] for row in x)


def test_char_level_text_derives_its_vocabulary(tmp_path):
    (tmp_path / "poem.txt").write_text("héllo wörld " * 20, encoding="utf-8")
    hp = Hyperparameters(dataset="text", text_level="char", data_path=[str(tmp_path / "poem.txt")], block_size=8)
    data = build_dataset(hp)
    assert data.vocab_size == len(set("héllo wörld "))
    assert int(data.train.tokens.max()) == data.vocab_size - 1
    with pytest.raises(ConfigError, match="hyperparameters.vocab_size"):
        build_dataset(hp.model_copy(update={"vocab_size": 3}))


def test_default_text_is_the_standard_library():
    files = text_files([])
    names = {path.name for path in files}
    assert "os.py" in names and "argparse.py" in names
    root = default_text_root()
    assert all("site-packages" not in path.relative_to(root).parts for path in files)
    assert files == sorted(files)


def test_text_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="hyperparameters.data_path: no such file"):
        build_dataset(Hyperparameters(dataset="text", data_path=[str(tmp_path / "missing")]))
    (tmp_path / "tiny.txt").write_text("short")
    with pytest.raises(ConfigError, match="hyperparameters.block_size"):
        build_dataset(Hyperparameters(dataset="text", data_path=[str(tmp_path / "tiny.txt")], block_size=64))


def test_tokens_dataset_reads_nanogpt_bins(tmp_path):
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    (np.arange(200, dtype=np.uint16) + 5000).tofile(tmp_path / "val.bin")
    hp = Hyperparameters(dataset="tokens", data_path=[str(tmp_path)], vocab_size=6000, block_size=16, micro_batch=4)
    data = build_dataset(hp)
    x, y = data.train_batch(0, 0)
    assert np.array_equal(y, x + 1) and x.max() < 1000  # windows of the train file only
    vx, _ = data.val_batch(0)
    assert vx.min() >= 5000
    (tmp_path / "val.bin").unlink()
    with pytest.raises(ConfigError, match="hyperparameters.data_path: .*val.bin"):
        build_dataset(hp)


def test_token_ids_at_or_above_vocab_size_are_refused_naming_the_field(tmp_path):
    (np.arange(1000, dtype=np.uint16) % 300).tofile(tmp_path / "train.bin")  # ids up to 299
    (np.arange(200, dtype=np.uint16) % 100).tofile(tmp_path / "val.bin")  # ids up to 99
    hp = Hyperparameters(dataset="tokens", data_path=[str(tmp_path)], vocab_size=100, block_size=16, micro_batch=4)
    data = build_dataset(hp)  # the validation set is whole and in range
    message = r"hyperparameters.vocab_size: train.bin holds token id \d+, and ids must be below vocab_size 100"
    with pytest.raises(ConfigError, match=message):
        for position in range(50):  # some batch reaches past 99
            data.train_batch(0, position)
    bad = hp.model_copy(update={"vocab_size": 50})
    with pytest.raises(ConfigError, match="val.bin holds token id 99.*at least 100"):
        build_dataset(bad)  # the validation set is checked up front


# ------------------------------------------------------------------ schedule


def test_schedule_warmup_then_cosine_to_the_floor():
    schedule = Schedule(peak=1e-2, floor=1e-3, warmup_steps=10, max_steps=110)
    assert schedule.lr(0) == pytest.approx(1e-3)  # 1/10 of the way up: the first step already moves
    assert schedule.lr(9) == pytest.approx(1e-2)
    assert schedule.lr(10) == pytest.approx(1e-2)
    assert schedule.lr(60) == pytest.approx(1e-3 + 0.5 * 9e-3)  # half way down the cosine
    assert schedule.lr(110) == pytest.approx(1e-3)
    decay = [schedule.lr(step) for step in range(10, 111)]
    assert all(a >= b for a, b in pairwise(decay))
    assert Schedule(peak=1.0, floor=0.1, warmup_steps=0, max_steps=10).lr(0) == 1.0


def test_new_peak_rescales_the_whole_curve():
    schedule = Schedule.from_hyperparameters(Hyperparameters(lr=1e-2, min_lr=2e-3, warmup_steps=5, max_steps=50))
    rescaled = schedule.with_peak(4e-2)
    for step in (0, 3, 5, 20, 49, 50):
        assert rescaled.lr(step) == pytest.approx(4 * schedule.lr(step))
    assert rescaled.floor == pytest.approx(8e-3)


# ------------------------------------------------------------------ config mapping


def test_deepspeed_config_from_hyperparameters():
    hp = Hyperparameters(
        lr=3e-3, beta1=0.8, beta2=0.99, weight_decay=0.1, grad_clip=0.5, micro_batch=4, grad_accum=3, zero_stage=2
    )
    config = deepspeed_config(hp, "fp32")
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"] == {"stage": 2}
    assert config["optimizer"]["type"] == "AdamW"
    params = config["optimizer"]["params"]
    assert params["torch_adam"] is True
    assert params["lr"] == 3e-3 and params["betas"] == [0.8, 0.99] and params["weight_decay"] == 0.1
    assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert "scheduler" not in config  # the trainer owns the schedule
    assert deepspeed_config(hp, "bf16")["bf16"]["enabled"]
    assert deepspeed_config(hp, "fp16")["fp16"]["enabled"]


@pytest.mark.parametrize(
    ("device", "precision", "cuda", "expected"),
    [
        ("auto", "auto", False, ("cpu", "fp32")),
        ("auto", "auto", True, ("cuda", "bf16")),
        ("cpu", "bf16", True, ("cpu", "bf16")),
        ("auto", "fp16", True, ("cuda", "fp16")),
        ("cuda", "fp32", True, ("cuda", "fp32")),
    ],
)
def test_device_and_precision_resolution(device, precision, cuda, expected):
    hp = Hyperparameters(device=device, precision=precision)
    resolved = resolve_device(hp, cuda)
    assert (resolved, resolve_precision(hp, resolved)) == expected


def test_impossible_device_or_precision_names_the_field():
    with pytest.raises(ConfigError, match="hyperparameters.precision: fp16 is GPU-only"):
        resolve_precision(Hyperparameters(precision="fp16"), "cpu")
    with pytest.raises(ConfigError, match="hyperparameters.device"):
        resolve_device(Hyperparameters(device="cuda"), cuda_available=False)
    assert resolve_precision(Hyperparameters(), "cuda", bf16_supported=False) == "fp16"


def test_metrics_endpoint_and_control_path_from_the_environment():
    assert metrics_endpoint({}) == metrics_endpoint({"TRAINPILOT_METRICS_PORT": "9400"})
    assert metrics_endpoint({"TRAINPILOT_METRICS_PORT": "0", "TRAINPILOT_METRICS_ADDR": "127.0.0.1"}).port == 0
    with pytest.raises(ConfigError, match="TRAINPILOT_METRICS_PORT"):
        metrics_endpoint({"TRAINPILOT_METRICS_PORT": "http"})
    config = TrialConfig()
    assert control_file_path(config, {"TRAINPILOT_CONTROL_FILE": "/env"}) == "/env"
    assert (
        control_file_path(config.model_copy(update={"control_file": "/own"}), {"TRAINPILOT_CONTROL_FILE": "/env"})
        == "/own"
    )
    assert control_file_path(config, {}) is None


def _fake_checkpoint(
    root,
    zero_ranks=0,
    zero3=False,
    tag="step40",
    stage=None,
    precision="fp32",
    prefix="",
    complete=True,
    latest=True,
    universal=False,
):
    """The file names DeepSpeed writes for each layout (contents do not matter here), with the
    trainer's completion record unless `complete` is false (a save cut short). Without `universal`,
    as the trainer saved before it added the universal-checkpoint information."""
    folder = root / tag
    folder.mkdir(parents=True)
    if not zero3:
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"")
    for rank in range(zero_ranks):
        (folder / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
        if zero3:
            (folder / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"")
    if stage is None:
        stage = 3 if zero3 else (2 if zero_ranks else 0)
    if complete:
        record = completion_record(tag, 40, max(zero_ranks, 1), stage, precision, "0.19.8")
        if not universal:
            del record["universal"]
        (folder / COMPLETE_MARKER).write_text(json.dumps(record))
    if latest:
        (root / "latest").write_text(tag)
    return str(root)


def test_resume_world_size_rules(tmp_path):
    zero0 = _fake_checkpoint(tmp_path / "zero0")
    assert check_resume(zero0, None, zero_stage=0, world_size=3).tag == "step40"  # ZeRO-0: any world size
    zero2 = _fake_checkpoint(tmp_path / "zero2", zero_ranks=2)
    assert check_resume(zero2, None, zero_stage=2, world_size=2).tag == "step40"
    assert check_resume(zero2, None, zero_stage=1, world_size=2).tag == "step40"  # stage 1 and 2 share a layout
    with pytest.raises(ConfigError, match="resume_from: .*saved by 2 ranks with ZeRO-1/2.*same world size"):
        check_resume(zero2, None, zero_stage=2, world_size=1)  # saved without the universal information
    universal = _fake_checkpoint(tmp_path / "universal", zero_ranks=2, universal=True)
    assert not check_resume(universal, None, zero_stage=1, world_size=2).universal  # the same world: as saved
    for world_size in (1, 4):  # another: through its universal checkpoint
        assert check_resume(universal, None, zero_stage=1, world_size=world_size).universal
    universal3 = _fake_checkpoint(tmp_path / "universal3", zero_ranks=2, zero3=True, universal=True)
    with pytest.raises(ConfigError, match="saved by 2 ranks with ZeRO-3"):
        check_resume(universal3, None, zero_stage=3, world_size=1)  # ZeRO-3 is not converted
    with pytest.raises(ConfigError, match="resume_from: .*saved with ZeRO-1/2; this run has zero_stage 0"):
        check_resume(zero2, None, zero_stage=0, world_size=2)
    zero3 = _fake_checkpoint(tmp_path / "zero3", zero_ranks=2, zero3=True)
    assert check_resume(zero3, None, zero_stage=3, world_size=2).tag == "step40"
    with pytest.raises(ConfigError, match="resume_from: .*saved with ZeRO-3"):
        check_resume(zero3, None, zero_stage=2, world_size=2)
    with pytest.raises(ConfigError, match="resume_from: no checkpoint"):
        check_resume(str(tmp_path / "empty"), None, zero_stage=0, world_size=1)


def test_bf16_zero0_checkpoints_of_deepspeed_before_0_17_6_are_split_per_rank(tmp_path):
    """DeepSpeed 0.15-0.17.5 save bf16 at ZeRO-0 with BF16_Optimizer: one
    bf16_zero_pp_rank_<r>_mp_rank_00_optim_states.pt per rank (seen with 0.17.5; 0.19.8 writes
    mp_rank_00_model_states.pt alone). Such a checkpoint is ZeRO-0, resumable at zero_stage 0 at
    the same world size, on a DeepSpeed that splits it too, and at bf16 only."""
    split = _fake_checkpoint(tmp_path / "split", zero_ranks=2, stage=0, precision="bf16", prefix="bf16_")
    point = check_resume(split, None, zero_stage=0, world_size=2)
    assert point.layout == "zero0-split"
    check_resume_fits(point, "bf16", "0.17.5")
    with pytest.raises(ConfigError, match="saved by 2 ranks with ZeRO-0 bf16 .*same world size"):
        check_resume(split, None, zero_stage=0, world_size=1)
    with pytest.raises(ConfigError, match="which DeepSpeed 0.19.8 cannot load; resume it on a DeepSpeed before 0.17.6"):
        check_resume_fits(point, "bf16", "0.19.8")
    with pytest.raises(ConfigError, match="^hyperparameters.precision: .*saved with precision bf16; this run has fp32"):
        check_resume_fits(point, "fp32", "0.17.5")
    # bf16 at ZeRO-1/2 uses the same file names: the completion record's stage tells them apart.
    zero2 = _fake_checkpoint(tmp_path / "bf16-zero2", zero_ranks=2, stage=2, precision="bf16", prefix="bf16_")
    assert check_resume(zero2, None, zero_stage=2, world_size=2).layout == "zero1-2"
    # A whole bf16 ZeRO-0 checkpoint (DeepSpeed 0.17.6 on) loads at any world size, not on older ones.
    whole = check_resume(_fake_checkpoint(tmp_path / "whole", precision="bf16"), None, zero_stage=0, world_size=4)
    check_resume_fits(whole, "bf16", "0.19.8 ")
    with pytest.raises(ConfigError, match="resume it on a DeepSpeed from 0.17.6"):
        check_resume_fits(whole, "bf16", "0.17.5")


def test_an_explicit_resume_tag_wins_over_latest_and_must_exist(tmp_path):
    root = tmp_path / "ckpt"
    _fake_checkpoint(root, tag="step20", latest=False)
    _fake_checkpoint(root, tag="step40")  # `latest` names step40
    assert check_resume(str(root), "step20", zero_stage=0, world_size=1).tag == "step20"
    assert check_resume(str(root), None, zero_stage=0, world_size=1).tag == "step40"
    with pytest.raises(ConfigError, match="^resume_tag: no checkpoint 'step60' in"):
        check_resume(str(root), "step60", zero_stage=0, world_size=1)


def test_a_tag_whose_save_never_completed_is_refused(tmp_path):
    root = tmp_path / "ckpt"
    _fake_checkpoint(root, tag="step40", zero_ranks=2, complete=False)
    message = f"has no {COMPLETE_MARKER}: its save did not finish on every rank"
    with pytest.raises(ConfigError, match=f"^resume_tag: .*step40 {message}"):
        check_resume(str(root), "step40", zero_stage=2, world_size=2)
    with pytest.raises(ConfigError, match=f"^resume_from: .*step40 {message}"):  # named by `latest`
        check_resume(str(root), None, zero_stage=2, world_size=2)
    (root / "step40" / COMPLETE_MARKER).write_text("{half")
    with pytest.raises(ConfigError, match="cannot be read"):
        check_resume(str(root), "step40", zero_stage=2, world_size=2)


def test_trial_config_resume_tag_and_evaluation_steps():
    config = TrialConfig(resume_from="/ckpt/t1", resume_tag="step120", eval_at_steps=[150, 75, 75])
    assert config.eval_at_steps == [75, 150]
    with pytest.raises(ValueError, match="resume_tag: names a tag in resume_from, which is not set"):
        TrialConfig(resume_tag="step120")
    with pytest.raises(ValueError, match="resume_tag"):
        TrialConfig(resume_from="/ckpt", resume_tag="../elsewhere")
    with pytest.raises(ValueError, match=r"eval_at_steps: \[400\] beyond hyperparameters.max_steps \(300\)"):
        TrialConfig(eval_at_steps=[100, 400])


# ------------------------------------------------------------------ control file


def _write(path, payload):
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    os.replace(temporary, path)


def test_control_watcher_returns_each_new_generation_once(tmp_path, capsys):
    path = tmp_path / "control.json"
    watcher = ControlWatcher(str(path))
    assert watcher.poll() is None  # no file yet
    _write(path, {"generation": 0})
    assert watcher.poll() is None  # generation 0 is the initial, empty state
    _write(path, {"generation": 1, "lr": 0.02})
    assert watcher.poll() == ControlFile(generation=1, lr=0.02)
    assert watcher.poll() is None  # unchanged file: one stat, no read
    _write(path, {"generation": 1, "lr": 0.5})
    assert watcher.poll() is None  # same generation again: already applied
    _write(path, "{not json")
    assert watcher.poll() is None
    _write(path, {"generation": 2, "lr": -1})
    assert watcher.poll() is None
    assert capsys.readouterr().err.count("ignoring invalid control file") == 2
    _write(path, {"generation": 3, "weight_decay": 0.05})
    assert watcher.poll() == ControlFile(generation=3, weight_decay=0.05)


def test_control_watcher_sees_a_configmap_style_symlink_swap(tmp_path):
    # Kubernetes mounts ConfigMap keys as key -> ..data/key, and swaps the ..data symlink.
    for version, generation in (("v1", 1), ("v2", 2)):
        (tmp_path / version).mkdir()
        (tmp_path / version / "control.json").write_text(
            json.dumps({"generation": generation, "lr": 0.01 * generation})
        )
    os.symlink("v1", tmp_path / "..data")
    os.symlink("..data/control.json", tmp_path / "control.json")
    watcher = ControlWatcher(str(tmp_path / "control.json"))
    assert watcher.poll().generation == 1
    os.symlink("v2", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")  # same size, maybe same mtime: new inode
    assert watcher.poll() == ControlFile(generation=2, lr=0.02)


# ------------------------------------------------------------------ metrics and the result line


def test_exporter_serves_the_contract_names():
    metrics = Metrics(max_steps=300, loss_floor=None)
    port = metrics.serve("127.0.0.1", 0)
    try:
        metrics.step.set(12)
        metrics.nonfinite_loss.inc()
        metrics.step_seconds.observe(0.004)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        metrics.close()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["trainpilot_step"] == 12 and samples["trainpilot_max_steps"] == 300
    assert samples["trainpilot_nonfinite_loss_total"] == 1
    assert samples["trainpilot_checkpoint_step"] == -1 and samples["trainpilot_control_generation"] == 0
    assert math.isnan(samples["trainpilot_val_loss"]) and samples["trainpilot_eval_step"] == -1
    assert samples["trainpilot_step_seconds_count"] == 1
    assert "trainpilot_loss_floor" not in samples  # unknown floor: absent, not a made-up value
    assert "trainpilot_gpu_memory_allocated_bytes" not in samples
    assert not {"trainpilot_mfu", "trainpilot_tokens_per_second_per_gpu", "trainpilot_entropy_rate"} & set(samples)
    assert not [name for name in samples if not name.startswith("trainpilot_")]


def test_gpu_metrics_and_mfu_are_exported_where_they_mean_something():
    metrics = Metrics(max_steps=300, loss_floor=1.24, cuda=True, entropy_rate=1.26, mfu=True)
    exposed = {metric.name for metric in metrics.registry.collect() if metric.name.startswith("trainpilot_")}
    gpu = {
        "trainpilot_gpu_memory_allocated_bytes",
        "trainpilot_gpu_memory_peak_bytes",
        "trainpilot_gpu_memory_reserved_bytes",
        "trainpilot_tokens_per_second_per_gpu",
        "trainpilot_mfu",
    }
    assert gpu | {"trainpilot_loss_floor", "trainpilot_entropy_rate"} <= exposed
    # A GPU whose peak is unknown: its throughput and memory, but no MFU.
    unknown_peak = Metrics(max_steps=300, cuda=True)
    assert "trainpilot_mfu" not in {metric.name for metric in unknown_peak.registry.collect()}


def test_divergence_ceiling():
    ceiling = loss_ceiling(16)
    assert ceiling == pytest.approx(10 * math.log(16))
    assert is_nonfinite(math.nan, ceiling) and is_nonfinite(math.inf, ceiling)
    assert is_nonfinite(ceiling + 1, ceiling) and not is_nonfinite(math.log(16) * 2, ceiling)


def test_result_line_is_strict_json():
    result = RunResult(
        exit_code=EXIT_DIVERGED,
        step=7,
        max_steps=300,
        train_loss=math.nan,
        val_loss=math.nan,
        eval_step=-1,
        loss_floor=1.25,
        checkpoint_step=-1,
        checkpoint_tag=None,
        first_bad_step=7,
        evaluations={5: 2.5},
        learning_rate=0.1,
        weight_decay=0.0,
        grad_norm=math.inf,
        tokens_per_second=1e5,
        nonfinite_loss_total=1,
        loss_spikes_total=0,
        control_generation=0,
        tokens=1792,
        seconds=0.5,
    )
    fields = json.loads(json.dumps(result.as_dict(), allow_nan=False))
    assert fields["exit_reason"] == "diverged" and fields["train_loss"] is None and fields["grad_norm"] is None
    assert fields["step"] == 7 and fields["loss_floor"] == 1.25
    assert fields["first_bad_step"] == 7 and fields["eval_at"] == {"5": 2.5} and fields["checkpoint_tag"] is None


def test_loss_watch_spike_rule_by_hand():
    """S = EMA of the loss (weight w), B = lowest loss; a spike is S > factor * B; the first bad
    step stays."""
    watch = LossWatch(ceiling=100.0, spike_factor=2.0, smoothing=0.5)
    # S: 4 -> 3 (B 2) -> 2 (B 1) -> 3.5 (B 1, 3.5 > 2: spike)
    assert watch.observe(1, 4.0) is None and watch.observe(2, 2.0) is None
    assert watch.observe(3, 1.0) is None and watch.smoothed == pytest.approx(2.0) and watch.best == 1.0
    assert watch.safe_to_save
    bad = watch.observe(4, 5.0)
    assert bad.kind == "spike" and "smoothed loss 3.5 is 3.50x the best 1 " in bad.description
    assert watch.first_bad_step == 4 and not watch.safe_to_save
    assert watch.observe(5, 1.0).kind == "spike"  # S 2.25: still above 2 x 1
    assert watch.observe(6, 1.0) is None and watch.smoothed == pytest.approx(1.625)
    assert watch.first_bad_step == 4 and not watch.safe_to_save  # recovering does not make it safe again
    # Without a spike factor only non-finite losses are bad; they never enter S or B.
    plain = LossWatch(ceiling=10.0)
    assert plain.observe(1, 1.0) is None and plain.observe(2, 9.0) is None
    assert plain.observe(3, math.nan).kind == "non-finite" and plain.observe(4, 11.0).kind == "non-finite"
    assert plain.first_bad_step == 3 and plain.best == 1.0 and plain.smoothed == pytest.approx(5.0)


def test_termination_message_holds_the_exit_and_the_final_gauges(tmp_path):
    from trainpilot.runtime.kubernetes.termination import final_metrics, trainer_exit

    path = tmp_path / "termination-log"
    summary = {
        "experiment": "e",
        "exit_code": 3,
        "exit_reason": "diverged",
        "step": 300,
        "val_loss": 1.26,
        "train_loss": None,
        "nonfinite_loss_total": 1,
        "checkpoint_step": 200,
        "checkpoint_tag": "step200",
        "eval_at": {"75": 1.5},
    }
    write_termination_message(summary, str(path), rank=0)
    written = json.loads(path.read_text())
    assert written["exit_reason"] == "diverged" and written["exit_code"] == 3 and written["rank"] == 0
    assert written["checkpoint_tag"] == "step200"
    metrics = final_metrics(path.read_text())
    assert metrics.values == {
        "trainpilot_step": 300.0,
        "trainpilot_val_loss": 1.26,
        "trainpilot_nonfinite_loss_total": 1.0,
        "trainpilot_checkpoint_step": 200.0,
    }
    assert trainer_exit(path.read_text()).reason == "diverged"
    write_termination_message(summary, str(tmp_path / "missing-dir" / "log"))  # logged, not raised
    assert final_metrics("not json") is None and final_metrics("[1, 2]") is None


def test_ranks_sharing_a_termination_message_keep_the_most_telling_reason(tmp_path):
    """Under torchrun all local ranks write the pod's one file: the reason that says most wins, a
    tie keeps the first (the rank that failed first), the gauges are rank 0's."""
    path = str(tmp_path / "termination-log")
    write_termination_message(
        {"exit_code": 1, "exit_reason": "crashed", "message": "RuntimeError: CUDA out of memory", "step": 41}, path, 1
    )
    # Rank 0 fails after it (its collective lost a peer): same reason, so rank 1's account stays.
    write_termination_message(
        {"exit_code": 1, "exit_reason": "crashed", "message": "Connection closed by peer", "step": 42, "val_loss": 2.0},
        path,
        0,
    )
    fields = json.loads(open(path).read())
    assert (fields["rank"], fields["message"]) == (1, "RuntimeError: CUDA out of memory")
    assert fields["trainpilot_step"] == 42 and fields["trainpilot_val_loss"] == 2.0  # rank 0's gauges
    # A stop that another rank reports afterwards does not hide the crash.
    write_termination_message({"exit_code": 4, "exit_reason": "terminated", "step": 40}, path, 2)
    fields = json.loads(open(path).read())
    assert fields["exit_reason"] == "crashed" and fields["trainpilot_step"] == 42

    # Every rank agreed on a divergence: rank 1 wrote first, rank 0 adds its gauges.
    other = str(tmp_path / "other")
    write_termination_message({"exit_code": 3, "exit_reason": "diverged", "step": 2}, other, 1)
    write_termination_message({"exit_code": 3, "exit_reason": "diverged", "step": 2, "train_loss": 40.0}, other, 0)
    fields = json.loads(open(other).read())
    assert fields["exit_reason"] == "diverged" and fields["trainpilot_train_loss"] == 40.0
    # A crash while stopping outranks the stop written before it.
    stopped = str(tmp_path / "stopped")
    write_termination_message({"exit_code": 4, "exit_reason": "terminated", "step": 9}, stopped, 1)
    write_termination_message({"exit_code": 1, "exit_reason": "crashed", "message": "disk full", "step": 9}, stopped, 0)
    assert json.loads(open(stopped).read())["message"] == "disk full"


def test_merge_rule_and_size_limit():
    assert merge_termination(None, {"exit_reason": "completed", "rank": 0}) == {"exit_reason": "completed", "rank": 0}
    merged = merge_termination(
        {"exit_reason": "terminated", "exit_code": 4, "rank": 1, "trainpilot_step": 5.0},
        {"exit_reason": "invalid-config", "exit_code": 2, "rank": 3, "message": "resume_from: ..."},
    )
    assert merged == {
        "exit_reason": "invalid-config",
        "exit_code": 2,
        "rank": 3,
        "message": "resume_from: ...",
        "trainpilot_step": 5.0,
    }
    fields = termination_fields({"exit_code": 1, "exit_reason": "crashed", "message": "x" * 10_000}, rank=0)
    assert len(fields["message"]) == 512


# ------------------------------------------------------------------ the validation set


@pytest.mark.parametrize("dataset", ["synthetic", "text"])
def test_the_validation_set_is_the_same_whatever_the_trial_moves(dataset, tmp_path):
    """micro_batch, seed, grad_accum and the evaluation batch size never change the data a trial is
    scored on: the same windows in the same order, the same fingerprint."""
    (tmp_path / "corpus.txt").write_bytes(bytes(range(256)) * 40)
    data = {"dataset": dataset, "block_size": 16, "eval_windows": 37}  # not a multiple of any batch size
    if dataset == "text":
        data["data_path"] = [str(tmp_path)]
    base = build_dataset(Hyperparameters(**data, micro_batch=8))
    windows = np.concatenate([base.val_batch(index)[0] for index in range(base.eval_batches)])
    assert windows.shape == (37, 16) and base.validation_tokens == 37 * 16
    for moved in ({"micro_batch": 32}, {"seed": 5}, {"grad_accum": 4}, {"eval_batch_size": 5}):
        other = build_dataset(Hyperparameters(**data, **moved))
        assert other.validation_fingerprint == base.validation_fingerprint, moved
        assert np.array_equal(np.concatenate([other.val_batch(i)[0] for i in range(other.eval_batches)]), windows)
    # What does change the data changes the fingerprint.
    for changed in ({"eval_windows": 38}, {"block_size": 15}):
        assert (
            build_dataset(Hyperparameters(**{**data, **changed})).validation_fingerprint != base.validation_fingerprint
        )
    assert 0 <= base.validation_fingerprint < 2**48  # exact in a Prometheus float


def test_eval_batches_is_refused_with_its_replacement_named():
    with pytest.raises(ValueError, match=r"eval_batches: replaced by eval_windows .* eval_batches x micro_batch"):
        Hyperparameters.model_validate({"eval_batches": 8})


# ---- checkpoint tag rotation (spec.retention.checkpointTags) ------------------------------------


def test_tag_rotation_keeps_the_current_tag_and_the_newest_complete_ones_below_it():
    folders = ["step10", "step20", "step30", "step40", "other", "step5x"]
    complete = {"step10", "step20", "step30", "step40"}
    assert tags_to_remove(folders, "step40", complete, keep=2) == ["step10", "step20"]
    assert tags_to_remove(folders, "step40", complete, keep=1) == ["step10", "step20", "step30"]
    assert tags_to_remove(folders, "step40", complete, keep=10) == []  # never a folder that is not a tag


def test_tag_rotation_drops_what_a_cut_short_run_left_and_keeps_counting_complete_tags():
    # step30 was cut short (no marker); step60 is from an earlier run that got further: neither is resumable.
    folders = ["step10", "step20", "step30", "step40", "step60"]
    complete = {"step10", "step20", "step40", "step60"}
    assert tags_to_remove(folders, "step40", complete, keep=2) == ["step10", "step30", "step60"]


def test_tag_rotation_orders_by_step_not_by_name():
    folders = ["step9", "step10", "step100"]
    assert tags_to_remove(folders, "step100", set(folders), keep=2) == ["step9"]
    assert tags_to_remove(folders, "step7", set(folders), keep=1) == []  # the current tag is not there


def test_another_trials_checkpoint_is_pinned_by_hard_links_and_the_pin_outlives_the_tags_removal(tmp_path):
    source = _fake_checkpoint(tmp_path / "ckpt" / "parent", tag="step40")
    point = check_resume(source, "step40", zero_stage=0, world_size=1)
    pins = tmp_path / "ckpt" / ".pins" / "child-rank0-1"
    pinned, note = pin_checkpoint(point, pins, zero_stage=0, world_size=1)
    assert note is None and (pinned.directory, pinned.tag) == (str(pins), "step40")
    original = Path(source) / "step40" / "mp_rank_00_model_states.pt"
    copy = pins / "step40" / "mp_rank_00_model_states.pt"
    assert copy.stat().st_ino == original.stat().st_ino  # a hard link: nothing copied
    remove_tag(Path(source) / "step40")  # the parent goes on and drops the tag (keep_checkpoint_tags)
    assert not (Path(source) / "step40").exists() and copy.is_file() and (pins / "step40" / COMPLETE_MARKER).is_file()


def test_a_tag_removed_before_it_is_pinned_falls_back_to_the_newest_complete_one_and_says_so(tmp_path):
    source = _fake_checkpoint(tmp_path / "parent", tag="step40")
    point = check_resume(source, "step40", zero_stage=0, world_size=1)
    _fake_checkpoint(tmp_path / "parent", tag="step65")  # saved since, and `latest` names it
    (Path(source) / "step40" / COMPLETE_MARKER).unlink()  # remove_tag has begun: its marker goes first
    pinned, note = pin_checkpoint(point, tmp_path / "pins", zero_stage=0, world_size=1)
    assert pinned.tag == "step65" and (tmp_path / "pins" / "step65" / COMPLETE_MARKER).is_file()
    assert note is not None and "step40 was removed by the trial that saved it" in note and "step65" in note
    assert not (tmp_path / "pins" / "step40").exists()  # the half-pinned tag is not left behind
    remove_tag(Path(source) / "step65")
    (Path(source) / "latest").unlink()
    with pytest.raises(ConfigError, match="resume_from"):  # nothing left to pin: a clear config error
        pin_checkpoint(point, tmp_path / "pins2", zero_stage=0, world_size=1)


def test_a_trials_own_latest_checkpoint_that_is_gone_falls_back_to_the_previous_complete_one(tmp_path, capsys):
    from trainpilot_trainer.config import own_checkpoint

    own = tmp_path / "own"
    _fake_checkpoint(own, tag="step40")
    _fake_checkpoint(own, tag="step80")
    _fake_checkpoint(own, tag="step60", complete=False, latest=False)  # a save cut short: never resumed
    (own / "latest").write_text("step80")
    config = TrialConfig.model_validate(
        {"experiment": "e", "trial": "t", "checkpoint_dir": str(own), "hyperparameters": {}}
    )
    assert own_checkpoint(config, 0, 1).tag == "step80"
    remove_tag(own / "step80")  # lost (a crash while the tag was replaced, or deleted by hand)
    point = own_checkpoint(config, 0, 1)
    assert point is not None and point.tag == "step40"  # not step60: it never finished
    said = capsys.readouterr().out
    assert "the trial's latest checkpoint cannot be resumed" in said and "resuming step40" in said
    remove_tag(own / "step40")
    assert own_checkpoint(config, 0, 1) is None  # nothing left: resume_from, as on a first start
