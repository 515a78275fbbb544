"""The fake node runs batch/v1 Jobs as local processes, with Kubernetes' semantics."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from tests.support.fake_node import FakeNode
from tests.support.kube import NODE_TOKEN, Kube, aeventually, eventually

INDEX = "batch.kubernetes.io/job-completion-index"


def indexed_job(
    name: str,
    script: str,
    *,
    nodes: int = 1,
    env: list[dict[str, Any]] | None = None,
    volumes: list[dict[str, Any]] | None = None,
    mounts: list[dict[str, Any]] | None = None,
    grace: int | None = None,
    subdomain: str | None = None,
    backoff_limit: int = 0,
) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "trainer",
                "image": "trainpilot/trainer:test",
                "command": ["python", "-c", textwrap.dedent(script)],
                "env": env or [],
                "volumeMounts": mounts or [],
            }
        ],
        "volumes": volumes or [],
    }
    if grace is not None:
        pod_spec["terminationGracePeriodSeconds"] = grace
    if subdomain:
        pod_spec["subdomain"] = subdomain
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"trainpilot.dev/experiment": "exp", "trainpilot.dev/trial": name}},
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {
                    "labels": {"trainpilot.dev/trial": name},
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9400"},
                },
                "spec": pod_spec,
            },
        },
    }


def job_condition(kube: Kube, name: str, kind: str) -> dict[str, Any] | None:
    job = kube.batch_v1().read_namespaced_job(name, "default")
    for condition in job.status.conditions or []:
        if condition.type == kind and condition.status == "True":
            return job.to_dict()
    return None


def pods_of(kube: Kube, job: str) -> list[Any]:
    return kube.core_v1().list_namespaced_pod("default", label_selector=f"batch.kubernetes.io/job-name={job}").items


ENV_DUMP = """
    import json, os, sys
    keys = ['JOB_COMPLETION_INDEX', 'POD_IP', 'HOSTNAME', 'RANK0']
    print(json.dumps({k: os.environ.get(k) for k in keys} | {'python': sys.executable, 'cwd': os.getcwd()}))
"""


def test_indexed_job_runs_to_completion(kube: Kube, fake_node: FakeNode) -> None:
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    kube.batch_v1().create_namespaced_job("default", indexed_job("trial-a", ENV_DUMP, nodes=2, env=env))

    job = eventually(
        lambda: job_condition(kube, "trial-a", "Complete"),
        timeout=15,
        message=f"the job completes; logs: {fake_node.logs()}",
    )
    assert job["status"]["succeeded"] == 2
    assert job["status"]["completed_indexes"] == "0-1"
    assert job["status"]["start_time"] is not None and job["status"]["completion_time"] is not None
    assert not job["status"].get("active")

    pods = sorted(pods_of(kube, "trial-a"), key=lambda p: int(p.metadata.labels[INDEX]))
    assert len(pods) == 2
    ips = []
    for index, pod in enumerate(pods):
        assert re.fullmatch(rf"trial-a-{index}-[a-z0-9]{{5}}", pod.metadata.name)
        assert pod.status.phase == "Succeeded"
        assert pod.status.container_statuses[0].state.terminated.exit_code == 0
        assert pod.status.container_statuses[0].state.terminated.reason == "Completed"
        assert pod.spec.hostname == f"trial-a-{index}"
        assert pod.metadata.labels["job-name"] == "trial-a"
        assert pod.metadata.labels["batch.kubernetes.io/job-name"] == "trial-a"
        assert pod.metadata.labels["trainpilot.dev/trial"] == "trial-a"
        assert pod.metadata.annotations[INDEX] == str(index)
        assert pod.metadata.annotations["prometheus.io/scrape"] == "true"
        owner = pod.metadata.owner_references[0]
        assert (owner.kind, owner.name, owner.controller) == ("Job", "trial-a", True)
        ip = ipaddress.ip_address(pod.status.pod_ip)
        assert ip.is_loopback and str(ip) != "127.0.0.1"
        ips.append(str(ip))

        output = json.loads(fake_node.read_log(pod.metadata.name).strip().splitlines()[-1])
        assert output["JOB_COMPLETION_INDEX"] == str(index)
        assert output["POD_IP"] == pod.status.pod_ip
        assert output["HOSTNAME"] == f"trial-a-{index}"
        assert Path(output["python"]).parent == Path(__import__("sys").executable).parent
        assert output["cwd"] == str(fake_node.pod_root(pod.metadata.name) / "root")
        # The log is also served by the API server, like `kubectl logs`.
        assert kube.core_v1().read_namespaced_pod_log(pod.metadata.name, "default").strip().endswith("}")
    assert len(set(ips)) == 2


def test_failing_job_fails_with_the_exit_code(kube: Kube, fake_node: FakeNode) -> None:
    kube.batch_v1().create_namespaced_job("default", indexed_job("trial-b", 'import sys; print("boom"); sys.exit(3)'))
    job = eventually(
        lambda: job_condition(kube, "trial-b", "Failed"), timeout=15, message=f"the job fails; logs: {fake_node.logs()}"
    )
    condition = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "BackoffLimitExceeded"
    assert job["status"]["failed"] == 1
    [pod] = pods_of(kube, "trial-b")
    assert pod.status.phase == "Failed"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    assert "boom" in fake_node.read_log(pod.metadata.name)


CONFIG_WATCHER = """
    import json, os, pathlib, time
    config = pathlib.Path(os.environ['TRIAL_CONFIG'])
    out = pathlib.Path(os.environ['OUT'])
    first = json.loads(config.read_text())
    out.with_suffix('.first').write_text(json.dumps(first))
    deadline = time.time() + 20
    while time.time() < deadline:
        current = json.loads(config.read_text())
        if current != first:
            frozen = json.loads(pathlib.Path(os.environ['FROZEN']).read_text())
            out.write_text(json.dumps({'current': current, 'frozen': frozen}))
            break
        time.sleep(0.05)
