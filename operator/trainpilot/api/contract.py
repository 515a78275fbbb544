"""The public contract: names that users, dashboards and tests rely on.

Changing a value here is a breaking change for everyone who scripts against TrainPilot.
"""

GROUP = "trainpilot.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

EXPERIMENT_KIND = "AgentExperiment"
EXPERIMENT_PLURAL = "agentexperiments"
EXPERIMENT_SHORT_NAME = "aexp"
QUOTA_KIND = "QuotaPolicy"
QUOTA_PLURAL = "quotapolicies"

# Labels on every child object of an experiment.
LABEL_EXPERIMENT = f"{GROUP}/experiment"
LABEL_TRIAL = f"{GROUP}/trial"
LABEL_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

# Annotations.
ANNOTATION_HYPERPARAMETERS = f"{GROUP}/hyperparameters"
ANNOTATION_DECISION = f"{GROUP}/decision"
ANNOTATION_LAST_DECISION = f"{GROUP}/last-decision"
# Human sign-off of a decision held for approval: `approve` or `reject` carries its id, and
# `approved-by` the user who set it. The chart's ValidatingAdmissionPolicy admits a change to any of
# the three only when approved-by equals the requesting user as the API server authenticated them,
# so the name in the ledger is the API server's word, not the annotator's.
ANNOTATION_APPROVE = f"{GROUP}/approve"
ANNOTATION_REJECT = f"{GROUP}/reject"
ANNOTATION_APPROVED_BY = f"{GROUP}/approved-by"
APPROVAL_ANNOTATIONS = (ANNOTATION_APPROVE, ANNOTATION_REJECT, ANNOTATION_APPROVED_BY)

# Trainer environment.
ENV_TRIAL_CONFIG = "TRAINPILOT_TRIAL_CONFIG"
ENV_METRICS_PORT = "TRAINPILOT_METRICS_PORT"
ENV_METRICS_ADDR = "TRAINPILOT_METRICS_ADDR"
ENV_CONTROL_FILE = "TRAINPILOT_CONTROL_FILE"
# The trainer's final summary: one stdout line `TRAINPILOT_RESULT {json}`; the same JSON object
# goes to its termination message.
RESULT_PREFIX = "TRAINPILOT_RESULT "
# Where the trainer writes its final summary as a JSON object (the container's terminationMessagePath,
# so the last values reach the pod status even when no scrape caught them).
ENV_TERMINATION_LOG = "TRAINPILOT_TERMINATION_LOG"
# Checkpoints are saved as `<checkpoint_dir>/step<N>`: the tag of the step trainpilot_checkpoint_step
# reports, and what a child's trial config names in `resume_tag`.
CHECKPOINT_TAG_PREFIX = "step"


def checkpoint_tag(step: int) -> str:
    """The tag of the trainer's checkpoint at `step`: `step120`."""
    return f"{CHECKPOINT_TAG_PREFIX}{step}"


DEFAULT_METRICS_PORT = 9400
DEFAULT_METRICS_ADDR = "0.0.0.0"
DEFAULT_METRICS_PATH = "/metrics"

# Environment a trial's processes get from the operator or from torchrun, or that decides which
# devices they see: trialTemplate.env may not set any of these (validation refuses them), so no
# spec can redirect the trainer's config, fake its rank or see GPUs it was not given.
RESERVED_ENV_PREFIXES = ("TRAINPILOT_", "PET_", "TORCHELASTIC_")
RESERVED_ENV = frozenset(
    {
        "PYTHONUNBUFFERED",
        "DS_ACCELERATOR",
        # torchrun sets these for each worker from the PET_* settings.
        "RANK",
        "LOCAL_RANK",
        "GROUP_RANK",
        "ROLE_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        # The device plugin's choice of GPUs; overriding it reaches GPUs the quota never counted.
        "CUDA_VISIBLE_DEVICES",
        "NVIDIA_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
    }
)


