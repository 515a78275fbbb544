"""The emulated API server behaves like a real one where kopf and the kubernetes client care."""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
import time
import urllib.request

import kopf
import kubernetes
import pytest
from kubernetes.client import ApiException

from tests.support import rbac
from tests.support.kube import (
    ADMIN_TOKEN,
    OPERATOR_TOKEN,
    REPO_ROOT,
    Kube,
    aeventually,
    eventually,
    kopf_operator,
    run_kopf_operator,
)

GROUP, VERSION = "trainpilot.dev", "v1alpha1"


def _aexp(name: str, **spec: object) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AgentExperiment",
        "metadata": {"name": name},
        "spec": spec or {"objective": "val_loss"},
    }


def _job(name: str, **extra: object) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, **extra},
        "spec": {
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "x", "command": ["true"]}]}
            }
        },
    }


def test_crud_sets_uid_timestamps_and_resource_versions(kube: Kube) -> None:
    core = kube.core_v1()
    created = core.create_namespaced_config_map("default", {"metadata": {"name": "cm"}, "data": {"a": "1"}})
    meta = created.metadata
    assert meta.uid and len(meta.uid) == 36
    assert meta.creation_timestamp is not None
    assert meta.namespace == "default"
    rv1 = int(meta.resource_version)

    patched = core.patch_namespaced_config_map("cm", "default", {"data": {"b": "2"}})
    assert patched.data == {"a": "1", "b": "2"}
    assert patched.metadata.uid == meta.uid
    assert int(patched.metadata.resource_version) > rv1

    # A no-op write keeps the resourceVersion, like a real API server.
    same = core.patch_namespaced_config_map("cm", "default", {"data": {"b": "2"}})
    assert same.metadata.resource_version == patched.metadata.resource_version

    assert core.read_namespaced_config_map("cm", "default").data == {"a": "1", "b": "2"}
    listing = core.list_namespaced_config_map("default")
    assert [i.metadata.name for i in listing.items] == ["cm"]
    assert int(listing.metadata.resource_version) >= int(patched.metadata.resource_version)

    core.delete_namespaced_config_map("cm", "default")
    with pytest.raises(ApiException) as err:
        core.read_namespaced_config_map("cm", "default")
    assert err.value.status == 404


def test_generation_counts_spec_changes_only(kube: Kube) -> None:
    custom = kube.custom()
    obj = custom.create_namespaced_custom_object(GROUP, VERSION, "default", "agentexperiments", _aexp("e1"))
    assert obj["metadata"]["generation"] == 1

    obj = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", "agentexperiments", "e1", {"spec": {"objective": "train_loss"}}
    )
    assert obj["metadata"]["generation"] == 2

    rv = obj["metadata"]["resourceVersion"]
    obj = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", "agentexperiments", "e1", {"metadata": {"labels": {"team": "ml"}}}
    )
    assert obj["metadata"]["generation"] == 2
    assert int(obj["metadata"]["resourceVersion"]) > int(rv)

    obj = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", "agentexperiments", "e1", {"status": {"phase": "Running"}}
    )
    assert obj["metadata"]["generation"] == 2
    assert obj["status"] == {"phase": "Running"}


def test_status_subresource_semantics(kube: Kube) -> None:
    custom = kube.custom()
    body = _aexp("e1")
    body["status"] = {"phase": "Injected"}
    obj = custom.create_namespaced_custom_object(GROUP, VERSION, "default", "agentexperiments", body)
    assert "status" not in obj  # create ignores .status

    # The main resource ignores .status ...
    obj = custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        "default",
        "agentexperiments",
        "e1",
        {"spec": {"objective": "x"}, "status": {"phase": "Ignored"}},
    )
    assert obj["spec"] == {"objective": "x"}
    assert "status" not in obj

    # ... and /status ignores everything but .status.
    obj = custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        "default",
        "agentexperiments",
        "e1",
        {"spec": {"objective": "ignored"}, "status": {"phase": "Running"}},
    )
    assert obj["spec"] == {"objective": "x"}
    assert obj["status"] == {"phase": "Running"}

    # PUT on /status, too.
    obj["status"] = {"phase": "Done"}
    obj["spec"] = {"objective": "ignored-again"}
    obj = custom.replace_namespaced_custom_object_status(GROUP, VERSION, "default", "agentexperiments", "e1", obj)
    assert obj["status"] == {"phase": "Done"} and obj["spec"] == {"objective": "x"}

    # Cluster-scoped QuotaPolicy works without a namespace.
    quota = custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "quotapolicies",
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "QuotaPolicy", "metadata": {"name": "q"}, "spec": {"maxGpus": 4}},
    )
    assert "namespace" not in quota["metadata"]


def test_errors_are_status_objects(kube: Kube) -> None:
    core = kube.core_v1()
    core.create_namespaced_config_map("default", {"metadata": {"name": "cm"}})
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map("default", {"metadata": {"name": "cm"}})
    assert err.value.status == 409
    body = json.loads(err.value.body)
    assert body["kind"] == "Status" and body["reason"] == "AlreadyExists"
    assert body["details"] == {"name": "cm", "group": "", "kind": "configmaps"}

    with pytest.raises(ApiException) as err:
        core.read_namespaced_config_map("missing", "default")
    assert err.value.status == 404 and json.loads(err.value.body)["reason"] == "NotFound"

    with pytest.raises(ApiException) as err:  # namespaced objects need their namespace
        core.create_namespaced_config_map("nowhere", {"metadata": {"name": "cm"}})
    assert err.value.status == 404

    with pytest.raises(ApiException) as err:  # stale resourceVersion on update
        core.replace_namespaced_config_map("cm", "default", {"metadata": {"name": "cm", "resourceVersion": "1"}})
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "Conflict"

    with pytest.raises(ApiException) as err:  # names and label values are validated
        core.create_namespaced_config_map("default", {"metadata": {"name": "Bad_Name"}})
    assert err.value.status == 422
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map("default", {"metadata": {"name": "ok", "labels": {"x": "y" * 64}}})
    assert err.value.status == 422

    # Strategic merge patch is refused on custom resources (the client uses merge patch there).
    status, body = kube.request(
        "PATCH",
        f"/apis/{GROUP}/{VERSION}/namespaces/default/agentexperiments/x",
        {},
        content_type="application/strategic-merge-patch+json",
    )
    assert status == 404  # (no such object yet; the resource exists)
    kube.custom().create_namespaced_custom_object(GROUP, VERSION, "default", "agentexperiments", _aexp("x"))
    status, body = kube.request(
        "PATCH",
        f"/apis/{GROUP}/{VERSION}/namespaces/default/agentexperiments/x",
        {},
        content_type="application/strategic-merge-patch+json",
    )
    assert status == 415


