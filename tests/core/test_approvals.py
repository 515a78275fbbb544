"""Human sign-off: a held decision is carried out on approval (re-checked), dropped on rejection,
expired after spec.policy.approvalTimeoutSeconds, and never carried out on anyone's word but a
named human's."""

from __future__ import annotations

from tests.support.builders import EXPERIMENT, NOW, heuristic, make_spec, observation, status_of, trial
from trainpilot.core.approvals import Approval, settle, wanted
from trainpilot.core.decision import Decision
from trainpilot.core.engine import plan, recheck
from trainpilot.core.state import apply_record
from trainpilot.core.times import plus_seconds

GOOD = {"lr": 0.01, "weight_decay": 0.01}
LATER = plus_seconds(NOW, 60)


class Scripted:
    name = "scripted"

    def __init__(self, proposals) -> None:
        self.proposals = proposals

    async def decide(self, context):
        return self.proposals


def launch(**fields) -> Decision:
    fields.setdefault("hyperparameters", dict(GOOD))
    return Decision(action="launch", policy="scripted", reason="test", rationale="why", **fields)


async def held_launch(spec=None, status=None):
    spec = spec or make_spec(policy={"requireApprovalFor": ["launch"]})
    status = status if status is not None else status_of(spec)
    [record], after = await plan(EXPERIMENT, spec, status, observation(), Scripted([launch()]), NOW)
    return spec, record, after


async def test_a_held_decision_waits_in_status_with_its_expiry_and_how_to_approve_it():
    spec, record, after = await held_launch()
    assert record.outcome == "pending-approval" and after.trials == []
    assert f"trainpilot approve {EXPERIMENT} {record.id}" in record.verdict
    assert "spec.policy.requireApprovalFor includes 'launch'" in record.verdict
    [held] = after.awaiting_approval
    assert (held.id, held.action, held.state, held.hyperparameters) == (record.id, "launch", "Pending", GOOD)
    assert held.expires_at == plus_seconds(NOW, spec.policy.approval_timeout_seconds)


async def test_approved_it_is_carried_out_as_proposed_and_says_who_approved():
    spec, record, status = await held_launch()
    settlement = settle(EXPERIMENT, spec, status, {record.id: record}, [Approval(record.id, "approve", "alice")], LATER)
    [done] = settlement.records
    assert done.outcome == "executed" and done.follows == record.id and done.seq == record.seq + 1
    assert done.decision == record.decision and done.new_trial == f"{EXPERIMENT}-t000"
    assert done.sign_off is not None and (done.sign_off.verdict, done.sign_off.by) == ("approved", "alice")
    assert "approved by alice" in done.message()
    after = apply_record(spec, status, done, LATER)
    assert [t.hyperparameters for t in after.trials] == [GOOD]
    held = after.sign_off(record.id)
    assert held is not None and (held.state, held.by, held.settled_by_decision) == ("Approved", "alice", done.id)
    assert after.awaiting_approval == []
    # The annotation stays on the object: read again next cycle, it settles nothing twice.
    again = settle(EXPERIMENT, spec, after, {record.id: record}, [Approval(record.id, "approve", "alice")], LATER)
    assert again.records == [] and again.ignored == []


async def test_approved_but_no_longer_valid_it_is_rejected_saying_why():
    spec = make_spec(policy={"requireApprovalFor": ["launch"]}, budget={"parallelTrials": 1})
    spec, record, status = await held_launch(spec)
    # Meanwhile the one slot filled.
    status = status.model_copy(update={"trials": [trial(f"{EXPERIMENT}-t000", 0)]})
    [done] = settle(
        EXPERIMENT, spec, status, {record.id: record}, [Approval(record.id, "approve", "bob")], LATER
    ).records
    assert done.outcome == "rejected" and done.new_trial is None
    assert "approved by bob, but it no longer passes the guardrails" in done.verdict
    assert "parallelTrials" in done.verdict


