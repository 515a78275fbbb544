"""One decision cycle: ask the policy, check every proposal, and turn each into a record.

The engine trusts no policy. Proposals are re-validated, stamped with the policy's own name,
capped in number and length, and checked one by one against a provisional status that already
includes the earlier proposals of the same cycle (two launches both count against parallelism).
Rejected and held proposals are recorded too: the ledger shows what was asked, not only what
happened.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, ModelUsage
from trainpilot.core import guardrails, retention
from trainpilot.core.conditions import set_condition
from trainpilot.core.cycle_log import PolicyInput
from trainpilot.core.decision import (
    CLEAN_UP,
    SYSTEM_POLICY,
    Decision,
    DecisionRecord,
    SignOffNote,
    decision_id,
    trial_name,
)
from trainpilot.core.guardrails import Verdict
from trainpilot.core.observation import Observation
from trainpilot.core.policy.base import Policy, PolicyContext
from trainpilot.core.state import apply_record
from trainpilot.core.suggest import Suggester

MAX_DECISIONS_PER_CYCLE = 16
MAX_SUMMARY_TRIALS = 16
MAX_REASON_CHARS = 80
MAX_RATIONALE_CHARS = 2000
# Evaluations (trainpilot_eval_step advances) a trial may pass without a value for the objective
# before the experiment fails: the trainer does not export spec.objective.metric, and every further
# trial would burn its budget measuring nothing.
MAX_EVALUATIONS_WITHOUT_OBJECTIVE = 3
OBJECTIVE_NOT_EXPORTED = "objective-not-exported"
POLICY_FAILING = "policy-failing"


@dataclass(frozen=True)
class CyclePlan:
    """What one cycle decided: the status its records apply to (with the policy's health folded in),
    the records in order, and the status with all of them applied."""

    status: AgentExperimentStatus
    records: list[DecisionRecord]
    provisional: AgentExperimentStatus
    policy_failure: str | None = None  # why the policy gave nothing this cycle, for the caller's Event and log
    asked: PolicyInput | None = None  # what the policy was given, for the cycle log; None: it was not asked
    decided: tuple[str, ...] = ()  # ids of the records its proposals became


async def plan(
    experiment: str,
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    observation: Observation,
    policy: Policy,
    now: str,
    limits: Any = None,
    on_policy_error: Callable[[Exception], None] | None = None,
) -> tuple[list[DecisionRecord], AgentExperimentStatus]:
    """Records for this cycle's proposals (executed, rejected or held), and status with their effects."""
    planned = await plan_cycle(experiment, spec, status, observation, policy, now, limits, on_policy_error)
    return planned.records, planned.provisional


async def plan_cycle(
    experiment: str,
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    observation: Observation,
    policy: Policy,
    now: str,
    limits: Any = None,
    on_policy_error: Callable[[Exception], None] | None = None,
) -> CyclePlan:
    """Ask the policy and check its proposals, unless the experiment cannot go on.

    A policy that raises (or answers with anything but a list) yields no records and sets
    PolicyHealthy=False; spec.policy.maxConsecutiveFailures such cycles in a row fail the
    experiment with its error. `on_policy_error` lets the caller log the exception itself.
    """
    missing = objective_missing(spec, status, observation)
    if missing is not None:
        return _failing(experiment, spec, status, now, OBJECTIVE_NOT_EXPORTED, missing)
    seen = observation_summary(status, observation)
    asked = PolicyInput(status, observation, now, limits)
    try:
        proposed = await _ask(experiment, spec, status, observation, policy, now, limits)
    except Exception as error:  # a broken policy must not stop the loop
        if on_policy_error is not None:
            on_policy_error(error)
        failed = _policy_failed(experiment, spec, _count_usage(status, policy), policy, error, now)
        return dataclasses.replace(failed, asked=asked)
    status = _count_usage(status, policy)
    status = _policy_answered(status, policy, now)
    records = _check_all(experiment, spec, status, proposed, policy, now, limits, seen)
    provisional = status
    for record in records:
        provisional = apply_record(spec, provisional, record, now)
    return CyclePlan(status, records, provisional, asked=asked, decided=tuple(record.id for record in records))


async def propose(
    experiment: str, spec: AgentExperimentSpec, asked: PolicyInput, policy: Policy
) -> list[DecisionRecord]:
    """What `policy` would have decided given `asked`, checked as the live cycle checks it (replay)."""
    status = asked.status
    proposed = await _ask(experiment, spec, status, asked.observation, policy, asked.now, asked.limits)
    seen = observation_summary(status, asked.observation)
    return _check_all(experiment, spec, status, proposed, policy, asked.now, asked.limits, seen)


async def _ask(
    experiment: str,
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    observation: Observation,
    policy: Policy,
    now: str,
    limits: Any,
) -> list[object]:
    # The policy works on copies: whatever it does to them cannot loosen the checks below.
    spec_view, status_view = spec.model_copy(deep=True), status.model_copy(deep=True)
    context = PolicyContext(
        experiment=experiment,
        spec=spec_view,
        status=status_view,
        observation=observation.model_copy(deep=True),
        now=now,
        suggester=Suggester(spec_view, status_view),
        limits=_copy(limits),
    )
    # Typed as object: a policy (an LLM's, above all) is not trusted to return what it declares.
    proposed: object = await policy.decide(context)
    if not isinstance(proposed, (list, tuple)):
        raise TypeError(f"it answered with {type(proposed).__name__}, not a list of decisions")
    return list(proposed)


def _check_all(
    experiment: str,
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    proposed: list[object],
    policy: Policy,
    now: str,
    limits: Any,
    seen: dict[str, Any],
) -> list[DecisionRecord]:
    """One record per valid proposal, each checked against the status the earlier ones leave."""
    records: list[DecisionRecord] = []
    provisional = status
    for item in proposed[:MAX_DECISIONS_PER_CYCLE]:
        decision = _sanitize(item, policy)
        if decision is None:
            continue
        verdict = guardrails.check(decision, spec, provisional, limits)
        if verdict.outcome == "waiting" and already_waiting(provisional, decision):
            continue  # one record when it starts waiting, not one every cycle it is asked again
        seq = provisional.decisions_made
        before, after = before_after(decision, provisional)
        why = verdict.reason
        if verdict.outcome == "pending-approval":
            why += f"; held until `trainpilot approve {experiment} {decision_id(experiment, seq)}` (or reject)"
        record = DecisionRecord(
            id=decision_id(experiment, seq),
            seq=seq,
            time=now,
            experiment=experiment,
            decision=decision,
            outcome=verdict.outcome,
            verdict=why,
            new_trial=trial_name(experiment, len(provisional.trials))
            if verdict.executed and creates_trial(decision)
            else None,
            before=before,
            after=after,
            observation=seen,
        )
        records.append(record)
        provisional = apply_record(spec, provisional, record, now)
    return records


def _count_usage(status: AgentExperimentStatus, policy: Policy) -> AgentExperimentStatus:
    """Add what an LLM policy used this cycle (calls, tokens) to status.modelUsage."""
    take = getattr(policy, "take_usage", None)
    used = take() if callable(take) else None
    if not isinstance(used, ModelUsage) or used.calls == 0:
        return status
    return status.model_copy(update={"model_usage": status.model_usage.plus(used)})


def creates_trial(decision: Decision) -> bool:
    return decision.action in ("launch", "scale") or (decision.action == "mutate" and decision.mode == "restart")


# --------------------------------------------------------------------------------------------
# When the experiment cannot go on
# --------------------------------------------------------------------------------------------


def _policy_answered(status: AgentExperimentStatus, policy: Policy, now: str) -> AgentExperimentStatus:
    status = status.model_copy(update={"policy_failures": 0})
    status = set_condition(
        status,
        type=contract.CONDITION_POLICY_HEALTHY,
        value="True",
        reason="PolicyAnswered",
        message=f"policy {policy.name} answered",
        now=now,
    )
    health = getattr(policy, "health", None)
    model = health() if callable(health) else None  # an LLM policy says whether its model answers
    if model is None:
        return status
    available, message = model
    return set_condition(
        status,
        type=contract.CONDITION_MODEL_AVAILABLE,
        value="True" if available else "False",
        reason="ModelAnswered" if available else contract.REASON_MODEL_REFUSED,
        message=message,
        now=now,
    )


def _policy_failed(
    experiment: str,
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    policy: Policy,
    error: Exception,
    now: str,
) -> CyclePlan:
    failures = status.policy_failures + 1
    limit = spec.policy.max_consecutive_failures
    message = (
        f"policy {policy.name} failed {failures} cycle(s) in a row (spec.policy.maxConsecutiveFailures "
        f"{limit}): {type(error).__name__}: {error}"
    )
    status = status.model_copy(update={"policy_failures": failures})
    status = set_condition(
        status,
        type=contract.CONDITION_POLICY_HEALTHY,
        value="False",
        reason=contract.REASON_POLICY_FAILING,
        message=message,
        now=now,
    )
    if failures < limit:
        return CyclePlan(status, [], status, policy_failure=message)
    planned = _failing(experiment, spec, status, now, POLICY_FAILING, message)
    return CyclePlan(planned.status, planned.records, planned.provisional, policy_failure=message)


def _failing(
    experiment: str, spec: AgentExperimentSpec, status: AgentExperimentStatus, now: str, reason: str, message: str
) -> CyclePlan:
    record = failure_record(experiment, status, reason, message, now)
    return CyclePlan(status, [record], apply_record(spec, status, record, now))


def failure_record(
    experiment: str, status: AgentExperimentStatus, reason: str, message: str, now: str
) -> DecisionRecord:
    """The loop's own decision to fail an experiment that cannot go on: recorded like any other (ledger,
    ExperimentFailed Event, status), and carried out (running trials stop) without asking a policy."""
    seq = status.decisions_made
    decision = Decision(
        action="complete",
        policy=SYSTEM_POLICY,
        reason=reason,
        rationale=message[:MAX_RATIONALE_CHARS],
        outcome="failed",
    )
    return DecisionRecord(
        id=decision_id(experiment, seq), seq=seq, time=now, experiment=experiment, decision=decision, outcome="executed"
    )


def clean_up_record(experiment: str, seq: int, removal: retention.Removal, now: str) -> DecisionRecord:
    """The loop's own deletion of part of a finished trial under spec.retention, recorded first."""
    decision = Decision(
        action=CLEAN_UP,
        policy=SYSTEM_POLICY,
        reason="retention",
        rationale=removal.why[:MAX_RATIONALE_CHARS],
        trial=removal.trial,
        removes=removal.removes,
    )
    return DecisionRecord(
        id=decision_id(experiment, seq), seq=seq, time=now, experiment=experiment, decision=decision, outcome="executed"
    )


def is_failure_record(record: DecisionRecord) -> bool:
    decision = record.decision
    return decision.policy == SYSTEM_POLICY and decision.action == "complete" and decision.outcome == "failed"


def objective_missing(spec: AgentExperimentSpec, status: AgentExperimentStatus, observation: Observation) -> str | None:
    """Why the experiment cannot measure anything: a trial evaluated MAX_EVALUATIONS_WITHOUT_OBJECTIVE
    times and never exported a value for the objective; None while that is not so."""
    metric = contract.objective_metric(spec.objective.metric)
    for trial in status.trials:
        seen = observation.trials.get(trial.name)
        if (
            trial.evaluations < MAX_EVALUATIONS_WITHOUT_OBJECTIVE
            or trial.best_objective is not None
            or trial.nonfinite_losses  # a diverged trial's NaN is a divergence, not a missing metric
            or seen is None
            or seen.metrics is None
        ):
            continue
        exported = sorted(seen.metrics.values)
        found = f"it exports {metric} but never a finite value" if metric in exported else f"it never exported {metric}"
        choices = ", ".join(name.removeprefix("trainpilot_") for name in exported) or "nothing"
        return (
            f"spec.objective.metric {spec.objective.metric!r}: trial {trial.name} passed {trial.evaluations} "
            f"evaluations (trainpilot_eval_step advanced {trial.evaluations} times; the limit is "
            f"{MAX_EVALUATIONS_WITHOUT_OBJECTIVE}) and {found}; its metrics are: {', '.join(exported) or 'none'}. "
            f"Set spec.objective.metric to one the trainer exports ({choices})"
        )
    return None


# --------------------------------------------------------------------------------------------
# Replaying the ledger after a restart
# --------------------------------------------------------------------------------------------


def recheck(
    experiment: str, spec: AgentExperimentSpec, status: AgentExperimentStatus, record: DecisionRecord, limits: Any
) -> Verdict:
    """Whether a recorded, executed decision may still be carried out: the ledger is data like any
    proposal (a forged or stale line must not act), so it passes the guardrails again against the
    current spec and limits, and must be the record the engine would have written in its place."""
    expected_id = decision_id(experiment, record.seq)
    if record.id != expected_id or record.experiment != experiment:
        return Verdict("rejected", f"replayed record {record.id!r} is not {expected_id} of {experiment}")
    decision = _sanitize(record.decision, record.decision.policy)
    if decision is None or decision != record.decision:
        return Verdict("rejected", "replayed record's decision is not one the engine would have recorded")
    expected_trial = trial_name(experiment, len(status.trials)) if creates_trial(decision) else None
    if record.new_trial != expected_trial:
        return Verdict("rejected", f"replayed record names new trial {record.new_trial!r}, not {expected_trial!r}")
    if is_failure_record(record):
        return Verdict("executed")  # the loop's own failing of the experiment: it only stops things
    if decision.action == CLEAN_UP:
        # Deletes for good: carried out only if the retention rules call for it now, whoever wrote it.
        due = retention.due(spec, status, record.time, ("checkpoints", "children"))
        if decision.policy == SYSTEM_POLICY and any(
            (removal.trial, removal.removes) == (decision.trial, decision.removes) for removal in due
        ):
            return Verdict("executed")
        return Verdict("rejected", f"replayed clean-up of {decision.trial} is not one spec.retention calls for")
    approved = record.sign_off is not None and record.sign_off.verdict == "approved"
    if approved:
        held = status.sign_off(record.follows or "")
        if held is None or held.state != "Pending":
            return Verdict("rejected", f"replayed record's approval follows no decision awaiting it ({record.follows})")
    verdict = guardrails.check(decision, spec, status, limits, approved=approved)
    if not verdict.executed:
        return Verdict("rejected", f"replayed after a restart, it no longer passes the guardrails: {verdict.reason}")
    return verdict


def already_waiting(status: AgentExperimentStatus, decision: Decision) -> bool:
    """A decision like this one (the same action on the same trial; any launch) already waits for quota."""
    return any((wait.action, wait.trial) == (decision.action, decision.trial) for wait in status.waiting_for_quota)


def follow_up(
    experiment: str,
    status: AgentExperimentStatus,
    held: DecisionRecord,
    verdict: Verdict,
    now: str,
    why: str = "",
    sign_off: SignOffNote | None = None,
) -> DecisionRecord:
    """What became of a held or waiting decision, numbered after everything so far: carried out when
    `verdict` passes, else the same decision again with `verdict`'s outcome (rejected, held) and `why`."""
    seq = status.decisions_made
    decision = held.decision
    if verdict.executed:
        before, after = before_after(decision, status)
        return DecisionRecord(
            id=decision_id(experiment, seq),
            seq=seq,
            time=now,
            experiment=experiment,
            decision=decision,
            outcome="executed",
            new_trial=trial_name(experiment, len(status.trials)) if creates_trial(decision) else None,
            before=before,
            after=after,
            follows=held.id,
            sign_off=sign_off,
        )
    return held.model_copy(
        update={
            "id": decision_id(experiment, seq),
            "seq": seq,
            "time": now,
            "outcome": verdict.outcome,
            "verdict": (why or verdict.reason)[:MAX_RATIONALE_CHARS],
            "new_trial": None,
            "observation": {},
            "follows": held.id,
            "sign_off": sign_off,
        }
    )


def rejection_record(
    experiment: str, seq: int, record: DecisionRecord, verdict: str, now: str, follows: str | None
) -> DecisionRecord:
    """`record` again as rejected (DecisionRejected) at sequence number `seq`; `follows` names the
    record it voids, if any (a replayed one that failed its re-check)."""
    return record.model_copy(
        update={
            "id": decision_id(experiment, seq),
            "seq": seq,
            "time": now,
            "outcome": "rejected",
            "verdict": verdict[:MAX_RATIONALE_CHARS],
            "new_trial": None,
            "follows": follows,
        }
    )


def failed_record(
    experiment: str, seq: int, record: DecisionRecord, trial: str, message: str, now: str
) -> DecisionRecord:
    """A follow-up at sequence number `seq`: the world refused, for good, what `record` asked of
    `trial` (DecisionFailed)."""
    launched = trial == record.new_trial
    what = "launching" if launched else ("changing" if record.decision.mode == "in-place" else "stopping")
    if record.decision.action == CLEAN_UP:
        what = f"deleting the {record.decision.removes} of"
    return record.model_copy(
        update={
            "id": decision_id(experiment, seq),
            "seq": seq,
            "time": now,
            "outcome": "failed",
            "verdict": f"{what} {trial} failed: {message}"[:MAX_RATIONALE_CHARS],
            "new_trial": trial if launched else None,
            "decision": record.decision.model_copy(update={"trial": record.decision.trial if launched else trial}),
            "follows": record.id,
            "observation": {},
        }
    )


def observation_summary(status: AgentExperimentStatus, observation: Observation) -> dict[str, Any]:
    """What the policy saw, small enough for every ledger line: active trials first, then the newest."""
    active = [trial for trial in status.trials if not trial.finished]
    finished = [trial for trial in reversed(status.trials) if trial.finished]
    shown = (active + finished)[:MAX_SUMMARY_TRIALS]
    return {
        "time": observation.time,
        "best": {"trial": status.best_trial.name, "objective": status.best_trial.objective}
        if status.best_trial
        else None,
        "trials": {
            trial.name: {"state": trial.state, "step": trial.step, "objective": trial.objective} for trial in shown
        },
    }


def _copy(limits: Any) -> Any:
    try:
        return copy.deepcopy(limits)
    except Exception:  # an uncopyable quota object: the policy plans without it; guardrails still apply it
        return None


def _sanitize(item: object, policy: Policy | str) -> Decision | None:
    """A fresh, validated Decision in the policy's own name, or None for anything that is not one.

    A policy that speaks with several voices (Claude's keeps the heuristic's safety stops, and falls
    back to it) names them in `voices`; a decision keeps its name only if it is one of them."""
    try:
        raw = item.model_dump(warnings=False) if isinstance(item, Decision) else item
        decision = Decision.model_validate(raw)
    except Exception:  # anything at all that does not make a valid Decision is dropped
        return None
    name = policy if isinstance(policy, str) else policy.name
    voices = getattr(policy, "voices", (name,))
    said = decision.policy
    speaks = any(said == voice or said.startswith(f"{voice} (") for voice in voices)
    return decision.model_copy(
        update={
            "policy": said[:MAX_REASON_CHARS] if speaks else name,
            "reason": decision.reason[:MAX_REASON_CHARS],
            "rationale": decision.rationale[:MAX_RATIONALE_CHARS],
        }
    )


def before_after(decision: Decision, status: AgentExperimentStatus) -> tuple[dict[str, Any], dict[str, Any]]:
    """The target's settings before and after, for the audit trail."""
    if decision.action == "launch":
        parent = status.trial(decision.parent) if decision.parent else None
        return (dict(parent.hyperparameters) if parent else {}), dict(decision.hyperparameters)
    target = status.trial(decision.trial) if decision.trial else None
    if target is None:
        return {}, {}
    before: dict[str, Any] = dict(target.hyperparameters)
    if decision.action == "mutate":
        return before, {**before, **decision.hyperparameters}
    if decision.action == "scale":
        before |= {"nodes": target.nodes, "gpusPerNode": target.gpus_per_node}
        after = {
            **before,
            "nodes": decision.nodes if decision.nodes is not None else target.nodes,
            "gpusPerNode": decision.gpus_per_node if decision.gpus_per_node is not None else target.gpus_per_node,
        }
        return before, after
    return before, {}