def test_patch_flavours(kube: Kube) -> None:
    path = "/api/v1/namespaces/default/pods"
    status, pod = kube.request(
        "POST",
        path,
        {
            "metadata": {"name": "p", "labels": {"a": "1"}},
            "spec": {
                "containers": [
                    {"name": "main", "image": "img:1", "env": [{"name": "A", "value": "1"}]},
                    {"name": "side", "image": "side:1"},
                ]
            },
        },
    )
    assert status == 201
    rv = pod["metadata"]["resourceVersion"]

    # JSON patch with a failing "test" is 422 (kopf relies on it for optimistic concurrency).
    status, _ = kube.request(
        "PATCH",
        f"{path}/p",
        [
            {"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
            {"op": "add", "path": "/metadata/labels/b", "value": "2"},
        ],
        content_type="application/json-patch+json",
    )
    assert status == 422
    status, pod = kube.request(
        "PATCH",
        f"{path}/p",
        [
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/metadata/labels/b", "value": "2"},
        ],
        content_type="application/json-patch+json",
    )
    assert status == 200 and pod["metadata"]["labels"] == {"a": "1", "b": "2"}

    # Strategic merge: containers are merged by name (a merge patch would replace the list).
    status, pod = kube.request(
        "PATCH",
        f"{path}/p",
        {"spec": {"containers": [{"name": "side", "image": "side:2"}]}},
        content_type="application/strategic-merge-patch+json",
    )
    assert status == 200, pod
    assert [(c["name"], c["image"]) for c in pod["spec"]["containers"]] == [("main", "img:1"), ("side", "side:2")]

    # Merge patch: null removes a key.
    status, pod = kube.request(
        "PATCH", f"{path}/p", {"metadata": {"labels": {"a": None}}}, content_type="application/merge-patch+json"
    )
    assert pod["metadata"]["labels"] == {"b": "2"}

    # Most of a pod's spec is immutable.
    status, body = kube.request(
        "PATCH", f"{path}/p", {"spec": {"restartPolicy": "Never"}}, content_type="application/merge-patch+json"
    )
    assert status == 422


def test_generate_name_and_namespaces_listing(kube: Kube) -> None:
    core = kube.core_v1()
    created = core.create_namespaced_config_map("default", {"metadata": {"generateName": "cm-"}})
    assert created.metadata.name.startswith("cm-") and len(created.metadata.name) == 8

    core.create_namespace({"metadata": {"name": "other"}})
    names = {ns.metadata.name for ns in core.list_namespace().items}
    assert names == {"default", "other"}
    assert core.read_namespace("other").status.phase == "Active"
    status, listing = kube.request("GET", "/api/v1/namespaces")
    assert status == 200 and listing["kind"] == "NamespaceList"

    # Cluster-wide listing of a namespaced resource spans namespaces.
    core.create_namespaced_config_map("other", {"metadata": {"name": "x"}})
    all_cms = core.list_config_map_for_all_namespaces()
    assert {(i.metadata.namespace, i.metadata.name) for i in all_cms.items} == {
        ("default", created.metadata.name),
        ("other", "x"),
    }


def test_label_and_field_selectors_on_lists(kube: Kube) -> None:
    core = kube.core_v1()
    for name, labels in [
        ("a", {"app": "x", "tier": "web"}),
        ("b", {"app": "x", "tier": "db"}),
        ("c", {"app": "y"}),
        ("d", {}),
    ]:
        core.create_namespaced_config_map("default", {"metadata": {"name": name, "labels": labels}})

    def names(**kwargs: str) -> list[str]:
        return sorted(i.metadata.name for i in core.list_namespaced_config_map("default", **kwargs).items)

    assert names(label_selector="app=x") == ["a", "b"]
    assert names(label_selector="app==x,tier=db") == ["b"]
    assert names(label_selector="app!=x") == ["c", "d"]
    assert names(label_selector="tier") == ["a", "b"]
    assert names(label_selector="!tier") == ["c", "d"]
    assert names(label_selector="tier in (web,db)") == ["a", "b"]
    assert names(label_selector="app in (y), tier notin (web)") == ["c"]
    assert names(label_selector="app notin (x)") == ["c", "d"]
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(field_selector="metadata.name!=c", label_selector="app") == ["a", "b"]
    with pytest.raises(ApiException) as err:
        names(label_selector="app in x")
    assert err.value.status == 400

    # Pagination with limit/continue (kopf lists in chunks when told to).
    first = core.list_namespaced_config_map("default", limit=3)
    assert len(first.items) == 3 and first.metadata._continue
    rest = core.list_namespaced_config_map("default", limit=3, _continue=first.metadata._continue)
    assert len(rest.items) == 1 and not rest.metadata._continue


def test_watches_honour_selectors_and_resource_versions(kube: Kube) -> None:
    core = kube.core_v1()
    core.create_namespaced_config_map("default", {"metadata": {"name": "before", "labels": {"app": "x"}}})
    rv = core.list_namespaced_config_map("default").metadata.resource_version

    core.create_namespaced_config_map("default", {"metadata": {"name": "match", "labels": {"app": "x"}}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "other", "labels": {"app": "y"}}})
    core.patch_namespaced_config_map("match", "default", {"data": {"k": "v"}})
    core.patch_namespaced_config_map("other", "default", {"metadata": {"labels": {"app": "x"}}})  # starts matching
    core.patch_namespaced_config_map("before", "default", {"metadata": {"labels": {"app": "z"}}})  # stops matching
    core.delete_namespaced_config_map("match", "default")

    watch = kubernetes.watch.Watch()
    events = [
        (e["type"], e["object"].metadata.name, e["object"].metadata.resource_version)
        for e in watch.stream(
            core.list_namespaced_config_map, "default", label_selector="app=x", resource_version=rv, timeout_seconds=1
        )
    ]
    assert [(t, n) for t, n, _ in events] == [
        ("ADDED", "match"),
        ("MODIFIED", "match"),
        ("ADDED", "other"),
        ("DELETED", "before"),
        ("DELETED", "match"),
    ]
    versions = [int(v) for _, _, v in events]
    assert versions == sorted(versions) and versions[0] > int(rv)

    # Without a resourceVersion, a watch starts with the current state as ADDED events.
    events = [
        (e["type"], e["object"].metadata.name)
        for e in kubernetes.watch.Watch().stream(
            core.list_namespaced_config_map, "default", label_selector="app=x", timeout_seconds=1
        )
    ]
    assert events == [("ADDED", "other")]

    # Live events arrive while the watch is open.
    seen: list[tuple[str, str]] = []

    def consume() -> None:
        for e in kubernetes.watch.Watch().stream(
            kube.core_v1().list_namespaced_config_map, "default", label_selector="live", timeout_seconds=2
        ):
            seen.append((e["type"], e["object"].metadata.name))

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.3)
    core.create_namespaced_config_map("default", {"metadata": {"name": "live1", "labels": {"live": "1"}}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "dead", "labels": {"nope": "1"}}})
    thread.join(5)
    assert seen == [("ADDED", "live1")]

    # A resourceVersion older than the event log gives 410 Gone inside the stream.
    kube.emulator.event_log_size = 3
    for i in range(5):
        core.create_namespaced_config_map("default", {"metadata": {"name": f"n{i}"}})
    status, text = kube.request(
        "GET",
        "/api/v1/namespaces/default/configmaps",  # one line: one event
        params={"watch": "true", "resourceVersion": rv, "timeoutSeconds": "1"},
    )
    assert status == 200 and text["type"] == "ERROR" and text["object"]["code"] == 410


