"""Kueue: trials in a LocalQueue, on the emulated cluster with a fake node and a test-only Kueue
(tests/support/kueue.py) whose Workloads are shaped as Kueue v1beta2 writes them.

- A trial's Job carries the queue (and priority class) label and is created suspended; nothing in
  the operator ever unsuspends it.
- While Kueue holds it, the trial is Pending with Kueue's own reason, never "pending too long":
  spec.trialTemplate.pendingTimeoutSeconds counts only from admission.
- Preempted (Kueue suspends the Job again, the job controller stops its pods) is a wait, not a
  crash: Pending "preempted by Kueue (...)", no failure, no new trial, no GPU time while suspended;
  re-admitted, the same Job runs the trial to the end.
- The Workloads are read in one list per cycle, only while a queued Job is suspended; no Workload API
  (Kueue absent) or a refusal (403) degrade to a plain reason, never a failed observation.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes import client

from tests.runtime.kubernetes.test_stuck_trials import LaunchOnce
from tests.support.kube import Kube, aeventually
from tests.support.kueue import FakeKueue, condition, serve_workloads, set_condition, workload_name
from tests.support.localkit import FAKE_TRAINER
from tests.support.paths import QUICKSTART_PATH
from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentStatus, TrialStatus, parse_spec
from trainpilot.core.observation import Observation, TrialObservation
from trainpilot.core.state import PENDING_TIMEOUT_REASON
from trainpilot.loop import run_cycle
from trainpilot.runtime.clock import cluster_now
from trainpilot.runtime.kubernetes import builders, kueue, waiting
from trainpilot.runtime.kubernetes.api import KubeApi
from trainpilot.runtime.kubernetes.runtime import KubernetesRuntime

QUICKSTART = yaml.safe_load(QUICKSTART_PATH.read_text())
QUEUE = {"name": "team-a", "priorityClass": "high"}
FAKE = {"command": ["python", str(FAKE_TRAINER)], "pendingTimeoutSeconds": 5}  # 5 s: the least allowed


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


# ------------------------------------------------------------------------------------------ units


def spec_with(**changes: Any):
    raw = copy.deepcopy(QUICKSTART["spec"])
    raw.update(changes)
    return parse_spec(raw)


OWNER = {"metadata": {"name": "exp", "namespace": "team-a-ns", "uid": "exp-uid"}}


def test_a_queued_trials_job_carries_the_queue_labels_and_is_created_suspended() -> None:
    trial = TrialStatus(name="exp-t000", index=0)
    job = builders.build_job(OWNER, spec_with(queue=QUEUE), trial, "exp-d00000")
    assert job["metadata"]["labels"] == {
        contract.LABEL_EXPERIMENT: "exp",
        contract.LABEL_TRIAL: "exp-t000",
        "kueue.x-k8s.io/queue-name": "team-a",
        "kueue.x-k8s.io/priority-class": "high",
    }
    assert job["spec"]["suspend"] is True
    # The pods are Kueue's business only through their Job: a queue label there would make Kueue's
    # pod integration manage each pod as a Workload of its own.
    assert job["spec"]["template"]["metadata"]["labels"] == {
        contract.LABEL_EXPERIMENT: "exp",
        contract.LABEL_TRIAL: "exp-t000",
    }

    no_class = builders.build_job(OWNER, spec_with(queue={"name": "team-a"}), trial, "exp-d00000")
    assert "kueue.x-k8s.io/priority-class" not in no_class["metadata"]["labels"]
    plain = builders.build_job(OWNER, spec_with(), trial, "exp-d00000")
    assert "suspend" not in plain["spec"] and not any(k.startswith("kueue.") for k in plain["metadata"]["labels"])


def condition_list(*conditions: tuple[str, str, str, str], at: str = "2026-01-01T00:05:00Z") -> list[dict]:
    found: list[dict] = []
    for type, status, reason, message in conditions:
        found = set_condition(found, type, status, reason, message, at, 1)
    return found


def queued_job(suspend: bool = True, labels: dict | None = None, conditions=()) -> client.V1Job:
    return client.V1Job(
        metadata=client.V1ObjectMeta(
            name="exp-t000",
            uid="job-uid",
            labels={"kueue.x-k8s.io/queue-name": "team-a"} if labels is None else labels,
            creation_timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        ),
        spec=client.V1JobSpec(template=client.V1PodTemplateSpec(), suspend=suspend),
        status=client.V1JobStatus(conditions=list(conditions)),
    )


PREEMPTION = "Preempted to accommodate a workload (UID: w2, JobUID: j2) due to prioritization in the ClusterQueue"


@pytest.mark.parametrize(
    ("conditions", "checkpoints", "expected"),
    [
        ((), True, "waiting for Kueue to admit it in LocalQueue team-a: not considered yet"),
        (
            (("QuotaReserved", "False", "WaitingForQuota", "couldn't assign flavors to pod set main: no room"),),
            True,
            "waiting for Kueue to admit it in LocalQueue team-a: couldn't assign flavors to pod set main: no room",
        ),
        (
            (
                ("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue cq"),
                ("Admitted", "False", "UnsatisfiedAdmissionChecks", "The workload has not all checks ready"),
            ),
            True,
            "waiting for Kueue to admit it in LocalQueue team-a: The workload has not all checks ready",
        ),
        (
            (
                ("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue cq"),
                ("Admitted", "True", "Admitted", "The workload is admitted"),
            ),
            True,
            "admitted by Kueue (LocalQueue team-a); waiting for Kueue to unsuspend its Job",
        ),
        (
            (
                ("Evicted", "True", "Preempted", PREEMPTION),
                ("Preempted", "True", "InClusterQueue", PREEMPTION),
                ("QuotaReserved", "False", "PendingEvaluation", PREEMPTION),
            ),
            True,
            f"preempted by Kueue ({PREEMPTION}); resumes from its checkpoint when re-admitted",
        ),
        (
            (("Evicted", "True", "PodsReadyTimeout", "Exceeded the PodsReady timeout default/exp-t000"),),
            False,
            "evicted by Kueue (PodsReadyTimeout: Exceeded the PodsReady timeout default/exp-t000); "
            "starts over when re-admitted (no checkpoint volume)",
        ),
        (
            # Re-admitted after a preemption: the eviction is history ("Previously: ...").
            (
                ("Evicted", "False", "QuotaReserved", f"Previously: {PREEMPTION}"),
                ("Preempted", "False", "QuotaReserved", f"Previously: {PREEMPTION}"),
                ("QuotaReserved", "False", "WaitingForQuota", "couldn't assign flavors to pod set main: no room"),
            ),
            True,
            "waiting for Kueue to admit it in LocalQueue team-a: couldn't assign flavors to pod set main: no room",
        ),
    ],
)
def test_kueues_reason_is_read_from_the_workloads_conditions(conditions, checkpoints: bool, expected: str) -> None:
    workload = {"metadata": {"name": "job-exp-t000-abcde"}, "status": {"conditions": condition_list(*conditions)}}
    assert kueue.reason(queued_job(), workload, None, checkpoints) == expected


def test_without_its_workload_the_reason_says_what_is_missing() -> None:
    assert kueue.reason(queued_job(), None, None, True) == (
        "suspended, waiting for Kueue to create its Workload (LocalQueue team-a)"
    )
    assert kueue.reason(queued_job(), None, kueue.NO_WORKLOAD_API, True) == (
        "suspended, waiting for Kueue (no Workload API: is Kueue installed?)"
    )


def note(job: client.V1Job, workload: dict | None = None, pods=(), time: str = "2026-01-01T01:00:00Z"):
    observation = Observation(time=time, trials={"exp-t000": TrialObservation(name="exp-t000", phase="Pending")})
    listed = kueue.Listed({"job-uid": workload} if workload is not None else {})
    waiting.note_pending(observation, {"exp-t000": job}, list(pods), listed, checkpoints=True)
    return observation.trials["exp-t000"]


def test_a_suspended_job_has_a_reason_and_no_pending_since() -> None:
    workload = {"status": {"conditions": condition_list(("QuotaReserved", "False", "WaitingForQuota", "no room"))}}
    seen = note(queued_job(), workload)
    assert seen.pending_since is None
    assert seen.pending_reason == "waiting for Kueue to admit it in LocalQueue team-a: no room"
    # Suspended by someone else (no queue label): waiting all the same, and saying so.
    other = note(queued_job(labels={}))
    assert other.pending_since is None and "is suspended (spec.suspend: true)" in other.pending_reason


def test_an_admitted_job_waits_from_its_admission_not_from_its_creation() -> None:
    # Created at 00:00, admitted at 00:40 (Kueue's Admitted condition), no pod yet at 01:00.
    admitted = {
        "status": {
            "conditions": condition_list(
                ("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue cq"),
                ("Admitted", "True", "Admitted", "The workload is admitted"),
                at="2026-01-01T00:40:00Z",
            )
        }
    }
    assert note(queued_job(suspend=False), admitted).pending_since == "2026-01-01T00:40:00Z"
    # The job controller's word works too: Suspended=False (JobResumed) at 00:50.
    resumed = client.V1JobCondition(
        type="Suspended",
        status="False",
        reason="JobResumed",
        last_transition_time=datetime(2026, 1, 1, 0, 50, tzinfo=UTC),
    )
    assert note(queued_job(suspend=False, conditions=[resumed])).pending_since == "2026-01-01T00:50:00Z"
    # Unsuspended a moment ago, the job controller not caught up (Suspended still True): from now.
    stale = client.V1JobCondition(
        type="Suspended", status="True", reason="JobSuspended", last_transition_time=datetime(2026, 1, 1, tzinfo=UTC)
    )
    assert note(queued_job(suspend=False, conditions=[stale])).pending_since == "2026-01-01T01:00:00Z"


# ---------------------------------------------------------------------------- the emulated cluster


class Observing(KubernetesRuntime):
    """The Kubernetes runtime, keeping what it saw last (run_cycle hands only the status back)."""

    seen: Observation | None = None

    async def observe(self, status: AgentExperimentStatus) -> Observation:
        self.seen = await super().observe(status)
        return self.seen


class Queued:
    """An experiment on the emulated cluster whose cycles the test runs, as the operator's identity."""

    def __init__(self, kube: Kube, name: str, template: dict, queue: dict | None = QUEUE, **hyperparameters) -> None:
        body = copy.deepcopy(QUICKSTART)
        body["metadata"] = {"name": name, "namespace": "default"}
        body["spec"]["initialTrials"] = []
        body["spec"]["trialTemplate"].update(template)
        body["spec"]["trialTemplate"]["hyperparameters"].update(hyperparameters)
        if queue is not None:
            body["spec"]["queue"] = queue
        kube.apply(body)
        stored = kube.custom().get_namespaced_custom_object(
            contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, name
        )
        self.kube, self.name = kube, name
        self.spec = parse_spec(stored["spec"])
        self.runtime = Observing(KubeApi(kube.operator_api_client()), {"metadata": stored["metadata"]}, self.spec)
        self.status = AgentExperimentStatus()
        self.records: list = []

    async def cycle(self) -> TrialStatus:
        result = await run_cycle(self.name, self.spec, self.status, self.runtime, LaunchOnce(), cluster_now())
        self.status, self.records = result.status, self.records + result.records
        return self.status.trials[0]

    @property
    def seen(self) -> TrialObservation:
        """What the last cycle saw of the (only) trial, which it observes while the trial is active."""
        trial = self.status.trials[0]
        assert self.runtime.seen is not None and trial.name in self.runtime.seen.trials, (
            f"{trial.name} not observed: {trial.state} ({trial.message})"
        )
        return self.runtime.seen.trials[trial.name]

    async def cycles_for(self, seconds: float, check) -> tuple[TrialStatus, int]:
        """Cycle every 0.5 s for `seconds`, calling check(trial, seen) after each: the last trial
        status, and how many cycles ran."""
        deadline, cycles = time.monotonic() + seconds, 0
        while True:
            trial = await self.cycle()
            cycles += 1
            check(trial, self.seen)
            if time.monotonic() >= deadline:
                return trial, cycles
            await asyncio.sleep(0.5)

    def pods(self) -> list[Any]:
        selector = f"{contract.LABEL_TRIAL}={self.status.trials[0].name}"
        return self.kube.core_v1().list_namespaced_pod("default", label_selector=selector).items

    async def stop_all(self) -> None:
        for trial in self.status.trials:
            await self.runtime.stop(trial.name, "test over")


