"""Kueue: trial Jobs that wait in a LocalQueue, and what their Workloads say about why.

With `spec.queue.name` a trial's Job carries the `kueue.x-k8s.io/queue-name` label and is created
suspended (builders.build_job); Kueue admits it by unsuspending it, and preempts it by suspending it
again, whereupon the job controller deletes its pods (SIGTERM: the trainer checkpoints) and, once
re-admitted, creates new ones that resume the trial's own checkpoint. The operator never touches
`spec.suspend` of a Job once created: that is Kueue's.

A suspended Job is a trial waiting, not running and not stuck: it is observed as Pending with
Kueue's own words for why (`reason`), and with no `pending_since`, so
spec.trialTemplate.pendingTimeoutSeconds counts only from admission (`admitted_at`).

Kueue keeps the why in the Job's Workload (kueue.x-k8s.io/v1beta2, namespaced), which it creates
for the Job with the label `kueue.x-k8s.io/job-uid: <the Job's uid>` and an ownerReference to it.
`Workloads.of` reads them in one list per cycle, and only in a cycle where some queued Job is
suspended (or admitted with no pods yet): a label selector `kueue.x-k8s.io/job-uid in (...)` on
exactly those Jobs' uids, so the API server filters and the answer holds only our Workloads, however
many other teams queue in the namespace. Workloads carry no label of ours (Kueue copies Job labels
only when configured to), so this is the one selector that works everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from trainpilot.api.experiment import AgentExperimentSpec
from trainpilot.runtime.base import RuntimeFailure
from trainpilot.runtime.kubernetes.api import KubeApi, NotFound, PermanentApiError

logger = logging.getLogger(__name__)

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
WORKLOADS = "workloads"
LABEL_QUEUE_NAME = "kueue.x-k8s.io/queue-name"
LABEL_PRIORITY_CLASS = "kueue.x-k8s.io/priority-class"
LABEL_JOB_UID = "kueue.x-k8s.io/job-uid"

# Workload condition types (Kueue's apis/kueue/v1beta2).
QUOTA_RESERVED = "QuotaReserved"
ADMITTED = "Admitted"
EVICTED = "Evicted"
PREEMPTED = "Preempted"
EVICTED_BY_PREEMPTION = "Preempted"  # the Evicted condition's reason when a preemption evicted it

NO_WORKLOAD_API = "suspended, waiting for Kueue (no Workload API: is Kueue installed?)"


def job_labels(spec: AgentExperimentSpec) -> dict[str, str]:
    """The labels that put a trial's Job in the experiment's LocalQueue (none without spec.queue.name)."""
    queue = spec.queue
    if queue.name is None:
        return {}
    labels = {LABEL_QUEUE_NAME: queue.name}
    if queue.priority_class is not None:
        labels[LABEL_PRIORITY_CLASS] = queue.priority_class
    return labels


def queue_of(job: Any) -> str | None:
    """The LocalQueue a Job (a kubernetes client model) waits in, None when Kueue does not manage it."""
    return (job.metadata.labels or {}).get(LABEL_QUEUE_NAME) or None


def is_suspended(job: Any) -> bool:
    return bool(job.spec and job.spec.suspend)


def _conditions(workload: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    found = ((workload or {}).get("status") or {}).get("conditions") or []
    return {c["type"]: c for c in found if isinstance(c, dict) and "type" in c}


def _true(condition: dict[str, Any] | None) -> bool:
    return condition is not None and condition.get("status") == "True"


def _said(condition: dict[str, Any]) -> str:
    return str(condition.get("message") or condition.get("reason") or "")


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def reason(job: Any, workload: dict[str, Any] | None, unavailable: str | None, checkpoints: bool) -> str:
    """Why the suspended Job `job` of LocalQueue `queue_of(job)` does not run, in Kueue's words.

    `unavailable`: why the Workloads could not be read this cycle (None when they were);
    `checkpoints`: whether the trial has a checkpoint volume to resume from."""
    if unavailable is not None:
        return unavailable
    queue = queue_of(job)
    if workload is None:
        return f"suspended, waiting for Kueue to create its Workload (LocalQueue {queue})"
    conditions = _conditions(workload)
    evicted, preempted = conditions.get(EVICTED), conditions.get(PREEMPTED)
    resumes = (
        "resumes from its checkpoint when re-admitted"
        if checkpoints
        else "starts over when re-admitted (no checkpoint volume)"
    )
    # Preempted (or evicted: PodsReadyTimeout, a stopped ClusterQueue, a deactivated Workload, ...):
    # Kueue suspended the Job, the job controller stops its pods (they checkpoint on SIGTERM), and
    # it runs again once re-admitted. Both stay True until Kueue reserves quota for it again.
    if preempted is not None and _true(preempted):
        return f"preempted by Kueue ({_said(preempted)}); {resumes}"
    if evicted is not None and _true(evicted):
        if evicted.get("reason") == EVICTED_BY_PREEMPTION:
            return f"preempted by Kueue ({_said(evicted)}); {resumes}"
        return f"evicted by Kueue ({evicted.get('reason')}: {evicted.get('message') or ''}); {resumes}"
    admitted = conditions.get(ADMITTED)
    if _true(admitted):
        return f"admitted by Kueue (LocalQueue {queue}); waiting for Kueue to unsuspend its Job"
    reserved = conditions.get(QUOTA_RESERVED)
    if _true(reserved) and admitted is not None:
        why = _said(admitted)  # quota reserved, admission checks pending
    elif reserved is not None:
        why = _said(reserved)
    else:
        why = "not considered yet"
    return f"waiting for Kueue to admit it in LocalQueue {queue}: {why}"


def admitted_at(workload: dict[str, Any] | None) -> datetime | None:
    """When Kueue last admitted the Workload (its Admitted=True condition), None when it is not admitted."""
    admitted = _conditions(workload).get(ADMITTED)
    return _time(admitted.get("lastTransitionTime")) if _true(admitted) and admitted else None


@dataclass
class Listed:
    """The Workloads of some Jobs, by Job uid; `unavailable` says why there are none when they could
    not be read (no Workload API, refused, no answer), None when they were."""

    by_job: dict[str, dict[str, Any]]
    unavailable: str | None = None


class Workloads:
    """Reads the Workloads of one experiment's Jobs (one list per cycle at most)."""

    def __init__(self, api: KubeApi, namespace: str, experiment: str) -> None:
        self.api = api
        self.namespace = namespace
        self.experiment = experiment
        self._warned: set[str] = set()

    async def of(self, jobs: list[Any]) -> Listed:
        uids = sorted({str(job.metadata.uid) for job in jobs if job.metadata.uid})
        if not uids:
            return Listed({})  # no request
        selector = f"{LABEL_JOB_UID} in ({','.join(uids)})"
        try:
            listing = await self.api.call(
                f"Kueue Workloads of {len(uids)} trial Job(s)",
                self.api.custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                WORKLOADS,
                label_selector=selector,
            )
        except NotFound:
            self._warn_once("absent", f"no {GROUP}/{VERSION} Workload API (is Kueue installed?)")
            return Listed({}, NO_WORKLOAD_API)
        except PermanentApiError as failure:  # 403: the chart's rule is missing (an older release)
            self._warn_once(f"refused {failure.status}", f"Workloads cannot be read: {failure}")
            return Listed({}, f"suspended, waiting for Kueue (its Workload cannot be read: {failure.api_message})")
        except RuntimeFailure as failure:  # no answer, 5xx: the next cycle tries again
            logger.warning("%s/%s: Kueue Workloads not read this cycle: %s", self.namespace, self.experiment, failure)
            return Listed({}, f"suspended, waiting for Kueue (its Workload not read this cycle: {failure})")
        self._warned.clear()  # readable again: a later refusal is worth a new warning
        by_job: dict[str, dict[str, Any]] = {}
        for item in (listing or {}).get("items") or []:
            uid = ((item.get("metadata") or {}).get("labels") or {}).get(LABEL_JOB_UID)
            if uid in uids:
                by_job[uid] = item
        return Listed(by_job)

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        logger.warning(
            "%s/%s: %s; suspended trials are reported as waiting for Kueue without its reason",
            self.namespace,
            self.experiment,
            message,
        )