def test_finalizers_block_deletion(kube: Kube) -> None:
    core = kube.core_v1()
    core.create_namespaced_config_map("default", {"metadata": {"name": "cm", "finalizers": ["example.test/keep"]}})
    core.delete_namespaced_config_map("cm", "default")
    obj = core.read_namespaced_config_map("cm", "default")
    assert obj.metadata.deletion_timestamp is not None
    assert obj.metadata.finalizers == ["example.test/keep"]

    # Finalizers cannot be added while deleting; removing the last one completes the deletion.
    core.patch_namespaced_config_map("cm", "default", {"metadata": {"finalizers": ["example.test/keep", "new"]}})
    assert core.read_namespaced_config_map("cm", "default").metadata.finalizers == ["example.test/keep"]
    core.patch_namespaced_config_map("cm", "default", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as err:
        core.read_namespaced_config_map("cm", "default")
    assert err.value.status == 404


def test_cascade_deletion_through_owner_references(kube: Kube) -> None:
    custom, core, batch = kube.custom(), kube.core_v1(), kube.batch_v1()
    owner = custom.create_namespaced_custom_object(GROUP, VERSION, "default", "agentexperiments", _aexp("owner"))
    ref = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AgentExperiment",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    job = batch.create_namespaced_job("default", _job("trial-1", ownerReferences=[ref]))
    assert job.spec.backoff_limit == 6 and job.spec.completion_mode == "NonIndexed"  # API-server defaults
    assert job.spec.selector.match_labels == {"batch.kubernetes.io/controller-uid": job.metadata.uid}
    job_ref = {"apiVersion": "batch/v1", "kind": "Job", "name": "trial-1", "uid": job.metadata.uid, "controller": True}
    core.create_namespaced_pod(
        "default",
        {
            "metadata": {"name": "trial-1-pod", "ownerReferences": [job_ref]},
            "spec": {"containers": [{"name": "main", "image": "x"}]},
        },
    )
    core.create_namespaced_service(
        "default", {"metadata": {"name": "trial-1", "ownerReferences": [ref]}, "spec": {"clusterIP": "None"}}
    )
    core.create_namespaced_config_map("default", {"metadata": {"name": "unrelated"}})

    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", "agentexperiments", "owner")

    def gone() -> bool:
        return (
            not batch.list_namespaced_job("default").items
            and not core.list_namespaced_pod("default").items
            and not core.list_namespaced_service("default").items
        )

    eventually(gone, timeout=5, message="dependents are garbage-collected (owner -> job -> pod)")
    assert [c.metadata.name for c in core.list_namespaced_config_map("default").items] == ["unrelated"]


def test_jobs_orphan_their_pods_by_default(kube: Kube) -> None:
    core, batch = kube.core_v1(), kube.batch_v1()
    job = batch.create_namespaced_job("default", _job("j"))
    job_ref = {"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": job.metadata.uid, "controller": True}
    core.create_namespaced_pod(
        "default",
        {
            "metadata": {"name": "j-pod", "ownerReferences": [job_ref]},
            "spec": {"containers": [{"name": "main", "image": "x"}]},
        },
    )
    # No propagationPolicy: a real API server orphans a batch/v1 Job's pods and warns about it.
    request = urllib.request.Request(
        kube.url + "/apis/batch/v1/namespaces/default/jobs/j",
        method="DELETE",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    with urllib.request.urlopen(request) as response:
        assert response.status == 200
        assert "child pods are preserved by default" in response.headers["Warning"]
    time.sleep(0.2)
    pod = core.read_namespaced_pod("j-pod", "default")
    assert not pod.metadata.owner_references  # orphaned: alive, without the reference

    # With propagationPolicy=Background, the garbage collector takes the pods.
    job = batch.create_namespaced_job("default", _job("k"))
    job_ref = {"apiVersion": "batch/v1", "kind": "Job", "name": "k", "uid": job.metadata.uid, "controller": True}
    core.create_namespaced_pod(
        "default",
        {
            "metadata": {"name": "k-pod", "ownerReferences": [job_ref]},
            "spec": {"containers": [{"name": "main", "image": "x"}]},
        },
    )
    batch.delete_namespaced_job("k", "default", propagation_policy="Background")
    eventually(lambda: [p.metadata.name for p in core.list_namespaced_pod("default").items] == ["j-pod"], timeout=5)


def test_pods_bound_to_a_node_are_deleted_gracefully(kube: Kube) -> None:
    core = kube.core_v1()
    core.create_namespaced_pod(
        "default",
        {
            "metadata": {"name": "p"},
            "spec": {"terminationGracePeriodSeconds": 7, "containers": [{"name": "main", "image": "x"}]},
        },
    )
    status, _ = kube.request(
        "POST",
        "/api/v1/namespaces/default/pods/p/binding",
        {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"}, "target": {"kind": "Node", "name": "n1"}},
    )
    assert status == 201
    assert core.read_namespaced_pod("p", "default").spec.node_name == "n1"
    core.delete_namespaced_pod("p", "default")
    pod = core.read_namespaced_pod("p", "default")  # still there: the kubelet has to stop it first
    assert pod.metadata.deletion_timestamp is not None and pod.metadata.deletion_grace_period_seconds == 7
    core.delete_namespaced_pod("p", "default", grace_period_seconds=0)  # the kubelet's confirmation
    with pytest.raises(ApiException):
        core.read_namespaced_pod("p", "default")


def test_discovery_lists_the_resources_with_verbs(kube: Kube) -> None:
    status, groups = kube.request("GET", "/apis")
    names = {g["name"] for g in groups["groups"]}
    assert {"batch", "coordination.k8s.io", "apiextensions.k8s.io", "events.k8s.io", GROUP} <= names
    status, core = kube.request("GET", "/api/v1")
    resources = {r["name"]: r for r in core["resources"]}
    assert core["groupVersion"] == "v1"
    for name in ("namespaces", "pods", "services", "configmaps", "events", "secrets", "pods/status"):
        assert name in resources
    assert {"get", "list", "watch", "create", "patch", "update", "delete"} <= set(resources["pods"]["verbs"])
    status, ours = kube.request("GET", f"/apis/{GROUP}/{VERSION}")
    resources = {r["name"]: r for r in ours["resources"]}
    assert resources["agentexperiments"]["namespaced"] is True
    assert resources["agentexperiments"]["shortNames"] == ["aexp"]
    assert resources["agentexperiments"]["kind"] == "AgentExperiment"
    assert "agentexperiments/status" in resources
    assert resources["quotapolicies"]["namespaced"] is False
    for path in (
        "/apis/batch/v1",
        "/apis/coordination.k8s.io/v1",
        "/apis/events.k8s.io/v1",
        "/apis/apiextensions.k8s.io/v1",
    ):
        assert kube.request("GET", path)[0] == 200


WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.test"},
    "spec": {
        "group": "example.test",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "size": {"type": "integer", "default": 1},
                                    "color": {"type": "string", "enum": ["red", "blue"]},
                                },
                            },
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    }
                },
            }
        ],
    },
}


