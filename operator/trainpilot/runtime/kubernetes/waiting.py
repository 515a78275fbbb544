"""Why a trial's pods are not running, and since when, as Kubernetes reports it.

The facts for core.pending, which fails a trial that waits past spec.trialTemplate.pendingTimeoutSeconds:
the scheduler's PodScheduled=False condition (Unschedulable, with its "0/3 nodes are available: ..."
message), or the kubelet's waiting state of a container (ErrImagePull, ImagePullBackOff,
CreateContainerConfigError, ...). A suspended Job (queued, by Kueue say) is not waiting to run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from trainpilot.core.observation import Observation
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


def note_pending(observation: Observation, jobs: dict[str, Any], pods: list[Any]) -> None:
    """Set pending_since/pending_reason on each observed trial whose Job has a pod waiting to run,
    or has made no pod at all (the job controller cannot create them: a quota, an admission webhook)."""
    for name, seen in list(observation.trials.items()):
        job = jobs.get(name)
        if job is None or (job.spec and job.spec.suspend) or _finished(job):
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
        observation.trials[name] = seen.model_copy(update={"pending_since": _rfc3339(since), "pending_reason": why})


def _created(obj: Any) -> datetime:
    created = obj.metadata.creation_timestamp
    return created if isinstance(created, datetime) else datetime.now(UTC)
