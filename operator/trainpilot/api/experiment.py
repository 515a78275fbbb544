"""AgentExperiment: the spec a user writes and the status the operator reports.

These models are the single source of truth: the CRD's OpenAPI schema is generated from them
(`trainpilot crds`), the operator and the local runner validate with them, and their field
descriptions are what `kubectl explain aexp.spec` shows. Wire names are camelCase.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from trainpilot.api import contract
from trainpilot.api.trial import (
    VALIDATION_SET_FIELDS,
    Hyperparameters,
    describe_validation_error,
    tunable_hyperparameters,
)

Action = Literal["launch", "terminate", "mutate", "scale", "complete"]
ALL_ACTIONS: tuple[Action, ...] = ("launch", "terminate", "mutate", "scale", "complete")
DEFAULT_IMAGE = "trainpilot/trainer:0.1.0"
# The built-in trainer's module: a template whose command runs it (`python -m trainpilot_trainer`)
# can only optimise what that trainer exports (contract.TRAINER_METRICS).
BUILTIN_TRAINER_MODULE = "trainpilot_trainer"
# The experiment's name starts every child's: Jobs and Services `<experiment>-tNNN` (a Service
# name is a DNS-1035 label: it must start with a letter), ConfigMaps `<experiment>-tNNN-config`
# and `<experiment>-ledger-N`, pod hostnames `<experiment>-tNNN-<index>` (at most 63 characters).
MAX_EXPERIMENT_NAME = 40
EXPERIMENT_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
EXPERIMENT_NAME_RULE = (
    f"metadata.name must be 1-{MAX_EXPERIMENT_NAME} lowercase letters, digits or '-', starting with a letter "
    "and ending with a letter or digit (e.g. lr-search-2), because trial Jobs, Services and pod hostnames "
    "are named after it"
)
# Extended resources that are GPUs (nvidia.com/gpu, amd.com/gpu): asked for with gpusPerNode only,
# so that the budget and the QuotaPolicy count every GPU a trial holds.
GPU_RESOURCE_SUFFIX = "/gpu"
MAX_RESOURCES_PER_KIND = 32
# Three tags: the newest, and two to fall back to (a relaunch resumes the newest; a tag a crash cut
# short is never named by `latest`). At 124M parameters a tag is about 1.7 GB.
DEFAULT_CHECKPOINT_TAGS = 3
DEFAULT_CHECKPOINT_TRIALS = 5
DEFAULT_CHILDREN_AFTER_SECONDS = 3600  # an hour to read a finished trial's pod logs with kubectl
RetainedPart = Literal["checkpoints", "children"]
MAX_ENV = 128


class CamelModel(BaseModel):
    """Base for wire models: camelCase on the wire, snake_case in Python, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=False,
    )

    def wire(self) -> dict[str, Any]:
        """The camelCase dict as stored in Kubernetes, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


class Objective(CamelModel):
    metric: str = Field(
        "val_loss",
        pattern=r"^[a-z][a-z0-9_]*$",
        description="Trainer metric to optimise; `val_loss` reads trainpilot_val_loss.",
    )
    direction: Literal["minimize", "maximize"] = Field("minimize", description="minimize or maximize.")
    goal: float | None = Field(None, description="Stop with success once a trial reaches this value.")

    def better(self, a: float, b: float) -> bool:
        """True when a is strictly better than b in this objective's direction."""
        return a < b if self.direction == "minimize" else a > b

    def reached(self, value: float) -> bool:
        if self.goal is None:
            return False
        return value <= self.goal if self.direction == "minimize" else value >= self.goal


