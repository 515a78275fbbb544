"""An in-place mutate on the cluster, end to end: the agent loop (driven by a scripted policy,
since the heuristic never mutates) patches the trial's control ConfigMap, the fake node refreshes
the mounted file as a kubelet does, and the real trainer applies the new values without a restart."""

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
