"""Guardrails: the one gate between a policy's proposal and the world.

Every decision, from any policy, is checked here against the search space, the budget, the
admin's quota and the allowed actions. Proposals are untrusted data: a trial name that does not
exist, a value outside the space or a string that reads like an instruction is rejected by the
same plain rules as any other mistake, never special-cased. Each rejection names the field and
the limit, so the ledger explains itself.

Quota limits are duck-typed (any object with some of these attributes; missing or None means
unlimited): max_gpus, max_parallel_trials, max_trials_per_experiment,
max_gpu_hours_per_experiment, max_nodes_per_trial, max_gpus_per_node, allowed_actions,
require_approval_for, allowed_images, allowed_service_accounts (with `sources` naming the
policies), and gpu_pools (api.quota.GPUPool: policy, max_gpus, used_elsewhere), each a maxGPUs
shared with other experiments: their GPUs plus this experiment's may not pass it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, TrialStatus
from trainpilot.api.quota import workload_refusal
from trainpilot.core.decision import IN_PLACE_HYPERPARAMETERS, Decision, Outcome
from trainpilot.core.state import max_steps, steps_committed, steps_trained

# What a TrialTemplate allows, so a scale cannot go where a spec could not.
MAX_NODES = 64
MAX_GPUS_PER_NODE = 16
UNLIMITED = sys.maxsize


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str = ""

    @property
    def executed(self) -> bool:
        return self.outcome == "executed"


class _Rejected(Exception):
    """Raised by a rule; its message is the verdict's reason."""


class _Waiting(_Rejected):
    """A QuotaPolicy bound that frees up (GPUs, slots, the rolling period) has no room now."""


def check(
    decision: Decision,
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    limits: Any = None,
    approved: bool = False,
) -> Verdict:
    """Executed, rejected (naming the field and the limit) or held for approval; `approved`: a human
    signed off on it, so only the approval requirement is waived."""
    try:
        _check_numbers(decision)
        _check_action_allowed(decision.action, spec, limits)
        if status.finished:
            raise _Rejected(f"the experiment has already finished (phase {status.phase})")
        _RULES[decision.action](decision, spec, status, limits)
    except _Waiting as waiting:
        return Verdict("waiting", str(waiting))
    except _Rejected as rejected:
        return Verdict("rejected", str(rejected))
    if not approved:
        held = approval_required(decision.action, spec, limits)
        if held is not None:
            return Verdict("pending-approval", held)
    return Verdict("executed")


def approval_required(action: str, spec: AgentExperimentSpec, limits: Any = None) -> str | None:
    """Which setting holds `action` for a human's sign-off; None when nothing does."""
    if action in spec.policy.require_approval_for:
        return f"spec.policy.requireApprovalFor includes {action!r}"
    if action in (_quota(limits, "require_approval_for") or ()):
        sources = _quota(limits, "sources") or {}
        source = sources.get("require_approval_for") if isinstance(sources, dict) else None
        return f"quota requireApprovalFor includes {action!r}" + (f" (QuotaPolicy {source})" if source else "")
    return None


def launch_capacity(
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    limits: Any = None,
    releasing: Collection[str] = (),
) -> int:
    """How many template-shaped trials every budget and quota still allows right now.

    `releasing`: trials about to be stopped in the same cycle, whose slots and GPUs count as free.
    """
    gpus = spec.trial_template.nodes * spec.trial_template.gpus_per_node
    steps = template_steps(spec)
    return min(allowance.room for allowance in _allowances(spec, status, limits, gpus, releasing, steps))


# A trial as the template defines it, not yet started: what one more launch costs.
_TEMPLATE = TrialStatus(name="", index=0)


def template_steps(spec: AgentExperimentSpec) -> int:
    """What a fresh trial of the template costs of spec.budget.maxTrialSteps."""
    return planned_steps(spec, _TEMPLATE)


def trial_steps_left(spec: AgentExperimentSpec, status: AgentExperimentStatus) -> int | None:
    """What maxTrialSteps leaves once it no longer pays for a fresh trial; None while it does (or is unset)."""
    limit = spec.budget.max_trial_steps
    if limit is None:
        return None
    left = limit - status.trial_steps_used
    return left if left < template_steps(spec) else None


