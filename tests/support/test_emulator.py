"""The emulated API server behaves like a real one where kopf and the kubernetes client care."""

from __future__ import annotations

import json
import textwrap
import threading
import time
import urllib.request

import kopf
import kubernetes
import pytest
from kubernetes.client import ApiException

from tests.support.kube import REPO_ROOT, Kube, aeventually, eventually, kopf_operator, run_kopf_operator

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
    request = urllib.request.Request(kube.url + "/apis/batch/v1/namespaces/default/jobs/j", method="DELETE")
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

    async with run_kopf_operator(registry=REGISTRY, namespace="default", configure=configure) as operator:
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
    with kopf_operator(handlers, namespace="default"):
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