class SearchParameter(CamelModel):
    """One dimension the agent may move: a numeric range (min/max, optionally log) or a list of values."""

    name: str = Field(max_length=64, description="A hyperparameter name, e.g. lr, weight_decay, micro_batch.")
    min: float | None = Field(None, description="Lower bound (inclusive) of a range.")
    max: float | None = Field(None, description="Upper bound (inclusive) of a range.")
    log: bool = Field(False, description="Sample the range on a log scale (needs min > 0).")
    values: list[float] | None = Field(None, min_length=1, max_length=64, description="Allowed values.")

    @model_validator(mode="after")
    def _check_shape(self) -> SearchParameter:
        if self.values is not None:
            if self.min is not None or self.max is not None:
                raise ValueError(f"searchSpace[{self.name}]: give either values or min/max, not both")
            return self
        if self.min is None or self.max is None:
            raise ValueError(f"searchSpace[{self.name}]: a range needs both min and max (or give values)")
        if not self.min < self.max:
            raise ValueError(f"searchSpace[{self.name}]: min ({self.min}) must be below max ({self.max})")
        if self.log and self.min <= 0:
            raise ValueError(f"searchSpace[{self.name}]: log scale needs min > 0 (got {self.min})")
        return self

    @property
    def is_integer(self) -> bool:
        return tunable_hyperparameters().get(self.name) is int

    def contains(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.values is not None:
            return any(math.isclose(value, allowed, rel_tol=1e-9, abs_tol=1e-12) for allowed in self.values)
        assert self.min is not None and self.max is not None
        tolerance = 1e-9 * max(abs(self.min), abs(self.max), 1.0)
        return self.min - tolerance <= value <= self.max + tolerance

    def clamp(self, value: float) -> float:
        """The nearest allowed value: used when a rule (say, lr x 0.1) would step outside."""
        if self.values is not None:
            return min(self.values, key=lambda allowed: abs(allowed - value))
        assert self.min is not None and self.max is not None
        return min(max(value, self.min), self.max)

    def step_from(self, value: float, factor: float) -> float:
        """`value` times `factor`, kept in the space (PBT's explore): a listed choice moves to its
        neighbour in the factor's direction, a whole number is rounded."""
        if self.values is not None:
            ordered = sorted(set(self.values))
            index = ordered.index(self.clamp(value)) + (1 if factor > 1 else -1)
            return ordered[min(max(index, 0), len(ordered) - 1)]
        moved = self.clamp(value * factor)
        return float(round(moved)) if self.is_integer else moved

    def describe(self) -> str:
        if self.values is not None:
            return f"one of {self.values}"
        return f"in [{self.min}, {self.max}]" + (" (log)" if self.log else "")


class CheckpointVolume(CamelModel):
    claim_name: str = Field(description="A PersistentVolumeClaim for checkpoints (ReadWriteMany for several nodes).")
    mount_path: str = Field("/checkpoints", description="Where the claim is mounted in trial pods.")


class TrialTemplate(CamelModel):
    image: str = Field(DEFAULT_IMAGE, min_length=1, description="Trainer image (ignored by `trainpilot run`).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    command: list[str] = Field(
        default_factory=lambda: ["python", "-m", BUILTIN_TRAINER_MODULE],
        min_length=1,
        description="Trainer entry point; torchrun wraps it when a trial has several processes.",
    )
    nodes: int = Field(1, ge=1, le=64, description="Pods per trial (Indexed Job completions).")
    gpus_per_node: int = Field(
        0,
        ge=0,
        le=16,
        alias="gpusPerNode",
        description="nvidia.com/gpu per pod; 0 runs on CPU. The only way to ask for GPUs (quota counts them here).",
    )
    processes_per_node: int | None = Field(
        None, ge=1, le=64, description="Training processes per pod (default: gpusPerNode, or 1 on CPU)."
    )
    # Bounded so that the CRD's CEL rules over them stay cheap.
    resources: dict[str, Annotated[dict[str, str], Field(max_length=MAX_RESOURCES_PER_KIND)]] = Field(
        default_factory=dict,
        description="Pod resources: {requests: {...}, limits: {...}}; no GPUs here, use gpusPerNode.",
    )
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict,
        description="Fixed trainer settings shared by every trial (model shape, dataset, max_steps, ...).",
    )
    checkpoints: CheckpointVolume | None = Field(None, description="Checkpoint volume; without it, no resume.")
    env: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_ENV,
        description="Extra environment for trial pods; not TRAINPILOT_*, PET_*, CUDA_VISIBLE_DEVICES and other "
        "variables the operator or torchrun sets.",
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    service_account_name: str | None = Field(
        None, description="Service account of trial pods (the namespace's default when unset); see QuotaPolicy."
    )
    pending_timeout_seconds: int = Field(
        600,
        ge=5,
        le=7 * 86_400,
        description="A trial whose pods are still not running after this long (unschedulable, an image that "
        "cannot be pulled, a missing ConfigMap) fails with the pod's reason and frees its slot. Time in a "
        "suspended (queued) Job does not count. Cluster only.",
    )

    @field_validator("resources")
    @classmethod
    def _check_resources(cls, value: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        unknown = set(value) - {"requests", "limits"}
        if unknown:
            raise ValueError(f"only requests and limits are allowed, not {sorted(unknown)}")
        for kind, quantities in value.items():
            gpus = sorted(name for name in quantities if name.endswith(GPU_RESOURCE_SUFFIX))
            if gpus:
                raise ValueError(
                    f"{kind}.{gpus[0]}: GPUs are asked for with trialTemplate.gpusPerNode (which the budget and "
                    "the QuotaPolicy count), not in resources; remove it here and set gpusPerNode"
                )
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = sorted(name for name in value if contract.is_reserved_env(name))
        if reserved:
            raise ValueError(
                f"{', '.join(reserved)}: the operator or torchrun sets these for every trial (TRAINPILOT_*, "
                "PET_*, TORCHELASTIC_*, the rank and world size, the visible GPUs, which gpusPerNode asks for), "
                "so trialTemplate.env may not override them; remove them"
            )
        return value

    @property
    def runs_builtin_trainer(self) -> bool:
        """True when the command runs the built-in trainer (`... -m trainpilot_trainer ...`)."""
        return any(
            flag == "-m" and module == BUILTIN_TRAINER_MODULE
            for flag, module in zip(self.command, self.command[1:], strict=False)
        )

    @field_validator("hyperparameters")
    @classmethod
    def _check_hyperparameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            Hyperparameters.model_validate(value)
        except ValidationError as error:
            raise ValueError(describe_validation_error(error)) from None
        return value

    @property
    def processes(self) -> int:
        if self.processes_per_node is not None:
            return self.processes_per_node
        return max(self.gpus_per_node, 1)


class Budget(CamelModel):
    max_trials: int = Field(8, ge=1, le=500, description="Trials to launch at most, relaunches included.")
    parallel_trials: int = Field(2, ge=1, le=64, description="Trials running at once at most.")
    max_failed_trials: int = Field(
        3,
        ge=0,
        le=500,
        description="Crashed trials tolerated; one more fails the experiment. Diverged trials do not count.",
    )
    max_gpu_hours: float | None = Field(
        None, gt=0, alias="maxGPUHours", description="GPU-hours to spend at most (nodes x GPUs x hours)."
    )
    max_trial_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000_000,
        description="Optimizer steps to spend at most, summed over trials (each counts the steps it trains "
        "itself, not those of a checkpoint it resumed). A launch is refused unless the steps every running "
        "trial still has to go and its own fit: compute, comparable on CPUs where GPU-hours are zero.",
    )


