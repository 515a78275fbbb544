"""QuotaPolicy: the cluster admin's limits on experiments and on the agent's decisions.

A QuotaPolicy is cluster-scoped. It applies to the namespaces its `namespaceSelector` names,
or to every namespace when it has none. Several policies may match one namespace: they all
apply, so the strictest value of each limit wins (`effective_limits`). An unset limit is
unlimited. The guardrails in `core` compare decisions against the combined `QuotaLimits`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from trainpilot.api.experiment import ALL_ACTIONS, Action, CamelModel, Condition
from trainpilot.api.trial import describe_validation_error

MAX_POLICY_NAMESPACES = 256


class NamespaceSelector(CamelModel):
    """Which namespaces a policy covers."""

    match_names: list[str] = Field(
        min_length=1,
        max_length=MAX_POLICY_NAMESPACES,
        description="Namespaces this policy applies to, by exact name.",
    )

    def matches(self, namespace: str) -> bool:
        return namespace in self.match_names


class QuotaPolicySpec(CamelModel):
    namespace_selector: NamespaceSelector | None = Field(
        None, description="Namespaces this policy applies to; all namespaces when absent."
    )
    max_gpus: int | None = Field(
        None,
        ge=0,
        alias="maxGPUs",
        description="GPUs in use at once across the running trials of all matched experiments.",
    )
    max_parallel_trials: int | None = Field(None, ge=0, description="Trials running at once per experiment.")
    max_trials_per_experiment: int | None = Field(
        None, ge=0, description="Trials one experiment may launch in total, relaunches included."
    )
    max_gpu_hours_per_experiment: float | None = Field(
        None, ge=0, alias="maxGPUHoursPerExperiment", description="GPU-hours one experiment may spend."
    )
    max_nodes_per_trial: int | None = Field(None, ge=1, description="Pods per trial at most.")
    max_gpus_per_node: int | None = Field(
        None, ge=0, alias="maxGPUsPerNode", description="nvidia.com/gpu per trial pod at most."
    )
    allowed_actions: list[Action] | None = Field(
        None,
        max_length=len(ALL_ACTIONS),
        description="Actions the agent may take in matched namespaces; all when absent.",
    )
    require_approval_for: list[Action] = Field(
        default_factory=list,
        max_length=len(ALL_ACTIONS),
        description="Actions that wait for a human's sign-off before they are carried out.",
    )

    def applies_to(self, namespace: str) -> bool:
        return self.namespace_selector is None or self.namespace_selector.matches(namespace)


class QuotaPolicyStatus(CamelModel):
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)


class QuotaPolicy(CamelModel):
    """The whole cluster-scoped object, as read from a YAML file or the API server."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    api_version: str = "trainpilot.dev/v1alpha1"
    kind: Literal["QuotaPolicy"] = "QuotaPolicy"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: QuotaPolicySpec = Field(default_factory=QuotaPolicySpec)
    status: QuotaPolicyStatus = Field(default_factory=QuotaPolicyStatus)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))


# The numeric limits: for each, the smallest value among matching policies wins.
NUMERIC_LIMITS: tuple[str, ...] = (
    "max_gpus",
    "max_parallel_trials",
    "max_trials_per_experiment",
    "max_gpu_hours_per_experiment",
    "max_nodes_per_trial",
    "max_gpus_per_node",
)


class QuotaLimits(CamelModel):
    """The limits in force in one namespace: every matching policy combined, strictest first.

    None means unlimited (no policy sets it). `sources` names, for each limit that is set, the
    policy it comes from, so a rejected decision can say which policy to talk to.
    """

    max_gpus: int | None = Field(None, alias="maxGPUs")
    max_parallel_trials: int | None = None
    max_trials_per_experiment: int | None = None
    max_gpu_hours_per_experiment: float | None = Field(None, alias="maxGPUHoursPerExperiment")
    max_nodes_per_trial: int | None = None
    max_gpus_per_node: int | None = Field(None, alias="maxGPUsPerNode")
    allowed_actions: list[Action] | None = Field(None, description="None: every action is allowed.")
    require_approval_for: list[Action] = Field(default_factory=list)
    sources: dict[str, str] = Field(
        default_factory=dict,
        description="Limit (snake_case) -> the policy (or, for approvals, policies) it comes from.",
    )

    def allows(self, action: str) -> bool:
        return self.allowed_actions is None or action in self.allowed_actions

    def needs_approval(self, action: str) -> bool:
        return action in self.require_approval_for

    @property
    def unlimited(self) -> bool:
        return (
            all(getattr(self, name) is None for name in NUMERIC_LIMITS)
            and self.allowed_actions is None
            and not self.require_approval_for
        )


def parse_quota_policy(obj: Mapping[str, Any]) -> QuotaPolicy:
    """Validate a raw QuotaPolicy object; ValueError names each bad field."""
    try:
        return QuotaPolicy.model_validate(obj)
    except ValidationError as error:
        name = (obj.get("metadata") or {}).get("name", "?") if isinstance(obj, Mapping) else "?"
        raise ValueError(f"QuotaPolicy {name}: " + describe_validation_error(error)) from None


def effective_limits(policies: Iterable[QuotaPolicy | Mapping[str, Any]], namespace: str) -> QuotaLimits:
    """Combine every policy that applies to `namespace`; the strictest value of each limit wins.

    Numeric limits take the minimum, allowedActions the intersection (in ALL_ACTIONS order),
    requireApprovalFor the union. Raw dicts (as kopf hands them over) are parsed first and
    raise ValueError when invalid: a broken policy must not silently lift a limit.
    Policies are visited in name order so that `sources` is deterministic on ties.
    """
    parsed = [p if isinstance(p, QuotaPolicy) else parse_quota_policy(p) for p in policies]
    limits: dict[str, Any] = {}
    sources: dict[str, str] = {}
    allowed: set[str] | None = None
    approval: set[str] = set()
    approvers: list[str] = []
    for policy in sorted(parsed, key=lambda p: p.name):
        spec = policy.spec
        if not spec.applies_to(namespace):
            continue
        for name in NUMERIC_LIMITS:
            value = getattr(spec, name)
            if value is not None and (limits.get(name) is None or value < limits[name]):
                limits[name] = value
                sources[name] = policy.name
        if spec.allowed_actions is not None:
            actions: set[str] = set(spec.allowed_actions)
            narrowed = actions if allowed is None else allowed & actions
            if narrowed != allowed:
                sources["allowed_actions"] = policy.name
            allowed = narrowed
        if set(spec.require_approval_for) - approval:
            approval |= set(spec.require_approval_for)
            approvers.append(policy.name)
    if approvers:
        sources["require_approval_for"] = ", ".join(approvers)
    return QuotaLimits(
        **limits,
        allowed_actions=None if allowed is None else [a for a in ALL_ACTIONS if a in allowed],
        require_approval_for=[a for a in ALL_ACTIONS if a in approval],
        sources=sources,
    )
