"""An experiment in Git, synced twice by Argo CD with the real operator working in between, on the
emulated cluster: Argo CD's diff stays empty with docs/gitops.md's ignoreDifferences, a sync
touches nothing the operator or a reviewer wrote, the operator touches nothing Argo CD compares,
the health check reads what the operator really writes, and no child carries Argo CD's tracking.

No trainer runs: without a fake node no pod starts, so each trial waits, times out after
trialTemplate.pendingTimeoutSeconds and is replaced, and the experiment fails once too many have:
a whole life of decisions, annotations and status writes in about fifteen seconds."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.argocd import argo_diff
from tests.argocd.argo_lua import HealthStatus, health
from tests.support.kube import Kube, aeventually, run_kopf_operator
from tests.support.paths import QUICKSTART_PATH
from trainpilot.api import contract

HANDLERS = "trainpilot.controller.handlers"
NAME, APP = "gitops-demo", "experiments"
TRACKING_ID = f"{APP}:trainpilot.dev/AgentExperiment:default/{NAME}"
# Argo CD's tracking, with `annotation+label` resource tracking: both kinds at once.
ARGO_LABEL, ARGO_ANNOTATION = "app.kubernetes.io/instance", "argocd.argoproj.io/tracking-id"
REVIEWER = "kubernetes-admin"  # the test client's user: the chart's admission policy checks approved-by


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


def manifest() -> dict:
    """The file in Git, as Argo CD applies it (its tracking label and annotation injected)."""
    body = yaml.safe_load(QUICKSTART_PATH.read_text())
    body["metadata"] = {
        "name": NAME,
        "namespace": "default",
        "labels": {"team": "vision", ARGO_LABEL: APP},
        "annotations": {ARGO_ANNOTATION: TRACKING_ID, "description": "lr sweep, kept in Git"},
    }
    body["spec"]["policy"]["intervalSeconds"] = 1
    body["spec"]["trialTemplate"]["pendingTimeoutSeconds"] = 5  # the schema's minimum
    return body


# What the API server (or the Job controller) adds to a Job and its pods.
API_SERVER_LABELS = {"controller-uid", "job-name", "batch.kubernetes.io/controller-uid", "batch.kubernetes.io/job-name"}


def children_of(kube: Kube) -> list:
    """The experiment's Jobs (and their pod templates), Services, ConfigMaps and Events."""
    selector = f"{contract.LABEL_EXPERIMENT}={NAME}"
    core, batch = kube.core_v1(), kube.batch_v1()
    jobs = batch.list_namespaced_job("default", label_selector=selector).items
    return [
        *jobs,
        *[job.spec.template for job in jobs],
        *core.list_namespaced_service("default", label_selector=selector).items,
        *core.list_namespaced_config_map("default", label_selector=selector).items,
        *[event for event in kube.events_posted("default") if event.involved_object.name == NAME],
    ]


def decision_of(live: dict) -> str:
    return json.loads(live["metadata"].get("annotations", {}).get(contract.ANNOTATION_LAST_DECISION, "{}")).get(
        "id", ""
    )


