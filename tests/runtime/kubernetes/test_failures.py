"""What the API server refuses, on the emulated cluster: a refused action fails its trial and the
experiment goes on; API errors are typed (permanent or worth a retry) with the server's message;
status clears what became empty; a finished experiment is not patched on every recheck."""

from __future__ import annotations

import asyncio
import copy

import pytest
import yaml

from tests.support.kube import Kube
from tests.support.paths import QUICKSTART_PATH
from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentStatus, TrialStatus, parse_spec
from trainpilot.core.observation import Observation, TrialObservation
from trainpilot.core.policy import HeuristicPolicy
from trainpilot.core.state import fold_observation
from trainpilot.loop import run_cycle
from trainpilot.runtime.base import PermanentFailure
from trainpilot.runtime.clock import cluster_now
from trainpilot.runtime.kubernetes.api import ApiError, KubeApi, PermanentApiError
from trainpilot.runtime.kubernetes.runtime import KubernetesRuntime, status_patch

QUICKSTART = yaml.safe_load(QUICKSTART_PATH.read_text())


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


def api_status(code: int, reason: str, message: str) -> dict:
    """The body a real API server sends with an error (a metav1.Status)."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def apply_experiment(kube: Kube, name: str, **spec_changes) -> dict:
    body = copy.deepcopy(QUICKSTART)
    body["metadata"] = {"name": name, "namespace": "default"}
    body["spec"].update(spec_changes)
    kube.apply(body)
    return read_experiment(kube, name)


def read_experiment(kube: Kube, name: str) -> dict:
    return kube.custom().get_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, name
    )


def runtime_for(kube: Kube, stored: dict) -> KubernetesRuntime:
    return KubernetesRuntime(
        KubeApi(kube.operator_api_client()), {"metadata": stored["metadata"]}, parse_spec(stored["spec"])
    )


@pytest.mark.parametrize(
    ("code", "reason", "message"),
    [
        (403, "Forbidden", 'jobs.batch is forbidden: User "system:serviceaccount:trainpilot:op" cannot create jobs'),
        (422, "Invalid", 'Job.batch "refused-t000" is invalid: spec.template.spec.containers[0].image: Required'),
    ],
)
async def test_a_job_the_api_server_refuses_fails_its_trial_with_the_message_and_the_experiment_goes_on(
    kube: Kube, code: int, reason: str, message: str
) -> None:
    stored = apply_experiment(kube, "refused")
    runtime, spec = runtime_for(kube, stored), parse_spec(stored["spec"])
    kube.call(lambda: kube.emulator["create jobs"][:1] << code << api_status(code, reason, message))

    status = (
        await run_cycle("refused", spec, AgentExperimentStatus(), runtime, HeuristicPolicy(), cluster_now())
    ).status

    saved = read_experiment(kube, "refused")["status"]
    first = saved["trials"][0]
    assert (first["name"], first["state"]) == ("refused-t000", "Failed") and message in first["message"]
    health = next(c for c in saved["conditions"] if c["type"] == contract.CONDITION_ACTIONS_HEALTHY)
    assert health["status"] == "False" and message in health["message"]
    batch = kube.batch_v1()
    assert batch.read_namespaced_job("refused-t001", "default").metadata.name == "refused-t001"  # the other went on
    events = {e.reason: e for e in kube.core_v1().list_namespaced_event("default").items}
    refused = events[contract.REASON_DECISION_FAILED]
    assert refused.type == "Warning" and message in refused.message and "refused-t000" in refused.message
    records = await runtime.ledger()
    assert records[-1].outcome == "failed" and records[-1].follows == records[0].id

    # The next cycle fills the freed slot; the experiment goes on.
    status = (await run_cycle("refused", spec, status, runtime, HeuristicPolicy(), cluster_now())).status
    assert status.trial("refused-t002") is not None
    assert batch.read_namespaced_job("refused-t002", "default").metadata.name == "refused-t002"


async def test_api_errors_are_typed_with_the_status_code_and_the_servers_message(kube: Kube) -> None:
    api = KubeApi(kube.api_client())
    manifest = {"metadata": {"name": "cm"}}
    cases = [
        (403, "Forbidden", True),
        (422, "Invalid", True),
        (429, "TooManyRequests", False),
        (503, "ServiceUnavailable", False),
    ]
    for code, reason, permanent in cases:
        seen = len(list(kube.emulator["create configmaps"]))
        body = api_status(code, reason, f"said {reason}")
        kube.call(
            lambda c=code, b=body, n=seen: kube.emulator["create configmaps"][n : n + 1] << c << b
        )  # the next one only
        with pytest.raises(ApiError) as raised:
            await api.call("config map cm", api.core.create_namespaced_config_map, "default", manifest)
        error = raised.value
        assert (error.status, error.api_message) == (code, f"said {reason}")
        assert isinstance(error, PermanentFailure) is permanent and isinstance(error, PermanentApiError) is permanent
        assert str(error) == f"config map cm: API error {code}: said {reason}"
        await api.call(
            "config map cm", api.core.create_namespaced_config_map, "default", manifest
        )  # the next one works
        await api.call("config map cm", api.core.delete_namespaced_config_map, "cm", "default")


async def test_no_answer_at_all_is_worth_a_retry() -> None:
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"  # nothing listens on the discard port
    configuration.retries = 0
    api = KubeApi(client.ApiClient(configuration))
    with pytest.raises(ApiError) as raised:
        await api.call("list jobs", api.batch.list_namespaced_job, "default")
    assert raised.value.status is None and not isinstance(raised.value, PermanentFailure)
    assert "no answer from the API server" in str(raised.value)


# ---- status clears what became empty ----------------------------------------------------------


def test_the_status_patch_sends_null_for_what_became_empty() -> None:
    saved = {"phase": "Running", "bestTrial": {"name": "a", "objective": 1.0, "hyperparameters": {"lr": 1, "wd": 2}}}
    patch = status_patch(saved, {"phase": "Running", "bestTrial": {"name": "b", "hyperparameters": {"lr": 3}}})
    assert patch["bestTrial"] == {"name": "b", "objective": None, "hyperparameters": {"lr": 3, "wd": None}}
    patch = status_patch(None, {"phase": "Running"})  # nothing saved at hand: every empty field is cleared
    assert patch["bestTrial"] is None and patch["bestObjective"] is None and patch["phase"] == "Running"


async def test_status_read_back_after_the_best_trial_crashed_has_no_best_trial(kube: Kube) -> None:
    stored = apply_experiment(kube, "crashing")
    runtime, spec = runtime_for(kube, stored), parse_spec(stored["spec"])
    best = TrialStatus(name="crashing-t000", index=0, state="Running", step=100, objective=1.6, best_objective=1.6)
    status = fold_observation(spec, AgentExperimentStatus(trials=[best]), Observation(time="t0"), "t0")
    await runtime.save_status(status)
    assert read_experiment(kube, "crashing")["status"]["bestTrial"]["name"] == "crashing-t000"

    crashed = Observation(
        time="t1",
        trials={"crashing-t000": TrialObservation(name="crashing-t000", phase="Failed", exit_reason="crashed")},
    )
    status = fold_observation(spec, status, crashed, "t1")
    assert status.best_trial is None
    await KubernetesRuntime(runtime.api, {"metadata": stored["metadata"]}, spec).save_status(status)  # a fresh runtime
    saved = read_experiment(kube, "crashing")["status"]
    assert "bestTrial" not in saved and "bestObjective" not in saved
    assert saved["trials"][0]["state"] == "Failed"


# ---- a finished experiment is left alone --------------------------------------------------------


class Stop:
    """kopf's DaemonStopped, as drive() uses it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()

    async def wait(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            pass


def status_patches(kube: Kube) -> int:
    return sum(request.subresource == "status" for request in kube.emulator["patch agentexperiments"])


async def test_a_finished_experiment_is_not_patched_on_every_recheck(kube: Kube, monkeypatch) -> None:
    from trainpilot.controller import agent

    monkeypatch.setattr(agent, "FINISHED_RECHECK_SECONDS", 0.05)
    stored = apply_experiment(kube, "done")
    generation = stored["metadata"]["generation"]
    final = {"phase": "Succeeded", "message": "goal reached", "observedGeneration": generation, "decisionsMade": 3}
    kube.custom().patch_namespaced_custom_object_status(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, "done", {"status": final}
    )
    body = read_experiment(kube, "done")
    before = status_patches(kube)
    stop = Stop()
    daemon = asyncio.create_task(agent.drive(body, stop, KubeApi(kube.operator_api_client())))
    try:
        await asyncio.sleep(1.0)  # twenty rechecks
        assert status_patches(kube) == before
        body["metadata"]["generation"] = generation + 1  # the user edits the spec: reported once
        await asyncio.sleep(1.0)
        assert status_patches(kube) == before + 1
    finally:
        stop.event.set()
        await asyncio.wait_for(daemon, 5)
    saved = read_experiment(kube, "done")["status"]
    assert saved["phase"] == "Succeeded" and saved["observedGeneration"] == generation + 1


async def test_a_repeated_warning_updates_one_event(kube: Kube) -> None:
    stored = apply_experiment(kube, "noisy")
    runtime = runtime_for(kube, stored)
    await runtime.announce(contract.REASON_POLICY_FAILING, "failed 1 cycle(s) in a row")
    await runtime.announce(contract.REASON_POLICY_FAILING, "failed 2 cycle(s) in a row")
    events = [e for e in kube.core_v1().list_namespaced_event("default").items if e.reason == "PolicyFailing"]
    assert len(events) == 1 and events[0].message == "failed 2 cycle(s) in a row" and events[0].type == "Warning"
    assert events[0].involved_object.name == "noisy"


async def test_an_event_the_api_server_refuses_does_not_stop_the_decision(kube: Kube) -> None:
    stored = apply_experiment(kube, "unannounced")
    runtime, spec = runtime_for(kube, stored), parse_spec(stored["spec"])
    refusal = api_status(403, "Forbidden", "events is forbidden: cannot create events")
    kube.call(lambda: kube.emulator["create events"] << 403 << refusal)  # every Event, for good
    status = (
        await run_cycle("unannounced", spec, AgentExperimentStatus(), runtime, HeuristicPolicy(), cluster_now())
    ).status
    # The ledger is the record; an Event is an announcement: the trials were launched all the same.
    assert [r.new_trial for r in await runtime.ledger()] == ["unannounced-t000", "unannounced-t001"]
    assert [t.state for t in status.trials] == ["Pending", "Pending"]
    assert kube.batch_v1().read_namespaced_job("unannounced-t001", "default").metadata.name == "unannounced-t001"
