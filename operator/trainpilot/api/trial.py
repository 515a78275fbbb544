"""The trial config: what one training run is told to do.

The operator (or the local runtime) writes it as JSON; the trainer reads and validates it with
this very model, so both sides agree on every field, default and limit.

`Hyperparameters` is deliberately flat: model shape, data, optimisation and run length are all
knobs an experiment may fix in its trialTemplate or let the agent search over, and a flat
namespace is what users write (`{lr: 0.1, n_layer: 4}`) and what a search space names.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Dataset = Literal["synthetic", "text", "tokens"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
TextLevel = Literal["byte", "char"]

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]

# The synthetic chain keeps a vocab**(order+1) table of transition probabilities in memory.
SYNTHETIC_MAX_TRANSITIONS = 2**22
SYNTHETIC_DEFAULT_VOCAB = 32
# 64 windows cost what the old default set did (8 batches of micro_batch 8: the same windows) and
# score one model to within about 0.012-0.02 nats; 1024 bring that to 0.004-0.006 (one standard
# deviation over draws of the validation set, docs/trainer.md) at 16x the evaluation cost.
DEFAULT_EVAL_WINDOWS = 64
# The hyperparameters that define the validation set's size: a search space may not move them,
# or trials would be scored on different data.
VALIDATION_SET_FIELDS = frozenset({"eval_windows", "eval_batch_size"})
# How the trainer runs, not what it learns (the fast path): never a search dimension.
FAST_PATH_FIELDS = frozenset(
    {
        "compile",
        "pad_vocab_multiple",
        "loss_chunk",
        "fused_adamw",
        "tf32",
        "pinned_batches",
        "deepspeed_timers",
        "fp32_grad_accum",
    }
)
# The hyperparameters that define the data and the validation windows a trial is scored on (its
# trainpilot_validation_fingerprint): an edit of the template may not change them once a trial
# has launched, or later trials could not be compared with earlier ones (core.spec_edits).
VALIDATION_DATA_FIELDS = frozenset(
    {
        "dataset",
        "data_path",
        "vocab_size",
        "text_level",
        "synthetic_order",
        "synthetic_concentration",
        "val_fraction",
        "block_size",
        "eval_windows",
    }
)


class Hyperparameters(BaseModel):
    """Every knob of a trial. Unknown names are rejected, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Model: a GPT-style decoder.
    n_layer: PositiveInt = Field(2, le=256, description="Transformer blocks.")
    n_head: PositiveInt = Field(2, le=256, description="Attention heads; must divide n_embd.")
    n_embd: PositiveInt = Field(32, le=65536, description="Embedding width.")
    block_size: PositiveInt = Field(64, le=131072, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability.")

    # Data: train and validation splits are always disjoint.
    dataset: Dataset = Field("synthetic", description="synthetic | text | tokens.")
    data_path: list[str] = Field(
        default_factory=list,
        description=(
            "text: files or folders to read (default: the Python standard library's sources); "
            "tokens: a folder with train.bin and val.bin (uint16, nanoGPT layout)."
        ),
    )
    vocab_size: PositiveInt | None = Field(
        None,
        le=1_000_000,
        description="synthetic: alphabet size (default 32); tokens: required; text: derived.",
    )
    text_level: TextLevel = Field("byte", description="text: byte- or char-level tokens.")
    synthetic_order: int = Field(2, ge=1, le=4, description="synthetic: Markov order k.")
    synthetic_concentration: float = Field(
        0.3, gt=0.0, le=100.0, description="synthetic: Dirichlet concentration; lower is more predictable."
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="text: share held out for validation.")

    # Optimisation.
    lr: float = Field(1e-3, gt=0.0, le=100.0, description="Peak learning rate.")
    min_lr: float | None = Field(None, ge=0.0, description="Cosine floor (default lr/10).")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    weight_decay: NonNegativeFloat = Field(0.0, le=10.0, description="AdamW weight decay.")
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: NonNegativeFloat = Field(1.0, description="Gradient clipping norm; 0 disables.")
    micro_batch: PositiveInt = Field(8, le=65536, description="Sequences per process per micro-step.")
    grad_accum: PositiveInt = Field(1, le=4096, description="Micro-steps per optimizer step.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    precision: Precision = Field("auto", description="auto = bf16 on GPU, fp32 on CPU. fp16 is GPU-only.")

    # Run length and cadence.
    max_steps: PositiveInt = Field(300, le=100_000_000, description="Optimizer steps to run.")
    eval_interval: PositiveInt = Field(50, description="Steps between validation passes.")
    eval_windows: PositiveInt = Field(
        DEFAULT_EVAL_WINDOWS,
        le=1_000_000,
        description=(
            "Validation windows of block_size tokens, the same for every trial whatever its micro_batch, "
            "seed, grad_accum or world size; fixed by the trial template, never searched."
        ),
    )
    eval_batch_size: PositiveInt = Field(
        128, le=65536, description="Validation windows per forward pass (memory only: the score does not depend on it)."
    )
    checkpoint_interval: int = Field(0, ge=0, description="Steps between checkpoints; 0 = only on SIGTERM.")
    seed: int = Field(0, ge=0, description="Seeds model init and data order.")
    fail_fast: bool = Field(True, description="Stop at the first non-finite loss, without checkpointing it.")
    device: Device = Field("auto", description="auto picks CUDA when present.")

    # The fast path (docs/trainer.md#fast-path): each part on by default where it helps (null: auto,
    # on a GPU), each switchable; none changes what a trial learns beyond rounding.
    compile: bool | None = Field(
        None, description="torch.compile the model; auto: on a GPU where a C compiler is present (Triton needs one)."
    )
    pad_vocab_multiple: PositiveInt | None = Field(
        None, le=1024, description="Pad the embedding rows to a multiple of this; auto: 64 on a GPU, 1 on a CPU."
    )
    loss_chunk: int | None = Field(
        None,
        ge=0,
        description="Positions per chunk of the output head and loss, recomputed in backward, so the fp32 logits "
        "of the whole batch never exist at once; 0: in one piece; auto: 8192 on a GPU, 0 on a CPU.",
    )
    fused_adamw: bool | None = Field(None, description="torch's fused AdamW kernel; auto: on a GPU.")
    tf32: bool = Field(True, description="fp32 matmuls on TF32 tensor cores (Ampere and later GPUs).")
    pinned_batches: bool | None = Field(
        None, description="Batches in pinned host memory, copied without blocking, the next one prefetched; auto: GPU."
    )
    deepspeed_timers: bool = Field(False, description="DeepSpeed's throughput timers (they synchronise the device).")
    fp32_grad_accum: bool | None = Field(
        None,
        description="bf16 at zero_stage 1: gradients accumulated and master weights kept in fp32 (DeepSpeed's "
        "BF16_Optimizer); auto: on a GPU.",
    )

    @model_validator(mode="before")
    @classmethod
    def _replaced_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "eval_batches" in data:
            raise ValueError(
                "eval_batches: replaced by eval_windows (validation windows, the same for every trial "
                "whatever its micro_batch) and eval_batch_size; to score on as many windows as before, set "
                "eval_windows to eval_batches x micro_batch"
            )
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> Hyperparameters:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                "pick n_head among the divisors of n_embd"
            )
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")
        if self.dataset == "tokens":
            if not self.data_path:
                raise ValueError("data_path: the tokens dataset needs a folder with train.bin and val.bin")
            if self.vocab_size is None:
                raise ValueError("vocab_size: the tokens dataset needs the tokenizer's vocabulary size")
        if self.dataset == "synthetic":
            transitions = (self.vocab_size or SYNTHETIC_DEFAULT_VOCAB) ** (self.synthetic_order + 1)
            if transitions > SYNTHETIC_MAX_TRANSITIONS:
                raise ValueError(
                    f"vocab_size: synthetic data with vocab_size {self.vocab_size or SYNTHETIC_DEFAULT_VOCAB} "
                    f"and synthetic_order {self.synthetic_order} needs {transitions} transition probabilities, "
                    f"more than the {SYNTHETIC_MAX_TRANSITIONS} allowed; lower vocab_size or synthetic_order"
                )
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("precision: fp16 is GPU-only; use fp32 or bf16 with device cpu")
        return self

    @property
    def effective_min_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


class TrialConfig(BaseModel):
    """What one trial runs: written by the operator, read by the trainer."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field("local", min_length=1, description="Owning experiment's name.")
    trial: str = Field("trial-0", min_length=1, description="This trial's name.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    checkpoint_dir: str | None = Field(
        None, description="Where checkpoints go (a PVC in a cluster). None disables checkpoints."
    )
    keep_checkpoint_tags: PositiveInt | None = Field(
        None,
        description="Checkpoint tags kept in checkpoint_dir: after each complete save the trainer deletes all but "
        "the newest this many (the one `latest` names among them). None keeps every one.",
    )
    resume_from: str | None = Field(
        None,
        description="A checkpoint directory to resume from, possibly another trial's.",
    )
    resume_tag: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description=(
            "The tag in resume_from to resume (`step120`, the step a parent reported as "
            "trainpilot_checkpoint_step); none: the tag that resume_from's `latest` names."
        ),
    )
    eval_at_steps: list[PositiveInt] = Field(
        default_factory=list,
        max_length=64,
        description="Steps to evaluate at besides every eval_interval (the operator's ASHA rung steps).",
    )
    loss_spike_factor: float | None = Field(
        None,
        gt=1.0,
        description=(
            "No checkpoint is saved once the smoothed training loss has exceeded this multiple of "
            "the run's best loss (the policy's spikeFactor); none: only non-finite losses stop checkpoints."
        ),
    )
    loss_spike_smoothing: float = Field(
        0.5, gt=0.0, le=1.0, description="EMA weight of the newest loss in that rule (the policy's smoothing)."
    )
    control_file: str | None = Field(
        None, description="JSON file watched for in-place lr/weight_decay changes (overrides the env)."
    )
    metrics_linger_seconds: float = Field(
        3.0, ge=0.0, le=30.0, description="Keep /metrics up this long after the last step."
    )
    log_interval: int = Field(10, ge=1, description="Steps between the trainer's progress lines on stdout.")

    @model_validator(mode="after")
    def _check_consistency(self) -> TrialConfig:
        if self.resume_tag is not None and self.resume_from is None:
            raise ValueError("resume_tag: names a tag in resume_from, which is not set; set resume_from too")
        max_steps = self.hyperparameters.max_steps
        beyond = [step for step in self.eval_at_steps if step > max_steps]
        if beyond:
            raise ValueError(
                f"eval_at_steps: {beyond} beyond hyperparameters.max_steps ({max_steps}); the run never reaches them"
            )
        self.eval_at_steps = sorted(set(self.eval_at_steps))
        return self


class ControlFile(BaseModel):
    """In-place changes a running trial applies at its next step, without a restart."""

    model_config = ConfigDict(extra="forbid")

    generation: int = Field(ge=0, description="Bumped by the writer on every change.")
    lr: float | None = Field(None, gt=0.0, le=100.0)
    weight_decay: float | None = Field(None, ge=0.0, le=10.0)


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One readable line per problem: the field's dotted path, what is wrong, what was given."""
    lines = []
    for problem in error.errors():
        location = ".".join(filter(None, [prefix, *(str(part) for part in problem["loc"])]))
        message = problem["msg"].removeprefix("Value error, ")
        given = problem.get("input")
        shown = "" if problem["type"] == "missing" or isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"{location}: {message}{shown}" if location else f"{message}{shown}")
    return "; ".join(lines)


def load_trial_config(text: str) -> TrialConfig:
    """Parse JSON text into a TrialConfig; raises ValueError with a one-line, field-naming message."""
    try:
        raw: Any = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"trial config is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError("trial config must be a JSON object")
    try:
        return TrialConfig.model_validate(raw)
    except ValidationError as error:
        raise ValueError(describe_validation_error(error)) from None


@functools.cache
def tunable_hyperparameters() -> Mapping[str, type]:
    """Names a search space may move, with their Python type (numbers only). Computed once:
    guardrails and suggesters ask for it on every check."""
    tunable: dict[str, type] = {}
    for name, field in Hyperparameters.model_fields.items():
        annotation = field.annotation
        for candidate in (int, float):
            if annotation is candidate or (
                getattr(annotation, "__args__", None) and candidate in annotation.__args__  # type: ignore[union-attr]
            ):
                tunable[name] = candidate
                break
    # Booleans are ints to Python; they are switches, not a search dimension.
    tunable.pop("fail_fast", None)
    for name in VALIDATION_SET_FIELDS | FAST_PATH_FIELDS:
        tunable.pop(name, None)
    return MappingProxyType(tunable)
