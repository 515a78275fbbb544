"""One turn of the agent loop over any Runtime: observe, recover, decide, act, record.

The same function drives the Kubernetes operator (from a kopf daemon) and `trainpilot run` (local
processes). Crash safety comes from the ordering: every decision is appended to the durable
ledger *before* it is acted on (nothing is carried out that could not be recorded), and status
(which counts decisions made) is saved after. A cycle that finds ledger records beyond status's
count finishes their effects first, with the same names and ids, so a restart neither loses nor
repeats a decision; each such record passes the guardrails again first, since a ledger line is
data like any proposal.

Nothing wedges and nothing fails silently: an action the world refuses for good fails that trial
or decision (a follow-up record, the ActionsHealthy condition) and the loop goes on; a policy that
keeps raising, a ledger or status that cannot be written, each set a condition, post an Event,
log a line naming the experiment, and fail it after a named limit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, TrialStatus
from trainpilot.api.trial import ControlFile
from trainpilot.core import approvals, cycle_log, log_context, quota_waits, retention, spec_edits
from trainpilot.core.conditions import MAX_CONDITION_MESSAGE, ConditionValue, set_condition
from trainpilot.core.decision import CLEAN_UP, DecisionRecord, decision_id, decision_seq
from trainpilot.core.engine import (
    CyclePlan,
    clean_up_record,
    failed_record,
    failure_record,
    recheck,
    rejection_record,
)
from trainpilot.core.handoff import handoff_overdue, handoff_step, handoff_words
from trainpilot.core.pending import plan_with_timeouts
from trainpilot.core.policy import Policy
from trainpilot.core.reachability import reached, unreachable
from trainpilot.core.state import apply_record, fold_observation, incomparable_trials
from trainpilot.core.trials import build_trial_config
from trainpilot.runtime.base import LedgerConflict, PermanentFailure, Runtime, RuntimeFailure

logger = logging.getLogger(__name__)

# Cycles in a row whose ledger or status write failed before the experiment is failed with why.
MAX_UNRECORDED_CYCLES = 5
RECORDING_FAILING = "recording-failing"
# Cycles in a row whose trials could not be observed, refused for good (a 403 listing pods, say),
# before the experiment is failed. A transient failure (the API server down) sets the condition
# and an Event each cycle but never fails it: waiting out an outage beats losing the experiment.
MAX_UNOBSERVED_CYCLES = 5
OBSERVATION_FAILING = "observation-failing"


@dataclass
class LoopMemory:
    """What one caller keeps between cycles of one experiment. Kept in memory on purpose: it counts
    failures to persist anything."""

    unrecorded_cycles: int = 0
    unobserved_cycles: int = 0  # refused for good, in a row
    ignored_sign_offs: set[str] = field(default_factory=set)  # announced once each


@dataclass
class CycleResult:
    status: AgentExperimentStatus
    records: list[DecisionRecord] = field(default_factory=list)
    recovered: list[DecisionRecord] = field(default_factory=list)
    unrecorded: str | None = None  # why this cycle could not write its ledger or its status


class _Unrecorded(Exception):
    """The ledger or status could not be written (or the ledger read): the cycle stops acting."""

    def __init__(self, what: str, failure: RuntimeFailure, status: AgentExperimentStatus) -> None:
        super().__init__(f"{what}: {failure}")
        self.status = status


class _Unobserved(Exception):
    """The trials could not be observed: the cycle decides nothing on what it cannot see."""

    def __init__(self, failure: RuntimeFailure, status: AgentExperimentStatus) -> None:
        super().__init__(str(failure))
        self.permanent = isinstance(failure, PermanentFailure)
        self.status = status


class _Stale(Exception):
    """Another writer's records hold this cycle's ids: end it unsaved; the next one replays them."""


async def run_cycle(
    experiment: str,
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    runtime: Runtime,
    policy: Policy,
    now: str,
    generation: int | None = None,
    limits: object | None = None,
    memory: LoopMemory | None = None,
) -> CycleResult:
    memory = memory if memory is not None else LoopMemory()
    cycle = _Cycle(experiment, spec, runtime, policy, now, limits, status, memory)
    try:
        status = await cycle.advance(status, generation)
        memory.unobserved_cycles = 0
        status = _healthy_again(
            status, contract.CONDITION_RECORDING_HEALTHY, "Recorded", "ledger and status written", now
        )
        await cycle.save(status)
    except _Stale:
        return cycle.result
    except _Unobserved as failure:
        status = await cycle.unobserved(failure, memory)
    except _Unrecorded as failure:
        status = await cycle.unrecorded(failure, memory)
        cycle.result.unrecorded = str(failure)
    else:
        memory.unrecorded_cycles = 0
    cycle.result.status = status
    return cycle.result


@dataclass
class _Refusal:
    record: DecisionRecord
    trial: str
    message: str


class _Cycle:
    """One cycle's work and what it has done so far."""

    def __init__(
        self,
        experiment: str,
        desired: AgentExperimentSpec,
        runtime: Runtime,
        policy: Policy,
        now: str,
        limits: object | None,
        status: AgentExperimentStatus,
        memory: LoopMemory,
    ) -> None:
        self.experiment, self.desired, self.runtime, self.policy = experiment, desired, runtime, policy
        self._review(status)
        self.now, self.limits, self.memory = now, limits, memory
        self.result = CycleResult(status=status)
        self.acted = 0
        self.refusals: list[_Refusal] = []  # this cycle's, for the ActionsHealthy condition
        self._follow_ups: list[Callable[[int], DecisionRecord]] = []  # records still to write, by seq

    def _review(self, status: AgentExperimentStatus) -> None:
        """The spec this cycle runs with: as written, except what the edit table refuses given the
        trials in `status` (docs/spec-edits.md)."""
        self.edits = spec_edits.review(self.desired, status)
        self.spec = self.edits.spec

    async def advance(self, status: AgentExperimentStatus, generation: int | None) -> AgentExperimentStatus:
        if status.started_at is None:
            status = status.model_copy(update={"started_at": self.now})
        try:
            self.observation = await self.runtime.observe(status)
        except RuntimeFailure as failure:
            raise _Unobserved(failure, status) from None
        status = _healthy_again(status, contract.CONDITION_OBSERVATION_HEALTHY, "Observed", "trials observed", self.now)
        # The ledger's records apply before what was seen since: a trial the interrupted cycle
        # stopped is Terminated for its reason, not a crash because its Job is gone.
        status = await self.recover(status)
        status = fold_observation(self.spec, status, self.observation, self.now)
        self._review(status)  # a trial seen to finish just now no longer holds an edit back
        status = await self._metrics_reachability(status)
        status = await self._comparability(status)
        status = await self._edits_applied(status)
        status = await self._retention_applied(status)
        status = _with_generation(status, generation, self.now)
        described = getattr(self.limits, "described", None)  # a cluster's QuotaPolicies name themselves
        if callable(described):
            status = status.model_copy(update={"quota_limits": described()})
        status = await self.decide(status)
        return self._action_health(await self.clean_up(status))

    async def decide(self, status: AgentExperimentStatus) -> AgentExperimentStatus:
        """Plan and carry out this cycle's decisions, unless the experiment is over or paused."""
        if status.finished:
            return status
        if self.spec.suspend:
            return status.model_copy(update={"phase": "Suspended", "message": "suspended by spec.suspend"})
        if status.phase == "Suspended":
            status = status.model_copy(
                update={"phase": "Running" if status.active_trials else "Pending", "message": ""}
            )
        status = await self.settle_sign_offs(status)
        status = await self.resume_quota_waits(status)
        status = await self.start_waiting(status)
        planned = await self.plan(status)
        status = await self.carry_out(planned.status, planned.records)
        await self._log_cycle(planned)
        status = _quota_condition(status, self.now)
        return _approval_condition(status, self.experiment, self.now)

    async def clean_up(self, status: AgentExperimentStatus) -> AgentExperimentStatus:
        """Delete what spec.retention says finished trials no longer need, each a record first."""
        removals = retention.due(self.spec, status, self.now, self.runtime.removable)
        records = [
            clean_up_record(self.experiment, status.decisions_made + number, removal, self.now)
            for number, removal in enumerate(removals)
        ]
        return await self.carry_out(status, records)

    async def resume_quota_waits(self, status: AgentExperimentStatus) -> AgentExperimentStatus:
        """Carry out what waited for a QuotaPolicy bound once there is room; drop what no longer passes."""
        waiting = [wait.id for wait in status.waiting_for_quota]
        if not waiting:
            return status
        held = await self._held_records(waiting, status)
        return await self.carry_out(
            status, quota_waits.resume(self.experiment, self.spec, status, held, self.now, self.limits)
        )

    async def _held_records(self, ids: list[str], status: AgentExperimentStatus) -> dict[str, DecisionRecord]:
        """The ledger's records under `ids` (held or waiting decisions), read from the oldest one on."""
        first = min(decision_seq(self.experiment, id) or 0 for id in ids)
        try:
            return {record.id: record for record in await self.runtime.ledger(first) if record.id in ids}
        except RuntimeFailure as failure:
            raise _Unrecorded("ledger", failure, status) from None

    async def _log_cycle(self, planned: CyclePlan) -> None:
        """What the policy was given, after what it decided is in the ledger (best effort: the ledger is
        the record; the cycle log is what `trainpilot replay` reads)."""
        if planned.asked is None:
            return
        records = [record for record in planned.records if record.id in planned.decided]
        line = cycle_log.entry(self.experiment, self.spec, planned.asked, records)
        try:
            await self.runtime.log_cycle(line)
        except RuntimeFailure as failure:
            logger.warning("%s: cycle log not written (replay will miss this cycle): %s", self.experiment, failure)

    async def settle_sign_offs(self, status: AgentExperimentStatus) -> AgentExperimentStatus:
        """Carry out what a human approved (if the guardrails still pass), drop what one rejected, and
        expire what waited too long; each is a record following the held one."""
        try:
            given = await self.runtime.approvals()
        except RuntimeFailure as failure:
            logger.warning("%s: approvals could not be read: %s", self.experiment, failure)
            given = []
        ids = approvals.wanted(status, given, self.now)
        held = await self._held_records(ids, status) if ids else {}
        settlement = approvals.settle(self.experiment, self.spec, status, held, given, self.now, self.limits)
        for approval, why in settlement.ignored:
            if str(approval) not in self.memory.ignored_sign_offs:
                self.memory.ignored_sign_offs.add(str(approval))
                message = f"sign-off ignored ({approval}): {why}"
                logger.warning("%s: %s", self.experiment, message)
                await self.runtime.announce(contract.REASON_SIGN_OFF_IGNORED, message)
        return await self.carry_out(status, settlement.records)

    async def plan(self, status: AgentExperimentStatus) -> CyclePlan:
        planned = await plan_with_timeouts(  # engine.plan_cycle, after stopping trials that cannot start
            self.experiment,
            self.spec,
            status,
            self.observation,
            self.policy,
            self.now,
            self.limits,
            on_policy_error=self._log_policy_error,
        )
        if planned.policy_failure is not None:
            logger.warning("%s: %s", self.experiment, planned.policy_failure)
            await self.runtime.announce(contract.REASON_POLICY_FAILING, planned.policy_failure)
        refused = _turned_false(status, planned.status, contract.CONDITION_MODEL_AVAILABLE)
        if refused is not None:
            logger.warning("%s: %s", self.experiment, refused)
            await self.runtime.announce(contract.REASON_MODEL_REFUSED, refused)
        return planned

    async def _comparability(self, status: AgentExperimentStatus) -> AgentExperimentStatus:
        """TrialsComparable=False (an Event and a log line when it turns so) while trials were scored
        on different validation sets; True again once none is (it stays unset until then)."""
        why = incomparable_trials(status.trials)
        if why is None:
            return _healthy_again(
                status, contract.CONDITION_TRIALS_COMPARABLE, "SameValidationSet", "all trials share one", self.now
            )
        after = _condition(
            status, contract.CONDITION_TRIALS_COMPARABLE, "False", contract.REASON_VALIDATION_MISMATCH, why, self.now
        )
        if _turned_false(status, after, contract.CONDITION_TRIALS_COMPARABLE) is not None:
            logger.warning("%s: %s", self.experiment, why)
            await self.runtime.announce(contract.REASON_VALIDATION_MISMATCH, why)
        return after

    async def _edits_applied(self, status: AgentExperimentStatus) -> AgentExperimentStatus:
        """SpecEditsApplied=False naming each refused edit (an Event and a log line whenever what is
        refused changes); True again once the spec in force is the spec as written."""
        now = self.now
        if not self.edits.refused:
            return _healthy_again(
                status, contract.CONDITION_SPEC_EDITS_APPLIED, "SpecInForce", "the spec as written is in force", now
            )
        message = self.edits.message
        before = next((c for c in status.conditions if c.type == contract.CONDITION_SPEC_EDITS_APPLIED), None)
        if before is None or before.status != "False" or before.message != message[:MAX_CONDITION_MESSAGE]:
            logger.warning("%s: %s", self.experiment, message)
            await self.runtime.announce(contract.REASON_SPEC_EDIT_REFUSED, message)
        return _condition(
            status, contract.CONDITION_SPEC_EDITS_APPLIED, "False", contract.REASON_SPEC_EDIT_REFUSED, message, self.now
        )

    async def _retention_applied(self, status: AgentExperimentStatus) -> AgentExperimentStatus:
        why = retention.stalled(self.spec, self.observation, self.now)
        if why is not None:
            return await self._report(
                status, contract.CONDITION_RETENTION_APPLIED, contract.REASON_CLEAN_UP_STALLED, why
            )
        return _healthy_again(
            status, contract.CONDITION_RETENTION_APPLIED, "CleanedUp", "what spec.retention asked for is done", self.now
        )

    async def _metrics_reachability(self, status: AgentExperimentStatus) -> AgentExperimentStatus:
        why = unreachable(status, self.observation, self.now, self.spec.metrics.source)
        if why is not None:
            return await self._report(
                status, contract.CONDITION_METRICS_REACHABLE, contract.REASON_METRICS_UNREACHABLE, why
            )
        if reached(self.observation):
            return _healthy_again(
                status, contract.CONDITION_METRICS_REACHABLE, "MetricsScraped", "trainers' metrics read", self.now
            )
        return status

    def _log_policy_error(self, error: BaseException) -> None:
        # The warning with the message comes from plan(); the traceback goes to the log file only.
        logger.info("%s: policy %s raised", self.experiment, self.policy.name, exc_info=error)

    # ---------------------------------------------------------------- recover

    async def recover(self, status: AgentExperimentStatus) -> AgentExperimentStatus:
        """Finish what a previous, interrupted cycle recorded but did not save."""
        try:
            pending = await self.runtime.ledger(status.decisions_made)
        except RuntimeFailure as failure:
            raise _Unrecorded("ledger", failure, status) from None
        # A later record may already say what became of an earlier one (refused, or voided).
        settled = {record.follows: record.outcome for record in pending if record.follows}
        for record in pending:
            if record.id != decision_id(self.experiment, record.seq):
                # Not a line of this experiment's sequence (it would take a genuine record's place).
                logger.warning("%s: ledger record %r is not %s; skipped", self.experiment, record.id, record.seq)
                if record.id not in settled:
                    verdict = f"{record.id!r} is not an id of {self.experiment}'s decisions"
                    self._reject_later(record, verdict)
                continue
            if record.seq != status.decisions_made:
                logger.warning(
                    "%s: ledger record %s is out of sequence (next is %d); skipped",
                    self.experiment,
                    record.id,
                    status.decisions_made,
                )
                continue
            logger.info("%s: recovering decision %s recorded before a restart", self.experiment, record.id)
            status = await self._replay(status, record, settled.get(record.id))
            self.result.recovered.append(record)
        return await self._write_follow_ups(status)

    async def _replay(
        self, status: AgentExperimentStatus, record: DecisionRecord, settled: str | None
    ) -> AgentExperimentStatus:
        if record.outcome == "executed" and settled is None:
            verdict = recheck(self.experiment, self.spec, status, record, self.limits)
            if not verdict.executed:
                # What the interrupted cycle decided on knew this cycle's news (a trial that had
                # finished, freeing a slot): valid against either view, it stands.
                seen = fold_observation(self.spec, status, self.observation, self.now)
                verdict = recheck(self.experiment, self.spec, seen, record, self.limits)
            if not verdict.executed:
                logger.warning("%s: not carrying out %s: %s", self.experiment, record.id, verdict.reason)
                self._reject_later(record, verdict.reason)
                settled = "rejected"
        if settled == "rejected":  # voided: it counts in the sequence and has no effect
            voided = record.model_copy(update={"outcome": "rejected", "new_trial": None})
            return apply_record(self.spec, status, voided, self.now)
        await self._record(record, status)  # idempotent: re-posts an Event or annotation that was lost
        if settled == "failed":  # already refused once: the follow-up after it says so
            return apply_record(self.spec, status, record, self.now)
        return await self._act(status, record)

    def _reject_later(self, record: DecisionRecord, verdict: str) -> None:
        """Record `record` as rejected (DecisionRejected) once the records before it are replayed."""
        self._follow_ups.append(
            partial(rejection_record, self.experiment, record=record, verdict=verdict, now=self.now, follows=record.id)
        )

    # ---------------------------------------------------------------- act

    async def carry_out(self, status: AgentExperimentStatus, records: list[DecisionRecord]) -> AgentExperimentStatus:
        """Record first (write-ahead), then act, then fold the effect into status."""
        for record in records:
            with log_context.about(trial=record.decision.trial or record.new_trial, decision=record.id):
                await self._record(record, status)
                status = await self._act(status, record)
            self.result.records.append(record)
        return await self._write_follow_ups(status)

    async def _record(self, record: DecisionRecord, status: AgentExperimentStatus) -> None:
        try:
            await self.runtime.record(record)
        except LedgerConflict as conflict:
            await self._decided_apart(conflict)
            raise _Stale() from None
        except RuntimeFailure as failure:
            raise _Unrecorded("ledger", failure, status) from None

    async def _decided_apart(self, conflict: LedgerConflict) -> None:
        """Record this cycle's decision as rejected after everything the ledger holds; never act on it."""
        verdict = f"two writers decided apart: {conflict}; this one was never carried out"
        logger.warning("%s: %s", self.experiment, verdict)
        try:
            tail = await self.runtime.ledger(conflict.record.seq)
            seq = max(record.seq for record in tail) + 1
            await self.runtime.record(rejection_record(self.experiment, seq, conflict.record, verdict, self.now, None))
        except (RuntimeFailure, ValueError) as failure:
            logger.warning("%s: the rejection of %s was not recorded: %s", self.experiment, conflict.record.id, failure)

    async def _act(self, status: AgentExperimentStatus, record: DecisionRecord) -> AgentExperimentStatus:
        """Carry out an executed record (idempotently) and return status with its effect applied."""
        before = status
        status = apply_record(self.spec, status, record, self.now)
        if record.outcome != "executed":
            return status
        self.acted += 1
        for trial, action in _actions(self.runtime, self.spec, before, status, record):
            await self._attempt(record, trial, action)
        if record.new_trial is not None:
            status = await self._start(status, record.new_trial, record)
        return status

    async def _attempt(self, record: DecisionRecord, trial: str, action: Callable[[], Awaitable[None]]) -> bool:
        """Run one runtime call of `record`; a refusal for good fails that trial (a follow-up record)."""
        try:
            await action()
        except PermanentFailure as failure:
            logger.warning("%s: %s refused for good: %s", self.experiment, trial, failure)
            self.refusals.append(_Refusal(record, trial, str(failure)))
            self._follow_ups.append(
                partial(failed_record, self.experiment, record=record, trial=trial, message=str(failure), now=self.now)
            )
            return False
        return True

    async def start_waiting(self, status: AgentExperimentStatus) -> AgentExperimentStatus:
        """Start the children of restarts whose parents' pods are gone since (core.handoff)."""
        for trial in status.trials:
            if trial.waiting_for is not None and not trial.finished:
                status = await self._start(status, trial.name, None)
        return status

    async def _start(
        self, status: AgentExperimentStatus, name: str, record: DecisionRecord | None
    ) -> AgentExperimentStatus:
        """Launch trial `name` (of `record`, or of a record made earlier), unless it must wait."""
        trial = status.trial(name)
        if trial is None or trial.finished:
            return status
        update: dict[str, object] = {}
        if trial.waiting_for is not None:
            parent = trial.waiting_for
            departure = await self.runtime.departed(parent)
            overdue = departure is None and handoff_overdue(trial, self.now)
            if departure is None and not overdue:
                return status  # the parent is still saving or stopping: a later cycle starts it
            step = handoff_step(status.trial(parent), departure.checkpoint_step if departure else None)
            source = parent if step is not None else None
            update = {"waiting_for": None, "resumed_from_step": step, "message": handoff_words(parent, step, overdue)}
        else:
            source, step = _resume_source(status, record)
        record = record or await self._record_of(trial.decision)
        launched = trial.model_copy(update=update)
        if record is None:
            return status  # its record is not in the ledger (yet): it cannot be launched under it
        # As it was launched (status.launchSettings): a restart or a relaunch from a checkpoint runs
        # as the trial it resumes did, whatever the spec says since.
        spec = status.spec_for(self.spec, name)
        started = await self._attempt(
            record, name, lambda: _launch(self.experiment, spec, self.runtime, launched, source, step)
        )
        if not started:
            return status  # the follow-up record fails it
        return status.model_copy(
            update={"trials": [launched if other.name == name else other for other in status.trials]}
        )

    async def _record_of(self, id: str) -> DecisionRecord | None:
        seq = decision_seq(self.experiment, id)
        if seq is None:
            return None
        try:
            records = await self.runtime.ledger(seq)
        except RuntimeFailure as failure:
            raise _Unrecorded("ledger", failure, self.result.status) from None
        return next((record for record in records if record.id == id), None)

    async def _write_follow_ups(self, status: AgentExperimentStatus) -> AgentExperimentStatus:
        """Records about earlier ones (refused, or rejected on replay), numbered after them."""
        while self._follow_ups:
            record = self._follow_ups.pop(0)(status.decisions_made)
            await self._record(record, status)
            status = apply_record(self.spec, status, record, self.now)
            self.result.records.append(record)
        return status

    def _action_health(self, status: AgentExperimentStatus) -> AgentExperimentStatus:
        if self.refusals:
            last = self.refusals[-1]
            message = f"{len(self.refusals)} action(s) refused this cycle; the last: {last.trial}: {last.message}"
            return _condition(
                status, contract.CONDITION_ACTIONS_HEALTHY, "False", contract.REASON_DECISION_FAILED, message, self.now
            )
        if self.acted:
            return _healthy_again(
                status, contract.CONDITION_ACTIONS_HEALTHY, "ActionsCarriedOut", "actions carried out", self.now
            )
        return status

    # ---------------------------------------------------------------- save

    async def save(self, status: AgentExperimentStatus) -> None:
        try:
            await self.runtime.save_status(status)
        except RuntimeFailure as failure:
            raise _Unrecorded("status", failure, status) from None

    async def unrecorded(self, failure: _Unrecorded, memory: LoopMemory) -> AgentExperimentStatus:
        """Say why nothing more was done, each cycle; fail the experiment after MAX_UNRECORDED_CYCLES."""
        memory.unrecorded_cycles += 1
        count = memory.unrecorded_cycles
        message = (
            f"could not write its {failure} ({count} cycle(s) in a row; the limit is {MAX_UNRECORDED_CYCLES}); "
            "nothing that could not be recorded was carried out"
        )
        status = await self._report(
            failure.status, contract.CONDITION_RECORDING_HEALTHY, contract.REASON_RECORDING_FAILED, message
        )
        if count >= MAX_UNRECORDED_CYCLES and not status.finished:
            status = await self._fail_unrecorded(status, message)
        return await self._save_anyway(status)

    async def unobserved(self, failure: _Unobserved, memory: LoopMemory) -> AgentExperimentStatus:
        """Say why nothing was decided, each cycle; fail the experiment after MAX_UNOBSERVED_CYCLES
        refusals for good in a row."""
        if failure.permanent:
            memory.unobserved_cycles += 1
            count = memory.unobserved_cycles
            message = (
                f"could not observe its trials, refused for good: {failure} ({count} cycle(s) in a row; "
                f"the limit is {MAX_UNOBSERVED_CYCLES}); nothing was decided"
            )
        else:
            count = 0
            message = f"could not observe its trials: {failure}; nothing was decided, retrying next cycle"
        status = await self._report(
            failure.status, contract.CONDITION_OBSERVATION_HEALTHY, contract.REASON_OBSERVATION_FAILED, message
        )
        if count >= MAX_UNOBSERVED_CYCLES and not status.finished:
            try:
                status = await self._fail(status, OBSERVATION_FAILING, message)
            except _Unrecorded as unrecorded:
                return await self.unrecorded(unrecorded, memory)
            except _Stale:
                return status
        return await self._save_anyway(status)

    async def _report(
        self, status: AgentExperimentStatus, condition: str, reason: str, message: str
    ) -> AgentExperimentStatus:
        """What keeps the experiment from progressing: a log line naming it, an Event, a False condition."""
        logger.warning("%s: %s", self.experiment, message)
        await self.runtime.announce(reason, message)
        return _condition(status, condition, "False", reason, message, self.now)

    async def _save_anyway(self, status: AgentExperimentStatus) -> AgentExperimentStatus:
        """Save status after a failed cycle, so kubectl shows why; a failure here is only logged."""
        try:
            await self.runtime.save_status(status)
        except RuntimeFailure as again:
            logger.warning("%s: status not saved either: %s", self.experiment, again)
        return status

    async def _fail(self, status: AgentExperimentStatus, reason: str, message: str) -> AgentExperimentStatus:
        """Record the experiment as failed with `message`, then stop its trials."""
        record = failure_record(self.experiment, status, reason, message, self.now)
        await self._record(record, status)
        self.result.records.append(record)
        return await self._write_follow_ups(await self._act(status, record))

    async def _fail_unrecorded(self, status: AgentExperimentStatus, message: str) -> AgentExperimentStatus:
        record = failure_record(self.experiment, status, RECORDING_FAILING, message, self.now)
        try:
            await self.runtime.record(record)
        except RuntimeFailure:
            # Not even this can be recorded: fail it in status alone, and act on nothing.
            text = f"{message}; trials still running were left to finish, since nothing unrecorded is carried out"
            return status.model_copy(update={"phase": "Failed", "message": text[:1000], "finished_at": self.now})
        self.result.records.append(record)
        return await self._act(status, record)