"""


def test_configmap_volumes_are_materialised_and_refreshed(kube: Kube, fake_node: FakeNode, tmp_path: Path) -> None:
    core = kube.core_v1()
    core.create_namespaced_config_map(
        "default", {"metadata": {"name": "trial-c-config"}, "data": {"trial.json": json.dumps({"lr": 0.1})}}
    )
    out = tmp_path / "seen.json"
    job = indexed_job(
        "trial-c",
        CONFIG_WATCHER,
        env=[
            {"name": "TRIAL_CONFIG", "value": "/etc/trainpilot/trial.json"},
            {"name": "FROZEN", "value": "/etc/frozen.json"},
            {"name": "OUT", "value": str(out)},
        ],
        volumes=[{"name": "config", "configMap": {"name": "trial-c-config"}}],
        mounts=[
            {"name": "config", "mountPath": "/etc/trainpilot", "readOnly": True},
            {"name": "config", "mountPath": "/etc/frozen.json", "subPath": "trial.json"},
        ],
    )
    kube.batch_v1().create_namespaced_job("default", job)
    eventually(lambda: out.with_suffix(".first").exists(), timeout=15, message=f"started; {fake_node.logs()}")
    assert json.loads(out.with_suffix(".first").read_text()) == {"lr": 0.1}

    core.patch_namespaced_config_map("trial-c-config", "default", {"data": {"trial.json": json.dumps({"lr": 0.01})}})
    eventually(out.exists, timeout=10, message="the running process sees the new ConfigMap content")
    # The directory mount follows the ConfigMap; a subPath mount is frozen at start (as in Kubernetes).
    assert json.loads(out.read_text()) == {"current": {"lr": 0.01}, "frozen": {"lr": 0.1}}
    [pod] = pods_of(kube, "trial-c")
    volume = fake_node.pod_root(pod.metadata.name) / "volumes" / "config"
    assert (volume / "..data").is_symlink() and os.readlink(volume / "trial.json") == "..data/trial.json"
    eventually(lambda: job_condition(kube, "trial-c", "Complete"), timeout=10)


SIGTERM_AWARE = """
    import os, pathlib, signal, sys, time
    def on_term(*_):
        pathlib.Path(os.environ['MARKER']).write_text('SIGTERM')
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    pathlib.Path(os.environ['MARKER'] + '.started').write_text('started')
    while True:
        time.sleep(0.05)