def discovered(kube: Kube) -> set[str]:
    """The resources discovery lists under kueue.x-k8s.io/v1beta2 (none: the group is not served)."""
    code, body = kube.request("GET", "/apis/kueue.x-k8s.io/v1beta2")
    return {r["name"] for r in body["resources"]} if code == 200 else set()


def workload_lists(kube: Kube) -> int:
    """How many times the operator listed Workloads (every request is authorized, and recorded)."""
    return sum(1 for d in kube.decisions() if d.attributes.resource == "workloads" and d.attributes.verb == "list")


async def test_a_queued_trial_waits_for_admission_is_preempted_and_runs_again_without_failing(
    kube: Kube, make_fake_node
) -> None:
    serve_workloads(kube)
    assert "workloads" in discovered(kube) and "workloads/status" in discovered(kube)
    node = make_fake_node(extended_resources={"nvidia.com/gpu": 1})
    fake_kueue = FakeKueue(kube, priority_classes={"high": 1000})
    template = {**FAKE, "gpusPerNode": 1, "env": {"FAKE_STEP_SECONDS": "0.01"}}
    experiment = Queued(kube, "queued", template, max_steps=1500, checkpoint_interval=50)
    try:
        trial = await experiment.cycle()
        job = fake_kueue.job(trial.name)
        assert job.spec.suspend is True
        assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a"
        assert job.metadata.labels["kueue.x-k8s.io/priority-class"] == "high"

        # Kueue's Workload for it, and the scheduler finding no room.
        fake_kueue.sync()
        workload = fake_kueue.workload(trial.name)
        assert workload["metadata"]["name"] == workload_name(trial.name, job.metadata.uid)
        assert workload["metadata"]["name"].startswith(f"job-{trial.name}-")
        assert workload["spec"]["queueName"] == "team-a" and workload["spec"]["podSets"][0]["count"] == 1
        assert workload["spec"]["priorityClassRef"] == {
            "group": "kueue.x-k8s.io",
            "kind": "WorkloadPriorityClass",
            "name": "high",
        }
        [owner] = workload["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"]) == ("Job", job.metadata.uid)

        # Held past pendingTimeoutSeconds (5 s): Pending with Kueue's reason, never timed out.
        lists_before = workload_lists(kube)

        def waits(trial: TrialStatus, seen: TrialObservation) -> None:
            assert trial.state == "Pending" and seen.pending_since is None, seen
            assert seen.pending_reason.startswith("waiting for Kueue to admit it in LocalQueue team-a: couldn't")

        cycles_started = len(experiment.records)
        trial, cycles = await experiment.cycles_for(7, waits)
        assert [r.decision.action for r in experiment.records[cycles_started:]] == []  # no pending-timeout stop
        assert not experiment.pods() and trial.gpu_seconds == 0
        assert workload_lists(kube) - lists_before == cycles  # one list per cycle, no more

        # Admitted: the same Job runs.
        fake_kueue.admit(trial.name)
        trial = await aeventually(lambda: _state(experiment, "Running", min_step=100), timeout=60, interval=0.3)
        lists_before = workload_lists(kube)
        charged = trial.gpu_seconds
        await asyncio.sleep(1.1)  # cycle times are to the second
        trial = await experiment.cycle()
        assert trial.gpu_seconds > charged  # charged while it runs
        assert workload_lists(kube) == lists_before  # nothing suspended: no Workload list

        # Preempted: Kueue suspends it, the job controller stops its pod; a wait, not a crash.
        fake_kueue.preempt(trial.name)

        async def preempted():
            trial = await experiment.cycle()
            fake_kueue.sync()  # the Job reconciler clears the admission once the pod is gone
            return trial if not experiment.pods() and "preempted by Kueue" in experiment.seen.pending_reason else None

        trial = await aeventually(preempted, timeout=30, interval=0.3)
        assert trial.state == "Pending" and experiment.seen.pending_since is None
        assert experiment.seen.pending_reason.startswith("preempted by Kueue (Preempted to accommodate a workload")
        assert "resumes from its checkpoint when re-admitted" not in experiment.seen.pending_reason  # no volume here
        assert fake_kueue.workload(trial.name)["status"].get("admission") is None

        suspended_gpu = (await experiment.cycle()).gpu_seconds

        def stays_preempted(trial: TrialStatus, seen: TrialObservation) -> None:
            assert (
                trial.state == "Pending" and seen.pending_since is None and "preempted by Kueue" in seen.pending_reason
            )
            assert trial.gpu_seconds == suspended_gpu  # not charged while suspended

        await experiment.cycles_for(6, stays_preempted)  # past pendingTimeoutSeconds again
        job = fake_kueue.job(trial.name)
        assert job.spec.suspend is True and not job.status.failed and not job.status.active
        assert not any(c.type == "Failed" for c in job.status.conditions or [])

        # Re-admitted: the same Job runs the trial to the end.
        fake_kueue.admit(trial.name)
        trial = await aeventually(lambda: _state(experiment, "Succeeded"), timeout=90, interval=0.5)
        fake_kueue.sync()  # Kueue sees it finish
        finished = condition(fake_kueue.workload(trial.name), "Finished")
        job = fake_kueue.job(trial.name)
    finally:
        await experiment.stop_all()

    assert (finished["status"], finished["reason"]) == ("True", "Succeeded")
    assert trial.state == "Succeeded" and job.status.succeeded == 1 and not job.status.failed
    assert [d.action for d in experiment.status.decisions] == ["launch"]  # no failure, no new trial
    assert [t.name for t in experiment.status.trials] == [trial.name]
    # One pod per admission, both of the one Job: the first stopped by the preemption, never counted.
    ran = [rt for rt in node.pods.values() if rt.name.startswith(f"{trial.name}-0-")]
    assert len(ran) == 2 and "stopped by SIGTERM" in (ran[0].log_path.read_text() + ran[1].log_path.read_text())
    assert experiment.status.trials_failed == 0
    assert [r.decision.action for r in await experiment.runtime.ledger()] == ["launch"]


