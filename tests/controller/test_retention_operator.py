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


def jobs_named(kube: Kube, name: str) -> list:
    return [job for job in kube.batch_v1().list_namespaced_job("default").items if job.metadata.name == name]


def condition(kube: Kube, type_: str) -> dict:
    return next((c for c in status_of(kube).get("conditions") or [] if c["type"] == type_), {})


def create_claim(kube: Kube) -> None:
    kube.core_v1().create_namespaced_persistent_volume_claim(
        "default",
        {
            "metadata": {"name": "ckpt"},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )


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
    create_claim(kube)
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

        # A clean-up that succeeded leaves no Job behind.
        await aeventually(lambda: not jobs_named(kube, f"{other}-cleanup"), timeout=30, interval=0.5)

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


async def test_a_clean_up_that_cannot_run_is_said_and_done_once_it_can(kube: Kube, fake_node) -> None:
    """Its pod waits for the claim (as one does for a ReadWriteOnce claim another node holds): past
    pendingTimeoutSeconds, RetentionApplied=False names the Job, the folder and what to do, after the
    experiment has finished too; once the claim is back it runs, and the condition clears."""
    create_claim(kube)
    checkpoints = fake_node.pvc_dir("ckpt", "default")
    body = manifest(str(checkpoints))
    body["spec"]["retention"] = {"checkpointTrials": 0}
    body["spec"]["trialTemplate"]["pendingTimeoutSeconds"] = 5
    body["spec"]["trialTemplate"]["hyperparameters"]["max_steps"] = 600  # the claim goes while both run
    body["spec"]["policy"]["heuristic"] = {"minPeersAtRung": 10}  # no ASHA stop: both finish
    async with run_kopf_operator(HANDLERS, namespace="default"):
        kube.apply(body)
        await aeventually(
            lambda: len([t for t in status_of(kube).get("trials") or [] if t.get("step", 0) > 0]) == 2,
            timeout=60,
            interval=0.3,
        )
        kube.core_v1().delete_namespaced_persistent_volume_claim("ckpt", "default")  # the trials have it mounted

        def stalled() -> dict | None:
            found = condition(kube, contract.CONDITION_RETENTION_APPLIED)
            return found if found.get("status") == "False" and status_of(kube).get("phase") == "Succeeded" else None

        said = await aeventually(stalled, timeout=60, interval=0.5)
        best = status_of(kube)["bestTrial"]["name"]
        [other] = [t["name"] for t in status_of(kube)["trials"] if t["name"] != best]
        assert said["reason"] == contract.REASON_CLEAN_UP_STALLED
        assert f"{other}: Job {other}-cleanup has not deleted {checkpoints}/{NAME}/" in said["message"]
        assert "(spec.trialTemplate.pendingTimeoutSeconds 5): container cleanup: ContainerCreating" in said["message"]
        assert "ReadWriteOnce" in said["message"]
        stalls = [e for e in kube.events_posted("default") if e.reason == contract.REASON_CLEAN_UP_STALLED]
        assert stalls and other in stalls[0].message

        create_claim(kube)
        await aeventually(
            lambda: condition(kube, contract.CONDITION_RETENTION_APPLIED).get("status") == "True",
            timeout=60,
            interval=0.5,
        )
        assert not jobs_named(kube, f"{other}-cleanup")
        assert not any(checkpoints.glob(f"{NAME}/*/{other}"))
        assert any(checkpoints.glob(f"{NAME}/*/{best}/latest"))
    assert [d.attributes for d in kube.forbidden()] == []