def test_crds_created_through_the_api_are_served_with_their_schema(kube: Kube) -> None:
    kube.apply(WIDGET_CRD)
    custom = kube.custom()
    obj = custom.create_namespaced_custom_object(
        "example.test",
        "v1",
        "default",
        "widgets",
        {
            "apiVersion": "example.test/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": {"color": "red", "unknown": "pruned"},
            "extra": "pruned too",
        },
    )
    assert obj["spec"] == {"color": "red", "size": 1}  # pruned and defaulted, silently
    assert "extra" not in obj
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(
            "example.test",
            "v1",
            "default",
            "widgets",
            {
                "apiVersion": "example.test/v1",
                "kind": "Widget",
                "metadata": {"name": "bad"},
                "spec": {"color": "green", "size": "big"},
            },
        )
    assert err.value.status == 422
    status, discovery = kube.request("GET", "/apis/example.test/v1")
    assert {r["name"] for r in discovery["resources"]} == {"widgets", "widgets/status"}


def test_faults_can_be_injected_with_kmock_reactions(kube: Kube) -> None:
    core = kube.core_v1()
    kube.call(lambda: kube.emulator["create configmaps"][:1] << 503)  # only the first request
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map("default", {"metadata": {"name": "cm"}})
    assert err.value.status == 503
    assert core.create_namespaced_config_map("default", {"metadata": {"name": "cm"}}).metadata.uid
    assert len(list(kube.emulator["create configmaps"])) == 2  # kmock's request log, filtered


def test_the_repository_crds_and_quickstart_are_accepted(kube: Kube) -> None:
    crds, example = REPO_ROOT / "crds", REPO_ROOT / "examples" / "quickstart.yaml"
    if not list(crds.glob("*.yaml")) or not example.exists():
        pytest.skip("no CRDs or example in the repository yet")
    kube.apply_crds(crds)  # what the kube_crd_paths fixture does when overridden to ["crds/"]
    status, discovery = kube.request("GET", f"/apis/{GROUP}/{VERSION}")
    resources = {r["name"]: r for r in discovery["resources"]}
    assert resources["agentexperiments"]["namespaced"] and "agentexperiments/status" in resources
    assert not resources["quotapolicies"]["namespaced"]
    [created] = kube.apply(example)  # validated, pruned and defaulted by the CRD's schema
    assert created["metadata"]["generation"] == 1


def test_core_and_events_k8s_io_events_are_one_store(kube: Kube) -> None:
    core = kube.core_v1()
    events_v1 = kubernetes.client.EventsV1Api(kube.api_client())
    core.create_namespaced_event(
        "default",
        {
            "metadata": {"name": "exp.decision-1"},
            "reason": "TrialLaunched",
            "message": "launched t1",
            "type": "Normal",
            # NB: without eventTime, the client's EventsV1Event model refuses to load it (as with a real server).
            "eventTime": "2026-01-01T00:00:00.000000Z",
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AgentExperiment", "name": "exp"},
        },
    )
    seen = events_v1.read_namespaced_event("exp.decision-1", "default")
    assert (seen.reason, seen.note, seen.regarding.name) == ("TrialLaunched", "launched t1", "exp")

    events_v1.create_namespaced_event(
        "default",
        {
            "metadata": {"name": "exp.decision-2"},
            "reason": "TrialTerminated",
            "note": "diverged",
            "type": "Normal",
            "eventTime": "2026-01-01T00:00:00.000000Z",
            "action": "Terminate",
            "reportingController": "trainpilot",
            "reportingInstance": "trainpilot-0",
            "regarding": {"kind": "AgentExperiment", "name": "exp"},
        },
    )
    events_v1.patch_namespaced_event("exp.decision-2", "default", {"note": "diverged (NaN loss)"})
    by_reason = {e.reason: e for e in core.list_namespaced_event("default").items}
    assert by_reason["TrialTerminated"].message == "diverged (NaN loss)"
    assert by_reason["TrialTerminated"].involved_object.name == "exp"
    assert {e.reason for e in events_v1.list_namespaced_event("default").items} == {"TrialLaunched", "TrialTerminated"}


def test_namespace_deletion_takes_its_contents(kube: Kube) -> None:
    core = kube.core_v1()
    core.create_namespace({"metadata": {"name": "tmp"}})
    core.create_namespaced_config_map("tmp", {"metadata": {"name": "cm"}})
    core.delete_namespace("tmp")
    eventually(lambda: "tmp" not in {n.metadata.name for n in core.list_namespace().items}, timeout=5)
    assert not core.list_config_map_for_all_namespaces(label_selector="").items


# ---------------------------------------------------------------------------------------------
# Authentication and RBAC (the operator is the chart's ServiceAccount; see tests/support/rbac.py)
# ---------------------------------------------------------------------------------------------

OPERATOR = "system:serviceaccount:default:tp-trainpilot"  # the chart's defaults, installed in `default`


def as_operator(kube: Kube, method: str, path: str, body: object = None, **options: object) -> tuple[int, dict]:
    return kube.request(method, path, body, token=OPERATOR_TOKEN, **options)  # type: ignore[arg-type]


