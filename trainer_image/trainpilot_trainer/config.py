"""From the trial config to what this process runs: device, precision, DeepSpeed config, endpoints.

Pure functions of their arguments (no torch, no DeepSpeed), so the mapping is unit-tested in
milliseconds and every invalid combination is reported before anything heavy starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Mapping
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


def native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this CUDA compute capability has bf16 tensor cores: Ampere (8.0) and later.
    Older ones (Volta 7.0, Turing 7.5) only emulate bf16, far slower than their fp16."""
    return capability >= (8, 0)


@dataclass(frozen=True)
class FastPath:
    """The fast path's parts as this run uses them (Hyperparameters' auto values resolved)."""

    compile: bool
    pad_vocab_multiple: int
    loss_chunk: int
    fused_adamw: bool
    tf32: bool
    pinned_batches: bool
    deepspeed_timers: bool
    fp32_grad_accum: bool = False


# The trainer as it ran before the fast path: every part off, DeepSpeed's timers on (its default).
# bench/gpu_throughput.py's baseline.
BASELINE_PATH = FastPath(
    compile=False,
    pad_vocab_multiple=1,
    loss_chunk=0,
    fused_adamw=False,
    tf32=False,
    pinned_batches=False,
    deepspeed_timers=True,
)
GPU_VOCAB_MULTIPLE = 64  # tensor cores want matmul sizes in multiples of 64 (of 8 at least)
GPU_LOSS_CHUNK = 8192


def resolve_fast_path(hp: Hyperparameters, device: str, compiler: str | None) -> tuple[FastPath, list[str]]:
    """The parts of the fast path this run uses, and a line for each that was asked for but cannot be
    had here (said once at start-up). `compiler`: the C compiler found, if any."""
    gpu = device == "cuda"
    notes = []
    compile_ = gpu if hp.compile is None else hp.compile
    if compile_ and compiler is None:
        compile_ = False
        notes.append(
            "torch.compile is off: it compiles kernels at run time and no C compiler (cc, gcc or clang, or $CC) "
            "is installed here; set hyperparameters.compile: false to silence this"
            if hp.compile
            else "torch.compile is off: no C compiler is installed here (the CPU image has none)"
        )
    pinned = gpu if hp.pinned_batches is None else hp.pinned_batches
    if pinned and not gpu:
        pinned = False
        notes.append("pinned_batches is for GPU trials (pinned host memory feeds a device copy); off on the CPU")
    fast = FastPath(
        compile=compile_,
        pad_vocab_multiple=hp.pad_vocab_multiple or (GPU_VOCAB_MULTIPLE if gpu else 1),
        loss_chunk=(GPU_LOSS_CHUNK if gpu else 0) if hp.loss_chunk is None else hp.loss_chunk,
        fused_adamw=gpu if hp.fused_adamw is None else hp.fused_adamw,
        tf32=hp.tf32 and gpu,
        pinned_batches=pinned,
        deepspeed_timers=hp.deepspeed_timers,
        fp32_grad_accum=gpu if hp.fp32_grad_accum is None else hp.fp32_grad_accum,
    )
    return fast, notes


def describe_fast_path(fast: FastPath) -> str:
    on = [
        name
        for name, enabled in (
            ("compile", fast.compile),
            ("fused AdamW", fast.fused_adamw),
            ("TF32", fast.tf32),
            ("pinned batches", fast.pinned_batches),
        )
        if enabled
    ]
    if fast.pad_vocab_multiple > 1:
        on.append(f"vocabulary padded to a multiple of {fast.pad_vocab_multiple}")
    if fast.loss_chunk:
        on.append(f"loss in chunks of {fast.loss_chunk} positions")
    if not fast.deepspeed_timers:
        on.append("DeepSpeed timers off")
    return ", ".join(on) or "all off"