def planned_steps(spec: AgentExperimentSpec, trial: TrialStatus, start: int | None = None) -> int:
    """The steps `trial` will train when it starts at step `start` (a checkpoint's): its cost in maxTrialSteps."""
    return max(max_steps(spec, trial) - (start or 0), 1)


# --------------------------------------------------------------------------------------------
# Rules that apply to every decision
# --------------------------------------------------------------------------------------------


def _check_numbers(decision: Decision) -> None:
    for name, value in decision.hyperparameters.items():
        if not _is_finite_number(value):
            raise _Rejected(f"hyperparameters.{_key(name)}: {_show(value)} is not a finite number")
    for field, count in (("nodes", decision.nodes), ("gpusPerNode", decision.gpus_per_node)):
        if count is not None and not (_is_finite_number(count) and float(count).is_integer()):
            raise _Rejected(f"{field}: {_show(count)} is not a whole number")


def _check_action_allowed(action: str, spec: AgentExperimentSpec, limits: Any) -> None:
    if not isinstance(action, str) or action not in _RULES:
        raise _Rejected(f"action {_show(action)} is not one of {sorted(_RULES)}")
    if action not in spec.policy.allowed_actions:
        raise _Rejected(f"action {action!r} is not in spec.policy.allowedActions {spec.policy.allowed_actions}")
    allowed = _quota(limits, "allowed_actions")
    if allowed is not None and action not in allowed:
        raise _Rejected(f"action {action!r} is not in quota allowed_actions {list(allowed)}")


# --------------------------------------------------------------------------------------------
# Per-action rules
# --------------------------------------------------------------------------------------------


def _check_launch(decision: Decision, spec: AgentExperimentSpec, status: AgentExperimentStatus, limits: Any) -> None:
    _check_point(decision.hyperparameters, spec, complete=True)
    for field, name in (("parent", decision.parent), ("resumeFrom", decision.resume_from)):
        if name is not None and status.trial(name) is None:
            raise _Rejected(f"{field}: there is no trial named {_show(name)}")
    start = None
    if decision.resume_from is not None:
        source = status.trial(decision.resume_from)
        if source is not None and source.checkpoint_step is None:
            raise _Rejected(f"resumeFrom: trial {source.name} has no checkpoint yet")
        if source is not None and "checkpoints" in source.removed:
            raise _Rejected(f"resumeFrom: trial {source.name}'s checkpoints were deleted under spec.retention")
        start = source.checkpoint_step if source is not None else None
    template = spec.trial_template
    nodes = decision.nodes if decision.nodes is not None else template.nodes
    gpus = decision.gpus_per_node if decision.gpus_per_node is not None else template.gpus_per_node
    _check_shape(nodes, gpus, limits)
    _check_workload(spec, limits)
    steps = planned_steps(spec, TrialStatus(name="", index=0, hyperparameters=decision.hyperparameters), start)
    _check_room(spec, status, limits, nodes * gpus, releasing=(), steps=steps)


def _check_terminate(decision: Decision, spec: AgentExperimentSpec, status: AgentExperimentStatus, limits: Any) -> None:
    _target(decision, status)


def _check_mutate(decision: Decision, spec: AgentExperimentSpec, status: AgentExperimentStatus, limits: Any) -> None:
    target = _target(decision, status)
    if not decision.hyperparameters:
        raise _Rejected("mutate: hyperparameters is empty; name what to change")
    _check_point(decision.hyperparameters, spec, complete=False)
    if decision.mode == "in-place":
        restart_only = sorted(set(decision.hyperparameters) - IN_PLACE_HYPERPARAMETERS)
        if restart_only:
            raise _Rejected(
                f"mode in-place can change only {sorted(IN_PLACE_HYPERPARAMETERS)}; "
                f"{', '.join(_show(name) for name in restart_only)} needs mode restart"
            )
    elif decision.mode == "restart":
        _check_workload(spec, limits)
        # A restart launches a child in the parent's slot: it costs a trial, not a slot.
        child = target.model_copy(update={"hyperparameters": {**target.hyperparameters, **decision.hyperparameters}})
        steps = planned_steps(spec, child, target.step)
        _check_room(spec, status, limits, target.nodes * target.gpus_per_node, releasing=(target.name,), steps=steps)
    else:
        raise _Rejected("mode: a mutate needs mode in-place or restart")