class HeuristicSettings(CamelModel):
    """Thresholds of the built-in policy; every rule is named here, none is hidden in code."""

    divergence_lr_factor: float = Field(0.1, gt=0, lt=1, description="lr multiplier for a relaunch after divergence.")
    spike_factor: float = Field(3.0, gt=1, description="Terminate when smoothed loss exceeds this x its best.")
    smoothing: float = Field(0.5, gt=0, le=1, description="EMA weight of the newest loss in spike detection.")
    oscillation_window: int = Field(6, ge=3, le=50, description="Recent validation points checked for oscillation.")
    oscillation_reversals: int = Field(
        4, ge=2, le=49, description="Direction changes in the window that count as oscillating."
    )
    oscillation_min_amplitude: float = Field(0.05, ge=0, description="Relative swing below which reversals are noise.")
    rungs: list[float] = Field(
        default_factory=lambda: [0.25, 0.5],
        max_length=8,
        description="ASHA rungs as fractions of max_steps where losing trials are stopped.",
    )
    reduction_factor: float = Field(3.0, gt=1, description="ASHA eta: keep the best 1/eta at each rung.")
    min_peers_at_rung: int = Field(2, ge=1, description="Trials needed at a rung before anyone is stopped there.")
    max_relaunches: int = Field(2, ge=0, le=10, description="Relaunches of one lineage after divergence.")
    seed: int = Field(0, ge=0, description="Seeds the Optuna TPE sampler and the explore draws.")
    startup_trials: int = Field(4, ge=1, le=100, description="Random suggestions before TPE models the space.")
    diverged_told_as: Literal["worst", "fail"] = Field(
        "worst",
        description="What TPE is told of a diverged trial: worst (the worst objective of any scored trial, so it "
        "stops proposing the region that diverged) or fail (Optuna's FAIL, which TPE ignores).",
    )
    stagnation_evaluations: int = Field(
        4,
        ge=0,
        le=11,  # status keeps 12 evaluations: the window and one before it
        description="Evaluations in a row that do not improve a running trial's best by stagnationMinImprovement: "
        "a plateau. Its lr is cut in place first (plateauLrFactor, up to maxLrCuts times), then it is stopped. "
        "0: never.",
    )
    stagnation_min_improvement: float = Field(
        0.002, ge=0, lt=1, description="Relative improvement of the best objective that counts as progress."
    )
    plateau_lr_factor: float = Field(0.5, gt=0, lt=1, description="lr multiplier of an in-place cut on a plateau.")
    max_lr_cuts: int = Field(
        1, ge=0, le=10, description="In-place lr changes a trial may have had before a plateau stops it."
    )
    exploit: bool = Field(
        True,
        description="PBT exploit/explore at ASHA rungs: a trial stopped at a rung is replaced by a child of the "
        "rung's best trial, resumed from its checkpoint with values perturbed by exploreFactors.",
    )
    exploit_interval: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="PBT among the running trials, every this fraction of max_steps a trial trains: a running trial "
        "in the bottom exploitQuantile of the running population (on its latest objective) is replaced by a child "
        "of one in the top, resumed from its checkpoint with values perturbed by exploreFactors. 0: exploit at "
        "rungs only. Needs exploit.",
    )
    exploit_quantile: float = Field(
        0.25,
        gt=0,
        le=0.5,
        description="Share of the running population that is the bottom (and the top) of a population exploit: at "
        "least one trial, at most half.",
    )
    explore_factors: list[float] = Field(
        default_factory=lambda: [0.8, 1.2],
        min_length=1,
        max_length=4,
        description="Each searched value of an exploit child is its parent's times one of these (a seeded draw), "
        "clamped into the space; a listed choice moves to its neighbour.",
    )

    scale_leader_nodes: int = Field(
        0,
        ge=0,
        le=64,
        description="Nodes to give a running trial that leads every other by scaleLead, once no new trial can be "
        "launched and a slot is idle: it restarts from its checkpoint on that many nodes (a larger global batch: "
        "micro_batch is per rank). ZeRO-3 trials are never scaled (their checkpoints keep their world size). "
        "0: never.",
    )
    scale_lead: float = Field(
        0.02, ge=0, lt=1, description="Relative margin by which a trial's objective must beat every other's best."
    )

    @field_validator("explore_factors")
    @classmethod
    def _check_explore_factors(cls, value: list[float]) -> list[float]:
        if any(not (0 < factor < 10) or factor == 1 for factor in value):
            raise ValueError("each explore factor is a multiplier in (0, 10) other than 1")
        return value

    @field_validator("rungs")
    @classmethod
    def _check_rungs(cls, value: list[float]) -> list[float]:
        if any(not 0 < fraction < 1 for fraction in value):
            raise ValueError("each rung is a fraction of max_steps strictly between 0 and 1")
        if value != sorted(set(value)):
            raise ValueError("rungs must be strictly increasing")
        return value


