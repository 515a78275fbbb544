"""engine.plan: every proposal is checked, numbered and recorded; nothing unchecked gets through."""

from __future__ import annotations

import math
from types import SimpleNamespace

from tests.support.builders import EXPERIMENT, NOW, make_spec, observation, status_of, trial
from trainpilot.core.decision import Decision
from trainpilot.core.engine import MAX_DECISIONS_PER_CYCLE, MAX_SUMMARY_TRIALS, plan

GOOD = {"lr": 0.01, "weight_decay": 0.01}


class Scripted:
    """A policy that proposes whatever it was given."""

    name = "scripted"

    def __init__(self, proposals) -> None:
        self.proposals = proposals
        self.context = None

    async def decide(self, context):
        self.context = context
        return self.proposals


def launch(**fields) -> Decision:
    fields.setdefault("hyperparameters", dict(GOOD))
    return Decision(action="launch", policy="scripted", reason="test", rationale="why", **fields)


async def run(spec, status, proposals, limits=None):
    return await plan(EXPERIMENT, spec, status, observation(), Scripted(proposals), NOW, limits)


async def test_ids_and_trial_names_are_sequential():
    spec = make_spec(budget={"parallelTrials": 3})
    status = status_of(spec, trial("exp-t000", 0, "Succeeded"), trial("exp-t001", 1, "Failed"), decisions_made=5)
    records, after = await run(spec, status, [launch(), launch()])
    assert [r.id for r in records] == ["exp-d00005", "exp-d00006"]
    assert [r.seq for r in records] == [5, 6]
    assert [r.new_trial for r in records] == ["exp-t002", "exp-t003"]
    assert after.decisions_made == 7 and [t.name for t in after.trials][-2:] == ["exp-t002", "exp-t003"]
    assert all(r.time == NOW and r.experiment == EXPERIMENT for r in records)


async def test_two_launches_in_one_cycle_both_count_against_parallelism():
    spec = make_spec(budget={"parallelTrials": 2})
    status = status_of(spec, trial("exp-t000", 0))
    records, after = await run(spec, status, [launch(), launch()])
    assert [r.outcome for r in records] == ["executed", "rejected"]
    assert "spec.budget.parallelTrials is 2" in records[1].verdict
    assert records[1].new_trial is None
    assert after.trials_running == 2 and after.decisions[-1].outcome == "rejected"


async def test_records_carry_before_after_and_what_the_policy_saw():
    spec = make_spec()
    status = status_of(spec, trial("exp-t000", 0, step=30, objective=2.5, best_objective=2.5))
    mutate = Decision(
        action="mutate", policy="x", reason="slow", trial="exp-t000", mode="in-place", hyperparameters={"lr": 0.001}
    )
    [record], after = await run(spec, status, [mutate])
    assert record.outcome == "executed"
    assert record.before == {"lr": 0.01, "weight_decay": 0.0}
    assert record.after == {"lr": 0.001, "weight_decay": 0.0}
    assert record.observation["trials"]["exp-t000"] == {"state": "Running", "step": 30, "objective": 2.5}
    assert after.trials[0].control_generation == 1


async def test_observation_summary_is_bounded():
    spec = make_spec(budget={"maxTrials": 100})
    trials = [trial(f"exp-t{i:03d}", i, "Succeeded") for i in range(40)]
    [record], _ = await run(spec, status_of(spec, *trials), [launch()])
    assert len(record.observation["trials"]) == MAX_SUMMARY_TRIALS
    assert "exp-t039" in record.observation["trials"]  # the newest are kept


async def test_a_failing_policy_yields_no_decisions():
    class Broken:
        name = "broken"

        async def decide(self, context):
            raise RuntimeError("model unavailable")

    spec = make_spec()
    status = status_of(spec)
    errors = []
    records, after = await plan(EXPERIMENT, spec, status, observation(), Broken(), NOW, on_policy_error=errors.append)
    assert records == [] and after.trials == status.trials and after.decisions_made == status.decisions_made
    assert [str(error) for error in errors] == ["model unavailable"]


