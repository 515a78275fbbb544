"""Baseline policies for the policy benchmark (issue 14): the searches people run today.

Each is a `trainpilot.core.policy.base.Policy` (a `name` and `async decide(context)`), built as
`BASELINES[name](seed)`, and follows one published reference, named in its docstring:

    random            random search (Bergstra & Bengio 2012)
    grid              grid search, laid out as Katib's grid suggestion does
    median-stopping   Katib's medianstop (the median stopping rule of Google Vizier, Golovin et al. 2017)
    asha              ASHA (Li et al. 2020), the stopping variant of Ray Tune's ASHAScheduler
    pbt               PBT (Jaderberg et al. 2017), exploit/explore as Ray Tune's PopulationBasedTraining
    tpe               Optuna's TPESampler alone
    cmaes             Optuna's CmaEsSampler alone

What they share, so no rule is written twice:
- `sample_point`: one seeded random draw of the search space (log-uniform for log ranges,
  uniform integers, a uniform choice from a values list); random search, median stopping, ASHA
  and PBT's first population all sample with it.
- `_Cycle`: one cycle's proposals, with the checks the built-in heuristic makes before proposing
  (allowed actions, held or rejected sign-offs), `guardrails.launch_capacity` for free slots,
  and one way to finish, the heuristic's: `goal-reached` as soon as spec.objective.goal is
  reached; `budget-spent` once none is running and maxTrials are all launched or
  spec.budget.maxTrialSteps no longer pays for a fresh trial (the guardrails price launches
  ahead, so it is never overrun); `budget-spent` at once when maxGPUHours is used up (running
  trials would keep spending it); `too-many-failures` (failed) past maxFailedTrials. The
  outcome is "succeeded" when some trial was scored, else "failed".
- `Curves`: every evaluation a policy has seen, per trial. Status keeps only the last
  MAX_TRIAL_HISTORY points of a trial, so the rules that need whole curves (median stopping,
  ASHA) remember them in the policy object. Bench only: a policy of the operator keeps no memory.
- `_OptunaSearch`: a study the policy keeps for the whole experiment, asked for each launch and
  told each finished trial as Optuna users tell it: its best objective when scored (is_scored),
  FAIL when it crashed or diverged (core/suggest.py with divergedToldAs fail; telling a diverged
  trial as the worst objective is the heuristic's own improvement, not the baselines').
  It persists, not rebuilt every cycle as core/suggest.py does, because CMA-ES keeps its state
  (mean, step size, generation) in the system attributes of the trials it sampled.

None of them stops a diverging trial on its own: none of their references does, so what the
trainer does (it exits Diverged on a non-finite loss) decides, as it would for a user running
these searches. Terminate reasons are kebab-case (median-stop, asha-rung, pbt-exploit) and
every rationale quotes the numbers behind it.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, SearchParameter, TrialStatus
from trainpilot.api.trial import Hyperparameters
from trainpilot.core import guardrails
from trainpilot.core.decision import Decision
from trainpilot.core.policy.base import Policy, PolicyContext, may_propose
from trainpilot.core.state import COMPLETE_REASON, comparable, is_scored, max_steps, reference_fingerprint
from trainpilot.core.suggest import distribution

# Salts of the seeded random streams, so that no two uses of one seed draw the same numbers.
_SAMPLE, _PBT = 0, 1


# --------------------------------------------------------------------------------------------
# Sampling the search space
# --------------------------------------------------------------------------------------------


def rng_for(seed: int, *salt: int) -> np.random.Generator:
    """A random stream fixed by the seed and the salt (say, the index of the trial it is for)."""
    return np.random.default_rng([seed, *salt])


def snap(parameter: SearchParameter, value: float) -> float:
    """The nearest value the parameter allows: clamped into a range, integers rounded, a values
    list's nearest entry. Integers come back as int (a valid float for a Decision)."""
    value = parameter.clamp(value)
    if parameter.is_integer:
        value = int(round(value))
        if parameter.values is None:
            assert parameter.min is not None and parameter.max is not None
            value = min(max(value, math.ceil(parameter.min)), math.floor(parameter.max))
        return value
    return float(value)


def sample_value(parameter: SearchParameter, rng: np.random.Generator) -> float:
    if parameter.values is not None:
        return snap(parameter, parameter.values[int(rng.integers(len(parameter.values)))])
    assert parameter.min is not None and parameter.max is not None
    if parameter.is_integer and not parameter.log:
        return int(rng.integers(math.ceil(parameter.min), math.floor(parameter.max) + 1))
    if parameter.log:
        value = math.exp(rng.uniform(math.log(parameter.min), math.log(parameter.max)))
    else:
        value = rng.uniform(parameter.min, parameter.max)
    return snap(parameter, value)


