"""Kueue end to end: the real operator (kopf, the chart's RBAC), real DeepSpeed trainers on the fake
node, and a test-only Kueue (tests/support/kueue.py) that holds, admits, preempts and re-admits.

The trial waits in its LocalQueue longer than pendingTimeoutSeconds without being failed for it,
runs once admitted, checkpoints, is preempted (its pod stopped by the job controller: SIGTERM, the
trainer saves its checkpoint), waits again without a crash, a new trial or GPU time, and once
re-admitted resumes its own checkpoint in the same Job and the experiment succeeds.
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import pytest
import yaml

from tests.support.kube import Kube, aeventually, run_kopf_operator
from tests.support.kueue import condition, running_kueue
from tests.support.paths import QUICKSTART_PATH
from trainpilot.api import contract
from trainpilot.core import cycle_log
from trainpilot.core import ledger as ledger_format
from trainpilot.runtime.kubernetes import logs

pytestmark = pytest.mark.slow

HANDLERS = "trainpilot.controller.handlers"
QUICKSTART = yaml.safe_load(QUICKSTART_PATH.read_text())
NAME = "queued"
TRIAL = f"{NAME}-t000"


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


def manifest(checkpoints: str) -> dict:
    body = copy.deepcopy(QUICKSTART)
    body["metadata"] = {"name": NAME, "namespace": "default"}
    spec = body["spec"]
    spec["initialTrials"] = [{"lr": 0.01}]
    spec["budget"] = {"maxTrials": 1, "parallelTrials": 1, "maxFailedTrials": 1}
    spec["queue"] = {"name": "team-a", "priorityClass": "high"}
    spec["trialTemplate"].update(
        {
            "gpusPerNode": 1,  # so that GPU time is charged while it runs (the fake node has one)
            "pendingTimeoutSeconds": 5,  # the least allowed; Kueue holds it far longer
            "checkpoints": {"claimName": "ckpt", "mountPath": checkpoints},
        }
    )
    spec["trialTemplate"]["hyperparameters"].update(
        {"max_steps": 2000, "eval_interval": 100, "checkpoint_interval": 50}
    )
    return body


def status_of(kube: Kube) -> dict:
    found = kube.custom().get_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, NAME
    )
    return found.get("status") or {}


def trial_of(kube: Kube) -> dict:
    trials = status_of(kube).get("trials") or []
    assert trials, "no trial yet"
    return trials[0]


def pending_reasons(kube: Kube) -> list[str]:
    """What the operator saw of the trial cycle by cycle: its pending reasons, from the cycle log."""
    text = kube.core_v1().read_namespaced_config_map(logs.log_name(NAME, logs.CYCLES), "default").data[logs.KEY_LINES]
    entries, problems = cycle_log.decode(text)
    assert problems == []
    return [e.observation["trials"][TRIAL]["pending_reason"] for e in entries if TRIAL in e.observation["trials"]]


def ledger(kube: Kube) -> list[Any]:
    data = kube.core_v1().read_namespaced_config_map(f"{NAME}-ledger", "default").data["ledger.jsonl"]
    records, problems = ledger_format.decode(data)
    assert problems == []
    return records


def pods(kube: Kube) -> list[Any]:
    return kube.core_v1().list_namespaced_pod("default", label_selector=f"{contract.LABEL_TRIAL}={TRIAL}").items


async def hold(seconds: float, check) -> None:
    """Check every half second for `seconds` that `check()` holds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        check()
        await asyncio.sleep(0.5)
    check()