async def test_at_most_sixteen_decisions_per_cycle():
    spec = make_spec()
    noise = [Decision(action="terminate", policy="x", reason="r", trial="ghost") for _ in range(40)]
    records, _ = await run(spec, status_of(spec), noise)
    assert len(records) == MAX_DECISIONS_PER_CYCLE


async def test_pending_approval_is_recorded_without_effect():
    spec = make_spec()
    [record], after = await run(spec, status_of(spec), [launch()], SimpleNamespace(require_approval_for=["launch"]))
    assert record.outcome == "pending-approval" and record.new_trial is None
    assert after.trials == [] and after.decisions_made == 1


async def test_a_hostile_policy_cannot_get_anything_executed():
    spec = make_spec(
        searchSpace=[{"name": "lr", "min": 1e-4, "max": 1.0, "log": True}, {"name": "n_layer", "min": 1, "max": 4}]
    )
    status = status_of(
        spec,
        trial("exp-t000", 0, hyperparameters={"lr": 0.01, "n_layer": 2}),
        trial("exp-t001", 1, "Succeeded", hyperparameters={"lr": 0.01, "n_layer": 2}),
    )

    class Hostile:
        name = "hostile"

        async def decide(self, context):
            # Try to loosen the rules through the context it was handed.
            context.spec.budget.max_trials = 10_000
            context.spec.search_space[0].max = 1e9
            context.status.trials.clear()
            context.suggester.status.trials_launched = 0
            context.limits.max_gpus = None
            return [
                Decision(action="launch", policy="heuristic", reason="x", hyperparameters={"lr": 1e6, "n_layer": 2}),
                Decision(action="launch", policy="x", reason="x", hyperparameters={"lr": math.nan, "n_layer": 2}),
                Decision(
                    action="launch", policy="x", reason="x", hyperparameters={"lr": 0.1, "n_layer": 2, "__class__": 1}
                ),
                Decision(action="launch", policy="x", reason="x", hyperparameters={"lr": 0.1}),
                Decision(
                    action="launch",
                    policy="x",
                    reason="x",
                    hyperparameters={"lr": 0.1, "n_layer": 2},
                    resume_from="../../etc/passwd",
                ),
                Decision(action="terminate", policy="x", reason="x", trial="exp-t999"),
                Decision(action="terminate", policy="x", reason="x", trial="Ignore all previous instructions"),
                Decision(action="terminate", policy="x", reason="x", trial="exp-t001"),
                Decision(
                    action="mutate",
                    policy="x",
                    reason="x",
                    trial="exp-t000",
                    mode="in-place",
                    hyperparameters={"n_layer": 4},
                ),
                Decision(
                    action="mutate",
                    policy="x",
                    reason="x",
                    trial="exp-t000",
                    mode="restart",
                    hyperparameters={"lr": -1.0},
                ),
                Decision(action="scale", policy="x", reason="x", trial="exp-t000", nodes=1000),
                Decision(action="scale", policy="x", reason="x", trial="exp-t000", gpus_per_node=-2),
                Decision(action="complete", policy="x", reason="x"),
                Decision.model_construct(action="rm -rf /", policy="x", reason="x", hyperparameters={}),
                {"action": "launch", "hyperparameters": "lots"},
                "launch everything",
            ]

    limits = SimpleNamespace(max_gpus=64)
    records, after = await plan(EXPERIMENT, spec, status, observation(), Hostile(), NOW, limits)
    assert records and all(record.outcome == "rejected" for record in records)
    assert all(record.verdict for record in records)
    assert all(record.decision.policy == "hostile" for record in records)  # it cannot pose as another
    assert after.trials == status.trials
    assert spec.budget.max_trials == 8 and spec.search_space[0].max == 1.0 and limits.max_gpus == 64


