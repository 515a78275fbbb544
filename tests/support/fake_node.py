"""
A test-only "fake node": the job controller, the scheduler and the kubelet of one node,
talking to the (emulated) API server over HTTP like the real ones do. Never a feature.

What it does, following the real components' semantics:

* **job controller** (batch/v1 Jobs): creates the pods of a Job — Indexed (``<job>-<index>-<5
  chars>``, hostname ``<job>-<index>``, subdomain from the template, the
  ``batch.kubernetes.io/job-completion-index`` label and annotation, ``JOB_COMPLETION_INDEX``
  injected into every container from that annotation) or NonIndexed (``<job>-<5 chars>``) — with
  the template's labels and annotations, ``job-name`` / ``batch.kubernetes.io/job-name`` /
  ``controller-uid`` labels and an ownerReference (controller) to the Job; respects
  ``parallelism``, ``completions``, ``suspend`` (no pods while suspended; suspending a running Job
  deletes its pods, their tracking finalizer removed first, so they never count as failed or
  succeeded; resuming turns the Suspended condition False with reason JobResumed and resets
  ``startTime``), ``backoffLimit`` (default 6: the Job fails with
  reason BackoffLimitExceeded once more pods failed than that, and its active pods are deleted),
  ``activeDeadlineSeconds`` (DeadlineExceeded), ``ttlSecondsAfterFinished``; recreates failed
  pods with the controller's exponential back-off (10 s, 20 s, ... by default: see
  ``retry_backoff``); writes ``status``: active, ready, succeeded, failed, terminating,
  startTime, completionTime, completedIndexes, conditions Complete / Failed / Suspended.
  ``podFailurePolicy``: a failed pod is matched against the rules in order (``onExitCodes``
  with In/NotIn and containerName, never exit code 0; ``onPodConditions`` type/status): Ignore
  does not count it (no backoffLimit, no back-off) and replaces it, FailJob fails the Job with
  reason PodFailurePolicy and the controller's message, Count (and FailIndex) counts it.
  ``podReplacementPolicy`` (Failed by default with a podFailurePolicy, else TerminatingOrFailed):
  under Failed a terminating pod keeps its index until it has stopped. Pods carry the
  ``batch.kubernetes.io/job-tracking`` finalizer, so a deleted pod stays (terminating, then
  terminal) until the controller has counted how it ended and removes it; it also releases
  pods whose Job is gone, and marks unscheduled pods that are being deleted Failed, as the
  pod garbage collector does. A pod deleted while active (by anyone but the controller) counts
  as failed at once under TerminatingOrFailed, and once it has stopped under Failed (where the
  podFailurePolicy then decides); one that vanishes anyway while active counts as failed.
* **scheduler**: binds pending pods (``pods/{name}/binding``) to this node when they fit: pod
  count (``max_pods``), ``nodeSelector`` against the node's ``labels``, cpu and memory requests
  (a limit stands for a missing request; init containers as the scheduler counts them) against
  ``capacity`` (16 cpu, 64Gi by default: the processes share the host, so this is a budget,
  not a measurement), and extended resources such as ``nvidia.com/gpu`` against
  ``extended_resources`` (none by default: a GPU pod stays Pending, as on a CPU-only cluster);
  others stay Pending with PodScheduled=False/Unschedulable and the scheduler's message ("0/1
  nodes are available: 1 Insufficient nvidia.com/gpu."). Preemption: ``node.preempt(pod)``
  does to a victim what the scheduler does (DisruptionTarget reason PreemptionByScheduler,
  then a graceful delete); ``node.evict(pod)`` what the eviction API does (reason
  EvictionByEvictionAPI). The node registers its v1 Node object (Ready, capacity, labels).
* **kubelet**: runs the pods bound to this node as local processes (only ``containers[0]``
  and the ``initContainers`` before it; ``command`` + ``args``, or ``image_commands[image]``
  for images with an entrypoint), each in its own process group and working directory under a
  per-pod root; gives each pod its own loopback address 127.A.B.C as ``status.podIP`` (counting
  up from a random start, so that two test sessions on one machine do not collide); writes
  the pod phases Pending → Running → Succeeded/Failed with containerStatuses (running,
  terminated with exitCode and reason Completed/Error; 128+signal when killed), conditions
  PodScheduled/Initialized/ContainersReady/Ready (readiness probes: httpGet, tcpSocket, exec);
  copies the container's termination message (what it wrote to ``terminationMessagePath``,
  or its log tail with FallbackToLogsOnError) into ``state.terminated.message``; images in
  ``image_pull_errors`` are never pulled (the pod stays Pending, its container waiting in
  ErrImagePull, then ImagePullBackOff, retried with the kubelet's back-off from
  ``kubelet_backoff``), and env from a missing ConfigMap/Secret or key leaves it waiting in
  CreateContainerConfigError (retried the same way); status writes keep the conditions that
  others own (DisruptionTarget) as the kubelet's status manager does; a pod deleted before
  its container ends gets a terminal phase before the deletion is confirmed;
  restarts containers in place for restartPolicy OnFailure/Always (restartCount); deletes
  gracefully: SIGTERM, ``deletionGracePeriodSeconds`` (from terminationGracePeriodSeconds,
  default 30), SIGKILL, then confirms the deletion with gracePeriodSeconds=0.

Stand-ins for what a local process cannot have (the documented differences):

* **mount namespaces**: volumes are directories on the host — configMap and secret volumes
  are materialised as files (``items``/``path``, ``defaultMode``) in the kubelet's own layout
  (``key -> ..data/key``, ``..data -> ..<timestamp>/``) and refreshed when the object changes
  (polled every ``volume_refresh`` s) by renaming a new ``..data`` link over the old one, an
  atomic swap of the whole set of files; subPath mounts are snapshots taken at container
  start and never refreshed, as in Kubernetes; persistentVolumeClaim volumes map to one directory per
  claim on this node (the claim must exist, as in a cluster; it is marked Bound); emptyDir to a
  per-pod directory; hostPath to the path itself. A process cannot see ``/etc/config``, so the
  values of env vars, command and args that start with a volume's mountPath (at a path
  boundary) are rewritten to the materialised location; so is ``workingDir``, and so is the
  ``terminationMessagePath`` (``/dev/termination-log`` becomes a per-container file: a process
  that hard-codes the path instead of reading it from env/args cannot be redirected).
* **cluster DNS**: tokens ``<hostname>.<subdomain>``, ``<hostname>.<subdomain>.<ns>.svc`` and
  ``...svc.cluster.local`` in env values, command and args are rewritten to the loopback IP of
  the pod with that hostname and subdomain in that namespace (the address is reserved by name,
  so it is known before the pod starts). As with real DNS, the name only resolves when the
  headless Service ``<subdomain>`` exists; the kubelet waits up to ``dns_wait`` s for the pod
  and the Service to appear, then starts the process anyway (unresolved names stay as they are
  and a warning goes into the pod's log).
* **network namespaces**: all pods share the host's network. Env values equal to ``0.0.0.0``
  are rewritten to the pod's IP, so a server that binds the address it is told to binds only
  its pod's address. A process that binds 0.0.0.0 on its own (e.g. torch's TCPStore) collides
  with other pods on the same port: give concurrent pods different ports.
* **container images**: the host's environment stands in for the image's (``inherit_host_env``;
  KUBECONFIG/KUBERNETES_*/PYTEST_* are left out), with ``sys.executable``'s directory first on
  PATH so that ``python`` is the interpreter running the tests; ``HOSTNAME`` is the pod's
  hostname and ``TMPDIR`` a per-pod directory. Container env then applies: ``value`` (with
  ``$(VAR)`` expansion), ``valueFrom`` (fieldRef: metadata.name/namespace/uid/labels/annotations,
  spec.nodeName/serviceAccountName, status.podIP/hostIP; configMapKeyRef; secretKeyRef;
  resourceFieldRef) and ``envFrom``.

Not emulated: cpu/memory limits (no OOM kills), priority-based preemption (only ``preempt()``),
affinity and taints/tolerations, probes other than readiness, lifecycle hooks, sidecars and
containers after the first, downwardAPI/projected volumes, backoffLimitPerIndex (so FailIndex
counts like Count), successPolicy, ``status.uncountedTerminatedPods`` (the controller counts in
memory before it releases a pod), the SuccessCriteriaMet/FailureTarget interim conditions, node
heartbeats, image pulls that take time.

Each pod's stdout+stderr go to a log file: ``node.read_log(pod, namespace)``; the fixture
also serves it as ``GET .../pods/{name}/log`` through the emulator.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import copy
import datetime
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.quantity import parse_quantity

logger = logging.getLogger(__name__)

JsonDict = dict[str, Any]
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"
_TERMINAL = ("Succeeded", "Failed")
DEFAULT_CAPACITY = {"cpu": "16", "memory": "64Gi"}
# Pod conditions the kubelet writes; it leaves every other one (DisruptionTarget, readiness gates) alone.
_KUBELET_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")


def pod_failure_verdict(policy: JsonDict | None, pod: JsonDict) -> tuple[str, str] | None:
    """The action of the first podFailurePolicy rule a failed pod matches, with the job controller's
    message for it; None when no rule matches (the failure counts, as without a policy)."""
    meta, status = pod["metadata"], pod.get("status") or {}
    where = f"{meta.get('namespace')}/{meta['name']}"
    for index, rule in enumerate((policy or {}).get("rules") or []):
        action = rule.get("action", "Count")
        codes = rule.get("onExitCodes")
        if codes is not None:
            values = set(codes.get("values") or [])
            statuses = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
            for cs in statuses:
                if codes.get("containerName") and cs.get("name") != codes["containerName"]:
                    continue
                code = ((cs.get("state") or {}).get("terminated") or {}).get("exitCode")
                if code is None or code == 0:  # a container that succeeded never matches
                    continue
                if (code in values) == (codes.get("operator") == "In"):
                    message = (
                        f"Container {cs.get('name')} for pod {where} failed with exit code {code} "
                        f"matching {action} rule at index {index}"
                    )
                    return action, message
        for pattern in rule.get("onPodConditions") or []:
            wanted = pattern.get("status", "True")
            if any(
                c.get("type") == pattern.get("type") and c.get("status") == wanted
                for c in status.get("conditions") or []
            ):
                condition = pattern.get("type")
                return action, f"Pod {where} has condition {condition} matching {action} rule at index {index}"
    return None


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()


def compress_indexes(indexes: set[int]) -> str:
    """Kubernetes' completedIndexes format: "0-2,5,7-8"."""
    result: list[str] = []
    items = sorted(indexes)
    start = prev = None
    for i in items + [None]:  # type: ignore[list-item]
        if start is None:
            start = prev = i
        elif i is not None and i == prev + 1:  # type: ignore[operator]
            prev = i
        else:
            result.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = i
    return ",".join(result)


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


class _Api:
    """A minimal async REST client (what a controller's clientset does, without the types)."""

    def __init__(self, base_url: str, headers: Mapping[str, str] | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.headers = dict(headers or {})
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(headers=self.headers)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        assert self.session is not None
        data = json.dumps(body) if body is not None else None
        async with self.session.request(
            method,
            self.base + path,
            data=data,
            params=params,
            headers={"Content-Type": content_type},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            text = await resp.text()
            payload: Any = None
            with contextlib.suppress(ValueError):
                payload = json.loads(text) if text else None
            if resp.status >= 400:
                raise ApiError(resp.status, payload if payload is not None else text)
            return payload

    async def get(self, path: str, **params: str) -> Any:
        return await self.request("GET", path, params=params or None)

    async def post(self, path: str, body: Any) -> Any:
        return await self.request("POST", path, body=body)

    async def merge_patch(self, path: str, body: Any) -> Any:
        return await self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    async def delete(self, path: str, **params: str) -> Any:
        return await self.request("DELETE", path, params=params or None)


def _ns_path(namespace: str, plural: str, name: str | None = None, group: str = "", version: str = "v1") -> str:
    prefix = "/api/v1" if not group else f"/apis/{group}/{version}"
    return f"{prefix}/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")


@dataclass
class _Volume:
    name: str
    kind: str  # configMap, secret, pvc, emptyDir, hostPath
    path: Path
    source: JsonDict
    refreshable: bool = True
    last_data: Any = None
    files: list[str] = field(default_factory=list)


@dataclass
class PodRuntime:
    """What the kubelet keeps about one pod it runs."""

    uid: str
    namespace: str
    name: str
    ip: str
    root: Path
    log_path: Path
    pod: JsonDict
    volumes: dict[str, _Volume] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    terminate: asyncio.Event = field(default_factory=asyncio.Event)
    grace: float = 30.0
    restart_count: int = 0
    phase: str = "Pending"
    exit_code: int | None = None
    started_at: str | None = None
    ready: bool = False
    termination_message: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class _JobTracking:
    succeeded: dict[str, int | None] = field(default_factory=dict)  # pod uid -> index
    failed: set[str] = field(default_factory=set)
    ignored: set[str] = field(default_factory=set)  # failed pods a podFailurePolicy Ignore rule matched
    deleted: set[str] = field(default_factory=set)  # pods the controller itself deleted (not failures)
    fail_job: str | None = None  # the message of a FailJob rule that matched
    seen_active: dict[str, int | None] = field(default_factory=dict)
    last_failure: float = 0.0
    start_time: str | None = None


# How long stopping waits for cancelled tasks: one that ignores its cancellation is reported (with
# where it hangs) instead of holding a test's teardown for stop_sync's whole timeout.
STOP_WAIT_SECONDS = 5


async def _settle(tasks: list[asyncio.Task[Any]], what: str) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=STOP_WAIT_SECONDS)
    for task in pending:
        stack = "".join(traceback.format_stack(task.get_stack()[-1])) if task.get_stack() else "(no frame)"
        logger.warning(
            "fake node: %s task %s still running %s s after cancel, at:\n%s",
            what,
            task.get_name(),
            STOP_WAIT_SECONDS,
            stack,
        )


class FakeNode:
    """
    The job controller, scheduler and kubelet of one fake node (see the module docs).

    ``await node.start()`` / ``await node.stop()`` from async code, or ``start_sync()`` /
    ``stop_sync()``; it runs in its own thread and event loop, so tests may block (e.g. on the
    sync kubernetes client) without stalling it. ``stop()`` kills every process it started.
    """

    def __init__(
        self,
        api_url: str,
        *,
        name: str = "fake-node",
        namespace: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        max_pods: int | None = None,
        resync: float = 0.5,
        volume_refresh: float = 0.5,
        retry_backoff: float = 10.0,
        dns_wait: float = 5.0,
        inherit_host_env: bool = True,
        extra_env: Mapping[str, str] | None = None,
        image_commands: Mapping[str, list[str]] | None = None,
        run_jobs: bool = True,
        labels: Mapping[str, str] | None = None,
        extended_resources: Mapping[str, int] | None = None,
        capacity: Mapping[str, str] | None = None,
        image_pull_errors: Mapping[str, str] | None = None,
        kubelet_backoff: float = 10.0,
        register_node: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.api_url = api_url
        self.name = name
        self.namespace = namespace
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="fake-node-"))
        self.max_pods = max_pods
        self.resync = resync
        self.volume_refresh = volume_refresh
        self.retry_backoff = retry_backoff
        self.dns_wait = dns_wait
        self.inherit_host_env = inherit_host_env
        self.extra_env = dict(extra_env or {})
        self.image_commands = dict(image_commands or {})
        self.run_jobs = run_jobs
        self.labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **(labels or {}),
        }
        self.extended_resources = dict(extended_resources or {})  # e.g. {'nvidia.com/gpu': 8}
        # Allocatable cpu and memory the scheduler fits requests into (the processes share the host).
        self.capacity = {**DEFAULT_CAPACITY, **(capacity or {})}
        # image -> why its pull fails; the kubelet reports ErrImagePull, then ImagePullBackOff, and
        # retries with back-off (a test may drop an entry: the next retry pulls it).
        self.image_pull_errors = dict(image_pull_errors or {})
        self.kubelet_backoff = kubelet_backoff  # the kubelet's first retry delay (doubling, at most 300 s)
        self.register_node = register_node
        self._headers = dict(headers or {})

        self.pods: dict[str, PodRuntime] = {}  # by uid; also kept after the pod is gone (logs)
        self._by_name: dict[tuple[str, str], PodRuntime] = {}
        self._ips: dict[tuple[str, str, str], str] = {}  # (ns, hostname, subdomain) -> reserved IP
        # A random start: pods of concurrent test sessions bind the same ports on the same host.
        self._ip_counter = random.randrange(1 << 8, 1 << 23)
        self._jobs: dict[str, _JobTracking] = {}

        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._api = _Api(api_url, self._headers)
        self._wake: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._tasks: list[asyncio.Task[Any]] = []
        self.errors: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> FakeNode:
        self._spawn_thread()
        await asyncio.wrap_future(self._started)
        return self

    async def stop(self) -> None:
        self._request_stop()
        await asyncio.wrap_future(self._done)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def start_sync(self, timeout: float = 10) -> FakeNode:
        self._spawn_thread()
        self._started.result(timeout)
        return self

    def stop_sync(self, timeout: float = 30) -> None:
        self._request_stop()
        with contextlib.suppress(concurrent.futures.TimeoutError):
            self._done.result(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def cleanup(self) -> None:
        """Remove the work directory if the node created it (logs are gone afterwards)."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _spawn_thread(self) -> None:
        if self._thread is not None:
            raise RuntimeError("A FakeNode can be started only once.")
        self._thread = threading.Thread(target=self._thread_main, name=f"fake-node-{self.name}", daemon=True)
        self._thread.start()

    def _request_stop(self) -> None:
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopping.set)

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:  # noqa: BLE001 - reported through the futures
            if not self._started.done():
                self._started.set_exception(e)
            logger.exception("The fake node crashed.")
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            if not self._done.done():
                self._done.set_result(None)

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self._api.open()
        try:
            if self.register_node:
                await self._register_node()
            self._tasks = [
                asyncio.create_task(self._reconcile_loop(), name="reconcile"),
                asyncio.create_task(self._refresh_volumes_loop(), name="volumes"),
                asyncio.create_task(self._watch_loop(self._list_path("", "v1", "pods")), name="watch-pods"),
            ]
            if self.run_jobs:
                self._tasks.append(
                    asyncio.create_task(self._watch_loop(self._list_path("batch", "v1", "jobs")), name="watch-jobs")
                )
            self._started.set_result(None)
            await self._stopping.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            await _settle(self._tasks, "node loops")
            await self._kill_all()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._api.close(), STOP_WAIT_SECONDS)

    async def _kill_all(self) -> None:
        for rt in list(self.pods.values()):
            if rt.process is not None and rt.process.returncode is None:
                self._signal(rt, signal.SIGKILL)
        for rt in list(self.pods.values()):
            if rt.task is not None and not rt.task.done():
                rt.task.cancel()
        await _settle([rt.task for rt in self.pods.values() if rt.task is not None], "pod tasks")
        for rt in list(self.pods.values()):
            if rt.process is not None and rt.process.returncode is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(rt.process.wait(), 5)

    async def _register_node(self) -> None:
        """Create (or refresh) this node's v1 Node object, Ready, with its capacity and labels."""
        capacity = {
            **self.capacity,
            "ephemeral-storage": "64Gi",
            "pods": str(self.max_pods if self.max_pods is not None else 110),
            **{k: str(v) for k, v in self.extended_resources.items()},
        }
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": self.labels}}
        try:
            await self._api.post("/api/v1/nodes", node)
        except ApiError as e:
            if e.status != 409:
                raise
            await self._api.merge_patch(f"/api/v1/nodes/{self.name}", {"metadata": {"labels": self.labels}})
        now = _now()
        await self._api.merge_patch(
            f"/api/v1/nodes/{self.name}/status",
            {
                "status": {
                    "capacity": capacity,
                    "allocatable": capacity,
                    "addresses": [
                        {"type": "InternalIP", "address": "127.0.0.1"},
                        {"type": "Hostname", "address": self.name},
                    ],
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "KubeletReady",
                            "message": "fake kubelet is posting ready status",
                            "lastHeartbeatTime": now,
                            "lastTransitionTime": now,
                        }
                    ],
                    # All of these are required by the kubernetes client's V1NodeSystemInfo model.
                    "nodeInfo": {
                        "kubeletVersion": "v1.33.0-fake",
                        "kubeProxyVersion": "v1.33.0-fake",
                        "operatingSystem": "linux",
                        "architecture": "amd64",
                        "osImage": "fake-node",
                        "containerRuntimeVersion": "fake://0",
                        "kernelVersion": os.uname().release,
                        "machineID": self.name,
                        "systemUUID": self.name,
                        "bootID": self.name,
                    },
                }
            },
        )

    # -- public helpers for tests -----------------------------------------------------------

    def runtime(self, name: str, namespace: str = "default") -> PodRuntime | None:
        return self._by_name.get((namespace, name))

    def log_path(self, name: str, namespace: str = "default") -> Path | None:
        rt = self.runtime(name, namespace)
        return rt.log_path if rt is not None else None

    def read_log(self, name: str, namespace: str = "default") -> str | None:
        """The pod's stdout+stderr so far (None if this node never ran the pod)."""
        path = self.log_path(name, namespace)
        if path is None or not path.exists():
            return None
        return path.read_text(errors="replace")

    def logs(self) -> dict[str, str]:
        """All pods' logs, by "namespace/name" (handy in assertion messages)."""
        return {
            f"{rt.namespace}/{rt.name}": (rt.log_path.read_text(errors="replace") if rt.log_path.exists() else "")
            for rt in list(self.pods.values())
        }  # (the node's thread may be adding pods)

    def pod_root(self, name: str, namespace: str = "default") -> Path | None:
        rt = self.runtime(name, namespace)
        return rt.root if rt is not None else None

    def pvc_dir(self, claim: str, namespace: str = "default") -> Path:
        return self.workdir / "pvcs" / namespace / claim

    async def evict(self, name: str, namespace: str = "default", grace_seconds: int | None = None) -> None:
        """What the eviction API (POST .../pods/{name}/eviction, once PodDisruptionBudgets allow it)
        does to a pod: the DisruptionTarget condition (EvictionByEvictionAPI), then a graceful delete."""
        await self._in_node_loop(
            self._disrupt(namespace, name, "EvictionByEvictionAPI", "Eviction API: evicting", grace_seconds)
        )

    async def preempt(self, name: str, namespace: str = "default") -> None:
        """What the scheduler does to a victim it preempts for a higher-priority pod: the
        DisruptionTarget condition (PreemptionByScheduler), then a graceful delete."""
        message = "default-scheduler: preempting to accommodate a higher priority pod"
        await self._in_node_loop(self._disrupt(namespace, name, "PreemptionByScheduler", message, None))

    def evict_sync(self, name: str, namespace: str = "default", grace_seconds: int | None = None) -> None:
        self._run_in_node_loop(
            self._disrupt(namespace, name, "EvictionByEvictionAPI", "Eviction API: evicting", grace_seconds)
        )

    async def _in_node_loop(self, coroutine: Any) -> None:
        assert self._loop is not None, "the node is not started"
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    def _run_in_node_loop(self, coroutine: Any, timeout: float = 30) -> None:
        assert self._loop is not None, "the node is not started"
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _disrupt(self, namespace: str, name: str, reason: str, message: str, grace: int | None) -> None:
        condition = {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": reason,
            "message": message,
            "lastProbeTime": None,
            "lastTransitionTime": _now(),
        }
        await self._write_pod_status(namespace, name, {"conditions": [condition]}, owned=("DisruptionTarget",))
        params = {"gracePeriodSeconds": str(grace)} if grace is not None else {}
        await self._api.delete(_ns_path(namespace, "pods", name), **params)

    # -- API plumbing -----------------------------------------------------------------------

    def _list_path(self, group: str, version: str, plural: str) -> str:
        if self.namespace:
            return _ns_path(self.namespace, plural, group=group, version=version)
        return ("/api/v1" if not group else f"/apis/{group}/{version}") + f"/{plural}"

    async def _watch_loop(self, path: str) -> None:
        assert self._api.session is not None and self._wake is not None
        while True:
            try:
                async with self._api.session.get(
                    self._api.base + path,
                    params={"watch": "true", "timeoutSeconds": "30", "allowWatchBookmarks": "true"},
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                ) as resp:
                    async for _ in resp.content:
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - reconnect like an informer
                await asyncio.sleep(0.2)

    async def _reconcile_loop(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.resync)
            self._wake.clear()
            await asyncio.sleep(0.01)  # batch bursts of events
            try:
                await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep reconciling
                if not isinstance(e, (aiohttp.ClientError, ApiError)):
                    logger.exception("Fake node reconciliation failed.")
                    self.errors.append(repr(e))

    async def _reconcile(self) -> None:
        pods = (await self._api.get(self._list_path("", "v1", "pods")))["items"]
        if self.run_jobs:
            jobs = (await self._api.get(self._list_path("batch", "v1", "jobs")))["items"]
            for job in jobs:
                try:
                    await self._sync_job(job, pods)
                except ApiError as e:
                    if e.status not in (404, 409):
                        logger.warning("Job %s sync failed: %s", job["metadata"]["name"], e)
            await self._collect_pods(pods, jobs)
            pods = (await self._api.get(self._list_path("", "v1", "pods")))["items"]
        await self._schedule(pods)
        await self._kubelet(pods)

    # -- job controller -----------------------------------------------------------------------

    async def _sync_job(self, job: JsonDict, all_pods: list[JsonDict]) -> None:
        meta, spec = job["metadata"], job.get("spec", {})
        status = job.get("status") or {}
        uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
        conditions = list(status.get("conditions") or [])
        finished = next(
            (c for c in conditions if c.get("type") in ("Complete", "Failed") and c.get("status") == "True"), None
        )
        track = self._jobs.setdefault(uid, _JobTracking())
        job_path = _ns_path(ns, "jobs", name, group="batch")
        pods = [
            p
            for p in all_pods
            if any(
                ref.get("uid") == uid and ref.get("controller") for ref in p["metadata"].get("ownerReferences") or []
            )
        ]

        if finished is not None:
            for p in pods:  # accounted for: nothing holds them any more
                if (p.get("status") or {}).get("phase") in _TERMINAL or p["metadata"].get("deletionTimestamp"):
                    await self._release(p)
            ttl = spec.get("ttlSecondsAfterFinished")
            done_at = _parse_time(status.get("completionTime") or finished.get("lastTransitionTime"))
            if (
                ttl is not None
                and done_at is not None
                and time.time() >= done_at + ttl
                and not meta.get("deletionTimestamp")
            ):
                with contextlib.suppress(ApiError):
                    await self._api.delete(job_path, propagationPolicy="Background")
            return
        if meta.get("deletionTimestamp"):
            return

        failure_policy = spec.get("podFailurePolicy")
        # With a podFailurePolicy the API server defaults (and only allows) Failed: a replacement
        # waits until the pod it replaces has stopped.
        replacement = spec.get("podReplacementPolicy") or ("Failed" if failure_policy else "TerminatingOrFailed")
        indexed = spec.get("completionMode") == "Indexed"
        completions = spec.get("completions")
        parallelism = spec.get("parallelism", 1) if spec.get("parallelism") is not None else 1
        backoff_limit = spec.get("backoffLimit", 6) if spec.get("backoffLimit") is not None else 6
        suspended = bool(spec.get("suspend"))

        def index_of(pod: JsonDict) -> int | None:
            raw = (pod["metadata"].get("annotations") or {}).get(INDEX_KEY)
            return int(raw) if raw is not None and str(raw).isdigit() else None

        # Account for terminal pods and for pods that vanished while active.
        present = {p["metadata"]["uid"] for p in pods}
        for p in pods:
            puid, phase = p["metadata"]["uid"], (p.get("status") or {}).get("phase")
            if puid in track.deleted:
                # Deleted by the controller itself (its Job suspended, say), its tracking finalizer
                # removed first: the real controller never counts such a pod, whatever its exit code.
                track.seen_active.pop(puid, None)
                continue
            if phase == "Succeeded" and puid not in track.failed:
                track.succeeded[puid] = index_of(p)
                track.seen_active.pop(puid, None)
            elif phase == "Failed":
                if puid not in track.failed and puid not in track.ignored:
                    verdict = pod_failure_verdict(failure_policy, p)
                    if verdict is not None and verdict[0] == "Ignore":
                        track.ignored.add(puid)  # not a failure: no backoffLimit, no back-off, replaced
                    else:
                        track.failed.add(puid)
                        track.last_failure = time.time()
                        if verdict is not None and verdict[0] == "FailJob":
                            track.fail_job = track.fail_job or verdict[1]
                track.seen_active.pop(puid, None)
            elif (
                p["metadata"].get("deletionTimestamp")
                and replacement == "TerminatingOrFailed"
                and puid not in track.deleted
                and phase != "Succeeded"
            ):
                # Deleted by someone else while active: a failure at once, and replaced at once.
                if puid not in track.failed:
                    track.failed.add(puid)
                    track.last_failure = time.time()
                track.seen_active.pop(puid, None)
            elif phase != "Succeeded":
                track.seen_active[puid] = index_of(p)
        for puid in list(track.seen_active):
            if puid in track.deleted:
                track.seen_active.pop(puid)
            elif puid not in present:
                track.seen_active.pop(puid)
                track.failed.add(puid)
                track.last_failure = time.time()

        restarts = sum(
            cs.get("restartCount", 0) for p in pods for cs in (p.get("status") or {}).get("containerStatuses") or []
        )
        failed_count = len(track.failed)
        active = [
            p
            for p in pods
            if (p.get("status") or {}).get("phase") not in _TERMINAL and not p["metadata"].get("deletionTimestamp")
        ]
        terminating = [
            p
            for p in pods
            if (p.get("status") or {}).get("phase") not in _TERMINAL and p["metadata"].get("deletionTimestamp")
        ]
        ready = sum(
            1
            for p in active
            if any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (p.get("status") or {}).get("conditions") or []
            )
        )
        succeeded_indexes = {i for i in track.succeeded.values() if i is not None}
        succeeded_count = len(track.succeeded)

        new_status: JsonDict = {}
        now = _now()
        new_conditions = [c for c in conditions if c.get("type") != "Suspended"]
        was_suspended = next(
            (c for c in conditions if c.get("type") == "Suspended" and c.get("status") == "True"), None
        )
        if suspended:
            start_time = status.get("startTime")  # whoever suspends it may clear it (Kueue does)
        elif was_suspended is not None:
            # Resumed: Suspended turns False (JobResumed) and startTime starts over, as the real
            # controller does, so activeDeadlineSeconds counts only the time the Job may run.
            start_time = now
            new_conditions.append(
                {
                    "type": "Suspended",
                    "status": "False",
                    "reason": "JobResumed",
                    "message": "Job resumed",
                    "lastProbeTime": now,
                    "lastTransitionTime": now,
                }
            )
        else:
            start_time = status.get("startTime") or track.start_time or now
            new_conditions += [c for c in conditions if c.get("type") == "Suspended"]  # a False one stays
        track.start_time = start_time
        failure: tuple[str, str] | None = None
        if track.fail_job is not None:
            failure = ("PodFailurePolicy", track.fail_job)
        elif failed_count + restarts > backoff_limit:
            failure = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        elif spec.get("activeDeadlineSeconds") is not None and start_time and not suspended:
            started = _parse_time(start_time)
            if started is not None and time.time() > started + spec["activeDeadlineSeconds"]:
                failure = ("DeadlineExceeded", "Job was active longer than specified deadline")
        complete = False
        if failure is None:
            if indexed:
                complete = completions is not None and len(succeeded_indexes) >= completions
            else:
                complete = (
                    succeeded_count >= (completions if completions is not None else 1)
                    if completions is not None
                    else succeeded_count >= 1 and not active
                )
        to_delete: list[JsonDict] = []
        if failure is not None:
            to_delete = active
            new_conditions.append(
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": failure[0],
                    "message": failure[1],
                    "lastProbeTime": now,
                    "lastTransitionTime": now,
                }
            )
        elif complete:
            to_delete = active  # e.g. leftovers of a NonIndexed job
            new_conditions.append(
                {
                    "type": "Complete",
                    "status": "True",
                    "reason": "CompletionsReached",
                    "message": "Reached expected number of succeeded pods",
                    "lastProbeTime": now,
                    "lastTransitionTime": now,
                }
            )
            new_status["completionTime"] = now
        elif suspended:
            to_delete = active
            new_conditions.append(
                was_suspended
                or {
                    "type": "Suspended",
                    "status": "True",
                    "reason": "JobSuspended",
                    "message": "Job suspended",
                    "lastProbeTime": now,
                    "lastTransitionTime": now,
                }
            )
        else:
            # Create the missing pods (with the controller's back-off after failures).
            delay = 0.0
            if track.failed:
                delay = min(self.retry_backoff * (2 ** (len(track.failed) - 1)), 360.0)
            may_create = not track.failed or time.time() >= track.last_failure + delay
            # Terminating pods hold their place until they have stopped under podReplacementPolicy Failed.
            occupying = active + (terminating if replacement == "Failed" else [])
            slots = max(0, parallelism - len(occupying))
            if indexed and completions is not None:
                busy = {index_of(p) for p in occupying}
                for index in range(completions):
                    if slots <= 0 or not may_create:
                        break
                    if index in succeeded_indexes or index in busy:
                        continue
                    await self._create_job_pod(job, index)
                    slots -= 1
            elif not indexed:
                wanted = (completions if completions is not None else 1) - succeeded_count
                for _ in range(max(0, min(slots, wanted - len(occupying)))):
                    if not may_create:
                        break
                    await self._create_job_pod(job, None)
            if not may_create and self._wake is not None and self._loop is not None:
                self._loop.call_later(max(0.05, track.last_failure + delay - time.time()), self._wake.set)

        for pod in to_delete:
            track.deleted.add(pod["metadata"]["uid"])
            await self._release(pod)  # as the real controller does: the finalizer first, then the delete
            with contextlib.suppress(ApiError):
                await self._api.delete(_ns_path(ns, "pods", pod["metadata"]["name"]))

        new_status.update(
            {
                "active": len(active) if failure is None and not complete and not suspended else 0,
                "ready": ready if failure is None and not complete else 0,
                "terminating": len(terminating) + (len(to_delete) if (failure or complete or suspended) else 0),
                "succeeded": succeeded_count,
                "failed": failed_count,
                "conditions": new_conditions or None,
                "uncountedTerminatedPods": {},
            }
        )
        if start_time:
            new_status["startTime"] = start_time
        if indexed:
            new_status["completedIndexes"] = compress_indexes(succeeded_indexes) if succeeded_indexes else None
        for key in ("active", "ready", "terminating", "succeeded", "failed"):
            if not new_status[key] and key not in status:
                new_status[key] = None  # keep zeros out, as the real controller's omitempty does
        changed = any((status.get(k) if k in status else None) != v for k, v in new_status.items())
        if changed:
            await self._api.merge_patch(job_path + "/status", {"status": new_status})
        for p in pods:  # counted above (or ignored by the podFailurePolicy): the pod may go now
            if (p.get("status") or {}).get("phase") in _TERMINAL or p["metadata"]["uid"] in track.failed:
                await self._release(p)

    async def _release(self, pod: JsonDict) -> None:
        """Remove the job-tracking finalizer, as the job controller does once it has counted the pod."""
        meta = pod["metadata"]
        finalizers = meta.get("finalizers") or []
        if TRACKING_FINALIZER not in finalizers:
            return
        rest = [f for f in finalizers if f != TRACKING_FINALIZER]
        patch = {"metadata": {"finalizers": rest or None, "resourceVersion": meta["resourceVersion"]}}
        with contextlib.suppress(ApiError):  # changed meanwhile (409) or gone (404): the next sync sees it
            await self._api.merge_patch(_ns_path(meta["namespace"], "pods", meta["name"]), patch)
        meta["finalizers"] = rest

    async def _collect_pods(self, pods: list[JsonDict], jobs: list[JsonDict]) -> None:
        """The control plane's part for pods no kubelet finishes: the job controller releases the
        tracking finalizer of pods whose Job is gone (orphans), and the pod garbage collector marks
        unscheduled pods that are being deleted Failed (gcUnscheduledTerminating)."""
        job_uids = {job["metadata"]["uid"] for job in jobs}
        for pod in pods:
            meta = pod["metadata"]
            owner = next((r.get("uid") for r in meta.get("ownerReferences") or [] if r.get("controller")), None)
            if owner not in job_uids:
                await self._release(pod)
            elif (
                meta.get("deletionTimestamp")
                and not pod.get("spec", {}).get("nodeName")
                and (pod.get("status") or {}).get("phase") not in _TERMINAL
            ):
                await self._write_pod_status(meta["namespace"], meta["name"], {"phase": "Failed"}, owned=())

    async def _create_job_pod(self, job: JsonDict, index: int | None) -> None:
        meta, spec = job["metadata"], job["spec"]
        template = copy.deepcopy(spec.get("template") or {})
        tmeta, tspec = template.get("metadata") or {}, template.get("spec") or {}
        suffix = "".join(random.choices(_NAME_ALPHABET, k=5))
        name = f"{meta['name']}-{index}-{suffix}" if index is not None else f"{meta['name']}-{suffix}"
        labels = dict(tmeta.get("labels") or {})
        labels.setdefault("job-name", meta["name"])
        labels.setdefault("batch.kubernetes.io/job-name", meta["name"])
        labels.setdefault("controller-uid", meta["uid"])
        labels.setdefault("batch.kubernetes.io/controller-uid", meta["uid"])
        annotations = dict(tmeta.get("annotations") or {})
        if index is not None:
            labels[INDEX_KEY] = str(index)
            annotations[INDEX_KEY] = str(index)
            tspec.setdefault("hostname", f"{meta['name']}-{index}")
            for field_name in ("initContainers", "containers"):
                for container in tspec.get(field_name) or []:
                    env = container.setdefault("env", [])
                    if not any(e.get("name") == "JOB_COMPLETION_INDEX" for e in env):
                        env.append(
                            {
                                "name": "JOB_COMPLETION_INDEX",
                                "valueFrom": {
                                    "fieldRef": {
                                        "apiVersion": "v1",
                                        "fieldPath": f"metadata.annotations['{INDEX_KEY}']",
                                    }
                                },
                            }
                        )
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": annotations or None,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
                # The pod stays (terminating) until the controller has counted how it ended.
                "finalizers": [TRACKING_FINALIZER],
            },
            "spec": tspec,
        }
        if not annotations:
            del pod["metadata"]["annotations"]
        await self._api.post(_ns_path(meta["namespace"], "pods"), pod)

    # -- scheduler ------------------------------------------------------------------------------

    @staticmethod
    def _extended_requests(pod: JsonDict) -> dict[str, int]:
        """Requests of extended resources (names with a "/", e.g. nvidia.com/gpu): integers."""
        wanted: dict[str, int] = {}
        for container in pod.get("spec", {}).get("containers") or []:
            resources = container.get("resources") or {}
            for name, value in {**(resources.get("limits") or {}), **(resources.get("requests") or {})}.items():
                if "/" in name:
                    wanted[name] = wanted.get(name, 0) + int(str(value))
        return wanted

    @staticmethod
    def _compute_requests(pod: JsonDict) -> dict[str, Decimal]:
        """cpu and memory requests, as the scheduler sums them: the containers' requests (a limit
        stands in for a missing request), or the largest init container's when that is larger."""

        def of(containers: list[JsonDict]) -> list[dict[str, Decimal]]:
            found = []
            for container in containers:
                resources = container.get("resources") or {}
                amounts = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
                found.append({k: parse_quantity(v) for k, v in amounts.items() if k in ("cpu", "memory")})
            return found

        spec = pod.get("spec", {})
        wanted: dict[str, Decimal] = {}
        for amounts in of(spec.get("containers") or []):
            for name, amount in amounts.items():
                wanted[name] = wanted.get(name, Decimal(0)) + amount
        for amounts in of(spec.get("initContainers") or []):
            for name, amount in amounts.items():
                wanted[name] = max(wanted.get(name, Decimal(0)), amount)
        return wanted

    async def _schedule(self, pods: list[JsonDict]) -> None:
        """The scheduler's part: bind pending pods that fit (pod count, nodeSelector, extended resources)."""
        mine = [
            p
            for p in pods
            if p.get("spec", {}).get("nodeName") == self.name and (p.get("status") or {}).get("phase") not in _TERMINAL
        ]
        room = None if self.max_pods is None else self.max_pods - len(mine)
        free = dict(self.extended_resources)
        for pod in mine:
            for name, amount in self._extended_requests(pod).items():
                free[name] = free.get(name, 0) - amount
        free_compute = {name: parse_quantity(value) for name, value in self.capacity.items()}
        for pod in mine:
            for name, amount in self._compute_requests(pod).items():
                free_compute[name] -= amount
        for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", "")):
            spec, meta = pod.get("spec", {}), pod["metadata"]
            if (
                spec.get("nodeName")
                or meta.get("deletionTimestamp")
                or (pod.get("status") or {}).get("phase") in _TERMINAL
            ):
                continue
            if spec.get("schedulerName", "default-scheduler") != "default-scheduler" or spec.get("schedulingGates"):
                continue
            path = _ns_path(meta["namespace"], "pods", meta["name"])
            reason = None
            selector = spec.get("nodeSelector") or {}
            if any(self.labels.get(k) != v for k, v in selector.items()):
                reason = "1 node(s) didn't match Pod's node affinity/selector"
            wanted = self._extended_requests(pod)
            compute = self._compute_requests(pod)
            short = [name for name, amount in compute.items() if free_compute[name] < amount]
            short += [name for name, amount in wanted.items() if free.get(name, 0) < amount]
            if reason is None and short:
                reason = ", ".join(f"1 Insufficient {name}" for name in short)
            if reason is None and room is not None and room <= 0:
                reason = "1 Too many pods"
            if reason is not None:
                message = f"0/1 nodes are available: {reason}."
                conds = (pod.get("status") or {}).get("conditions") or []
                if not any(c.get("type") == "PodScheduled" and c.get("message") == message for c in conds):
                    condition = {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": message,
                        "lastProbeTime": None,
                        "lastTransitionTime": _now(),
                    }
                    with contextlib.suppress(ApiError):
                        await self._write_pod_status(
                            meta["namespace"], meta["name"], {"conditions": [condition]}, owned=("PodScheduled",)
                        )
                continue
            try:
                await self._api.post(
                    path + "/binding",
                    {
                        "apiVersion": "v1",
                        "kind": "Binding",
                        "metadata": {"name": meta["name"]},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": self.name},
                    },
                )
                pod["spec"]["nodeName"] = self.name
                if room is not None:
                    room -= 1
                for name, amount in wanted.items():
                    free[name] = free.get(name, 0) - amount
                for name, amount in compute.items():
                    free_compute[name] -= amount
            except ApiError as e:
                if e.status not in (404, 409):
                    raise

    # -- kubelet ----------------------------------------------------------------------------------

    async def _kubelet(self, pods: list[JsonDict]) -> None:
        seen: set[str] = set()
        for pod in pods:
            meta = pod["metadata"]
            if pod.get("spec", {}).get("nodeName") != self.name:
                continue
            uid = meta["uid"]
            seen.add(uid)
            rt = self.pods.get(uid)
            if rt is None:
                if (pod.get("status") or {}).get("phase") in _TERMINAL:
                    continue
                if meta.get("deletionTimestamp"):
                    # Never started: the kubelet still gives it a terminal phase, then confirms the deletion.
                    with contextlib.suppress(ApiError):
                        await self._write_pod_status(meta["namespace"], meta["name"], {"phase": "Failed"}, owned=())
                        await self._api.delete(
                            _ns_path(meta["namespace"], "pods", meta["name"]), gracePeriodSeconds="0"
                        )
                    continue
                rt = self._new_runtime(pod)
                rt.task = asyncio.create_task(self._run_pod(rt), name=f"pod-{rt.name}")
            else:
                rt.pod = pod
            if meta.get("deletionTimestamp") and not rt.terminate.is_set():
                rt.grace = float(
                    meta.get("deletionGracePeriodSeconds", pod.get("spec", {}).get("terminationGracePeriodSeconds", 30))
                )
                rt.terminate.set()
        for uid, rt in self.pods.items():
            if uid not in seen and rt.task is not None and not rt.task.done() and not rt.terminate.is_set():
                rt.grace = 0.0  # force-deleted: the pod object is gone, stop at once (after SIGTERM)
                rt.terminate.set()

    def _new_runtime(self, pod: JsonDict) -> PodRuntime:
        meta, spec = pod["metadata"], pod.get("spec", {})
        root = self.workdir / "pods" / meta["namespace"] / meta["name"]
        (root / "root").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        ip = self._ip_for(meta["namespace"], spec.get("hostname"), spec.get("subdomain"))
        rt = PodRuntime(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            ip=ip,
            root=root,
            log_path=root / "container.log",
            pod=pod,
            grace=float(spec.get("terminationGracePeriodSeconds", 30)),
        )
        rt.log_path.touch()
        self.pods[rt.uid] = rt
        self._by_name[(rt.namespace, rt.name)] = rt
        return rt

    def _allocate_ip(self) -> str:
        while True:
            self._ip_counter += 1
            n = self._ip_counter
            a, b, c = (n >> 16) & 255, (n >> 8) & 255, n & 255
            if c in (0, 255) or (a, b, c) == (0, 0, 1):
                continue
            return f"127.{a}.{b}.{c}"

    def _ip_for(self, namespace: str, hostname: str | None, subdomain: str | None) -> str:
        if hostname and subdomain:
            key = (namespace, hostname, subdomain)
            if key not in self._ips:
                self._ips[key] = self._allocate_ip()
            return self._ips[key]
        return self._allocate_ip()

    def _signal(self, rt: PodRuntime, sig: int) -> None:
        if rt.process is None or rt.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rt.process.pid, sig)

    async def _patch_pod_status(self, rt: PodRuntime, status: JsonDict) -> None:
        await self._write_pod_status(rt.namespace, rt.name, status, owned=_KUBELET_CONDITIONS)

    async def _write_pod_status(self, namespace: str, name: str, status: JsonDict, *, owned: tuple[str, ...]) -> None:
        """Write a pod's status as the kubelet's status manager does: read the pod, keep the conditions
        that others own (DisruptionTarget from the eviction API or the scheduler, readiness gates),
        and write against the resourceVersion read, again on a conflict. `owned`: condition types
        the writer owns, dropped unless it writes them."""
        path = _ns_path(namespace, "pods", name)
        for _attempt in range(10):
            try:
                current = await self._api.get(path)
                body = dict(status)
                if "conditions" in status:
                    written = {c.get("type") for c in status["conditions"]}
                    kept = [
                        c
                        for c in (current.get("status") or {}).get("conditions") or []
                        if c.get("type") not in written and c.get("type") not in owned
                    ]
                    body["conditions"] = kept + list(status["conditions"])
                version = current["metadata"]["resourceVersion"]
                patch = {"metadata": {"resourceVersion": version}, "status": body}
                await self._api.merge_patch(path + "/status", patch)
                return
            except ApiError as e:
                if e.status == 404:
                    return
                if e.status != 409:
                    raise

    def _log(self, rt: PodRuntime, line: str) -> None:
        with rt.log_path.open("a") as f:
            f.write(f"[fake-node] {line}\n")

    async def _run_pod(self, rt: PodRuntime) -> None:
        pod = rt.pod
        containers = pod.get("spec", {}).get("containers") or []
        policy = pod.get("spec", {}).get("restartPolicy", "Always")
        try:
            if not await self._prepare_volumes(rt):
                return  # deleted while waiting for its volumes
            if not await self._pull_images(rt):
                return  # deleted while its image could not be pulled
            env_cache: dict[str, str] = {}
            for init in pod.get("spec", {}).get("initContainers") or []:
                if rt.terminate.is_set():
                    break
                code = await self._start_container(rt, init, env_cache, init=True)
                if code != 0:
                    await self._finish(
                        rt, containers[0] if containers else init, code, reason="Init:Error", phase="Failed"
                    )
                    return
            container = containers[0]
            while True:
                code = await self._start_container(rt, container, env_cache, init=False)
                rt.exit_code = code
                if rt.terminate.is_set() or policy == "Never" or (policy == "OnFailure" and code == 0) or code is None:
                    break
                rt.restart_count += 1
                self._log(rt, f"restarting container (exit code {code}, restartCount {rt.restart_count})")
                await self._patch_pod_status(
                    rt, self._status(rt, container, waiting="CrashLoopBackOff", last_exit=code)
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(rt.terminate.wait(), timeout=min(0.5 * (2**rt.restart_count), 10))
                if rt.terminate.is_set():
                    break
            phase = "Succeeded" if rt.exit_code == 0 else "Failed"
            await self._finish(rt, container, rt.exit_code if rt.exit_code is not None else 137, phase=phase)
        except asyncio.CancelledError:
            raise
        except _Deleted:
            pass  # deleted while the kubelet was waiting to start a container: below
        except Exception as e:  # noqa: BLE001 - report on the pod, like a kubelet would
            logger.exception("Fake kubelet failed to run pod %s/%s", rt.namespace, rt.name)
            self.errors.append(f"{rt.namespace}/{rt.name}: {e!r}")
            self._log(rt, f"error: {e!r}")
            with contextlib.suppress(Exception):
                await self._patch_pod_status(rt, {"phase": "Failed", "reason": "FakeNodeError", "message": repr(e)})
        finally:
            if rt.terminate.is_set():
                with contextlib.suppress(Exception):
                    if rt.phase not in _TERMINAL:  # deleted before its container ended (or started)
                        rt.phase = "Failed"
                        await self._patch_pod_status(rt, {"phase": "Failed"})
                    await self._api.delete(_ns_path(rt.namespace, "pods", rt.name), gracePeriodSeconds="0")
            if self._wake is not None:
                self._wake.set()

    async def _back_off(self, rt: PodRuntime, attempt: int) -> bool:
        """Wait the kubelet's back-off before retry `attempt` (0, 1, ...); False if the pod was deleted."""
        delay = min(self.kubelet_backoff * 2**attempt, 300.0)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(rt.terminate.wait(), timeout=delay)
        return not rt.terminate.is_set()

    async def _pull_images(self, rt: PodRuntime) -> bool:
        """Pull every container's image: one the node cannot pull leaves the pod Pending with
        ErrImagePull, then ImagePullBackOff between retries, as the kubelet reports it."""
        spec = rt.pod.get("spec", {})
        for container in (spec.get("initContainers") or []) + (spec.get("containers") or [])[:1]:
            image = container.get("image", "")
            attempt = 0
            while image in self.image_pull_errors:
                error = self.image_pull_errors[image]
                self._log(rt, f"failed to pull image {image!r}: {error}")
                pulled = f'failed to pull and unpack image "{image}": {error}'
                await self._patch_pod_status(rt, self._status(rt, container, waiting="ErrImagePull", why=pulled))
                await self._patch_pod_status(
                    rt, self._status(rt, container, waiting="ImagePullBackOff", why=f'Back-off pulling image "{image}"')
                )
                if not await self._back_off(rt, attempt):
                    return False
                attempt += 1
        return True

    async def _start_container(
        self, rt: PodRuntime, container: JsonDict, env_cache: dict[str, str], *, init: bool
    ) -> int | None:
        """Run a container once its config resolves: until then (a missing ConfigMap or Secret, or
        key) the pod waits in CreateContainerConfigError and the kubelet retries with back-off."""
        attempt = 0
        while True:
            try:
                return await self._run_container(rt, container, env_cache, init=init)
            except _ContainerConfigError as error:
                self._log(rt, f"cannot create container {container.get('name')!r}: {error}")
                waiting = self._status(rt, container, waiting="CreateContainerConfigError", why=str(error))
                await self._patch_pod_status(rt, waiting)
                if not await self._back_off(rt, attempt):
                    raise _Deleted() from None
                attempt += 1

    async def _finish(
        self, rt: PodRuntime, container: JsonDict, code: int, *, phase: str, reason: str | None = None
    ) -> None:
        rt.phase = phase
        rt.ready = False
        await self._patch_pod_status(rt, self._status(rt, container, exit_code=code, reason=reason))

    def _status(
        self,
        rt: PodRuntime,
        container: JsonDict,
        *,
        exit_code: int | None = None,
        reason: str | None = None,
        waiting: str | None = None,
        why: str | None = None,
        last_exit: int | None = None,
    ) -> JsonDict:
        now = _now()
        cstatus: JsonDict = {
            "name": container.get("name", "main"),
            "image": container.get("image", ""),
            "imageID": f"fake://{container.get('image', '')}",
            "containerID": f"fake://{rt.process.pid if rt.process else 0}",
            "restartCount": rt.restart_count,
            "ready": False,
            "started": False,
        }
        if exit_code is not None:
            cstatus["state"] = {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                    "startedAt": rt.started_at or now,
                    "finishedAt": now,
                    "containerID": cstatus["containerID"],
                }
            }
            if rt.termination_message:
                cstatus["state"]["terminated"]["message"] = rt.termination_message
            ready_status = "False"
            reason_word = "PodCompleted" if rt.phase in _TERMINAL else "ContainersNotReady"
        elif waiting is not None:
            cstatus["state"] = {"waiting": {"reason": waiting, **({"message": why} if why else {})}}
            if last_exit is not None:
                cstatus["lastState"] = {
                    "terminated": {
                        "exitCode": last_exit,
                        "reason": "Error" if last_exit else "Completed",
                        "finishedAt": now,
                    }
                }
            ready_status, reason_word = "False", "ContainersNotReady"
        else:
            cstatus["state"] = {"running": {"startedAt": rt.started_at or now}}
            cstatus["ready"] = rt.ready
            cstatus["started"] = True
            ready_status = "True" if rt.ready else "False"
            reason_word = None if rt.ready else "ContainersNotReady"

        def cond(kind: str, value: str, why: str | None = None) -> JsonDict:
            c: JsonDict = {"type": kind, "status": value, "lastProbeTime": None, "lastTransitionTime": now}
            if why:
                c["reason"] = why
            return c

        status: JsonDict = {
            "phase": rt.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": rt.ip,
            "podIPs": [{"ip": rt.ip}],
            "startTime": rt.pod.get("status", {}).get("startTime") or rt.started_at or now,
            "conditions": [
                cond("PodReadyToStartContainers", "True"),
                cond("Initialized", "True"),
                cond("Ready", ready_status, reason_word),
                cond("ContainersReady", ready_status, reason_word),
                cond("PodScheduled", "True"),
            ],
            "containerStatuses": [cstatus],
            "qosClass": "BestEffort",
        }
        return status

    # -- volumes ---------------------------------------------------------------------------------

    async def _prepare_volumes(self, rt: PodRuntime) -> bool:
        """Materialise the pod's volumes; wait (pod Pending) for missing configMaps/secrets/claims."""
        volumes = rt.pod.get("spec", {}).get("volumes") or []
        announced = False
        while True:
            missing: list[str] = []
            for volume in volumes:
                name = volume["name"]
                if name in rt.volumes:
                    continue
                try:
                    prepared = await self._prepare_volume(rt, volume)
                except ApiError as e:
                    if e.status != 404:
                        raise
                    prepared = None
                if prepared is None:
                    missing.append(name)
                else:
                    rt.volumes[name] = prepared
            if not missing:
                return True
            if not announced:
                announced = True
                self._log(rt, f"waiting for volumes: {', '.join(missing)}")
                await self._patch_pod_status(
                    rt,
                    {
                        "phase": "Pending",
                        "conditions": [
                            {"type": "PodScheduled", "status": "True", "lastTransitionTime": _now()},
                            {
                                "type": "Ready",
                                "status": "False",
                                "reason": "ContainersNotReady",
                                "lastTransitionTime": _now(),
                            },
                        ],
                        "containerStatuses": [
                            {
                                "name": (rt.pod["spec"].get("containers") or [{}])[0].get("name", "main"),
                                "ready": False,
                                "restartCount": 0,
                                "image": "",
                                "imageID": "",
                                "state": {"waiting": {"reason": "ContainerCreating"}},
                            }
                        ],
                    },
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(rt.terminate.wait(), timeout=self.volume_refresh)
            if rt.terminate.is_set():
                return False

    async def _prepare_volume(self, rt: PodRuntime, volume: JsonDict) -> _Volume | None:
        name = volume["name"]
        if "configMap" in volume or "secret" in volume:
            kind = "configMap" if "configMap" in volume else "secret"
            source = volume[kind]
            obj_name = source.get("name") if kind == "configMap" else source.get("secretName")
            path = rt.root / "volumes" / name
            path.mkdir(parents=True, exist_ok=True)
            try:
                obj = await self._api.get(
                    _ns_path(rt.namespace, "configmaps" if kind == "configMap" else "secrets", obj_name)
                )
            except ApiError as e:
                if e.status == 404 and source.get("optional"):
                    return _Volume(name=name, kind=kind, path=path, source=source)
                raise
            vol = _Volume(name=name, kind=kind, path=path, source=source)
            self._write_projection(vol, obj)
            return vol
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            pvc = await self._api.get(_ns_path(rt.namespace, "persistentvolumeclaims", claim))
            if (pvc.get("status") or {}).get("phase") != "Bound":
                with contextlib.suppress(ApiError):
                    await self._api.merge_patch(
                        _ns_path(rt.namespace, "persistentvolumeclaims", claim) + "/status",
                        {
                            "status": {
                                "phase": "Bound",
                                "accessModes": pvc.get("spec", {}).get("accessModes"),
                                "capacity": (pvc.get("spec", {}).get("resources") or {}).get("requests"),
                            }
                        },
                    )
            path = self.pvc_dir(claim, rt.namespace)
            path.mkdir(parents=True, exist_ok=True)
            return _Volume(name=name, kind="pvc", path=path, source=volume, refreshable=False)
        if "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") in ("DirectoryOrCreate",):
                path.mkdir(parents=True, exist_ok=True)
            return _Volume(name=name, kind="hostPath", path=path, source=volume, refreshable=False)
        # emptyDir and anything else: an empty per-pod directory.
        path = rt.root / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        return _Volume(name=name, kind="emptyDir", path=path, source=volume, refreshable=False)

    def _write_projection(self, vol: _Volume, obj: JsonDict) -> bool:
        """Write the configMap's/secret's keys as files; True if anything changed."""
        data: dict[str, bytes] = {}
        if vol.kind == "configMap":
            for key, value in (obj.get("data") or {}).items():
                data[key] = value.encode()
            for key, value in (obj.get("binaryData") or {}).items():
                data[key] = base64.b64decode(value)
        else:
            for key, value in (obj.get("data") or {}).items():
                data[key] = base64.b64decode(value)
        if data == vol.last_data:
            return False
        items = vol.source.get("items")
        mode = vol.source.get("defaultMode", 0o644)
        files: dict[str, tuple[bytes, int]] = {}
        if items:
            for item in items:
                if item["key"] in data:
                    files[item["path"]] = (data[item["key"]], item.get("mode", mode))
        else:
            files = {key: (value, mode) for key, value in data.items()}
        # The kubelet's AtomicWriter layout: the files live in a timestamped directory,
        # "..data" links to it, and each top-level name links to "..data/<name>". An update
        # writes a new directory and renames a new "..data" link over the old one, atomically:
        # a reader sees the old or the new set of files, never a mix.
        stamp = datetime.datetime.now(tz=datetime.UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f")
        new_dir = vol.path / stamp
        new_dir.mkdir(parents=True)
        for rel, (content, file_mode) in files.items():
            target = new_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            os.chmod(target, file_mode)
        data_link, tmp_link = vol.path / "..data", vol.path / "..data_tmp"
        old_dir = Path(os.readlink(data_link)) if data_link.is_symlink() else None
        with contextlib.suppress(FileNotFoundError):
            tmp_link.unlink()
        os.symlink(stamp, tmp_link)
        os.replace(tmp_link, data_link)
        top_level = {rel.split("/", 1)[0] for rel in files}
        for name in top_level:
            link = vol.path / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        for name in {rel.split("/", 1)[0] for rel in vol.files} - top_level:  # keys removed from the object
            with contextlib.suppress(FileNotFoundError):
                (vol.path / name).unlink()
        if old_dir is not None:
            shutil.rmtree(vol.path / old_dir, ignore_errors=True)
        vol.files = sorted(files)
        vol.last_data = data
        return True

    async def _refresh_volumes_loop(self) -> None:
        while True:
            await asyncio.sleep(self.volume_refresh)
            for rt in list(self.pods.values()):
                if rt.process is None or rt.process.returncode is not None:
                    continue
                for vol in list(rt.volumes.values()):
                    if vol.kind not in ("configMap", "secret") or not vol.refreshable:
                        continue
                    obj_name = vol.source.get("name") if vol.kind == "configMap" else vol.source.get("secretName")
                    try:
                        obj = await self._api.get(
                            _ns_path(rt.namespace, "configmaps" if vol.kind == "configMap" else "secrets", obj_name)
                        )
                    except (ApiError, aiohttp.ClientError):
                        continue
                    if self._write_projection(vol, obj):
                        self._log(rt, f"volume {vol.name} refreshed")

    # -- processes ---------------------------------------------------------------------------

    def _mounts(self, rt: PodRuntime, container: JsonDict) -> list[tuple[str, Path]]:
        mounts: list[tuple[str, Path]] = []
        for mount in container.get("volumeMounts") or []:
            vol = rt.volumes.get(mount["name"])
            if vol is None:
                continue
            target = vol.path
            if mount.get("subPath"):
                # A subPath is bound once, at container start, and never sees updates (as in
                # Kubernetes): snapshot what it points to now.
                source = (vol.path / mount["subPath"]).resolve()
                target = rt.root / "subpaths" / f"{mount['name']}-{len(mounts)}" / Path(mount["subPath"]).name
                target.parent.mkdir(parents=True, exist_ok=True)
                if source.is_dir():
                    if vol.kind in ("configMap", "secret"):
                        shutil.copytree(source, target, dirs_exist_ok=True)
                    else:
                        target = source  # a directory inside a shared/empty volume: the same directory
                elif source.exists():
                    if vol.kind in ("configMap", "secret"):
                        shutil.copy2(source, target)
                    else:
                        target = source
                else:
                    source.mkdir(parents=True, exist_ok=True)  # the kubelet creates missing subPaths
                    target = source
            mounts.append((mount["mountPath"].rstrip("/") or "/", target))
        mounts.sort(key=lambda m: len(m[0]), reverse=True)
        return mounts

    @staticmethod
    def _rewrite_path(value: str, mounts: list[tuple[str, Path]]) -> str:
        for mount_path, target in mounts:
            if value == mount_path:
                return str(target)
            if value.startswith(mount_path + "/"):
                return str(target) + value[len(mount_path) :]
        return value

    async def _resolve_env(self, rt: PodRuntime, container: JsonDict) -> tuple[dict[str, str], list[str]]:
        pod, meta = rt.pod, rt.pod["metadata"]
        spec = pod.get("spec", {})
        env: dict[str, str] = {}
        warnings: list[str] = []

        async def get_obj(kind: str, name: str) -> JsonDict | None:
            try:
                return await self._api.get(_ns_path(rt.namespace, kind, name))
            except ApiError as e:
                if e.status == 404:
                    return None
                raise

        def decode(kind: str, value: str) -> str:
            return base64.b64decode(value).decode() if kind == "secrets" else value

        for source in container.get("envFrom") or []:
            kind, ref = (
                ("configmaps", source["configMapRef"])
                if "configMapRef" in source
                else ("secrets", source.get("secretRef", {}))
            )
            obj = await get_obj(kind, ref.get("name", ""))
            if obj is None:
                if not ref.get("optional"):
                    raise _ContainerConfigError(f'{kind[:-1]} "{ref.get("name")}" not found')
                continue
            for key, value in (obj.get("data") or {}).items():
                env[source.get("prefix", "") + key] = decode(kind, value)

        def field_ref(path: str) -> str:
            m = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path)
            if m:
                return (meta.get(m.group(1)) or {}).get(m.group(2), "")
            return {
                "metadata.name": meta["name"],
                "metadata.namespace": meta["namespace"],
                "metadata.uid": meta["uid"],
                "spec.nodeName": self.name,
                "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
                "status.podIP": rt.ip,
                "status.podIPs": rt.ip,
                "status.hostIP": "127.0.0.1",
                "status.hostIPs": "127.0.0.1",
            }.get(path, "")

        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item or "valueFrom" not in item:
                env[name] = _expand(str(item.get("value", "")), env)
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                env[name] = field_ref(source["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in source or "secretKeyRef" in source:
                kind = "configmaps" if "configMapKeyRef" in source else "secrets"
                ref = source.get("configMapKeyRef") or source.get("secretKeyRef")
                obj = await get_obj(kind, ref["name"])
                value = (obj or {}).get("data", {}).get(ref["key"]) if obj else None
                if value is None:
                    if ref.get("optional"):
                        continue
                    if obj is None:
                        raise _ContainerConfigError(f'{kind[:-1]} "{ref["name"]}" not found')
                    title = "ConfigMap" if kind == "configmaps" else "Secret"
                    where = f"{rt.namespace}/{ref['name']}"
                    raise _ContainerConfigError(f"couldn't find key {ref['key']} in {title} {where}")
                env[name] = decode(kind, value)
            elif "resourceFieldRef" in source:
                resource = source["resourceFieldRef"]["resource"]
                kind, _, res = resource.partition(".")
                value = ((container.get("resources") or {}).get(kind) or {}).get(res)
                env[name] = str(value if value is not None else (os.cpu_count() or 1) if res == "cpu" else 0)
        return env, warnings

    async def _dns_rewrite(self, rt: PodRuntime, values: list[str]) -> tuple[dict[str, str], list[str]]:
        """Find <hostname>.<subdomain>[.<ns>.svc[.cluster.local]] names; map them to pod IPs."""
        token = re.compile(
            r"(?<![A-Za-z0-9.-])([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+)(?![A-Za-z0-9-])"
        )
        wanted: dict[str, tuple[str, str, str]] = {}
        for value in values:
            for m in token.finditer(value):
                parts = m.group(1).split(".")
                if len(parts) == 2:
                    wanted[m.group(1)] = (rt.namespace, parts[0], parts[1])
                elif len(parts) == 4 and parts[3] == "svc":
                    wanted[m.group(1)] = (parts[2], parts[0], parts[1])
                elif len(parts) == 6 and parts[3:] == ["svc", "cluster", "local"]:
                    wanted[m.group(1)] = (parts[2], parts[0], parts[1])
        if not wanted:
            return {}, []
        mapping: dict[str, str] = {}
        warnings: list[str] = []
        deadline = time.monotonic() + self.dns_wait
        pending = dict(wanted)
        while pending:
            by_ns: dict[str, tuple[set[tuple[str, str]], set[str], set[str]]] = {}
            for ns in {k[0] for k in pending.values()}:
                pods = (await self._api.get(_ns_path(ns, "pods")))["items"]
                services = (await self._api.get(_ns_path(ns, "services")))["items"]
                by_ns[ns] = (
                    {
                        ((p.get("spec") or {}).get("hostname") or "", (p.get("spec") or {}).get("subdomain") or "")
                        for p in pods
                        if not p["metadata"].get("deletionTimestamp")
                    },
                    {(p.get("spec") or {}).get("subdomain") or "" for p in pods},
                    {s["metadata"]["name"] for s in services},
                )
            for text, (ns, host, sub) in list(pending.items()):
                hosts, subdomains, services = by_ns[ns]
                if sub not in subdomains and sub not in services:
                    pending.pop(text)  # not a pod DNS name at all (e.g. "config.json")
                elif (host, sub) in hosts and sub in services:
                    mapping[text] = self._ip_for(ns, host, sub)
                    pending.pop(text)
            if not pending or time.monotonic() >= deadline or rt.terminate.is_set():
                break
            await asyncio.sleep(0.1)
        for text, (ns, host, sub) in pending.items():
            warnings.append(
                f"DNS name {text!r} does not resolve: needs a pod with hostname {host!r} and "
                f"subdomain {sub!r} and a headless Service {sub!r} in namespace {ns!r}"
            )
        return mapping, warnings

    async def _run_container(
        self, rt: PodRuntime, container: JsonDict, env_cache: dict[str, str], *, init: bool
    ) -> int | None:
        env, warnings = await self._resolve_env(rt, container)
        mounts = self._mounts(rt, container)
        # The container's termination message file: /dev/termination-log is the pod's own, so
        # it gets a per-container file (and the same path rewriting as volumes).
        term_path = container.get("terminationMessagePath") or "/dev/termination-log"
        term_file = rt.root / "termination" / container.get("name", "main")
        term_file.parent.mkdir(parents=True, exist_ok=True)
        term_file.write_bytes(b"")
        mounts = sorted(mounts + [(term_path, term_file)], key=lambda m: len(m[0]), reverse=True)
        argv = list(container.get("command") or self.image_commands.get(container.get("image", ""), []))
        argv = [_expand(a, env) for a in argv] + [_expand(a, env) for a in container.get("args") or []]
        if not argv:
            raise RuntimeError(
                f"container {container.get('name')!r} has no command, and the fake node cannot run "
                f"image {container.get('image')!r}: give it a command or FakeNode(image_commands=...)"
            )
        dns, dns_warnings = await self._dns_rewrite(rt, list(env.values()) + argv)

        def rewrite(value: str) -> str:
            for name, ip in sorted(dns.items(), key=lambda kv: -len(kv[0])):
                value = re.sub(rf"(?<![A-Za-z0-9.-]){re.escape(name)}(?![A-Za-z0-9-])", ip, value)
            if value == "0.0.0.0":
                value = rt.ip
            return self._rewrite_path(value, mounts)

        env = {k: rewrite(v) for k, v in env.items()}
        argv = [rewrite(a) for a in argv]
        process_env: dict[str, str] = {}
        if self.inherit_host_env:
            process_env.update(
                {
                    k: v
                    for k, v in os.environ.items()
                    if k != "KUBECONFIG" and not k.startswith(("KUBERNETES_", "PYTEST_"))
                }
            )
        exe_dir = os.path.dirname(sys.executable)
        process_env["PATH"] = exe_dir + os.pathsep + process_env.get("PATH", os.defpath)
        process_env["HOSTNAME"] = rt.pod.get("spec", {}).get("hostname") or rt.name
        process_env["TMPDIR"] = str(rt.root / "tmp")
        process_env.update(self.extra_env)
        process_env.update(env)
        cwd = rt.root / "root"
        if container.get("workingDir"):
            mapped = self._rewrite_path(container["workingDir"], mounts)
            cwd = (
                Path(mapped)
                if mapped != container["workingDir"]
                else rt.root / "root" / container["workingDir"].lstrip("/")
            )
            cwd.mkdir(parents=True, exist_ok=True)
        for warning in warnings + dns_warnings:
            self._log(rt, f"warning: {warning}")
        with rt.log_path.open("ab") as log:
            rt.process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=str(cwd),
                env=process_env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        rt.started_at = rt.started_at or _now()
        probe_task: asyncio.Task[None] | None = None
        if not init:
            rt.phase = "Running"
            probe = container.get("readinessProbe")
            rt.ready = probe is None
            await self._patch_pod_status(rt, self._status(rt, container))
            if probe is not None:
                probe_task = asyncio.create_task(self._probe_loop(rt, container, probe))
        wait_exit = asyncio.create_task(rt.process.wait())
        wait_term = asyncio.create_task(rt.terminate.wait())
        try:
            await asyncio.wait({wait_exit, wait_term}, return_when=asyncio.FIRST_COMPLETED)
            if not wait_exit.done():
                self._log(rt, f"terminating: SIGTERM, grace period {rt.grace:g}s")
                self._signal(rt, signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(wait_exit), timeout=rt.grace)
                except TimeoutError:
                    self._log(rt, "grace period over: SIGKILL")
                    self._signal(rt, signal.SIGKILL)
                    await wait_exit
            code = wait_exit.result()
        finally:
            wait_term.cancel()
            if probe_task is not None:
                probe_task.cancel()
            if not wait_exit.done():
                self._signal(rt, signal.SIGKILL)
                wait_exit.cancel()
        # Whatever else is left in the process group (children) goes too, as with a container.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rt.process.pid, signal.SIGKILL)
        exit_code = 128 - code if code < 0 else code
        message = term_file.read_bytes()[:4096].decode(errors="replace")
        if not message and exit_code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            tail = "".join(rt.log_path.read_text(errors="replace").splitlines(keepends=True)[-80:])
            message = tail.encode()[-2048:].decode(errors="replace")
        rt.termination_message = message or None
        return exit_code

    async def _probe_loop(self, rt: PodRuntime, container: JsonDict, probe: JsonDict) -> None:
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        period = max(float(probe.get("periodSeconds", 10)), 0.1)
        timeout = float(probe.get("timeoutSeconds", 1))
        ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
        while True:
            ok = False
            try:
                if "httpGet" in probe:
                    get = probe["httpGet"]
                    port = ports.get(get["port"], get["port"])
                    url = f"{get.get('scheme', 'HTTP').lower()}://{rt.ip}:{port}{get.get('path', '/')}"
                    async with aiohttp.ClientSession() as session:
                        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                            ok = 200 <= resp.status < 400
                elif "tcpSocket" in probe:
                    port = probe["tcpSocket"]["port"]
                    port = ports.get(port, port)
                    _, writer = await asyncio.wait_for(asyncio.open_connection(rt.ip, int(port)), timeout)
                    writer.close()
                    ok = True
                elif "exec" in probe:
                    proc = await asyncio.create_subprocess_exec(
                        *probe["exec"]["command"],
                        cwd=str(rt.root / "root"),
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )
                    ok = await asyncio.wait_for(proc.wait(), timeout) == 0
                else:
                    ok = True
            except Exception:  # noqa: BLE001 - a failed probe
                ok = False
            if ok != rt.ready and rt.process is not None and rt.process.returncode is None:
                rt.ready = ok
                await self._patch_pod_status(rt, self._status(rt, container))
            await asyncio.sleep(period)


class _ContainerConfigError(Exception):
    """A container's config (env from a ConfigMap or Secret) cannot be resolved yet."""


class _Deleted(Exception):
    """The pod was deleted while the kubelet waited to start a container."""


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables are replaced, $$ escapes, others stay."""

    def replace(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, value)
