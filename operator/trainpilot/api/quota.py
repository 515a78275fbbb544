"""QuotaPolicy: the cluster admin's limits on experiments and on the agent's decisions.

A QuotaPolicy is cluster-scoped. It applies to the namespaces its `namespaceSelector` names,
or to every namespace when it has none. Several policies may match one namespace: they all
apply, so the strictest value of each limit wins (`effective_limits`). An unset limit is
unlimited. The guardrails in `core` compare decisions against the combined `QuotaLimits`.

`maxGPUs` is one pool per policy, shared by every experiment the policy matches: the limits an
experiment gets carry, for each such policy, the GPUs the *other* experiments hold right now
(`GPUPool`), and the guardrails add this experiment's own. `allowedImages` and
`allowedServiceAccounts` bound what trial pods run, since creating an experiment creates pods
as the operator (README, "Security").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from trainpilot.api.experiment import ALL_ACTIONS, FINISHED_TRIAL_STATES, Action, CamelModel, Condition
from trainpilot.api.trial import describe_validation_error

MAX_POLICY_NAMESPACES = 256
MAX_ALLOWED_ENTRIES = 64
# A trial pod with no serviceAccountName runs as this one, which every namespace has.
DEFAULT_SERVICE_ACCOUNT = "default"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class NamespaceSelector(CamelModel):
    """Which namespaces a policy covers."""

    match_names: list[str] = Field(
        min_length=1,
        max_length=MAX_POLICY_NAMESPACES,
        description="Namespaces this policy applies to, by exact name.",
    )

    def matches(self, namespace: str) -> bool:
        return namespace in self.match_names


class LLMQuota(CamelModel):
    allowed: bool = Field(True, description="false: experiments here decide with the heuristic only.")
    models: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        None, max_length=MAX_ALLOWED_ENTRIES, description="Models an LLM policy may call; any when absent."
    )
    max_tokens_per_day: int | None = Field(
        None, ge=0, description="LLM tokens (in and out) each matched namespace may use per UTC day."
    )


class QuotaPolicySpec(CamelModel):
    namespace_selector: NamespaceSelector | None = Field(
        None, description="Namespaces this policy applies to; all namespaces when absent."
    )
    max_gpus: int | None = Field(
        None,
        ge=0,
        alias="maxGPUs",
        description="GPUs in use at once across the unfinished trials of all matched experiments together.",
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
    allowed_images: list[Annotated[str, Field(min_length=1, max_length=512)]] | None = Field(
        None,
        max_length=MAX_ALLOWED_ENTRIES,
        description="Image prefixes trial pods may use, matched against trialTemplate.image as written: "
        "'ghcr.io/org/' allows a registry path, 'ghcr.io/org/trainer:' (or '@') one repository; any when absent.",
    )
    allowed_service_accounts: list[Annotated[str, Field(max_length=253, pattern=_DNS_SUBDOMAIN)]] | None = Field(
        None,
        max_length=MAX_ALLOWED_ENTRIES,
        description="Service accounts trial pods may run as, besides the namespace's default; "
        "[] allows only the default, absent allows any.",
    )

    max_gpu_hours_per_period: float | None = Field(
        None,
        ge=0,
        alias="maxGPUHoursPerPeriod",
        description="GPU-hours each matched namespace may spend within any rolling periodDays, all its "
        "experiments together (deleted ones included); past it, launches and scales wait.",
    )
    period_days: int = Field(7, ge=1, le=366, description="The rolling period of maxGPUHoursPerPeriod, in days.")
    llm: LLMQuota | None = Field(None, description="Whether and how much an LLM policy may be used; any when absent.")

    def applies_to(self, namespace: str) -> bool:
        return self.namespace_selector is None or self.namespace_selector.matches(namespace)


class NamespaceUsage(CamelModel):
    """What one matched namespace has used, as of the policy's last accounting."""

    namespace: str
    gpus_now: int = Field(0, ge=0, alias="gpusNow", description="GPUs its unfinished trials hold.")
    gpu_hours_in_period: float = Field(0.0, ge=0, alias="gpuHoursInPeriod")
    tokens_today: int = Field(0, ge=0, description="LLM tokens (in and out) since 00:00 UTC.")


class UsageBucket(CamelModel):
    """GPU-hours and tokens one namespace spent on one UTC day: what the rolling period sums."""

    namespace: str
    day: str = Field(description="YYYY-MM-DD, UTC.")
    gpu_hours: float = Field(0.0, ge=0, alias="gpuHours")
    tokens: int = Field(0, ge=0)


