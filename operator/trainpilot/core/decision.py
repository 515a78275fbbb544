"""Decisions: what a policy proposes, and the record of what became of it.

A `Decision` is a proposal and is trusted by nobody: guardrails check it against the search
space, the budget, the quota and the allowed actions before anything happens. A
`DecisionRecord` is the durable, auditable outcome (the ledger's line format), written for every
decision, executed or not.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trainpilot.api import contract
from trainpilot.api.experiment import Action, RetainedPart

# "failed": a follow-up to an executed record whose action the world refused for good.
# "waiting": a QuotaPolicy bound that frees up (GPUs, slots, the rolling period) has no room yet.
Outcome = Literal["executed", "rejected", "pending-approval", "waiting", "failed"]
MutateMode = Literal["in-place", "restart"]
# In-place changes are what the trainer's control file understands; anything else restarts.
IN_PLACE_HYPERPARAMETERS: frozenset[str] = frozenset({"lr", "weight_decay"})
# The name on records the loop makes itself (failing an experiment that cannot go on), never a policy's.
SYSTEM_POLICY = "trainpilot"
# What a record may do: a policy's actions, and the loop's own deletions under spec.retention, which
# no policy can propose (allowedActions lists Actions only) and a replay carries out only if the
# retention rules still call for it.
CLEAN_UP = "clean-up"
RecordAction = Literal[Action, "clean-up"]


class ModelCall(BaseModel):
    """Who decided, when an LLM did: the model, a hash of the exact prompt, what it cost."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt_sha256: str
    prompt_tokens_estimate: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    estimated_cost_usd: float | None = Field(None, description="At list price; None when the price is not known.")


class SignOffNote(BaseModel):
    """A human's word on a held decision, as recorded on the record that settles it."""

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["approved", "rejected", "expired"]
    by: str | None = Field(None, description="The user, as the API server authenticated them; None when expired.")


class Decision(BaseModel):
    """One move a policy proposes."""

    model_config = ConfigDict(extra="forbid")

    action: RecordAction
    policy: str = Field(description="Which policy proposed it: heuristic, claude, ...")
    reason: str = Field(description="Short kebab-case cause, e.g. nonfinite-loss, asha-rung, goal-reached.")
    rationale: str = Field("", description="Human-readable why, shown in events and the ledger.")
    trial: str | None = Field(None, description="Target trial (terminate, mutate, scale).")
    hyperparameters: dict[str, float] = Field(
        default_factory=dict, description="launch: the new trial's values; mutate: the changed values."
    )
    mode: MutateMode | None = Field(None, description="mutate: in-place (lr, weight_decay) or restart.")
    parent: str | None = Field(None, description="launch: the trial this one derives from.")
    resume_from: str | None = Field(None, description="launch: trial whose last checkpoint to start from.")
    nodes: int | None = Field(None, description="scale: new node count.")
    gpus_per_node: int | None = Field(None, description="scale: new GPUs per node.")
    outcome: Literal["succeeded", "failed"] | None = Field(None, description="complete: how it ends.")
    removes: RetainedPart | None = Field(None, description="clean-up: what of the finished trial is deleted.")
    confidence: float | None = Field(None, ge=0, le=1, description="How sure the policy is, 0 to 1.")
    call: ModelCall | None = Field(None, description="The LLM call that proposed it; never part of an answer.")


class DecisionRecord(BaseModel):
    """A decision with its id, verdict and context: one line of the ledger."""

    model_config = ConfigDict(extra="forbid")

    id: str
    seq: int = Field(ge=0)
    time: str
    experiment: str
    decision: Decision
    outcome: Outcome
    verdict: str = Field("", description="Why it was rejected or held for approval; empty when executed.")
    new_trial: str | None = Field(None, description="launch/restart: the trial it created.")
    before: dict[str, Any] = Field(default_factory=dict, description="Target's hyperparameters before.")
    after: dict[str, Any] = Field(default_factory=dict, description="Target's hyperparameters after.")
    observation: dict[str, Any] = Field(default_factory=dict, description="What the policy saw, summarised.")
    follows: str | None = Field(
        None, description="failed or rejected follow-up, or a sign-off: the id of the earlier record it is about."
    )
    sign_off: SignOffNote | None = Field(None, description="A held decision approved, rejected or expired.")

    @property
    def action(self) -> str:
        return self.decision.action

    @property
    def trial(self) -> str | None:
        return self.new_trial or self.decision.trial

    def event_reason(self) -> str:
        """The Kubernetes Event reason the contract gives this record."""
        if self.outcome == "rejected":
            return contract.REASON_DECISION_REJECTED
        if self.outcome == "pending-approval":
            return contract.REASON_DECISION_PENDING_APPROVAL
        if self.outcome == "waiting":
            return contract.REASON_QUOTA_EXCEEDED
        if self.outcome == "failed":
            return contract.REASON_DECISION_FAILED
        decision = self.decision
        if decision.action == "launch":
            return contract.REASON_TRIAL_LAUNCHED
        if decision.action == "terminate":
            return contract.REASON_TRIAL_TERMINATED
        if decision.action == "mutate":
            return contract.REASON_HYPERPARAMETERS_MUTATED
        if decision.action == "scale":
            return contract.REASON_TRIAL_SCALED
        if decision.action == CLEAN_UP:
            return contract.REASON_TRIAL_CLEANED_UP
        if decision.outcome == "failed":
            return contract.REASON_EXPERIMENT_FAILED
        return contract.REASON_EXPERIMENT_SUCCEEDED

    def message(self) -> str:
        """One line for an Event or a log: what, to whom, why."""
        decision = self.decision
        target = f" {self.trial}" if self.trial else ""
        values = ""
        if decision.hyperparameters:
            values = " " + ", ".join(f"{k}={v:g}" for k, v in sorted(decision.hyperparameters.items()))
        removes = f" {decision.removes}" if decision.removes else ""
        text = f"[{self.id}] {decision.policy}: {decision.action}{target}{removes}{values} ({decision.reason})"
        if decision.rationale:
            text += f": {decision.rationale}"
        if self.sign_off is not None and self.sign_off.by and self.outcome == "executed":
            text += f" -- approved by {self.sign_off.by}"
        elif self.verdict:
            text += f" -- {self.outcome}: {self.verdict}"
        return text[:1000]

    def compact(self) -> dict[str, Any]:
        """The `trainpilot.dev/last-decision` annotation payload."""
        return {
            "id": self.id,
            "action": self.decision.action,
            "trial": self.trial,
            "policy": self.decision.policy,
            "reason": self.decision.reason,
            "outcome": self.outcome,
            "time": self.time,
        }


def decision_id(experiment: str, seq: int) -> str:
    """Deterministic, so a retried cycle re-derives the same id (and event name)."""
    return f"{experiment}-d{seq:05d}"


def decision_seq(experiment: str, id: str) -> int | None:
    """The sequence number in a decision id of `experiment`; None for an id of anything else."""
    prefix = f"{experiment}-d"
    digits = id[len(prefix) :] if id.startswith(prefix) else ""
    return int(digits) if digits.isdigit() and decision_id(experiment, int(digits)) == id else None


def trial_name(experiment: str, index: int) -> str:
    """Deterministic and short: `<experiment>-t007`, leaving room for `-<pod index>-<suffix>`."""
    return f"{experiment}-t{index:03d}"
