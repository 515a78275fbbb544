"""Reading AgentExperiment manifests from files, with errors a person can act on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperiment, AgentExperimentSpec, check_experiment_name
from trainpilot.api.trial import describe_validation_error


class ManifestError(ValueError):
    """The file is not a usable AgentExperiment; the message says where and how to fix it."""


def load_experiment(path: str | Path) -> AgentExperiment:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ManifestError(f"{path}: cannot read it ({error.strerror or error})") from None
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ManifestError(f"{path}{where}: not valid YAML: {problem}") from None
    experiments = [doc for doc in documents if isinstance(doc, dict) and doc.get("kind") == contract.EXPERIMENT_KIND]
    if len(experiments) != 1:
        kinds = [doc.get("kind") if isinstance(doc, dict) else type(doc).__name__ for doc in documents]
        found = ", ".join(f"kind: {kind}" for kind in kinds) if kinds else "no document at all"
        raise ManifestError(
            f"{path}: expected exactly one document with kind: {contract.EXPERIMENT_KIND}, "
            f"found {len(experiments)} ({found})"
        )
    raw = experiments[0]
    if raw.get("apiVersion") != contract.API_VERSION:
        raise ManifestError(f"{path}: apiVersion must be {contract.API_VERSION} (got {raw.get('apiVersion')!r})")
    if not isinstance(raw.get("spec"), dict):
        raise ManifestError(f"{path}: spec is missing or not a mapping")
    try:
        experiment = AgentExperiment.model_validate(raw)
        check_experiment_name(experiment.name)
    except ValidationError as error:
        raise ManifestError(f"{path}: {describe_validation_error(error)}") from None
    except ValueError as error:
        raise ManifestError(f"{path}: {error}") from None
    return experiment


def builtin_trainer_objectives() -> list[str]:
    """The objectives the built-in trainer can serve: its metrics, as `spec.objective.metric` names them."""
    return sorted(metric.removeprefix(contract.objective_metric("")) for metric in contract.TRAINER_METRICS)


def objective_warning(spec: AgentExperimentSpec) -> str | None:
    """A warning when the built-in trainer never exports the objective: every trial would run blind."""
    metric = spec.objective.metric
    if not spec.trial_template.runs_builtin_trainer or metric in builtin_trainer_objectives():
        return None
    return (
        f"spec.objective.metric {metric!r}: the built-in trainer (trialTemplate.command) exports no "
        f"{contract.objective_metric(metric)}, so no trial would ever report it; it exports "
        + ", ".join(builtin_trainer_objectives())
        + ". Pick one of those, or use a trainer of your own that exports it"
    )


def main_validate(args: argparse.Namespace) -> int:
    try:
        experiment = load_experiment(args.experiment)
    except ManifestError as error:
        print(f"invalid: {error}", file=sys.stderr)
        return 2
    spec = experiment.spec
    print(
        f"valid: {experiment.name}: {len(spec.search_space)} searched hyperparameters, "
        f"up to {spec.budget.max_trials} trials ({spec.budget.parallel_trials} at a time), policy {spec.policy.type}"
    )
    warning = objective_warning(spec)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