def _check_scale(decision: Decision, spec: AgentExperimentSpec, status: AgentExperimentStatus, limits: Any) -> None:
    target = _target(decision, status)
    if decision.nodes is None and decision.gpus_per_node is None:
        raise _Rejected("scale: give nodes, gpusPerNode or both")
    nodes = decision.nodes if decision.nodes is not None else target.nodes
    gpus = decision.gpus_per_node if decision.gpus_per_node is not None else target.gpus_per_node
    _check_shape(nodes, gpus, limits)
    _check_workload(spec, limits)
    steps = planned_steps(spec, target, target.step)
    _check_room(spec, status, limits, nodes * gpus, releasing=(target.name,), steps=steps)


def _check_complete(decision: Decision, spec: AgentExperimentSpec, status: AgentExperimentStatus, limits: Any) -> None:
    if decision.outcome not in ("succeeded", "failed"):
        raise _Rejected("complete: outcome must be succeeded or failed")


_RULES = {
    "launch": _check_launch,
    "terminate": _check_terminate,
    "mutate": _check_mutate,
    "scale": _check_scale,
    "complete": _check_complete,
}


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _target(decision: Decision, status: AgentExperimentStatus) -> TrialStatus:
    if decision.trial is None:
        raise _Rejected(f"{decision.action}: trial is required")
    trial = status.trial(decision.trial)
    if trial is None:
        raise _Rejected(f"trial: there is no trial named {_show(decision.trial)}")
    if trial.finished:
        raise _Rejected(f"trial: {trial.name} has already finished ({trial.state})")
    return trial


def _check_point(values: dict[str, float], spec: AgentExperimentSpec, complete: bool) -> None:
    """Values must lie in spec.searchSpace; a launch must also name every dimension of it."""
    for name, value in values.items():
        parameter = spec.parameter(name)
        if parameter is None:
            raise _Rejected(
                f"hyperparameters.{_key(name)}: not in spec.searchSpace "
                f"({', '.join(p.name for p in spec.search_space)})"
            )
        if not parameter.contains(value):
            raise _Rejected(f"hyperparameters.{name}: {value:g} is outside spec.searchSpace ({parameter.describe()})")
        if parameter.is_integer and not float(value).is_integer():
            raise _Rejected(f"hyperparameters.{name}: {value:g} must be a whole number")
    if complete:
        missing = [parameter.name for parameter in spec.search_space if parameter.name not in values]
        if missing:
            raise _Rejected(f"hyperparameters: missing {missing} from spec.searchSpace")


def _check_shape(nodes: int, gpus: int, limits: Any) -> None:
    if not 1 <= nodes <= MAX_NODES:
        raise _Rejected(f"nodes: {nodes} is outside 1..{MAX_NODES}")
    if not 0 <= gpus <= MAX_GPUS_PER_NODE:
        raise _Rejected(f"gpusPerNode: {gpus} is outside 0..{MAX_GPUS_PER_NODE}")
    for field, value, quota in (("nodes", nodes, "max_nodes_per_trial"), ("gpusPerNode", gpus, "max_gpus_per_node")):
        limit = _quota(limits, quota)
        if limit is not None and value > limit:
            raise _Rejected(f"{field}: {value} exceeds quota {quota} ({limit:g})")


def _check_workload(spec: AgentExperimentSpec, limits: Any) -> None:
    """Pods run the template's image as its service account: every matching QuotaPolicy must allow both."""
    template = spec.trial_template
    refusal = workload_refusal(limits, template.image, template.service_account_name)
    if refusal:
        raise _Rejected(refusal)


def _check_room(
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    limits: Any,
    gpus: int,
    releasing: Collection[str],
    steps: int,
) -> None:
    lines = _allowances(spec, status, limits, gpus, releasing, steps)
    # A bound that never frees up rejects first; then one that will (the decision waits for it).
    for allowance in sorted(lines, key=lambda line: line.frees_up):
        if allowance.room < 1:
            raise (_Waiting if allowance.frees_up else _Rejected)(allowance.describe())