async def test_rejected_it_is_dropped_and_the_heuristic_does_not_propose_it_again():
    spec = make_spec(policy={"requireApprovalFor": ["terminate"]}, budget={"maxTrials": 1, "parallelTrials": 1})
    status = status_of(spec, trial(f"{EXPERIMENT}-t000", 0, step=10))
    stop = Decision(action="terminate", policy="scripted", reason="stagnating", trial=f"{EXPERIMENT}-t000")
    [record], status = await plan(EXPERIMENT, spec, status, observation(), Scripted([stop]), NOW)
    given = [Approval(record.id, "reject", "carol"), Approval(record.id, "approve", "dave")]
    [done] = settle(EXPERIMENT, spec, status, {record.id: record}, given, LATER).records
    assert done.outcome == "rejected" and done.verdict == "rejected by carol"  # a rejection wins over an approval
    status = apply_record(spec, status, done, LATER)
    assert status.sign_off(record.id).state == "Rejected" and status.trials[0].state == "Running"

    # The heuristic would stop it for stagnating again: a human said no, so it does not ask again.
    decisions = await heuristic(spec, status)
    assert not any(d.action == "terminate" and d.reason == "stagnating" for d in decisions)


async def test_nobody_approves_it_in_time_and_it_expires():
    spec, record, status = await held_launch()
    timeout = spec.policy.approval_timeout_seconds
    assert wanted(status, [], plus_seconds(NOW, timeout - 1)) == []
    expires = plus_seconds(NOW, timeout)
    assert wanted(status, [], expires) == [record.id]
    [done] = settle(EXPERIMENT, spec, status, {record.id: record}, [], expires).records
    assert done.outcome == "rejected" and f"approvalTimeoutSeconds ({timeout} s)" in done.verdict
    assert done.sign_off is not None and (done.sign_off.verdict, done.sign_off.by) == ("expired", None)
    assert apply_record(spec, status, done, expires).sign_off(record.id).state == "Expired"
    # Too late: an approval after expiry does nothing.
    after = apply_record(spec, status, done, expires)
    late = settle(EXPERIMENT, spec, after, {record.id: record}, [Approval(record.id, "approve", "alice")], expires)
    assert late.records == []


async def test_a_sign_off_naming_no_held_decision_or_nobody_is_ignored_saying_why():
    spec, record, status = await held_launch()
    given = [Approval(f"{EXPERIMENT}-d00099", "approve", "alice"), Approval(record.id, "approve", "")]
    settlement = settle(EXPERIMENT, spec, status, {record.id: record}, given, LATER)
    assert settlement.records == []
    [(unknown, why_unknown), (nameless, why_nameless)] = settlement.ignored
    assert "is not a decision held for approval" in why_unknown
    assert "names nobody" in why_nameless
    assert status.sign_off(record.id).state == "Pending"


async def test_an_approved_record_replayed_after_a_restart_is_carried_out_once():
    spec, record, status = await held_launch()
    [done] = settle(
        EXPERIMENT, spec, status, {record.id: record}, [Approval(record.id, "approve", "alice")], LATER
    ).records
    # The operator died after writing the ledger, before saving status: the record is replayed.
    assert recheck(EXPERIMENT, spec, status, done, None).executed
    # Replayed once more against a status where it already happened, it does not pass.
    after = apply_record(spec, status, done, LATER)
    forged = done.model_copy(update={"seq": after.decisions_made, "id": f"{EXPERIMENT}-d{after.decisions_made:05d}"})
    assert not recheck(EXPERIMENT, spec, after, forged, None).executed


async def test_the_experiment_ending_ends_what_it_held():
    spec, record, status = await held_launch()
    finish = Decision(action="complete", policy="scripted", reason="done", outcome="succeeded")
    [end], after = await plan(EXPERIMENT, spec, status, observation(), Scripted([finish]), LATER)
    assert end.outcome == "executed" and after.awaiting_approval == []
    assert after.sign_off(record.id).state == "Expired"
