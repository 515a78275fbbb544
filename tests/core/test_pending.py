"""Pending timeouts: a trial whose pods wait past spec.trialTemplate.pendingTimeoutSeconds fails."""

from __future__ import annotations

from tests.support.builders import EXPERIMENT, at, make_spec, status_of, trial
from trainpilot.core.decision import SYSTEM_POLICY, Decision
from trainpilot.core.observation import Observation, TrialObservation
from trainpilot.core.pending import pending_timeouts, plan_with_timeouts, timeout_records
from trainpilot.core.state import PENDING_TIMEOUT_REASON

UNSCHEDULABLE = "pod exp-t000-0-abcde: Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."


def seen(name: str, since: str | None, reason: str = UNSCHEDULABLE, phase: str = "Pending") -> Observation:
    observed = TrialObservation(name=name, phase=phase, pending_since=since, pending_reason=reason if since else "")
    return Observation(time=at(0), trials={name: observed})


def test_a_trial_waiting_past_the_limit_is_stopped_and_one_within_it_is_not():
    spec = make_spec(trialTemplate={"pendingTimeoutSeconds": 120})
    status = status_of(spec, trial("exp-t000", state="Pending"))
    assert pending_timeouts(spec, status, seen("exp-t000", at(0)), at(119)) == []
    assert pending_timeouts(spec, status, seen("exp-t000", None), at(10_000)) == []
    [decision] = pending_timeouts(spec, status, seen("exp-t000", at(0)), at(120))
    assert (decision.action, decision.trial, decision.policy, decision.reason) == (
        "terminate",
        "exp-t000",
        SYSTEM_POLICY,
        PENDING_TIMEOUT_REASON,
    )
    assert "spec.trialTemplate.pendingTimeoutSeconds (120 s" in decision.rationale
    assert UNSCHEDULABLE in decision.rationale


def test_a_running_trial_with_a_pod_still_waiting_counts_too_and_finished_trials_never_do():
    spec = make_spec(trialTemplate={"pendingTimeoutSeconds": 60})
    running = status_of(spec, trial("exp-t000", state="Running"))
    assert len(pending_timeouts(spec, running, seen("exp-t000", at(0), phase="Running"), at(61))) == 1
    done = status_of(spec, trial("exp-t000", state="Succeeded"))
    assert pending_timeouts(spec, done, seen("exp-t000", at(0)), at(61)) == []


def test_the_record_fails_the_trial_with_the_pods_reason_and_frees_its_slot():
    spec = make_spec(trialTemplate={"pendingTimeoutSeconds": 60})
    status = status_of(spec, trial("exp-t000", state="Pending"), decisions_made=3)
    [record], after = timeout_records(EXPERIMENT, spec, status, seen("exp-t000", at(0)), at(61))
    assert (record.id, record.seq, record.outcome) == ("exp-d00003", 3, "executed")
    assert record.observation == {"pendingSince": at(0), "pendingReason": UNSCHEDULABLE}
    stopped = after.trial("exp-t000")
    assert stopped.state == "Failed" and UNSCHEDULABLE in stopped.message
    assert after.trials_running == 0 and after.trials_failed == 1 and after.decisions_made == 4


class Watching:
    name = "watching"

    def __init__(self) -> None:
        self.saw: list[str] = []

    async def decide(self, context):
        self.saw = [t.state for t in context.status.trials]
        return [
            Decision(
                action="launch", policy=self.name, reason="next", hyperparameters={"lr": 0.01, "weight_decay": 0.0}
            )
        ]


async def test_the_policy_plans_after_the_timeouts_and_sees_the_slot_free():
    spec = make_spec(trialTemplate={"pendingTimeoutSeconds": 60}, budget={"parallelTrials": 1})
    status = status_of(spec, trial("exp-t000", state="Pending"))
    policy = Watching()
    planned = await plan_with_timeouts(EXPERIMENT, spec, status, seen("exp-t000", at(0)), policy, at(61))
    assert policy.saw == ["Failed"]
    assert [(r.decision.action, r.outcome, r.seq) for r in planned.records] == [
        ("terminate", "executed", 0),
        ("launch", "executed", 1),  # parallelTrials 1: possible only because the stuck trial let go
    ]