@dataclass(frozen=True)
class _Allowance:
    """One budget or quota line: `limit`, of which `used` is spent; one more trial costs `cost`.

    A spend allowance (GPU hours, failures) cannot be priced ahead: it is open until used up.
    """

    field: str
    limit: float
    used: float
    unit: str
    cost: float = 1
    spend: bool = False
    tolerated: bool = False  # the limit itself may be reached (failures tolerated) but not passed
    frees_up: bool = False  # a QuotaPolicy bound that running trials or time give back: a decision waits

    @property
    def room(self) -> int:
        if self.spend:
            open_ = self.used <= self.limit if self.tolerated else self.used < self.limit
            return UNLIMITED if open_ else 0
        if self.cost <= 0:
            return UNLIMITED
        return max(int((self.limit - self.used) // self.cost), 0)

    def describe(self) -> str:
        if self.spend:
            return f"{self.field} is {self.limit:g} and {self.used:g} {self.unit} already"
        return f"{self.field} is {self.limit:g}: {self.used:g} {self.unit}, and this needs {self.cost:g} more"


def _allowances(
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    limits: Any,
    gpus: int,
    releasing: Collection[str],
    steps: int,
) -> list[_Allowance]:
    budget = spec.budget
    staying = [trial for trial in status.active_trials if trial.name not in releasing]
    running = len(staying)
    gpus_in_use = sum(trial.nodes * trial.gpus_per_node for trial in staying)
    launched = status.trials_launched
    lines = [
        _Allowance("spec.budget.maxTrials", budget.max_trials, launched, "trials launched"),
        _Allowance("spec.budget.parallelTrials", budget.parallel_trials, running, "trials running"),
    ]
    # maxFailedTrials counts failures tolerated, so launching stops only once it is exceeded.
    lines.append(
        _Allowance(
            "spec.budget.maxFailedTrials",
            budget.max_failed_trials,
            status.trials_failed,
            "trials failed",
            spend=True,
            tolerated=True,
        )
    )
    if budget.max_trial_steps is not None:
        # Priced ahead: a running trial holds all the steps it will train, so the budget is never
        # overrun, and a trial stopped early gives back what it did not train.
        committed = sum(steps_trained(t) if t.name in releasing else steps_committed(spec, t) for t in status.trials)
        lines.append(
            _Allowance("spec.budget.maxTrialSteps", budget.max_trial_steps, committed, "trial-steps committed", steps)
        )
    if budget.max_gpu_hours is not None:
        lines.append(
            _Allowance(
                "spec.budget.maxGPUHours", budget.max_gpu_hours, status.gpu_hours_used, "GPU-hours used", spend=True
            )
        )
    quota_lines = (  # name, used, unit, cost, spend, frees up
        ("max_trials_per_experiment", launched, "trials launched", 1, False, False),
        ("max_parallel_trials", running, "trials running", 1, False, True),
        ("max_gpus", gpus_in_use, "GPUs in use", gpus, False, True),
        ("max_gpu_hours_per_experiment", status.gpu_hours_used, "GPU-hours used", 0, True, False),
    )
    # Each policy's maxGPUs is shared: the GPUs its other experiments hold count against it too.
    for pool in _quota(limits, "gpu_pools") or ():
        unit = f"GPUs in use ({pool.used_elsewhere:g} of them by its other experiments)"
        used = pool.used_elsewhere + gpus_in_use
        field = f"QuotaPolicy {pool.policy} maxGPUs"
        lines.append(_Allowance(field, pool.max_gpus, used, unit, cost=gpus, frees_up=True))
    # A namespace's GPU-hours in a rolling period: spent by all its experiments, given back as days pass.
    for period in _quota(limits, "period_pools") or ():
        field = f"QuotaPolicy {period.policy} maxGPUHoursPerPeriod ({period.days} days)"
        unit = "GPU-hours used in the namespace"
        lines.append(_Allowance(field, period.max_gpu_hours, period.used, unit, spend=True, frees_up=True))
    for name, used, unit, cost, spend, frees_up in quota_lines:
        limit = _quota(limits, name)
        if limit is not None:
            source = (_quota(limits, "sources") or {}).get(name)
            field = f"QuotaPolicy {source} {name}" if isinstance(source, str) else f"quota {name}"
            lines.append(_Allowance(field, limit, used, unit, cost=cost, spend=spend, frees_up=frees_up))
    return lines


def _quota(limits: Any, name: str) -> Any:
    return getattr(limits, name, None) if limits is not None else None


def _is_finite_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _key(name: object) -> str:
    """A field name as written when it looks like one, else quoted like any other data."""
    return name if isinstance(name, str) and name.isidentifier() and len(name) <= 40 else _show(name)


def _show(value: object) -> str:
    """A proposal's own text, quoted and cut short: it is data in a message, never more."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
