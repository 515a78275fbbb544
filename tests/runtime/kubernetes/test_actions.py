"""Mutate and scale on the cluster, end to end, with real trainers on the fake node.

The agent loop is driven by scripted policies (the heuristic never mutates or scales): an
in-place mutate patches the trial's control ConfigMap, which the fake node swaps into the mounted
file as a kubelet does; a scale stops the trial and launches a two-pod child that resumes its
checkpoint under torchrun, with rendezvous at the rank-0 pod's DNS name."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.support.kube import Kube, aeventually
from tests.support.paths import QUICKSTART_PATH
from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentStatus, parse_spec
from trainpilot.api.metrics import TrialMetrics
from trainpilot.core.decision import Decision
from trainpilot.core.policy.base import PolicyContext
from trainpilot.loop import run_cycle
from trainpilot.runtime.clock import cluster_now
from trainpilot.runtime.kubernetes.api import KubeApi
from trainpilot.runtime.kubernetes.runtime import KubernetesRuntime

QUICKSTART = yaml.safe_load(QUICKSTART_PATH.read_text())
NEW_LR, NEW_WEIGHT_DECAY = 0.002, 0.05


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


FIRST_TRIAL = {"lr": 0.01, "weight_decay": 0.0}


class Driven:
    """One experiment on the emulated cluster whose cycles the test runs, with a scripted policy."""

    def __init__(self, kube: Kube, name: str, policy, template: dict | None = None, **hyperparameters) -> None:
        body = copy.deepcopy(QUICKSTART)
        body["metadata"] = {"name": name, "namespace": "default"}
        body["spec"]["initialTrials"] = []
        body["spec"]["trialTemplate"].update(template or {})
        body["spec"]["trialTemplate"]["hyperparameters"].update(hyperparameters)
        kube.apply(body)
        stored = kube.custom().get_namespaced_custom_object(
            contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, name
        )
        self.name, self.policy = name, policy
        self.spec = parse_spec(stored["spec"])
        self.runtime = KubernetesRuntime(
            KubeApi(kube.operator_api_client()), {"metadata": stored["metadata"]}, self.spec
        )
        self.status = AgentExperimentStatus()

    async def cycle(self) -> AgentExperimentStatus:
        self.status = (
            await run_cycle(self.name, self.spec, self.status, self.runtime, self.policy, cluster_now())
        ).status
        return self.status

    async def metrics(self, index: int = 0) -> TrialMetrics | None:
        return (await self.runtime.observe(self.status)).trials[self.status.trials[index].name].metrics

    async def stop_all(self) -> None:
        for trial in self.status.trials:
            await self.runtime.stop(trial.name, "test over")


class MutateOnce:
    """Launches one trial, and once it trains, lowers its lr and raises its weight decay in place."""

    name = "scripted"

    async def decide(self, context: PolicyContext) -> list[Decision]:
        if not context.status.trials:
            return [Decision(action="launch", policy=self.name, reason="test", hyperparameters=FIRST_TRIAL)]
        trial = context.status.trials[0]
        if trial.step > 0 and trial.control_generation == 0:
            changes = {"lr": NEW_LR, "weight_decay": NEW_WEIGHT_DECAY}
            return [
                Decision(
                    action="mutate",
                    policy=self.name,
                    reason="test",
                    trial=trial.name,
                    mode="in-place",
                    hyperparameters=changes,
                )
            ]
        return []


async def test_an_in_place_mutate_reaches_the_running_trainer(kube: Kube, fake_node) -> None:
    # No warm-up: a slow trainer may take the new lr within the first steps, where warm-up would scale it.
    experiment = Driven(
        kube, "mutating", MutateOnce(), max_steps=100_000, eval_interval=100_000, checkpoint_interval=0, warmup_steps=0
    )

    async def applied():
        await experiment.cycle()
        metrics = await experiment.metrics()
        return metrics if metrics is not None and metrics.control_generation >= 1 else None

    async def a_step_later(step: int):
        metrics = await experiment.metrics()
        return metrics if metrics is not None and metrics.step > step else None

    try:
        metrics = await aeventually(applied, timeout=120, interval=0.5)
        # One step later, the new peak lr is in effect (the cosine has barely moved at step ~100 of 100k).
        metrics = await aeventually(lambda: a_step_later(metrics.step), timeout=30, interval=0.3)
    finally:
        await experiment.stop_all()

    assert metrics.get(contract.METRIC_LEARNING_RATE) == pytest.approx(NEW_LR, rel=1e-3)
    assert metrics.get(contract.METRIC_WEIGHT_DECAY) == pytest.approx(NEW_WEIGHT_DECAY)
    trial = experiment.status.trials[0]
    assert trial.hyperparameters == {"lr": NEW_LR, "weight_decay": NEW_WEIGHT_DECAY} and trial.state == "Running"
    assert [d.action for d in experiment.status.decisions] == ["launch", "mutate"]
    events = [e for e in kube.core_v1().list_namespaced_event("default").items if e.involved_object.name == "mutating"]
    assert contract.REASON_HYPERPARAMETERS_MUTATED in {e.reason for e in events}
    # The same pod all along: nothing was restarted.
    pods = kube.core_v1().list_namespaced_pod("default", label_selector=f"{contract.LABEL_TRIAL}={trial.name}").items
    assert len(pods) == 1 and pods[0].status.container_statuses[0].restart_count == 0


class ScaleOnce:
    """Launches one single-node trial and, once it has trained a while, scales it to two nodes."""

    name = "scripted"

    async def decide(self, context: PolicyContext) -> list[Decision]:
        trials = context.status.trials
        if not trials:
            return [Decision(action="launch", policy=self.name, reason="test", hyperparameters=FIRST_TRIAL)]
        first = trials[0]
        if len(trials) == 1 and first.state == "Running" and first.step >= 30:
            return [Decision(action="scale", policy=self.name, reason="test", trial=first.name, nodes=2)]
        return []


def saved_steps(directory) -> list[int]:
    """The steps of the complete checkpoints (the trainer's marker written) in a checkpoint folder."""
    return sorted(int(tag.name[4:]) for tag in directory.glob("step*") if (tag / "trainpilot-complete.json").exists())


async def test_a_scaled_trial_resumes_on_two_pods_from_the_step_its_parent_saved_on_sigterm(
    kube: Kube, fake_node, tmp_path
) -> None:
    claim = {
        "metadata": {"name": "scaling-ckpt"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    kube.core_v1().create_namespaced_persistent_volume_claim("default", claim)
    # The trial config names checkpoint paths inside a file, which the fake node cannot rewrite
    # the way it rewrites env values: mount the claim at a real host path instead.
    checkpoints = {"checkpoints": {"claimName": "scaling-ckpt", "mountPath": str(tmp_path / "ckpt")}}
    # checkpoint_interval 0 (the default): the parent's only checkpoint is the one it saves on SIGTERM.
    experiment = Driven(
        kube, "scaling", ScaleOnce(), checkpoints, max_steps=200, eval_interval=50, checkpoint_interval=0
    )

    async def child_finished():
        trials = (await experiment.cycle()).trials
        return trials[1] if len(trials) > 1 and trials[1].finished else None

    try:
        child = await aeventually(child_finished, timeout=300, interval=0.5)
        job = kube.batch_v1().read_namespaced_job(child.name, "default")
        pods = (
            kube.core_v1().list_namespaced_pod("default", label_selector=f"{contract.LABEL_TRIAL}={child.name}").items
        )
    finally:
        await experiment.stop_all()

    parent = experiment.status.trials[0]
    assert [d.action for d in experiment.status.decisions] == ["launch", "scale"]
    assert (parent.state, child.parent, child.nodes) == ("Terminated", parent.name, 2)
    assert child.state == "Succeeded" and child.step == 200, fake_node.logs()
    assert (job.spec.completions, job.spec.parallelism, job.spec.completion_mode) == (2, 2, "Indexed")
    assert sorted(p.status.phase for p in pods) == ["Succeeded", "Succeeded"]
    [parent_dir] = [path.parent for path in (tmp_path / "ckpt").rglob("latest") if parent.name in str(path)]
    [saved_on_sigterm] = saved_steps(parent_dir)  # nothing before: the save on SIGTERM is its only one
    assert saved_on_sigterm >= 30
    # The child started after the parent's pods were gone, and resumed exactly that step.
    assert child.resumed_from_step == saved_on_sigterm
    rank0 = next(p for p in pods if p.metadata.labels.get(contract.LABEL_COMPLETION_INDEX) == "0")
    log = fake_node.read_log(rank0.metadata.name)
    resumed = next(line for line in log.splitlines() if "resumed from" in line)
    assert "saved by 1 rank(s)" in resumed, resumed
    assert int(resumed.split(" at step ")[1].split()[0]) == saved_on_sigterm
