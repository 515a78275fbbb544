"""The training loop: DeepSpeed engine, schedule, evaluation, checkpoints, control file, metrics.

`Trainer.run()` is what a trial does; `Trainer.train(until_step)` is the bare step loop, which the
overhead benchmark drives in-process. All ranks execute the same sequence of collectives: every
decision that could differ between ranks (stop on a signal, a new control file, a non-finite
loss) is agreed on in one small all-reduce after each step, so no rank is ever left waiting.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from .distributed import set_accelerator_env

set_accelerator_env(torch.cuda.is_available())  # must precede the first import of deepspeed

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.checkpoint.constants import (  # noqa: E402
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

# DeepSpeed's ZeRO still calls collectives that torch has renamed; torch warns on every call
# (once per step at ZeRO-3), about code the user cannot change.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

from trainpilot.api.trial import ControlFile, TrialConfig  # noqa: E402

from .batches import BatchFeeder  # noqa: E402
from .config import (  # noqa: E402
    COMPLETE_MARKER,
    FastPath,
    checkpoint_tag,
    completion_record,
    deepspeed_config,
    find_compiler,
    fp32_grad_accum,
    remove_tag,
    resolve_fast_path,
    tags_to_remove,
)
from .control import ControlWatcher  # noqa: E402
from .data import Dataset  # noqa: E402
from .distributed import DistEnv  # noqa: E402
from .errors import ConfigError  # noqa: E402
from .exitcodes import EXIT_COMPLETED, EXIT_DIVERGED, EXIT_STOPPED  # noqa: E402
from .flops import flops_per_token, mfu  # noqa: E402
from .metrics import Metrics  # noqa: E402
from .model import GPT, GPTShape  # noqa: E402
from .outcome import LossWatch, RunResult, loss_ceiling  # noqa: E402
from .schedule import Schedule  # noqa: E402
from .signals import StopRequest  # noqa: E402
from .universal import convert, universal_tag  # noqa: E402

__all__ = ["DEEPSPEED_VERSION", "StopRequest", "Trainer"]

DEEPSPEED_VERSION = deepspeed.__version__.strip()

# Weight of the newest step in the smoothed step time behind trainpilot_tokens_per_second.
THROUGHPUT_SMOOTHING = 0.1
# torch.compile's backend (inductor); tests on a CPU name one that needs no C++ build.
COMPILE_BACKEND_ENV = "TRAINPILOT_COMPILE_BACKEND"


def quiet_stdout():
    """DeepSpeed prints a few start-up lines with print(); stdout is for our progress lines and
    the TRAINPILOT_RESULT line, so send them to stderr instead."""
    return contextlib.redirect_stdout(sys.stderr)


def without_deepspeed_ops() -> None:
    """Tell DeepSpeed that no op of its own can be built, so a CPU trial builds none.

    On a CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op when it starts,
    and deciding which ops are compatible compiles test programs: a C++ compiler at run time, which
    the trainer image (a CUDA runtime base) does not carry, and about a minute per fresh pod. A CPU
    trial needs none of them (torch's AdamW, gloo's all-reduce). DeepSpeed fills its table of
    compatible ops on first use and keeps whatever table is there, so this one, all False, stands."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    deepspeed.ops.__compatible_ops__ = dict.fromkeys(ALL_OPS, False)


def init_distributed(device: str) -> None:
    if device != "cuda":
        without_deepspeed_ops()
    if not dist.is_initialized():
        with quiet_stdout():
            deepspeed.init_distributed(
                dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False, verbose=False
            )


