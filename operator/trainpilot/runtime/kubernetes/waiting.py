"""Why a trial's pods are not running, and since when, as Kubernetes reports it.

The facts for core.pending, which fails a trial that waits past spec.trialTemplate.pendingTimeoutSeconds:
the scheduler's PodScheduled=False condition (Unschedulable, with its "0/3 nodes are available: ..."
message), or the kubelet's waiting state of a container (ErrImagePull, ImagePullBackOff,
CreateContainerConfigError, ...).

A suspended Job (queued by Kueue, or preempted by it and waiting to be re-admitted) is not waiting
to run in that sense: its trial gets a `pending_reason` (Kueue's, see kueue.reason) and no
`pending_since`, so the timeout never fires while it is queued. Once the Job may run again, the wait
counts from then (Kueue's admission, the job controller's JobResumed), never from its creation.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from trainpilot.core.observation import Observation
from trainpilot.runtime.kubernetes import kueue
from trainpilot.runtime.kubernetes.ownership import controller_uid, was_replaced

# Waiting reasons that are the normal way to start; any other says what is wrong.
STARTING = frozenset({"ContainerCreating", "PodInitializing"})


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _said(reason: str | None, message: str | None) -> str:
    return f"{reason}: {message}" if reason and message else (reason or message or "")


def pod_waiting_reason(pod: Any) -> tuple[str, bool]:
    """(what keeps the pod from running, whether that is a problem rather than a normal start)."""
    status = pod.status
    for condition in (status.conditions if status else None) or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return _said(condition.reason or "Unschedulable", condition.message), True
    statuses = ((status.init_container_statuses or []) + (status.container_statuses or [])) if status else []
    for container in statuses:
        waiting = container.state.waiting if container.state else None
        if waiting is not None and waiting.reason not in STARTING:
            return f"container {container.name}: {_said(waiting.reason, waiting.message)}", True
    for container in statuses:
        waiting = container.state.waiting if container.state else None
        if waiting is not None:
            return f"container {container.name}: {_said(waiting.reason, waiting.message)}", False
    return "Pending", False


def _waiting(pod: Any) -> bool:
    phase = pod.status.phase if pod.status else None
    return phase in (None, "Pending") and not pod.metadata.deletion_timestamp


def _finished(job: Any) -> bool:
    conditions = (job.status.conditions if job.status else None) or []
    return any(c.type in ("Complete", "Failed") and c.status == "True" for c in conditions)


def wants_workload(job: Any, pods: Iterable[Any]) -> bool:
    """Whether this cycle needs the Workload of `job`: a Kueue Job, not finished, that is suspended
    (why: Kueue says) or admitted with no pod yet (since when it may run: Kueue's admission)."""
    if kueue.queue_of(job) is None or _finished(job):
        return False
    return kueue.is_suspended(job) or not any(controller_uid(pod) == job.metadata.uid for pod in pods)


def note_pending(
    observation: Observation,
    jobs: dict[str, Any],
    pods: list[Any],
    workloads: kueue.Listed | None = None,
    checkpoints: bool = False,
) -> None:
    """Set pending_since/pending_reason on each observed trial whose Job has a pod waiting to run,
    or has made no pod at all (the job controller cannot create them: a quota, an admission webhook);
    and only pending_reason on those whose Job is suspended (queued: `workloads` says why)."""
    workloads = workloads if workloads is not None else kueue.Listed({})
    now = _parse(observation.time) or datetime.now(UTC)
    for name, seen in list(observation.trials.items()):
        job = jobs.get(name)
        if job is None or _finished(job):
            continue
        workload = workloads.by_job.get(str(job.metadata.uid))
        if kueue.is_suspended(job):
            if kueue.queue_of(job) is not None:
                why = kueue.reason(job, workload, workloads.unavailable, checkpoints)
            else:
                why = f"Job {name} is suspended (spec.suspend: true); it starts when that is set to false"
            observation.trials[name] = seen.model_copy(update={"pending_since": None, "pending_reason": why})
            continue
        own = [pod for pod in pods if controller_uid(pod) == job.metadata.uid]
        waiting = sorted((pod for pod in own if _waiting(pod) and not was_replaced(pod)), key=_created)
        if waiting:
            reasons = [(pod, *pod_waiting_reason(pod)) for pod in waiting]
            pod, reason, _ = next((item for item in reasons if item[2]), reasons[0])
            since, why = _created(waiting[0]), f"pod {pod.metadata.name}: {reason}"
        elif not own:
            since, why = _created(job), f"Job {name} has created no pods (kubectl describe job {name} says why)"
        else:
            continue
        since = max(since, _free_since(job, workload, now) or since)
        observation.trials[name] = seen.model_copy(update={"pending_since": _rfc3339(since), "pending_reason": why})


def _free_since(job: Any, workload: dict[str, Any] | None, now: datetime) -> datetime | None:
    """When a Job that was suspended last became free to run: Kueue admitted its Workload, the job
    controller resumed it (Suspended=False, JobResumed) and reset its startTime. A Suspended=True
    condition on a Job no longer suspended is the controller not having caught up yet: free since
    about now. None when nothing says it ever waited."""
    times = [kueue.admitted_at(workload)]
    status = job.status
    for condition in (status.conditions if status else None) or []:
        if condition.type == "Suspended":
            times.append(condition.last_transition_time if condition.status == "False" else now)
    if status is not None:
        times.append(status.start_time)
    known = [_aware(moment) for moment in times if isinstance(moment, datetime)]
    return max(known) if known else None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _parse(value: str) -> datetime | None:
    try:
        return _aware(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except (AttributeError, ValueError):
        return None


def _created(obj: Any) -> datetime:
    created = obj.metadata.creation_timestamp
    return _aware(created) if isinstance(created, datetime) else datetime.now(UTC)