def sample_point(spec: AgentExperimentSpec, rng: np.random.Generator) -> dict[str, float]:
    """One random point of the whole search space, dimension by dimension in spec order."""
    return {parameter.name: sample_value(parameter, rng) for parameter in spec.search_space}


def random_point(spec: AgentExperimentSpec, seed: int, index: int) -> dict[str, float]:
    """The random point for the trial launched `index`-th: the same on every try of that launch."""
    return sample_point(spec, rng_for(seed, _SAMPLE, index))


def words(point: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}={value:g}" for name, value in point.items()) + "}"


# --------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------

_FRESH = TrialStatus(name="", index=0)  # a trial of the template, not yet started


# --------------------------------------------------------------------------------------------
# One cycle's proposals
# --------------------------------------------------------------------------------------------


class _Cycle:
    """The decisions proposed so far in one cycle, the trials they stop, the launches they make."""

    def __init__(self, policy: str, context: PolicyContext) -> None:
        self.policy = policy
        self.context = context
        self.spec = context.spec
        self.status = context.status
        self.objective = context.spec.objective
        self.metric = context.spec.objective.metric
        self.decisions: list[Decision] = []
        self.stopping: set[str] = set()
        self.launches = 0

    def running(self) -> list[TrialStatus]:
        """Active trials (pending or running) not being stopped in this cycle."""
        return [trial for trial in self.status.active_trials if trial.name not in self.stopping]

    def reward(self, value: float) -> float:
        """Bigger is better, whatever the objective's direction."""
        return value if self.objective.direction == "maximize" else -value

    def capacity(self, releasing: Collection[str] = ()) -> int:
        """Launches still possible in this cycle, counting `releasing` (about to be stopped) as free."""
        freed = self.stopping | set(releasing)
        room = guardrails.launch_capacity(self.spec, self.status, self.context.limits, releasing=freed)
        return max(room - self.launches, 0)

    def slots(self) -> str:
        budget = self.spec.budget
        return (
            f"{len(self.running())} running of parallelTrials {budget.parallel_trials}, "
            f"{self.status.trials_launched + self.launches} of maxTrials {budget.max_trials} launched"
        )

    def best_words(self) -> str:
        best = self.status.best_trial
        return f"best {self.metric} {best.objective:.4g} by {best.name}" if best else "no trial was scored"

    # ---- proposing ------------------------------------------------------------------------

    def may_propose(
        self, action: str, trial: str | None, reason: str, hyperparameters: dict[str, float] | None = None
    ) -> bool:
        """The heuristic's rule, so a baseline floods the ledger no more than it does."""
        return may_propose(self.context, action, trial, reason, hyperparameters)

    def terminate(self, trial: TrialStatus, reason: str, rationale: str) -> bool:
        if trial.name in self.stopping or not self.may_propose("terminate", trial.name, reason):
            return False
        self.stopping.add(trial.name)
        self.decisions.append(
            Decision(action="terminate", policy=self.policy, trial=trial.name, reason=reason, rationale=rationale)
        )
        return True

    def launch(
        self,
        reason: str,
        rationale: str,
        hyperparameters: dict[str, float],
        parent: str | None = None,
        resume_from: str | None = None,
    ) -> bool:
        if not self.may_propose("launch", None, reason, hyperparameters):
            return False
        self.launches += 1
        self.decisions.append(
            Decision(
                action="launch",
                policy=self.policy,
                reason=reason,
                rationale=rationale,
                hyperparameters=hyperparameters,
                parent=parent,
                resume_from=resume_from,
            )
        )
        return True

    def complete(self, reason: str, rationale: str, outcome: str | None = None) -> bool:
        """Stop what still runs and end the experiment; outcome: succeeded when some trial was scored."""
        if not self.may_propose("complete", None, reason):
            return False
        for trial in self.running():
            self.terminate(trial, COMPLETE_REASON, f"the experiment is completing ({reason})")
        outcome = outcome or ("succeeded" if self.status.best_trial is not None else "failed")
        self.decisions.append(
            Decision(action="complete", policy=self.policy, reason=reason, rationale=rationale, outcome=outcome)  # type: ignore[arg-type]
        )
        return True

    # ---- finishing ------------------------------------------------------------------------

    def end_now(self) -> bool:
        """Goal reached, too many crashes or the GPU-hours spent (running trials would go on spending
        them): complete at once, stopping what runs, as the heuristic does."""
        status, budget = self.status, self.spec.budget
        best = status.best_trial
        if best is not None and self.objective.reached(best.objective):
            rationale = f"{best.name} reached {self.metric} {best.objective:.4g} (goal {self.objective.goal:g})"
            return self.complete("goal-reached", rationale, "succeeded")
        if status.trials_failed > budget.max_failed_trials:
            rationale = f"{status.trials_failed} trials crashed (maxFailedTrials {budget.max_failed_trials} tolerated)"
            return self.complete("too-many-failures", rationale, "failed")
        if budget.max_gpu_hours is not None and status.gpu_hours_used >= budget.max_gpu_hours:
            used = f"{status.gpu_hours_used:.3g} GPU-hours used (maxGPUHours {budget.max_gpu_hours:g})"
            rationale = f"{used}; {self.best_words()}"
            return self.complete("budget-spent", rationale)
        return False

    def end_when_idle(self, exhausted: tuple[str, str] | None) -> bool:
        """Nothing runs and nothing more will be launched: every trial of maxTrials is launched,
        maxTrialSteps no longer pays for a fresh trial (the guardrails price a launch ahead, so the
        budget is never overrun and running trials finish), or the policy has nothing left to try
        (`exhausted`: its reason and rationale)."""
        if self.running() or self.launches:
            return False
        status, budget = self.status, self.spec.budget
        if status.trials_launched >= budget.max_trials:
            rationale = (
                f"all {status.trials_launched} trials launched (maxTrials {budget.max_trials}) and none is running; "
                f"{self.best_words()}"
            )
            return self.complete("budget-spent", rationale)
        left = guardrails.trial_steps_left(self.spec, status)
        if left is not None:
            rationale = (
                f"{status.trial_steps_used} trial-steps used (maxTrialSteps {budget.max_trial_steps}): {left} left, "
                f"less than a trial's {guardrails.template_steps(self.spec)}, and none is running; {self.best_words()}"
            )
            return self.complete("budget-spent", rationale)
        if exhausted is not None:
            reason, why = exhausted
            return self.complete(reason, f"{why} and none is running; {self.best_words()}")
        return False