def find_compiler(environ: Mapping[str, str]) -> str | None:
    """The C compiler torch.compile's backends would call (Triton's launcher, inductor's C++ on a CPU)."""
    for name in (environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def resolve_precision(hp: Hyperparameters, device: str, bf16_supported: bool = True) -> str:
    """auto: bf16 on a GPU with native bf16 (fp16 on older GPUs), fp32 on a CPU. fp16 never on a CPU."""
    if hp.precision == "auto":
        if device == "cpu":
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if hp.precision == "fp16" and device == "cpu":
        raise ConfigError("hyperparameters.precision: fp16 is GPU-only; use fp32 or bf16 on a CPU")
    if hp.precision == "bf16" and device == "cuda" and not bf16_supported:
        raise ConfigError("hyperparameters.precision: this GPU has no bf16; use fp16 or fp32")
    return hp.precision


def deepspeed_config(
    hp: Hyperparameters, precision: str, fast: FastPath | None = None, load_universal: bool = False
) -> dict:
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
                # torch.optim.AdamW: DeepSpeed's own fused Adam would be compiled at start-up; torch's
                # fused kernel (one launch for all parameters) needs no build.
                "torch_adam": True,
                **({"fused": True} if fast is not None and fast.fused_adamw else {}),
            },
        },
        "zero_optimization": {"stage": hp.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
        # The throughput timer synchronises the device twice per micro-step.
        "timers": {"throughput": {"enabled": fast is None or fast.deepspeed_timers}},
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
        **({"data_types": {"grad_accum_dtype": "fp32"}} if fp32_grad_accum(hp, precision, fast) else {}),
    }


def fp32_grad_accum(hp: Hyperparameters, precision: str, fast: FastPath | None) -> bool:
    """Whether gradients accumulate in fp32 under bf16: DeepSpeed does that with its BF16_Optimizer
    (fp32 master weights and gradients, one optimizer partition per rank), which it offers at ZeRO
    stage 1 only."""
    return fast is not None and fast.fp32_grad_accum and precision == "bf16" and hp.zero_stage == 1


def checkpoint_tag(step: int) -> str:
    return contract.checkpoint_tag(step)


# Written into a tag's folder by rank 0 once every rank has finished saving that tag (see
# Trainer.save_checkpoint), before `latest` names it. A tag without it may hold half-written or
# missing ZeRO partitions (a save cut short by SIGKILL), so it is never resumed.
COMPLETE_MARKER = "trainpilot-complete.json"

# Layouts of a checkpoint folder, as DeepSpeed writes them, and how they are described.
LAYOUTS = {
    "zero0": "ZeRO-0",
    # DeepSpeed 0.15 to 0.17.5 train bf16 at ZeRO-0 with its BF16_Optimizer (fp32 gradient
    # accumulation by default), which keeps the fp32 master weights and Adam moments split per
    # rank in bf16_zero_pp_rank_<r>_mp_rank_00_optim_states.pt; from 0.17.6 bf16 at ZeRO-0
    # accumulates in bf16 and keeps the whole optimizer state in mp_rank_00_model_states.pt.
    "zero0-split": "ZeRO-0 bf16 with its optimizer state split per rank (DeepSpeed before 0.17.6)",
    "zero1-2": "ZeRO-1/2",
    "zero3": "ZeRO-3",
}


def tags_to_remove(folders: list[str], current: str, complete: set[str], keep: int) -> list[str]:
    """The tag folders to delete once `current` is saved, keeping `keep` tags: `current` and the newest
    complete ones below it. A tag above `current` or without its completion marker is what an earlier,
    cut-short run of this trial left: never resumed, so removed too."""
    steps = {name: _tag_step(name) for name in folders}
    tags = {name: step for name, step in steps.items() if step is not None}
    now = tags.get(current)
    if now is None:
        return []
    older = sorted(
        (name for name, step in tags.items() if name != current and step < now and name in complete),
        key=tags.__getitem__,
        reverse=True,
    )
    kept = {current, *older[: keep - 1]}
    return sorted((name for name in tags if name not in kept), key=tags.__getitem__)


def _tag_step(name: str) -> int | None:
    prefix = contract.CHECKPOINT_TAG_PREFIX
    digits = name[len(prefix) :]
    return int(digits) if name.startswith(prefix) and digits.isdigit() else None