"""


async def test_deleting_a_running_job_terminates_its_processes(kube: Kube, fake_node: FakeNode, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    batch = kube.batch_v1()
    batch.create_namespaced_job(
        "default", indexed_job("trial-d", SIGTERM_AWARE, grace=5, env=[{"name": "MARKER", "value": str(marker)}])
    )
    await aeventually(lambda: Path(f"{marker}.started").exists(), timeout=15, message=f"{fake_node.logs()}")
    [pod] = pods_of(kube, "trial-d")
    await aeventually(
        lambda: kube.core_v1().read_namespaced_pod(pod.metadata.name, "default").status.phase == "Running"
    )
    await aeventually(
        lambda: (lambda s: s.active == 1 and s.ready == 1)(batch.read_namespaced_job("trial-d", "default").status),
        message="the job controller counts the pod as active and ready",
    )

    # Background propagation: the garbage collector deletes the pod; the kubelet sends SIGTERM.
    batch.delete_namespaced_job("trial-d", "default", propagation_policy="Background")
    await aeventually(marker.exists, timeout=10, message="the process got SIGTERM")
    assert marker.read_text() == "SIGTERM"
    await aeventually(lambda: not pods_of(kube, "trial-d"), timeout=10, message="the pod is gone")
    runtime = fake_node.runtime(pod.metadata.name)
    assert runtime is not None and runtime.process is not None and runtime.process.returncode == 0
    assert "SIGTERM" in fake_node.read_log(pod.metadata.name)


RANK_SCRIPT = """
    import os
    print('RANK0', os.environ['MASTER_ADDR'], os.environ['MASTER_URL'], os.environ['BIND'], os.environ['CONFIG'])
