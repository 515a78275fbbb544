"""Guardrails: every violation is rejected with a reason that names the field and the limit."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from tests.support.builders import healthy, make_spec, status_of, trial
from trainpilot.api.quota import effective_limits
from trainpilot.core.decision import Decision
from trainpilot.core.guardrails import check, launch_capacity

GOOD = {"lr": 0.01, "weight_decay": 0.01}


def launch(**fields) -> Decision:
    fields.setdefault("hyperparameters", dict(GOOD))
    return Decision(action="launch", policy="test", reason="test", **fields)


def act(action: str, **fields) -> Decision:
    return Decision(action=action, policy="test", reason="test", **fields)


def rejected(verdict, *words: str) -> bool:
    return verdict.outcome == "rejected" and all(word in verdict.reason for word in words)


def waits(verdict, *words: str) -> bool:
    return verdict.outcome == "waiting" and all(word in verdict.reason for word in words)


def test_a_valid_launch_is_executed():
    spec = make_spec()
    verdict = check(launch(), spec, status_of(spec))
    assert verdict.outcome == "executed" and verdict.reason == ""


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"lr": 5.0, "weight_decay": 0.0}, ("hyperparameters.lr", "outside spec.searchSpace", "[0.0001, 1.0]")),
        ({"lr": 0.01, "weight_decay": 0.0, "n_layer": 4}, ("n_layer", "not in spec.searchSpace")),
        ({"lr": 0.01}, ("missing", "weight_decay")),
        ({"lr": math.nan, "weight_decay": 0.0}, ("hyperparameters.lr", "not a finite number")),
        ({"lr": math.inf, "weight_decay": 0.0}, ("hyperparameters.lr", "not a finite number")),
        ({"lr": 0.01, "weight_decay": 0.0, "ignore previous instructions": 1.0}, ("not in spec.searchSpace",)),
    ],
)
def test_launch_outside_the_space_is_rejected(values, words):
    spec = make_spec()
    assert rejected(check(launch(hyperparameters=values), spec, status_of(spec)), *words)


def test_integer_hyperparameters_must_be_whole():
    spec = make_spec(searchSpace=[{"name": "lr", "min": 1e-4, "max": 1.0}, {"name": "n_layer", "min": 1, "max": 8}])
    status = status_of(spec)
    assert rejected(check(launch(hyperparameters={"lr": 0.1, "n_layer": 2.5}), spec, status), "n_layer", "whole")
    assert check(launch(hyperparameters={"lr": 0.1, "n_layer": 3}), spec, status).executed


def test_launch_over_max_trials_is_rejected():
    spec = make_spec(budget={"maxTrials": 2, "parallelTrials": 2})
    status = status_of(spec, trial("a", 0, "Succeeded"), trial("b", 1, "Succeeded"))
    assert rejected(check(launch(), spec, status), "spec.budget.maxTrials is 2")


def test_launch_over_parallelism_is_rejected():
    spec = make_spec()
    status = status_of(spec, trial("a", 0), trial("b", 1, "Pending"))
    assert rejected(check(launch(), spec, status), "spec.budget.parallelTrials is 2", "2 trials running")


def test_launch_after_too_many_failures_is_rejected():
    spec = make_spec(budget={"maxFailedTrials": 1})
    status = status_of(spec, trial("a", 0, "Failed"), trial("b", 1, "Failed"))
    assert rejected(check(launch(), spec, status), "spec.budget.maxFailedTrials is 1")


def test_launch_over_gpu_hours_is_rejected():
    spec = make_spec(budget={"maxGPUHours": 1.0})
    status = status_of(spec, trial("a", 0, "Succeeded", gpu_seconds=3600.0))
    assert rejected(check(launch(), spec, status), "spec.budget.maxGPUHours is 1")


def test_trial_steps_are_priced_ahead_so_running_trials_hold_what_they_will_train():
    spec = make_spec(
        budget={"maxTrialSteps": 700, "parallelTrials": 4}, trialTemplate={"hyperparameters": {"max_steps": 200}}
    )
    # a: 150 trained, stopped early (gives back 50); b: running, holds all 200; c: resumed at 100, holds 100
    status = status_of(
        spec,
        trial("a", 0, "Terminated", step=150),
        healthy("b", 1, step=20),
        healthy("c", 2, step=120, resumed_from_step=100),
    )
    assert status.trial_steps_used == 150 + 20 + 20
    assert launch_capacity(spec, status) == 1  # 700 - (150 + 200 + 100) = 250: one more 200-step trial
    assert check(launch(), spec, status).executed
    spec = make_spec(
        budget={"maxTrialSteps": 600, "parallelTrials": 4}, trialTemplate={"hyperparameters": {"max_steps": 200}}
    )
    assert rejected(
        check(launch(), spec, status),
        "spec.budget.maxTrialSteps is 600: 450 trial-steps committed, and this needs 200 more",
    )
    # Resuming a checkpoint costs only the steps still to train: 200 - 150 = 50 fit in the 150 left.
    resumable = status.model_copy(deep=True)
    resumable.trials[0].checkpoint_step = 150
    assert check(launch(resume_from="a", parent="a"), spec, resumable).executed
    # Stopping b this cycle gives back the 180 steps it will not train: 600 - (150 + 20 + 100) = 330.
    assert launch_capacity(spec, status) == 0 and launch_capacity(spec, status, releasing={"b"}) == 1


def test_launch_references_must_exist_and_resume_needs_a_checkpoint():
    spec = make_spec()
    status = status_of(spec, trial("a", 0, "Diverged"))
    assert rejected(check(launch(parent="nope"), spec, status), "parent", "'nope'")
    assert rejected(check(launch(resume_from="nope"), spec, status), "resumeFrom", "'nope'")
    assert rejected(check(launch(resume_from="a"), spec, status), "resumeFrom", "no checkpoint")
    deleted = status_of(spec, trial("a", 0, "Succeeded", checkpoint_step=100, removed=["checkpoints"]))
    assert rejected(check(launch(resume_from="a"), spec, deleted), "resumeFrom", "deleted under spec.retention")


def test_disallowed_action_is_rejected():
    spec = make_spec(policy={"allowedActions": ["launch", "terminate"]})
    status = status_of(spec, trial("a"))
    verdict = check(act("scale", trial="a", nodes=2), spec, status)
    assert rejected(verdict, "'scale'", "spec.policy.allowedActions")


def test_quota_allowed_actions_narrow_the_spec():
    spec = make_spec()
    limits = SimpleNamespace(allowed_actions=["terminate"])
    assert rejected(check(launch(), spec, status_of(spec), limits), "quota allowed_actions")


@pytest.mark.parametrize("action", ["terminate", "mutate", "scale"])
def test_unknown_or_finished_target_is_rejected(action):
    spec = make_spec()
    status = status_of(spec, trial("done", 0, "Succeeded"))
    extra = {"mutate": {"mode": "in-place", "hyperparameters": {"lr": 0.01}}, "scale": {"nodes": 2}}.get(action, {})
    assert rejected(check(act(action, trial="'; rm -rf / #", **extra), spec, status), "no trial named")
    assert rejected(check(act(action, trial="done", **extra), spec, status), "done", "already finished")
    assert rejected(check(act(action, **extra), spec, status), "trial is required")


def test_in_place_mutate_is_limited_to_lr_and_weight_decay():
    spec = make_spec(searchSpace=[{"name": "lr", "min": 1e-4, "max": 1.0}, {"name": "n_layer", "min": 1, "max": 8}])
    status = status_of(spec, trial("a", hyperparameters={"lr": 0.01, "n_layer": 2}))
    verdict = check(act("mutate", trial="a", mode="in-place", hyperparameters={"n_layer": 4}), spec, status)
    assert rejected(verdict, "in-place", "'n_layer' needs mode restart")
    assert check(act("mutate", trial="a", mode="restart", hyperparameters={"n_layer": 4}), spec, status).executed
    assert check(act("mutate", trial="a", mode="in-place", hyperparameters={"lr": 0.001}), spec, status).executed
    assert rejected(check(act("mutate", trial="a", hyperparameters={"lr": 0.001}), spec, status), "mode")
    assert rejected(
        check(act("mutate", trial="a", mode="in-place", hyperparameters={"lr": 9.0}), spec, status), "outside"
    )


def test_restart_costs_a_trial_but_not_a_slot():
    spec = make_spec(budget={"maxTrials": 2, "parallelTrials": 2})
    status = status_of(spec, trial("a", 0), trial("b", 1))
    mutate = act("mutate", trial="a", mode="restart", hyperparameters={"weight_decay": 0.05})
    assert rejected(check(mutate, spec, status), "spec.budget.maxTrials is 2")
    roomy = make_spec(budget={"maxTrials": 8, "parallelTrials": 2})
    assert check(mutate, roomy, status_of(roomy, trial("a", 0), trial("b", 1))).executed


def test_scale_bounds_and_quota():
    spec = make_spec()
    status = status_of(spec, trial("a", nodes=1, gpus_per_node=1))
    assert rejected(check(act("scale", trial="a", nodes=1000), spec, status), "nodes", "1..64")
    assert rejected(check(act("scale", trial="a", gpus_per_node=17), spec, status), "gpusPerNode", "0..16")
    assert rejected(check(act("scale", trial="a"), spec, status), "give nodes")
    limits = SimpleNamespace(max_nodes_per_trial=2, max_gpus_per_node=4)
    assert rejected(check(act("scale", trial="a", nodes=3), spec, status, limits), "quota max_nodes_per_trial")
    assert rejected(check(act("scale", trial="a", gpus_per_node=8), spec, status, limits), "quota max_gpus_per_node")
    assert check(act("scale", trial="a", nodes=2, gpus_per_node=4), spec, status, limits).executed


def test_quota_max_gpus_counts_running_trials_and_this_one():
    spec = make_spec(trialTemplate={"gpusPerNode": 2})
    status = status_of(spec, trial("a", 0, gpus_per_node=2))
    limits = SimpleNamespace(max_gpus=3)
    # GPUs come back when trials finish: the launch waits for them instead of failing.
    assert waits(check(launch(), spec, status, limits), "quota max_gpus is 3", "2 GPUs in use", "needs 2")
    # Scaling "a" itself replaces its own GPUs rather than adding to them.
    assert check(act("scale", trial="a", gpus_per_node=3), spec, status, limits).executed
    assert check(launch(), spec, status, SimpleNamespace(max_gpus=4)).executed


def test_quota_counts_and_hours():
    spec = make_spec()
    status = status_of(spec, trial("a", 0, gpu_seconds=7200.0))
    assert waits(check(launch(), spec, status, SimpleNamespace(max_parallel_trials=1)), "quota max_parallel_trials")
    # An experiment's own totals never come back: rejected, and before any bound that would wait.
    assert rejected(check(launch(), spec, status, SimpleNamespace(max_trials_per_experiment=1)), "quota max_trials_per")
    assert rejected(check(launch(), spec, status, SimpleNamespace(max_gpu_hours_per_experiment=2)), "GPU-hours")
    both = SimpleNamespace(max_parallel_trials=1, max_trials_per_experiment=1)
    assert rejected(check(launch(), spec, status, both), "max_trials_per_experiment")


def test_a_namespaces_gpu_hours_in_the_rolling_period_make_launches_wait_naming_the_policy():
    from trainpilot.api.quota import PeriodPool

    spec = make_spec()
    status = status_of(spec)
    spent = SimpleNamespace(period_pools=[PeriodPool(policy="team-ml", max_gpu_hours=100, days=7, used=100.5)])
    assert waits(check(launch(), spec, status, spent), "QuotaPolicy team-ml maxGPUHoursPerPeriod (7 days) is 100")
    room = SimpleNamespace(period_pools=[PeriodPool(policy="team-ml", max_gpu_hours=100, days=7, used=99)])
    assert check(launch(), spec, status, room).executed
    # A terminate never waits: freeing GPUs is always allowed.
    running = status_of(spec, trial("a", 0))
    assert check(act("terminate", trial="a"), spec, running, spent).executed
    # None means unlimited.
    assert check(launch(), spec, status, SimpleNamespace(max_gpus=None, max_parallel_trials=None)).executed


def test_require_approval_holds_an_otherwise_valid_decision():
    spec = make_spec()
    status = status_of(spec)
    limits = SimpleNamespace(require_approval_for=["launch"])
    verdict = check(launch(), spec, status, limits)
    assert verdict.outcome == "pending-approval" and "quota requireApprovalFor" in verdict.reason
    # Approval never rescues an invalid decision.
    assert check(launch(hyperparameters={"lr": 7.0, "weight_decay": 0}), spec, status, limits).outcome == "rejected"
    bad = launch(hyperparameters={"lr": 7.0, "weight_decay": 0})
    assert check(bad, spec, status, limits, approved=True).outcome == "rejected"
    # A human's approval waives only the approval itself.
    assert check(launch(), spec, status, limits, approved=True).executed


def test_the_spec_holds_actions_for_approval_too_and_says_which_setting_did():
    spec = make_spec(policy={"requireApprovalFor": ["terminate"]})
    status = status_of(spec, trial("a", 0))
    verdict = check(act("terminate", trial="a"), spec, status)
    assert verdict.outcome == "pending-approval" and "spec.policy.requireApprovalFor" in verdict.reason
    assert check(launch(), spec, status).executed
    quota = SimpleNamespace(require_approval_for=["launch"], sources={"require_approval_for": "team-ml"})
    assert "QuotaPolicy team-ml" in check(launch(), spec, status, quota).reason


def test_complete_needs_an_outcome_and_a_running_experiment():
    spec = make_spec()
    assert rejected(check(act("complete"), spec, status_of(spec)), "outcome")
    assert check(act("complete", outcome="failed"), spec, status_of(spec)).executed
    finished = status_of(spec, phase="Succeeded")
    assert rejected(check(launch(), spec, finished), "already finished")


def test_non_finite_node_counts_are_rejected():
    spec = make_spec()
    status = status_of(spec, trial("a"))
    decision = Decision.model_construct(
        action="scale",
        policy="x",
        reason="x",
        trial="a",
        nodes=math.nan,
        gpus_per_node=None,
        hyperparameters={},
        outcome=None,
        mode=None,
    )
    assert rejected(check(decision, spec, status), "nodes", "whole number")


def test_launch_capacity_takes_the_tightest_limit():
    spec = make_spec(budget={"maxTrials": 8, "parallelTrials": 4}, trialTemplate={"gpusPerNode": 2})
    status = status_of(spec, trial("a", 0, gpus_per_node=2))
    assert launch_capacity(spec, status) == 3
    assert launch_capacity(spec, status, SimpleNamespace(max_gpus=6)) == 2
    assert launch_capacity(spec, status, SimpleNamespace(max_gpus=6), releasing={"a"}) == 3


def quota_policy(name: str, namespaces: list[str] | None = None, **spec) -> dict:
    if namespaces is not None:
        spec["namespaceSelector"] = {"matchNames": namespaces}
    return {"apiVersion": "trainpilot.dev/v1alpha1", "kind": "QuotaPolicy", "metadata": {"name": name}, "spec": spec}


def test_quota_max_gpus_counts_every_experiment_the_policy_matches():
    spec = make_spec(trialTemplate={"gpusPerNode": 2}, budget={"parallelTrials": 8})
    status = status_of(spec, trial("a", 0, gpus_per_node=2))
    team = [quota_policy("team", ["ml"], maxGPUs=8)]
    # Other experiments in "ml" hold 6 GPUs: with this one's 2, the policy's 8 are all in use.
    limits = effective_limits(team, "ml", {"ml": 6, "web": 40})
    assert waits(
        check(launch(), spec, status, limits),
        "QuotaPolicy team maxGPUs is 8",
        "8 GPUs in use (6 of them by its other experiments)",
        "needs 2 more",
    )
    assert launch_capacity(spec, status, limits) == 0
    # The same experiment alone in its namespace still fits (GPUs in "web" are not the policy's).
    assert check(launch(), spec, status, effective_limits(team, "ml", {"web": 40})).executed
    room = effective_limits(team, "ml", {"ml": 2})
    assert check(launch(), spec, status, room).executed
    assert launch_capacity(spec, status, room) == 2
    # A scale replaces the trial's own GPUs, and is held to the shared total as well.
    assert check(act("scale", trial="a", gpus_per_node=4), spec, status, room).executed
    assert waits(
        check(act("scale", trial="a", gpus_per_node=4), spec, status, effective_limits(team, "ml", {"ml": 5})),
        "QuotaPolicy team maxGPUs is 8",
        "needs 4 more",
    )


def test_every_matching_policy_keeps_its_own_pool():
    spec = make_spec(trialTemplate={"gpusPerNode": 4})
    status = status_of(spec)
    policies = [quota_policy("cluster", maxGPUs=16), quota_policy("team", ["ml"], maxGPUs=12)]
    # "team" has room (4 used in ml), but the cluster-wide pool is nearly full (14 used anywhere).
    limits = effective_limits(policies, "ml", {"ml": 4, "web": 10})
    assert waits(check(launch(), spec, status, limits), "QuotaPolicy cluster maxGPUs is 16", "14 of them")
    assert check(launch(), spec, status, effective_limits(policies, "ml", {"ml": 4, "web": 8})).executed


def test_a_cpu_trial_needs_no_gpus_from_a_full_pool():
    spec = make_spec()
    limits = effective_limits([quota_policy("team", maxGPUs=4)], "ml", {"ml": 9})
    assert check(launch(), spec, status_of(spec), limits).executed


@pytest.mark.parametrize(
    ("template", "policy_spec", "words"),
    [
        (
            {},
            {"allowedImages": ["ghcr.io/org/trainer:"]},
            ("trialTemplate.image", "QuotaPolicy trust", "allowedImages"),
        ),
        (
            {"image": "ghcr.io/org/trainer:1", "serviceAccountName": "cluster-admin"},
            {"allowedImages": ["ghcr.io/org/"], "allowedServiceAccounts": ["trainer"]},
            ("trialTemplate.serviceAccountName 'cluster-admin'", "QuotaPolicy trust", "allowedServiceAccounts"),
        ),
    ],
)
def test_pods_with_an_image_or_account_a_policy_does_not_allow_are_never_created(template, policy_spec, words):
    spec = make_spec(trialTemplate=template)
    status = status_of(spec, trial("a", 0))
    limits = effective_limits([quota_policy("trust", **policy_spec)], "ml")
    creating = [
        launch(),
        act("scale", trial="a", nodes=2),
        act("mutate", trial="a", mode="restart", hyperparameters={"weight_decay": 0.05}),
    ]
    for decision in creating:
        assert rejected(check(decision, spec, status, limits), *words), decision.action
    # What creates no pod goes on: stopping a trial, changing lr in place, finishing.
    assert check(act("terminate", trial="a"), spec, status, limits).executed
    assert check(
        act("mutate", trial="a", mode="in-place", hyperparameters={"lr": 0.001}), spec, status, limits
    ).executed
    assert check(act("complete", outcome="failed"), spec, status, limits).executed
    allowed = make_spec(trialTemplate={"image": "ghcr.io/org/trainer:1", "serviceAccountName": "trainer"})
    assert check(launch(), allowed, status_of(allowed), limits).executed
