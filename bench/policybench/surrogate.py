"""A learning-curve surrogate of the project's trainer, fitted to curves recorded from it.

    .venv/bin/python -m bench.policybench.surrogate --fit synthetic   # -> bench/curves/synthetic-fit.json
    .venv/bin/python -m bench.policybench.surrogate --fit text

`python -m bench.record_curves --task NAME` records the real curves (bench/curves/NAME.json); `--fit`
fits the model below to them by least squares on the log losses (torch autograd: Adam, then
L-BFGS; see `fit` for the stages) and prints the fit quality, the RMSE of each run in nats.

## The model

One run is a recursion over optimizer steps. Its state, all of it carried in a `Checkpoint` (a run
resumed with the same or new values continues from it, as the trainer resumes weights, moments
and step):

- P, progress: what the smooth loss curve is a function of;
- H in [0, 1], health: 1 for a net that trains; an lr above the critical one drops it (a collapse,
  the recorded runs' plateau near the unigram loss), it recovers slowly once the lr is below;
- X, blow-up: a loss term of up to tens of nats while the lr is far above the critical one;
- M, maturity: healthy steps done. The critical lr grows with it, which is why a warm-up (small
  lrs while the net matures) tolerates a higher peak;
- R, the recent lr (an exponential average): the noise floor it sets.

The lr of step s is the trainer's own schedule (`trainpilot_trainer.schedule.Schedule`: linear
warm-up, cosine to min_lr = lr/10; an in-place change rescales the whole curve to the new peak,
exactly as the trainer's control file does; a resumed run evaluates its new schedule at the loaded
step). With b = global batch / 4 (micro_batch x world_size x grad_accum: world_size multiplies
the batch, time per step does not change):

    lr_crit = c0 * b^delta * (1 + M / tau)^omega
    x       = softplus(SHARPNESS * (lr / lr_crit - 1)) / SHARPNESS        excess (about 0 below)
    P      <- P * exp(-kappa * x) + H * b^beta * lr / (1 + lr / (lsat * b^sigma))
    X      <- (1 - rho) * X + rho * gamma * x^power
    M      <- M + H
    H      <- H * exp(-damage * x) + recovery * b^psi * (1 - H)
    R      <- R + ema * (lr - R)
    val_loss = L_inf + (L0 - L_inf) * ((1 - split) * (1 + (P/p0)^shape)^(-alpha/shape)
                                       + split * (1 + P/p2)^(-alpha2))
               + X + k_noise * R^q_noise * b^(-kb)

Progress is about proportional to the lr at small lrs (slow convergence) and saturates at large
ones; the last term is the lr's noise floor, so a higher lr is ahead early and a lower one can end
lower (late crossings), and the cosine's decay anneals it away. Far above lr_crit the loss passes
the trainer's divergence ceiling (10 ln V: counted as non-finite, like
`trainpilot_nonfinite_loss_total`; with `fail_fast` the run stops there, exit reason "diverged").
The critical lr that matters to a search, the peak lr above which a run ends badly
(`critical_lr`), rises with the global batch (larger batches recover faster) and the warm-up.

Noise, deterministic per (task, seed, hyperparameters, world size, step): an evaluation is the
curve plus sd * (sqrt(q) z_run + sqrt(1 - q) z_eval), sd = s0 + s1 * (curve - L_inf), z_run fixed
for the run (it travels in the checkpoint), z_eval fresh per evaluation; s0, s1 and q come from
the seeds recorded at the same point. The train loss of a step is the curve plus the fitted
train/validation gap plus tau / sqrt(global batch) * z_step.

Checkpoints are saved every checkpoint_interval steps and at the end, as the trainer does, and
never once a bad loss was seen (`trainpilot_trainer.outcome.LossWatch`, the trainer's own rule:
non-finite or above the ceiling, or with a `spike_factor` a smoothed loss above that multiple of
the run's best); `stop_checkpoint` is what a SIGTERM leaves.

Known limits: weight_decay is accepted but not modelled; the fit sees only fresh runs of the grid,
so in-place changes and resumes with new values follow the model, not recorded curves; a jump to
a far higher lr late in a healthy run is milder here (a spike, then no more progress) than it may
be in the trainer, which was never recorded doing it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.policybench.tasks import CURVES_DIR, TASKS, Task, load_curves
from trainpilot_trainer.outcome import LossWatch, loss_ceiling
from trainpilot_trainer.schedule import Schedule

SHARPNESS = 10.0
# The fit weighs the evaluations of a run's last third this much more: where trials are ranked.
LATE_WEIGHT = 3.0
BATCH_UNIT = 4.0
# (name, transform): "exp" parameters are stored as their log, "sig" as their logit, "inf" as the
# log of its height above the floor where a floor is known.
PARAMS: list[tuple[str, str]] = [
    # the smooth curve
    ("l_inf", "inf"),
    ("l0", "id"),
    ("p0", "exp"),
    ("alpha", "exp"),
    ("shape", "exp"),
    ("split", "sig"),
    ("p2", "exp"),
    ("alpha2", "exp"),
    ("lsat", "exp"),
    ("sigma", "id"),
    ("beta", "id"),
    ("k_noise", "exp"),
    ("q_noise", "exp"),
    ("ema", "sig"),
    ("kb", "id"),
    ("train_gap", "id"),
    # instability
    ("c0", "exp"),
    ("delta", "id"),
    ("tau", "exp"),
    ("omega", "exp"),
    ("damage", "exp"),
    ("recovery", "sig"),
    ("psi", "id"),
    ("kappa", "exp"),
    ("gamma", "exp"),
    ("power", "exp"),
    ("rho", "sig"),
]
State = tuple[float, float, float, float, float]
SMOOTH = frozenset(name for name, _ in PARAMS[:16])
# Where the fit starts (natural units; l_inf is set from the data).
START: dict[str, float] = {
    "l0": 2.8,
    "p0": 0.01,
    "alpha": 1.0,
    "shape": 1.0,
    "split": 0.1,
    "p2": 0.3,
    "alpha2": 0.5,
    "lsat": 0.003,
    "sigma": 0.3,
    "beta": 0.2,
    "k_noise": 1.0,
    "q_noise": 0.7,
    "ema": 0.05,
    "kb": 0.5,
    "train_gap": 0.02,
    "c0": 0.02,
    "delta": 0.3,
    "tau": 5.0,
    "omega": 0.7,
    "damage": 1.0,
    "recovery": 0.003,
    "psi": 0.5,
    "kappa": 0.3,
    "gamma": 0.01,
    "power": 3.0,
    "rho": 0.1,
}
FRESH = (0.0, 1.0, 0.0, 0.0, 0.0)  # progress, health, blow-up, maturity, recent lr: a run not trained


# --------------------------------------------------------------------------------------------
# The model, per step (plain Python: thousands of runs a second)
# --------------------------------------------------------------------------------------------


def _softplus(z: float) -> float:
    return z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))


@dataclass(frozen=True)
class Model:
    """Fitted parameters of one task (natural units), the noise model and the task's constants."""

    p: dict[str, float]
    noise: dict[str, float]
    ceiling: float

    def critical_lr(self, maturity: float, batch: float) -> float:
        p = self.p
        return p["c0"] * (batch / BATCH_UNIT) ** p["delta"] * math.exp(p["omega"] * math.log1p(maturity / p["tau"]))

    def step(self, state: State, lr: float, batch: float) -> State:
        """The state after one optimizer step at `lr`."""
        progress, health, blowup, maturity, recent = state
        p = self.p
        b = batch / BATCH_UNIT
        x = _softplus(SHARPNESS * (lr / self.critical_lr(maturity, batch) - 1.0)) / SHARPNESS
        gain = health * b ** p["beta"] * lr / (1.0 + lr / (p["lsat"] * b ** p["sigma"]))
        progress = progress * math.exp(-p["kappa"] * x) + gain
        blowup = (1.0 - p["rho"]) * blowup + p["rho"] * p["gamma"] * x ** p["power"]
        maturity = maturity + health
        recovery = min(1.0, p["recovery"] * b ** p["psi"])
        health = health * math.exp(-p["damage"] * x) + recovery * (1.0 - health)
        recent = recent + p["ema"] * (lr - recent)
        return progress, health, blowup, maturity, recent

    def loss(self, state: State, batch: float) -> float:
        """Noise-free val_loss in this state."""
        progress, _, blowup, _, recent = state
        p = self.p
        fast = (1.0 + (progress / p["p0"]) ** p["shape"]) ** (-p["alpha"] / p["shape"])
        slow = (1.0 + progress / p["p2"]) ** (-p["alpha2"])
        curve = p["l_inf"] + (p["l0"] - p["l_inf"]) * ((1.0 - p["split"]) * fast + p["split"] * slow)
        return curve + blowup + p["k_noise"] * recent ** p["q_noise"] * (batch / BATCH_UNIT) ** (-p["kb"])