def is_reserved_env(name: str) -> bool:
    """True for a variable the operator or torchrun sets, which trialTemplate.env may not override."""
    return name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES)


# Trainer metrics (served by rank 0 only).
METRIC_STEP = "trainpilot_step"
METRIC_TRAIN_LOSS = "trainpilot_train_loss"
METRIC_VAL_LOSS = "trainpilot_val_loss"
# The step the objective gauge was measured at (-1 before the first evaluation): a scrape comes
# later than the evaluation, and the history and ASHA rungs want the evaluation's own step.
METRIC_EVAL_STEP = "trainpilot_eval_step"
METRIC_LEARNING_RATE = "trainpilot_learning_rate"
METRIC_GRAD_NORM = "trainpilot_grad_norm"
METRIC_TOKENS_PER_SECOND = "trainpilot_tokens_per_second"
METRIC_NONFINITE_LOSS = "trainpilot_nonfinite_loss_total"
# Steps at which the trainer's loss-spike rule (loss_spike_factor on the smoothed loss) held: it
# applies the policy's spikeFactor at every step, so a spike between two scrapes is not missed.
METRIC_LOSS_SPIKES = "trainpilot_loss_spikes_total"
METRIC_CHECKPOINT_STEP = "trainpilot_checkpoint_step"
METRIC_LOSS_FLOOR = "trainpilot_loss_floor"
METRIC_CONTROL_GENERATION = "trainpilot_control_generation"
METRIC_WEIGHT_DECAY = "trainpilot_weight_decay"
METRIC_STEP_SECONDS = "trainpilot_step_seconds"
METRIC_GPU_MEMORY = "trainpilot_gpu_memory_allocated_bytes"
METRIC_GPU_MEMORY_PEAK = "trainpilot_gpu_memory_peak_bytes"  # torch.cuda.max_memory_allocated()
METRIC_GPU_MEMORY_RESERVED = "trainpilot_gpu_memory_reserved_bytes"  # held by the caching allocator
METRIC_TOKENS_PER_SECOND_PER_GPU = "trainpilot_tokens_per_second_per_gpu"
# Model FLOPs utilisation, 0..1: the model's own training FLOPs against the GPU's dense peak
# (trainer_image/trainpilot_trainer/flops.py); exported only where the peak is known.
METRIC_MFU = "trainpilot_mfu"
# The synthetic source's entropy rate; trainpilot_loss_floor is its own loss on the validation windows.
METRIC_ENTROPY_RATE = "trainpilot_entropy_rate"
METRIC_MAX_STEPS = "trainpilot_max_steps"
# Which data the validation loss is measured on: a 48-bit hash of the validation windows' tokens
# (exact in a Prometheus float) and how many predictions they hold. Trials are only ranked against
# trials with the same fingerprint.
METRIC_VALIDATION_FINGERPRINT = "trainpilot_validation_fingerprint"
METRIC_VALIDATION_TOKENS = "trainpilot_validation_tokens"
# The trainer's last evaluation at one of its eval_at_steps (the ASHA rung steps the operator put
# in its config): that step (-1: none yet) and `trainpilot_rung_<objective>` measured there. Held
# until the next rung, so a scrape every intervalSeconds still sees each rung's own evaluation
# when later ones have replaced trainpilot_val_loss since.
METRIC_RUNG_STEP = "trainpilot_rung_step"
METRIC_RUNG_VAL_LOSS = "trainpilot_rung_val_loss"
# Every one-value metric the built-in trainer exports (trainer_image/trainpilot_trainer/metrics.py;
# GPU memory, per-GPU throughput and MFU only on CUDA (MFU where the GPU's peak is known), the loss
# floor and entropy rate only when known), besides the METRIC_STEP_SECONDS
# histogram. An objective `x` reads `trainpilot_x`, so these are all it can optimise.
TRAINER_METRICS = (
    METRIC_STEP,
    METRIC_MAX_STEPS,
    METRIC_TRAIN_LOSS,
    METRIC_VAL_LOSS,
    METRIC_EVAL_STEP,
    METRIC_RUNG_STEP,
    METRIC_RUNG_VAL_LOSS,
    METRIC_LEARNING_RATE,
    METRIC_WEIGHT_DECAY,
    METRIC_GRAD_NORM,
    METRIC_TOKENS_PER_SECOND,
    METRIC_CHECKPOINT_STEP,
    METRIC_CONTROL_GENERATION,
    METRIC_NONFINITE_LOSS,
    METRIC_LOSS_SPIKES,
    METRIC_LOSS_FLOOR,
    METRIC_ENTROPY_RATE,
    METRIC_GPU_MEMORY,
    METRIC_GPU_MEMORY_PEAK,
    METRIC_GPU_MEMORY_RESERVED,
    METRIC_TOKENS_PER_SECOND_PER_GPU,
    METRIC_MFU,
    METRIC_VALIDATION_FINGERPRINT,
    METRIC_VALIDATION_TOKENS,
)
# Gauges the trainer sets on every step. Any other objective is an evaluation result, measured
# at METRIC_EVAL_STEP when the trainer exports it.
PER_STEP_METRICS = frozenset(
    {
        METRIC_STEP,
        METRIC_TRAIN_LOSS,
        METRIC_LEARNING_RATE,
        METRIC_WEIGHT_DECAY,
        METRIC_GRAD_NORM,
        METRIC_TOKENS_PER_SECOND,
    }
)


