"""Mutate and scale on the cluster, end to end, with real trainers on the fake node.

The agent loop is driven by scripted policies (the heuristic never mutates or scales): an
in-place mutate patches the trial's control ConfigMap, which the fake node swaps into the mounted
file as a kubelet does; a scale stops the trial and launches a two-pod child that resumes its
checkpoint under torchrun, with rendezvous at the rank-0 pod's DNS name."""

from __future__ import annotations

import asyncio
import copy
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from tests.kube.fixtures import Kube
from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentStatus, parse_spec
from trainpilot.core.decision import Decision
from trainpilot.core.policy.base import PolicyContext
from trainpilot.loop import run_cycle
from trainpilot.runtime.kubernetes.api import KubeApi
from trainpilot.runtime.kubernetes.runtime import KubernetesRuntime

QUICKSTART = yaml.safe_load((Path(__file__).parents[2] / "examples" / "quickstart.yaml").read_text())
NEW_LR, NEW_WEIGHT_DECAY = 0.002, 0.05


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


class MutateOnce:
    """Launches one trial, and once it trains, lowers its lr and raises its weight decay in place."""

    name = "scripted"

    async def decide(self, context: PolicyContext) -> list[Decision]:
        if not context.status.trials:
            return [Decision(action="launch", policy=self.name, reason="test", hyperparameters={"lr": 0.01, "weight_decay": 0.0})]
        trial = context.status.trials[0]
        if trial.step > 0 and trial.control_generation == 0:
            return [
                Decision(
                    action="mutate",
                    policy=self.name,
                    reason="test",
                    trial=trial.name,
                    mode="in-place",
                    hyperparameters={"lr": NEW_LR, "weight_decay": NEW_WEIGHT_DECAY},
                )
            ]
        return []


async def until(poll, timeout: float, interval: float):
    deadline = time.monotonic() + timeout
    while (result := await poll()) is None:
        assert time.monotonic() < deadline, f"nothing after {timeout} s"
        await asyncio.sleep(interval)
    return result


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_an_in_place_mutate_reaches_the_running_trainer(kube: Kube, fake_node) -> None:
    body = copy.deepcopy(QUICKSTART)
    body["metadata"] = {"name": "mutating", "namespace": "default"}
    body["spec"]["initialTrials"] = []
    body["spec"]["trialTemplate"]["hyperparameters"].update(max_steps=100_000, eval_interval=100_000, checkpoint_interval=0)
    kube.apply(body)
    stored = kube.custom().get_namespaced_custom_object(contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, "mutating")
    spec = parse_spec(stored["spec"])
    runtime = KubernetesRuntime(KubeApi(kube.api_client()), {"metadata": stored["metadata"]}, spec)
    policy = MutateOnce()
    state = {"status": AgentExperimentStatus()}

    async def cycle():
        result = await run_cycle("mutating", spec, state["status"], runtime, policy, now())
        state["status"] = result.status
        return state["status"]

    async def applied():
        status = await cycle()
        metrics = (await runtime.observe(status)).trials[status.trials[0].name].metrics
        if metrics is None or metrics.control_generation < 1:
            return None
        return metrics

    try:
        metrics = await until(applied, timeout=120, interval=0.5)
        # One step later, the new peak lr is in effect (the cosine has barely moved at step ~100 of 100k).
        step = metrics.step
        metrics = await until(lambda: _later(runtime, state["status"], step), timeout=30, interval=0.3)
    finally:
        for trial in state["status"].trials:
            await runtime.stop(trial.name, "test over")

    assert metrics.get(contract.METRIC_LEARNING_RATE) == pytest.approx(NEW_LR, rel=1e-3)
    assert metrics.get(contract.METRIC_WEIGHT_DECAY) == pytest.approx(NEW_WEIGHT_DECAY)
    trial = state["status"].trials[0]
    assert trial.hyperparameters == {"lr": NEW_LR, "weight_decay": NEW_WEIGHT_DECAY} and trial.state == "Running"
    assert [d.action for d in state["status"].decisions] == ["launch", "mutate"]
    events = [e for e in kube.core_v1().list_namespaced_event("default").items if e.involved_object.name == "mutating"]
    assert contract.REASON_HYPERPARAMETERS_MUTATED in {e.reason for e in events}
    # The same pod all along: nothing was restarted.
    pods = kube.core_v1().list_namespaced_pod("default", label_selector=f"{contract.LABEL_TRIAL}={trial.name}").items
    assert len(pods) == 1 and pods[0].status.container_statuses[0].restart_count == 0