# Pinned, never looked up at run time: an SDK upgrade cannot change the model an experiment uses.
# A current small model (tests/policy check it against the installed SDK's list, deprecated ones out).
DEFAULT_CLAUDE_MODEL = "claude-haiku-5-5"


class TokenPrice(CamelModel):
    input: float = Field(ge=0, description="US dollars per million input tokens.")
    output: float = Field(ge=0, description="US dollars per million output tokens.")


class ClaudeSettings(CamelModel):
    """How the Claude policy steers: Optuna proposes every trial, Claude may override a share of them
    and review the running ones; the heuristic's safety rules act whatever Claude says."""

    model: str = Field(DEFAULT_CLAUDE_MODEL, min_length=1, max_length=100, description="Anthropic model id.")
    override_share: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Share of launches on which Claude may replace Optuna's proposal (a seeded draw per "
        "launch, so a replay picks the same ones). Higher shares did worse in published benchmarks.",
    )
    min_interval_seconds: int = Field(
        60, ge=0, le=86_400, description="Ask Claude at most once per this many seconds; the heuristic decides between."
    )
    max_prompt_tokens: int = Field(
        6000, ge=1000, le=100_000, description="Upper bound on the prompt's size (estimated tokens): summaries only."
    )
    max_answer_tokens: int = Field(1024, ge=64, le=8192, description="max_tokens of each Claude answer.")
    request_timeout_seconds: float = Field(30.0, gt=0, le=600, description="Give up on one Claude call after this.")
    max_retries: int = Field(
        2, ge=0, le=10, description="Retries of a call that timed out or got 429/5xx (retry-after honoured)."
    )
    max_tokens: int | None = Field(
        None,
        ge=1000,
        description="Tokens (in and out) Claude may use in this experiment; past them the heuristic decides, "
        "its records saying so. Unset: no bound.",
    )
    price_per_million_tokens: TokenPrice | None = Field(
        None,
        description="US dollars per million tokens for the cost estimates in status.modelUsage and each "
        "decision's record (a gateway's, or a model the built-in price list does not know).",
    )


class ModelUsage(CamelModel):
    """What an LLM policy has used: every call counts, tokens as the API's usage reports them."""

    calls: int = Field(0, ge=0)
    input_tokens: int = Field(0, ge=0)
    output_tokens: int = Field(0, ge=0)
    estimated_cost_usd: float = Field(
        0.0, ge=0, description="List-price estimate of the calls whose model's price is known."
    )
    unpriced_calls: int = Field(0, ge=0, description="Calls to a model with no known price (not in the estimate).")

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def plus(self, other: ModelUsage) -> ModelUsage:
        return ModelUsage(
            calls=self.calls + other.calls,
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            estimated_cost_usd=round(self.estimated_cost_usd + other.estimated_cost_usd, 8),
            unpriced_calls=self.unpriced_calls + other.unpriced_calls,
        )