def objective_metric(objective: str) -> str:
    """The Prometheus metric an objective reads: `val_loss` reads `trainpilot_val_loss`."""
    return f"trainpilot_{objective}"


def rung_metric(objective: str) -> str:
    """The objective as measured at the last rung step: `val_loss` reads `trainpilot_rung_val_loss`."""
    return f"trainpilot_rung_{objective}"


# Event reasons, one per kind of decision outcome.
REASON_TRIAL_LAUNCHED = "TrialLaunched"
REASON_TRIAL_TERMINATED = "TrialTerminated"
REASON_HYPERPARAMETERS_MUTATED = "HyperparametersMutated"
REASON_TRIAL_SCALED = "TrialScaled"
REASON_EXPERIMENT_SUCCEEDED = "ExperimentSucceeded"
REASON_EXPERIMENT_FAILED = "ExperimentFailed"
REASON_DECISION_REJECTED = "DecisionRejected"
REASON_DECISION_PENDING_APPROVAL = "DecisionPendingApproval"
# spec.retention deleted a finished trial's checkpoints or its Job, Service and ConfigMaps.
REASON_TRIAL_CLEANED_UP = "TrialCleanedUp"
# A launch or scale waits for a QuotaPolicy bound that frees up (an Event, and the QuotaAvailable condition's reason).
REASON_QUOTA_EXCEEDED = "QuotaExceeded"
# An executed decision whose action the world refused for good (a 4xx from the API server).
REASON_DECISION_FAILED = "DecisionFailed"
# What keeps an experiment from progressing, as Events and as its conditions' reasons.
REASON_POLICY_FAILING = "PolicyFailing"
REASON_RECORDING_FAILED = "RecordingFailed"
REASON_OBSERVATION_FAILED = "ObservationFailed"
REASON_METRICS_UNREACHABLE = "MetricsUnreachable"
REASON_MODEL_REFUSED = "ModelRefused"  # the LLM's API refuses the operator for good (401/403/404)
REASON_SIGN_OFF_IGNORED = "SignOffIgnored"  # an approve or reject that names no held decision, or nobody
REASON_VALIDATION_MISMATCH = "ValidationMismatch"  # trials were scored on different validation sets
REASON_SPEC_EDIT_REFUSED = "SpecEditRefused"  # an edit the table refuses while trials run (docs/spec-edits.md)
REASON_CLEAN_UP_STALLED = "CleanUpStalled"  # a checkpoint clean-up failed or cannot run (spec.retention)