class Accounted(CamelModel):
    """How much of one experiment's (cumulative) usage is already in the buckets, by its uid."""

    uid: str
    namespace: str
    gpu_hours: float = Field(0.0, ge=0, alias="gpuHours")
    tokens: int = Field(0, ge=0)


class QuotaPolicyStatus(CamelModel):
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    usage: list[NamespaceUsage] = Field(default_factory=list, description="Per matched namespace with any use.")
    totals: NamespaceUsage | None = Field(None, description="All matched namespaces together (printer columns).")
    accounted_at: str | None = None
    buckets: list[UsageBucket] = Field(
        default_factory=list,
        description="Daily usage within the period, kept here "
        "so it survives operator restarts and deleted experiments.",
    )
    accounted: list[Accounted] = Field(default_factory=list, description="Usage of each live experiment counted.")


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


class GPUPool(CamelModel):
    """One policy's maxGPUs, shared by all the experiments it matches."""

    policy: str = Field(description="The QuotaPolicy's name.")
    max_gpus: int = Field(ge=0, alias="maxGPUs")
    used_elsewhere: int = Field(
        0, ge=0, description="GPUs the unfinished trials of the policy's other experiments hold now."
    )


class PeriodPool(CamelModel):
    """One policy's maxGPUHoursPerPeriod for this experiment's namespace, and what it has spent."""

    policy: str
    max_gpu_hours: float = Field(alias="maxGPUHours")
    days: int
    used: float = 0.0


class TokenPool(CamelModel):
    """One policy's llm.maxTokensPerDay for this experiment's namespace, and what it used today."""

    policy: str
    max_tokens: int
    used_today: int = 0


class QuotaLimits(CamelModel):
    """The limits in force for one experiment: every matching policy combined, strictest first.

    None means unlimited (no policy sets it). `sources` names, for each limit that is set, the
    policy it comes from, so a rejected decision can say which policy to talk to. `max_gpus` is
    the smallest maxGPUs as if this experiment were alone; `gpu_pools` are what counts across
    experiments (one per policy that sets maxGPUs).
    """

    max_gpus: int | None = Field(None, alias="maxGPUs")
    max_parallel_trials: int | None = None
    max_trials_per_experiment: int | None = None
    max_gpu_hours_per_experiment: float | None = Field(None, alias="maxGPUHoursPerExperiment")
    max_nodes_per_trial: int | None = None
    max_gpus_per_node: int | None = Field(None, alias="maxGPUsPerNode")
    allowed_actions: list[Action] | None = Field(None, description="None: every action is allowed.")
    require_approval_for: list[Action] = Field(default_factory=list)
    gpu_pools: list[GPUPool] = Field(default_factory=list)
    allowed_images: list[str] | None = Field(None, description="None: any image; []: none.")
    allowed_service_accounts: list[str] | None = Field(
        None, description="None: any; otherwise these and the namespace's default."
    )
    period_pools: list[PeriodPool] = Field(default_factory=list)
    llm_allowed: bool = True
    llm_models: list[str] | None = Field(None, description="None: any model.")
    token_pools: list[TokenPool] = Field(default_factory=list)
    sources: dict[str, str] = Field(
        default_factory=dict,
        description="Limit (snake_case) -> the policy (or, for approvals, policies) it comes from.",
    )

    def described(self) -> dict[str, str]:
        """Each bound in force, with the policy that set it: what `kubectl describe aexp` shows."""
        shown: dict[str, str] = {}
        for name in NUMERIC_LIMITS:
            value = getattr(self, name)
            if value is not None and name != "max_gpus":
                shown[to_camel(name).replace("Gpu", "GPU")] = f"{value:g} (QuotaPolicy {self.sources.get(name, '?')})"
        for pool in self.gpu_pools:
            shown[f"maxGPUs/{pool.policy}"] = f"{pool.max_gpus} shared, {pool.used_elsewhere} held by other experiments"
        for period in self.period_pools:
            shown[f"maxGPUHoursPerPeriod/{period.policy}"] = (
                f"{period.max_gpu_hours:g} per {period.days} days, {period.used:g} used in this namespace"
            )
        for tokens in self.token_pools:
            shown[f"llm.maxTokensPerDay/{tokens.policy}"] = f"{tokens.max_tokens}, {tokens.used_today} used today"
        if self.allowed_actions is not None:
            shown["allowedActions"] = f"{self.allowed_actions} (QuotaPolicy {self.sources.get('allowed_actions', '?')})"
        if self.require_approval_for:
            approvers = self.sources.get("require_approval_for", "?")
            shown["requireApprovalFor"] = f"{self.require_approval_for} (QuotaPolicy {approvers})"
        if not self.llm_allowed:
            shown["llm.allowed"] = f"false (QuotaPolicy {self.sources.get('llm_allowed', '?')})"
        if self.llm_models is not None:
            shown["llm.models"] = f"{self.llm_models} (QuotaPolicy {self.sources.get('llm_models', '?')})"
        return shown

    def llm_refusal(self, model: str) -> str | None:
        """Why the QuotaPolicies refuse an LLM call to `model` now; None when they allow it."""
        if not self.llm_allowed:
            return f"QuotaPolicy {self.sources.get('llm_allowed', '?')} does not allow LLM use here"
        if self.llm_models is not None and model not in self.llm_models:
            return f"QuotaPolicy {self.sources.get('llm_models', '?')} allows only models {self.llm_models}"
        for pool in self.token_pools:
            if pool.used_today >= pool.max_tokens:
                return f"QuotaPolicy {pool.policy} llm.maxTokensPerDay {pool.max_tokens} spent today"
        return None

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
            and self.allowed_images is None
            and self.allowed_service_accounts is None
            and not self.period_pools
            and self.llm_allowed
            and self.llm_models is None
            and not self.token_pools
        )