def test_what_the_chart_does_not_grant_is_403_with_the_api_servers_message(kube: Kube) -> None:
    kube.ensure_namespace("other")
    job = _job("j")
    cases = [
        # (method, path, body, the message a real API server sends)
        ("POST", "/apis/batch/v1/namespaces/other/jobs", job,
         f'jobs.batch is forbidden: User "{OPERATOR}" cannot create resource "jobs" in API group "batch" '
         'in the namespace "other"'),
        ("GET", "/api/v1/namespaces/other/configmaps/x", None,
         f'configmaps "x" is forbidden: User "{OPERATOR}" cannot get resource "configmaps" in API group "" '
         'in the namespace "other"'),
        ("GET", "/api/v1/namespaces/default/secrets?watch=true", None,
         f'secrets is forbidden: User "{OPERATOR}" cannot watch resource "secrets" in API group "" '
         'in the namespace "default"'),
        ("GET", "/api/v1/watch/namespaces/default/services", None,
         f'services is forbidden: User "{OPERATOR}" cannot watch resource "services" in API group "" '
         'in the namespace "default"'),
        ("DELETE", "/api/v1/namespaces/default/configmaps", None,
         f'configmaps is forbidden: User "{OPERATOR}" cannot deletecollection resource "configmaps" '
         'in API group "" in the namespace "default"'),
        ("GET", "/api/v1/namespaces/default/pods/p/log", None,
         f'pods "p" is forbidden: User "{OPERATOR}" cannot get resource "pods/log" in API group "" '
         'in the namespace "default"'),
        ("PUT", f"/apis/{GROUP}/{VERSION}/namespaces/default/agentexperiments/e/status", _aexp("e"),
         f'agentexperiments.{GROUP} "e" is forbidden: User "{OPERATOR}" cannot update resource '
         f'"agentexperiments/status" in API group "{GROUP}" in the namespace "default"'),
        ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles", None,
         f'clusterroles.rbac.authorization.k8s.io is forbidden: User "{OPERATOR}" cannot list resource '
         '"clusterroles" in API group "rbac.authorization.k8s.io" at the cluster scope'),
        ("GET", "/api/v1/namespaces/default", None,
         f'namespaces "default" is forbidden: User "{OPERATOR}" cannot get resource "namespaces" '
         'in API group "" in the namespace "default"'),
    ]  # fmt: skip
    for method, path, body, message in cases:
        path, _, query = path.partition("?")
        status, reply = as_operator(kube, method, path, body, params=dict([query.split("=")]) if query else None)
        assert (status, reply["reason"], reply["message"]) == (403, "Forbidden", message), (method, path)
        assert reply["kind"] == "Status" and reply["code"] == 403
    status, reply = as_operator(kube, "POST", "/apis/batch/v1/namespaces/other/jobs", job)
    assert reply["details"] == {"group": "batch", "kind": "jobs"}

    # What the Role grants in its namespace passes; the same in another namespace does not.
    assert as_operator(kube, "GET", "/api/v1/namespaces/default/configmaps")[0] == 200
    assert as_operator(kube, "GET", "/api/v1/namespaces/other/configmaps")[0] == 403
    # A list for one name (fieldSelector metadata.name=x) is about that object, as for the real authorizer.
    decision = kube.decisions()[-1]
    assert (decision.attributes.verb, decision.attributes.namespace, decision.allowed) == ("list", "other", False)
    as_operator(kube, "GET", "/api/v1/namespaces/default/pods", params={"fieldSelector": "metadata.name=p"})
    assert kube.decisions()[-1].attributes.name == "p"
    # Discovery is for every authenticated user; nothing is for anonymous ones; bad tokens are 401.
    assert as_operator(kube, "GET", "/apis")[0] == 200
    status, reply = kube.request("GET", "/api/v1/namespaces/default/pods", token=None)
    assert reply["message"] == (
        'pods is forbidden: User "system:anonymous" cannot list resource "pods" in API group "" '
        'in the namespace "default"'
    )
    status, reply = kube.request("GET", "/api", token=None)
    assert (status, reply["message"]) == (403, 'forbidden: User "system:anonymous" cannot get path "/api"')
    assert kube.request("GET", "/api", token="not-a-token")[0] == 401
    # Every decision is recorded, and admins are never refused.
    assert len(kube.forbidden()) >= len(cases) + 2
    assert all(d.allowed for d in kube.emulator.authorizations if d.attributes.user.name == "kubernetes-admin")


