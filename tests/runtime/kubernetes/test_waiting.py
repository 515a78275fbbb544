"""Why a trial's pods are not running, read from pod and Job objects as the API server returns them."""

from __future__ import annotations

from datetime import UTC, datetime

from kubernetes import client

from trainpilot.core.observation import Observation, TrialObservation
from trainpilot.runtime.kubernetes.waiting import note_pending, pod_waiting_reason

JOB_UID = "job-uid"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def pod(name: str, minute: int, *, phase: str = "Pending", conditions=(), waiting=None, disrupted=False, job=JOB_UID):
    statuses = None
    if waiting is not None:
        state = client.V1ContainerState(waiting=client.V1ContainerStateWaiting(reason=waiting[0], message=waiting[1]))
        statuses = [
            client.V1ContainerStatus(name="trainer", image="x", image_id="", ready=False, restart_count=0, state=state)
        ]
    conds = [client.V1PodCondition(type=t, status=s, reason=r, message=m) for t, s, r, m in conditions]
    if disrupted:
        conds.append(client.V1PodCondition(type="DisruptionTarget", status="True", reason="EvictionByEvictionAPI"))
    ref = client.V1OwnerReference(api_version="batch/v1", kind="Job", name="t", uid=job, controller=True)
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, creation_timestamp=T0.replace(minute=minute), owner_references=[ref]),
        status=client.V1PodStatus(phase=phase, conditions=conds, container_statuses=statuses),
    )


def job(suspend: bool = False, minute: int = 0):
    return client.V1Job(
        metadata=client.V1ObjectMeta(name="t", uid=JOB_UID, creation_timestamp=T0.replace(minute=minute)),
        spec=client.V1JobSpec(template=client.V1PodTemplateSpec(), suspend=suspend),
        status=client.V1JobStatus(),
    )


UNSCHEDULABLE = ("PodScheduled", "False", "Unschedulable", "0/3 nodes are available: 3 Insufficient cpu.")


def test_the_scheduler_and_the_kubelet_say_why():
    assert pod_waiting_reason(pod("a", 0, conditions=[UNSCHEDULABLE])) == (
        "Unschedulable: 0/3 nodes are available: 3 Insufficient cpu.",
        True,
    )
    pulling = pod("b", 0, waiting=("ImagePullBackOff", 'Back-off pulling image "x"'))
    assert pod_waiting_reason(pulling) == ('container trainer: ImagePullBackOff: Back-off pulling image "x"', True)
    assert pod_waiting_reason(pod("c", 0, waiting=("ContainerCreating", None))) == (
        "container trainer: ContainerCreating",
        False,
    )


def observed(*pods, the_job=None):
    observation = Observation(time="t", trials={"t": TrialObservation(name="t", phase="Pending")})
    note_pending(observation, {"t": the_job if the_job is not None else job()}, list(pods))
    return observation.trials["t"]


def test_the_oldest_waiting_pod_dates_it_and_the_most_telling_reason_explains_it():
    seen = observed(
        pod("starting", 1, waiting=("ContainerCreating", None)),
        pod("stuck", 3, conditions=[UNSCHEDULABLE]),
        pod("running", 0, phase="Running"),
    )
    assert seen.pending_since == "2026-01-01T00:01:00Z"
    assert seen.pending_reason == "pod stuck: Unschedulable: 0/3 nodes are available: 3 Insufficient cpu."


def test_running_replaced_queued_and_foreign_pods_are_not_waiting():
    assert observed(pod("running", 0, phase="Running")).pending_since is None
    # An evicted pod is history once it stopped; its replacement is what counts.
    assert (
        observed(pod("evicted", 0, phase="Failed", disrupted=True), pod("new", 5, phase="Running")).pending_since
        is None
    )
    # A suspended Job waits in a queue (Kueue), which is not a pod that cannot start.
    assert observed(pod("queued", 0), the_job=job(suspend=True)).pending_since is None
    # Pods of another Job (an earlier incarnation's) say nothing about this one ... which has none at all.
    seen = observed(pod("other", 0, conditions=[UNSCHEDULABLE], job="another-uid"), the_job=job(minute=7))
    assert seen.pending_since == "2026-01-01T00:07:00Z" and "has created no pods" in seen.pending_reason