async def _state(experiment: Queued, state: str, min_step: int = 0) -> TrialStatus | None:
    trial = await experiment.cycle()
    return trial if trial.state == state and trial.step >= min_step else None


async def test_the_pending_timeout_counts_from_admission(kube: Kube, make_fake_node) -> None:
    """Held by Kueue longer than pendingTimeoutSeconds, then admitted with pods that cannot be
    scheduled: it fails for its pods, pendingTimeoutSeconds after the admission, not at once."""
    serve_workloads(kube)
    make_fake_node()
    fake_kueue = FakeKueue(kube, priority_classes={"high": 1000})
    template = {**FAKE, "resources": {"requests": {"cpu": "1000"}}}  # no node has 1000 cpus
    experiment = Queued(kube, "late", template)
    try:
        trial = await experiment.cycle()
        fake_kueue.sync()
        trial, _ = await experiment.cycles_for(6, lambda trial, seen: None)
        assert trial.state == "Pending"
        admitted_at = datetime.now(UTC)
        fake_kueue.admit(trial.name)

        async def unschedulable():
            trial = await experiment.cycle()
            return trial if "Unschedulable" in experiment.seen.pending_reason else None

        await aeventually(unschedulable, timeout=20, interval=0.3)
        since = datetime.fromisoformat(experiment.seen.pending_since.replace("Z", "+00:00"))
        assert since >= admitted_at.replace(microsecond=0) - timedelta(seconds=1)  # not the Job's creation
        assert experiment.status.trials[0].state == "Pending"  # created > 6 s ago, yet not timed out

        trial = await aeventually(lambda: _finished(experiment), timeout=30, interval=0.5)
    finally:
        await experiment.stop_all()
    assert trial.state == "Failed" and "pendingTimeoutSeconds (5 s" in trial.message
    stopped = next(r for r in await experiment.runtime.ledger() if r.decision.action == "terminate")
    assert stopped.decision.reason == PENDING_TIMEOUT_REASON
    waited = datetime.fromisoformat(stopped.time.replace("Z", "+00:00")) - admitted_at
    assert waited >= timedelta(seconds=4), waited  # 5 s from the admission (times are to the second)