# --------------------------------------------------------------------------------------------
# What every baseline does each cycle
# --------------------------------------------------------------------------------------------


class Curves:
    """Every (step, objective) evaluation seen per trial, gathered from status.history each cycle."""

    def __init__(self) -> None:
        self._points: dict[str, dict[int, float]] = {}

    def update(self, status: AgentExperimentStatus) -> None:
        for trial in status.trials:
            seen = self._points.setdefault(trial.name, {})
            for step, value in trial.history:
                if math.isfinite(value):
                    seen[int(step)] = float(value)

    def points(self, trial: str) -> list[tuple[int, float]]:
        return sorted(self._points.get(trial, {}).items())


class _Baseline:
    """Per cycle: observe, finish if a goal or spend budget says so, apply the stopping rule,
    finish if nothing is left to launch, else fill the free slots."""

    name = "baseline"

    def __init__(self, seed: int = 0) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (got {seed})")
        self.seed = seed

    async def decide(self, context: PolicyContext) -> list[Decision]:
        cycle = _Cycle(self.name, context)
        self.observe(cycle)
        if cycle.end_now():
            return cycle.decisions
        self.stop(cycle)
        if not cycle.end_when_idle(self.exhausted(cycle)):
            count = cycle.capacity()
            if count > 0:
                for point, reason, why in self.points(cycle, count):
                    cycle.launch(reason, f"{why} {words(point)}; {cycle.slots()}", point)
        return cycle.decisions

    def observe(self, cycle: _Cycle) -> None:
        """Take in what status shows (curves, finished trials) before any rule runs."""

    def stop(self, cycle: _Cycle) -> None:
        """The baseline's stopping (or exploit) rule."""

    def exhausted(self, cycle: _Cycle) -> tuple[str, str] | None:
        """(reason, rationale) once the policy itself has nothing more to launch."""
        return None

    def points(self, cycle: _Cycle, count: int) -> list[tuple[dict[str, float], str, str]]:
        """Up to `count` new trials: (values, launch reason, rationale's opening words)."""
        first = cycle.status.trials_launched + cycle.launches
        return [
            (random_point(cycle.spec, self.seed, index), "random-sample", f"random sample (seed {self.seed})")
            for index in range(first, first + count)
        ]


class RandomSearch(_Baseline):
    """Random search (Bergstra & Bengio 2012): independent seeded draws of the search space,
    log-uniform on log ranges, uniform integers, a uniform choice from a values list; every
    trial runs to its end."""

    name = "random"


