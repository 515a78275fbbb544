"""Human sign-off on the emulated cluster: the operator with the chart's RBAC, the chart's
ValidatingAdmissionPolicy in force, real trainers. Held launches are approved with `trainpilot
approve` (the CLI asks the API server who alice is), rejected with `trainpilot reject`, and one is
left to expire; bob cannot sign off in alice's name."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import kubernetes
import pytest
import yaml

from tests.controller.test_operator_e2e import HANDLERS, experiment, finished, ledger_of, manifest
from tests.support import rbac
from tests.support.kube import Kube, aeventually, run_kopf_operator
from tests.support.paths import REPO
from trainpilot.api import contract

pytestmark = pytest.mark.slow

PEOPLE = {"alice": "alice-token", "bob": "bob-token"}


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


def kubeconfig_for(kube: Kube, user: str, path) -> str:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": kube.url}}],
                "users": [{"name": user, "user": {"token": PEOPLE[user]}}],
                "contexts": [{"name": user, "context": {"cluster": "emulator", "user": user, "namespace": "default"}}],
                "current-context": user,
            }
        )
    )
    return str(path)


def admit_people(kube: Kube) -> None:
    """alice and bob may read and annotate experiments in `default`, as an admin would grant it."""
    people = {token: rbac.User(name, (rbac.AUTHENTICATED,)) for name, token in PEOPLE.items()}
    kube.call(lambda: kube.emulator.tokens.update(people))
    role = {"apiGroups": [contract.GROUP], "resources": [contract.EXPERIMENT_PLURAL], "verbs": ["get", "patch"]}
    kube.apply(
        [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "approvers", "namespace": "default"},
                "rules": [role],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "approvers", "namespace": "default"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "approvers"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": n} for n in PEOPLE],
            },
        ]
    )


def trainpilot_as(kubeconfig: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    return subprocess.run(
        [sys.executable, "-m", "trainpilot.cli", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=90
    )


async def test_held_launches_are_approved_rejected_and_expire_and_nobody_signs_in_anothers_name(
    kube: Kube, fake_node, tmp_path
) -> None:
    admit_people(kube)
    alice = kubeconfig_for(kube, "alice", tmp_path / "alice")
    bob = kubeconfig_for(kube, "bob", tmp_path / "bob")
    spec = {
        "initialTrials": [{"lr": 0.01}, {"lr": 0.02}],
        "budget": {"maxTrials": 2, "parallelTrials": 2, "maxFailedTrials": 2},
        "policy": {
            "type": "heuristic",
            "intervalSeconds": 2,
            "requireApprovalFor": ["launch"],
            "approvalTimeoutSeconds": 12,  # time for two `trainpilot` commands on a loaded machine
        },
    }
    seen: list[str] = []
    said: dict[str, subprocess.CompletedProcess[str]] = {}
    forged: list[int] = []

    async def sign_off_as_they_come() -> None:
        while True:
            status = experiment(kube, "quickstart").get("status") or {}
            for held in status.get("signOffs", []):
                if held["state"] != "Pending" or held["id"] in seen:
                    continue
                seen.append(held["id"])
                if len(seen) == 2:
                    forged.append(await asyncio.to_thread(forge, kube, bob, held["id"]))
                    said[held["id"]] = await asyncio.to_thread(trainpilot_as, alice, "reject", "quickstart", held["id"])
                elif len(seen) != 3:  # the third is left to expire
                    said[held["id"]] = await asyncio.to_thread(
                        trainpilot_as, alice, "approve", "quickstart", held["id"], "--wait", "30"
                    )
            await asyncio.sleep(0.5)

    async with run_kopf_operator(HANDLERS, namespace="default"):
        kube.apply(manifest(**spec))
        approver = asyncio.create_task(sign_off_as_they_come())
        try:
            status = await aeventually(lambda: finished(kube, "quickstart"), timeout=240, interval=1)
        finally:
            approver.cancel()

    assert status["phase"] == "Succeeded", status.get("message")
    assert [d.attributes for d in kube.forbidden()] == []  # the operator needed no right the chart lacks
    records = ledger_of(kube, "quickstart")
    settled = {r.follows: r for r in records if r.sign_off is not None}
    first, second, third = seen[:3]
    assert settled[first].outcome == "executed" and settled[first].sign_off.by == "alice"
    assert settled[second].outcome == "rejected" and settled[second].verdict == "rejected by alice"
    assert settled[third].sign_off.verdict == "expired" and "approvalTimeoutSeconds (12 s)" in settled[third].verdict
    assert said[first].returncode == 0 and f"{first}: approved by alice" in said[first].stdout
    assert said[second].returncode == 0 and f"{second}: rejected by alice" in said[second].stdout
    # Bob's annotation claiming alice's name never reached the object.
    assert forged == [422]
    assert all(r.sign_off.by in (None, "alice") for r in settled.values())
    launched = [r for r in records if r.new_trial]
    assert len(launched) == 2 and all(r.sign_off is not None and r.sign_off.by == "alice" for r in launched)
    # Every held decision was announced; the condition ended False (nothing awaits).
    held_events = [e for e in kube.events_posted("default") if e.reason == contract.REASON_DECISION_PENDING_APPROVAL]
    assert len(held_events) >= 4
    awaiting = next(c for c in status["conditions"] if c["type"] == contract.CONDITION_AWAITING_APPROVAL)
    assert awaiting["status"] == "False"


def forge(kube: Kube, kubeconfig: str, decision: str) -> int:
    """bob sets the approve annotation with alice's name: the API server refuses it."""
    api = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(config_file=kubeconfig))
    body = {
        "metadata": {"annotations": {contract.ANNOTATION_APPROVE: decision, contract.ANNOTATION_APPROVED_BY: "alice"}}
    }
    try:
        api.patch_namespaced_custom_object(
            contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, "quickstart", body
        )
    except kubernetes.client.ApiException as error:
        return error.status
    return 200