# Status conditions besides Valid (kubectl describe shows them): False says what is wrong.
CONDITION_VALID = "Valid"
CONDITION_POLICY_HEALTHY = "PolicyHealthy"  # the policy answers; False: it raised (reason PolicyFailing)
CONDITION_ACTIONS_HEALTHY = "ActionsHealthy"  # actions are carried out; False: one was refused (DecisionFailed)
CONDITION_RECORDING_HEALTHY = "RecordingHealthy"  # ledger and status are written; False: RecordingFailed
CONDITION_OBSERVATION_HEALTHY = "ObservationHealthy"  # trials can be listed; False: ObservationFailed
CONDITION_METRICS_REACHABLE = "MetricsReachable"  # running trainers' /metrics answer; False: MetricsUnreachable
CONDITION_MODEL_AVAILABLE = "ModelAvailable"  # the LLM answers; False: refused for good (reason ModelRefused)
CONDITION_QUOTA_AVAILABLE = "QuotaAvailable"  # False: decisions wait for a QuotaPolicy bound (QuotaExceeded)
CONDITION_AWAITING_APPROVAL = "AwaitingApproval"  # True: decisions are held for a human (DecisionPendingApproval)
# False: some trials were scored on another validation set than the reference (ValidationMismatch).
CONDITION_TRIALS_COMPARABLE = "TrialsComparable"
# False: an edit of the spec is refused and the value in force is another (SpecEditRefused).
CONDITION_SPEC_EDITS_APPLIED = "SpecEditsApplied"
# False: a deletion spec.retention asked for failed or cannot run (CleanUpStalled).
CONDITION_RETENTION_APPLIED = "RetentionApplied"

# Trainer exit codes: how a finished trial says why it stopped.
EXIT_COMPLETED = 0  # ran max_steps
EXIT_CRASHED = 1  # an unexpected error (Python's default for an uncaught exception)
EXIT_INVALID_CONFIG = 2  # the trial config failed validation; retrying cannot help
EXIT_DIVERGED = 3  # non-finite loss with fail_fast; the diverged state was not checkpointed
EXIT_STOPPED = 4  # SIGTERM/SIGINT: checkpointed (when a checkpoint dir is set) and stopped early
EXIT_REASONS = {
    EXIT_COMPLETED: "completed",
    EXIT_CRASHED: "crashed",
    EXIT_INVALID_CONFIG: "invalid-config",
    EXIT_DIVERGED: "diverged",
    EXIT_STOPPED: "terminated",
}

# The operator's own metrics (controller/metrics.py), on --metrics-port.
OPERATOR_METRICS_PORT = 8081
METRIC_OPERATOR_CYCLE_SECONDS = "trainpilot_operator_cycle_seconds"
METRIC_OPERATOR_CYCLE_ERRORS = "trainpilot_operator_cycle_errors_total"
METRIC_OPERATOR_DECISIONS = "trainpilot_operator_decisions_total"
METRIC_OPERATOR_LLM_CALLS = "trainpilot_operator_llm_calls_total"
METRIC_OPERATOR_LLM_SECONDS = "trainpilot_operator_llm_call_seconds"
METRIC_OPERATOR_LLM_TOKENS = "trainpilot_operator_llm_tokens_total"
METRIC_OPERATOR_LLM_FALLBACKS = "trainpilot_operator_llm_fallbacks_total"
METRIC_OPERATOR_CYCLES = "trainpilot_operator_cycles_total"
METRIC_OPERATOR_API_REQUESTS = "trainpilot_operator_api_requests_total"
METRIC_OPERATOR_API_ERRORS = "trainpilot_operator_api_errors_total"
METRIC_OPERATOR_WATCH_RESTARTS = "trainpilot_operator_watch_restarts_total"
METRIC_OPERATOR_SCRAPE_FAILURES = "trainpilot_operator_scrape_failures_total"
METRIC_OPERATOR_EXPERIMENTS = "trainpilot_operator_experiments"
