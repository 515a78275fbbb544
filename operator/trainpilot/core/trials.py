"""From an experiment's template and a trial's searched values to the trainer's config."""

from __future__ import annotations

from trainpilot.api.experiment import AgentExperimentSpec, TrialStatus
from trainpilot.api.trial import Hyperparameters, TrialConfig, tunable_hyperparameters


def trial_hyperparameters(spec: AgentExperimentSpec, trial: TrialStatus) -> Hyperparameters:
    """Template values overlaid with the trial's searched values (integers stay integers)."""
    kinds = tunable_hyperparameters()
    searched = {
        name: int(round(value)) if kinds.get(name) is int else value for name, value in trial.hyperparameters.items()
    }
    return Hyperparameters.model_validate({**spec.trial_template.hyperparameters, **searched})


def build_trial_config(
    experiment: str,
    spec: AgentExperimentSpec,
    trial: TrialStatus,
    checkpoint_dir: str | None,
    resume_from: str | None,
    control_file: str | None = None,
) -> TrialConfig:
    return TrialConfig(
        experiment=experiment,
        trial=trial.name,
        hyperparameters=trial_hyperparameters(spec, trial),
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
        control_file=control_file,
    )