"""


def test_pod_dns_names_resolve_to_pod_ips(kube: Kube, fake_node: FakeNode) -> None:
    kube.core_v1().create_namespaced_service(
        "default",
        {
            "metadata": {"name": "trial-e"},
            "spec": {"clusterIP": "None", "selector": {"trainpilot.dev/trial": "trial-e"}},
        },
    )
    env = [
        {"name": "MASTER_ADDR", "value": "trial-e-0.trial-e"},
        {"name": "MASTER_URL", "value": "tcp://trial-e-0.trial-e.default.svc.cluster.local:29500"},
        {"name": "BIND", "value": "0.0.0.0"},
        {"name": "CONFIG", "value": "config.json"},
    ]
    kube.batch_v1().create_namespaced_job(
        "default", indexed_job("trial-e", RANK_SCRIPT, nodes=2, env=env, subdomain="trial-e")
    )
    eventually(lambda: job_condition(kube, "trial-e", "Complete"), timeout=15, message=f"{fake_node.logs()}")
    pods = {int(p.metadata.labels[INDEX]): p for p in pods_of(kube, "trial-e")}
    rank0_ip = pods[0].status.pod_ip
    for pod in pods.values():
        line = next(text for text in fake_node.read_log(pod.metadata.name).splitlines() if text.startswith("RANK0"))
        _, addr, url, bind, config = line.split()
        assert addr == rank0_ip
        assert url == f"tcp://{rank0_ip}:29500"
        assert bind == pod.status.pod_ip  # 0.0.0.0 -> the pod's own address (no network namespaces)
        assert config == "config.json"  # not a DNS name: untouched


def test_max_pods_limits_concurrency(kube: Kube, make_fake_node: Callable[..., FakeNode], tmp_path: Path) -> None:
    node = make_fake_node(max_pods=1)
    shared = tmp_path / "shared"
    shared.mkdir()
    script = """
        import os, pathlib, time
        d = pathlib.Path(os.environ['DIR'])
        me = d / os.environ['JOB_COMPLETION_INDEX']
        me.write_text('x')
        time.sleep(0.3)
        others = [p.name for p in d.iterdir() if p != me and not p.name.endswith('.done')]
        (d / (me.name + '.done')).write_text(','.join(others))
        me.unlink()
    """
    kube.batch_v1().create_namespaced_job(
        "default", indexed_job("trial-f", script, nodes=2, env=[{"name": "DIR", "value": str(shared)}])
    )
    eventually(lambda: job_condition(kube, "trial-f", "Complete"), timeout=20, message=f"{node.logs()}")
    assert (shared / "0.done").read_text() == "" and (shared / "1.done").read_text() == ""


def test_stop_kills_the_processes(kube: Kube, tmp_path: Path) -> None:
    node = FakeNode(kube.url, workdir=tmp_path / "node", headers={"Authorization": f"Bearer {NODE_TOKEN}"}).start_sync()
    marker = tmp_path / "marker"
    try:
        kube.batch_v1().create_namespaced_job(
            "default", indexed_job("trial-g", SIGTERM_AWARE, env=[{"name": "MARKER", "value": str(marker)}])
        )
        eventually(lambda: Path(f"{marker}.started").exists(), timeout=15, message=f"{node.logs()}")
        [pod] = pods_of(kube, "trial-g")
        runtime = node.runtime(pod.metadata.name)
        assert runtime is not None and runtime.process is not None
        pid = runtime.process.pid
    finally:
        node.stop_sync()
    with pytest.raises(ProcessLookupError):
        __import__("os").kill(pid, 0)


def test_termination_messages_node_object_and_unschedulable_pods(
    kube: Kube, make_fake_node: Callable[..., FakeNode]
) -> None:
    node = make_fake_node(extended_resources={"nvidia.com/gpu": 1}, labels={"pool": "cpu"})
    core = kube.core_v1()
    registered = core.read_node("fake-node")
    assert registered.status.allocatable["nvidia.com/gpu"] == "1"
    assert [c.status for c in registered.status.conditions if c.type == "Ready"] == ["True"]

    # The termination message: whatever the process wrote to its terminationMessagePath.
    script = 'import json, os; open(os.environ["RESULT"], "w").write(json.dumps({"val_loss": 1.5}))'
    job = indexed_job("trial-h", script, env=[{"name": "RESULT", "value": "/dev/termination-log"}])
    job["spec"]["template"]["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    kube.batch_v1().create_namespaced_job("default", job)
    eventually(lambda: job_condition(kube, "trial-h", "Complete"), timeout=15, message=f"{node.logs()}")
    [pod] = pods_of(kube, "trial-h")
    assert json.loads(pod.status.container_statuses[0].state.terminated.message) == {"val_loss": 1.5}

    # Pods that do not fit stay Pending and say why, as with a real scheduler.
    too_big = indexed_job("trial-i", "pass")
    too_big["spec"]["template"]["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "2"}}
    elsewhere = indexed_job("trial-j", "pass")
    elsewhere["spec"]["template"]["spec"]["nodeSelector"] = {"pool": "gpu"}
    kube.batch_v1().create_namespaced_job("default", too_big)
    kube.batch_v1().create_namespaced_job("default", elsewhere)

    def unschedulable(job_name: str) -> str:
        [pod] = pods_of(kube, job_name)
        assert pod.status.phase == "Pending" and not pod.spec.node_name
        [condition] = [c for c in pod.status.conditions or [] if c.type == "PodScheduled"]
        assert condition.status == "False" and condition.reason == "Unschedulable"
        return condition.message

    assert "Insufficient nvidia.com/gpu" in eventually(lambda: unschedulable("trial-i"), timeout=10)
    assert "node affinity/selector" in eventually(lambda: unschedulable("trial-j"), timeout=10)


# A pod that, on its first run, waits to be stopped and takes 1 s to stop (checkpointing, say);
# on its second run records when it started and succeeds.
RUN_TWICE = """
    import os, pathlib, signal, sys, time
    marks = pathlib.Path(os.environ['MARKS'])
    marks.mkdir(exist_ok=True)
    if (marks / 'first-start').exists():
        (marks / 'second-start').write_text(repr(time.time()))
        sys.exit(0)
    (marks / 'first-start').write_text(repr(time.time()))
    def stop(*_):
        time.sleep(1)
        (marks / 'first-exit').write_text(repr(time.time()))
        sys.exit(4)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(60)