def _natural(raw: dict[str, float], floor: float | None) -> dict[str, float]:
    out = {}
    for name, kind in PARAMS:
        u = raw[name]
        if kind == "exp":
            out[name] = math.exp(u)
        elif kind == "sig":
            out[name] = 1.0 / (1.0 + math.exp(-u))
        elif kind == "inf":
            out[name] = (floor + math.exp(u)) if floor is not None else u
        else:
            out[name] = u
    return out


def _raw(natural: dict[str, float], floor: float | None) -> dict[str, float]:
    out = {}
    for name, kind in PARAMS:
        v = natural[name]
        if kind == "exp":
            out[name] = math.log(v)
        elif kind == "sig":
            out[name] = math.log(v / (1.0 - v))
        elif kind == "inf":
            out[name] = math.log(max(v - floor, 1e-6)) if floor is not None else v
        else:
            out[name] = v
    return out


def fit_path(task_name: str) -> Path:
    return CURVES_DIR / f"{task_name}-fit.json"


@functools.cache
def model_of(task_name: str) -> Model:
    """The fitted model of a task (bench/curves/TASK-fit.json)."""
    data = json.loads(fit_path(task_name).read_text())
    return Model(p=data["params"], noise=data["noise"], ceiling=data["ceiling"])


# --------------------------------------------------------------------------------------------
# Deterministic noise
# --------------------------------------------------------------------------------------------