def _actions(
    runtime: Runtime,
    spec: AgentExperimentSpec,
    before: AgentExperimentStatus,
    after: AgentExperimentStatus,
    record: DecisionRecord,
) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    """The stops and control changes an executed record asks for, each with the trial it concerns
    (a new trial is started apart: it may have to wait for the one it resumes from)."""
    decision = record.decision
    action = decision.action
    restarts = action == "scale" or (action == "mutate" and decision.mode == "restart")
    calls: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    def stop(trial: str, reason: str) -> None:
        calls.append((trial, lambda: runtime.stop(trial, reason)))

    if (action == "terminate" or restarts) and decision.trial:
        stop(decision.trial, decision.reason)
    if action == "complete":
        for trial in before.active_trials:
            stop(trial.name, "experiment-complete")
    if action == CLEAN_UP and decision.trial and decision.removes:
        name, part = decision.trial, decision.removes
        calls.append((name, lambda: runtime.remove(name, part, after.spec_for(spec, name))))
    if action == "mutate" and decision.mode == "in-place" and decision.trial:
        target = after.trial(decision.trial)
        if target is not None:
            control = ControlFile(
                generation=target.control_generation,
                lr=target.hyperparameters.get("lr"),
                weight_decay=target.hyperparameters.get("weight_decay"),
            )
            calls.append((target.name, lambda: runtime.set_control(target.name, control)))
    return calls