def completion_record(
    tag: str,
    step: int,
    world_size: int,
    zero_stage: int,
    precision: str,
    deepspeed: str,
    pad_vocab_multiple: int = 1,
    fp32_grad_accum: bool = False,
) -> dict:
    """What COMPLETE_MARKER holds: how the tag was saved, which check_resume reads back."""
    return {
        "tag": tag,
        "step": step,
        "world_size": world_size,
        "zero_stage": zero_stage,
        "precision": precision,
        "deepspeed": deepspeed,
        "pad_vocab_multiple": pad_vocab_multiple,
        "fp32_grad_accum": fp32_grad_accum,
        "universal": True,  # saved with universal_checkpoint_info: ds_to_universal can convert it
    }


def saved_settings(
    point: ResumePoint, fast: FastPath, hp: Hyperparameters, precision: str
) -> tuple[FastPath, list[str]]:
    """`fast` with the parts of the fast path that shape a checkpoint as `point` was saved with: the
    vocabulary padding (the weights' shape) and fp32 gradient accumulation (DeepSpeed's optimizer and
    its state). Neither changes what was learned; a checkpoint loads only with its own. One saved
    before the fast path has neither. A note for each that differs from what this run would use."""
    saved = {
        "pad_vocab_multiple": point.record.get("pad_vocab_multiple", 1),
        "fp32_grad_accum": point.record.get("fp32_grad_accum", False),
    }
    ours = {"pad_vocab_multiple": fast.pad_vocab_multiple, "fp32_grad_accum": fp32_grad_accum(hp, precision, fast)}
    notes = [
        f"{name}: {point.where} was saved with {saved[name]}; this run keeps that (not {ours[name]}) to load it"
        for name in saved
        if saved[name] != ours[name]
    ]
    return dataclasses.replace(fast, **saved), notes


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


def read_completion(folder: Path, field: str) -> dict:
    """The tag's COMPLETE_MARKER; ConfigError naming `field` when it is missing or unreadable."""
    marker = folder / COMPLETE_MARKER
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{field}: {folder} has no {COMPLETE_MARKER}: its save did not finish on every rank (stopped or "
            "killed while saving), so its ZeRO partitions may be half-written; resume an earlier tag (the "
            "trial's trainpilot_checkpoint_step names its newest complete one)"
        ) from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{field}: {marker} cannot be read ({error}); resume an earlier tag") from None
    if not isinstance(record, dict) or not isinstance(record.get("zero_stage"), int):
        raise ConfigError(f"{field}: {marker} is not a TrainPilot completion record; resume an earlier tag")
    return record


def saved_layout(checkpoint: Path, saved_stage: int) -> tuple[str, int]:
    """How DeepSpeed laid out a checkpoint folder saved at ZeRO stage `saved_stage`: the layout
    (a LAYOUTS key) and the number of per-rank optimizer partitions (0: not split).

    ZeRO-0 keeps weights and optimizer state in mp_rank_00_model_states.pt (except bf16 on
    DeepSpeed before 0.17.6, see LAYOUTS); ZeRO-1/2 add one optimizer partition per data-parallel
    rank, `zero_pp_rank_<r>_...optim_states.pt` (`bf16_zero_pp_rank_<r>_...` with bf16); ZeRO-3
    partitions the weights per rank as well. The file names alone cannot tell a split bf16 ZeRO-0
    checkpoint from a ZeRO-1/2 one: the stage comes from the completion record."""
    partitions = len(list(checkpoint.glob("*zero_pp_rank_*_optim_states.pt")))
    if saved_stage == 3 or list(checkpoint.glob("*zero_pp_rank_*_model_states.pt")):
        return "zero3", partitions
    if saved_stage in (1, 2):
        return "zero1-2", partitions
    return ("zero0-split", partitions) if partitions else ("zero0", 0)


def layouts_for_stage(zero_stage: int) -> tuple[str, ...]:
    return {0: ("zero0", "zero0-split"), 1: ("zero1-2",), 2: ("zero1-2",), 3: ("zero3",)}[zero_stage]


# The first DeepSpeed whose bf16 ZeRO-0 keeps its optimizer state whole (see LAYOUTS).
WHOLE_BF16_ZERO0_SINCE = (0, 17, 6)


def remove_tag(folder: Path) -> None:
    """Delete a checkpoint folder, its completion marker first: while another trial's trainer reads
    it (pin_checkpoint), a marker still there means every file of the tag still is."""
    (folder / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint to resume, and how it was saved (its completion record)."""

    directory: str
    tag: str
    layout: str
    record: dict
    # Saved by another number of ranks with one optimizer partition each (ZeRO-1/2): loaded through
    # DeepSpeed's universal checkpoint, converted first (Trainer.resume).
    universal: bool = False
    # Where it was saved, when `directory` is this run's pinned copy of it (pin_checkpoint).
    origin: str | None = None

    @property
    def where(self) -> str:
        return f"{self.origin or self.directory}/{self.tag}"


def check_resume(directory: str, tag: str | None, zero_stage: int, world_size: int) -> ResumePoint:
    """The checkpoint to resume (`tag`, else the one `latest` names), or ConfigError when it is
    not a complete checkpoint or DeepSpeed cannot load it into this run's ZeRO stage and world.

    A ZeRO-0 checkpoint holds the whole optimizer state and loads at any world size. ZeRO-1/2,
    ZeRO-3 and split bf16 ZeRO-0 checkpoints hold one partition per rank: DeepSpeed loads them only
    at the same world size (stage 1 and 2 load each other's). A ZeRO-1/2 one saved with the
    universal-checkpoint information (by this trainer since it records `universal` in its
    completion record) loads at another world size through DeepSpeed's universal checkpoint."""
    field = "resume_tag" if tag is not None else "resume_from"
    if tag is None:
        tag = find_checkpoint(directory)
    elif not (Path(directory) / tag).is_dir():
        raise ConfigError(
            f"resume_tag: no checkpoint {tag!r} in {directory!r}; name a tag the trial saved there "
            "(contract.checkpoint_tag of its trainpilot_checkpoint_step)"
        )
    folder = Path(directory) / tag
    record = read_completion(folder, field)
    layout, ranks = saved_layout(folder, record["zero_stage"])
    where = f"{directory}/{tag}"
    if layout not in layouts_for_stage(zero_stage):
        raise ConfigError(
            f"resume_from: {where} was saved with {LAYOUTS[layout]}; this run has zero_stage {zero_stage}, "
            "which cannot load it; resume with the zero_stage it was saved with"
        )
    if layout == "zero1-2" and ranks != world_size and record.get("universal") is True:
        return ResumePoint(directory, tag, layout, record, universal=True)
    if layout != "zero0" and ranks != world_size:
        raise ConfigError(
            f"resume_from: {where} was saved by {ranks} ranks with {LAYOUTS[layout]}, which resumes only at "
            f"the same world size (this run has {world_size}); save with zero_stage 0 (and fp32, or DeepSpeed "
            "0.17.6 or later for bf16), or with zero_stage 1 or 2 by this trainer (whose checkpoints convert to "
            "DeepSpeed's universal checkpoint), to change world size"
        )
    return ResumePoint(directory, tag, layout, record)


def own_checkpoint(config: TrialConfig, zero_stage: int, world_size: int) -> ResumePoint | None:
    """The newest checkpoint in the trial's own checkpoint_dir, which comes before resume_from: a
    pod that replaces an evicted or preempted one (the Job's podFailurePolicy ignores such failures)
    goes on where the trial got to, not back to where it started. When the tag `latest` names
    cannot be resumed (deleted, its marker lost), the newest complete tag below it stands in, and
    the log says so. None when there is none: then resume_from applies, as on a first start."""
    directory = config.checkpoint_dir
    if not directory or not (Path(directory) / "latest").is_file():
        return None
    try:
        return check_resume(directory, None, zero_stage, world_size)
    except ConfigError as error:
        why = str(error)
    latest = (Path(directory) / "latest").read_text(encoding="utf-8").strip()
    below = _tag_step(latest)
    candidates = sorted(
        (
            (step, entry.name)
            for entry in Path(directory).iterdir()
            if entry.is_dir()
            and (step := _tag_step(entry.name)) is not None
            and (below is None or step < below)
            and (entry / COMPLETE_MARKER).is_file()
        ),
        reverse=True,
    )
    for _, tag in candidates:
        try:
            point = check_resume(directory, tag, zero_stage, world_size)
        except ConfigError:
            continue
        print(
            f"trainpilot: the trial's latest checkpoint cannot be resumed ({why}); resuming {tag}, "
            "the newest complete one before it",
            flush=True,
        )
        return point
    print(f"trainpilot: not resuming the trial's own checkpoint: {why}", flush=True)
    return None


def check_resume_fits(point: ResumePoint, precision: str, deepspeed_version: str) -> None:
    """ConfigError when this run's precision or DeepSpeed cannot load `point` (found by hand on
    0.17.5 and 0.19.8: DeepSpeed fails with a KeyError or a missing file, well after start-up).

    Each precision has its own optimizer wrapper and state layout, so a checkpoint resumes only
    at the precision it was saved with; a split bf16 ZeRO-0 checkpoint (DeepSpeed before 0.17.6)
    loads only on such a DeepSpeed, and a whole one only on 0.17.6 or later."""
    saved = point.record.get("precision")
    if isinstance(saved, str) and saved != precision:
        raise ConfigError(
            f"hyperparameters.precision: {point.where} was saved with precision {saved}; this run has {precision}, "
            f"whose optimizer state DeepSpeed cannot load from it; resume with precision {saved}"
        )
    if precision != "bf16" or point.layout not in ("zero0", "zero0-split"):
        return
    whole = _version(deepspeed_version) >= WHOLE_BF16_ZERO0_SINCE
    if whole != (point.layout == "zero0"):
        saved_by = point.record.get("deepspeed") or "an unknown version"
        raise ConfigError(
            f"resume_from: {point.where} is {LAYOUTS[point.layout]} (saved by DeepSpeed {str(saved_by).strip()}), "
            f"which DeepSpeed {deepspeed_version.strip()} cannot load; resume it on a DeepSpeed "
            f"{'before' if point.layout == 'zero0-split' else 'from'} 0.17.6"
        )


def _version(text: str) -> tuple[int, ...]:
    match = re.match(r"\s*(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(part) for part in match.groups()) if match else (0, 0, 0)


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


PIN_ATTEMPTS = 3
# Beside the trials' checkpoint folders: where a trial pins another's checkpoint while it starts.
PINS_FOLDER = ".pins"


def pin_checkpoint(point: ResumePoint, pins: Path, zero_stage: int, world_size: int) -> tuple[ResumePoint, str | None]:
    """A private snapshot of another trial's checkpoint under `pins` (hard links; copies across
    filesystems), taken before DeepSpeed opens it: the trial that saved it may still be running and
    remove that tag (its keep_checkpoint_tags) while this one starts, since PBT children resume the
    checkpoints of trials that go on training. If the tag goes before it is pinned, the newest
    complete one (`latest`) stands in, and the note says so. ConfigError when none can be pinned."""
    wanted, note = point, None
    for _ in range(PIN_ATTEMPTS):
        target = pins / point.tag
        try:
            _link_tree(Path(point.directory) / point.tag, target)
            pinned = check_resume(str(pins), point.tag, zero_stage, world_size)
            return dataclasses.replace(pinned, record=point.record, origin=point.directory), note
        except (OSError, ConfigError):
            shutil.rmtree(target, ignore_errors=True)
        point = check_resume(point.directory, None, zero_stage, world_size)  # what `latest` names now
        note = (
            f"resume_from: {wanted.where} was removed by the trial that saved it (keep_checkpoint_tags) before "
            f"this one could load it; resuming its newest complete checkpoint, {point.tag}, instead"
        )
    raise ConfigError(f"resume_from: {wanted.where}: no checkpoint of it could be pinned; try again later")


def _link_tree(source: Path, target: Path) -> None:
    """Link every file of `source` into `target`, the completion marker last (remove_tag deletes it
    first): a FileNotFoundError on the way means the tag is being removed."""
    files = sorted((path for path in source.rglob("*") if path.is_file()), key=lambda p: p.name == COMPLETE_MARKER)
    if not files or files[-1].name != COMPLETE_MARKER:
        raise FileNotFoundError(source / COMPLETE_MARKER)
    for path in files:
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError as error:
            if isinstance(error, FileNotFoundError):
                raise
            shutil.copy2(path, destination)  # another filesystem, or no hard links there
