"""What became of the Jobs that delete finished trials' checkpoints (builders.build_cleanup_job).

A clean-up that cannot run is otherwise invisible: its pod waits (a ReadWriteOnce claim that another
node holds, a claim gone) or fails, and the checkpoints stay on the claim. Each cycle reports the
clean-ups not yet done (core.retention.stalled turns them into RetentionApplied=False). A Job that
succeeded is deleted here, so nothing is left behind; one that failed stays, as the record of what
was not deleted, until someone deletes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from trainpilot.core.observation import CleanUpObservation
from trainpilot.runtime.kubernetes import builders
from trainpilot.runtime.kubernetes.api import KubeApi
from trainpilot.runtime.kubernetes.ownership import controller_uid
from trainpilot.runtime.kubernetes.waiting import pod_waiting_reason


async def observe(
    api: KubeApi, namespace: str, trials: Iterable[str], jobs: Mapping[str, Any], pods: Iterable[Any]
) -> dict[str, CleanUpObservation]:
    """By trial (of `trials`, those whose checkpoints were ordered deleted): its clean-up while it has
    not succeeded. `jobs` are the experiment's Jobs by name, `pods` its pods."""
    pods = list(pods)
    seen: dict[str, CleanUpObservation] = {}
    for trial in trials:
        job = jobs.get(builders.cleanup_job_name(trial))
        if job is None:
            continue  # done (and deleted), or not created yet
        if _condition(job, "Complete") or (job.status and job.status.succeeded):
            await api.delete_if_present(
                f"job {job.metadata.name}",
                api.batch.delete_namespaced_job,
                job.metadata.name,
                namespace,
                body={"propagationPolicy": "Background"},
            )
            continue
        failed = _condition(job, "Failed")
        if failed is not None:
            reason = f"{failed.reason or 'Failed'}: {failed.message}" if failed.message else failed.reason or ""
        else:
            reason = next(
                (pod_waiting_reason(pod)[0] for pod in pods if controller_uid(pod) == job.metadata.uid),
                "no pod yet",
            )
        seen[trial] = CleanUpObservation(
            job=job.metadata.name,
            directory=_directory(job),
            since=_rfc3339(job.metadata.creation_timestamp),
            failed=failed is not None,
            reason=reason,
        )
    return seen


def _condition(job: Any, type_: str) -> Any | None:
    for condition in (job.status.conditions if job.status else None) or []:
        if condition.type == type_ and condition.status == "True":
            return condition
    return None


def _directory(job: Any) -> str:
    """The folder the Job deletes: the last word of its `rm -rf -- DIR`."""
    [container] = job.spec.template.spec.containers
    return str(container.command[-1])


def _rfc3339(moment: Any) -> str:
    if not isinstance(moment, datetime):
        moment = datetime.now(UTC)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
