"""Trials that can never run do not hold a slot forever, on the emulated cluster with the fake node.

- Pods that wait past spec.trialTemplate.pendingTimeoutSeconds (unschedulable, an image the node
  cannot pull) fail their trial with the pod's reason: the trial's message, an Event, the ledger.
- An evicted or preempted pod is not a crash: the Job's podFailurePolicy ignores it, the job
  controller replaces it and the real trainer resumes its own checkpoint (slow: DeepSpeed).
- A trial of several nodes on a ReadWriteOnce checkpoint claim is refused at launch, saying so.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.support.kube import Kube, aeventually
from tests.support.localkit import FAKE_TRAINER
from tests.support.paths import QUICKSTART_PATH
from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentStatus, parse_spec
from trainpilot.core.decision import SYSTEM_POLICY, Decision
from trainpilot.core.policy.base import PolicyContext
from trainpilot.core.state import PENDING_TIMEOUT_REASON
from trainpilot.loop import run_cycle
from trainpilot.runtime.clock import cluster_now
from trainpilot.runtime.kubernetes.api import KubeApi
from trainpilot.runtime.kubernetes.runtime import KubernetesRuntime

QUICKSTART = yaml.safe_load(QUICKSTART_PATH.read_text())


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


class LaunchOnce:
    """Launches one trial, then nothing."""

    name = "scripted"

    async def decide(self, context: PolicyContext) -> list[Decision]:
        if context.status.trials:
            return []
        return [
            Decision(
                action="launch", policy=self.name, reason="test", hyperparameters={"lr": 0.01, "weight_decay": 0.0}
            )
        ]


class Experiment:
    """An experiment on the emulated cluster whose cycles the test runs, as the operator's identity."""

    def __init__(self, kube: Kube, name: str, template: dict[str, Any], policy: Any, **hyperparameters: Any) -> None:
        body = copy.deepcopy(QUICKSTART)
        body["metadata"] = {"name": name, "namespace": "default"}
        body["spec"]["initialTrials"] = []
        body["spec"]["trialTemplate"].update(template)
        body["spec"]["trialTemplate"]["hyperparameters"].update(hyperparameters)
        kube.apply(body)
        stored = kube.custom().get_namespaced_custom_object(
            contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, name
        )
        self.kube, self.name, self.policy = kube, name, policy
        self.uid = stored["metadata"]["uid"]
        self.spec = parse_spec(stored["spec"])
        api = KubeApi(kube.operator_api_client())
        self.runtime = KubernetesRuntime(api, {"metadata": stored["metadata"]}, self.spec)
        self.status = AgentExperimentStatus()

    async def cycle(self) -> AgentExperimentStatus:
        self.status = (
            await run_cycle(self.name, self.spec, self.status, self.runtime, self.policy, cluster_now())
        ).status
        return self.status

    async def until_finished(self, timeout: float) -> Any:
        async def finished() -> Any:
            trials = (await self.cycle()).trials
            return trials[0] if trials and trials[0].finished else None

        return await aeventually(finished, timeout=timeout, interval=0.5)

    def events(self) -> list[Any]:
        return [e for e in self.kube.events_posted("default") if e.involved_object.uid == self.uid]

    async def ledger(self) -> list[Any]:
        return await self.runtime.ledger()

    async def stop_all(self) -> None:
        for trial in self.status.trials:
            await self.runtime.stop(trial.name, "test over")


FAKE = {"command": ["python", str(FAKE_TRAINER)], "pendingTimeoutSeconds": 5}


@pytest.mark.parametrize(
    ("case", "node_options", "template", "reason"),
    [
        (
            "unschedulable",
            {},
            {"resources": {"requests": {"cpu": "1000"}}},
            "Unschedulable: 0/1 nodes are available: 1 Insufficient cpu.",
        ),
        (
            "unpullable",
            {"image_pull_errors": {"registry.invalid/trainer:9": "not found"}, "kubelet_backoff": 0.5},
            {"image": "registry.invalid/trainer:9"},
            'container trainer: ImagePullBackOff: Back-off pulling image "registry.invalid/trainer:9"',
        ),
    ],
)
async def test_a_trial_whose_pods_never_start_fails_with_the_pods_reason_after_the_pending_timeout(
    kube: Kube, make_fake_node, case: str, node_options: dict, template: dict, reason: str
) -> None:
    node = make_fake_node(**node_options)
    experiment = Experiment(kube, f"stuck-{case}", {**FAKE, **template}, LaunchOnce())
    try:
        trial = await experiment.until_finished(timeout=40)
    finally:
        await experiment.stop_all()

    # Failed (it counts toward maxFailedTrials), with the pod's own words, and its slot is free.
    assert trial.state == "Failed", node.logs()
    assert "spec.trialTemplate.pendingTimeoutSeconds (5 s" in trial.message and reason in trial.message
    assert experiment.status.trials_running == 0 and experiment.status.trials_failed == 1
    # In the ledger and as an Event, like any decision, by the loop itself (no policy asked).
    stopped = next(r for r in await experiment.ledger() if r.decision.action == "terminate")
    assert (stopped.decision.policy, stopped.decision.reason, stopped.trial) == (
        SYSTEM_POLICY,
        PENDING_TIMEOUT_REASON,
        trial.name,
    )
    assert reason in stopped.decision.rationale and stopped.observation["pendingReason"].endswith(reason)
    [event] = [e for e in experiment.events() if e.metadata.name.startswith(stopped.id)]
    assert (event.reason, event.type) == (contract.REASON_TRIAL_TERMINATED, "Warning")
    assert reason in event.message
    # Its Job is gone, and with it the pod that waited.
    jobs = kube.batch_v1().list_namespaced_job("default", label_selector=f"{contract.LABEL_TRIAL}={trial.name}")
    assert not jobs.items
    await aeventually(
        lambda: (
            not kube.core_v1()
            .list_namespaced_pod("default", label_selector=f"{contract.LABEL_TRIAL}={trial.name}")
            .items
        ),
        timeout=15,
    )