def _normal(*key: Any) -> float:
    """A standard normal drawn from a hash of `key`: the same key, the same number, anywhere."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=16).digest()
    a, b = struct.unpack("<QQ", digest)
    u1 = (a + 1) / 2.0**64  # (0, 1]
    u2 = b / 2.0**64
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def _key(hyperparameters: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((name, round(float(value), 12)) for name, value in hyperparameters.items()))


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """What a resumed run (with the same or new values) starts from: the step and the state
    (progress, health, blow-up, the run's persistent noise draw)."""

    step: int
    state: tuple[float, ...]


def _settings(task: Task, hyperparameters: dict[str, float]) -> dict[str, Any]:
    return {**task.template, **hyperparameters}


def _schedule(settings: dict[str, Any]) -> Schedule:
    lr = float(settings["lr"])
    min_lr = settings.get("min_lr")
    return Schedule(
        peak=lr,
        floor=lr / 10 if min_lr is None else float(min_lr),
        warmup_steps=int(settings.get("warmup_steps", 10)),
        max_steps=int(settings["max_steps"]),
    )


def _global_batch(settings: dict[str, Any], world_size: int) -> float:
    return float(settings.get("micro_batch", 8)) * world_size * int(settings.get("grad_accum", 1))


class SurrogateRun:
    """One simulated trial, step by step, as the trainer would report it."""

    def __init__(
        self,
        task: Task,
        hyperparameters: dict[str, float],
        seed: int,
        resume: Checkpoint | None = None,
        world_size: int = 1,
        *,
        spike_factor: float | None = None,
        smoothing: float = 0.5,
        eval_at_steps: tuple[int, ...] = (),
    ) -> None:
        """`spike_factor` and `smoothing` are the trial config's loss_spike_factor and
        loss_spike_smoothing (the operator copies the policy's spikeFactor and smoothing there);
        `eval_at_steps` its extra evaluation steps (ASHA rungs), reported as rung_step and
        rung_val_loss like the trainer's gauges."""
        self.task = task
        self.model = model_of(task.name)
        self.hyperparameters = dict(hyperparameters)
        self.seed = seed
        self.world_size = world_size
        settings = _settings(task, hyperparameters)
        self.max_steps = int(settings["max_steps"])
        self.eval_interval = int(settings["eval_interval"])
        self.checkpoint_interval = int(settings.get("checkpoint_interval", 0))
        self.fail_fast = bool(settings.get("fail_fast", True))
        self.schedule = _schedule(settings)
        self.batch = _global_batch(settings, world_size)
        self.eval_at = frozenset(int(step) for step in eval_at_steps)
        self.rung_step = -1
        self.rung_val_loss: float | None = None
        self._noise_key = (task.name, seed, _key(hyperparameters), world_size)
        if resume is None:
            self.step = 0
            self._state: State = FRESH
            self._z_run = _normal(*self._noise_key, "run")
        else:
            self.step = resume.step
            *state, z_run = resume.state
            self._state = tuple(state)  # type: ignore[assignment]
            self._z_run = z_run
        self.resumed_from_step = self.step
        self.lr = self.schedule.lr(self.step)
        self.train_loss = math.nan
        self.val_loss: float | None = None
        self.eval_step = -1
        self.nonfinite_losses = 0
        self.watch = LossWatch(self.model.ceiling, spike_factor, smoothing)
        # this trial's own checkpoint directory: empty until it saves (a resumed run loaded its
        # state from its parent's)
        self.checkpoint: Checkpoint | None = None
        self.exit_reason: str | None = "completed" if self.step >= self.max_steps else None
        if self.step >= self.max_steps:  # the trainer evaluates and exits without training
            self.evaluate()

    @property
    def finished(self) -> bool:
        return self.exit_reason is not None

    @property
    def checkpoint_step(self) -> int:
        """trainpilot_checkpoint_step: -1 until a checkpoint exists."""
        return -1 if self.checkpoint is None else self.checkpoint.step

    @property
    def first_bad_step(self) -> int | None:
        return self.watch.first_bad_step

    def expected_loss_now(self) -> float:
        return self.model.loss(self._state, self.batch)

    def evaluate(self) -> float:
        """One noisy validation evaluation at the current step (the trainer's periodic ones, and its
        eval_at_steps); sets val_loss and eval_step."""
        noise = self.model.noise
        mean = self.expected_loss_now()
        sd = noise["s0"] + noise["s1"] * max(0.0, mean - self.model.p["l_inf"])
        q = noise["q"]
        z = math.sqrt(q) * self._z_run + math.sqrt(1.0 - q) * _normal(*self._noise_key, "eval", self.step)
        self.val_loss = mean + sd * z
        self.eval_step = self.step
        return self.val_loss

    def advance(self, steps: int) -> None:
        """Train up to `steps` more optimizer steps (fewer at max_steps or on a fail_fast stop)."""
        model = self.model
        for _ in range(max(0, steps)):
            if self.finished:
                return
            self.lr = self.schedule.lr(self.step)
            self._state = model.step(self._state, self.lr, self.batch)
            self.step += 1
            mean = model.loss(self._state, self.batch)
            z = _normal(*self._noise_key, "train", self.step)
            self.train_loss = mean + model.p["train_gap"] + model.noise["tau"] / math.sqrt(self.batch) * z
            bad = self.watch.observe(self.step, self.train_loss)
            if bad is not None and bad.kind == "non-finite":
                self.nonfinite_losses += 1
                if self.fail_fast:
                    self.exit_reason = "diverged"
                    return
            if self.step % self.eval_interval == 0 or self.step == self.max_steps or self.step in self.eval_at:
                self.evaluate()
                if self.step in self.eval_at:
                    self.rung_step, self.rung_val_loss = self.step, self.val_loss
            if (
                self.checkpoint_interval
                and (self.step % self.checkpoint_interval == 0 or self.step == self.max_steps)
                and self.watch.safe_to_save
            ):
                self.checkpoint = Checkpoint(self.step, (*self._state, self._z_run))
            if self.step >= self.max_steps:
                self.exit_reason = "completed"

    def stop_checkpoint(self) -> Checkpoint | None:
        """What a SIGTERM leaves: a checkpoint of this very step, unless the loss went bad (then
        the latest one from before) or the run is at step 0 (nothing trained, nothing loaded)."""
        if self.step > 0 and self.watch.safe_to_save:
            self.checkpoint = Checkpoint(self.step, (*self._state, self._z_run))
        return self.checkpoint

    def set_hyperparameters(self, values: dict[str, float]) -> None:
        """In place, from the next step on, as the trainer's control file: a new lr becomes the
        schedule's peak (the whole curve rescaled); weight_decay is accepted (not modelled)."""
        if "lr" in values and values["lr"] is not None:
            self.schedule = self.schedule.with_peak(float(values["lr"]))
            self.hyperparameters["lr"] = float(values["lr"])
        if "weight_decay" in values and values["weight_decay"] is not None:
            self.hyperparameters["weight_decay"] = float(values["weight_decay"])

    def expected_final(self) -> float:
        """Noise-free val_loss at max_steps from here, the lr schedule as it stands (inf past the
        divergence ceiling)."""
        state = self._state
        for step in range(self.step, self.max_steps):
            state = self.model.step(state, self.schedule.lr(step), self.batch)
        value = self.model.loss(state, self.batch)
        return value if value <= self.model.ceiling else math.inf


def expected_curve(task: Task, hyperparameters: dict[str, float], world_size: int = 1) -> list[float]:
    """Noise-free val_loss after every step 0..max_steps (index = steps done)."""
    model = model_of(task.name)
    settings = _settings(task, hyperparameters)
    schedule = _schedule(settings)
    batch = _global_batch(settings, world_size)
    state = FRESH
    lr = schedule.lr(0)
    curve = [model.loss(state, batch)]
    for step in range(schedule.max_steps):
        lr = schedule.lr(step)
        state = model.step(state, lr, batch)
        curve.append(model.loss(state, batch))
    return curve


def expected_loss(task: Task, hyperparameters: dict[str, float], step: int, world_size: int = 1) -> float:
    """Noise-free val_loss after `step` steps of a fresh run with these values; inf where it is
    past the divergence ceiling (blown up)."""
    value = expected_curve(task, hyperparameters, world_size)[step]
    return value if value <= model_of(task.name).ceiling else math.inf


LR_GRID = tuple(1e-4 * 10 ** (k / 16) for k in range(65))  # 1e-4 .. 1, 16 a decade


def critical_lr(task: Task, micro_batch: int, warmup_steps: int, world_size: int = 1, tolerance: float = 0.1) -> float:
    """The lowest peak lr above the best one (on LR_GRID) whose noise-free final val_loss is
    `tolerance` nats or more above the best's: where runs start to end badly (collapse, blow up)
    rather than merely converge more slowly. Rises with the global batch and the warm-up."""
    hp = {"micro_batch": micro_batch, "warmup_steps": warmup_steps}
    finals = [expected_loss(task, {**hp, "lr": lr}, task.max_steps, world_size) for lr in LR_GRID]
    finals = [value if math.isfinite(value) else math.inf for value in finals]
    best = min(range(len(finals)), key=finals.__getitem__)
    for index in range(best + 1, len(finals)):
        if finals[index] >= finals[best] + tolerance:
            return LR_GRID[index]
    return math.inf


# --------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------


def kind_of(run: dict[str, Any]) -> str:
    """ "diverged" (a loss past the divergence ceiling), "unstable" (an evaluation 0.1 nats or more
    above an earlier one: a spike or a collapse) or "smooth"."""
    if run["nonfinite"] or any(v is None for v in run["val"]):
        return "diverged"
    best = math.inf
    for value in run["val"]:
        if value > best + 0.1:
            return "unstable"
        best = min(best, value)
    return "smooth"


def clean_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs no instability touched: smooth, and at no evaluation more than 0.05 nats above
    the same run (batch, warm-up, seed) at the grid's next lower lr, itself clean. These fit the
    smooth curve; the rest (collapsed, spiking, blown-up) the instability."""
    clean: list[dict[str, Any]] = []
    for run in sorted(runs, key=lambda run: run["hp"]["lr"]):
        hp = run["hp"]
        if kind_of(run) != "smooth":
            continue
        lower = [
            other
            for other in runs
            if other["hp"]["lr"] < hp["lr"]
            and all(other["hp"][k] == hp[k] for k in ("micro_batch", "warmup_steps", "seed"))
        ]
        if lower:
            below = max(lower, key=lambda other: other["hp"]["lr"])
            if not any(below is other for other in clean):
                continue
            if any(v > w + 0.05 for v, w in zip(run["val"], below["val"], strict=True)):
                continue
        clean.append(run)
    return clean


def _simulate_torch(theta, floor, lr, batch):
    """Model.step and Model.loss over all runs at once: losses after 0..T steps, [R, T+1]."""
    import torch

    p = {}
    for (name, kind), u in zip(PARAMS, theta, strict=True):
        if kind == "exp":
            p[name] = torch.exp(u)
        elif kind == "sig":
            p[name] = torch.sigmoid(u)
        elif kind == "inf":
            p[name] = floor + torch.exp(u) if floor is not None else u
        else:
            p[name] = u
    b = batch / BATCH_UNIT
    runs, steps = lr.shape
    progress = torch.zeros(runs, dtype=torch.float64)
    health = torch.ones(runs, dtype=torch.float64)
    blowup = torch.zeros(runs, dtype=torch.float64)
    maturity = torch.zeros(runs, dtype=torch.float64)
    recent = torch.zeros(runs, dtype=torch.float64)
    b_beta, b_delta, b_kb = b ** p["beta"], b ** p["delta"], b ** (-p["kb"])
    sat = p["lsat"] * b ** p["sigma"]
    recovery = torch.clamp(p["recovery"] * b ** p["psi"], max=1.0)

    def loss():
        ratio = (progress / p["p0"]).clamp_min(1e-30)
        fast = (1.0 + ratio ** p["shape"]) ** (-p["alpha"] / p["shape"])
        slow = (1.0 + progress / p["p2"]) ** (-p["alpha2"])
        curve = p["l_inf"] + (p["l0"] - p["l_inf"]) * ((1.0 - p["split"]) * fast + p["split"] * slow)
        return curve + blowup + p["k_noise"] * recent.clamp_min(1e-30) ** p["q_noise"] * b_kb

    out = [loss()]
    for s in range(steps):
        e = lr[:, s]
        crit = p["c0"] * b_delta * torch.exp(p["omega"] * torch.log1p(maturity / p["tau"]))
        x = torch.nn.functional.softplus(SHARPNESS * (e / crit - 1.0)) / SHARPNESS
        gain = health * b_beta * e / (1.0 + e / sat)
        progress = progress * torch.exp(-p["kappa"] * x) + gain
        blowup = (1.0 - p["rho"]) * blowup + p["rho"] * p["gamma"] * x ** p["power"]
        maturity = maturity + health
        health = health * torch.exp(-p["damage"] * x) + recovery * (1.0 - health)
        recent = recent + p["ema"] * (e - recent)
        out.append(loss())
    return torch.stack(out, dim=1), p


class _Data:
    """The recorded curves of a set of runs as tensors: each run's lr per step and global batch,
    its val losses (run, step, value) and its train losses averaged over 10 steps."""

    def __init__(self, curves: dict[str, Any], task: Task, runs: list[dict[str, Any]]) -> None:
        import torch

        steps = task.max_steps
        lrs, batches = [], []
        val: tuple[list, list, list] = ([], [], [])
        train: tuple[list, list, list] = ([], [], [])
        for r, run in enumerate(runs):
            settings = _settings(task, run["hp"])
            schedule = _schedule(settings)
            lrs.append([schedule.lr(s) for s in range(steps)])
            batches.append(_global_batch(settings, 1))
            for s, v in zip(run["eval_steps"], run["val"], strict=True):
                if v is not None:
                    for column, value in zip(val, (r, s, v), strict=True):
                        column.append(value)
            losses = run["train"]
            for end in range(10, len(losses) + 1, 10):  # the mean of 10 steps, at their middle
                window = [x for x in losses[end - 10 : end] if x is not None]
                if len(window) == 10:
                    for column, value in zip(train, (r, end - 5, sum(window) / 10), strict=True):
                        column.append(value)
        self.late_step = (2 * steps) // 3
        self.lr = torch.tensor(lrs, dtype=torch.float64)
        self.batch = torch.tensor(batches, dtype=torch.float64)
        self.val = (torch.tensor(val[0]), torch.tensor(val[1]), torch.tensor(val[2], dtype=torch.float64))
        self.train = (torch.tensor(train[0]), torch.tensor(train[1]), torch.tensor(train[2], dtype=torch.float64))


def _objective(theta, data: _Data, floor, train_weight):
    """Mean squared error of log losses: val points, plus train_weight x the train points."""
    import torch

    curve, p = _simulate_torch(theta, floor, data.lr, data.batch)
    vr, vi, vo = data.val
    tr, ti, to = data.train
    weight = 1.0 + LATE_WEIGHT * (vi >= data.late_step)
    val_term = torch.sum(weight * (torch.log(curve[vr, vi].clamp_min(1e-3)) - torch.log(vo)) ** 2) / torch.sum(weight)
    train_model = curve[tr, ti] + p["train_gap"]
    train_term = torch.mean((torch.log(train_model.clamp_min(1e-3)) - torch.log(to)) ** 2)
    return val_term + train_weight * train_term, curve


def _optimize(theta, data: _Data, floor, train_weight, trainable: set[str], iterations: int, lr: float, verbose):
    """Adam on the trainable parameters, then L-BFGS; keeps the best point seen."""
    import torch

    mask = torch.tensor([1.0 if name in trainable else 0.0 for name, _ in PARAMS], dtype=torch.float64)
    theta = theta.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    best_value, best = math.inf, theta.detach().clone()
    for it in range(iterations):
        optimizer.zero_grad()
        value, _ = _objective(theta, data, floor, train_weight)
        if not torch.isfinite(value):
            with torch.no_grad():
                theta.copy_(best)
            optimizer = torch.optim.Adam([theta], lr=lr / 3)
            continue
        if value.item() < best_value:
            best_value, best = value.item(), theta.detach().clone()
        value.backward()
        theta.grad *= mask
        optimizer.step()
        if verbose and it % 100 == 0:
            print(f"  iteration {it}: objective {value.item():.5f}", flush=True)
    with torch.no_grad():
        theta.copy_(best)
    lbfgs = torch.optim.LBFGS([theta], lr=0.5, max_iter=60, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        value, _ = _objective(theta, data, floor, train_weight)
        value.backward()
        theta.grad *= mask
        return value

    try:
        lbfgs.step(closure)
        value, _ = _objective(theta, data, floor, train_weight)
        if torch.isfinite(value) and value.item() < best_value:
            best_value, best = value.item(), theta.detach().clone()
    except RuntimeError:
        pass
    if verbose:
        print(f"  best objective {best_value:.5f}", flush=True)
    return best, best_value


def fit(
    task_name: str, iterations: int = 400, train_weight: float = 0.3, stages: int = 2, verbose: bool = True
) -> dict[str, Any]:
    """Fit the model to bench/curves/TASK.json; returns what --fit writes to TASK-fit.json.

    Three stages, each Adam then L-BFGS on the log losses: (1) the smooth curve alone on the clean
    runs (`clean_runs`), the instability switched off; (2) the instability
    parameters on every run, the curve held; (3) everything together."""
    import torch

    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    task = TASKS[task_name]
    curves = load_curves(task_name)
    if curves is None:
        raise SystemExit(f"no curves for {task_name}: run python -m bench.record_curves --task {task_name}")
    floor = curves.get("loss_floor")
    runs = curves["runs"]
    smooth_runs = clean_runs(runs)
    best_val = min(v for run in runs for v in run["val"] if v is not None)
    start = dict(START)
    start["l_inf"] = best_val - (0.01 if floor is not None else 0.3)
    start["l0"] = math.log(float(task.template.get("vocab_size", 256)))
    raw = _raw(start, floor)
    theta = torch.tensor([raw[name] for name, _ in PARAMS], dtype=torch.float64)
    plan = [
        ("smooth curve", _Data(curves, task, smooth_runs), set(SMOOTH), iterations, 0.05),
        ("instability", _Data(curves, task, runs), {name for name, _ in PARAMS} - SMOOTH, iterations, 0.05),
        ("all", _Data(curves, task, runs), {name for name, _ in PARAMS}, iterations, 0.01),
    ][:stages]
    off = dict(zip((name for name, _ in PARAMS), theta.tolist(), strict=True))
    off["c0"] = math.log(1e4)  # stage 1: nothing is ever unstable
    theta_off = torch.tensor([off[name] for name, _ in PARAMS], dtype=torch.float64)
    value = math.inf
    for index, (label, data, trainable, count, lr) in enumerate(plan):
        if verbose:
            print(f"stage {index + 1}: {label} ({data.lr.shape[0]} runs)", flush=True)
        if index == 0:
            fitted, value = _optimize(theta_off, data, floor, train_weight, trainable, count, lr, verbose)
            theta = torch.where(torch.tensor([name in SMOOTH for name, _ in PARAMS]), fitted, theta)
        else:
            theta, value = _optimize(theta, data, floor, train_weight, trainable, count, lr, verbose)
        if verbose:
            natural = _natural({name: float(u) for (name, _), u in zip(PARAMS, theta, strict=True)}, floor)
            print("  " + ", ".join(f"{name} {natural[name]:.4g}" for name in sorted(trainable)), flush=True)
    _, curve = _objective(theta, _Data(curves, task, runs), floor, train_weight)
    params = _natural({name: float(u) for (name, _), u in zip(PARAMS, theta, strict=True)}, floor)
    curve = curve.detach().numpy()
    return {
        "task": task_name,
        "fitted_with": (
            f"python -m bench.policybench.surrogate --fit {task_name} --iterations {iterations} --stages {stages}"
        ),
        "objective": round(value, 6),
        "params": params,
        "noise": _fit_noise(curves, curve, params),
        "ceiling": loss_ceiling(int(task.template.get("vocab_size", 256))),
        "loss_floor": floor,
        "rmse": _rmse(curves, curve),
    }


def _rmse(curves: dict[str, Any], curve) -> dict[str, Any]:
    """RMSE (nats) of the noise-free model against each run's recorded val losses."""
    per_run = {}
    for r, run in enumerate(curves["runs"]):
        errs = [(curve[r, s] - v) ** 2 for s, v in zip(run["eval_steps"], run["val"], strict=True) if v is not None]
        hp = run["hp"]
        name = f"lr{hp['lr']:g}-mb{hp['micro_batch']}-wu{hp['warmup_steps']}-s{hp['seed']}"
        per_run[name] = round(math.sqrt(sum(errs) / len(errs)), 4)
    groups: dict[str, list[float]] = {}
    for name, run in zip(per_run, curves["runs"], strict=True):
        groups.setdefault(kind_of(run), []).append(per_run[name])
    summary = {
        kind: {"runs": len(values), "median": round(sorted(values)[len(values) // 2], 4), "max": max(values)}
        for kind, values in sorted(groups.items())
    }
    return {"per_run": per_run, "by_kind": summary}


def _fit_noise(curves: dict[str, Any], curve, params: dict[str, float]) -> dict[str, float]:
    """s0, s1, q of the evaluation noise from the runs repeated with other seeds (sd = s0 + s1 x
    the height above L_inf, q the share of the variance that stays with the run); tau of the
    train-loss noise from the step-to-step scatter of the smooth runs."""
    import numpy as np

    groups: dict[tuple, list[int]] = {}
    for r, run in enumerate(curves["runs"]):
        hp = run["hp"]
        groups.setdefault((hp["lr"], hp["micro_batch"], hp["warmup_steps"]), []).append(r)
    gaps, sds, persistent, total = [], [], [], []
    for members in groups.values():
        if len(members) < 3:
            continue
        vals = np.array([curves["runs"][r]["val"] for r in members], dtype=float)  # [seeds, evals]
        mean = vals.mean(axis=0)
        sd = vals.std(axis=0, ddof=1)
        # the evaluations from step 100 on: early ones, on the steep part of the curve, mostly
        # measure when a run got going, not the score of a model
        late = np.array(curves["runs"][members[0]]["eval_steps"]) >= 100
        gaps.extend(mean[late] - params["l_inf"])
        sds.extend(sd[late])
        dev = vals - mean
        persistent.append(float(np.mean(dev.mean(axis=1) ** 2)) * len(members) / (len(members) - 1))
        total.append(float(np.mean(dev**2)) * len(members) / (len(members) - 1))
    gaps_a, sds_a = np.array(gaps), np.array(sds)
    # sd = s0 + s1 * gap, least squares, both kept >= 0
    design = np.stack([np.ones_like(gaps_a), gaps_a], axis=1)
    (s0, s1), *_ = np.linalg.lstsq(design, sds_a, rcond=None)
    s0, s1 = max(float(s0), 0.0005), max(float(s1), 0.0)
    # share of the variance that is the run's own offset (the mean over its evaluations)
    n_evals = len(curves["runs"][0]["eval_steps"])
    run_var = max(0.0, np.mean(persistent) - np.mean(total) / n_evals)
    q = float(min(0.95, run_var / np.mean(total))) if total else 0.5
    # train noise: a step's loss around its neighbours' mean, times sqrt(global batch)
    scaled = []
    for run in curves["runs"]:
        if kind_of(run) != "smooth":
            continue
        train = np.array([np.nan if x is None else x for x in run["train"]], dtype=float)
        smooth = np.convolve(train, np.ones(7) / 7, mode="valid")
        resid = train[3:-3] - smooth
        scaled.append(np.nanstd(resid[150:]) * math.sqrt(7 / 6) * math.sqrt(run["hp"]["micro_batch"]))
    tau = float(np.median(scaled))
    return {"s0": round(s0, 5), "s1": round(s1, 5), "q": round(q, 3), "tau": round(tau, 4)}


def _report(result: dict[str, Any]) -> None:
    print(f"fit of {result['task']} (objective {result['objective']}):")
    for name, value in result["params"].items():
        print(f"  {name:10s} {value:.6g}")
    print("noise: " + ", ".join(f"{k} {v}" for k, v in result["noise"].items()))
    rmse = result["rmse"]
    print("RMSE per run (nats, noise-free model against recorded val_loss):")
    for name, value in rmse["per_run"].items():
        print(f"  {name:28s} {value:.4f}")
    for kind, row in rmse["by_kind"].items():
        print(f"  {kind}: {row['runs']} runs, median {row['median']}, max {row['max']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fit the learning-curve surrogate to recorded curves.")
    parser.add_argument("--fit", choices=sorted(TASKS), required=True, metavar="TASK")
    parser.add_argument("--iterations", type=int, default=400, help="Adam steps per stage")
    parser.add_argument("--stages", type=int, default=2, choices=(1, 2, 3), help="see fit()")
    args = parser.parse_args(argv)
    result = fit(args.fit, iterations=args.iterations, stages=args.stages)
    _report(result)
    path = fit_path(args.fit)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
