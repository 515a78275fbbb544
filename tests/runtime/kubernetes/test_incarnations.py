"""An experiment deleted and created again under the same name is another incarnation (another uid):
it never adopts what the earlier one left (Jobs, ConfigMaps, the ledger), gets Events of its own,
waits for the garbage collector, and fails with what to delete when the leftovers were orphaned.

The operator runs for real (kopf) on the emulated cluster; trials run the fake trainer on the fake
node, so the test is about the cluster's objects, not about training."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.kube import Kube, aeventually, run_kopf_operator
from tests.support.localkit import FAKE_TRAINER
from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentStatus, TrialStatus, parse_spec
from trainpilot.core import ledger as ledger_format
from trainpilot.core.decision import Decision, DecisionRecord
from trainpilot.runtime.kubernetes import builders, ownership
from trainpilot.runtime.kubernetes.api import KubeApi
from trainpilot.runtime.kubernetes.ledger import ConfigMapLedger
from trainpilot.runtime.kubernetes.ownership import ForeignObject
from trainpilot.runtime.kubernetes.runtime import KubernetesRuntime

HANDLERS = "trainpilot.controller.handlers"
NAME = "again"


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


def manifest(max_steps: int) -> dict[str, Any]:
    """One long trial of the fake trainer, which reports `max_steps` (trainpilot_max_steps)."""
    return {
        "apiVersion": f"{contract.GROUP}/{contract.VERSION}",
        "kind": contract.EXPERIMENT_KIND,
        "metadata": {"name": NAME, "namespace": "default"},
        "spec": {
            "searchSpace": [{"name": "lr", "min": 1e-4, "max": 0.1, "log": True}],
            "initialTrials": [{"lr": 0.01}],
            "trialTemplate": {
                "command": ["python", str(FAKE_TRAINER)],
                "env": {"FAKE_STEP_SECONDS": "0.05"},
                "hyperparameters": {"max_steps": max_steps, "eval_interval": 10},
            },
            "budget": {"maxTrials": 1, "parallelTrials": 1},
            "policy": {"intervalSeconds": 1},
        },
    }


def live(kube: Kube) -> dict[str, Any]:
    return kube.custom().get_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, NAME
    )


def gone(kube: Kube) -> bool:
    try:
        live(kube)
    except Exception as error:  # noqa: BLE001 - 404 is what we wait for
        return getattr(error, "status", None) == 404
    return False


def condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)


def running_trial(kube: Kube, max_steps: int) -> dict[str, Any] | None:
    trials = (live(kube).get("status") or {}).get("trials") or []
    return trials[0] if trials and trials[0].get("maxSteps") == max_steps and trials[0]["step"] >= 5 else None


def ledger_config_map(kube: Kube) -> Any:
    return kube.core_v1().read_namespaced_config_map(f"{NAME}-ledger", "default")


def events_about(kube: Kube, uid: str) -> dict[str, Any]:
    return {e.metadata.name: e for e in kube.events_posted("default") if e.involved_object.uid == uid}


def hold_garbage_collector(kube: Kube) -> None:
    """As when the garbage collector lags (it works in the background on a real cluster)."""

    def hold() -> None:
        emulator = kube.emulator
        emulator.gc_delay = 3600.0
        if emulator._gc_handle is not None:
            emulator._gc_handle.cancel()
            emulator._gc_handle = None

    kube.call(hold)


def release_garbage_collector(kube: Kube) -> None:
    def release() -> None:
        emulator = kube.emulator
        emulator.gc_delay = 0.02
        if emulator._gc_handle is not None:  # the pass held back: now
            emulator._gc_handle.cancel()
            emulator._gc_handle = None
        emulator.collect_garbage()

    kube.call(release)


async def test_a_re_created_experiment_waits_for_the_garbage_collector_then_keeps_its_own_records(
    kube: Kube, fake_node
) -> None:
    async with run_kopf_operator(HANDLERS, namespace="default"):
        kube.apply(manifest(max_steps=3000))
        first = await aeventually(lambda: running_trial(kube, 3000), timeout=60, message=f"{fake_node.logs()}")
        old_uid = live(kube)["metadata"]["uid"]
        old_job = kube.batch_v1().read_namespaced_job(first["name"], "default")

        hold_garbage_collector(kube)
        kube.custom().delete_namespaced_custom_object(
            contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, NAME
        )
        await aeventually(lambda: gone(kube), timeout=30)
        kube.apply(manifest(max_steps=2000))
        new_uid = live(kube)["metadata"]["uid"]
        assert new_uid != old_uid

        # Held: the old incarnation's Job (its trainer still running) and ledger are named, not adopted.
        def held() -> dict[str, Any] | None:
            found = condition(live(kube).get("status") or {}, ownership.CONDITION_NAMES_AVAILABLE)
            return found if found and found["status"] == "False" else None

        waiting = await aeventually(held, timeout=30)
        assert waiting["reason"] == "WaitingForGarbageCollection"
        assert f"Job default/{NAME}-t000 (owned by uid {old_uid})" in waiting["message"]
        assert f"ConfigMap default/{NAME}-ledger (owned by uid {old_uid})" in waiting["message"]
        assert not (live(kube).get("status") or {}).get("trials")
        assert ownership.controller_uid(ledger_config_map(kube)) == old_uid
        leftover = events_about(kube, new_uid)
        assert {e.reason for e in leftover.values()} == {ownership.REASON_LEFTOVERS}

        release_garbage_collector(kube)
        second = await aeventually(lambda: running_trial(kube, 2000), timeout=60, message=f"{fake_node.logs()}")
        status = live(kube)["status"]

    # Its own trial: a new Job, owned by the new experiment, reporting its own trainer's metrics.
    assert second["name"] == first["name"] == f"{NAME}-t000"  # the public naming contract holds
    assert status["decisionsMade"] >= 1
    assert condition(status, ownership.CONDITION_NAMES_AVAILABLE)["status"] == "True"
    # Its own ledger, from d00000, in a ConfigMap it owns; none of the old one's records.
    config_map = ledger_config_map(kube)
    assert ownership.controller_uid(config_map) == new_uid
    records, problems = ledger_format.decode(config_map.data["ledger.jsonl"])
    assert problems == [] and records[0].id == f"{NAME}-d00000" and records[0].seq == 0
    assert [r.seq for r in records] == list(range(len(records)))
    assert records[0].decision.action == "launch" and records[0].new_trial == f"{NAME}-t000"
    # Its own Events: the same decision ids, other names; the earlier incarnation's are left as they were.
    old_events, new_events = events_about(kube, old_uid), events_about(kube, new_uid)
    assert builders.event_name({"metadata": {"uid": old_uid}}, f"{NAME}-d00000") in old_events
    launched = new_events[builders.event_name({"metadata": {"uid": new_uid}}, f"{NAME}-d00000")]
    assert launched.reason == contract.REASON_TRIAL_LAUNCHED and f"{NAME}-t000" in launched.message
    assert not set(old_events) & set(new_events)
    job = kube.batch_v1().read_namespaced_job(second["name"], "default")
    assert job.metadata.uid != old_job.metadata.uid and ownership.controller_uid(job) == new_uid


async def test_leftovers_orphaned_on_purpose_fail_the_new_incarnation_with_what_to_delete(
    kube: Kube, fake_node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ownership, "LEFTOVER_WAIT_SECONDS", 6)
    async with run_kopf_operator(HANDLERS, namespace="default"):
        kube.apply(manifest(max_steps=3000))
        await aeventually(lambda: running_trial(kube, 3000), timeout=60, message=f"{fake_node.logs()}")
        kube.custom().delete_namespaced_custom_object(
            contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, NAME, propagation_policy="Orphan"
        )
        await aeventually(lambda: gone(kube), timeout=30)
        kube.apply(manifest(max_steps=2000))

        def failed() -> dict[str, Any] | None:
            status = live(kube).get("status") or {}
            return status if status.get("phase") == "Failed" else None

        status = await aeventually(failed, timeout=40)
        new_uid = live(kube)["metadata"]["uid"]

    found = condition(status, ownership.CONDITION_NAMES_AVAILABLE)
    assert (found["status"], found["reason"]) == ("False", "LeftoversRemain")
    assert f"Job default/{NAME}-t000 (no owner: orphaned)" in status["message"]
    assert "LEFTOVER_WAIT_SECONDS" in status["message"]
    assert (
        f"kubectl delete jobs,services,configmaps,pods -n default -l {contract.LABEL_EXPERIMENT}={NAME}"
        in (status["message"])
    )
    assert not status.get("trials") and not status.get("decisionsMade")
    # The orphaned trial was never touched: its Job is still there, running the old trainer.
    job = kube.batch_v1().read_namespaced_job(f"{NAME}-t000", "default")
    assert not job.metadata.owner_references and not job.metadata.deletion_timestamp
    assert [e.reason for e in events_about(kube, new_uid).values()] == [ownership.REASON_LEFTOVERS]


async def test_an_object_of_another_uid_is_never_adopted(kube: Kube) -> None:
    """What the gate keeps from happening, checked where it would: never observed, read or kept as ours."""
    old = {"metadata": {"name": NAME, "namespace": "default", "uid": "1111-old"}}
    new = {"metadata": {"name": NAME, "namespace": "default", "uid": "2222-new"}}
    hold_garbage_collector(kube)  # neither owner exists: the collector would remove what they own
    api = KubeApi(kube.operator_api_client())
    spec = parse_spec(manifest(max_steps=100)["spec"])
    trial = TrialStatus(name=f"{NAME}-t000", index=0, state="Running", hyperparameters={"lr": 0.01})

    # A create that meets the earlier incarnation's object is not "already created by us".
    kube.core_v1().create_namespaced_service("default", builders.build_service(old, trial.name))
    with pytest.raises(ForeignObject, match="owned by uid 1111-old"):
        await ownership.create_owned(
            api, "service", api.core.create_namespaced_service, "default", builders.build_service(new, trial.name)
        )
    # One of ours is: created now, then found again by a retried cycle.
    mine = builders.build_service(new, f"{NAME}-t001")
    assert await ownership.create_owned(api, "service", api.core.create_namespaced_service, "default", mine)
    assert not await ownership.create_owned(api, "service", api.core.create_namespaced_service, "default", mine)

    # The earlier incarnation's ledger is not read as ours.
    await ConfigMapLedger(api, old).append(launch_record())
    with pytest.raises(ForeignObject, match="belongs to an earlier AgentExperiment"):
        await ConfigMapLedger(api, new).since(0)

    # Nor is its Job observed as our trial of that name.
    kube.batch_v1().create_namespaced_job("default", builders.build_job(old, spec, trial, f"{NAME}-d00000"))
    observed = await KubernetesRuntime(api, new, spec).observe(AgentExperimentStatus(trials=[trial]))
    assert observed.trials[trial.name].phase == "Missing"


def launch_record() -> DecisionRecord:
    return DecisionRecord(
        id=f"{NAME}-d00000",
        seq=0,
        time="2026-01-01T00:00:00Z",
        experiment=NAME,
        decision=Decision(action="launch", policy="heuristic", reason="initial", hyperparameters={"lr": 0.01}),
        outcome="executed",
        new_trial=f"{NAME}-t000",
    )