async def test_a_queued_trial_waits_runs_is_preempted_and_resumes_its_checkpoint(
    kube: Kube, make_fake_node, tmp_path
) -> None:
    node = make_fake_node(extended_resources={"nvidia.com/gpu": 1})
    kube.core_v1().create_namespaced_persistent_volume_claim(
        "default",
        {
            "metadata": {"name": "ckpt"},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    checkpoints = str(tmp_path / "ckpt")  # a host path: the trial config names it inside a file
    with running_kueue(kube, priority_classes={"high": 1000}) as kueue:
        async with run_kopf_operator(HANDLERS, namespace="default"):
            kube.apply(manifest(checkpoints))

            # Created suspended in the LocalQueue, with its priority class; Kueue made its Workload.
            job = await aeventually(lambda: kueue.job(TRIAL), timeout=60, interval=0.5)
            assert job.spec.suspend is True
            assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a"
            assert job.metadata.labels["kueue.x-k8s.io/priority-class"] == "high"
            workload = await aeventually(lambda: kueue.workload(TRIAL), timeout=10, interval=0.3)
            assert workload["spec"]["priorityClassRef"]["name"] == "high" and workload["spec"]["priority"] == 1000

            # Held longer than pendingTimeoutSeconds: Pending, saying why, never failed for it.
            def waiting() -> None:
                trial = trial_of(kube)
                assert trial["state"] == "Pending" and not pods(kube), trial
                assert status_of(kube).get("phase") not in ("Failed", "Succeeded")

            await hold(10, waiting)
            reasons = pending_reasons(kube)
            assert reasons and all(
                r.startswith("waiting for Kueue to admit it in LocalQueue team-a: couldn't assign flavors")
                for r in reasons
            ), reasons
            assert [r.decision.action for r in ledger(kube)] == ["launch"]
            assert trial_of(kube).get("gpuSeconds", 0) == 0

            # Admitted: it runs and checkpoints.
            kueue.admit(TRIAL)

            def checkpointed() -> dict | None:
                trial = trial_of(kube)
                return trial if trial["state"] == "Running" and (trial.get("checkpointStep") or 0) >= 100 else None

            await aeventually(checkpointed, timeout=180, interval=0.5)
            [first] = pods(kube)

            # Preempted: Kueue suspends the Job, the job controller stops its pod (which checkpoints).
            kueue.preempt(TRIAL)

            def stopped() -> dict | None:
                trial = trial_of(kube)
                return trial if trial["state"] == "Pending" and not pods(kube) else None

            await aeventually(stopped, timeout=60, interval=0.5)
            await asyncio.sleep(3)  # a cycle or so: the interval it stopped in is charged, nothing after
            charged = trial_of(kube).get("gpuSeconds", 0)
            assert charged > 0

            def preempted() -> None:
                trial = trial_of(kube)
                assert trial["state"] == "Pending" and not pods(kube), trial
                assert trial.get("gpuSeconds", 0) == charged  # no GPU time while suspended
                assert status_of(kube).get("trialsFailed", 0) == 0

            await hold(8, preempted)  # longer than pendingTimeoutSeconds again
            assert any(
                r.startswith("preempted by Kueue (Preempted to accommodate a workload")
                and r.endswith("; resumes from its checkpoint when re-admitted")
                for r in pending_reasons(kube)
            )
            assert condition(kueue.workload(TRIAL), "Evicted")["status"] == "True"
            job = kueue.job(TRIAL)
            assert job.spec.suspend is True and not job.status.failed

            # Re-admitted: the same Job, a new pod that resumes the trial's own checkpoint.
            kueue.admit(TRIAL)

            def finished() -> dict | None:
                status = status_of(kube)
                return status if status.get("phase") in ("Succeeded", "Failed") else None

            status = await aeventually(finished, timeout=300, interval=1)
            assert status["phase"] == "Succeeded", (status.get("message"), [r.decision for r in ledger(kube)])
            [second] = pods(kube)
            job = kueue.job(TRIAL)

    [trial] = status["trials"]
    assert trial["state"] == "Succeeded" and trial["step"] == 2000 and status.get("trialsFailed", 0) == 0
    assert job.status.succeeded == 1 and not job.status.failed
    # The ledger: the launch and the completion; no failure, no terminate, no second trial.
    assert [r.decision.action for r in ledger(kube)] == ["launch", "complete"]
    assert [d.attributes for d in kube.forbidden()] == []  # the chart's RBAC covers it all
    assert kueue.errors == []

    first_log = node.read_log(first.metadata.name) or ""
    second_log = node.read_log(second.metadata.name) or ""
    assert second.metadata.name != first.metadata.name
    assert "resumed from" not in first_log, first_log
    resumed = next((line for line in second_log.splitlines() if "resumed from" in line), None)
    assert resumed is not None, second_log
    assert f"resumed from {checkpoints}/{NAME}/" in resumed and f"/{TRIAL}/" in resumed, resumed
    assert int(resumed.split(" at step ")[1].split()[0]) >= 100, resumed