def _resume_source(status: AgentExperimentStatus, record: DecisionRecord | None) -> tuple[str | None, int | None]:
    """A launch's checkpoint to resume (resumeFrom, a finished trial) and its step; (None, None): fresh."""
    source = record.decision.resume_from if record is not None else None
    source_trial = status.trial(source) if source else None
    if source_trial is None or source_trial.checkpoint_step is None:
        return None, None  # nothing saved yet: start fresh rather than fail on a missing checkpoint
    return source_trial.name, source_trial.checkpoint_step


async def _launch(
    experiment: str,
    spec: AgentExperimentSpec,
    runtime: Runtime,
    trial: TrialStatus,
    source: str | None,
    step: int | None,
) -> None:
    """Start `trial` under `spec` (with its launch settings), resuming checkpoint `step` of trial
    `source` when given (which shares those settings: a trial resumes only one launched alike)."""
    try:
        config = build_trial_config(
            experiment,
            spec,
            trial,
            checkpoint_dir=runtime.checkpoint_dir(trial.name, spec),
            resume_from=runtime.checkpoint_dir(source, spec) if source else None,
            resume_step=step if source else None,
        )
    except ValueError as error:  # the same spec makes the same config: retrying cannot help
        raise PermanentFailure(f"its trial config is invalid: {error}") from error
    await runtime.launch(trial, config, spec)