def parse_quota_policy(obj: Mapping[str, Any]) -> QuotaPolicy:
    """Validate a raw QuotaPolicy object; ValueError names each bad field."""
    try:
        return QuotaPolicy.model_validate(obj)
    except ValidationError as error:
        name = (obj.get("metadata") or {}).get("name", "?") if isinstance(obj, Mapping) else "?"
        raise ValueError(f"QuotaPolicy {name}: " + describe_validation_error(error)) from None


def effective_limits(
    policies: Iterable[QuotaPolicy | Mapping[str, Any]],
    namespace: str,
    gpus_elsewhere: Mapping[str, int] | None = None,
) -> QuotaLimits:
    """Combine every policy that applies to `namespace`; the strictest value of each limit wins.

    Numeric limits take the minimum, allowedActions the intersection (in ALL_ACTIONS order),
    requireApprovalFor the union, allowedImages and allowedServiceAccounts the intersection (an
    image or account must pass every policy). `gpus_elsewhere` maps each namespace to the GPUs
    held there by experiments other than the one these limits are for; each maxGPUs policy's
    pool sums it over the namespaces the policy matches.
    Raw dicts (as kopf hands them over) are parsed first and raise ValueError when invalid: a
    broken policy must not silently lift a limit. Policies are visited in name order so that
    `sources` is deterministic on ties.
    """
    parsed = [p if isinstance(p, QuotaPolicy) else parse_quota_policy(p) for p in policies]
    elsewhere = dict(gpus_elsewhere or {})
    limits: dict[str, Any] = {}
    sources: dict[str, str] = {}
    allowed: set[str] | None = None
    approval: set[str] = set()
    approvers: list[str] = []
    pools: list[GPUPool] = []
    images: list[str] | None = None
    accounts: set[str] | None = None
    narrowed_by: dict[str, list[str]] = {"allowed_images": [], "allowed_service_accounts": [], "llm_models": []}
    llm: dict[str, Any] = {"llm_allowed": True, "llm_models": None, "period_pools": [], "token_pools": []}
    for policy in sorted(parsed, key=lambda p: p.name):
        spec = policy.spec
        if not spec.applies_to(namespace):
            continue
        _add_usage_limits(policy, namespace, llm, sources, narrowed_by["llm_models"])
        if spec.max_gpus is not None:
            used = sum(gpus for other, gpus in elsewhere.items() if spec.applies_to(other))
            pools.append(GPUPool(policy=policy.name, max_gpus=spec.max_gpus, used_elsewhere=used))
        if spec.allowed_images is not None:
            images = list(spec.allowed_images) if images is None else _intersect_prefixes(images, spec.allowed_images)
            narrowed_by["allowed_images"].append(policy.name)
        if spec.allowed_service_accounts is not None:
            names = set(spec.allowed_service_accounts)
            accounts = names if accounts is None else accounts & names
            narrowed_by["allowed_service_accounts"].append(policy.name)
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
    sources.update({name: ", ".join(names) for name, names in narrowed_by.items() if names})
    return QuotaLimits(
        **limits,
        allowed_actions=None if allowed is None else [a for a in ALL_ACTIONS if a in allowed],
        require_approval_for=[a for a in ALL_ACTIONS if a in approval],
        gpu_pools=pools,
        allowed_images=None if images is None else _minimal_prefixes(images),
        allowed_service_accounts=None if accounts is None else sorted(accounts),
        sources=sources,
        **llm,
    )


