"""Why a trial ended, on the cluster: the trainer's own reason, read from its termination message.

torchrun exits 1 whatever its workers did, so the container's exit code says "crashed" for a
multi-process trial that diverged or was misconfigured; the trainer writes its reason (and code)
into the pod's termination message and the runtime prefers it. The unit tests pin the reader;
the end-to-end test runs a real two-process trainer on the fake node."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import yaml

from tests.support.kube import Kube, aeventually
from tests.support.paths import QUICKSTART_PATH
from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentStatus, parse_spec
from trainpilot.api.metrics import TrainerExit
from trainpilot.core.decision import Decision
from trainpilot.core.policy.base import PolicyContext
from trainpilot.core.policy.heuristic import HeuristicPolicy
from trainpilot.loop import run_cycle
from trainpilot.runtime.clock import cluster_now
from trainpilot.runtime.kubernetes.api import KubeApi
from trainpilot.runtime.kubernetes.runtime import KubernetesRuntime, _exit_reason
from trainpilot.runtime.kubernetes.termination import trainer_exit

# ---- the reader --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"exit_code": 3, "exit_reason": "diverged", "trainpilot_step": 2.0}, ("diverged", 3)),
        ({"exit_reason": "invalid-config", "message": "resume_tag: ..."}, ("invalid-config", 2)),
        ({"exit_code": 4}, ("terminated", 4)),  # no reason: the code says it
        # A reason that is not the contract's is not trusted; the code then decides.
        ({"exit_code": 3, "exit_reason": "fine, honestly"}, ("diverged", 3)),
        ({"exit_code": 3, "exit_reason": "completed"}, ("completed", 0)),  # the reason and its own code
    ],
)
def test_trainer_exit_reads_the_reason_a_summary_states(fields, expected):
    reported = TrainerExit.from_result(fields)
    assert reported is not None and (reported.reason, reported.code) == expected


@pytest.mark.parametrize(
    "fields", [None, [], "diverged", {}, {"exit_code": 99}, {"exit_code": True}, {"trainpilot_step": 3.0}]
)
def test_trainer_exit_is_none_when_the_summary_states_no_reason(fields):
    assert TrainerExit.from_result(fields) is None


def test_the_termination_message_wins_over_torchruns_exit_code():
    message = json.dumps({"exit_code": 3, "exit_reason": "diverged", "rank": 0, "trainpilot_step": 2.0})
    assert _exit_reason(1, trainer_exit(message)) == "diverged"
    assert _exit_reason(1, trainer_exit("")) == "crashed"  # nothing written (e.g. SIGKILL): the code decides
    assert _exit_reason(137, trainer_exit("not json")) == "crashed"
    assert _exit_reason(3, None) == "diverged" and _exit_reason(None, None) == "unknown"


def _pod(index: str, exit_code: int, message: str | None) -> SimpleNamespace:
    terminated = SimpleNamespace(exit_code=exit_code, message=message)
    container = SimpleNamespace(state=SimpleNamespace(terminated=terminated))
    return SimpleNamespace(
        metadata=SimpleNamespace(labels={contract.LABEL_COMPLETION_INDEX: index}, deletion_timestamp=None),
        status=SimpleNamespace(phase="Failed", container_statuses=[container], pod_ip=None),
    )


def test_a_failed_torchrun_job_is_observed_with_the_trainers_reason_and_code():
    spec = parse_spec(yaml.safe_load(QUICKSTART_PATH.read_text())["spec"])
    runtime = KubernetesRuntime(api=None, experiment={"metadata": {"name": "e", "namespace": "default"}}, spec=spec)
    failed = SimpleNamespace(type="Failed", status="True", message="Job has reached the specified backoff limit")
    job = SimpleNamespace(status=SimpleNamespace(conditions=[failed]))
    message = json.dumps({"exit_code": 3, "exit_reason": "diverged", "rank": 1, "trainpilot_step": 2.0})
    seen = runtime._observe_trial("e-t000", job, [_pod("0", 1, message)], None)
    assert (seen.phase, seen.exit_reason, seen.exit_code) == ("Failed", "diverged", 3)
    assert seen.metrics is not None and seen.metrics.step == 2
    unwritten = runtime._observe_trial("e-t000", job, [_pod("0", 1, None)], None)
    assert (unwritten.exit_reason, unwritten.exit_code) == ("crashed", 1)


# ---- end to end: a two-process trial that diverges, on the emulated cluster -------------------

QUICKSTART = yaml.safe_load(QUICKSTART_PATH.read_text())
DIVERGING_LR = 5.0


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


class LaunchThenHeuristic:
    """Launches one diverging trial; once it has ended, the built-in policy decides what follows.
    (Left to the heuristic from the start, it might terminate the trial on a scrape of its
    non-finite loss before the trainer exits, which would not test the exit reason.)"""

    name = "heuristic"

    def __init__(self) -> None:
        self.heuristic = HeuristicPolicy()

    async def decide(self, context: PolicyContext) -> list[Decision]:
        trials = context.status.trials
        if not trials:
            hyperparameters = {"lr": DIVERGING_LR, "weight_decay": 0.0}
            return [Decision(action="launch", policy=self.name, reason="test", hyperparameters=hyperparameters)]
        if trials[0].finished:
            return await self.heuristic.decide(context)
        return []


@pytest.mark.slow
async def test_a_two_process_trial_that_diverges_ends_diverged_and_is_relaunched(kube: Kube, fake_node) -> None:
    name = "diverging"
    body = copy.deepcopy(QUICKSTART)
    body["metadata"] = {"name": name, "namespace": "default"}
    body["spec"]["initialTrials"] = []
    body["spec"]["budget"] = {"maxTrials": 2, "parallelTrials": 1, "maxFailedTrials": 2}
    body["spec"]["trialTemplate"]["processesPerNode"] = 2
    body["spec"]["trialTemplate"]["hyperparameters"].update(max_steps=100, fail_fast=True)
    kube.apply(body)
    stored = kube.custom().get_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, name
    )
    spec = parse_spec(stored["spec"])
    runtime = KubernetesRuntime(KubeApi(kube.operator_api_client()), {"metadata": stored["metadata"]}, spec)
    policy = LaunchThenHeuristic()
    status = AgentExperimentStatus()

    async def relaunched():
        nonlocal status
        status = (await run_cycle(name, spec, status, runtime, policy, cluster_now())).status
        return status if len(status.trials) > 1 else None

    try:
        await aeventually(relaunched, timeout=240, interval=0.5)
        first, child = status.trials
        selector = f"{contract.LABEL_TRIAL}={first.name}"
        pods = kube.core_v1().list_namespaced_pod("default", label_selector=selector).items
    finally:
        for trial in status.trials:
            await runtime.stop(trial.name, "test over")

    terminated = pods[0].status.container_statuses[0].state.terminated
    assert terminated.exit_code == 1, fake_node.logs()  # torchrun's status, whatever its workers said
    assert json.loads(terminated.message)["exit_reason"] == "diverged"
    assert first.state == "Diverged" and first.nonfinite_losses >= 1, (first, fake_node.logs())
    assert child.parent == first.name and child.hyperparameters["lr"] == pytest.approx(DIVERGING_LR * 0.1)
    assert [d.action for d in status.decisions] == ["launch", "launch"]