class PolicySpec(CamelModel):
    type: Literal["heuristic", "claude"] = Field("heuristic", description="heuristic (no LLM) or claude.")
    interval_seconds: int = Field(30, ge=1, le=86_400, description="Seconds between decision cycles.")
    allowed_actions: list[Action] = Field(
        default_factory=lambda: list(ALL_ACTIONS),
        description="Actions the policy may take; anything else is rejected and recorded.",
    )
    heuristic: HeuristicSettings = Field(default_factory=HeuristicSettings)
    claude: ClaudeSettings = Field(default_factory=ClaudeSettings)
    max_consecutive_failures: int = Field(
        5,
        ge=1,
        le=1000,
        description="Cycles in a row the policy may fail (raise, or answer with no list of decisions) before the "
        "experiment fails with its error; each failure sets the PolicyHealthy condition to False.",
    )
    require_approval_for: list[Action] = Field(
        default_factory=list,
        description="Actions held for a human's sign-off (DecisionPendingApproval): `trainpilot approve NAME ID` "
        "carries one out, `trainpilot reject NAME ID` drops it. A QuotaPolicy's requireApprovalFor adds to these.",
    )
    approval_timeout_seconds: int = Field(
        3600,
        ge=1,
        le=7 * 86_400,
        description="A held decision nobody approved within this many seconds expires (recorded as rejected); the "
        "policy may propose it again.",
    )


class MetricsEndpoint(CamelModel):
    """Where the trainers serve their metrics, and how the operator reads them."""

    port: int = Field(9400, ge=1, le=65535, description="Port the trainer serves /metrics on.")
    path: str = Field("/metrics", pattern=r"^/", description="Path of the metrics endpoint.")
    scrape_timeout_seconds: float = Field(2.0, gt=0, le=30, description="Give up on a slow scrape after this.")
    source: Literal["direct", "prometheus"] = Field(
        "direct",
        description="direct: the operator scrapes each trial's rank-0 pod at its pod IP. prometheus: it reads them "
        "from the Prometheus server the operator is given (Helm value prometheus.url), which scrapes the pods "
        "(the chart's podMonitor) with the experiment, trial, pod and namespace labels; for clusters where the "
        "operator may not reach pod IPs. trainpilot run always reads its trainers directly.",
    )
    max_sample_age_seconds: float = Field(
        120,
        ge=5,
        le=3600,
        description="source prometheus: a trial whose latest scrape is older than this has no data (the server "
        "lags, or no longer scrapes it). At least two of the server's scrape intervals.",
    )


class QueueSettings(CamelModel):
    """Kueue: trial Jobs go to a LocalQueue and wait there for admission."""

    name: str | None = Field(
        None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="The Kueue LocalQueue (label kueue.x-k8s.io/queue-name); trial Jobs start suspended and Kueue "
        "admits them. Unset: no queue, Jobs run at once.",
    )
    priority_class: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        description="A Kueue WorkloadPriorityClass for every trial Job (label kueue.x-k8s.io/priority-class).",
    )


class Retention(CamelModel):
    """What is deleted so that an experiment does not fill its volume (docs/trainer.md#checkpoints)."""

    checkpoint_tags: int | None = Field(
        DEFAULT_CHECKPOINT_TAGS,
        ge=1,
        le=1000,
        description="Checkpoint tags each trial keeps, the newest: older ones are deleted as it saves a new one. "
        "null keeps every tag.",
    )
    checkpoint_trials: int | None = Field(
        DEFAULT_CHECKPOINT_TRIALS,
        ge=0,
        le=1000,
        description="Finished trials whose checkpoints are kept besides the best trial's: the last this many to "
        "finish. The others' are deleted (never those an active trial resumes from). null keeps every trial's.",
    )
    children_after_seconds: int | None = Field(
        DEFAULT_CHILDREN_AFTER_SECONDS,
        ge=0,
        le=30 * 86_400,
        description="A finished trial's Job (with its pods), Service and ConfigMaps are deleted this long after it "
        "finished; its status, ledger records and logs stay. null keeps them.",
    )