"""
IGNORE_DISRUPTIONS = {
    "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
}


def run_twice_job(name: str, marks: Path, policy: dict[str, Any] | None) -> dict[str, Any]:
    job = indexed_job(name, RUN_TWICE, env=[{"name": "MARKS", "value": str(marks)}])
    if policy is not None:
        job["spec"]["podFailurePolicy"] = policy
    return job


def started(marks: Path, pod_count: int, kube: Kube, job: str) -> Any:
    pods = pods_of(kube, job)
    return (marks / "first-start").exists() and len(pods) == pod_count and pods[0].status.phase == "Running" and pods


@pytest.mark.parametrize("disrupt", ["evict", "preempt"])
async def test_a_disrupted_pod_is_replaced_under_a_pod_failure_policy(
    kube: Kube, fake_node: FakeNode, tmp_path: Path, disrupt: str
) -> None:
    marks = tmp_path / "marks"
    kube.batch_v1().create_namespaced_job("default", run_twice_job("trial-k", marks, IGNORE_DISRUPTIONS))
    [first] = await aeventually(lambda: started(marks, 1, kube, "trial-k"), timeout=15, message=f"{fake_node.logs()}")

    await getattr(fake_node, disrupt)(first.metadata.name)

    job = await aeventually(
        lambda: job_condition(kube, "trial-k", "Complete"), timeout=20, message=f"{fake_node.logs()}"
    )
    # Ignored: not counted as failed, however low backoffLimit is (0 here), and replaced.
    assert job["status"]["succeeded"] == 1 and not job["status"].get("failed")
    # The replacement started only once the disrupted pod had stopped (podReplacementPolicy Failed).
    assert float((marks / "second-start").read_text()) >= float((marks / "first-exit").read_text())
    [replacement] = [p for p in pods_of(kube, "trial-k") if p.metadata.name != first.metadata.name]
    assert replacement.metadata.annotations[INDEX] == "0" and replacement.status.phase == "Succeeded"
    # The disrupted pod went only after the job controller had counted it (its finalizer).
    assert first.metadata.finalizers == ["batch.kubernetes.io/job-tracking"]
    await aeventually(lambda: len(pods_of(kube, "trial-k")) == 1, timeout=10)


def pod_history(kube: Kube, name: str, since: str) -> list[Any]:
    """Every state the pod went through after resourceVersion `since`, until it was deleted."""
    states = []
    stream = kubernetes.watch.Watch().stream(
        kube.core_v1().list_namespaced_pod,
        "default",
        field_selector=f"metadata.name={name}",
        resource_version=since,
        timeout_seconds=20,
    )
    for event in stream:
        states.append(event["object"])
        if event["type"] == "DELETED":
            break
    return states


def test_the_disrupted_pod_keeps_its_condition_and_fails_the_job_without_a_policy(
    kube: Kube, fake_node: FakeNode, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    kube.batch_v1().create_namespaced_job("default", run_twice_job("trial-l", marks, None))
    [pod] = eventually(lambda: started(marks, 1, kube, "trial-l"), timeout=15, message=f"{fake_node.logs()}")

    fake_node.evict_sync(pod.metadata.name)

    history = pod_history(kube, pod.metadata.name, pod.metadata.resource_version)
    # The kubelet's own status writes (Running, then Failed) keep the eviction API's condition.
    last = history[-1]
    [condition] = [c for c in last.status.conditions if c.type == "DisruptionTarget"]
    assert (condition.status, condition.reason) == ("True", "EvictionByEvictionAPI")
    assert last.status.phase == "Failed" and last.status.container_statuses[0].state.terminated.exit_code == 4
    assert all(
        any(c.type == "DisruptionTarget" for c in state.status.conditions)
        for state in history
        if state.metadata.deletion_timestamp
    )
    job = eventually(lambda: job_condition(kube, "trial-l", "Failed"), timeout=15)
    assert next(c for c in job["status"]["conditions"] if c["type"] == "Failed")["reason"] == "BackoffLimitExceeded"
    assert not (marks / "second-start").exists()


def test_a_fail_job_rule_fails_the_job_on_its_exit_code(kube: Kube, fake_node: FakeNode) -> None:
    job = indexed_job("trial-m", "import sys; sys.exit(42)", backoff_limit=6)
    job["spec"]["podFailurePolicy"] = {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [42]}},
        ]
    }
    kube.batch_v1().create_namespaced_job("default", job)
    failed = eventually(lambda: job_condition(kube, "trial-m", "Failed"), timeout=15, message=f"{fake_node.logs()}")
    condition = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    [pod] = pods_of(kube, "trial-m")  # no retry, although backoffLimit allows 6
    assert condition["reason"] == "PodFailurePolicy"
    assert condition["message"] == (
        f"Container trainer for pod default/{pod.metadata.name} failed with exit code 42 "
        "matching FailJob rule at index 1"
    )


def waiting_state(kube: Kube, job: str) -> Any:
    [pod] = pods_of(kube, job)
    waiting = pod.status.container_statuses and pod.status.container_statuses[0].state.waiting
    return pod.status.phase == "Pending" and waiting and (waiting.reason, waiting.message)


def test_an_image_the_node_cannot_pull_leaves_the_pod_pending_until_it_can(
    kube: Kube, make_fake_node: Callable[..., FakeNode]
) -> None:
    node = make_fake_node(image_pull_errors={"registry.invalid/trainer:v9": "not found"}, kubelet_backoff=0.3)
    job = indexed_job("trial-n", "print('pulled')")
    job["spec"]["template"]["spec"]["containers"][0]["image"] = "registry.invalid/trainer:v9"
    kube.batch_v1().create_namespaced_job("default", job)

    def back_off() -> Any:
        state = waiting_state(kube, "trial-n")
        return state if state and state[0] == "ImagePullBackOff" else None

    assert eventually(back_off, timeout=10) == (
        "ImagePullBackOff",
        'Back-off pulling image "registry.invalid/trainer:v9"',
    )
    assert (
        "failed to pull image 'registry.invalid/trainer:v9': not found"
        in node.logs()[f"default/{pods_of(kube, 'trial-n')[0].metadata.name}"]
    )
    node.image_pull_errors.clear()  # pushed at last: the next retry pulls it
    eventually(lambda: job_condition(kube, "trial-n", "Complete"), timeout=15, message=f"{node.logs()}")


def test_env_from_a_missing_config_map_waits_in_create_container_config_error(
    kube: Kube, make_fake_node: Callable[..., FakeNode]
) -> None:
    node = make_fake_node(kubelet_backoff=0.3)
    env = [{"name": "LR", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "lr"}}}]
    kube.batch_v1().create_namespaced_job(
        "default", indexed_job("trial-o", "import os; print(os.environ['LR'])", env=env)
    )
    assert eventually(lambda: waiting_state(kube, "trial-o"), timeout=10) == (
        "CreateContainerConfigError",
        'configmap "settings" not found',
    )
    kube.core_v1().create_namespaced_config_map("default", {"metadata": {"name": "settings"}, "data": {"other": "1"}})
    eventually(
        lambda: (
            waiting_state(kube, "trial-o")
            == ("CreateContainerConfigError", "couldn't find key lr in ConfigMap default/settings")
        ),
        timeout=10,
    )
    kube.core_v1().patch_namespaced_config_map("settings", "default", {"data": {"lr": "0.5"}})
    eventually(lambda: job_condition(kube, "trial-o", "Complete"), timeout=15, message=f"{node.logs()}")
    [pod] = pods_of(kube, "trial-o")
    assert node.read_log(pod.metadata.name).strip().endswith("0.5")


def test_cpu_and_memory_requests_must_fit_the_node(kube: Kube, make_fake_node: Callable[..., FakeNode]) -> None:
    make_fake_node(capacity={"cpu": "2", "memory": "4Gi"})
    fits = indexed_job("trial-p", "import time; time.sleep(30)")
    fits["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": {"cpu": "1500m", "memory": "1Gi"}}
    too_much = indexed_job("trial-q", "pass")
    too_much["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": {"cpu": "1", "memory": "1Gi"}}
    kube.batch_v1().create_namespaced_job("default", fits)
    eventually(lambda: pods_of(kube, "trial-p")[0].spec.node_name, timeout=10)
    kube.batch_v1().create_namespaced_job("default", too_much)

    def unschedulable() -> Any:
        [pod] = pods_of(kube, "trial-q")
        [condition] = [c for c in pod.status.conditions or [] if c.type == "PodScheduled"]
        return not pod.spec.node_name and (condition.status, condition.reason, condition.message)

    assert eventually(unschedulable, timeout=10) == (
        "False",
        "Unschedulable",
        "0/1 nodes are available: 1 Insufficient cpu.",
    )
    kube.batch_v1().delete_namespaced_job("trial-p", "default", propagation_policy="Background")
    eventually(lambda: job_condition(kube, "trial-q", "Complete"), timeout=40)
