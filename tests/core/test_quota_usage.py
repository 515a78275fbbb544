"""A QuotaPolicy's accounting: what each namespace spent, kept in the policy's status across
operator restarts and deleted experiments, summed over the rolling period."""

from __future__ import annotations

from datetime import date, timedelta

from trainpilot.api.quota import QuotaPolicy, effective_limits
from trainpilot.core.quota_usage import ExperimentUsage, account

DAY = date(2026, 12, 2)


def policy(**spec) -> QuotaPolicy:
    return QuotaPolicy.model_validate({"metadata": {"name": "team"}, "spec": spec})


def use(namespace: str, name: str, uid: str, hours: float, tokens: int = 0, gpus: int = 0) -> ExperimentUsage:
    return ExperimentUsage(namespace, name, uid, gpus, hours, tokens)


def test_each_accounting_adds_what_was_spent_since_the_last_one_by_namespace():
    team = policy(namespaceSelector={"matchNames": ["ml", "lab"]}, maxGPUHoursPerPeriod=10)
    status = account(team, [use("ml", "a", "u1", 2.0, 100, gpus=4), use("web", "w", "u9", 50.0)], DAY, "t1")
    assert [(u.namespace, u.gpus_now, u.gpu_hours_in_period, u.tokens_today) for u in status.usage] == [
        ("ml", 4, 2.0, 100)
    ]  # "web" is not the policy's
    team.status = status
    # Same totals again (a restarted operator, or nothing new): nothing is counted twice.
    again = account(team, [use("ml", "a", "u1", 2.0, 100, gpus=4)], DAY, "t2")
    assert again.usage[0].gpu_hours_in_period == 2.0 and again.usage[0].tokens_today == 100
    team.status = again
    later = account(team, [use("ml", "a", "u1", 3.5, 250), use("lab", "b", "u2", 1.0)], DAY, "t3")
    assert {u.namespace: u.gpu_hours_in_period for u in later.usage} == {"lab": 1.0, "ml": 3.5}
    assert later.totals is not None and later.totals.gpu_hours_in_period == 4.5


def test_a_deleted_experiment_keeps_its_hours_and_a_new_one_of_its_name_starts_from_zero():
    team = policy(maxGPUHoursPerPeriod=10)
    team.status = account(team, [use("ml", "a", "u1", 6.0)], DAY, "t1")
    gone = account(team, [], DAY, "t2")  # deleted: its GPU-hours were spent all the same
    assert gone.usage[0].gpu_hours_in_period == 6.0 and gone.accounted == []
    team.status = gone
    reborn = account(team, [use("ml", "a", "u2", 1.0)], DAY, "t3")
    assert reborn.usage[0].gpu_hours_in_period == 7.0


def test_the_period_rolls_day_by_day_and_tokens_count_today_only():
    team = policy(maxGPUHoursPerPeriod=10, periodDays=3, llm={"maxTokensPerDay": 1000})
    team.status = account(team, [use("ml", "a", "u1", 4.0, 800)], DAY, "d0")
    team.status = account(team, [use("ml", "a", "u1", 5.0, 900)], DAY + timedelta(days=1), "d1")
    assert team.status.usage[0].gpu_hours_in_period == 5.0 and team.status.usage[0].tokens_today == 100
    # Three days on, the first day's 4 GPU-hours have left the period.
    team.status = account(team, [use("ml", "a", "u1", 5.0, 900)], DAY + timedelta(days=3), "d3")
    assert team.status.usage[0].gpu_hours_in_period == 1.0 and team.status.usage[0].tokens_today == 0
    # The limits an experiment in "ml" gets carry what was spent, naming the policy.
    limits = effective_limits([team], "ml")
    [period] = limits.period_pools
    assert (period.policy, period.max_gpu_hours, period.days, period.used) == ("team", 10, 3, 1.0)
    assert [(p.policy, p.max_tokens, p.used_today) for p in limits.token_pools] == [("team", 1000, 0)]


def test_llm_rules_combine_strictest_first_and_say_which_policy_refused():
    strict = QuotaPolicy.model_validate({"metadata": {"name": "no-llm"}, "spec": {"llm": {"allowed": False}}})
    models = QuotaPolicy.model_validate(
        {"metadata": {"name": "small"}, "spec": {"llm": {"models": ["claude-haiku-5-5", "claude-sonnet-5-5"]}}}
    )
    narrower = QuotaPolicy.model_validate(
        {"metadata": {"name": "haiku"}, "spec": {"llm": {"models": ["claude-haiku-5-5"]}}}
    )
    limits = effective_limits([models, narrower], "ml")
    assert limits.llm_models == ["claude-haiku-5-5"] and limits.llm_refusal("claude-haiku-5-5") is None
    assert "QuotaPolicy haiku, small allows only models ['claude-haiku-5-5']" == limits.llm_refusal("claude-opus-5-5")
    assert effective_limits([strict, models], "ml").llm_refusal("claude-haiku-5-5") == (
        "QuotaPolicy no-llm does not allow LLM use here"
    )
    spent = QuotaPolicy.model_validate(
        {
            "metadata": {"name": "budget"},
            "spec": {"llm": {"maxTokensPerDay": 500}},
            "status": {"usage": [{"namespace": "ml", "tokensToday": 500}]},
        }
    )
    assert effective_limits([spent], "ml").llm_refusal("x") == "QuotaPolicy budget llm.maxTokensPerDay 500 spent today"
    assert effective_limits([spent], "web").llm_refusal("x") is None  # another namespace's own day
