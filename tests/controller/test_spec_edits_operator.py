"""Editing a running experiment on the emulated cluster, with the chart's RBAC (docs/spec-edits.md):
an edit of `metrics.port` reaches the next trial while the running one is still scraped where it
serves; an edit the table refuses is a condition and one Event, the value in force stays, and
setting it back clears it. Trials are the fake trainer on a fake node."""

from __future__ import annotations

import copy

import pytest

from tests.controller.test_operator_e2e import HANDLERS, QUICKSTART
from tests.support.kube import Kube, aeventually, run_kopf_operator
from tests.support.localkit import FAKE_TRAINER
from trainpilot.api import contract

pytestmark = pytest.mark.slow

NAME = "edits"


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


def manifest() -> dict:
    body = copy.deepcopy(QUICKSTART)
    body["metadata"] = {"name": NAME, "namespace": "default"}
    spec = body["spec"]
    spec["initialTrials"] = [{"lr": 0.01}]
    spec["budget"] = {"maxTrials": 2, "parallelTrials": 1, "maxFailedTrials": 1}
    spec["policy"] = {"type": "heuristic", "intervalSeconds": 1}
    spec["trialTemplate"].update(command=["python", str(FAKE_TRAINER)], env={"FAKE_STEP_SECONDS": "0.08"})
    return body


def status_of(kube: Kube) -> dict:
    found = kube.custom().get_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, NAME
    )
    return found.get("status") or {}


def trial(kube: Kube, name: str) -> dict | None:
    return next((t for t in status_of(kube).get("trials") or [] if t["name"] == name), None)


def condition(kube: Kube, type_: str) -> dict | None:
    return next((c for c in status_of(kube).get("conditions") or [] if c["type"] == type_), None)


def patch(kube: Kube, spec: dict) -> None:
    kube.custom().patch_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, NAME, {"spec": spec}
    )


async def test_a_port_edit_reaches_new_trials_and_a_refused_edit_is_said_and_cleared(kube: Kube, fake_node) -> None:
    first, second = f"{NAME}-t000", f"{NAME}-t001"
    async with run_kopf_operator(HANDLERS, namespace="default"):
        kube.apply(manifest())
        await aeventually(lambda: (trial(kube, first) or {}).get("step", 0) > 0, timeout=60, interval=0.5)

        patch(kube, {"metrics": {"port": 9500}, "objective": {"direction": "maximize"}})

        def refused() -> dict | None:
            found = condition(kube, contract.CONDITION_SPEC_EDITS_APPLIED)
            return found if found and found["status"] == "False" else None

        said = await aeventually(refused, timeout=30, interval=0.5)
        assert said["reason"] == contract.REASON_SPEC_EDIT_REFUSED
        assert said["message"].startswith("spec.objective.direction: edit to 'maximize' refused")
        assert "'minimize' stays in force" in said["message"]

        # The running trial is still scraped on 9400, where it serves: its steps go on.
        step = trial(kube, first)["step"]  # type: ignore[index]
        await aeventually(lambda: trial(kube, first)["step"] >= step + 20, timeout=30, interval=0.5)  # type: ignore[index]
        assert (condition(kube, contract.CONDITION_METRICS_REACHABLE) or {}).get("status") != "False"

        patch(kube, {"objective": {"direction": "minimize"}})
        await aeventually(
            lambda: condition(kube, contract.CONDITION_SPEC_EDITS_APPLIED)["status"] == "True",  # type: ignore[index]
            timeout=30,
            interval=0.5,
        )

        # The next trial serves, and is scraped, on the edited port.
        await aeventually(lambda: (trial(kube, second) or {}).get("step", 0) > 0, timeout=90, interval=0.5)
        job = kube.batch_v1().read_namespaced_job(second, "default")
        [container] = job.spec.template.spec.containers
        assert {port.name: port.container_port for port in container.ports}["metrics"] == 9500
        assert {env.name: env.value for env in container.env}[contract.ENV_METRICS_PORT] == "9500"
        old = kube.batch_v1().read_namespaced_job(first, "default").spec.template.spec.containers[0]
        assert {port.name: port.container_port for port in old.ports}["metrics"] == 9400

        def finished() -> dict | None:
            status = status_of(kube)
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        status = await aeventually(finished, timeout=120, interval=1)

    assert status["phase"] == "Succeeded", status.get("message")
    settings = status["launchSettings"]
    assert {settings[t["launch"]]["metrics"]["port"] for t in status["trials"]} == {9400, 9500}
    refusals = [e for e in kube.events_posted("default") if e.reason == contract.REASON_SPEC_EDIT_REFUSED]
    assert len(refusals) == 1 and refusals[0].involved_object.name == NAME
    assert [d.attributes for d in kube.forbidden()] == []  # the chart's RBAC covers it all