async def _later(runtime: KubernetesRuntime, status: AgentExperimentStatus, step: int):
    metrics = (await runtime.observe(status)).trials[status.trials[0].name].metrics
    return metrics if metrics is not None and metrics.step > step else None


class ScaleOnce:
    """Launches one single-node trial and, once it has a checkpoint, scales it to two nodes."""

    name = "scripted"

    async def decide(self, context: PolicyContext) -> list[Decision]:
        trials = context.status.trials
        if not trials:
            return [Decision(action="launch", policy=self.name, reason="test", hyperparameters={"lr": 0.01, "weight_decay": 0.0})]
        first = trials[0]
        if len(trials) == 1 and first.state == "Running" and (first.checkpoint_step or 0) >= 20:
            return [Decision(action="scale", policy=self.name, reason="test", trial=first.name, nodes=2)]
        return []


async def test_a_scaled_trial_resumes_on_two_pods(kube: Kube, fake_node, tmp_path) -> None:
    kube.core_v1().create_namespaced_persistent_volume_claim(
        "default",
        {"metadata": {"name": "scaling-ckpt"}, "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}},
    )
    body = copy.deepcopy(QUICKSTART)
    body["metadata"] = {"name": "scaling", "namespace": "default"}
    body["spec"]["initialTrials"] = []
    template = body["spec"]["trialTemplate"]
    template["hyperparameters"].update(max_steps=200, eval_interval=50, checkpoint_interval=20)
    # The trial config names checkpoint paths inside a file, which the fake node cannot rewrite
    # the way it rewrites env values: mount the claim at a real host path instead.
    template["checkpoints"] = {"claimName": "scaling-ckpt", "mountPath": str(tmp_path / "ckpt")}
    kube.apply(body)
    stored = kube.custom().get_namespaced_custom_object(contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, "scaling")
    spec = parse_spec(stored["spec"])
    runtime = KubernetesRuntime(KubeApi(kube.api_client()), {"metadata": stored["metadata"]}, spec)
    policy = ScaleOnce()
    state = {"status": AgentExperimentStatus()}

    async def child_finished():
        result = await run_cycle("scaling", spec, state["status"], runtime, policy, now())
        state["status"] = result.status
        child = state["status"].trials[1] if len(state["status"].trials) > 1 else None
        return child if child is not None and child.finished else None

    try:
        child = await until(child_finished, timeout=240, interval=0.5)
        job = kube.batch_v1().read_namespaced_job(child.name, "default")
        pods = kube.core_v1().list_namespaced_pod("default", label_selector=f"{contract.LABEL_TRIAL}={child.name}").items
    finally:
        for trial in state["status"].trials:
            await runtime.stop(trial.name, "test over")

    parent = state["status"].trials[0]
    assert [d.action for d in state["status"].decisions] == ["launch", "scale"]
    assert (parent.state, child.parent, child.nodes) == ("Terminated", parent.name, 2)
    assert child.state == "Succeeded" and child.step == 200, fake_node.logs()
    assert (job.spec.completions, job.spec.parallelism, job.spec.completion_mode) == (2, 2, "Indexed")
    assert sorted(p.status.phase for p in pods) == ["Succeeded", "Succeeded"]
    rank0 = next(p for p in pods if p.metadata.labels.get(contract.LABEL_COMPLETION_INDEX) == "0")
    log = fake_node.read_log(rank0.metadata.name)
    resumed = next(line for line in log.splitlines() if "resumed from" in line)
    assert "saved by 1 rank(s)" in resumed, resumed
    assert int(resumed.split(" at step ")[1].split()[0]) >= 20