class AgentExperimentSpec(CamelModel):
    objective: Objective = Field(default_factory=Objective)
    search_space: list[SearchParameter] = Field(min_length=1, max_length=32, description="Where the agent may move.")
    # Bounded per trial (at most one value per searchSpace entry) so the CRD's CEL rules stay cheap.
    initial_trials: list[Annotated[dict[str, float], Field(max_length=32)]] = Field(
        default_factory=list, max_length=64, description="Hyperparameters to try first, like a researcher would."
    )
    trial_template: TrialTemplate = Field(default_factory=TrialTemplate)
    budget: Budget = Field(default_factory=Budget)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    metrics: MetricsEndpoint = Field(default_factory=MetricsEndpoint)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    retention: Retention = Field(default_factory=Retention)
    suspend: bool = Field(
        False, description="Pause the agent: no decisions and no new trials until false; running trials go on."
    )

    @model_validator(mode="after")
    def _check_cross_fields(self) -> AgentExperimentSpec:
        tunable = tunable_hyperparameters()
        names = [parameter.name for parameter in self.search_space]
        for parameter in self.search_space:
            if parameter.name in VALIDATION_SET_FIELDS:
                raise ValueError(
                    f"searchSpace: {parameter.name} fixes the validation set every trial is scored on, so "
                    "trials that moved it could not be compared; set it in trialTemplate.hyperparameters instead"
                )
            if parameter.name not in tunable:
                raise ValueError(
                    f"searchSpace: unknown hyperparameter {parameter.name!r}; tunable ones are "
                    + ", ".join(sorted(tunable))
                )
        if self.queue.priority_class is not None and self.queue.name is None:
            raise ValueError(
                "queue.priorityClass is set but queue.name is not: Kueue only admits Jobs of a LocalQueue; "
                "set queue.name to one, or remove queue.priorityClass"
            )
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"searchSpace: {duplicates} listed more than once")
        if self.budget.parallel_trials > self.budget.max_trials:
            raise ValueError(
                f"budget.parallelTrials ({self.budget.parallel_trials}) must not exceed "
                f"budget.maxTrials ({self.budget.max_trials})"
            )
        space = {parameter.name: parameter for parameter in self.search_space}
        for index, trial in enumerate(self.initial_trials):
            for name, value in trial.items():
                if name not in space:
                    raise ValueError(f"initialTrials[{index}].{name}: not in searchSpace; add it there or drop it here")
                if not space[name].contains(value):
                    raise ValueError(
                        f"initialTrials[{index}].{name}: {value} is outside the search space ({space[name].describe()})"
                    )
        fixed = set(self.trial_template.hyperparameters) & set(space)
        if fixed:
            raise ValueError(
                f"trialTemplate.hyperparameters fixes {sorted(fixed)}, which searchSpace also moves; keep one"
            )
        # Every combination must make a valid trainer config; check the template with the space's corners.
        try:
            Hyperparameters.model_validate({**self.trial_template.hyperparameters, **self.corner(low=True)})
        except ValidationError as error:
            raise ValueError(
                "trialTemplate.hyperparameters with the search space's lower corner: "
                + describe_validation_error(error)
            ) from None
        return self

    def corner(self, low: bool) -> dict[str, float]:
        point: dict[str, float] = {}
        for parameter in self.search_space:
            if parameter.values is not None:
                value = min(parameter.values) if low else max(parameter.values)
            else:
                value = parameter.min if low else parameter.max  # type: ignore[assignment]
            point[parameter.name] = int(value) if parameter.is_integer else value
        return point

    def parameter(self, name: str) -> SearchParameter | None:
        return next((parameter for parameter in self.search_space if parameter.name == name), None)


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------

Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed", "Invalid"]
TrialState = Literal["Pending", "Running", "Succeeded", "Failed", "Diverged", "Terminated"]
FINISHED_TRIAL_STATES: frozenset[str] = frozenset({"Succeeded", "Failed", "Diverged", "Terminated"})
MAX_STATUS_DECISIONS = 20
MAX_TRIAL_HISTORY = 12
LAUNCH_KEY_LENGTH = 12
_OPAQUE_OBJECT = {"type": "object", "additionalProperties": True}


class LaunchSettings(CamelModel):
    """The parts of the spec a trial was launched with that an edit could change under it: it is
    scraped, stopped and resumed with these, and so are its restarts and relaunches from its
    checkpoints, whatever the spec says since (core.spec_edits, docs/spec-edits.md)."""

    objective: Objective
    trial_template: TrialTemplate
    metrics: MetricsEndpoint
    queue: QueueSettings

    @classmethod
    def of(cls, spec: AgentExperimentSpec) -> LaunchSettings:
        return cls(objective=spec.objective, trial_template=spec.trial_template, metrics=spec.metrics, queue=spec.queue)

    @property
    def key(self) -> str:
        """A digest naming these settings in status.launchSettings: equal settings, one entry."""
        return hashlib.sha256(self.model_dump_json(by_alias=True).encode()).hexdigest()[:LAUNCH_KEY_LENGTH]

    def applied_to(self, spec: AgentExperimentSpec) -> AgentExperimentSpec:
        """`spec` as the trial launched with these sees it: its own template, metrics endpoint and queue."""
        return spec.model_copy(
            update={"trial_template": self.trial_template, "metrics": self.metrics, "queue": self.queue}
        )