def _turned_false(before: AgentExperimentStatus, after: AgentExperimentStatus, type: str) -> str | None:
    """The message of condition `type` if it is False now and was not before."""
    was = next((c.status for c in before.conditions if c.type == type), None)
    now = next((c for c in after.conditions if c.type == type), None)
    return now.message if now is not None and now.status == "False" and was != "False" else None


def _quota_condition(status: AgentExperimentStatus, now: str) -> AgentExperimentStatus:
    """QuotaAvailable: False (QuotaExceeded) naming the bound while a decision waits for it; True after."""
    waiting = status.waiting_for_quota
    if not waiting:
        return _healthy_again(
            status, contract.CONDITION_QUOTA_AVAILABLE, "QuotaAvailable", "nothing waits for quota", now
        )
    first = waiting[0]
    message = (
        f"{len(waiting)} decision(s) wait for quota since {first.since}: {first.id} ({first.action}"
        f"{' ' + first.trial if first.trial else ''}) waits for {first.bound}; it proceeds when there is room"
    )
    return _condition(status, contract.CONDITION_QUOTA_AVAILABLE, "False", contract.REASON_QUOTA_EXCEEDED, message, now)


def _approval_condition(status: AgentExperimentStatus, experiment: str, now: str) -> AgentExperimentStatus:
    """AwaitingApproval: True naming what waits and how to approve it, False once nothing does."""
    waiting = status.awaiting_approval
    if not waiting:
        return _healthy_again(
            status, contract.CONDITION_AWAITING_APPROVAL, "NoneAwaiting", "nothing awaits approval", now, value="False"
        )
    listed = "; ".join(
        f"{held.id} ({held.action}{' ' + held.trial if held.trial else ''}, expires {held.expires_at})"
        for held in waiting[:5]
    )
    message = (
        f"{len(waiting)} decision(s) await a human: {listed}. Approve with `trainpilot approve {experiment} "
        f"<id>` or reject with `trainpilot reject {experiment} <id>`"
    )
    return _condition(
        status, contract.CONDITION_AWAITING_APPROVAL, "True", contract.REASON_DECISION_PENDING_APPROVAL, message, now
    )


def _condition(
    status: AgentExperimentStatus, type: str, value: ConditionValue, reason: str, message: str, now: str
) -> AgentExperimentStatus:
    return set_condition(status, type=type, value=value, reason=reason, message=message, now=now)


def _healthy_again(
    status: AgentExperimentStatus, type: str, reason: str, message: str, now: str, value: ConditionValue = "True"
) -> AgentExperimentStatus:
    """A condition that was set turns to `value` (True: nothing wrong); one never set stays unset."""
    current = next((c for c in status.conditions if c.type == type), None)
    if current is None or current.status == value:
        return status
    return _condition(status, type, value, reason, message, now)


def _with_generation(status: AgentExperimentStatus, generation: int | None, now: str) -> AgentExperimentStatus:
    """Mark the spec generation this cycle acted on (kubectl and Argo CD read it)."""
    status = set_condition(
        status,
        type=contract.CONDITION_VALID,
        value="True",
        reason="SpecAccepted",
        message="spec passed validation",
        generation=generation,
        now=now,
    )
    if generation is not None:
        status = status.model_copy(update={"observed_generation": generation})
    return status
