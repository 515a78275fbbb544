"""The real trainer on real DeepSpeed (CPU, gloo), run as a subprocess like the runtimes run it."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time

import pytest

from tests.support.trainerkit import EXAMPLES, write_config
from trainpilot.api.trial import Hyperparameters
from trainpilot_trainer.data import build_dataset
from trainpilot_trainer.schedule import Schedule

pytestmark = pytest.mark.slow

# Stated margin: the tiny example run ends within 0.15 nats of the entropy rate (it typically
# lands within 0.01; an untrained model sits about 1.5 nats above).
FLOOR_MARGIN = 0.15


def _example(name: str, tmp_path, **changes):
    config = json.loads((EXAMPLES / name).read_text())
    config.update(checkpoint_dir=str(tmp_path / "checkpoints"), **changes)
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path, config


def _lines(stdout: str, prefix: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(prefix)]


def test_example_run_reaches_the_loss_floor_and_exports_metrics(tmp_path, start_trainer):
    # Linger long enough to scrape the final values; a signal during the linger ends it early.
    path, config = _example("trial-cpu.json", tmp_path, metrics_linger_seconds=30)
    max_steps = config["hyperparameters"]["max_steps"]
    trainer = start_trainer(path)
    # While running: the floor is known from the start, val_loss is NaN until the first eval.
    early = trainer.wait_for_metrics(lambda m: "trainpilot_step" in m)
    assert early["trainpilot_max_steps"] == max_steps
    assert early["trainpilot_step"] >= config["hyperparameters"]["eval_interval"] or math.isnan(
        early["trainpilot_val_loss"]
    )
    assert early["trainpilot_checkpoint_step"] == -1 or early["trainpilot_step"] >= 100
    eval_interval = config["hyperparameters"]["eval_interval"]
    assert early["trainpilot_eval_step"] == -1 or early["trainpilot_eval_step"] % eval_interval == 0
    final = trainer.wait_for_metrics(
        lambda m: m["trainpilot_step"] == max_steps and m["trainpilot_checkpoint_step"] == max_steps
    )
    trainer.signal(signal.SIGTERM)
    finished = trainer.wait(timeout=30)

    assert finished.returncode == 0, trainer.output()
    floor = final["trainpilot_loss_floor"]
    assert final["trainpilot_val_loss"] <= floor + FLOOR_MARGIN
    assert final["trainpilot_nonfinite_loss_total"] == 0 and final["trainpilot_eval_step"] == max_steps
    assert final["trainpilot_step_seconds_count"] == max_steps
    assert final["trainpilot_tokens_per_second"] > 0 and final["trainpilot_grad_norm"] > 0
    hp = Hyperparameters.model_validate(config["hyperparameters"])
    assert final["trainpilot_learning_rate"] == pytest.approx(Schedule.from_hyperparameters(hp).lr(max_steps - 1))
    result = finished.result
    assert result["exit_reason"] == "completed" and result["step"] == result["eval_step"] == max_steps
    assert result["val_loss"] == pytest.approx(final["trainpilot_val_loss"]) and result["loss_floor"] == pytest.approx(
        floor
    )
    # The data it was scored on, as the operator reads it: the dataset's own fingerprint, exactly.
    dataset = build_dataset(hp)
    assert (
        final["trainpilot_validation_fingerprint"] == result["validation_fingerprint"] == dataset.validation_fingerprint
    )
    assert final["trainpilot_validation_tokens"] == hp.eval_windows * hp.block_size
    # The loss fell: the first evaluation is well above the last.
    evals = [float(line.split("val_loss ")[1].split()[0]) for line in _lines(finished.stdout, "eval step")]
    assert evals[0] > evals[-1] + 0.05
    # Checkpoints every checkpoint_interval steps, `latest` naming the newest.
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step{max_steps}"
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step100", "step200", "step300"]


def test_a_trial_keeps_only_its_newest_checkpoint_tags(tmp_path, start_trainer):
    path, config = _example("trial-cpu.json", tmp_path, keep_checkpoint_tags=2, metrics_linger_seconds=0)
    config["hyperparameters"].update(max_steps=60, eval_interval=1000, checkpoint_interval=10)
    path.write_text(json.dumps(config))
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step90").mkdir(parents=True)  # left by an earlier run cut short: never resumable
    finished = start_trainer(path).wait(timeout=120)
    assert finished.returncode == 0, finished.stdout
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step50", "step60"]
    assert (checkpoints / "latest").read_text() == "step60"
    removed = [
        line.rsplit(": ", 1)[1] for line in _lines(finished.stdout, "checkpoint tags removed (keep_checkpoint_tags 2)")
    ]
    assert removed == ["step90", "step10", "step20", "step30", "step40"]  # each as soon as it was the third


@pytest.mark.parametrize("fail_fast", [True, False])
def test_diverging_lr_counts_nonfinite_losses(tmp_path, start_trainer, fail_fast):
    changes = {"metrics_linger_seconds": 30}
    path, config = _example("trial-diverge.json", tmp_path, **changes)
    assert config["hyperparameters"]["lr"] == 10.0
    config["hyperparameters"].update(fail_fast=fail_fast, max_steps=40, checkpoint_interval=1)
    path.write_text(json.dumps(config))
    trainer = start_trainer(path)
    if fail_fast:
        final = trainer.wait_for_metrics(lambda m: m["trainpilot_nonfinite_loss_total"] >= 1)
    else:
        final = trainer.wait_for_metrics(lambda m: m["trainpilot_step"] == 40)
    trainer.signal(signal.SIGTERM)  # ends the linger
    finished = trainer.wait(timeout=30)
    checkpoints = tmp_path / "checkpoints"
    result = finished.result
    bad = result["first_bad_step"]
    assert bad is not None and 1 < bad < 20, trainer.output()
    # A checkpoint every step until the first bad loss, none from it on (SIGTERM included).
    assert sorted(int(p.name[4:]) for p in checkpoints.glob("step*")) == list(range(1, bad))
    assert (checkpoints / "latest").read_text() == f"step{bad - 1}"
    assert result["checkpoint_step"] == final["trainpilot_checkpoint_step"] == bad - 1
    if fail_fast:
        assert finished.returncode == 3, trainer.output()
        assert result["exit_reason"] == "diverged" and result["step"] == bad
        assert final["trainpilot_nonfinite_loss_total"] == 1
    else:
        assert finished.returncode == 0, trainer.output()
        assert final["trainpilot_nonfinite_loss_total"] > 1  # counted every time, kept going
        assert f"step {bad}: loss" in finished.stdout and "no checkpoint is saved from now on" in finished.stdout


def test_no_checkpoint_after_a_loss_spike(tmp_path, start_trainer):
    """The spike rule (smoothed loss above loss_spike_factor x the best) on a real run: with
    smoothing 1 the smoothed loss is the step's loss, and a factor of 1.01 fires at the first step
    whose loss is 1% above the lowest so far, long before the run ends."""
    checkpoints = tmp_path / "checkpoints"
    path = write_config(
        tmp_path / "trial.json",
        {"lr": 0.01, "max_steps": 60, "eval_interval": 1000, "checkpoint_interval": 1},
        checkpoint_dir=str(checkpoints),
        loss_spike_factor=1.01,
        loss_spike_smoothing=1.0,
        log_interval=1,
    )
    finished = start_trainer(path).wait(timeout=180)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    bad = finished.result["first_bad_step"]
    progress = [line for line in _lines(finished.stdout, "step ") if "| loss " in line]
    losses = [float(line.split("| loss ")[1].split()[0]) for line in progress]
    assert len(losses) == 60
    ratios = [loss / min(losses[: index + 1]) for index, loss in enumerate(losses)]  # losses[i] is step i + 1
    assert bad is not None and 1 < bad < 60
    assert ratios[bad - 1] > 1.01 - 1e-3 and max(ratios[: bad - 1]) <= 1.01 + 1e-3  # printed to 4 decimals
    assert f"step {bad}: loss spike" in finished.stdout
    # every step the rule holds is counted (the policy stops a trial at the first scrape that sees it)
    spikes = sum(ratio > 1.01 + 1e-3 for ratio in ratios)
    assert spikes >= 1 and finished.result["loss_spikes_total"] >= spikes
    assert sorted(int(p.name[4:]) for p in checkpoints.glob("step*")) == list(range(1, bad))
    assert finished.result["checkpoint_step"] == bad - 1 and finished.result["checkpoint_tag"] == f"step{bad - 1}"


def test_sigterm_checkpoints_and_a_resume_continues_with_new_hyperparameters(tmp_path, start_trainer):
    checkpoints = tmp_path / "checkpoints"
    first = write_config(
        tmp_path / "first.json", {"max_steps": 100_000, "eval_interval": 100_000}, checkpoint_dir=str(checkpoints)
    )
    trainer = start_trainer(first)
    trainer.wait_for_metrics(lambda m: m["trainpilot_step"] >= 30)
    trainer.signal(signal.SIGTERM)
    stopped = trainer.wait(timeout=30)  # well within Kubernetes' default 30 s grace period
    assert stopped.returncode == 4, trainer.output()
    step = stopped.result["step"]
    assert stopped.result["exit_reason"] == "terminated" and stopped.result["checkpoint_step"] == step >= 30
    assert (checkpoints / "latest").read_text().strip() == f"step{step}"

    # Resume with a changed lr and schedule: the new values apply from the loaded step on.
    changed = {"max_steps": step + 20, "lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 0, "eval_interval": 10}
    second = write_config(
        tmp_path / "second.json",
        changed,
        resume_from=str(checkpoints),
        checkpoint_dir=str(checkpoints),
        metrics_linger_seconds=30,
    )
    resumed = start_trainer(second)
    final = resumed.wait_for_metrics(
        lambda m: m["trainpilot_step"] == step + 20 and not math.isnan(m["trainpilot_val_loss"])
    )
    resumed.signal(signal.SIGTERM)
    finished = resumed.wait(timeout=30)
    assert finished.returncode == 0, resumed.output()
    assert f"resumed from {checkpoints}/step{step} at step {step}" in finished.stdout
    assert final["trainpilot_learning_rate"] == pytest.approx(3e-3)
    assert finished.result["step"] == step + 20
    assert finished.result["tokens"] == (step + 20) * 8 * 32  # the data position came back too


def test_sigterm_at_checkpoint_interval_0_saves_and_a_child_resumes_exactly_that_tag(tmp_path, start_trainer):
    """The restart hand-off: the parent saves on SIGTERM although checkpoint_interval is 0 and
    reports the tag; the child resumes that tag (not whatever `latest` names) at the parent's step."""
    parent_dir = tmp_path / "parent"
    parent = start_trainer(
        write_config(
            tmp_path / "parent.json",
            {"max_steps": 100_000, "eval_interval": 100_000, "checkpoint_interval": 0},
            checkpoint_dir=str(parent_dir),
        )
    )
    parent.wait_for_metrics(lambda m: m["trainpilot_step"] >= 30)
    parent.signal(signal.SIGTERM)
    stopped = parent.wait(timeout=30)
    assert stopped.returncode == 4, parent.output()
    step, tag = stopped.result["step"], stopped.result["checkpoint_tag"]
    assert stopped.result["checkpoint_step"] == step >= 30 and tag == f"step{step}"
    assert sorted(p.name for p in parent_dir.glob("step*")) == [tag]
    assert json.loads((parent_dir / tag / "trainpilot-complete.json").read_text())["step"] == step
    (parent_dir / "latest").write_text("step1")  # whatever `latest` says, the child takes the tag it is given

    child_dir = tmp_path / "child"
    child_config = write_config(
        tmp_path / "child.json",
        {"max_steps": step + 10, "eval_interval": 100_000},
        checkpoint_dir=str(child_dir),
        resume_from=str(parent_dir),
        resume_tag=tag,
        trial="child",
    )
    finished = start_trainer(child_config).wait(timeout=180)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"resumed from {parent_dir}/{tag} at step {step}" in finished.stdout
    assert finished.result["step"] == step + 10 and finished.result["tokens"] == (step + 10) * 8 * 32

    # A tag whose save never completed (no marker: killed mid-save) is refused before DeepSpeed starts.
    torn = parent_dir / "step9999"
    shutil.copytree(parent_dir / tag, torn)
    (torn / "trainpilot-complete.json").unlink()
    torn_config = write_config(
        tmp_path / "torn.json", {"max_steps": 100_000}, resume_from=str(parent_dir), resume_tag="step9999"
    )
    refused = start_trainer(torn_config).wait(timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "resume_tag: " in refused.stderr and "has no trainpilot-complete.json" in refused.stderr
    assert refused.result["exit_reason"] == "invalid-config"


def _catches_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        caught = next(line for line in status if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def test_sigterm_during_start_up_is_a_clean_stop(tmp_path, start_trainer):
    """SIGTERM as soon as the trainer catches it, while it still imports torch and DeepSpeed:
    exit 4 with the result line and the termination message, no traceback, DeepSpeed never started."""
    termination = tmp_path / "termination-log"
    trainer = start_trainer(
        write_config(tmp_path / "trial.json", {"max_steps": 100_000}, checkpoint_dir=str(tmp_path / "ckpt")),
        TRAINPILOT_TERMINATION_LOG=str(termination),
    )
    pid = trainer.process.pid
    deadline = time.monotonic() + 30
    while not _catches_sigterm(pid) and time.monotonic() < deadline:
        time.sleep(0.002)
    with open(f"/proc/{pid}/maps") as maps:
        assert "libtorch" not in maps.read()  # the handler came before torch
    trainer.signal(signal.SIGTERM)
    finished = trainer.wait(timeout=60)
    assert finished.returncode == 4, trainer.output()
    assert "Traceback" not in finished.stderr
    assert "stopped by SIGTERM" in finished.stderr
    assert finished.result["exit_reason"] == "terminated"
    assert "model:" not in finished.stdout  # stopped before DeepSpeed built the model
    assert json.loads(termination.read_text())["exit_reason"] == "terminated"
    assert not (tmp_path / "ckpt").exists()  # nothing trained, nothing saved


def test_evaluates_at_the_requested_rung_steps(tmp_path, start_trainer):
    path = write_config(
        tmp_path / "trial.json", {"max_steps": 20, "eval_interval": 10, "eval_windows": 16}, eval_at_steps=[7, 13]
    )
    finished = start_trainer(path).wait(timeout=180)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert [int(line.split()[2]) for line in _lines(finished.stdout, "eval step")] == [7, 10, 13, 20]
    assert sorted(finished.result["eval_at"]) == ["13", "7"] and all(finished.result["eval_at"].values())
    # The last rung's evaluation stays on its own gauges (and in the summary) past later evaluations.
    assert finished.result["rung_step"] == 13 and finished.result["rung_val_loss"] == finished.result["eval_at"]["13"]
    assert finished.result["eval_step"] == 20


def test_torchrun_trial_that_diverges_says_so_in_its_termination_message(tmp_path, start_trainer):
    """torchrun exits 1 when its workers exit 3; the pod's termination message, which both ranks
    write, still says diverged."""
    termination = tmp_path / "termination-log"
    path, config = _example("trial-diverge.json", tmp_path)
    diverging = start_trainer(path, nproc=2, TRAINPILOT_TERMINATION_LOG=str(termination))
    finished = diverging.wait(timeout=180)
    assert finished.returncode == 1, diverging.output()  # torchrun's own status
    assert finished.result["exit_reason"] == "diverged"
    message = json.loads(termination.read_text())
    assert (message["exit_reason"], message["exit_code"]) == ("diverged", 3)
    assert message["trainpilot_nonfinite_loss_total"] == 1 and message["trainpilot_step"] == finished.result["step"]


COMPILERS = ("c++", "g++", "gcc", "cc", "clang", "clang++", "ninja", "nvcc")


def test_a_two_process_cpu_trial_starts_with_no_compiler_and_builds_nothing(tmp_path, start_trainer):
    """The trainer image has no C++ compiler (a CUDA runtime base): nothing on the trainer's start
    path may need one. Every compiler on PATH is a tripwire that records being run, and DeepSpeed's
    JIT build folder must stay empty."""
    tripwires, calls, extensions = tmp_path / "bin", tmp_path / "compiler-calls", tmp_path / "torch-extensions"
    tripwires.mkdir()
    for name in COMPILERS:
        tool = tripwires / name
        tool.write_text(f'#!/bin/sh\necho {name} "$@" >> {calls}\nexit 1\n')
        tool.chmod(0o755)
    path = write_config(
        tmp_path / "config.json", {"max_steps": 20, "eval_interval": 10}, checkpoint_dir=str(tmp_path / "ck")
    )
    pair = start_trainer(path, nproc=2, PATH=f"{tripwires}:/usr/bin:/bin", TORCH_EXTENSIONS_DIR=str(extensions))
    finished = pair.wait(timeout=180)
    assert finished.returncode == 0, pair.output()
    assert finished.result["exit_reason"] == "completed" and finished.result["step"] == 20
    assert not calls.exists(), calls.read_text()
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(extensions.rglob("*"))


def test_control_file_changes_lr_and_weight_decay_without_restart(tmp_path, start_trainer):
    control = tmp_path / "control.json"
    path = write_config(
        tmp_path / "trial.json",
        {
            "max_steps": 100_000,
            "eval_interval": 100_000,
            "lr": 1e-3,
            "min_lr": 1e-3,
            "warmup_steps": 5,
            "weight_decay": 0.0,
        },
    )
    # Through the environment, as the local runtime and the pod spec pass it.
    trainer = start_trainer(path, TRAINPILOT_CONTROL_FILE=str(control))
    before = trainer.wait_for_metrics(lambda m: m["trainpilot_step"] >= 10)
    assert before["trainpilot_learning_rate"] == pytest.approx(1e-3) and before["trainpilot_control_generation"] == 0

    def publish(payload) -> None:  # atomic replace, like the runtimes write it
        temporary = tmp_path / "control.tmp"
        temporary.write_text(payload if isinstance(payload, str) else json.dumps(payload))
        os.replace(temporary, control)

    publish({"generation": 1, "lr": 2.5e-3, "weight_decay": 0.05})
    after = trainer.wait_for_metrics(lambda m: m["trainpilot_control_generation"] == 1)
    after = trainer.wait_for_metrics(lambda m: m["trainpilot_step"] > after["trainpilot_step"])  # a step at the new lr
    assert after["trainpilot_learning_rate"] == pytest.approx(2.5e-3)
    assert after["trainpilot_weight_decay"] == pytest.approx(0.05)

    publish("{ half written")  # logged and ignored; training goes on with the last good values
    step = after["trainpilot_step"]
    later = trainer.wait_for_metrics(lambda m: m["trainpilot_step"] > step + 20)
    assert later["trainpilot_control_generation"] == 1 and later["trainpilot_learning_rate"] == pytest.approx(2.5e-3)

    trainer.signal(signal.SIGINT)
    finished = trainer.wait(timeout=30)
    assert finished.returncode == 4  # stopped by a signal (no checkpoint_dir: nothing saved)
    assert "ignoring invalid control file" in finished.stderr
    assert finished.result["control_generation"] == 1 and finished.result["checkpoint_step"] == -1


def test_two_processes_under_torchrun_stop_together_and_resume_across_world_sizes(tmp_path, start_trainer):
    """1 rank -> 2 ranks (stopped by SIGTERM, as a pod is) -> 1 rank, each leg resuming the
    previous one's ZeRO-0 checkpoint."""
    checkpoints = tmp_path / "checkpoints"

    def config(name: str, until: int, resume: bool):
        return write_config(
            tmp_path / f"{name}.json",
            {"max_steps": until, "eval_interval": 10, "checkpoint_interval": 10},
            checkpoint_dir=str(checkpoints),
            resume_from=str(checkpoints) if resume else None,
        )

    alone = start_trainer(config("alone", 20, resume=False)).wait(timeout=180)
    assert alone.returncode == 0, alone.stdout + alone.stderr

    pair = start_trainer(config("pair", 100_000, resume=True), nproc=2)
    pair.wait_for_metrics(lambda m: m["trainpilot_step"] >= 45)  # rank 0 serves the metrics
    pair.signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    stopped = pair.wait(timeout=60)
    assert "saved by 1 rank(s), now 2" in stopped.stdout
    result = stopped.result  # rank 0 alone prints progress and the result line
    step = result["step"]
    # Both ranks agreed on the step to stop at: the checkpoint (a collective save) completed.
    assert result["exit_reason"] == "terminated" and result["checkpoint_step"] == step >= 45, pair.output()
    assert (checkpoints / "latest").read_text().strip() == f"step{step}"
    assert result["tokens"] == 20 * 8 * 32 + (step - 20) * 2 * 8 * 32  # two ranks: twice the tokens per step
    assert math.isfinite(result["val_loss"])

    again = start_trainer(config("alone-again", step + 10, resume=True)).wait(timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "saved by 2 rank(s), now 1" in again.stdout and again.result["step"] == step + 10


def test_bf16_zero2_grad_accum_and_text_data(tmp_path, start_trainer):
    """The other paths in one short run: bf16 on a CPU, ZeRO-2, gradient accumulation, and the
    default text dataset (the standard library's sources), where no loss floor is known."""
    path = write_config(
        tmp_path / "trial.json",
        {
            "dataset": "text",
            "vocab_size": None,
            "precision": "bf16",
            "zero_stage": 2,
            "grad_accum": 2,
            "max_steps": 20,
            "eval_interval": 10,
            "eval_windows": 16,
            "lr": 3e-3,
        },
    )
    finished = start_trainer(path).wait(timeout=180)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    result = finished.result
    assert result["loss_floor"] is None and result["step"] == 20
    assert result["val_loss"] < math.log(256)  # better than uniform over bytes
    assert result["grad_norm"] is not None  # reported by DeepSpeed's ZeRO optimizer
    assert "device cpu bf16" in finished.stdout


def test_a_checkpoint_saved_unpadded_resumes_under_a_padded_config_keeping_its_padding(tmp_path, start_trainer):
    """A checkpoint from before the fast path (or from a CPU run) resumed where the vocabulary would be
    padded: it keeps the padding it was saved with, says so, and loads."""
    checkpoints = tmp_path / "ckpt"
    first = write_config(
        tmp_path / "first.json", {"max_steps": 20, "checkpoint_interval": 20}, checkpoint_dir=str(checkpoints)
    )
    assert start_trainer(first).wait(timeout=120).returncode == 0
    second = write_config(
        tmp_path / "second.json",
        {"max_steps": 30, "pad_vocab_multiple": 64},
        resume_from=str(checkpoints),
    )
    finished = start_trainer(second).wait(timeout=120)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"pad_vocab_multiple: {checkpoints}/step20 was saved with 1; this run keeps that (not 64)" in finished.stdout
    assert f"resumed from {checkpoints}/step20 at step 20" in finished.stdout and finished.result["step"] == 30


def test_a_zero1_checkpoint_resumes_at_another_world_size_through_its_universal_checkpoint(tmp_path, start_trainer):
    """bf16 ZeRO-1 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer, the GPU fast path at
    ZeRO-1), 2 ranks -> 1 rank: the checkpoint holds one optimizer partition per rank, so rank 0
    converts it to DeepSpeed's universal checkpoint first (once: a second resume reuses it)."""
    parent = tmp_path / "parent"
    hp = {"precision": "bf16", "zero_stage": 1, "fp32_grad_accum": True, "eval_interval": 10, "checkpoint_interval": 20}
    pair = write_config(tmp_path / "pair.json", {**hp, "max_steps": 20}, checkpoint_dir=str(parent))
    saved = start_trainer(pair, nproc=2).wait(timeout=180)
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert len(list((parent / "step20").glob("*zero_pp_rank_*_optim_states.pt"))) == 2

    for child in ("child", "second-child"):
        alone = write_config(
            tmp_path / f"{child}.json",
            {**hp, "max_steps": 30},
            resume_from=str(parent),
            checkpoint_dir=str(tmp_path / child),
        )
        finished = start_trainer(alone).wait(timeout=180)
        assert finished.returncode == 0, finished.stdout + finished.stderr
        assert (
            f"resumed from {parent}/step20 at step 20 (saved by 2 rank(s), now 1, through its universal checkpoint)"
            in (finished.stdout)
        )
        converted = f"converted {parent}/step20 to a universal checkpoint" in finished.stdout
        assert converted == (child == "child")  # the second reuses the first's conversion
        assert finished.result["step"] == 30 and math.isfinite(finished.result["val_loss"])
        assert finished.result["tokens"] == 20 * 2 * 8 * 32 + 10 * 8 * 32