def test_rbac_rules_match_as_in_kubernetes() -> None:
    user = rbac.service_account_user("ns", "sa")
    subject = {"kind": "ServiceAccount", "name": "sa", "namespace": "ns"}

    def role(kind: str, name: str, rules: list, namespace: str | None = None) -> dict:
        meta = {"name": name, **({"namespace": namespace} if namespace else {})}
        return {"kind": kind, "metadata": meta, "rules": rules}

    def binding(kind: str, name: str, role_kind: str, role_name: str, namespace: str | None = None) -> dict:
        meta = {"name": name, **({"namespace": namespace} if namespace else {})}
        return {
            "kind": kind,
            "metadata": meta,
            "roleRef": {"kind": role_kind, "name": role_name},
            "subjects": [subject],
        }

    policy = rbac.Policy.from_objects(
        [
            role("ClusterRole", "readers", [{"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["get"]}]),
            binding("ClusterRoleBinding", "readers", "ClusterRole", "readers"),
            role("ClusterRole", "cm", [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["*"],
                                        "resourceNames": ["a"]}]),
            binding("RoleBinding", "cm", "ClusterRole", "cm", namespace="ns"),  # a ClusterRole, bound in one namespace
            role("Role", "jobs", [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create"]}], "ns"),
            binding("RoleBinding", "jobs", "Role", "jobs", namespace="ns"),
            binding("RoleBinding", "dangling", "Role", "missing", namespace="ns"),
        ]
    )  # fmt: skip

    def allowed(verb: str, group: str, resource: str, namespace: str = "ns", name: str = "", sub: str = "") -> bool:
        attributes = rbac.Attributes(
            user=user, verb=verb, resource_request=True, api_group=group, resource=resource,
            subresource=sub, namespace=namespace, name=name,
        )  # fmt: skip
        return policy.authorize(attributes)[0]

    assert allowed("get", "apps", "deployments", sub="status", namespace="")  # */status, any group, cluster-wide
    assert not allowed("get", "apps", "deployments")  # ...but not the resource itself
    assert allowed("delete", "", "configmaps", name="a") and not allowed("delete", "", "configmaps", name="b")
    assert not allowed("list", "", "configmaps")  # resourceNames never match a list of everything
    assert not allowed("get", "", "configmaps", namespace="other", name="a")  # a RoleBinding stays in its namespace
    assert allowed("create", "batch", "jobs") and not allowed("create", "batch", "jobs", namespace="other")
    attributes = rbac.Attributes(user=user, verb="create", resource_request=True, resource="pods", namespace="ns")
    assert policy.authorize(attributes) == (False, 'RBAC: role.rbac.authorization.k8s.io "missing" not found')
    assert rbac.forbidden_message(attributes, policy.authorize(attributes)[1]).endswith(
        'in the namespace "ns": RBAC: role.rbac.authorization.k8s.io "missing" not found'
    )


def test_block_owner_deletion_needs_update_on_the_owners_finalizers(kube: Kube) -> None:
    """OwnerReferencesPermissionEnforcement, as a user with a narrow Role meets it."""
    kube.apply(
        [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "alice", "namespace": "default"},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "update"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "alice", "namespace": "default"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "alice"},
                "subjects": [{"kind": "User", "name": "alice"}],
            },
        ]
    )
    alice = rbac.User("alice", (rbac.AUTHENTICATED,))
    kube.call(lambda: kube.emulator.tokens.__setitem__("alice-token", alice))
    owner = kube.custom().create_namespaced_custom_object(GROUP, VERSION, "default", "agentexperiments", _aexp("e"))
    ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AgentExperiment", "name": "e", "uid": owner["metadata"]["uid"]}
    path = "/api/v1/namespaces/default/configmaps"

    def config_map(name: str, *refs: dict) -> dict:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "ownerReferences": list(refs)}}

    status, reply = kube.request(
        "POST", path, config_map("cm", {**ref, "blockOwnerDeletion": True}), token="alice-token"
    )
    assert (status, reply["reason"], reply["message"]) == (
        403,
        "Forbidden",
        'configmaps "cm" is forbidden: cannot set blockOwnerDeletion if an ownerReference refers to a resource '
        "you can't set finalizers on: , <nil>",
    )
    check = kube.decisions(alice)[-1]
    assert (check.source, check.attributes.verb, check.attributes.combined_resource, check.attributes.name) == (
        "OwnerReferencesPermissionEnforcement",
        "update",
        "agentexperiments/finalizers",
        "e",
    )
    # Without blockOwnerDeletion the reference needs nothing more.
    status, created = kube.request("POST", path, config_map("cm", ref), token="alice-token")
    assert status == 201
    # Changing the references of an existing object needs `delete` on it, which alice lacks.
    changed = {**created, "metadata": {**created["metadata"], "ownerReferences": []}}
    status, reply = kube.request("PUT", f"{path}/cm", changed, token="alice-token")
    assert (status, reply["message"]) == (
        403,
        """configmaps "cm" is forbidden: cannot set an ownerRef on a resource you can't delete: , <nil>""",
    )
    # Granted update on agentexperiments/finalizers (as the chart grants its ServiceAccount), it passes.
    kube.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "alice", "namespace": "default"},
            "rules": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "update"]},
                {"apiGroups": [GROUP], "resources": ["agentexperiments/finalizers"], "verbs": ["update"]},
            ],
        }
    )
    status, _ = kube.request("POST", path, config_map("cm2", {**ref, "blockOwnerDeletion": True}), token="alice-token")
    assert status == 201
    # The chart's ServiceAccount may, too; and admins always may.
    status, _ = as_operator(kube, "POST", path, config_map("cm3", {**ref, "blockOwnerDeletion": True}))
    assert status == 201
    assert kube.request("POST", path, config_map("cm4", {**ref, "blockOwnerDeletion": True}))[0] == 201


# ---------------------------------------------------------------------------------------------
# Validation as the API server does it
# ---------------------------------------------------------------------------------------------


def _pod(name: str, resources: dict) -> dict:
    container = {"name": "main", "image": "x", "resources": resources}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"containers": [container]}}


def test_quantities_that_do_not_parse_are_refused_while_decoding(kube: Kube) -> None:
    """A real API server cannot even decode these into a Pod: 400 BadRequest, before validation."""
    for value, problem in [
        ("4x", "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"),
        ("1.5.3", "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"),
        ("4kk", "unable to parse quantity's suffix"),
    ]:
        status, reply = kube.request("POST", "/api/v1/namespaces/default/pods", _pod("p", {"limits": {"cpu": value}}))
        assert (status, reply["reason"]) == (400, "BadRequest"), value
        assert reply["message"] == f'Pod in version "v1" cannot be handled as a Pod: {problem}'
    job = _job("j")
    job["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": {"memory": "1.5.3Gi"}}
    status, reply = kube.request("POST", "/apis/batch/v1/namespaces/default/jobs", job)
    assert (status, reply["message"].split(":")[0]) == (400, 'Job in version "v1" cannot be handled as a Job')
    for index, good in enumerate(("500m", "1.5Gi", "1e3", 2, 0.5, "+1", " 1", "1E")):
        pod = _pod(f"ok-{index}", {"limits": {"cpu": good}})
        assert kube.request("POST", "/api/v1/namespaces/default/pods", pod)[0] == 201, good


