"""Least privilege: every rule the Helm chart grants its ServiceAccount is one the operator uses.

The quickstart end-to-end test (tests/controller/test_operator_e2e.py) runs the operator with
exactly the chart's RBAC in both namespace modes, on the emulated cluster that authorizes every
request as a real API server's RBAC authorizer would; it meets no 403 and, through
`unused_rules`, uses every rule granted but those named here with where they are used.
"""

from __future__ import annotations

from tests.support.chart import OperatorRelease
from tests.support.rbac import Decision

# Granted though a quickstart run does not need it: (verb, API group, resource) -> where it is used.
NOT_USED_BY_THE_QUICKSTART: dict[tuple[str, str, str], str] = {
    ("patch", "", "configmaps"): "an in-place mutate patches the trial's control ConfigMap (test_actions.py)",
    ("get", "batch", "jobs"): "a create that finds the Job there already reads it to check its owner's uid",
    ("get", "", "services"): "the same for a trial's Service (a retried cycle)",
    ("get", "", "persistentvolumeclaims"): "a trial of nodes > 1 reads its checkpoint claim's access modes",
    ("patch", "", "events"): "a warning that repeats (e.g. a ledger write failing) updates its one Event",
    ("watch", "", "pods"): "a restart (scale, restart-mutate) follows its old trial's pods until they are gone",
    ("delete", "", "configmaps"): "the cycle log and prompt archive drop their oldest segments (test_logs.py)",
    ("list", "kueue.x-k8s.io", "workloads"): "list workloads: only experiments with spec.queue (test_kueue.py)",
    ("patch", "trainpilot.dev", "quotapolicies"): "kopf's finalizer on a QuotaPolicy (test_quota_operator.py)",
    ("patch", "trainpilot.dev", "quotapolicies/status"): "a QuotaPolicy's usage accounting (test_quota_operator.py)",
}


def granted(release: OperatorRelease) -> set[tuple[str, str, str]]:
    """(verb, API group, resource) for every rule the release grants its ServiceAccount."""
    rules = [rule for obj in release.rbac_objects() for rule in obj.get("rules", [])]
    expanded = {
        (verb, group, resource)
        for rule in rules
        for verb in rule.get("verbs", [])
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
    }
    assert not [g for g in expanded if "*" in "".join(g)], "the chart grants no wildcards"
    return expanded


def unused_rules(release: OperatorRelease, decisions: list[Decision]) -> list[tuple[str, str, str]]:
    """Rules the release grants that neither `decisions` (the operator's, allowed) used nor the
    table above explains."""
    rules = granted(release)
    used = {d.verb_and_resource for d in decisions if d.allowed}
    return sorted(rule for rule in rules - used if rule not in NOT_USED_BY_THE_QUICKSTART)


def test_the_table_of_rules_a_quickstart_does_not_use_names_only_granted_rules() -> None:
    from tests.support.chart import ALL_NAMESPACES, SINGLE_NAMESPACE

    for release in (SINGLE_NAMESPACE, ALL_NAMESPACES):
        assert sorted(set(NOT_USED_BY_THE_QUICKSTART) - granted(release)) == []  # a rule removed, its entry too