async def test_two_syncs_with_the_operator_in_between_stay_synced(kube: Kube) -> None:
    desired, rules = manifest(), argo_diff.doc_rules()
    custom = kube.custom()

    def live() -> dict:
        found = argo_diff.live_object(kube, desired)
        assert found is not None
        return found

    async with run_kopf_operator(HANDLERS, namespace="default"):
        assert argo_diff.sync(kube, desired, rules) == {}  # the first sync creates it
        created = live()
        first = await aeventually(
            lambda: (o := live()).get("status", {}).get("observedGeneration") == 1 and decision_of(o) and o,
            timeout=30,
        )
        assert health(first).status == "Progressing"
        children_at_first_cycle = children_of(kube)
        assert argo_diff.legacy_diff(desired, first, rules) == []

        # A reviewer's sign-off, as `trainpilot approve` writes it (for a decision that is not held:
        # the operator records that; what matters here is that nobody's sync removes it).
        signed_off = {contract.ANNOTATION_APPROVE: f"{NAME}-d99999", contract.ANNOTATION_APPROVED_BY: REVIEWER}
        custom.patch_namespaced_custom_object(
            contract.GROUP,
            contract.VERSION,
            "default",
            contract.EXPERIMENT_PLURAL,
            NAME,
            {"metadata": {"annotations": signed_off}},
        )
        before_second = live()
        assert argo_diff.legacy_diff(desired, before_second, rules) == []

        # The second sync, of the same file, sends kubectl's own bookkeeping and, as kubectl does,
        # whole lists whose items the API server defaulted (searchSpace's log: false), with the
        # user's own values: nothing the operator, kopf or the reviewer wrote.
        patch = argo_diff.sync(kube, desired, rules)
        assert set(patch) <= {"metadata", "spec"}, patch
        assert list(patch["metadata"]) == ["annotations"] and list(patch["metadata"]["annotations"]) == [
            argo_diff.LAST_APPLIED
        ]
        assert all(value == desired["spec"][key] for key, value in patch.get("spec", {}).items()), patch
        after_second = live()
        assert after_second["metadata"]["generation"] == 1 and after_second["spec"] == created["spec"]
        for key, value in signed_off.items():
            assert after_second["metadata"]["annotations"][key] == value
        assert "trainpilot.dev/daemons" in after_second["metadata"]["finalizers"]
        seen_at_second_sync = decision_of(after_second)

        final = await aeventually(
            lambda: (o := live()).get("status", {}).get("phase") == "Failed" and o, timeout=60, interval=0.5
        )

    # The operator went on deciding after the second sync, and Argo CD still sees no drift.
    assert decision_of(final) != seen_at_second_sync
    assert argo_diff.legacy_diff(desired, final, rules) == []
    # The entries are what keeps it so: the second sync copied the live values of the ignored
    # fields into last-applied-configuration, and Git has none of them: without the entries, each
    # reads as drift (which the next sync would delete).
    drift = argo_diff.legacy_diff(desired, final, [])
    for path in ("/metadata/finalizers", "/metadata/annotations/trainpilot.dev/last-decision"):
        assert path in drift, drift
    # ... and it would try: a sync without them (Git as it is; the operator has stopped) deletes
    # them all, the reviewer's sign-off too, which the chart's admission policy refuses to anyone
    # but the reviewer: the sync fails.
    with pytest.raises(argo_diff.ApplyRefused) as refused:
        argo_diff.kubectl_apply(kube, desired)
    attempted = refused.value.patch["metadata"]
    assert attempted["finalizers"] is None and attempted["annotations"][contract.ANNOTATION_LAST_DECISION] is None
    assert attempted["annotations"][contract.ANNOTATION_APPROVE] is None
    assert refused.value.status == 422 and contract.ANNOTATION_APPROVED_BY in refused.value.message
    assert live()["metadata"]["finalizers"] == final["metadata"]["finalizers"]

    # What Argo CD compares is untouched: the spec as the API server stored it (defaults and all),
    # the labels, and every annotation the entries do not ignore.
    assert final["metadata"]["generation"] == created["metadata"]["generation"] == 1
    assert final["spec"] == created["spec"]
    assert final["metadata"]["labels"] == desired["metadata"]["labels"]
    normalized = argo_diff.normalize(final, rules)
    annotations = dict(normalized["metadata"]["annotations"])
    annotations.pop(argo_diff.LAST_APPLIED)
    assert annotations == desired["metadata"]["annotations"]
    assert normalized["metadata"].get("finalizers", []) == []

    # The health check on what the operator really wrote.
    status = final["status"]
    verdict = health(final)
    assert verdict.status == "Degraded"
    assert verdict.message.startswith(f"Failed (trials {status['trialsSummary']}): {status['message']}"), verdict

    # No child carries Argo CD's tracking: the Application never adopts, compares or prunes them.
    # (Stopped trials' Jobs and Services are gone by now: the first cycle's are checked too.)
    seen = [*children_at_first_cycle, *children_of(kube)]
    kinds = {type(child).__name__ for child in seen}
    assert {"V1Job", "V1PodTemplateSpec", "V1Service", "V1ConfigMap", "CoreV1Event"} <= kinds, kinds
    for child in seen:
        labels = child.metadata.labels or {}
        annotations = child.metadata.annotations or {}
        where = f"{type(child).__name__} {child.metadata.name}"
        ours = ("trainpilot.dev/", "kueue.x-k8s.io/")  # Kueue's only with spec.queue (not here)
        assert all(key.startswith(ours) or key in API_SERVER_LABELS for key in labels), (where, labels)
        assert not any("argoproj.io" in key or key == ARGO_LABEL for key in [*labels, *annotations]), where
        assert "team" not in labels and "description" not in annotations, where  # nothing copied from the experiment

    # Pruned while no operator runs: the finalizer holds it, and the health check says so.
    custom.delete_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, NAME
    )
    deleting = live()
    assert deleting["metadata"]["deletionTimestamp"]
    assert health(deleting) == HealthStatus(
        "Progressing",
        "Pending deletion: the operator stops the experiment's agent, then removes its finalizer "
        "trainpilot.dev/daemons",
    )
