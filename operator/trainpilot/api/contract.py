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
DEFAULT_METRICS_PORT = 9400
DEFAULT_METRICS_ADDR = "0.0.0.0"
DEFAULT_METRICS_PATH = "/metrics"

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
METRIC_CHECKPOINT_STEP = "trainpilot_checkpoint_step"
METRIC_LOSS_FLOOR = "trainpilot_loss_floor"
METRIC_CONTROL_GENERATION = "trainpilot_control_generation"
METRIC_WEIGHT_DECAY = "trainpilot_weight_decay"
METRIC_STEP_SECONDS = "trainpilot_step_seconds"
METRIC_GPU_MEMORY = "trainpilot_gpu_memory_allocated_bytes"
METRIC_MAX_STEPS = "trainpilot_max_steps"
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


# Event reasons, one per kind of decision outcome.
REASON_TRIAL_LAUNCHED = "TrialLaunched"
REASON_TRIAL_TERMINATED = "TrialTerminated"
REASON_HYPERPARAMETERS_MUTATED = "HyperparametersMutated"
REASON_TRIAL_SCALED = "TrialScaled"
REASON_EXPERIMENT_SUCCEEDED = "ExperimentSucceeded"
REASON_EXPERIMENT_FAILED = "ExperimentFailed"
REASON_DECISION_REJECTED = "DecisionRejected"
REASON_DECISION_PENDING_APPROVAL = "DecisionPendingApproval"

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