class Condition(CamelModel):
    """metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class TrialStatus(CamelModel):
    name: str
    index: int = Field(ge=0, description="Launch order, from 0.")
    hyperparameters: dict[str, float] = Field(default_factory=dict, description="The searched values.")
    state: TrialState = "Pending"
    decision: str = Field("", description="Id of the decision that launched it.")
    parent: str | None = Field(None, description="Trial it was derived from (mutate, scale, relaunch).")
    generation: int = Field(0, ge=0, description="Lineage depth: 0 for a fresh trial.")
    resumed_from_step: int | None = None
    waiting_for: str | None = Field(
        None,
        description="Trial whose pods must be gone before this one starts: the parent of a scale or restart-mutate, "
        "still saving its checkpoint on SIGTERM. The child then resumes the step the parent reported last.",
    )
    waiting_since: str | None = None
    nodes: int = 1
    gpus_per_node: int = Field(0, alias="gpusPerNode")
    step: int = 0
    max_steps: int | None = None
    train_loss: float | None = None
    objective: float | None = Field(None, description="Latest objective value.")
    best_objective: float | None = None
    checkpoint_step: int | None = None
    nonfinite_losses: int = 0
    loss_spikes: int = Field(
        0, ge=0, description="trainpilot_loss_spikes_total: steps at which the trainer saw its smoothed loss spike."
    )
    control_generation: int = 0
    changed_at_step: int | None = Field(
        None, description="Step at which its values last changed in place: a plateau is judged on what came after."
    )
    loss_floor: float | None = None
    validation_fingerprint: str | None = Field(
        None, description="trainpilot_validation_fingerprint as hex: the data its objective is measured on."
    )
    eval_step: int | None = Field(None, description="trainpilot_eval_step at the last scrape: its latest evaluation.")
    launch: str | None = Field(
        None, description="Key of the settings it was launched with in status.launchSettings (docs/spec-edits.md)."
    )
    evaluations: int = Field(0, ge=0, description="Evaluations seen: times trainpilot_eval_step advanced.")
    failed_scrapes: int = Field(0, ge=0, description="Cycles in a row its running trainer's /metrics gave nothing.")
    unstable_since: int | None = Field(
        None,
        description="Step at which its loss first looked unstable (non-finite, or above spikeFactor x its best); "
        "a relaunch resumes only a checkpoint saved before it.",
    )
    history: list[list[float]] = Field(default_factory=list, description="Recent [step, objective] points, bounded.")
    rung_objectives: dict[str, float] = Field(
        default_factory=dict, description="Objective when each ASHA rung step was passed."
    )
    best_train_loss: float | None = None
    smoothed_train_loss: float | None = None
    started_at: str | None = None
    finished_at: str | None = None
    gpu_seconds: float = 0.0
    message: str = ""
    removed: list[RetainedPart] = Field(
        default_factory=list, description="What spec.retention deleted of it since it finished."
    )

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_TRIAL_STATES


SignOffState = Literal["Pending", "Approved", "Rejected", "Expired"]
MAX_SETTLED_SIGN_OFFS = 10


class SignOff(CamelModel):
    """A decision held for a human's sign-off, and what became of it."""

    id: str = Field(description="The held decision's id: what `trainpilot approve NAME ID` names.")
    action: str
    trial: str | None = None
    policy: str
    reason: str
    hyperparameters: dict[str, float] = Field(default_factory=dict)
    held_at: str
    expires_at: str
    state: SignOffState = "Pending"
    by: str | None = Field(None, description="Who approved or rejected it, as the API server authenticated them.")
    settled_at: str | None = None
    settled_by_decision: str | None = Field(None, description="The record that settled it.")


class QuotaWait(CamelModel):
    """A launch or scale waiting for room under a QuotaPolicy bound, and what became of it."""

    id: str = Field(description="The waiting decision's id.")
    action: str
    trial: str | None = None
    reason: str
    since: str
    bound: str = Field(description="The bound it waits for, naming the QuotaPolicy.")
    state: Literal["Waiting", "Proceeded", "Dropped"] = "Waiting"
    settled_by_decision: str | None = None


class BestTrial(CamelModel):
    name: str
    objective: float
    step: int = 0
    hyperparameters: dict[str, float] = Field(default_factory=dict)


class DecisionSummary(CamelModel):
    id: str
    action: str
    trial: str | None = None
    policy: str
    outcome: Literal["executed", "rejected", "pending-approval", "waiting", "failed"]
    reason: str
    time: str