def test_resource_requirements_are_validated_with_their_field(kube: Kube) -> None:
    cases = [
        ({"requests": {"cpu": "2"}, "limits": {"cpu": "1"}},
         "spec.containers[0].resources.requests", 'Invalid value: "2": must be less than or equal to cpu limit of 1'),
        ({"requests": {"memory": "-1"}},
         "spec.containers[0].resources.requests[memory]", 'Invalid value: "-1": must be greater than or equal to 0'),
        ({"limits": {"nvidia.com/gpu": "0.5"}},
         "spec.containers[0].resources.limits[nvidia.com/gpu]", 'Invalid value: "0.5": must be an integer'),
        ({"requests": {"nvidia.com/gpu": 1}},
         "spec.containers[0].resources.limits", "Required value: Limit must be set for non overcommitable resources"),
        ({"limits": {"gpu": 1}},
         "spec.containers[0].resources.limits[gpu]",
         'Invalid value: "gpu": must be a standard resource for containers'),
    ]  # fmt: skip
    for resources, field, message in cases:
        status, reply = kube.request("POST", "/api/v1/namespaces/default/pods", _pod("p", resources))
        assert (status, reply["reason"]) == (422, "Invalid"), resources
        assert reply["message"] == f'Pod "p" is invalid: {field}: {message}'
        assert reply["details"]["causes"] == [
            {"reason": reply["details"]["causes"][0]["reason"], "message": message, "field": field}
        ]
    job = _job("j")
    job["spec"]["template"]["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "-2"}}
    status, reply = kube.request("POST", "/apis/batch/v1/namespaces/default/jobs", job)
    assert status == 422 and reply["message"].startswith('Job.batch "j" is invalid: ')
    assert reply["details"]["causes"][0]["field"] == "spec.template.spec.containers[0].resources.limits[cpu]"


def _experiment(name: str = "exp", **spec: object) -> dict:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AgentExperiment", "metadata": {"name": name}}
    body["spec"] = {"searchSpace": [{"name": "lr", "min": 0.001, "max": 0.1}], **spec}
    return body


def test_the_crds_bounds_and_cel_rules_are_enforced_on_create_and_update(kube: Kube) -> None:
    kube.apply_crds(REPO_ROOT / "crds")
    path = f"/apis/{GROUP}/{VERSION}/namespaces/default/agentexperiments"
    # A bound of the schema (minimum): 422 with the field.
    status, reply = kube.request("POST", path, _experiment(budget={"maxTrials": 0, "parallelTrials": 1}))
    assert (status, reply["reason"]) == (422, "Invalid")
    assert reply["message"].startswith(
        f'AgentExperiment.{GROUP} "exp" is invalid: spec.budget.maxTrials: Invalid value: 0'
    )
    assert [c["field"] for c in reply["details"]["causes"]] == ["spec.budget.maxTrials"]
    # A CEL rule, with its message and fieldPath.
    status, reply = kube.request("POST", path, _experiment(budget={"maxTrials": 2, "parallelTrials": 3}))
    assert status == 422
    (cause,) = reply["details"]["causes"]
    assert cause["field"] == "spec.budget.parallelTrials"
    assert "budget.parallelTrials must not exceed budget.maxTrials" in cause["message"]
    # The root's rule on the name (its message, no field).
    status, reply = kube.request("POST", path, _experiment(name="1st-try"))
    assert status == 422 and "metadata.name must be" in reply["message"]
    # A valid object passes, and an update that breaks a rule is refused as well.
    assert kube.request("POST", path, _experiment())[0] == 201
    status, reply = kube.request(
        "PATCH",
        f"{path}/exp",
        {"spec": {"searchSpace": [{"name": "lr", "min": 0.5, "max": 0.1}]}},
        content_type="application/merge-patch+json",
    )
    assert status == 422 and "min must be below max" in reply["message"]
    # fieldValidation=Strict (kubectl's default) refuses unknown fields instead of pruning them.
    status, reply = kube.request(
        "POST", path, _experiment(name="strict", budget={"maxTrails": 3}), params={"fieldValidation": "Strict"}
    )
    assert (status, reply["message"]) == (
        400,
        'AgentExperiment in version "v1alpha1" cannot be handled as a AgentExperiment: '
        'strict decoding error: unknown field "spec.budget.maxTrails"',
    )


GADGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "gadgets.example.test"},
    "spec": {
        "group": "example.test",
        "scope": "Namespaced",
        "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "maxProperties": 3,
                                "properties": {
                                    "size": {
                                        "type": "integer",
                                        "x-kubernetes-validations": [
                                            {"rule": "self >= oldSelf", "message": "size may only grow"}
                                        ],
                                    },
                                    "code": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
                                    "parts": {
                                        "type": "array",
                                        "maxItems": 2,
                                        "x-kubernetes-list-type": "map",
                                        "x-kubernetes-list-map-keys": ["name"],
                                        "items": {
                                            "type": "object",
                                            "required": ["name"],
                                            "properties": {
                                                "name": {"type": "string"},
                                                "weight": {
                                                    "type": "number",
                                                    "exclusiveMinimum": True,
                                                    "minimum": 0,
                                                    "x-kubernetes-validations": [
                                                        {"rule": "self == oldSelf", "message": "weight is fixed"}
                                                    ],
                                                },
                                            },
                                        },
                                    },
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {"count": {"type": "integer", "maximum": 10}},
                            },
                        },
                    }
                },
            }
        ],
    },
}


def test_schema_bounds_and_transition_rules_of_any_crd(kube: Kube) -> None:
    kube.apply(GADGET_CRD)
    path = "/apis/example.test/v1/namespaces/default/gadgets"

    def gadget(name: str, **spec: object) -> dict:
        return {"apiVersion": "example.test/v1", "kind": "Gadget", "metadata": {"name": name}, "spec": spec}

    def causes(reply: dict) -> list[str]:
        return [f"{c['field']}: {c['message']}" for c in reply["details"]["causes"]]

    status, reply = kube.request("POST", path, gadget("g", code="ABCDEF", parts=[{"name": "a", "weight": 0}]))
    assert status == 422
    assert causes(reply) == [
        "spec.code: Too long: may not be more than 5 bytes",
        "spec.code: Invalid value: \"ABCDEF\": should match '^[a-z]+$'",
        "spec.parts[0].weight: Invalid value: 0: must be greater than 0",
    ]
    status, reply = kube.request("POST", path, gadget("g", parts=[{"name": "a"}, {"name": "b"}, {"name": "c"}]))
    assert causes(reply) == ["spec.parts: Too many: 3: must have at most 2 items"]
    # A create has no old value: transition rules do not run.
    assert kube.request("POST", path, gadget("g", size=5, parts=[{"name": "a", "weight": 1.0}]))[0] == 201
    patch = "application/merge-patch+json"
    status, reply = kube.request("PATCH", f"{path}/g", {"spec": {"size": 4}}, content_type=patch)
    assert (status, causes(reply)) == (422, ["spec.size: Invalid value: size may only grow"])
    assert kube.request("PATCH", f"{path}/g", {"spec": {"size": 6}}, content_type=patch)[0] == 200
    # List items of a map list correlate by key with their old selves.
    status, reply = kube.request(
        "PATCH", f"{path}/g", {"spec": {"parts": [{"name": "a", "weight": 2.0}]}}, content_type=patch
    )
    assert causes(reply) == ["spec.parts[0].weight: Invalid value: weight is fixed"]
    renamed = {"spec": {"parts": [{"name": "b", "weight": 2.0}]}}  # a new item: no old self
    assert kube.request("PATCH", f"{path}/g", renamed, content_type=patch)[0] == 200
    # The status subresource is validated too; maxProperties on the spec.
    status, reply = kube.request("PATCH", f"{path}/g/status", {"status": {"count": 11}}, content_type=patch)
    assert causes(reply) == ["status.count: Invalid value: 11: must be less than or equal to 10"]
    status, reply = kube.request("PATCH", f"{path}/g", {"spec": {"code": "ab", "extra": 1, "x": 2}}, content_type=patch)
    assert status == 200  # unknown fields are pruned before maxProperties counts (3 known at most)


# ---------------------------------------------------------------------------------------------
# Events expire
# ---------------------------------------------------------------------------------------------


