"""One decision cycle: ask the policy, check every proposal, and turn each into a record.

The engine trusts no policy. Proposals are re-validated, stamped with the policy's own name,
capped in number and length, and checked one by one against a provisional status that already
includes the earlier proposals of the same cycle (two launches both count against parallelism).
Rejected and held proposals are recorded too: the ledger shows what was asked, not only what
happened.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus
from trainpilot.core import guardrails
from trainpilot.core.decision import Decision, DecisionRecord, decision_id, trial_name
from trainpilot.core.observation import Observation
from trainpilot.core.policy.base import Policy, PolicyContext
from trainpilot.core.state import apply_record
from trainpilot.core.suggest import Suggester

MAX_DECISIONS_PER_CYCLE = 16
MAX_SUMMARY_TRIALS = 16
MAX_REASON_CHARS = 80
MAX_RATIONALE_CHARS = 2000


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
    """Records for this cycle's proposals (executed, rejected or held), and status with their effects.

    A policy that raises yields no records; `on_policy_error` lets the caller log why.
    """
    seen = observation_summary(status, observation)
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
    try:
        # Typed as object: a policy (an LLM's, above all) is not trusted to return what it declares.
        proposed: object = await policy.decide(context)
    except Exception as error:  # a broken policy must not stop the loop
        if on_policy_error is not None:
            on_policy_error(error)
        return [], status
    if not isinstance(proposed, (list, tuple)):
        return [], status

    records: list[DecisionRecord] = []
    provisional = status
    for item in proposed[:MAX_DECISIONS_PER_CYCLE]:
        decision = _sanitize(item, policy.name)
        if decision is None:
            continue
        verdict = guardrails.check(decision, spec, provisional, limits)
        seq = provisional.decisions_made
        creates_trial = decision.action in ("launch", "scale") or (
            decision.action == "mutate" and decision.mode == "restart"
        )
        before, after = _before_after(decision, provisional)
        record = DecisionRecord(
            id=decision_id(experiment, seq),
            seq=seq,
            time=now,
            experiment=experiment,
            decision=decision,
            outcome=verdict.outcome,
            verdict=verdict.reason,
            new_trial=trial_name(experiment, len(provisional.trials)) if verdict.executed and creates_trial else None,
            before=before,
            after=after,
            observation=seen,
        )
        records.append(record)
        provisional = apply_record(spec, provisional, record, now)
    return records, provisional


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


def _sanitize(item: object, policy: str) -> Decision | None:
    """A fresh, validated Decision in the policy's own name, or None for anything that is not one."""
    try:
        raw = item.model_dump(warnings=False) if isinstance(item, Decision) else item
        decision = Decision.model_validate(raw)
    except Exception:  # anything at all that does not make a valid Decision is dropped
        return None
    return decision.model_copy(
        update={
            "policy": policy,
            "reason": decision.reason[:MAX_REASON_CHARS],
            "rationale": decision.rationale[:MAX_RATIONALE_CHARS],
        }
    )


def _before_after(decision: Decision, status: AgentExperimentStatus) -> tuple[dict[str, Any], dict[str, Any]]:
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