class GridSearch(_Baseline):
    """Grid search as Katib's grid suggestion lays it out: each range from min to max inclusive
    in evenly spaced points (log-spaced on a log range; one point: the middle), a values list's
    entries, every combination in a fixed order (the last dimension fastest), each trial to its end.

    `points`: points per dimension (capped by a dimension's distinct values); None sizes the grid
    to about the budget's trials: maxTrials, or the full-length trials maxTrialSteps pays for if
    fewer, growing the dimension with the fewest points first while the grid stays within it.
    """

    name = "grid"

    def __init__(self, seed: int = 0, *, points: int | None = None) -> None:
        super().__init__(seed)
        if points is not None and points < 1:
            raise ValueError(f"points must be >= 1 (got {points})")
        self.per_dimension = points

    def grid(self, spec: AgentExperimentSpec) -> list[dict[str, float]]:
        counts = self.counts(spec)
        axes = [grid_axis(parameter, count) for parameter, count in zip(spec.search_space, counts, strict=True)]
        names = [parameter.name for parameter in spec.search_space]
        return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes)]

    def counts(self, spec: AgentExperimentSpec) -> list[int]:
        caps = [distinct_values(parameter) for parameter in spec.search_space]
        if self.per_dimension is not None:
            return [min(self.per_dimension, cap) for cap in caps]
        target = spec.budget.max_trials
        if spec.budget.max_trial_steps is not None:
            target = min(target, max(spec.budget.max_trial_steps // guardrails.template_steps(spec), 1))
        counts = [1] * len(caps)
        while True:
            size = math.prod(counts)
            growable = sorted(
                (count, order)
                for order, (count, cap) in enumerate(zip(counts, caps, strict=True))
                if count < cap and size // count * (count + 1) <= target
            )
            if not growable:
                return counts
            counts[growable[0][1]] += 1

    def exhausted(self, cycle: _Cycle) -> tuple[str, str] | None:
        size = len(self.grid(cycle.spec))
        if cycle.status.trials_launched >= size:
            return "grid-exhausted", f"all {size} grid points launched ({self.shape(cycle.spec)})"
        return None

    def points(self, cycle: _Cycle, count: int) -> list[tuple[dict[str, float], str, str]]:
        grid = self.grid(cycle.spec)
        first = cycle.status.trials_launched + cycle.launches
        return [
            (grid[index], "grid-point", f"grid point {index + 1} of {len(grid)} ({self.shape(cycle.spec)})")
            for index in range(first, min(first + count, len(grid)))
        ]

    def shape(self, spec: AgentExperimentSpec) -> str:
        return " x ".join(
            f"{count} {parameter.name}" for parameter, count in zip(spec.search_space, self.counts(spec), strict=True)
        )


def distinct_values(parameter: SearchParameter) -> int | float:
    if parameter.values is not None:
        return len({snap(parameter, value) for value in parameter.values})
    assert parameter.min is not None and parameter.max is not None
    if parameter.is_integer:
        return max(math.floor(parameter.max) - math.ceil(parameter.min) + 1, 1)
    return math.inf


def grid_axis(parameter: SearchParameter, count: int) -> list[float]:
    """`count` points of one dimension, ascending, without repeats."""
    if parameter.values is not None:
        values = sorted({snap(parameter, value) for value in parameter.values})
        chosen = [(len(values) - 1) // 2] if count == 1 else np.linspace(0, len(values) - 1, count)
        return list(dict.fromkeys(values[int(round(index))] for index in chosen))
    assert parameter.min is not None and parameter.max is not None
    low, high = (math.log(parameter.min), math.log(parameter.max)) if parameter.log else (parameter.min, parameter.max)
    to_value: Callable[[float], float] = math.exp if parameter.log else float
    if count == 1:
        spots = [to_value((low + high) / 2)]
    else:  # the ends exactly, whatever exp(log(x)) rounds to
        spots = [parameter.min, *(to_value(x) for x in np.linspace(low, high, count)[1:-1]), parameter.max]
    return list(dict.fromkeys(snap(parameter, x) for x in spots))


class MedianStopping(_Baseline):
    """Katib's medianstop early stopping (Google Vizier's median stopping rule, Golovin et al.
    2017), with random sampling for new trials: a running trial is stopped at step s, once it has
    reported `start_step` evaluations (Katib's default 4), if its best objective so far is strictly
    worse than the median of the running averages, up to step s, of the objectives of the
    completed (Succeeded) trials, and only once `min_trials_required` (Katib's default 3) of
    those exist."""

    name = "median-stopping"

    def __init__(self, seed: int = 0, *, min_trials_required: int = 3, start_step: int = 4) -> None:
        super().__init__(seed)
        if min_trials_required < 1 or start_step < 1:
            raise ValueError("min_trials_required and start_step must be >= 1")
        self.min_trials_required = min_trials_required
        self.start_step = start_step
        self.curves = Curves()

    def observe(self, cycle: _Cycle) -> None:
        self.curves.update(cycle.status)

    def stop(self, cycle: _Cycle) -> None:
        reference = reference_fingerprint(cycle.status.trials)
        completed = [t for t in cycle.status.trials if t.state == "Succeeded" and comparable(t, reference)]
        for trial in cycle.running():
            points = self.curves.points(trial.name)
            if len(points) < self.start_step or not comparable(trial, reference):
                continue
            step = points[-1][0]
            best = max((value for _, value in points), key=cycle.reward)
            averages = {
                other.name: statistics.fmean(values)
                for other in completed
                if (values := [value for at, value in self.curves.points(other.name) if at <= step])
            }
            if len(averages) < self.min_trials_required:
                continue
            median = statistics.median(averages.values())
            if cycle.objective.better(median, best):
                listed = ", ".join(f"{name} {value:.4g}" for name, value in averages.items())
                cycle.terminate(
                    trial,
                    "median-stop",
                    f"best {cycle.metric} {best:.4g} by step {step} is worse than {median:.4g}, the median of the "
                    f"running averages up to step {step} of the {len(averages)} completed trials ({listed}); "
                    f"startStep {self.start_step} evaluations, minTrialsRequired {self.min_trials_required}",
                )


class ASHA(_Baseline):
    """ASHA (Li et al. 2020, asynchronous successive halving), the stopping variant of Ray Tune's
    ASHAScheduler (one bracket), with random sampling for new trials. Rungs lie at
    grace_period x reduction_factor^k steps below max_t (a trial's max_steps: it ends there
    anyway). A trial is judged at the highest rung its newest evaluation has reached and that it
    is not yet recorded at, against the trials recorded there before it: it stops if its result
    is worse than their (1 - 1/eta) quantile of rewards (np.nanpercentile, as Ray), i.e. not in
    their top 1/eta; then it is recorded there. grace_period None: max_t / eta^2, two rungs."""

    name = "asha"

    def __init__(self, seed: int = 0, *, reduction_factor: float = 3.0, grace_period: float | None = None) -> None:
        super().__init__(seed)
        if reduction_factor <= 1 or (grace_period is not None and grace_period <= 0):
            raise ValueError("reduction_factor must be > 1 and grace_period > 0")
        self.eta = reduction_factor
        self.grace_period = grace_period
        self.curves = Curves()
        self.rungs: dict[float, dict[str, float]] = {}  # rung step -> trial -> reward recorded there
        self.judged: dict[str, int] = {}  # trial -> step of its newest evaluation already judged

    def milestones(self, max_t: int) -> list[float]:
        grace = self.grace_period if self.grace_period is not None else max_t / self.eta**2
        rungs: list[float] = []
        while (rung := grace * self.eta ** len(rungs)) < max_t * (1 - 1e-9):
            rungs.append(rung)
        return rungs

    def observe(self, cycle: _Cycle) -> None:
        self.curves.update(cycle.status)

    def stop(self, cycle: _Cycle) -> None:
        reference = reference_fingerprint(cycle.status.trials)
        for trial in cycle.status.trials:
            if not comparable(trial, reference):
                continue
            for step, value in self.curves.points(trial.name):
                if step <= self.judged.get(trial.name, -1):
                    continue
                self.judged[trial.name] = step
                verdict = self.on_result(cycle, trial, step, value)
                if verdict is not None and not trial.finished:
                    cycle.terminate(trial, "asha-rung", verdict)
                    break

    def on_result(self, cycle: _Cycle, trial: TrialStatus, step: int, value: float) -> str | None:
        """Ray's _Bracket.on_result: the rationale when the trial should stop, else None."""
        rungs = self.milestones(max_steps(cycle.spec, trial))
        for k, rung in reversed(list(enumerate(rungs))):
            recorded = self.rungs.setdefault(rung, {})
            if step < rung or trial.name in recorded:
                continue
            reward, others = cycle.reward(value), list(recorded.values())
            recorded[trial.name] = reward
            if not others:
                return None
            quantile = (1 - 1 / self.eta) * 100
            cutoff = float(np.nanpercentile(others, quantile))
            if reward >= cutoff:
                return None
            shown = cutoff if cycle.objective.direction == "maximize" else -cutoff
            place = quantile if cycle.objective.direction == "maximize" else 100 - quantile
            return (
                f"{cycle.metric} {value:.4g} at step {step}, its first evaluation at or past rung {k} (step "
                f"{rung:.4g} = gracePeriod {rungs[0]:.4g} x {self.eta:g}^{k}), is worse than the cutoff {shown:.4g} "
                f"({place:.1f}th percentile of the {len(others)} trials recorded there before it): not in their top "
                f"1/{self.eta:g} (reductionFactor {self.eta:g})"
            )
        return None


class PBT(_Baseline):
    """Population Based Training (Jaderberg et al. 2017), exploit and explore as Ray Tune's
    PopulationBasedTraining does them (truncation selection, perturbation, no resampling).

    The population is the running trials (parallelTrials of them), randomly sampled; a member that
    finishes is replaced by a fresh random one while the budget lasts, so PBT spends the same compute
    as the other policies. A running trial is ready every `ready_steps` steps it trains
    (default max_steps / 10, at least the template's checkpoint_interval). Once per cycle the
    measured population is ranked on its latest objective; a ready trial in the bottom
    `quantile_fraction` (default 25%, at least one, at most half) exploits one of the top
    quantile that has a checkpoint (chosen at random): it is terminated, and a child is launched
    with parent and resume_from the winner, whose values are explored: each range multiplied by
    0.8 or 1.2 at random and clamped into the space (integers rounded), each values list moved to
    a neighbouring entry. A child is ready `ready_steps` after the step it resumed from. A ready
    trial outside the bottom quantile, or with no winner to copy or no launch left, trains on."""

    name = "pbt"

    def __init__(
        self,
        seed: int = 0,
        *,
        ready_steps: int | None = None,
        quantile_fraction: float = 0.25,
        factors: tuple[float, ...] = (0.8, 1.2),
    ) -> None:
        super().__init__(seed)
        if not 0 < quantile_fraction <= 0.5:
            raise ValueError(f"quantile_fraction must be in (0, 0.5] (got {quantile_fraction})")
        self.ready_steps = ready_steps
        self.quantile_fraction = quantile_fraction
        self.factors = factors
        self.ready_since: dict[str, int] = {}  # trial -> step it was last ready at (or started from)

    def interval(self, spec: AgentExperimentSpec) -> int:
        if self.ready_steps is not None:
            return self.ready_steps
        saved = spec.trial_template.hyperparameters.get(
            "checkpoint_interval", Hyperparameters.model_fields["checkpoint_interval"].default
        )
        return max(round(max_steps(spec, _FRESH) / 10), int(saved or 0), 1)

    def quantiles(self, cycle: _Cycle) -> tuple[list[TrialStatus], list[TrialStatus], int]:
        """(bottom, top, size) of the measured population, as Ray's PopulationBasedTraining._quantiles."""
        reference = reference_fingerprint(cycle.status.trials)
        measured = [
            trial
            for trial in cycle.running()
            if trial.objective is not None and math.isfinite(trial.objective) and comparable(trial, reference)
        ]
        if len(measured) <= 1:
            return [], [], len(measured)
        ranked = sorted(measured, key=lambda trial: cycle.reward(trial.objective))  # type: ignore[arg-type]
        count = math.ceil(len(ranked) * self.quantile_fraction)
        if count > len(ranked) / 2:
            count = len(ranked) // 2
        return ranked[:count], ranked[-count:], len(ranked)

    def stop(self, cycle: _Cycle) -> None:
        every = self.interval(cycle.spec)
        bottom, top, measured = self.quantiles(cycle)
        losers = {trial.name for trial in bottom}
        for trial in cycle.running():
            since = self.ready_since.setdefault(trial.name, trial.resumed_from_step or 0)
            if trial.step - since < every:
                continue
            self.ready_since[trial.name] = trial.step
            if trial.name not in losers:
                continue
            winners = [t for t in top if t.checkpoint_step is not None and t.name not in cycle.stopping]
            if (
                not winners
                or cycle.capacity(releasing=(trial.name,)) < 1
                or not cycle.may_propose("launch", None, "pbt-explore")
            ):
                continue
            index = cycle.status.trials_launched + cycle.launches
            rng = rng_for(self.seed, _PBT, index)
            winner = winners[int(rng.integers(len(winners)))]
            values, moves = self.explore(cycle.spec, winner.hyperparameters, rng)
            standing = (
                f"{trial.name}: {cycle.metric} {trial.objective:.4g} at step {trial.step} is in the bottom "
                f"{self.quantile_fraction:.0%} of the population (the worst {len(bottom)} of {measured} measured); "
                f"{winner.name} has {cycle.metric} {winner.objective:.4g}, in the top {len(top)}"
            )
            if not cycle.terminate(trial, "pbt-exploit", f"{standing}: it exploits {winner.name}"):
                continue
            cycle.launch(
                "pbt-explore",
                f"{standing}; resuming {winner.name}'s checkpoint at step {winner.checkpoint_step} with "
                f"{'; '.join(moves)} (ready every {every} steps)",
                values,
                parent=winner.name,
                resume_from=winner.name,
            )

    def explore(
        self, spec: AgentExperimentSpec, values: dict[str, float], rng: np.random.Generator
    ) -> tuple[dict[str, float], list[str]]:
        """The winner's values perturbed, each dimension by a factor drawn from `factors` (a values
        list moves to its neighbour in the factor's direction: SearchParameter.step_from, as the
        heuristic's exploit), and the words that say how."""
        point: dict[str, float] = {}
        moves: list[str] = []
        for parameter in spec.search_space:
            value = snap(parameter, values[parameter.name])
            factor = self.factors[int(rng.integers(len(self.factors)))]
            point[parameter.name] = snap(parameter, parameter.step_from(value, factor))
            how = "to its neighbour" if parameter.values is not None else f"x {factor:g}"
            moves.append(f"{parameter.name} {value:g} {how} -> {point[parameter.name]:g}")
        return point, moves

    def points(self, cycle: _Cycle, count: int) -> list[tuple[dict[str, float], str, str]]:
        # A finished member's slot is refilled with a fresh random one while the budget lasts, so
        # PBT spends the same compute as every other policy (with parallelTrials 2 the population
        # is small: two members at a time, each exploiting the other).
        sampled = super().points(cycle, count)
        return [(point, "pbt-population", f"population member, {why}") for point, _, why in sampled]


# --------------------------------------------------------------------------------------------
# Optuna samplers alone
# --------------------------------------------------------------------------------------------


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _key(values: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((name, float(value)) for name, value in values.items()))


class _OptunaSearch:
    """One Optuna study for the whole experiment: asked for each launch, told each finished trial
    (its best objective when scored, FAIL when not)."""

    def __init__(self, make_sampler: Callable[[AgentExperimentSpec], Any]) -> None:
        self.make_sampler = make_sampler
        self.study: Any = None
        self.asked: dict[str, Any] = {}  # TrainPilot trial -> the Optuna trial it runs
        self.unlaunched: list[Any] = []  # asked and proposed, not (yet) in status: proposed again first
        self.told: set[str] = set()

    def sync(self, spec: AgentExperimentSpec, status: AgentExperimentStatus) -> None:
        optuna = _optuna()
        if self.study is None:
            self.study = optuna.create_study(direction=spec.objective.direction, sampler=self.make_sampler(spec))
        for trial in sorted(status.trials, key=lambda t: t.index):
            if trial.name in self.told:
                continue
            if trial.name not in self.asked:
                match = next(
                    (t for t in self.unlaunched if _key(self.plain(spec, t)) == _key(trial.hyperparameters)), None
                )
                if match is not None:
                    self.unlaunched.remove(match)
                    self.asked[trial.name] = match
                elif trial.finished:  # launched by someone else: told all the same
                    self.add_foreign(spec, trial)
                    self.told.add(trial.name)
                    continue
            if trial.name in self.asked and trial.finished:
                if is_scored(trial):
                    self.study.tell(self.asked[trial.name], trial.best_objective)
                else:
                    self.study.tell(self.asked[trial.name], state=optuna.trial.TrialState.FAIL)
                self.told.add(trial.name)

    def add_foreign(self, spec: AgentExperimentSpec, trial: TrialStatus) -> None:
        """A finished trial this study never asked for; left out if it lies outside the space."""
        optuna = _optuna()
        values = trial.hyperparameters
        if any(not (p.name in values and p.contains(values[p.name])) for p in spec.search_space):
            return
        params = {p.name: snap(p, values[p.name]) for p in spec.search_space}
        distributions = self.distributions(spec)
        if is_scored(trial):
            frozen = optuna.trial.create_trial(params=params, distributions=distributions, value=trial.best_objective)
        else:
            frozen = optuna.trial.create_trial(
                state=optuna.trial.TrialState.FAIL, params=params, distributions=distributions
            )
        self.study.add_trial(frozen)

    def suggest(self, spec: AgentExperimentSpec, count: int) -> list[Any]:
        """`count` Optuna trials to launch: those proposed before and never launched, then new asks."""
        distributions = self.distributions(spec)
        while len(self.unlaunched) < count:
            self.unlaunched.append(self.study.ask(distributions))
        return self.unlaunched[:count]

    @staticmethod
    def distributions(spec: AgentExperimentSpec) -> dict[str, Any]:
        return {parameter.name: distribution(parameter) for parameter in spec.search_space}

    @staticmethod
    def plain(spec: AgentExperimentSpec, trial: Any) -> dict[str, float]:
        return {parameter.name: snap(parameter, trial.params[parameter.name]) for parameter in spec.search_space}

    def system_attrs(self, trial: Any) -> dict[str, Any]:
        """What the sampler stored on an asked trial (CMA-ES: its generation, its optimizer's state)."""
        return dict(self.study._storage.get_trial_system_attrs(trial._trial_id))

    def counts(self) -> tuple[int, int]:
        state = _optuna().trial.TrialState
        trials = self.study.get_trials(deepcopy=False)
        return sum(t.state == state.COMPLETE for t in trials), sum(t.state == state.FAIL for t in trials)


class _SamplerBaseline(_Baseline):
    reason = "suggested"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.search = _OptunaSearch(self.sampler)

    def sampler(self, spec: AgentExperimentSpec) -> Any:
        raise NotImplementedError

    def observe(self, cycle: _Cycle) -> None:
        self.search.sync(cycle.spec, cycle.status)

    def points(self, cycle: _Cycle, count: int) -> list[tuple[dict[str, float], str, str]]:
        complete, failed = self.search.counts()
        history = f"{complete} complete and {failed} failed trials told"
        return [
            (self.search.plain(cycle.spec, trial), self.reason, f"{self.how(cycle.spec, trial)} ({history})")
            for trial in self.search.suggest(cycle.spec, count)
        ]

    def how(self, spec: AgentExperimentSpec, trial: Any) -> str:
        raise NotImplementedError


class TPE(_SamplerBaseline):
    """Optuna's TPESampler alone: every trial runs to its end, no early stopping. Configured as
    TrainPilot's own suggester (core/suggest.py) so that the comparison with the heuristic is
    about its rules, not its sampler: n_startup_trials random trials first (default
    spec.policy.heuristic.startupTrials), constant_liar (running trials count as bad, spreading
    a batch), seeded by the policy's seed."""

    name = "tpe"
    reason = "tpe-suggestion"

    def __init__(self, seed: int = 0, *, n_startup_trials: int | None = None, constant_liar: bool = True) -> None:
        self.n_startup_trials = n_startup_trials
        self.constant_liar = constant_liar
        super().__init__(seed)

    def startup(self, spec: AgentExperimentSpec) -> int:
        return self.n_startup_trials if self.n_startup_trials is not None else spec.policy.heuristic.startup_trials

    def sampler(self, spec: AgentExperimentSpec) -> Any:
        optuna = _optuna()
        return optuna.samplers.TPESampler(
            seed=self.seed, n_startup_trials=self.startup(spec), constant_liar=self.constant_liar
        )

    def how(self, spec: AgentExperimentSpec, trial: Any) -> str:
        return f"Optuna TPESampler suggestion (seed {self.seed}, n_startup_trials {self.startup(spec)})"


class CMAES(_SamplerBaseline):
    """Optuna's CmaEsSampler alone (the `cmaes` package's CMA-ES), every trial to its end. CMA-ES
    moves only numeric ranges (log ranges in log space, integers rounded); a values list (a
    categorical dimension, micro_batch) is sampled by its independent sampler, a seeded
    RandomSampler, as Optuna does; so are all dimensions of the first n_startup_trials (Optuna's
    default 1). A generation is told once popsize trials of it complete (failed ones are not
    counted, as in Optuna)."""

    name = "cmaes"
    reason = "cmaes-suggestion"

    def __init__(
        self,
        seed: int = 0,
        *,
        n_startup_trials: int = 1,
        popsize: int | None = None,
        sigma0: float | None = None,
    ) -> None:
        self.n_startup_trials = n_startup_trials
        self.popsize = popsize
        self.sigma0 = sigma0
        super().__init__(seed)

    def sampler(self, spec: AgentExperimentSpec) -> Any:
        optuna = _optuna()
        return optuna.samplers.CmaEsSampler(
            seed=self.seed,
            n_startup_trials=self.n_startup_trials,
            popsize=self.popsize,
            sigma0=self.sigma0,
            independent_sampler=optuna.samplers.RandomSampler(seed=self.seed),
            warn_independent_sampling=False,
        )

    def how(self, spec: AgentExperimentSpec, trial: Any) -> str:
        generation = self.search.system_attrs(trial).get("cma:generation")
        if generation is None:
            return f"Optuna CmaEsSampler (seed {self.seed}): independent RandomSampler (startup)"
        return (
            f"Optuna CmaEsSampler (seed {self.seed}) generation {generation} for the ranges, "
            "its independent RandomSampler for values lists"
        )


BASELINES: dict[str, Callable[[int], Policy]] = {
    RandomSearch.name: RandomSearch,
    GridSearch.name: GridSearch,
    MedianStopping.name: MedianStopping,
    ASHA.name: ASHA,
    PBT.name: PBT,
    TPE.name: TPE,
    CMAES.name: CMAES,
}

__all__ = [
    "ASHA",
    "BASELINES",
    "CMAES",
    "PBT",
    "TPE",
    "Curves",
    "GridSearch",
    "MedianStopping",
    "RandomSearch",
    "random_point",
    "sample_point",
    "snap",
]