async def _finished(experiment: Queued) -> TrialStatus | None:
    trial = await experiment.cycle()
    return trial if trial.finished else None


async def test_without_kueue_a_queued_trial_waits_saying_kueue_may_be_missing(kube: Kube, fake_node) -> None:
    # No Workload API served: a cluster without Kueue's CRDs (the list is a 404, not a crash).
    assert discovered(kube) == set()
    experiment = Queued(kube, "no-kueue", FAKE)
    try:
        await experiment.cycle()  # launched

        def waits(trial: TrialStatus, seen: TrialObservation) -> None:
            assert trial.state == "Pending" and seen.pending_since is None
            assert seen.pending_reason == "suspended, waiting for Kueue (no Workload API: is Kueue installed?)"

        await experiment.cycles_for(6, waits)  # past pendingTimeoutSeconds
    finally:
        await experiment.stop_all()
    healthy = {c.type: c.status for c in experiment.status.conditions}
    assert healthy.get(contract.CONDITION_OBSERVATION_HEALTHY) != "False"  # (set only once a cycle failed)
    assert [d.action for d in experiment.status.decisions] == ["launch"]
    assert workload_lists(kube) >= 1 and all(d.allowed for d in kube.decisions())  # asked, allowed, absent


async def test_a_refused_workload_list_degrades_to_a_plain_reason_with_one_warning(
    kube: Kube, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator whose RBAC lacks the workloads rule (a chart from before Kueue support): 403."""
    serve_workloads(kube)
    rbac = kubernetes.client.RbacAuthorizationV1Api(kube.api_client())
    for obj in kube.release.rbac_objects():
        if obj["kind"] not in ("Role", "ClusterRole"):
            continue
        meta = obj["metadata"]
        if obj["kind"] == "Role":
            stored = rbac.read_namespaced_role(meta["name"], meta["namespace"])
        else:
            stored = rbac.read_cluster_role(meta["name"])
        kept = [rule for rule in stored.rules or [] if "workloads" not in (rule.resources or [])]
        if len(kept) == len(stored.rules or []):
            continue
        stored.rules = kept
        if obj["kind"] == "Role":
            rbac.replace_namespaced_role(meta["name"], meta["namespace"], stored)
        else:
            rbac.replace_cluster_role(meta["name"], stored)
    experiment = Queued(kube, "refused", FAKE)
    try:
        await experiment.cycle()  # launched
        with caplog.at_level(logging.WARNING, logger="trainpilot.runtime.kubernetes.kueue"):
            for _ in range(3):
                trial = await experiment.cycle()
                assert trial.state == "Pending" and experiment.seen.pending_since is None
                assert experiment.seen.pending_reason.startswith(
                    "suspended, waiting for Kueue (its Workload cannot be read: workloads.kueue.x-k8s.io is forbidden"
                ), experiment.seen.pending_reason
    finally:
        await experiment.stop_all()
    refused = [d for d in kube.forbidden() if d.attributes.resource == "workloads"]
    assert len(refused) == 3  # asked every cycle (RBAC may be fixed meanwhile) ...
    warnings = [r for r in caplog.records if "Workloads cannot be read" in r.getMessage()]
    assert len(warnings) == 1  # ... and said once
    healthy = {c.type: c.status for c in experiment.status.conditions}
    assert healthy.get(contract.CONDITION_OBSERVATION_HEALTHY) != "False"  # (set only once a cycle failed)


async def test_an_experiment_without_a_queue_never_asks_kueue(kube: Kube, fake_node) -> None:
    serve_workloads(kube)
    experiment = Queued(kube, "unqueued", FAKE, queue=None)
    try:
        trial = await aeventually(lambda: _state(experiment, "Running"), timeout=30, interval=0.3)
        assert fake_node is not None and trial.state == "Running"
        job = kube.batch_v1().read_namespaced_job(trial.name, "default")
        assert not job.spec.suspend and not any(k.startswith("kueue.") for k in job.metadata.labels)
    finally:
        await experiment.stop_all()
    assert workload_lists(kube) == 0
