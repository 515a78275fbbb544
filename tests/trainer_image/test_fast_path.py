"""The trainer's fast path (docs/trainer.md#fast-path) on a CPU: each switch on gives the loss curve
of the path with all of them off, within rounding (correctness, not speed: speed is bench/
gpu_throughput.py's); the defaults per device, precision per GPU generation, and the MFU arithmetic
by hand. What a CPU cannot exercise (TF32, pinned copies, NCCL) is listed in docs/trainer.md."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from tests.support.paths import REPO
from tests.support.trainerkit import EASY_DATA, TINY
from trainpilot.api.trial import FAST_PATH_FIELDS, Hyperparameters, TrialConfig
from trainpilot_trainer.config import (
    BASELINE_PATH,
    FastPath,
    ResumePoint,
    completion_record,
    deepspeed_config,
    native_bf16,
    resolve_fast_path,
    resolve_precision,
    saved_settings,
)
from trainpilot_trainer.flops import device_peak, flops_per_token, mfu, peak_flops
from trainpilot_trainer.model import GPT, GPTShape

OFF = dataclasses.replace(BASELINE_PATH, deepspeed_timers=False)  # every part off (timers too)
STEPS = 25


def loss_curve(fast: FastPath, monkeypatch, precision: str = "fp32", **hyperparameters) -> tuple[list[float], object]:
    """The training loss of each of STEPS steps of the real trainer (DeepSpeed, in this process)."""
    from trainpilot_trainer.data import build_dataset
    from trainpilot_trainer.distributed import prepare_environment
    from trainpilot_trainer.metrics import Metrics
    from trainpilot_trainer.trainer import Trainer

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    config = TrialConfig(
        trial="fast-path",
        hyperparameters={
            **TINY,
            **EASY_DATA,
            "lr": 3e-3,
            "max_steps": 1000,
            "eval_interval": 1000,
            "device": "cpu",
            "precision": precision,
            **hyperparameters,
        },
    )
    dataset = build_dataset(config.hyperparameters)
    trainer = Trainer(
        config,
        dataset,
        prepare_environment(os.environ),
        "cpu",
        precision,
        Metrics(config.hyperparameters.max_steps),
        log=lambda *args, **kwargs: None,
        fast=fast,
    )
    curve = []
    for step in range(1, STEPS + 1):
        assert trainer.train(step) is None
        curve.append(trainer.train_loss)
    return curve, trainer


# Each switch, and what shows it took effect in the trainer.
SWITCHES = {
    "padded vocabulary": ({"pad_vocab_multiple": 64}, lambda t: t.model.token_embedding.weight.shape[0] == 64),
    "loss in chunks": ({"loss_chunk": 100}, lambda t: t.model.shape.loss_chunk == 100),
    "fused AdamW": ({"fused_adamw": True}, lambda t: t.engine.optimizer.defaults["fused"] is True),
    "DeepSpeed timers": ({"deepspeed_timers": True}, lambda t: t.engine.tput_timer.config.enabled),
    "torch.compile": ({"compile": True}, lambda t: t.engine.is_compiled),
}


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_of_the_fast_path_keeps_the_loss_curve(switch, monkeypatch):
    # A CPU compile with inductor builds C++ for minutes; aot_eager goes through the same capture.
    monkeypatch.setenv("TRAINPILOT_COMPILE_BACKEND", "aot_eager")
    changes, took_effect = SWITCHES[switch]
    baseline, plain = loss_curve(OFF, monkeypatch)
    switched, trainer = loss_curve(dataclasses.replace(OFF, **changes), monkeypatch)
    assert took_effect(trainer) and not took_effect(plain)
    assert baseline[-1] < baseline[0] - 0.3  # it learns: the comparison is of a real curve
    assert switched == pytest.approx(baseline, rel=2e-4)


def test_fp32_gradient_accumulation_under_bf16_keeps_the_loss_curve(monkeypatch):
    zero1 = {"zero_stage": 1, "grad_accum": 2}
    baseline, plain = loss_curve(OFF, monkeypatch, "bf16", **zero1)
    switched, trainer = loss_curve(dataclasses.replace(OFF, fp32_grad_accum=True), monkeypatch, "bf16", **zero1)
    assert type(trainer.engine.optimizer).__name__ == "BF16_Optimizer" != type(plain.engine.optimizer).__name__
    assert baseline[-1] < baseline[0] - 0.3
    assert switched == pytest.approx(baseline, rel=2e-2)  # bf16: the sums round differently


def test_a_padded_vocabulary_is_the_same_model_and_a_chunked_loss_the_same_loss_and_gradient():
    def model(**shape) -> GPT:
        torch.manual_seed(0)
        return GPT(GPTShape(2, 2, 32, 16, 50, **shape))

    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(2))
    plain, padded, chunked = model(), model(pad_vocab_multiple=64), model(loss_chunk=7)
    assert padded.token_embedding.weight.shape == (64, 32) and padded.head.weight is padded.token_embedding.weight
    assert torch.equal(padded.token_embedding.weight[:50], plain.token_embedding.weight)
    assert padded.num_parameters() == plain.num_parameters()  # the padding is no parameter of the model
    assert torch.equal(padded(x, y), plain(x, y))
    plain_loss, chunked_loss = plain(x, y), chunked(x, y)
    assert chunked_loss.item() == pytest.approx(plain_loss.item(), abs=1e-6)
    plain_loss.backward()
    chunked_loss.backward()
    for (name, a), b in zip(plain.named_parameters(), chunked.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_the_fast_path_is_on_by_default_on_a_gpu_and_off_on_a_cpu():
    hp = Hyperparameters()
    gpu, notes = resolve_fast_path(hp, "cuda", compiler="cc")
    assert gpu == FastPath(True, 64, 8192, True, True, True, False, fp32_grad_accum=True) and notes == []
    cpu, notes = resolve_fast_path(hp, "cpu", compiler="cc")
    assert cpu == dataclasses.replace(OFF, tf32=False) and notes == []
    # No compiler (the CPU image): compile is off and says so once, whatever asked for it.
    image, notes = resolve_fast_path(hp, "cuda", compiler=None)
    assert not image.compile and len(notes) == 1 and "no C compiler" in notes[0]
    asked, notes = resolve_fast_path(Hyperparameters(compile=True, pinned_batches=True), "cpu", compiler=None)
    assert not asked.compile and not asked.pinned_batches and len(notes) == 2
    assert "hyperparameters.compile: false" in notes[0]
    # Each part can be switched off on a GPU: the trial config's switches are the FastPath's fields.
    assert FAST_PATH_FIELDS == {field.name for field in dataclasses.fields(FastPath)}
    off = Hyperparameters(**{name: getattr(OFF, name) for name in FAST_PATH_FIELDS})
    assert resolve_fast_path(off, "cuda", compiler="cc")[0] == OFF


def test_the_deepspeed_config_of_the_fast_path():
    hp = Hyperparameters()
    fast = resolve_fast_path(hp, "cuda", compiler="cc")[0]
    config = deepspeed_config(hp, "bf16", fast)
    assert config["optimizer"]["params"]["fused"] is True
    assert config["timers"] == {"throughput": {"enabled": False}}
    slow = deepspeed_config(hp, "bf16", dataclasses.replace(fast, fused_adamw=False, deepspeed_timers=True))
    assert "fused" not in slow["optimizer"]["params"] and slow["timers"]["throughput"]["enabled"] is True


@pytest.mark.parametrize(
    ("gpu", "capability", "precision"),
    [
        ("V100", (7, 0), "fp16"),
        ("T4", (7, 5), "fp16"),
        ("A100", (8, 0), "bf16"),
        ("A10, L4, RTX 30/40", (8, 6), "bf16"),
        ("L40S", (8, 9), "bf16"),
        ("H100, H200", (9, 0), "bf16"),
        ("B200", (10, 0), "bf16"),
    ],
)
def test_auto_precision_uses_bf16_only_where_the_gpu_has_it_natively(gpu, capability, precision):
    resolved = resolve_precision(Hyperparameters(), "cuda", bf16_supported=native_bf16(capability))
    assert resolved == precision, gpu


def test_flops_per_token_and_mfu_by_hand():
    # 6 x (1000 - 32) + 12 x 2 layers x 4 wide x 8 positions
    assert flops_per_token(n_layer=2, n_embd=4, block_size=8, parameters=1000, position_parameters=32) == 6576
    assert mfu(10_000, 6576, 1e9) == pytest.approx(0.06576)
    # GPT-2 small (124M with its 1024 x 768 position table): 0.855 GFLOP per token.
    gpt2 = flops_per_token(12, 768, 1024, parameters=124_439_808, position_parameters=1024 * 768)
    assert gpt2 == 6 * 123_653_376 + 12 * 12 * 768 * 1024 == 855_166_464
    # 400k tokens/s on an H100 SXM in bf16 would be 35% MFU.
    assert mfu(400_000, gpt2, peak_flops("NVIDIA H100 80GB HBM3", "bf16", tf32=True)) == pytest.approx(0.3457, abs=1e-4)


@pytest.mark.parametrize(
    ("name", "precision", "tf32", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", True, 989.4),
        ("NVIDIA H100 PCIe", "bf16", True, 756.5),
        ("NVIDIA H100 NVL", "bf16", True, 835.5),
        ("NVIDIA H200", "bf16", True, 989.4),
        ("NVIDIA A100-SXM4-80GB", "bf16", True, 312.0),
        ("NVIDIA A100-SXM4-80GB", "fp32", True, 156.0),
        ("NVIDIA A100-SXM4-80GB", "fp32", False, 19.5),
        ("NVIDIA A10", "bf16", True, 125.0),
        ("NVIDIA L4", "bf16", True, 121.0),
        ("Tesla V100-SXM2-16GB", "fp16", True, 125.0),
        ("Tesla V100-SXM2-16GB", "fp32", True, 15.7),  # no TF32 before Ampere
        ("Tesla T4", "bf16", True, None),  # no bf16 tensor cores: no bf16 peak to measure against
        ("AMD Instinct MI300X", "bf16", True, None),  # not in the table: MFU not exported
    ],
)
def test_the_peak_table(name, precision, tf32, tflops):
    peak = peak_flops(name, precision, tf32)
    assert (peak is None and tflops is None) or peak == pytest.approx(tflops * 1e12)
    assert (device_peak("NVIDIA A10") != device_peak("NVIDIA A100-PCIE-40GB")) is True


def test_the_gpu_throughput_bench_runs_at_a_tiny_size_on_a_cpu():
    """A smoke run: both variants train in their own processes and the table is printed (the GPU
    figures need a GPU)."""
    finished = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_throughput.py"), "--size", "tiny", "--steps", "3", "--warmup", "1"]
        + ["--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    lines = finished.stdout.splitlines()
    assert lines[0] == "tiny, micro_batch 4 per GPU, 1 x cpu, fp32, 3 timed steps"
    rows = {line.split()[0]: line for line in lines[2:4]}
    assert set(rows) == {"baseline", "fast"} and rows["baseline"].endswith("all off")
    assert float(rows["fast"].split()[1].replace(",", "")) > 0
    assert lines[-1].startswith("fast path / baseline: ") and lines[-1].endswith("x tokens/s")


def test_a_checkpoint_resumes_with_the_padding_and_gradient_accumulation_it_was_saved_with():
    gpu = resolve_fast_path(Hyperparameters(), "cuda", compiler="cc")[0]
    zero1 = Hyperparameters(zero_stage=1)
    before_the_fast_path = ResumePoint("/ckpt/t0", "step100", "zero1-2", {"step": 100, "precision": "bf16"})
    kept, notes = saved_settings(before_the_fast_path, gpu, zero1, "bf16")
    assert kept == dataclasses.replace(gpu, pad_vocab_multiple=1, fp32_grad_accum=False)
    assert notes == [
        "pad_vocab_multiple: /ckpt/t0/step100 was saved with 1; this run keeps that (not 64) to load it",
        "fp32_grad_accum: /ckpt/t0/step100 was saved with False; this run keeps that (not True) to load it",
    ]
    record = completion_record("step200", 200, 1, 1, "bf16", "0.19.8", 64, fp32_grad_accum=True)
    assert saved_settings(ResumePoint("/ckpt/t0", "step200", "zero1-2", record), gpu, zero1, "bf16") == (gpu, [])
    # At ZeRO-0 gradients accumulate in bf16 whatever fp32_grad_accum says: nothing to keep or say.
    zero0 = ResumePoint("/ckpt/t0", "step300", "zero0", completion_record("step300", 300, 1, 0, "bf16", "0.19.8", 64))
    assert saved_settings(zero0, gpu, Hyperparameters(), "bf16")[1] == []


def test_fp32_gradient_accumulation_is_deepspeeds_bf16_optimizer_at_zero_1():
    gpu = resolve_fast_path(Hyperparameters(), "cuda", compiler="cc")[0]
    assert gpu.fp32_grad_accum
    at = {stage: deepspeed_config(Hyperparameters(zero_stage=stage), "bf16", gpu) for stage in (0, 1, 2)}
    assert at[1]["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in at[0] and "data_types" not in at[2]  # DeepSpeed has no such optimizer there
    assert "data_types" not in deepspeed_config(Hyperparameters(zero_stage=1), "fp32", gpu)
