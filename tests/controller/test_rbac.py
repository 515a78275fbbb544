"""The operator with exactly the RBAC the Helm chart grants, in both of the chart's namespace modes.

Per mode, one quickstart runs end to end as the chart's ServiceAccount, on the emulated cluster
that authorizes every request as a real API server's RBAC authorizer would (and enforces
OwnerReferencesPermissionEnforcement); both tests read that run's recorded decisions.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml

from tests.support.chart import ALL_NAMESPACES, SINGLE_NAMESPACE, OperatorRelease
from tests.support.kube import aeventually, fake_nodes, kube_session, run_kopf_operator
from tests.support.paths import QUICKSTART_PATH
from tests.support.rbac import Decision
from trainpilot.api import contract

pytestmark = pytest.mark.slow

HANDLERS = "trainpilot.controller.handlers"
RELEASES = [pytest.param(SINGLE_NAMESPACE, id="single-namespace"), pytest.param(ALL_NAMESPACES, id="all-namespaces")]

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


@dataclass
class QuickstartRun:
    release: OperatorRelease
    status: dict
    decisions: list[Decision]  # the operator's, oldest first


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


def described(decision: Decision) -> str:
    a = decision.attributes
    where = f"in {a.namespace}" if a.namespace else "cluster-wide"
    return f"{a.verb} {a.qualified_resource}{'/' + a.subresource if a.subresource else ''} {where} ({decision.source})"


async def run_quickstart(kube, release: OperatorRelease) -> dict:
    body = copy.deepcopy(yaml.safe_load(QUICKSTART_PATH.read_text()))
    body["metadata"] = {"name": "quickstart", "namespace": "default"}

    def status() -> dict:
        obj = kube.custom().get_namespaced_custom_object(
            contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, "quickstart"
        )
        return obj.get("status") or {}

    async with run_kopf_operator(HANDLERS, **release.kopf_options()):
        kube.apply(body)
        try:
            await aeventually(lambda: status().get("phase") in ("Succeeded", "Failed"), timeout=240, interval=1)
        except AssertionError:
            pass  # the tests say what went wrong: the 403s first
    return status()


@pytest.fixture(scope="module", params=RELEASES)
def quickstart_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuickstartRun]:
    release: OperatorRelease = request.param
    directory = tmp_path_factory.mktemp("rbac")
    with (
        pytest.MonkeyPatch.context() as monkeypatch,
        kube_session(directory / "kube", monkeypatch, ["crds/"], release) as kube,
        fake_nodes(kube, directory) as make_fake_node,
    ):
        make_fake_node()
        status = asyncio.run(run_quickstart(kube, release))
        yield QuickstartRun(release=release, status=status, decisions=kube.decisions())


def test_a_quickstart_run_meets_no_403(quickstart_run: QuickstartRun) -> None:
    assert quickstart_run.decisions, "the operator's requests were not seen as the chart's ServiceAccount"
    assert [described(d) for d in quickstart_run.decisions if not d.allowed] == []
    assert quickstart_run.status.get("phase") == "Succeeded", quickstart_run.status.get("message")


def test_the_chart_grants_nothing_the_operator_does_not_use(quickstart_run: QuickstartRun) -> None:
    rules = granted(quickstart_run.release)
    used = {d.verb_and_resource for d in quickstart_run.decisions if d.allowed}
    unused = sorted(rule for rule in rules - used if rule not in NOT_USED_BY_THE_QUICKSTART)
    assert unused == [], "granted but never used: remove from helm/trainpilot/templates (or explain below)"
    # The allow-list names only what the chart grants (an entry for a rule removed must go too).
    assert sorted(set(NOT_USED_BY_THE_QUICKSTART) - rules) == []