async def test_events_expire_after_the_ttl_unless_written_again(kube: Kube) -> None:
    core = kube.core_v1()
    kube.call(lambda: setattr(kube.emulator, "event_ttl", 1.0))

    def event(name: str) -> dict:
        return {
            "metadata": {"name": name},
            "reason": "TrialLaunched",
            "message": "launched",
            "involvedObject": {"kind": "AgentExperiment", "name": "exp", "namespace": "default"},
        }

    core.create_namespaced_event("default", event("old"))
    core.create_namespaced_event("default", event("renewed"))
    assert {e.metadata.name for e in core.list_namespaced_event("default").items} == {"old", "renewed"}
    await asyncio.sleep(0.6)
    core.patch_namespaced_event("renewed", "default", {"message": "launched again"})  # a write renews the lease
    await asyncio.sleep(0.6)
    with pytest.raises(ApiException) as err:
        core.read_namespaced_event("old", "default")
    assert err.value.status == 404
    assert [e.metadata.name for e in core.list_namespaced_event("default").items] == ["renewed"]
    await aeventually(lambda: core.list_namespaced_event("default").items == [], timeout=3)
    # What expired is still known to the tests (not to clients, as on a real cluster).
    assert sorted(e.metadata.name for e in kube.events_posted("default")) == ["old", "renewed"]
    assert kube.emulator.expired_events[-1]["message"] == "launched again"


# ---------------------------------------------------------------------------------------------
# A throwaway kopf operator, end to end
# ---------------------------------------------------------------------------------------------

REGISTRY = kopf.OperatorRegistry()


@kopf.on.create("example.test", "v1", "widgets", registry=REGISTRY)
def widget_created(
    spec: kopf.Spec, name: str, namespace: str, body: kopf.Body, logger: kopf.Logger, **_: object
) -> dict:
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config"},
        "data": {"size": str(spec.get("size"))},
    }
    kopf.adopt(child, owner=body)
    kubernetes.client.CoreV1Api().create_namespaced_config_map(namespace, child)
    kopf.info(body, reason="WidgetCreated", message=f"created {name}-config")  # a k8s Event (generateName)
    return {"size": spec.get("size")}  # stored as status.widget_created


@kopf.on.update("example.test", "v1", "widgets", field="spec.size", registry=REGISTRY)
def widget_resized(new: object, patch: kopf.Patch, **_: object) -> None:
    patch.status["resized"] = new


@kopf.on.delete("example.test", "v1", "widgets", registry=REGISTRY)
def widget_deleted(name: str, namespace: str, **_: object) -> None:
    kubernetes.client.CoreV1Api().create_namespaced_config_map(namespace, {"metadata": {"name": f"{name}-gone"}})


@pytest.mark.parametrize("initial_streaming", [False, True], ids=["list+watch", "streaming-list"])
async def test_kopf_operator_end_to_end(kube: Kube, initial_streaming: bool) -> None:
    kube.apply(WIDGET_CRD)
    custom, core = kube.custom(), kube.core_v1()

    def configure(settings: kopf.OperatorSettings) -> None:
        settings.watching.initial_streaming = initial_streaming  # sendInitialEvents=true watches

    # The widgets are no part of the chart's RBAC: this operator runs as a cluster admin.
    admin = kube.kubeconfig
    async with run_kopf_operator(
        registry=REGISTRY, namespace="default", configure=configure, kubeconfig=admin
    ) as operator:
        assert operator.running
        custom.create_namespaced_custom_object(
            "example.test",
            "v1",
            "default",
            "widgets",
            {"apiVersion": "example.test/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}},
        )

        def created() -> dict:
            obj = custom.get_namespaced_custom_object("example.test", "v1", "default", "widgets", "w1")
            return obj if obj.get("status", {}).get("widget_created") == {"size": 3} else {}

        obj = await aeventually(created, timeout=15, message="the create handler ran and wrote status")
        assert "kopf.zalando.org/KopfFinalizerMarker" in obj["metadata"]["finalizers"]
        cm = core.read_namespaced_config_map("w1-config", "default")
        assert cm.metadata.owner_references[0].uid == obj["metadata"]["uid"]

        custom.patch_namespaced_custom_object("example.test", "v1", "default", "widgets", "w1", {"spec": {"size": 5}})
        await aeventually(
            lambda: (
                custom.get_namespaced_custom_object("example.test", "v1", "default", "widgets", "w1")
                .get("status", {})
                .get("resized")
                == 5
            ),
            timeout=15,
        )

        custom.delete_namespaced_custom_object("example.test", "v1", "default", "widgets", "w1")
        await aeventually(
            lambda: core.read_namespaced_config_map("w1-gone", "default"), timeout=15, message="the delete handler ran"
        )

        def all_gone() -> bool:
            widgets = custom.list_namespaced_custom_object("example.test", "v1", "default", "widgets")["items"]
            names = {c.metadata.name for c in core.list_namespaced_config_map("default").items}
            return not widgets and "w1-config" not in names

        await aeventually(all_gone, timeout=15, message="finalizer released, child collected")
        # kopf posts events in the background: wait for ours (kopf 1.45 no longer posts its
        # handlers' log lines as events unless settings.posting.loggers is True).
        events = await aeventually(
            lambda: [e for e in core.list_namespaced_event("default").items if e.reason == "WidgetCreated"], timeout=10
        )
    assert events[0].involved_object.name == "w1" and events[0].message == "created w1-config"
    assert events[0].metadata.name.startswith("kopf-event-")


def test_kopf_operator_from_a_file(kube: Kube, tmp_path) -> None:  # type: ignore[no-untyped-def]
    kube.apply(WIDGET_CRD)
    handlers = tmp_path / "handlers.py"
    handlers.write_text(
        textwrap.dedent("""
        import kopf

        @kopf.on.create('example.test', 'v1', 'widgets')
        def created(patch, **_):
            patch.status['seen'] = True
    """)
    )
    custom = kube.custom()
    with kopf_operator(handlers, namespace="default", kubeconfig=kube.kubeconfig):
        custom.create_namespaced_custom_object(
            "example.test",
            "v1",
            "default",
            "widgets",
            {"apiVersion": "example.test/v1", "kind": "Widget", "metadata": {"name": "w2"}, "spec": {}},
        )
        eventually(
            lambda: (
                custom.get_namespaced_custom_object("example.test", "v1", "default", "widgets", "w2")
                .get("status", {})
                .get("seen")
            ),
            timeout=15,
        )
    # The handlers went into a registry of their own, not into kopf's global default one.
    assert not any(h.id == "created" for h in kopf.get_default_registry()._changing.get_all_handlers())
