"""From the trial config to what this process runs: device, precision, DeepSpeed config, endpoints.

Pure functions of their arguments (no torch, no DeepSpeed), so the mapping is unit-tested in
milliseconds and every invalid combination is reported before anything heavy starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from trainpilot.api import contract
from trainpilot.api.trial import Hyperparameters, TrialConfig, load_trial_config

from .errors import ConfigError

# DeepSpeed prints a throughput line every `steps_per_print` steps; the trainer logs its own.
NEVER = 2**62


def read_trial_config(path: str | None) -> TrialConfig:
    """Read and validate the trial config; ConfigError with one readable line otherwise."""
    if not path:
        raise ConfigError(f"no trial config: set {contract.ENV_TRIAL_CONFIG} or pass --config PATH")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"trial config {path!r} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"trial config {path!r} is not UTF-8 text") from None
    try:
        return load_trial_config(text)
    except ValueError as error:
        raise ConfigError(f"invalid trial config {path!r}: {error}") from None


def resolve_device(hp: Hyperparameters, cuda_available: bool) -> str:
    if hp.device == "cuda" and not cuda_available:
        raise ConfigError("hyperparameters.device: cuda was asked for but no CUDA device is visible; use auto or cpu")
    if hp.device == "auto":
        return "cuda" if cuda_available else "cpu"
    return hp.device


def resolve_precision(hp: Hyperparameters, device: str, bf16_supported: bool = True) -> str:
    """auto: bf16 on a GPU (fp16 on GPUs without bf16), fp32 on a CPU. fp16 never on a CPU."""
    if hp.precision == "auto":
        if device == "cpu":
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if hp.precision == "fp16" and device == "cpu":
        raise ConfigError("hyperparameters.precision: fp16 is GPU-only; use fp32 or bf16 on a CPU")
    if hp.precision == "bf16" and device == "cuda" and not bf16_supported:
        raise ConfigError("hyperparameters.precision: this GPU has no bf16; use fp16 or fp32")
    return hp.precision


def deepspeed_config(hp: Hyperparameters, precision: str) -> dict:
    """The DeepSpeed config for `hp`. The lr given here only seeds the optimizer: the trainer
    sets every param group's lr itself before each step (see schedule.py), so there is no
    DeepSpeed scheduler."""
    return {
        "train_micro_batch_size_per_gpu": hp.micro_batch,
        "gradient_accumulation_steps": hp.grad_accum,
        "gradient_clipping": hp.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": hp.lr,
                "betas": [hp.beta1, hp.beta2],
                "eps": 1e-8,
                "weight_decay": hp.weight_decay,
                # Plain torch.optim.AdamW: DeepSpeed's fused CPU Adam would be compiled at start-up.
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": hp.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
    }


def checkpoint_tag(step: int) -> str:
    return f"step{step}"


def find_checkpoint(directory: str) -> str:
    """The tag that `directory/latest` names; ConfigError when there is no usable checkpoint."""
    latest = Path(directory) / "latest"
    try:
        tag = latest.read_text(encoding="utf-8").strip()
    except OSError:
        raise ConfigError(
            f"resume_from: no checkpoint in {directory!r} (no 'latest' file); "
            "point it at a checkpoint_dir that a trial has saved into"
        ) from None
    if not tag or not (Path(directory) / tag).is_dir():
        raise ConfigError(f"resume_from: {str(latest)!r} names {tag!r}, which is not a checkpoint folder there")
    return tag


def saved_layout(checkpoint: Path) -> tuple[str, int]:
    """How DeepSpeed laid out a checkpoint folder: ("zero0", 0), ("zero1-2", ranks) or ("zero3", ranks).

    ZeRO-0 keeps weights and optimizer state in mp_rank_00_model_states.pt; ZeRO-1/2 add one
    optimizer partition per data-parallel rank; ZeRO-3 partitions the weights per rank as well."""
    partitions = len(list(checkpoint.glob("*zero_pp_rank_*_optim_states.pt")))
    if list(checkpoint.glob("*zero_pp_rank_*_model_states.pt")):
        return "zero3", partitions
    return ("zero1-2", partitions) if partitions else ("zero0", 0)


def layout_for_stage(zero_stage: int) -> str:
    return {0: "zero0", 1: "zero1-2", 2: "zero1-2", 3: "zero3"}[zero_stage]


def check_resume(directory: str, zero_stage: int, world_size: int) -> str:
    """The tag to resume from, or ConfigError when DeepSpeed cannot load it into this run.

    A ZeRO-0 checkpoint holds the whole optimizer state and loads at any world size. ZeRO-1/2
    and ZeRO-3 checkpoints hold one partition per rank: DeepSpeed loads them only at the same
    world size (stage 1 and 2 load each other's); anything else needs DeepSpeed's offline
    universal-checkpoint conversion, which this trainer does not do."""
    tag = find_checkpoint(directory)
    layout, ranks = saved_layout(Path(directory) / tag)
    wanted = layout_for_stage(zero_stage)
    where = f"{directory}/{tag}"
    if layout != wanted:
        raise ConfigError(
            f"resume_from: {where} was saved with {layout.replace('zero', 'ZeRO-')}; this run has zero_stage "
            f"{zero_stage}, which cannot load it; resume with the zero_stage it was saved with"
        )
    if layout != "zero0" and ranks != world_size:
        raise ConfigError(
            f"resume_from: {where} was saved by {ranks} ranks with {layout.replace('zero', 'ZeRO-')}, which resumes "
            f"only at the same world size (this run has {world_size}); save with zero_stage 0 to change world size"
        )
    return tag


@dataclass(frozen=True)
class Endpoint:
    addr: str
    port: int


def metrics_endpoint(env: os._Environ | dict) -> Endpoint:
    raw_port = env.get(contract.ENV_METRICS_PORT, str(contract.DEFAULT_METRICS_PORT))
    try:
        port = int(raw_port)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"{contract.ENV_METRICS_PORT}: must be a port number 0-65535 (got {raw_port!r})")
    return Endpoint(env.get(contract.ENV_METRICS_ADDR) or contract.DEFAULT_METRICS_ADDR, port)


def control_file_path(config: TrialConfig, env: os._Environ | dict) -> str | None:
    return config.control_file or env.get(contract.ENV_CONTROL_FILE) or None
