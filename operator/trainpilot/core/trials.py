"""From an experiment's template and a trial's searched values to the trainer's config."""

from __future__ import annotations

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentSpec, TrialStatus
from trainpilot.api.trial import Hyperparameters, TrialConfig, tunable_hyperparameters
from trainpilot.core.state import rung_step


def trial_hyperparameters(spec: AgentExperimentSpec, trial: TrialStatus) -> Hyperparameters:
    """Template values overlaid with the trial's searched values (integers stay integers)."""
    kinds = tunable_hyperparameters()
    searched = {
        name: int(round(value)) if kinds.get(name) is int else value for name, value in trial.hyperparameters.items()
    }
    return Hyperparameters.model_validate({**spec.trial_template.hyperparameters, **searched})


def rung_steps(spec: AgentExperimentSpec, trial: TrialStatus, max_steps: int) -> list[int]:
    """The steps of the ASHA rungs for a trial that runs `max_steps`, computed as the operator
    computes them once the trainer reports that max_steps (core.state.rung_step), so the
    trainer evaluates at exactly the steps the rungs compare."""
    reported = trial.model_copy(update={"max_steps": max_steps})
    return sorted({rung_step(spec, reported, fraction) for fraction in spec.policy.heuristic.rungs})


def build_trial_config(
    experiment: str,
    spec: AgentExperimentSpec,
    trial: TrialStatus,
    checkpoint_dir: str | None,
    resume_from: str | None,
    control_file: str | None = None,
    resume_step: int | None = None,
) -> TrialConfig:
    """`resume_step`: the checkpoint step the source trial reported last (its
    trainpilot_checkpoint_step); the child resumes exactly that tag of `resume_from`, not
    whatever `latest` names there. None: the tag `latest` names."""
    if resume_step is not None and resume_from is None:
        raise ValueError("resume_step needs resume_from: the checkpoint directory the step was saved in")
    hyperparameters = trial_hyperparameters(spec, trial)
    heuristic = spec.policy.heuristic
    return TrialConfig(
        experiment=experiment,
        trial=trial.name,
        hyperparameters=hyperparameters,
        checkpoint_dir=checkpoint_dir,
        keep_checkpoint_tags=spec.retention.checkpoint_tags,
        resume_from=resume_from,
        resume_tag=None if resume_step is None else contract.checkpoint_tag(resume_step),
        control_file=control_file,
        eval_at_steps=rung_steps(spec, trial, hyperparameters.max_steps),
        # The trainer stops checkpointing at the first spike by the policy's own rule, so a trial
        # the policy terminates for a spike never leaves a checkpoint of the spiking state.
        loss_spike_factor=heuristic.spike_factor,
        loss_spike_smoothing=heuristic.smoothing,
    )