def claim(kube: Kube, name: str, mode: str) -> None:
    kube.core_v1().create_namespaced_persistent_volume_claim(
        "default",
        {"metadata": {"name": name}, "spec": {"accessModes": [mode], "resources": {"requests": {"storage": "1Gi"}}}},
    )


@pytest.mark.parametrize("mode", ["ReadWriteOnce", "ReadWriteOncePod"])
async def test_a_trial_of_two_nodes_on_a_single_node_claim_is_refused_at_launch(
    kube: Kube, mode: str, tmp_path
) -> None:
    claim(kube, "single-node-ckpt", mode)
    checkpoints = {"checkpoints": {"claimName": "single-node-ckpt", "mountPath": str(tmp_path / "ckpt")}}
    experiment = Experiment(kube, "shared-ckpt", {**FAKE, **checkpoints, "nodes": 2}, LaunchOnce())

    status = await experiment.cycle()

    [trial] = status.trials
    assert trial.state == "Failed" and trial.nodes == 2
    assert f"its checkpoint claim default/single-node-ckpt (spec.trialTemplate.checkpoints.claimName) is {mode}" in (
        trial.message
    )
    assert "use a ReadWriteMany claim, or nodes: 1" in trial.message
    [health] = [c for c in status.conditions if c.type == contract.CONDITION_ACTIONS_HEALTHY]
    assert health.status == "False" and mode in health.message
    failed = [r for r in await experiment.ledger() if r.outcome == "failed"]
    assert len(failed) == 1 and mode in failed[0].verdict
    assert contract.REASON_DECISION_FAILED in {e.reason for e in experiment.events()}
    # Refused before anything was created.
    assert not kube.batch_v1().list_namespaced_job("default").items
    assert not kube.core_v1().list_namespaced_service("default").items


async def test_a_single_node_trial_may_use_a_read_write_once_claim(kube: Kube, tmp_path) -> None:
    claim(kube, "one-node-ckpt", "ReadWriteOnce")
    checkpoints = {"checkpoints": {"claimName": "one-node-ckpt", "mountPath": str(tmp_path / "ckpt")}}
    experiment = Experiment(kube, "one-node", {**FAKE, **checkpoints}, LaunchOnce())
    try:
        [trial] = (await experiment.cycle()).trials
        assert trial.state == "Pending" and kube.batch_v1().read_namespaced_job(trial.name, "default")
    finally:
        await experiment.stop_all()


@pytest.mark.slow
@pytest.mark.parametrize("disrupt", ["evict", "preempt"])
async def test_an_evicted_or_preempted_trial_resumes_from_its_checkpoint_instead_of_crashing(
    kube: Kube, fake_node, tmp_path, disrupt: str
) -> None:
    claim(kube, "shared-ckpt", "ReadWriteMany")
    # The trial config names checkpoint paths inside a file, which the fake node cannot rewrite
    # the way it rewrites env values: mount the claim at a real host path instead.
    checkpoints = {"checkpoints": {"claimName": "shared-ckpt", "mountPath": str(tmp_path / "ckpt")}}
    experiment = Experiment(
        kube,
        f"disrupted-{disrupt}",
        checkpoints,
        LaunchOnce(),
        max_steps=300,
        eval_interval=50,
        checkpoint_interval=20,
    )

    async def checkpointed() -> Any:
        [trial] = (await experiment.cycle()).trials
        return trial if trial.state == "Running" and (trial.checkpoint_step or 0) >= 40 else None

    def pods() -> list[Any]:
        selector = f"{contract.LABEL_TRIAL}={experiment.status.trials[0].name}"
        return kube.core_v1().list_namespaced_pod("default", label_selector=selector).items

    try:
        await aeventually(checkpointed, timeout=180, interval=0.5, message=f"{fake_node.logs()}")
        [first] = pods()
        await getattr(fake_node, disrupt)(first.metadata.name)
        trial = await experiment.until_finished(timeout=180)
        job = kube.batch_v1().read_namespaced_job(trial.name, "default")
        [replacement] = [p for p in pods() if p.metadata.name != first.metadata.name]
    finally:
        await experiment.stop_all()

    # Not a crash: the same Job finished the trial, in a replacement pod that resumed the checkpoint.
    assert trial.state == "Succeeded" and trial.step == 300, fake_node.logs()
    assert [d.action for d in experiment.status.decisions] == ["launch"]
    assert job.status.succeeded == 1 and not job.status.failed
    log = fake_node.read_log(replacement.metadata.name)
    resumed = next(line for line in log.splitlines() if "resumed from" in line)
    checkpoints = experiment.runtime.checkpoint_dir(trial.name, experiment.runtime.spec)
    assert f"resumed from {checkpoints}/step" in resumed, resumed
    assert int(resumed.split(" at step ")[1].split()[0]) >= 40
