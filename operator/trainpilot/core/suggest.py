"""Where to try next: the spec's initial trials, then Optuna's TPE over everything tried so far.

The suggester keeps no state of its own. Each cycle it rebuilds an in-memory Optuna study from
status (every trial is told to it again), so an operator restart loses nothing and the same
status with the same seed always yields the same suggestions.
"""

from __future__ import annotations

import math
from typing import Any

from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, SearchParameter, TrialStatus
from trainpilot.core.state import is_diverged, is_scored

SAMPLER = "TPESampler"
TOP_CONFIGS = 5


class Suggester:
    def __init__(self, spec: AgentExperimentSpec, status: AgentExperimentStatus, seed: int | None = None) -> None:
        self.spec = spec
        self.status = status
        self.seed = spec.policy.heuristic.seed if seed is None else seed

    @property
    def initial_remaining(self) -> list[dict[str, float]]:
        """spec.initialTrials not yet used: the i-th is used once i+1 fresh (parentless) trials exist."""
        fresh = sum(trial.parent is None for trial in self.status.trials)
        return list(self.spec.initial_trials[fresh:])

    def suggest(self, count: int) -> list[dict[str, float]]:
        if count <= 0:
            return []
        optuna = _optuna()
        distributions = {parameter.name: distribution(parameter) for parameter in self.spec.search_space}
        sampler = optuna.samplers.TPESampler(
            # The same seed over a history that now includes the last suggestion would propose it
            # again; offsetting by the number of trials keeps runs deterministic yet moving.
            seed=self.seed + len(self.status.trials),
            n_startup_trials=self.spec.policy.heuristic.startup_trials,
            # Running trials count as bad while they run, so a batch (and the next cycle's
            # suggestion) moves away from points already being tried. Optuna's default is off.
            constant_liar=True,
        )
        study = optuna.create_study(direction=self.spec.objective.direction, sampler=sampler)
        worst = self._worst_scored()
        for trial in self.status.trials:
            told = self._told(optuna, trial, distributions, worst)
            if told is not None:
                study.add_trial(told)
        for initial in self.initial_remaining[:count]:
            # Dimensions an initial trial leaves out are sampled like any other suggestion.
            study.enqueue_trial(self._params(initial))
        # Asked trials stay RUNNING in the study, so the constant liar spreads a batch out too.
        return [self._plain(study.ask(distributions).params) for _ in range(count)]

    def state_summary(self) -> dict[str, Any]:
        """The optimiser's view for an LLM policy: counts, the best, the top configurations."""
        scored = [trial for trial in self.status.trials if trial.finished and is_scored(trial)]
        scored.sort(key=lambda trial: trial.best_objective, reverse=self.spec.objective.direction == "maximize")  # type: ignore[arg-type,return-value]
        top = [
            {"trial": trial.name, "value": trial.best_objective, "params": dict(trial.hyperparameters)}
            for trial in scored[:TOP_CONFIGS]
        ]
        return {
            "sampler": SAMPLER,
            "seed": self.seed,
            "startup_trials": self.spec.policy.heuristic.startup_trials,
            "direction": self.spec.objective.direction,
            "metric": self.spec.objective.metric,
            "trials": len(self.status.trials),
            "complete": len(scored),
            "failed": sum(trial.state in ("Failed", "Diverged") or is_diverged(trial) for trial in self.status.trials),
            "running": sum(not trial.finished for trial in self.status.trials),
            "initial_remaining": len(self.initial_remaining),
            "best": top[0] if top else None,
            "top": top,
        }

    # ----------------------------------------------------------------------------------------

    def _worst_scored(self) -> float | None:
        """What a diverged trial is told as (spec.policy.heuristic.divergedToldAs worst); None: FAIL."""
        if self.spec.policy.heuristic.diverged_told_as != "worst":
            return None
        values = [trial.best_objective for trial in self.status.trials if is_scored(trial)]
        if not values:
            return None  # nothing scored yet to compare with; told as worst once something is
        return max(values) if self.spec.objective.direction == "minimize" else min(values)  # type: ignore[type-var]

    def _told(self, optuna: Any, trial: TrialStatus, distributions: dict[str, Any], worst: float | None) -> Any:
        """A finished or running trial as Optuna sees it; None when it no longer fits the space.

        A diverged trial is a bad outcome, not a missing one: TPE skips FAIL trials, so told as FAIL
        it would keep proposing the region that diverged."""
        if any(
            not self._fits(parameter, trial.hyperparameters.get(parameter.name)) for parameter in self.spec.search_space
        ):
            return None  # the space changed since it ran
        params = self._params(trial.hyperparameters)
        state = optuna.trial.TrialState
        if not trial.finished:
            return optuna.trial.create_trial(state=state.RUNNING, params=params, distributions=distributions)
        if is_diverged(trial) and worst is not None:
            return optuna.trial.create_trial(params=params, distributions=distributions, value=worst)
        if not is_scored(trial):
            return optuna.trial.create_trial(state=state.FAIL, params=params, distributions=distributions)
        return optuna.trial.create_trial(params=params, distributions=distributions, value=trial.best_objective)

    @staticmethod
    def _fits(parameter: SearchParameter, value: float | None) -> bool:
        return value is not None and parameter.contains(value)

    def _params(self, values: dict[str, float]) -> dict[str, Any]:
        """Values in the form Optuna's distributions hold: a listed choice exactly, integers as int."""
        params: dict[str, Any] = {}
        for parameter in self.spec.search_space:
            if parameter.name not in values:
                continue
            value = values[parameter.name]
            if parameter.values is not None:
                value = parameter.clamp(value)
            params[parameter.name] = int(round(value)) if parameter.is_integer else float(value)
        return params

    def _plain(self, params: dict[str, Any]) -> dict[str, float]:
        plain: dict[str, float] = {}
        for parameter in self.spec.search_space:
            value = params[parameter.name]
            plain[parameter.name] = int(round(value)) if parameter.is_integer else float(value)
        return plain


def distribution(parameter: SearchParameter) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if parameter.values is not None:
        choices = [int(round(v)) if parameter.is_integer else float(v) for v in parameter.values]
        return CategoricalDistribution(choices=tuple(dict.fromkeys(choices)))
    assert parameter.min is not None and parameter.max is not None
    if parameter.is_integer:
        return IntDistribution(low=math.ceil(parameter.min), high=math.floor(parameter.max), log=parameter.log)
    return FloatDistribution(low=parameter.min, high=parameter.max, log=parameter.log)


def _optuna() -> Any:
    # Imported on first use: the core's other users (the trainer, CRD generation) never need it.
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna
