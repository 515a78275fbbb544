"""
A test-only Kueue: the part of Kueue's controllers that a batch/v1 Job in a LocalQueue meets,
over the emulated API server (the way tests/support/fake_node.py plays the job controller and the
kubelet). Never a feature. Shapes and words follow Kueue's own sources (kubernetes-sigs/kueue,
apis/kueue/v1beta2, pkg/controller/jobframework, pkg/workload, pkg/scheduler/preemption):

* **the Job reconciler** creates one Workload (kueue.x-k8s.io/v1beta2) for each Job that carries
  the ``kueue.x-k8s.io/queue-name`` label: named ``job-<job name>-<5 hex>`` (sha1 of kind, group,
  name and uid, as jobframework.GetWorkloadNameForOwnerWithGVK), controlled by the Job
  (ownerReference, blockOwnerDeletion), labelled ``kueue.x-k8s.io/job-uid: <job uid>``, with the
  ``kueue.x-k8s.io/resource-in-use`` finalizer (removed once its Job is gone), ``spec.queueName``,
  ``spec.podSets`` (one, ``main``: the Job's pod template without the job controller's labels,
  count = min(parallelism, completions), a topologyRequest naming the completion-index label),
  ``spec.priorityClassRef`` and ``spec.priority`` from the Job's ``kueue.x-k8s.io/priority-class``
  label (a WorkloadPriorityClass of ``priority_classes``; an unknown one gets no Workload, as in
  Kueue, which reports WorkloadPriorityClassNotFound), ``spec.active: true``; once the Job is
  finished, the Workload's ``Finished`` condition (reason Succeeded / Failed, the Job's message).
* **the scheduler**, until the test says otherwise, finds no room: ``QuotaReserved=False``, reason
  WaitingForQuota, with the flavor assigner's message (``pending_message``). ``admit(job)``
  reserves quota and admits it (``status.admission``, ``QuotaReserved=True`` "Quota reserved in
  ClusterQueue <cq>", ``Admitted=True`` "The workload is admitted"; any Evicted/Preempted turn
  False, "Previously: ..."), and the Job reconciler unsuspends the Job. Node selectors of a
  flavor are not injected (the default flavor here has none).
* **preemption**: ``preempt(job)`` does what Kueue's preemptor and Job reconciler do to a victim:
  ``Evicted=True`` (reason Preempted) and ``Preempted=True`` (reason InClusterQueue), both with
  the preemptor's message; the Job is suspended and its ``status.startTime`` cleared; once the Job
  has no active pod, its admission is cleared (``Requeued=True``, ``QuotaReserved=False`` reason
  PendingEvaluation, ``Admitted=False`` reason NoReservation "The workload has no reservation").
  ``evict(job, reason, message)`` is the same for other eviction reasons (PodsReadyTimeout, ...).
  ``admit(job)`` again re-admits it.

Condition updates follow apimeta.SetStatusCondition: lastTransitionTime changes only when the
status does. ``sync()`` runs one pass; ``start()`` runs it every ``interval`` seconds in a thread
(``stop()`` ends it). It talks to the API server as a cluster admin (the test's kubeconfig).
The Workload resource must be served first: ``serve_workloads(kube)`` (the emulator's discovery
then lists it, as a cluster with Kueue's CRDs installed does); without it, it is absent.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import logging
import threading
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import kubernetes

from tests.support.emulator import ResourceSpec
from tests.support.quantity import parse_quantity

if TYPE_CHECKING:
    from tests.support.kube import Kube

logger = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "kueue.x-k8s.io", "v1beta2", "workloads"
LABEL_QUEUE_NAME = "kueue.x-k8s.io/queue-name"
LABEL_PRIORITY_CLASS = "kueue.x-k8s.io/priority-class"
LABEL_JOB_UID = "kueue.x-k8s.io/job-uid"
RESOURCE_IN_USE = "kueue.x-k8s.io/resource-in-use"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# The job controller's labels that Kueue's podSets leave out (job.cleanLabels keeps batch.kubernetes.io/job-name).
MANAGED_LABELS = ("job-name", "controller-uid", "batch.kubernetes.io/controller-uid")
PENDING_MESSAGE = (
    "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor default-flavor, 1 more needed"
)

WORKLOADS = ResourceSpec(
    group=GROUP,
    version=VERSION,
    plural=PLURAL,
    kind="Workload",
    namespaced=True,
    singular="workload",
    shortnames=("wl",),
    categories=("kueue",),
    subresources=("status",),
    custom=True,  # served from Kueue's CRD
)


def serve_workloads(kube: Kube) -> None:
    """Serve kueue.x-k8s.io/v1beta2 workloads on the emulated cluster, as Kueue's CRDs do."""
    kube.call(lambda: kube.emulator.register(WORKLOADS))


def workload_name(job_name: str, job_uid: str) -> str:
    """jobframework.GetWorkloadNameForOwnerWithGVK for a batch/v1 Job (253 characters at most)."""
    digest = hashlib.sha1("\n".join(["Job", "batch", job_name, job_uid]).encode()).hexdigest()
    return f"{f'job-{job_name}'[: 253 - 1 - 5]}-{digest[:5]}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]], type: str, status: str, reason: str, message: str, now: str, generation: int
) -> list[dict[str, Any]]:
    """apimeta.SetStatusCondition: replace the condition of `type`, keeping its lastTransitionTime
    unless its status changes."""
    old = next((c for c in conditions if c["type"] == type), None)
    changed_at = old["lastTransitionTime"] if old is not None and old["status"] == status else now
    new = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message[: 32 * 1024],
        "lastTransitionTime": changed_at,
        "observedGeneration": generation,
    }
    return [new if c["type"] == type else c for c in conditions] if old is not None else [*conditions, new]


def condition(workload: Mapping[str, Any], type: str) -> dict[str, Any] | None:
    return next((c for c in (workload.get("status") or {}).get("conditions") or [] if c["type"] == type), None)


def _is_true(workload: Mapping[str, Any], type: str) -> bool:
    found = condition(workload, type)
    return found is not None and found["status"] == "True"


def _quantity(value: Decimal) -> str:
    return str(int(value)) if value == value.to_integral_value() else str(value.normalize())


class FakeKueue:
    """Kueue for the Jobs of one namespace (see the module docs)."""

    def __init__(
        self,
        kube: Kube,
        namespace: str = "default",
        cluster_queue: str = "cluster-queue",
        flavor: str = "default-flavor",
        priority_classes: Mapping[str, int] | None = None,
        pending_message: str = PENDING_MESSAGE,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.cluster_queue = cluster_queue
        self.flavor = flavor
        self.priority_classes = dict(priority_classes or {})
        self.pending_message = pending_message
        self._client = kube.api_client()
        self.batch = kubernetes.client.BatchV1Api(self._client)
        self.custom = kubernetes.client.CustomObjectsApi(self._client)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    # -- reading ------------------------------------------------------------------------------

    def job(self, name: str) -> Any:
        return self.batch.read_namespaced_job(name, self.namespace)

    def workloads(self) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)["items"]

    def workload(self, job_name: str) -> dict[str, Any] | None:
        """The Workload of the Job named `job_name`, found as Kueue finds it: by the Job's uid."""
        uid = self.job(job_name).metadata.uid
        found = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, label_selector=f"{LABEL_JOB_UID}={uid}"
        )["items"]
        return found[0] if found else None

    # -- the reconcilers ------------------------------------------------------------------------

    def sync(self) -> None:
        """One pass of Kueue's Job and Workload reconcilers over the namespace."""
        with self._lock:
            jobs = self.batch.list_namespaced_job(self.namespace, label_selector=LABEL_QUEUE_NAME).items
            by_uid = {w["metadata"].get("labels", {}).get(LABEL_JOB_UID): w for w in self.workloads()}
            for job in jobs:
                if job.metadata.deletion_timestamp:
                    continue
                workload = by_uid.get(job.metadata.uid)
                if workload is None:
                    self._create_workload(job)
                elif _is_true(workload, "Evicted") and workload.get("status", {}).get("admission") is not None:
                    if job.spec.suspend and not (job.status and job.status.active):
                        self._clear_admission(workload)
                self._finish(job, workload)
            live = {job.metadata.uid for job in jobs if not job.metadata.deletion_timestamp}
            for uid, workload in by_uid.items():
                meta = workload["metadata"]
                if (uid not in live or meta.get("deletionTimestamp")) and RESOURCE_IN_USE in (
                    meta.get("finalizers") or []
                ):
                    rest = [f for f in meta["finalizers"] if f != RESOURCE_IN_USE]
                    with contextlib.suppress(kubernetes.client.ApiException):
                        self.custom.patch_namespaced_custom_object(
                            GROUP, VERSION, self.namespace, PLURAL, meta["name"], {"metadata": {"finalizers": rest}}
                        )

    def _create_workload(self, job: Any) -> None:
        labels = job.metadata.labels or {}
        spec: dict[str, Any] = {"queueName": labels[LABEL_QUEUE_NAME], "podSets": [self._pod_set(job)], "active": True}
        priority_class = labels.get(LABEL_PRIORITY_CLASS)
        if priority_class is not None:
            if priority_class not in self.priority_classes:
                logger.info(
                    "WorkloadPriorityClass %r not found: no Workload for Job %s", priority_class, job.metadata.name
                )
                return
            spec["priorityClassRef"] = {"group": GROUP, "kind": "WorkloadPriorityClass", "name": priority_class}
            spec["priority"] = self.priority_classes[priority_class]
        else:
            spec["priority"] = 0
        name = workload_name(job.metadata.name, job.metadata.uid)
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Workload",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {LABEL_JOB_UID: job.metadata.uid},
                "finalizers": [RESOURCE_IN_USE],
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": job.metadata.name,
                        "uid": job.metadata.uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
        }
        try:
            created = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
        except kubernetes.client.ApiException as error:
            if error.status == 409:
                return
            raise
        # The scheduler's first look: no room in the ClusterQueue (until the test admits it).
        now = _now()
        conditions = set_condition(
            [], "QuotaReserved", "False", "WaitingForQuota", self.pending_message, now, self._generation(created)
        )
        self._write_status(name, {"conditions": conditions})

    def _pod_set(self, job: Any) -> dict[str, Any]:
        template = kubernetes.client.ApiClient().sanitize_for_serialization(job.spec.template)
        labels = (template.get("metadata") or {}).get("labels") or {}
        for label in MANAGED_LABELS:
            labels.pop(label, None)
        parallelism = job.spec.parallelism if job.spec.parallelism is not None else 1
        count = min(parallelism, job.spec.completions) if job.spec.completions is not None else parallelism
        return {
            "name": "main",
            "template": template,
            "count": count,
            "topologyRequest": {"podIndexLabel": COMPLETION_INDEX},
        }

    def _finish(self, job: Any, workload: dict[str, Any] | None) -> None:
        if workload is None or _is_true(workload, "Finished"):
            return
        for cond in (job.status.conditions if job.status else None) or []:
            if cond.type in ("Complete", "Failed") and cond.status == "True":
                reason = "Succeeded" if cond.type == "Complete" else "Failed"
                self._set(workload, ("Finished", "True", reason, cond.message or ""))
                return

    def _clear_admission(self, workload: dict[str, Any]) -> None:
        """The Job reconciler, once an evicted Workload's Job is no longer active."""
        evicted = condition(workload, "Evicted") or {}
        reason, message = evicted.get("reason", ""), evicted.get("message", "")
        requeued = "True" if reason in ("Preempted", "NodeFailures") else "False"
        self._set(
            workload,
            ("Requeued", requeued, reason, message),
            ("QuotaReserved", "False", "PendingEvaluation", message),
            ("Admitted", "False", "NoReservation", "The workload has no reservation"),
            admission=None,
        )

    # -- what the test makes happen -------------------------------------------------------------

    def admit(self, job_name: str) -> dict[str, Any]:
        """Reserve quota for the Job's Workload and admit it; the Job reconciler unsuspends the Job."""
        with self._lock:
            workload = self._require(job_name)
            pod_set = workload["spec"]["podSets"][0]
            usage = self._usage(pod_set)
            admission = {
                "clusterQueue": self.cluster_queue,
                "podSetAssignments": [
                    {
                        "name": pod_set["name"],
                        "flavors": {resource: self.flavor for resource in usage},
                        "resourceUsage": usage,
                        "count": pod_set["count"],
                    }
                ],
            }
            updates: list[tuple[str, str, str, str]] = [
                ("QuotaReserved", "True", "QuotaReserved", f"Quota reserved in ClusterQueue {self.cluster_queue}")
            ]
            for kind in ("Evicted", "Preempted"):  # SetQuotaReservation's resetActiveCondition
                previous = condition(workload, kind)
                if previous is not None and previous["status"] == "True":
                    updates.append((kind, "False", "QuotaReserved", f"Previously: {previous['message']}"))
            updates.append(("Admitted", "True", "Admitted", "The workload is admitted"))
            admitted = self._set(workload, *updates, admission=admission)
            self.batch.patch_namespaced_job(job_name, self.namespace, {"spec": {"suspend": False}})
            return admitted

    def preempt(self, job_name: str, preemptor_uid: str = "preemptor-workload-uid") -> dict[str, Any]:
        """Preempt the Job's Workload to make room for another (of higher priority, say)."""
        message = (
            f"Preempted to accommodate a workload (UID: {preemptor_uid}, JobUID: preemptor-job-uid) due to "
            f"prioritization in the ClusterQueue; preemptor path: /{self.cluster_queue}; "
            f"preemptee path: /{self.cluster_queue}"
        )
        return self.evict(job_name, "Preempted", message, preempted_reason="InClusterQueue")

    def evict(self, job_name: str, reason: str, message: str, preempted_reason: str | None = None) -> dict[str, Any]:
        """Evict the Job's Workload (reason Preempted, PodsReadyTimeout, ClusterQueueStopped, ...):
        the Job reconciler suspends the Job; `sync()` clears the admission once its pods are gone."""
        with self._lock:
            workload = self._require(job_name)
            updates = [("Evicted", "True", reason, message)]
            if preempted_reason is not None:
                updates.append(("Preempted", "True", preempted_reason, message))
            evicted = self._set(workload, *updates)
            # jobframework's stopJob: suspend, then reset startTime so the template may be restored.
            self.batch.patch_namespaced_job(job_name, self.namespace, {"spec": {"suspend": True}})
            with contextlib.suppress(kubernetes.client.ApiException):
                self.batch.patch_namespaced_job_status(job_name, self.namespace, {"status": {"startTime": None}})
            return evicted

    # -- plumbing -------------------------------------------------------------------------------

    def _require(self, job_name: str) -> dict[str, Any]:
        workload = self.workload(job_name)
        if workload is None:
            self.sync()
            workload = self.workload(job_name)
        assert workload is not None, f"Kueue made no Workload for Job {job_name}"
        return workload

    def _usage(self, pod_set: Mapping[str, Any]) -> dict[str, str]:
        totals: dict[str, Decimal] = {}
        for container in (pod_set["template"].get("spec") or {}).get("containers") or []:
            resources = container.get("resources") or {}
            wanted = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
            for resource, value in wanted.items():
                totals[resource] = totals.get(resource, Decimal(0)) + parse_quantity(str(value)) * pod_set["count"]
        return {resource: _quantity(value) for resource, value in sorted(totals.items())}

    @staticmethod
    def _generation(workload: Mapping[str, Any]) -> int:
        return int(workload["metadata"].get("generation") or 1)

    def _set(self, workload: dict[str, Any], *updates: tuple[str, str, str, str], **fields: Any) -> dict[str, Any]:
        now = _now()
        conditions = copy.deepcopy((workload.get("status") or {}).get("conditions") or [])
        for type, status, reason, message in updates:
            conditions = set_condition(conditions, type, status, reason, message, now, self._generation(workload))
        return self._write_status(workload["metadata"]["name"], {"conditions": conditions, **fields})

    def _write_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, name, {"status": status}
        )

    # -- in the background ------------------------------------------------------------------------

    def start(self, interval: float = 0.2) -> FakeKueue:
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.sync()
                except Exception as error:  # noqa: BLE001 - keep reconciling, like a controller
                    self.errors.append(repr(error))

        self._thread = threading.Thread(target=run, name="fake-kueue", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


@contextlib.contextmanager
def running_kueue(kube: Kube, **options: Any) -> Iterator[FakeKueue]:
    """Serve Workloads and run a FakeKueue in the background for the duration of the block."""
    serve_workloads(kube)
    kueue = FakeKueue(kube, **options).start()
    try:
        yield kueue
    finally:
        kueue.stop()
