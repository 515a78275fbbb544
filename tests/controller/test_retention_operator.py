"""spec.retention on the emulated cluster, with the chart's RBAC: once trials finish, the operator
deletes the checkpoints of a trial it need not keep (a cleanup Job on the claim, run by the fake
node) and, after the grace period, every finished trial's Job, Service and ConfigMaps, even after
the experiment has finished; each deletion is a ledger record and an Event first."""

from __future__ import annotations

import copy

import pytest

from tests.controller.test_operator_e2e import HANDLERS, QUICKSTART, ledger_of
from tests.support.kube import Kube, aeventually, run_kopf_operator
from tests.support.localkit import FAKE_TRAINER
from trainpilot.api import contract

pytestmark = pytest.mark.slow

NAME = "tidy"


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


def manifest(checkpoints: str) -> dict:
    body = copy.deepcopy(QUICKSTART)
    body["metadata"] = {"name": NAME, "namespace": "default"}
    spec = body["spec"]
    spec["initialTrials"] = [{"lr": 0.01}, {"lr": 0.02}]
    spec["budget"] = {"maxTrials": 2, "parallelTrials": 2, "maxFailedTrials": 1}
    spec["policy"] = {"type": "heuristic", "intervalSeconds": 1}
    spec["retention"] = {"checkpointTrials": 0, "childrenAfterSeconds": 3}
    spec["trialTemplate"].update(
        command=["python", str(FAKE_TRAINER)],
        env={"FAKE_STEP_SECONDS": "0.01"},
        checkpoints={"claimName": "ckpt", "mountPath": checkpoints},
    )
    spec["trialTemplate"]["hyperparameters"].update(max_steps=200, checkpoint_interval=50)
    return body


def status_of(kube: Kube) -> dict:
    found = kube.custom().get_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, NAME
    )
    return found.get("status") or {}


def children(kube: Kube, trial: str) -> list[str]:
    core, batch = kube.core_v1(), kube.batch_v1()
    found = [f"job {j.metadata.name}" for j in batch.list_namespaced_job("default").items if j.metadata.name == trial]
    found += [
        f"service {s.metadata.name}" for s in core.list_namespaced_service("default").items if s.metadata.name == trial
    ]
    found += [
        f"configmap {c.metadata.name}"
        for c in core.list_namespaced_config_map("default").items
        if c.metadata.name.startswith(f"{trial}-")
    ]
    return found


async def test_finished_trials_lose_what_retention_says_and_the_ledger_says_so(kube: Kube, fake_node) -> None:
    kube.core_v1().create_namespaced_persistent_volume_claim(
        "default",
        {
            "metadata": {"name": "ckpt"},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    # The claim's directory on the fake node: the trainers write there through the path in their
    # config, and the cleanup Job's command is mapped there through its mount.
    checkpoints = fake_node.pvc_dir("ckpt", "default")
    async with run_kopf_operator(HANDLERS, namespace="default"):
        kube.apply(manifest(str(checkpoints)))

        def tidied() -> dict | None:
            status = status_of(kube)
            trials = status.get("trials") or []
            done = status.get("phase") == "Succeeded" and all("children" in t.get("removed", []) for t in trials)
            return status if done and len(trials) == 2 else None

        status = await aeventually(tidied, timeout=120, interval=1)
        best = status["bestTrial"]["name"]
        [other] = [t["name"] for t in status["trials"] if t["name"] != best]
        uid = kube.custom().get_namespaced_custom_object(
            contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, NAME
        )["metadata"]["uid"]
        folder = checkpoints / NAME / uid
        await aeventually(lambda: not (folder / other).exists(), timeout=30, interval=0.5)

    assert (folder / best / "latest").exists()  # the best trial's checkpoints stay
    assert [t["removed"] for t in status["trials"] if t["name"] == other] == [["checkpoints", "children"]]
    for trial in (best, other):
        assert children(kube, trial) == []
    records = [r for r in ledger_of(kube, NAME) if r.decision.action == "clean-up"]
    assert sorted((r.decision.trial, r.decision.removes) for r in records) == sorted(
        [(other, "checkpoints"), (best, "children"), (other, "children")]
    )
    complete = next(r.seq for r in ledger_of(kube, NAME) if r.decision.action == "complete")
    assert any(r.seq > complete for r in records)  # children went after the experiment had finished
    cleaned = [e for e in kube.events_posted("default") if e.reason == contract.REASON_TRIAL_CLEANED_UP]
    assert len(cleaned) == len(records)
    assert [d.attributes for d in kube.forbidden()] == []  # the chart's RBAC covers it all