class Trainer:
    def __init__(
        self,
        config: TrialConfig,
        dataset: Dataset,
        dist_env: DistEnv,
        device: str,
        precision: str,
        metrics: Metrics,
        control: ControlWatcher | None = None,
        stop: StopRequest | None = None,
        log=print,
        fast: FastPath | None = None,
        peak: float | None = None,
        universal_resume: bool = False,
    ):
        """`fast`: the fast path's parts (default: as resolved for `device`); `peak`: the device's
        peak FLOP/s, for MFU (None: unknown, not exported); `universal_resume`: the run will resume a
        checkpoint saved at another world size (universal.py), which DeepSpeed must know at start."""
        self.config = config
        self.hp = hp = config.hyperparameters
        self.dataset = dataset
        self.dist = dist_env
        self.precision = precision
        self.metrics = metrics
        self.control = control or ControlWatcher(None)
        self.stop = stop or StopRequest()
        self.log = log if dist_env.is_main else (lambda *args, **kwargs: None)

        self.fast = fast = fast if fast is not None else resolve_fast_path(hp, device, find_compiler(os.environ))[0]
        if device == "cuda":
            torch.cuda.set_device(dist_env.local_rank)
            self.device = torch.device("cuda", dist_env.local_rank)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast.tf32
        else:
            self.device = torch.device("cpu")
        init_distributed(device)

        torch.manual_seed(hp.seed)  # identical initial weights on every rank
        shape = GPTShape(
            hp.n_layer,
            hp.n_head,
            hp.n_embd,
            hp.block_size,
            dataset.vocab_size,
            hp.dropout,
            pad_vocab_multiple=fast.pad_vocab_multiple,
            loss_chunk=fast.loss_chunk,
        )
        self.model = GPT(shape)
        self.num_parameters = self.model.num_parameters()  # before ZeRO-3 partitions them away
        self.flops_per_token = flops_per_token(
            hp.n_layer, hp.n_embd, hp.block_size, self.num_parameters, hp.block_size * hp.n_embd
        )
        self.peak = peak
        with quiet_stdout():
            self.engine, _, _, _ = deepspeed.initialize(
                model=self.model,
                model_parameters=self.model.parameter_groups(hp.weight_decay),
                config=deepspeed_config(hp, precision, fast, load_universal=universal_resume),
            )
            if fast.compile:
                # The engine's compile keeps the module's own parameter names, so checkpoints of
                # compiled and eager runs load into each other.
                self.engine.compile(backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"))
        self.batches = BatchFeeder(dataset, dist_env.rank, self.device, pinned=fast.pinned_batches)

        self.schedule = Schedule.from_hyperparameters(hp)
        self.weight_decay = hp.weight_decay
        self.step = 0  # optimizer steps completed
        self.data_position = 0  # micro-batches this rank has drawn
        self.loss_ceiling = loss_ceiling(dataset.vocab_size)
        self.loss_watch = LossWatch(self.loss_ceiling, config.loss_spike_factor, config.loss_spike_smoothing)
        self.eval_at = frozenset(config.eval_at_steps)
        self.evaluations: dict[int, float] = {}  # val_loss at each of eval_at reached in this run
        self.tokens_per_step = hp.micro_batch * hp.grad_accum * hp.block_size * dist_env.world_size
        self.tokens_seen = 0
        self.train_loss = math.nan
        self.val_loss = math.nan
        self.val_step = -1
        self.checkpoint_step = -1  # newest complete checkpoint in checkpoint_dir
        self.grad_norm = math.nan
        self.lr = math.nan
        self.nonfinite_losses = 0
        self.loss_spikes = 0
        self._step_seconds_ema: float | None = None
        # DeepSpeed returns the gradient norm from its ZeRO and mixed-precision optimizers, but with
        # plain fp32 at ZeRO-0 it clips without reporting it; then we compute it on log steps only.
        self._own_grad_norm = hp.zero_stage == 0 and precision == "fp32"
        self._parameters = list(self.engine.module.parameters())  # walking the module tree costs ~100 us
        # Our own collectives (agreement, validation totals) need tensors where the backend
        # lives: on the GPU for nccl, in host memory for gloo.
        self._sync_device = self.device if device == "cuda" else torch.device("cpu")
        self._started = time.perf_counter()
        self._apply_optimizer_settings()

    # ---------------------------------------------------------------- optimizer settings

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.optimizer.param_groups

    def _apply_optimizer_settings(self) -> None:
        """Write this run's weight decay and betas into the optimizer (a loaded checkpoint brings
        the old run's values with its optimizer state; the current config wins)."""
        for group in self.param_groups:
            group["weight_decay"] = self.weight_decay if group.get("name") == "decay" else 0.0
            group["betas"] = (self.hp.beta1, self.hp.beta2)
        self.metrics.weight_decay.set(self.weight_decay)

    def apply_control(self, control: ControlFile) -> None:
        """New lr: the schedule is rescaled so its peak is the new lr (see schedule.py), from the
        next step on. New weight_decay: applied to the decayed groups at once."""
        changes = []
        if control.lr is not None:
            self.schedule = self.schedule.with_peak(control.lr)
            changes.append(f"lr peak {control.lr:g}")
        if control.weight_decay is not None:
            self.weight_decay = control.weight_decay
            self._apply_optimizer_settings()
            changes.append(f"weight_decay {control.weight_decay:g}")
        self.control.applied_generation = control.generation
        self.metrics.control_generation.set(control.generation)
        applied = ", ".join(changes) or "no changes"
        self.log(f"control generation {control.generation} applied at step {self.step}: {applied}", flush=True)

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> bool:
        """Save `step<N>` on every rank; then rank 0 marks it complete and points `latest` at it.

        Never once the loss has gone bad (see LossWatch): a relaunch must not resume the state that
        diverged or spiked. The marker and `latest` are written only after every rank has finished
        writing its part (DeepSpeed writes `latest` before its final barrier, so it is turned off),
        so a save cut short by SIGKILL leaves a tag that check_resume refuses, never a half-written
        one that looks whole. Returns whether a checkpoint was saved."""
        directory = self.config.checkpoint_dir
        assert directory is not None
        if not self.loss_watch.safe_to_save:
            return False
        tag = checkpoint_tag(self.step)
        folder = Path(directory) / tag
        if self.dist.is_main and folder.exists():
            # A tag saved before (by an earlier run of this trial): nothing of it may survive into
            # this save, above all not its marker, or a cut-short save would look complete.
            shutil.rmtree(folder)
        self._barrier()
        state = {
            "step": self.step,
            "data_position": self.data_position,
            "tokens_seen": self.tokens_seen,
            "world_size": self.dist.world_size,
            "experiment": self.config.experiment,
            "trial": self.config.trial,
        }
        # universal_checkpoint_info lets DeepSpeed's ds_to_universal convert a partitioned (ZeRO-1/2)
        # checkpoint, so that it can resume at another world size.
        client_state = {
            "trainpilot": state,
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
        }
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)
        self._barrier()  # every rank's partition is on disk
        if self.dist.is_main:
            record = completion_record(
                tag,
                self.step,
                self.dist.world_size,
                self.hp.zero_stage,
                self.precision,
                DEEPSPEED_VERSION,
                self.fast.pad_vocab_multiple,
                fp32_grad_accum(self.hp, self.precision, self.fast),
            )
            _write_atomically(folder / COMPLETE_MARKER, json.dumps(record))
            _write_atomically(Path(directory) / "latest", tag)
        self.checkpoint_step = self.step
        self.metrics.checkpoint_step.set(self.step)
        self.log(f"checkpoint step {self.step} saved to {directory}/{tag}", flush=True)
        if self.dist.is_main and self.config.keep_checkpoint_tags is not None:
            self._remove_old_tags(Path(directory), tag, self.config.keep_checkpoint_tags)
        return True

    def _remove_old_tags(self, directory: Path, current: str, keep: int) -> None:
        """Rank 0, after `current` is complete and named by `latest`: only the newest `keep` tags stay
        (spec.retention.checkpointTags), so a long trial does not fill its volume."""
        folders = [entry.name for entry in directory.iterdir() if entry.is_dir()]
        complete = {name for name in folders if (directory / name / COMPLETE_MARKER).is_file()}
        removed = tags_to_remove(folders, current, complete, keep)
        for name in removed:
            remove_tag(directory / name)
        if removed:
            self.log(f"checkpoint tags removed (keep_checkpoint_tags {keep}): {', '.join(removed)}", flush=True)

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            dist.barrier()

    def resume(self, directory: str, tag: str, universal: bool = False, origin: str | None = None) -> None:
        """Continue from a checkpoint: weights, optimizer moments, step and data position. The
        schedule is this run's (possibly changed) one, evaluated from the loaded step on. With
        `universal` (saved by another number of ZeRO-1/2 ranks), through its universal checkpoint.
        `origin`: where it was saved, when `directory` is a pinned copy (what the messages name)."""
        where = f"{origin or directory}/{tag}"
        load = tag
        if universal:
            load = universal_tag(tag)
            if self.dist.is_main:
                load = convert(directory, tag, self.log, into=origin)
            self._barrier()  # every rank loads what rank 0 has finished converting
            directory = origin or directory  # the conversion is beside the original
        try:
            with quiet_stdout():
                path, client_state = self.engine.load_checkpoint(
                    directory, tag=load, load_optimizer_states=True, load_lr_scheduler_states=False
                )
        except (RuntimeError, KeyError, ValueError) as error:
            # torch's load_state_dict error starts with a header line; the first detail says what differs.
            lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
            detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
            raise ConfigError(f"resume_from: {where} does not fit this model: {detail[:300]}") from None
        state = (client_state or {}).get("trainpilot")
        if path is None or not state:
            raise ConfigError(f"resume_from: {where} is not a TrainPilot checkpoint")
        self.step = int(state["step"])
        self.data_position = int(state["data_position"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        if self.config.checkpoint_dir is not None and _same_path(self.config.checkpoint_dir, directory):
            # Resumed from its own directory: that tag is its newest complete checkpoint (until it
            # saves a newer one), whatever else the folder holds.
            self.checkpoint_step = self.step
            self.metrics.checkpoint_step.set(self.step)
        self._apply_optimizer_settings()
        self.metrics.step.set(self.step)
        saved_world = state.get("world_size")
        through = ", through its universal checkpoint" if universal else ""
        self.log(
            f"resumed from {where} at step {self.step} (saved by {saved_world} rank(s), "
            f"now {self.dist.world_size}{through})",
            flush=True,
        )

    # ---------------------------------------------------------------- one step

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batches.take(self.data_position)
        self.data_position += 1
        return batch

    def _train_step(self) -> float:
        """One optimizer step (grad_accum micro-steps); returns this rank's mean loss."""
        self.lr = self.schedule.lr(self.step)
        for group in self.param_groups:
            group["lr"] = self.lr
        accum = self.hp.grad_accum
        # The gradient norm costs a host sync: read on the steps that log it, and the last one.
        log_step = (self.step + 1) % self.config.log_interval == 0 or self.step + 1 == self.hp.max_steps
        want_own_norm = self._own_grad_norm and log_step
        total = None
        for micro in range(accum):
            x, y = self._batch()
            loss = self.engine(x, y)
            self.batches.prefetch(self.data_position)  # host work while the device computes
            self.engine.backward(loss)
            if want_own_norm and micro == accum - 1:
                # After the boundary backward the gradients are averaged over ranks, not yet clipped.
                grads = [p.grad for p in self._parameters if p.grad is not None]
                self.grad_norm = float(torch.nn.utils.get_total_norm(grads))
            self.engine.step()
            total = loss.detach() if total is None else total + loss.detach()
        if not self._own_grad_norm and log_step:
            norm = self.engine.get_global_grad_norm()
            self.grad_norm = math.nan if norm is None else float(norm)
        return float(total) / accum  # the one host sync per step (two on a log step)

    def _agree(self, local_loss: float) -> tuple[float, bool, ControlFile | None]:
        """Mean loss over ranks, whether any rank was asked to stop, and rank 0's new control file
        if any: one all-reduce, so every rank takes the same decision at the same step."""
        control = self.control.poll() if self.dist.is_main else None
        stop = self.stop.check()
        if self.dist.world_size == 1:
            return local_loss, stop, control
        values = [local_loss, float(stop), 0.0, 0.0, 0.0]
        if control is not None:  # only rank 0 contributes these, so the sum is rank 0's value
            values[2:] = [
                control.generation,
                control.lr or 0.0,
                -1.0 if control.weight_decay is None else control.weight_decay,
            ]
        summed = torch.tensor(values, dtype=torch.float64, device=self._sync_device)
        dist.all_reduce(summed)
        total_loss, stops, generation, lr, weight_decay = summed.tolist()
        agreed = None
        if generation > 0:
            agreed = ControlFile(
                generation=int(generation), lr=lr or None, weight_decay=None if weight_decay < 0 else weight_decay
            )
        return total_loss / self.dist.world_size, stops > 0, agreed

    @property
    def tokens_per_second(self) -> float:
        return 0.0 if self._step_seconds_ema is None else self.tokens_per_step / self._step_seconds_ema

    def _record_step(self, seconds: float) -> None:
        self.tokens_seen += self.tokens_per_step
        ema = self._step_seconds_ema
        self._step_seconds_ema = seconds if ema is None else ema + THROUGHPUT_SMOOTHING * (seconds - ema)
        metrics = self.metrics
        metrics.step.set(self.step)
        metrics.train_loss.set(self.train_loss)
        metrics.learning_rate.set(self.lr)
        metrics.grad_norm.set(self.grad_norm)
        metrics.tokens_per_second.set(self.tokens_per_second)
        metrics.step_seconds.observe(seconds)
        per_device = self.tokens_per_second / self.dist.world_size
        if metrics.mfu is not None and self.peak is not None:
            metrics.mfu.set(mfu(per_device, self.flops_per_token, self.peak))
        if metrics.gpu_memory is not None:
            metrics.gpu_memory.set(torch.cuda.memory_allocated(self.device))
        if metrics.gpu_memory_peak is not None:
            metrics.gpu_memory_peak.set(torch.cuda.max_memory_allocated(self.device))
        if metrics.gpu_memory_reserved is not None:
            metrics.gpu_memory_reserved.set(torch.cuda.memory_reserved(self.device))
        if metrics.tokens_per_gpu is not None:
            metrics.tokens_per_gpu.set(per_device)

    # ---------------------------------------------------------------- the loop

    def train(self, until_step: int) -> int | None:
        """Run steps until `until_step`. Returns an exit code when the run must end early
        (diverged, stopped), None when `until_step` was reached."""
        hp, config = self.hp, self.config
        while self.step < until_step:
            started = time.perf_counter()
            local_loss = self._train_step()
            self.step += 1
            self.train_loss, stop, control = self._agree(local_loss)
            seconds = time.perf_counter() - started
            self._record_step(seconds)

            was_safe = self.loss_watch.safe_to_save
            bad = self.loss_watch.observe(self.step, self.train_loss)
            if bad is not None and bad.kind == "non-finite":
                self.nonfinite_losses += 1
                self.metrics.nonfinite_loss.inc()
                if hp.fail_fast:
                    self.log(
                        f"step {self.step}: {bad.description}; stopping (fail_fast) without a checkpoint", flush=True
                    )
                    return EXIT_DIVERGED
            if bad is not None and bad.kind == "spike":
                self.loss_spikes += 1
                self.metrics.loss_spikes.inc()
            if bad is not None and was_safe:
                self.log(f"step {self.step}: {bad.description}; no checkpoint is saved from now on", flush=True)
            if self.step % config.log_interval == 0:
                self.log(
                    f"step {self.step}/{hp.max_steps} | loss {self.train_loss:.4f} | lr {self.lr:.3e} | "
                    f"grad {self.grad_norm:.3f} | {self.tokens_per_second:,.0f} tok/s | "
                    f"{1000 * self._step_seconds_ema:.1f} ms/step",
                    flush=True,
                )
            if self.step % hp.eval_interval == 0 or self.step == hp.max_steps or self.step in self.eval_at:
                self.evaluate()
            if config.checkpoint_dir and hp.checkpoint_interval and self.step % hp.checkpoint_interval == 0:
                self.save_checkpoint()
            if stop:
                return self._stop()
            if control is not None:
                self.apply_control(control)
        return None

    def _stop(self) -> int:
        """Checkpoint (whatever checkpoint_interval says, so a relaunch can resume this step) and stop.
        Nothing to save at step 0 (nothing trained or loaded), nor once the loss has gone bad."""
        self.log(f"stop requested ({self.stop.describe() or 'by another rank'}) at step {self.step}", flush=True)
        if self.config.checkpoint_dir and self.step > 0 and self.checkpoint_step != self.step:
            if not self.save_checkpoint():
                watch = self.loss_watch
                self.log(
                    f"not checkpointed: the loss went bad at step {watch.first_bad_step} "
                    f"({watch.first_bad.description if watch.first_bad else ''}); "
                    f"the newest checkpoint is step {self.checkpoint_step}",
                    flush=True,
                )
        return EXIT_STOPPED

    def run(self) -> RunResult:
        """The whole trial: train to max_steps (or until stopped or diverged), evaluate at the end."""
        self._started = time.perf_counter()
        _, stop, control = self._agree(0.0)  # a signal or control file may have arrived during start-up
        if control is not None:
            self.apply_control(control)
        if stop:
            return self.result(self._stop())
        code = self.train(self.hp.max_steps)
        if code is None:
            code = EXIT_COMPLETED
            if self.val_step != self.step:  # a resumed run that had nothing left to do
                self.evaluate()
            if self.config.checkpoint_dir and self.hp.checkpoint_interval and self.checkpoint_step != self.step:
                self.save_checkpoint()
        return self.result(code)

    def result(self, exit_code: int) -> RunResult:
        return RunResult(
            exit_code=exit_code,
            step=self.step,
            max_steps=self.hp.max_steps,
            train_loss=self.train_loss,
            val_loss=self.val_loss,
            eval_step=self.val_step,
            loss_floor=self.dataset.loss_floor,
            checkpoint_step=self.checkpoint_step,
            checkpoint_tag=checkpoint_tag(self.checkpoint_step) if self.checkpoint_step >= 0 else None,
            first_bad_step=self.loss_watch.first_bad_step,
            evaluations=dict(self.evaluations),
            learning_rate=self.lr,
            weight_decay=self.weight_decay,
            grad_norm=self.grad_norm,
            tokens_per_second=self.tokens_per_second,
            nonfinite_loss_total=self.nonfinite_losses,
            loss_spikes_total=self.loss_spikes,
            control_generation=self.control.applied_generation,
            tokens=self.tokens_seen,
            seconds=time.perf_counter() - self._started,
            validation_fingerprint=self.dataset.validation_fingerprint,
        )

    # ---------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per token over the fixed validation windows. Batches are dealt round-robin to
        ranks; every rank runs the same number of forwards (padding with a zero-weight repeat)
        because ZeRO-3 gathers parameters collectively inside forward. Each batch counts by its
        windows, so a short last batch weighs what it holds."""
        world, rank = self.dist.world_size, self.dist.rank
        n_batches = self.dataset.eval_batches
        total = torch.zeros((), dtype=torch.float64, device=self._sync_device)
        self.engine.eval()
        for round_start in range(0, n_batches, world):
            index = round_start + rank
            x, y = self.dataset.val_batch(min(index, n_batches - 1))
            loss = self.engine(torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device))
            if index < n_batches:
                total += loss.double().to(self._sync_device) * len(x)
        self.engine.train()
        if world > 1:
            dist.all_reduce(total)
        self.val_loss = float(total) / self.dataset.eval_windows
        self.val_step = self.step
        if self.step in self.eval_at:  # an ASHA rung: held on its own gauges until the next one
            self.evaluations[self.step] = self.val_loss
            self.metrics.rung_step.set(self.step)
            self.metrics.rung_val_loss.set(self.val_loss)
        self.metrics.val_loss.set(self.val_loss)
        self.metrics.eval_step.set(self.val_step)
        floor = self.dataset.loss_floor
        above = "" if floor is None else f" ({self.val_loss - floor:+.4f} vs floor {floor:.4f})"
        self.log(f"eval step {self.step} | val_loss {self.val_loss:.4f}{above}", flush=True)
        return self.val_loss


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a torn one (write, fsync, rename)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
