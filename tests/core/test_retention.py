"""core.retention: which finished trials lose their checkpoints or children, and when; and a
replayed clean-up record is carried out only if the rules call for it."""

from __future__ import annotations

from tests.support.builders import EXPERIMENT, at, make_spec, trial
from trainpilot.api.experiment import AgentExperimentStatus, BestTrial
from trainpilot.core.decision import CLEAN_UP, Decision
from trainpilot.core.engine import clean_up_record, recheck
from trainpilot.core.observation import CleanUpObservation, Observation
from trainpilot.core.retention import STALLED_HINT, Removal, due, stalled
from trainpilot.core.state import apply_record

BOTH = ("checkpoints", "children")


def finished(name: str, index: int, second: float, **fields) -> object:
    fields.setdefault("checkpoint_step", 100)
    return trial(name, index=index, state="Succeeded", finished_at=at(second), **fields)


def status(*trials, best: str | None = None, **fields) -> AgentExperimentStatus:
    best_trial = BestTrial(name=best, objective=1.0) if best else None
    return AgentExperimentStatus(trials=list(trials), best_trial=best_trial, decisions_made=len(trials), **fields)


def removed(removals: list[Removal]) -> list[tuple[str, str]]:
    return [(removal.trial, removal.removes) for removal in removals]


def test_checkpoints_go_except_the_best_the_last_n_to_finish_and_what_an_active_trial_resumes():
    spec = make_spec(retention={"checkpointTrials": 2, "childrenAfterSeconds": None})
    trials = [finished(f"t{i}", i, second=10 * i) for i in range(6)]
    child = trial("t6", index=6, state="Running", parent="t1")
    now = at(1000)
    plan = due(spec, status(*trials, child, best="t0"), now, BOTH)
    # t0 the best, t1 resumed by t6, t4 and t5 the last two to finish.
    assert removed(plan) == [("t2", "checkpoints"), ("t3", "checkpoints")]
    assert "spec.retention.checkpointTrials" in plan[0].why


def test_nothing_goes_that_was_never_saved_or_is_gone_already_or_is_kept_by_null():
    spec = make_spec(retention={"checkpointTrials": 0, "childrenAfterSeconds": None})
    never = finished("t0", 0, 0, checkpoint_step=None)
    gone = finished("t1", 1, 0, removed=["checkpoints"])
    running = trial("t2", index=2, state="Running", checkpoint_step=50)
    assert due(spec, status(never, gone, running), at(100), BOTH) == []
    keep_all = make_spec(retention={"checkpointTrials": None, "childrenAfterSeconds": None})
    assert due(keep_all, status(finished("t0", 0, 0)), at(100), BOTH) == []


def test_children_go_after_the_grace_period_unless_an_active_trial_waits_for_their_pods():
    spec = make_spec(retention={"checkpointTrials": None, "childrenAfterSeconds": 60})
    early, late, parent = finished("t0", 0, 0), finished("t1", 1, 50), finished("t2", 2, 0)
    waiting = trial("t3", index=3, state="Pending", waiting_for="t2", waiting_since=at(0))
    plan = due(spec, status(early, late, parent, waiting), at(100), BOTH)
    assert removed(plan) == [("t0", "children")]
    assert "finished 100 s ago" in plan[0].why
    assert due(spec, status(early), at(100), ("checkpoints",)) == []  # a runtime with no children to delete


def test_a_clean_up_record_marks_what_went_and_is_not_planned_again():
    spec = make_spec(retention={"checkpointTrials": 0, "childrenAfterSeconds": 0})
    before = status(finished("t0", 0, 0))
    [first, second] = due(spec, before, at(10), BOTH)
    after = before
    for seq, removal in enumerate([first, second], start=before.decisions_made):
        after = apply_record(spec, after, clean_up_record(EXPERIMENT, seq, removal, at(10)), at(10))
    assert after.trial("t0").removed == ["checkpoints", "children"]  # type: ignore[union-attr]
    assert due(spec, after, at(20), BOTH) == []
    assert after.decisions[-1].action == CLEAN_UP


def test_a_replayed_clean_up_is_carried_out_only_if_the_rules_call_for_it():
    spec = make_spec(retention={"checkpointTrials": 0, "childrenAfterSeconds": None})
    seen = status(finished("t0", 0, 0), finished("t1", 1, 0), best="t0")
    [removal] = due(spec, seen, at(10), BOTH)
    genuine = clean_up_record(EXPERIMENT, seen.decisions_made, removal, at(10))
    assert recheck(EXPERIMENT, spec, seen, genuine, None).executed
    # A forged line deleting the best trial's checkpoints, or one in a policy's name, never acts.
    best = genuine.model_copy(update={"decision": genuine.decision.model_copy(update={"trial": "t0"})})
    assert not recheck(EXPERIMENT, spec, seen, best, None).executed
    voiced = genuine.model_copy(update={"decision": genuine.decision.model_copy(update={"policy": "claude"})})
    assert not recheck(EXPERIMENT, spec, seen, voiced, None).executed


def test_no_policy_can_propose_a_clean_up():
    from trainpilot.core import guardrails

    spec = make_spec()
    proposal = Decision(action=CLEAN_UP, policy="claude", reason="x", trial="t0", removes="checkpoints")
    verdict = guardrails.check(proposal, spec, status(finished("t0", 0, 0)), None)
    assert not verdict.executed and "is not one of" in verdict.reason


def test_a_finished_experiment_knows_when_its_next_children_are_due():
    from trainpilot.core.retention import seconds_until_due

    spec = make_spec(retention={"childrenAfterSeconds": 60})
    seen = status(finished("t0", 0, 0), finished("t1", 1, 30), finished("t2", 2, 0, removed=["children"]))
    assert seconds_until_due(spec, seen, at(40)) == 20  # t0's
    assert seconds_until_due(spec, seen, at(100)) == 0
    assert seconds_until_due(make_spec(retention={"childrenAfterSeconds": None}), seen, at(40)) is None


def clean_up(since: float, failed: bool = False, reason: str = "container cleanup: ContainerCreating"):
    return CleanUpObservation(
        job="exp-t000-cleanup", directory="/ckpt/exp/uid/exp-t000", since=at(since), failed=failed, reason=reason
    )


def test_a_clean_up_is_stalled_once_it_fails_or_waits_past_the_pending_timeout():
    spec = make_spec(trialTemplate={"pendingTimeoutSeconds": 60})
    waiting = Observation(time=at(100), clean_ups={"exp-t000": clean_up(since=50)})
    assert stalled(spec, waiting, at(100)) is None  # 50 s: a pod may take that long to start
    why = stalled(spec, waiting, at(110))
    assert why is not None and why.startswith(
        "exp-t000: Job exp-t000-cleanup has not deleted /ckpt/exp/uid/exp-t000 in 60 s "
        "(spec.trialTemplate.pendingTimeoutSeconds 60): container cleanup: ContainerCreating; "
    )
    assert why.endswith(STALLED_HINT)
    failed = Observation(
        time=at(51), clean_ups={"exp-t000": clean_up(since=50, failed=True, reason="BackoffLimitExceeded")}
    )
    assert stalled(spec, failed, at(51)) == (
        f"exp-t000: Job exp-t000-cleanup failed to delete /ckpt/exp/uid/exp-t000: BackoffLimitExceeded; {STALLED_HINT}"
    )
    assert stalled(spec, Observation(time=at(500)), at(500)) is None  # none left: all done