class AgentExperimentStatus(CamelModel):
    phase: Phase = "Pending"
    message: str = ""
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    trials: list[TrialStatus] = Field(default_factory=list)
    best_trial: BestTrial | None = Field(
        None, description="The best objective among trials that neither crashed nor diverged."
    )
    trials_launched: int = 0
    trials_running: int = 0
    trials_succeeded: int = 0
    trials_failed: int = Field(0, description="Trials that crashed (not diverged ones).")
    trials_diverged: int = Field(0, description="Trials stopped for a non-finite loss or a loss spike.")
    trials_terminated: int = 0
    trials_summary: str = Field("0/0", description="done/total, for kubectl's printer column.")
    best_objective: float | None = Field(None, description="bestTrial.objective, for kubectl's printer column.")
    gpu_hours_used: float = 0.0
    trial_steps_used: int = Field(
        0, ge=0, description="Optimizer steps trained so far, summed over trials (spec.budget.maxTrialSteps)."
    )
    decisions: list[DecisionSummary] = Field(default_factory=list)
    decisions_made: int = Field(0, description="Decisions recorded so far; the next id's sequence number.")
    policy_failures: int = Field(
        0, ge=0, description="Cycles in a row whose policy failed; reset by one that answered."
    )
    model_usage: ModelUsage = Field(
        default_factory=ModelUsage, description="The LLM policy's calls and tokens so far (Claude)."
    )
    quota_limits: dict[str, str] = Field(
        default_factory=dict, description="The QuotaPolicy bounds in force, each naming the policy that set it."
    )
    quota_waits: list[QuotaWait] = Field(
        default_factory=list, description="Decisions waiting for a QuotaPolicy bound (Waiting), then the last few."
    )
    sign_offs: list[SignOff] = Field(
        default_factory=list,
        description="Decisions awaiting a human's approval (state Pending), then the last few settled ones.",
    )
    # Schema-free in the CRD: the operator writes it, and the template's CEL rules would cost once
    # per entry (the API server refuses a CRD whose rules' estimated cost is unbounded).
    launch_settings: dict[str, Annotated[LaunchSettings, WithJsonSchema(_OPAQUE_OBJECT)]] = Field(
        default_factory=dict,
        description="The spec's template, metrics endpoint and queue each trial was launched with, by key "
        "(trials[].launch): an edit applies to new trials only (docs/spec-edits.md).",
    )
    last_cycle_time: str | None = None
    started_at: str | None = None
    finished_at: str | None = None

    def trial(self, name: str) -> TrialStatus | None:
        return next((trial for trial in self.trials if trial.name == name), None)

    def settings_of(self, trial: str) -> LaunchSettings | None:
        """What `trial` was launched with; None for a trial recorded before launch settings were."""
        found = self.trial(trial)
        return self.launch_settings.get(found.launch) if found is not None and found.launch else None

    def spec_for(self, spec: AgentExperimentSpec, trial: str) -> AgentExperimentSpec:
        """`spec` as trial `trial` runs under it (its launch settings in place of the current ones)."""
        settings = self.settings_of(trial)
        return settings.applied_to(spec) if settings is not None else spec

    @property
    def waiting_for_quota(self) -> list[QuotaWait]:
        return [wait for wait in self.quota_waits if wait.state == "Waiting"]

    @property
    def awaiting_approval(self) -> list[SignOff]:
        return [sign_off for sign_off in self.sign_offs if sign_off.state == "Pending"]

    def sign_off(self, id: str) -> SignOff | None:
        return next((sign_off for sign_off in self.sign_offs if sign_off.id == id), None)

    @property
    def active_trials(self) -> list[TrialStatus]:
        """Unfinished trials: each holds a slot and its GPUs, whether started yet or not."""
        return [trial for trial in self.trials if not trial.finished]

    @property
    def launched_trials(self) -> list[TrialStatus]:
        """Active trials that have been started: the ones a runtime observes (a child waiting for its
        parent's pods to go has nothing to observe yet)."""
        return [trial for trial in self.trials if not trial.finished and trial.waiting_for is None]

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


class AgentExperiment(CamelModel):
    """The whole object, as read from a YAML file or the API server."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    api_version: str = "trainpilot.dev/v1alpha1"
    kind: Literal["AgentExperiment"] = "AgentExperiment"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: AgentExperimentSpec
    status: AgentExperimentStatus = Field(default_factory=AgentExperimentStatus)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace", "default"))


def parse_spec(spec: dict[str, Any]) -> AgentExperimentSpec:
    """Validate a raw spec; ValueError carries one line per problem, each naming its field."""
    try:
        return AgentExperimentSpec.model_validate(spec)
    except ValidationError as error:
        raise ValueError(describe_validation_error(error, prefix="spec")) from None


def check_experiment_name(name: str) -> None:
    """The operator's own copy of the CRD's name rule (an object may predate the CRD; `trainpilot run` has none)."""
    if len(name) > MAX_EXPERIMENT_NAME or not re.fullmatch(EXPERIMENT_NAME_PATTERN, name):
        raise ValueError(f"{EXPERIMENT_NAME_RULE}; {name!r} is not")