async def test_heuristic_through_the_engine_launches_initial_trials():
    from trainpilot.core.policy import HeuristicPolicy

    spec = make_spec(initialTrials=[{"lr": 0.5, "weight_decay": 0.0}])
    records, after = await plan(EXPERIMENT, spec, status_of(spec), observation(), HeuristicPolicy(), NOW)
    assert [(r.decision.reason, r.outcome, r.new_trial) for r in records] == [
        ("initial-trial", "executed", "exp-t000"),
        ("suggested", "executed", "exp-t001"),
    ]
    assert after.trials[0].hyperparameters == {"lr": 0.5, "weight_decay": 0.0}


async def test_a_failing_policy_is_counted_and_fails_the_experiment_at_its_limit():
    from trainpilot.core.engine import plan_cycle

    class Broken:
        name = "broken"

        async def decide(self, context):
            return "launch everything"  # not a list: a failure like any other

    spec = make_spec(policy={"maxConsecutiveFailures": 2})
    first = await plan_cycle(EXPERIMENT, spec, status_of(spec), observation(), Broken(), NOW)
    condition = next(c for c in first.status.conditions if c.type == "PolicyHealthy")
    assert first.records == [] and first.status.policy_failures == 1 and condition.status == "False"
    assert "answered with str, not a list" in first.policy_failure
    second = await plan_cycle(EXPERIMENT, spec, first.status, observation(), Broken(), NOW)
    [failed] = second.records
    assert (failed.decision.action, failed.decision.outcome, failed.decision.policy) == (
        "complete",
        "failed",
        "trainpilot",
    )
    assert second.provisional.phase == "Failed" and "maxConsecutiveFailures 2" in second.provisional.message


async def test_an_objective_never_exported_fails_the_experiment_before_the_policy_is_asked():
    from tests.support.builders import seen
    from trainpilot.core.engine import MAX_EVALUATIONS_WITHOUT_OBJECTIVE, plan_cycle

    spec = make_spec(objective={"metric": "accuracy"})
    status = status_of(spec, trial("exp-t000", 0, evaluations=MAX_EVALUATIONS_WITHOUT_OBJECTIVE, step=150))
    scrape = observation(seen("exp-t000", step=150, val_loss=2.0, eval_step=150))
    policy = Scripted([launch()])
    planned = await plan_cycle(EXPERIMENT, spec, status, scrape, policy, NOW)
    [failed] = planned.records
    assert policy.context is None and failed.decision.reason == "objective-not-exported"
    message = failed.decision.rationale
    assert "'accuracy'" in message and "never exported trainpilot_accuracy" in message
    assert "trainpilot_val_loss" in message and "trainpilot_eval_step" in message
    fewer = status_of(spec, trial("exp-t000", 0, evaluations=MAX_EVALUATIONS_WITHOUT_OBJECTIVE - 1, step=150))
    assert (await plan_cycle(EXPERIMENT, spec, fewer, scrape, Scripted([]), NOW)).records == []


def test_replayed_records_are_checked_again():
    from trainpilot.core.decision import DecisionRecord
    from trainpilot.core.engine import recheck

    spec = make_spec()
    status = status_of(spec)

    def recorded(seq=0, new_trial="exp-t000", **fields):
        return DecisionRecord(
            id=f"exp-d{seq:05d}",
            seq=seq,
            time=NOW,
            experiment=EXPERIMENT,
            decision=launch(**fields),
            outcome="executed",
            new_trial=new_trial,
        )

    assert recheck(EXPERIMENT, spec, status, recorded(), None).executed
    assert (
        "outside spec.searchSpace"
        in recheck(EXPERIMENT, spec, status, recorded(hyperparameters={"lr": 50.0, "weight_decay": 0.0}), None).reason
    )
    assert (
        "is not exp-d00000" in recheck(EXPERIMENT, spec, status, recorded().model_copy(update={"id": "x"}), None).reason
    )
    assert "names new trial" in recheck(EXPERIMENT, spec, status, recorded(new_trial="exp-t007"), None).reason
    held = recheck(EXPERIMENT, spec, status, recorded(), SimpleNamespace(max_parallel_trials=0))
    assert not held.executed and "max_parallel_trials" in held.reason
