"""The built-in policy: the rules a careful researcher applies, with no LLM.

Per cycle, in this order: stop what diverged (and relaunch it with a lower learning rate), stop
loss spikes (a divergence too: relaunched the same way), stop oscillating validation curves,
stop losers at ASHA rungs (each replaced by a perturbed child of the rung's best, PBT-style),
replace the bottom of the running trials by children of the top every exploitInterval (PBT), cut
the lr of a trial on a plateau in place and stop one still stuck after it, finish when the goal is
reached or the budget is spent, and otherwise fill free slots (relaunches first, then exploit
children, then the spec's initial trials, then Optuna's suggestions, which learn from divergence).
Every threshold comes from HeuristicSettings; every decision's rationale quotes the numbers that
drove it.

It keeps no memory between cycles: what it did is visible in status (a terminated trial is
Terminated, a relaunched one has a child), which is what keeps it from repeating itself.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from trainpilot.api import contract
from trainpilot.api.contract import objective_metric
from trainpilot.api.experiment import MAX_TRIAL_HISTORY, HeuristicSettings, TrialStatus
from trainpilot.core import guardrails
from trainpilot.core.decision import Decision
from trainpilot.core.policy.base import PolicyContext, may_propose
from trainpilot.core.state import (
    COMPLETE_REASON,
    DIVERGED_REASON,
    SPIKE_REASON,
    comparable,
    is_diverged,
    is_scored,
    max_steps,
    reference_fingerprint,
    rung_step,
)


class HeuristicPolicy:
    name = "heuristic"

    def __init__(self, settings: HeuristicSettings | None = None) -> None:
        # None: read spec.policy.heuristic every cycle, so a spec edit takes effect at once.
        self.settings = settings

    async def decide(self, context: PolicyContext) -> list[Decision]:
        return _Cycle(context, self.settings or context.spec.policy.heuristic).decide()


@dataclass(frozen=True)
class _Relaunch:
    parent: TrialStatus
    hyperparameters: dict[str, float] | None  # None: the lr cannot go lower; take a suggestion
    resume_from: str | None
    rationale: str
    reason: str = "relaunch-after-divergence"  # or pbt-exploit: a rung's loser replaced by a winner's child


class _Cycle:
    """One cycle's reasoning: the decisions so far and the trials they stop."""

    def __init__(self, context: PolicyContext, settings: HeuristicSettings) -> None:
        self.context = context
        self.spec = context.spec
        self.status = context.status
        self.settings = settings
        self.metric = context.spec.objective.metric
        self.decisions: list[Decision] = []
        self.stopping: set[str] = set()
        self.relaunches: list[_Relaunch] = []
        self.exploits: list[_Relaunch] = []

    def decide(self) -> list[Decision]:
        self.stop_divergent()
        for trial in self.running():
            self.stop_spike(trial)
        for trial in self.running():
            self.stop_oscillating(trial)
        for trial in self.running():
            self.stop_asha_loser(trial)
        self.exploit_population()
        for trial in self.running():
            self.handle_plateau(trial)
        if not self.finish():
            self.launch()
            self.scale_leader()
        return self.decisions

    def running(self) -> list[TrialStatus]:
        """Active trials not being stopped in this cycle."""
        return [trial for trial in self.status.active_trials if trial.name not in self.stopping]

    # ---- 1. divergence ------------------------------------------------------------------------

    def stop_divergent(self) -> None:
        for trial in self.status.trials:
            symptom = self.divergence(trial)
            if symptom is None:
                continue
            if not trial.finished:
                self.terminate(trial, DIVERGED_REASON, f"{symptom} at step {trial.step}")
                if trial.name not in self.stopping:
                    continue  # not stopped (not allowed, or awaiting approval): no second copy yet
            self.plan_relaunch(trial, symptom)

    def divergence(self, trial: TrialStatus) -> str | None:
        if trial.finished:
            if not is_diverged(trial):
                return None
            return "stopped on a loss spike" if trial.message == SPIKE_REASON else "stopped on a non-finite loss"
        if trial.nonfinite_losses > 0:
            return f"{trial.nonfinite_losses} non-finite training loss(es)"
        raw = self.observed_objective(trial)
        # The trainer reports NaN until its first evaluation in each process (a pod that resumed a
        # checkpoint after a Kueue preemption or an eviction, too: trainpilot_eval_step is -1 then);
        # NaN after one, or infinity, is divergence.
        if raw is not None and not math.isfinite(raw) and (math.isinf(raw) or self.measured(trial)):
            return f"{self.metric} is {raw}"
        return None

    def measured(self, trial: TrialStatus) -> bool:
        """Whether the trainer process now running has evaluated at least once."""
        seen = self.context.observation.trials.get(trial.name)
        step = seen.metrics.get(contract.METRIC_EVAL_STEP) if seen is not None and seen.metrics is not None else None
        if step is None or not math.isfinite(step):
            return bool(trial.history)  # an exporter without trainpilot_eval_step: its history says
        return step >= 0

    def observed_objective(self, trial: TrialStatus) -> float | None:
        seen = self.context.observation.trials.get(trial.name)
        if seen is None or seen.metrics is None:
            return None
        return seen.metrics.get(objective_metric(self.metric))

    def plan_relaunch(self, trial: TrialStatus, symptom: str) -> None:
        if any(other.parent == trial.name for other in self.status.trials):
            return  # it already has a successor
        done = self.lineage_relaunches(trial)
        limit = self.settings.max_relaunches
        if done >= limit:
            return
        which = f"relaunch {done + 1} of {limit} (maxRelaunches)"
        factor = self.settings.divergence_lr_factor
        space = self.spec.parameter("lr")
        lr = trial.hyperparameters.get("lr")
        if space is not None and lr is not None and (lower := space.clamp(lr * factor)) < lr:
            resume, start = resume_point(trial)
            rationale = (
                f"{trial.name}: {symptom}; {which} with lr {lr:g} x {factor:g} = {lower:g} "
                f"(clamped into lr {space.describe()}), {start}"
            )
            self.relaunches.append(_Relaunch(trial, {**trial.hyperparameters, "lr": lower}, resume, rationale))
        else:
            why = (
                "lr is not in the search space"
                if space is None or lr is None
                else f"lr {lr:g} is already the lowest allowed"
            )
            rationale = f"{trial.name}: {symptom}; {why}, so {which} takes the next suggestion"
            self.relaunches.append(_Relaunch(trial, None, None, rationale))

    def lineage_relaunches(self, trial: TrialStatus) -> int:
        """Relaunches so far in this trial's lineage: each diverged ancestor was relaunched once."""
        count, seen = 0, {trial.name}
        ancestor = self.status.trial(trial.parent) if trial.parent else None
        while ancestor is not None and ancestor.name not in seen:
            seen.add(ancestor.name)
            count += is_diverged(ancestor)
            ancestor = self.status.trial(ancestor.parent) if ancestor.parent else None
        return count

    # ---- 2. loss spike ----------------------------------------------------------------------

    def stop_spike(self, trial: TrialStatus) -> None:
        smoothed, best = trial.smoothed_train_loss, trial.best_train_loss
        if smoothed is None or best is None or best <= 0:
            return
        factor = self.settings.spike_factor
        if trial.loss_spikes > 0:
            # The trainer applies the same rule at every step: a spike between two scrapes is seen
            # at the first scrape after it, not when the scraped EMA catches up cycles later.
            symptom = (
                f"the trainer saw {trial.loss_spikes} step(s) with a smoothed train loss above spikeFactor "
                f"{factor:g} x its best, by step {trial.step}"
            )
        elif smoothed > factor * best:
            symptom = (
                f"smoothed train loss {smoothed:.4g} is {smoothed / best:.2f}x its best {best:.4g} "
                f"(spikeFactor {factor:g}) at step {trial.step}"
            )
        else:
            return
        self.terminate(trial, SPIKE_REASON, symptom)
        if trial.name in self.stopping:  # stopped, not held for approval: relaunch it lower, like a NaN
            self.plan_relaunch(trial, symptom)

    # ---- 3. oscillation ---------------------------------------------------------------------

    def stop_oscillating(self, trial: TrialStatus) -> None:
        # Status keeps MAX_TRIAL_HISTORY points; a longer window is read as "all of them".
        window = min(self.settings.oscillation_window, MAX_TRIAL_HISTORY)
        values = [point[1] for point in trial.history[-window:]]
        if len(values) < window:
            return
        amplitude = self.settings.oscillation_min_amplitude
        reversals, swing = count_reversals(values, amplitude)
        if reversals >= self.settings.oscillation_reversals:
            self.terminate(
                trial,
                "oscillating-val-loss",
                f"{self.metric} changed direction {reversals} times in its last {window} evaluations "
                f"(oscillationReversals {self.settings.oscillation_reversals}), with swings up to "
                f"{swing:.1%} (oscillationMinAmplitude {amplitude:.1%})",
            )

    # ---- 4. ASHA rungs ----------------------------------------------------------------------

    def stop_asha_loser(self, trial: TrialStatus) -> None:
        reached = [
            (fraction, key)
            for fraction in self.settings.rungs
            if (key := str(rung_step(self.spec, trial, fraction))) in trial.rung_objectives
        ]
        reference = reference_fingerprint(self.status.trials)
        if not reached or not comparable(trial, reference):
            return
        # Judged at its latest rung only: ASHA never demotes a trial already promoted past a rung.
        fraction, key = reached[-1]
        value = trial.rung_objectives[key]
        peers = [
            peer_value
            for peer in self.status.trials
            if comparable(peer, reference)
            and (peer_value := peer.rung_objectives.get(str(rung_step(self.spec, peer, fraction)))) is not None
        ]
        if len(peers) < self.settings.min_peers_at_rung:
            return
        eta = self.settings.reduction_factor
        keep = math.ceil(len(peers) / eta)
        ranked = sorted(peers, reverse=self.spec.objective.direction == "maximize")
        cutoff = ranked[keep - 1]
        if self.spec.objective.better(cutoff, value):
            self.terminate(
                trial,
                "asha-rung",
                f"{self.metric} {value:.4g} at rung {fraction:g} (step {key}) is not among the best {keep} "
                f"of {len(peers)} trials there (cutoff {cutoff:.4g}, reductionFactor {eta:g})",
            )
            if trial.name in self.stopping and self.settings.exploit:
                self.plan_exploit(trial, fraction, reference)

    def plan_exploit(self, loser: TrialStatus, fraction: float, reference: str | None) -> None:
        """PBT's exploit and explore: the rung's best trial with a checkpoint goes on in the loser's
        place, from that checkpoint, with its values perturbed (Jaderberg et al. 2017)."""
        candidates = [
            (value, peer)
            for peer in self.status.trials
            if peer.name != loser.name
            and self.can_be_exploited(peer, reference)
            and (value := peer.rung_objectives.get(str(rung_step(self.spec, peer, fraction)))) is not None
        ]
        if not candidates:
            return
        direction = self.spec.objective.direction
        value, winner = sorted(candidates, key=lambda pair: pair[0], reverse=direction == "maximize")[0]
        self.plan_child(
            loser,
            winner,
            f"{loser.name} stopped at rung {fraction:g}; exploit {winner.name}, the best there with a checkpoint "
            f"({self.metric} {value:.4g})",
        )

    def can_be_exploited(self, peer: TrialStatus, reference: str | None) -> bool:
        """Whether a child may resume this trial's checkpoint: a sound trial with steps left after it."""
        return (
            peer.name not in self.stopping
            and peer.checkpoint_step is not None
            and peer.checkpoint_step < max_steps(self.spec, peer)  # a finished run's last checkpoint has nothing left
            and "checkpoints" not in peer.removed  # spec.retention deleted them
            and comparable(peer, reference)
            and not is_diverged(peer)
            and peer.state != "Failed"
        )

    def plan_child(self, loser: TrialStatus, winner: TrialStatus, why: str) -> None:
        """A child of the winner in the loser's place: its checkpoint, its values perturbed."""
        draw = random.Random(f"{self.settings.seed}:{loser.name}")
        explored, moves = {}, []
        for parameter in self.spec.search_space:
            old = winner.hyperparameters.get(parameter.name)
            if old is None:
                return  # a trial from before the space grew: nothing to perturb from
            factor = draw.choice(self.settings.explore_factors)
            new = parameter.step_from(old, factor)
            explored[parameter.name] = new
            moves.append(f"{parameter.name} {old:g} x {factor:g} -> {new:g}")
        rationale = (
            f"{why}, resuming its checkpoint at step {winner.checkpoint_step}, and explore: "
            f"{', '.join(moves)} (exploreFactors {self.settings.explore_factors})"
        )
        self.exploits.append(_Relaunch(winner, explored, winner.name, rationale, reason="pbt-exploit"))

    # ---- 5. population exploit ---------------------------------------------------------------

    def exploit_population(self) -> None:
        """PBT's truncation selection among the running trials (Jaderberg et al. 2017): a trial that has
        trained exploitInterval of max_steps since it started and ranks in the bottom exploitQuantile
        on its latest objective is replaced by a child of the best in the top with a checkpoint."""
        interval = self.settings.exploit_interval
        if not self.settings.exploit or interval <= 0:
            return
        reference = reference_fingerprint(self.status.trials)
        measured = [
            (trial.objective, trial)
            for trial in self.running()
            if trial.objective is not None and math.isfinite(trial.objective) and comparable(trial, reference)
        ]
        if len(measured) < 2:
            return
        maximize = self.spec.objective.direction == "maximize"
        ranked = [trial for _, trial in sorted(measured, key=lambda pair: pair[0], reverse=maximize)]
        count = max(1, min(math.ceil(len(ranked) * self.settings.exploit_quantile), len(ranked) // 2))
        top, bottom = ranked[:count], ranked[-count:]
        for loser in bottom:
            every = max(1, round(interval * max_steps(self.spec, loser)))
            trained = loser.step - (loser.resumed_from_step or 0)
            winners = [
                winner
                for winner in top
                if self.can_be_exploited(winner, reference)
                # a child of this winner copies it again only once it has a newer checkpoint
                and not (
                    loser.parent == winner.name and (winner.checkpoint_step or 0) <= (loser.resumed_from_step or 0)
                )
            ]
            if trained < every or not winners:
                continue
            room = guardrails.launch_capacity(
                self.spec, self.status, self.context.limits, releasing={*self.stopping, loser.name}
            ) - len(self.relaunches + self.exploits)
            if room < 1:
                continue  # no child could take its place (budget, quota): it trains on, as in PBT
            winner = winners[0]
            standing = (
                f"{self.metric} {loser.objective:.4g} at step {loser.step} is in the bottom {len(bottom)} of "
                f"{len(ranked)} running trials (exploitQuantile {self.settings.exploit_quantile:g}) after {trained} "
                f"steps of its own (exploitInterval {interval:g} x max_steps = {every})"
            )
            self.terminate(loser, "pbt-exploit", f"{standing}; {winner.name} leads with {winner.objective:.4g}")
            if loser.name in self.stopping:
                self.plan_child(
                    loser,
                    winner,
                    f"{loser.name}: {standing}; exploit {winner.name} ({self.metric} {winner.objective:.4g})",
                )

    # ---- 6. plateau -------------------------------------------------------------------------

    def handle_plateau(self, trial: TrialStatus) -> None:
        """A running trial whose best has not improved for stagnationEvaluations evaluations: its lr
        is cut in place (a learning-rate drop, as on a plateau), then, still stuck, it is stopped."""
        evaluations = self.settings.stagnation_evaluations
        if evaluations <= 0:
            return
        found = plateau(
            trial.history,
            trial.changed_at_step,
            evaluations,
            self.settings.stagnation_min_improvement,
            self.spec.objective.direction,
        )
        if found is None:
            return
        before, recent = found
        symptom = (
            f"its best {self.metric} in the last {evaluations} evaluations, {recent:.4g}, does not improve on "
            f"{before:.4g} by stagnationMinImprovement {self.settings.stagnation_min_improvement:.1%}"
        )
        space, lr = self.spec.parameter("lr"), trial.hyperparameters.get("lr")
        factor = self.settings.plateau_lr_factor
        lowered = space.clamp(lr * factor) if space is not None and lr is not None else None
        cuts = trial.control_generation
        if (
            lowered is not None
            and lr is not None
            and lowered < lr
            and cuts < self.settings.max_lr_cuts
            and self.may_propose("mutate", trial.name, "plateau-lr-cut", {"lr": lowered})
        ):
            self.propose(
                "mutate",
                "plateau-lr-cut",
                f"{symptom} at step {trial.step}; lr {lr:g} x {factor:g} = {lowered:g} in place "
                f"(change {cuts + 1} of maxLrCuts {self.settings.max_lr_cuts})",
                trial=trial.name,
                mode="in-place",
                hyperparameters={"lr": lowered},
            )
            return
        self.terminate(
            trial,
            "stagnated",
            f"{symptom} at step {trial.step}, after {cuts} in-place change(s) (maxLrCuts {self.settings.max_lr_cuts})",
        )

    # ---- 7. finish --------------------------------------------------------------------------

    def finish(self) -> bool:
        status, budget, objective = self.status, self.spec.budget, self.spec.objective
        best = status.best_trial
        best_text = f"best {self.metric} {best.objective:.4g} by {best.name}" if best else "no trial was scored"
        budget_outcome = "succeeded" if best else "failed"
        if best is not None and objective.reached(best.objective):
            outcome, reason = "succeeded", "goal-reached"
            rationale = f"{best.name} reached {self.metric} {best.objective:.4g} (goal {objective.goal:g})"
        elif status.trials_failed > budget.max_failed_trials:
            outcome, reason = "failed", "too-many-failures"
            rationale = f"{status.trials_failed} trials crashed (maxFailedTrials {budget.max_failed_trials} tolerated)"
        elif budget.max_gpu_hours is not None and status.gpu_hours_used >= budget.max_gpu_hours:
            # Running trials keep spending GPU hours, so this budget stops them rather than waits.
            outcome, reason = budget_outcome, "budget-spent"
            rationale = (
                f"{status.gpu_hours_used:.3g} GPU-hours used (maxGPUHours {budget.max_gpu_hours:g}); {best_text}"
            )
        elif status.trials_launched >= budget.max_trials and not self.running():
            outcome, reason = budget_outcome, "budget-spent"
            rationale = (
                f"all {status.trials_launched} trials launched (maxTrials {budget.max_trials}) "
                f"and none is running; {best_text}"
            )
        elif (steps_left := guardrails.trial_steps_left(self.spec, status)) is not None and not self.running():
            outcome, reason = budget_outcome, "budget-spent"
            rationale = (
                f"{status.trial_steps_used} trial-steps used (maxTrialSteps {budget.max_trial_steps}): "
                f"{steps_left} left, less than a trial's {guardrails.template_steps(self.spec)}, "
                f"and none is running; {best_text}"
            )
        else:
            return False
        if not self.may_propose("complete", None, reason):
            return False
        for trial in self.running():
            self.terminate(trial, COMPLETE_REASON, f"the experiment is completing ({reason})")
        self.propose("complete", reason, rationale, outcome=outcome)
        return True

    # ---- 8. launch --------------------------------------------------------------------------

    def launch(self) -> None:
        capacity = guardrails.launch_capacity(self.spec, self.status, self.context.limits, releasing=self.stopping)
        if capacity <= 0:
            return
        relaunches = (self.relaunches + self.exploits)[:capacity]
        fresh = capacity - len(relaunches)
        suggester = self.context.suggester
        initial = suggester.initial_remaining
        suggestions = suggester.suggest(fresh + sum(r.hyperparameters is None for r in relaunches))
        fresh_points, spare = suggestions[:fresh], suggestions[fresh:]
        slots = (
            f"{capacity} launch slot(s) free (parallelTrials {self.spec.budget.parallel_trials}, "
            f"{len(self.running())} running, {self.status.trials_launched} of maxTrials "
            f"{self.spec.budget.max_trials} launched)"
        )
        for relaunch in relaunches:
            self.propose_launch(
                relaunch.reason,
                relaunch.rationale,
                relaunch.hyperparameters or spare.pop(0),
                parent=relaunch.parent.name,
                resume_from=relaunch.resume_from,
            )
        first_initial = len(self.spec.initial_trials) - len(initial)
        scored = suggester.state_summary()["complete"] if len(fresh_points) > len(initial) else 0
        best = self.status.best_trial
        best_text = f"best so far {self.metric} {best.objective:.4g} by {best.name}" if best else "nothing measured yet"
        for number, point in enumerate(fresh_points):
            if number < len(initial):
                reason = "initial-trial"
                rationale = f"spec.initialTrials[{first_initial + number}] {_values(initial[number])}; {slots}"
            else:
                reason = "suggested"
                rationale = (
                    f"{suggestion_words(scored, self.settings.startup_trials)} {_values(point)}; {best_text}; {slots}"
                )
            self.propose_launch(reason, rationale, point)

    # ---- 9. scale the leader --------------------------------------------------------------

    def scale_leader(self) -> None:
        """Idle capacity goes to the trial that clearly leads, once no new trial can be launched."""
        nodes = self.settings.scale_leader_nodes
        running = self.running()
        launching = sum(d.action == "launch" for d in self.decisions)
        if nodes <= 0 or not running or len(running) + launching >= self.spec.budget.parallel_trials:
            return  # off, or no slot is idle
        if guardrails.launch_capacity(self.spec, self.status, self.context.limits, releasing=self.stopping) > 0:
            return  # new trials still come first
        reference = reference_fingerprint(self.status.trials)
        leader = self.status.best_trial
        lead = self.status.trial(leader.name) if leader is not None else None
        if lead is None or lead.finished or lead.name in self.stopping or lead.nodes >= nodes:
            return
        zero_stage = lead.hyperparameters.get("zero_stage", self.spec.trial_template.hyperparameters.get("zero_stage"))
        if zero_stage == 3 or lead.best_objective is None or not comparable(lead, reference):
            return
        others = [
            other.best_objective
            for other in self.status.trials
            if other.name != lead.name
            and other.best_objective is not None
            and is_scored(other)
            and comparable(other, reference)
        ]
        if not others:
            return
        direction = self.spec.objective.direction
        runner_up = min(others) if direction == "minimize" else max(others)
        margin = self.settings.scale_lead * abs(runner_up)
        ahead = runner_up - lead.best_objective if direction == "minimize" else lead.best_objective - runner_up
        if ahead < margin or not self.may_propose("scale", lead.name, "scale-leader"):
            return
        self.propose(
            "scale",
            "scale-leader",
            f"{lead.name} leads with {self.metric} {lead.best_objective:.4g}, {ahead:.4g} ahead of the next best "
            f"{runner_up:.4g} (scaleLead {self.settings.scale_lead:.1%}); no new trial can be launched and a slot is "
            f"idle: {lead.nodes} -> {nodes} node(s) (scaleLeaderNodes), resuming its checkpoint",
            trial=lead.name,
            nodes=nodes,
        )

    # ---- proposing --------------------------------------------------------------------------

    def terminate(self, trial: TrialStatus, reason: str, rationale: str) -> None:
        if trial.name in self.stopping or not self.may_propose("terminate", trial.name, reason):
            return
        self.stopping.add(trial.name)
        self.propose("terminate", reason, rationale, trial=trial.name)

    def propose_launch(
        self,
        reason: str,
        rationale: str,
        hyperparameters: dict[str, float],
        parent: str | None = None,
        resume_from: str | None = None,
    ) -> None:
        if not self.may_propose("launch", None, reason, hyperparameters):
            return
        self.propose(
            "launch", reason, rationale, hyperparameters=hyperparameters, parent=parent, resume_from=resume_from
        )

    def may_propose(
        self, action: str, trial: str | None, reason: str, hyperparameters: dict[str, float] | None = None
    ) -> bool:
        return may_propose(self.context, action, trial, reason, hyperparameters)

    def propose(self, action: str, reason: str, rationale: str, **fields: Any) -> None:
        self.decisions.append(
            Decision(action=action, policy=HeuristicPolicy.name, reason=reason, rationale=rationale, **fields)
        )


def suggestion_words(scored: int, startup_trials: int) -> str:
    """Which sampler chose a point, in one voice: random until startup_trials trials are scored, TPE after."""
    if scored < startup_trials:
        return f"Optuna random sample ({scored} of the {startup_trials} scored trials TPE starts from)"
    return f"Optuna TPE suggestion from {scored} scored trials"


def resume_point(trial: TrialStatus) -> tuple[str | None, str]:
    """Where a relaunch starts: the trial's checkpoint if it was saved before the first bad sign
    (TrialStatus.unstable_since), else from scratch; and the words that say so."""
    saved, unstable = trial.checkpoint_step, trial.unstable_since
    if saved is None:
        return None, "from scratch (no checkpoint)"
    if unstable is not None and saved >= unstable:
        return None, (
            f"from scratch (its checkpoint at step {saved} was saved after the first bad sign at step {unstable})"
        )
    return trial.name, f"resuming from its checkpoint at step {saved}"


def count_reversals(values: list[float], min_amplitude: float) -> tuple[int, float]:
    """Direction changes between moves of at least `min_amplitude` (relative), and the largest move."""
    moves = []
    for before, after in pairwise(values):
        change = (after - before) / abs(before) if before else after - before
        if change and abs(change) >= min_amplitude:
            moves.append(change)
    reversals = sum((a > 0) != (b > 0) for a, b in pairwise(moves))
    return reversals, max((abs(move) for move in moves), default=0.0)


def _values(point: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}={value:g}" for name, value in sorted(point.items())) + "}"


def plateau(
    history: list[list[float]],
    since_step: int | None,
    evaluations: int,
    min_improvement: float,
    direction: str,
) -> tuple[float, float] | None:
    """(best before, best of the last `evaluations`) when those, all after `since_step`, do not beat
    the best before them by `min_improvement` (relative); None while the trial improves or has too few."""
    recent = history[-evaluations:]
    earlier = history[:-evaluations]
    if len(recent) < evaluations or not earlier or (since_step is not None and recent[0][0] <= since_step):
        return None
    pick = min if direction == "minimize" else max
    before, now = pick(point[1] for point in earlier), pick(point[1] for point in recent)
    gain = (before - now) if direction == "minimize" else (now - before)
    if gain > min_improvement * abs(before):
        return None
    return before, now