def _add_usage_limits(
    policy: QuotaPolicy, namespace: str, limits: dict[str, Any], sources: dict[str, str], narrowing: list[str]
) -> None:
    """The limits on what a namespace spends over time (GPU-hours per period, LLM use), with what the
    policy's last accounting says it has spent."""
    spec = policy.spec
    here = next((usage for usage in policy.status.usage if usage.namespace == namespace), None)
    if spec.max_gpu_hours_per_period is not None:
        used = here.gpu_hours_in_period if here else 0.0
        pool = PeriodPool(
            policy=policy.name, max_gpu_hours=spec.max_gpu_hours_per_period, days=spec.period_days, used=used
        )
        limits["period_pools"].append(pool)
    if spec.llm is None:
        return
    if not spec.llm.allowed and limits["llm_allowed"]:
        limits["llm_allowed"] = False
        sources["llm_allowed"] = policy.name
    if spec.llm.models is not None:
        current = limits["llm_models"]
        limits["llm_models"] = sorted(set(spec.llm.models) if current is None else set(current) & set(spec.llm.models))
        narrowing.append(policy.name)
    if spec.llm.max_tokens_per_day is not None:
        used_today = here.tokens_today if here else 0
        limits["token_pools"].append(
            TokenPool(policy=policy.name, max_tokens=spec.llm.max_tokens_per_day, used_today=used_today)
        )


def _intersect_prefixes(first: Iterable[str], second: Iterable[str]) -> list[str]:
    """Prefixes whose images both lists allow: where one prefix extends the other, the longer one."""
    return [max(a, b, key=len) for a in first for b in second if a.startswith(b) or b.startswith(a)]


def _minimal_prefixes(prefixes: Iterable[str]) -> list[str]:
    """The same set of images, with no prefix that another one already covers, sorted."""
    unique = sorted(set(prefixes))
    return [p for p in unique if not any(p != other and p.startswith(other) for other in unique)]


def image_allowed(image: str, allowed_images: Iterable[str] | None) -> bool:
    """An image passes when it starts with one of the prefixes, exactly as written (None: any image)."""
    return allowed_images is None or any(image.startswith(prefix) for prefix in allowed_images)


def service_account_allowed(name: str | None, allowed: Iterable[str] | None) -> bool:
    """The namespace's default account (also what an unset name means) always passes; None: any."""
    account = name or DEFAULT_SERVICE_ACCOUNT
    return allowed is None or account == DEFAULT_SERVICE_ACCOUNT or account in allowed


def workload_refusal(limits: Any, image: str, service_account: str | None) -> str | None:
    """Why the QuotaPolicies refuse trial pods with this image or service account, or None.

    `limits` is duck-typed like the guardrails' (QuotaLimits, or anything with these attributes).
    """
    if limits is None:
        return None
    sources: Mapping[str, str] = getattr(limits, "sources", None) or {}
    images = getattr(limits, "allowed_images", None)
    if not image_allowed(image, images):
        return (
            f"trialTemplate.image {image!r} is not allowed by QuotaPolicy "
            f"{sources.get('allowed_images', '?')} (allowedImages: {list(images or [])}); use an image that "
            "starts with one of them, or ask the policy's owner to allow it"
        )
    accounts = getattr(limits, "allowed_service_accounts", None)
    if not service_account_allowed(service_account, accounts):
        return (
            f"trialTemplate.serviceAccountName {service_account!r} is not allowed by QuotaPolicy "
            f"{sources.get('allowed_service_accounts', '?')} (allowedServiceAccounts: {list(accounts or [])}, "
            f"and the namespace's {DEFAULT_SERVICE_ACCOUNT!r}); use one of them, or unset it to run as the default"
        )
    return None


def gpus_held(status: Mapping[str, Any] | None) -> int:
    """GPUs an experiment's unfinished trials hold, from its saved status (nodes x gpusPerNode)."""
    total = 0
    trials = (status or {}).get("trials")
    for trial in trials if isinstance(trials, list) else []:
        if not isinstance(trial, Mapping) or trial.get("state", "Pending") in FINISHED_TRIAL_STATES:
            continue
        nodes, gpus = trial.get("nodes", 1), trial.get("gpusPerNode", 0)
        if isinstance(nodes, int) and isinstance(gpus, int) and nodes > 0 and gpus > 0:
            total += nodes * gpus
    return total


def spent(status: Mapping[str, Any] | None) -> dict[str, Any]:
    """An experiment's cumulative GPU-hours and LLM tokens, from its saved status."""
    raw = status or {}
    hours = raw.get("gpuHoursUsed", 0.0)
    found = raw.get("modelUsage")
    usage: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    tokens = sum(int(usage.get(key) or 0) for key in ("inputTokens", "outputTokens"))
    return {"gpu_hours": float(hours) if isinstance(hours, (int, float)) else 0.0, "tokens": tokens}
