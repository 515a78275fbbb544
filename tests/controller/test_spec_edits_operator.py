"""Editing a running experiment on the emulated cluster, with the chart's RBAC: one experiment whose
spec is patched (as `kubectl edit` or an Argo CD sync would) field by field through every row of
docs/spec-edits.md, each edit checked for the effect its row states. Trials are the fake trainer on
a fake node; the test-only Kueue admits the trial the `queue` edit sends to a LocalQueue."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest

from tests.controller.test_operator_e2e import HANDLERS, QUICKSTART, ledger_of
from tests.support.emulator import merge_patch
from tests.support.kube import Kube, aeventually, run_kopf_operator
from tests.support.kueue import running_kueue
from tests.support.localkit import FAKE_TRAINER
from tests.support.spec_edit_cases import COMPARED_ON, leaves, names_refusal, rows_not_edited, undo
from trainpilot.api import contract
from trainpilot.core import cycle_log
from trainpilot.runtime.kubernetes import logs
from trainpilot.runtime.kubernetes.builders import CONFIG_KEY, config_map_name

pytestmark = pytest.mark.slow

NAME = "edits"
T0, T1, T2 = (f"{NAME}-t{i:03d}" for i in range(3))


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


def manifest(checkpoints: str) -> dict:
    body = copy.deepcopy(QUICKSTART)
    body["metadata"] = {"name": NAME, "namespace": "default"}
    spec = body["spec"]
    spec["initialTrials"] = [{"lr": 0.01}]
    spec["budget"] = {"maxTrials": 1, "parallelTrials": 1, "maxFailedTrials": 2}
    spec["policy"] = {"type": "heuristic", "intervalSeconds": 1, "heuristic": {"minPeersAtRung": 10}}  # no ASHA stop
    spec["trialTemplate"].update(
        command=["python", str(FAKE_TRAINER)],
        env={"FAKE_STEP_SECONDS": "0.05", "FAKE_METRICS_PATH": "/metrics"},
        checkpoints={"claimName": "ckpt", "mountPath": checkpoints},
    )
    spec["trialTemplate"]["hyperparameters"].update(max_steps=400, checkpoint_interval=50)
    return body


def claim(kube: Kube, name: str) -> None:
    kube.core_v1().create_namespaced_persistent_volume_claim(
        "default",
        {
            "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )


def status_of(kube: Kube) -> dict:
    found = kube.custom().get_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, NAME
    )
    return found.get("status") or {}


def trial(kube: Kube, name: str) -> dict:
    return next((t for t in status_of(kube).get("trials") or [] if t["name"] == name), {})


def condition(kube: Kube, type_: str) -> dict:
    return next((c for c in status_of(kube).get("conditions") or [] if c["type"] == type_), {})


def patch(kube: Kube, body: dict) -> None:
    kube.custom().patch_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, NAME, body
    )


def trial_config(kube: Kube, name: str) -> dict:
    return json.loads(kube.core_v1().read_namespaced_config_map(config_map_name(name), "default").data[CONFIG_KEY])


def container_of(kube: Kube, name: str):
    [container] = kube.batch_v1().read_namespaced_job(name, "default").spec.template.spec.containers
    return container


def scrape_errors(kube: Kube, name: str) -> list[str]:
    """Why each cycle's scrape of the trial failed, from the cycle log."""
    text = kube.core_v1().read_namespaced_config_map(logs.log_name(NAME, logs.CYCLES), "default").data[logs.KEY_LINES]
    entries, problems = cycle_log.decode(text)
    assert problems == []
    seen = [entry.observation["trials"].get(name) or {} for entry in entries]
    return [trial["scrape_error"] for trial in seen if trial.get("scrape_error")]


async def steps_go_on(kube: Kube, name: str, by: int = 10) -> None:
    """The trial is still scraped where it serves: its step in the status keeps advancing."""
    step = trial(kube, name)["step"]
    await aeventually(lambda: trial(kube, name).get("step", 0) >= step + by, timeout=20, interval=0.3)


async def test_every_row_of_the_edit_table_has_its_effect_on_a_running_experiment(
    kube: Kube, fake_node, tmp_path
) -> None:
    claim(kube, "ckpt")
    claim(kube, "ckpt2")
    old_volume, new_volume = str(fake_node.pvc_dir("ckpt")), str(fake_node.pvc_dir("ckpt2"))
    body = manifest(old_volume)
    spec = body["spec"]
    # While the first trial runs: every refused kind, and the edits the next trials show.
    first = merge_patch(
        COMPARED_ON,
        {
            "trialTemplate": {
                "checkpoints": {"claimName": "ckpt2", "mountPath": new_volume},
                "env": {"FAKE_STEP_SECONDS": "0.03", "FAKE_EDITED": "yes", "FAKE_METRICS_PATH": "/m2"},
            },
            "metrics": {"port": 9500, "path": "/m2"},
            "queue": {"name": "team-a"},
            "retention": {"checkpointTags": 1, "childrenAfterSeconds": 0},
            "initialTrials": [{"lr": 0.01}, {"lr": 0.02}],
            "searchSpace": [{"name": "lr", "min": 0.005, "max": 0.05}, {"name": "weight_decay", "values": [0.05]}],
            "budget": {"maxTrials": 3},
        },
    )
    slow_scrapes = {"metrics": {"scrapeTimeoutSeconds": 0.001, "maxSampleAgeSeconds": 60}}
    through_prometheus = {"metrics": {"source": "prometheus"}}
    pause = {"suspend": True, "queue": {"name": None}, "trialTemplate": {"nodeSelector": {"pool": "none"}}}
    hold_launches = {"policy": {"requireApprovalFor": ["launch"]}}
    time_out = {"trialTemplate": {"pendingTimeoutSeconds": 5}, "budget": {"maxTrials": 5}}
    goal = {"objective": {"goal": 10.0}}
    assert rows_not_edited([first, slow_scrapes, through_prometheus, pause, hold_launches, time_out, goal]) == []

    with running_kueue(kube) as kueue:
        async with run_kopf_operator(HANDLERS, namespace="default"):
            kube.apply(body)
            await aeventually(lambda: trial(kube, T0).get("step", 0) > 0, timeout=60, interval=0.3)
            assert trial_config(kube, T0)["keep_checkpoint_tags"] == 3  # the default

            # Refused: what trials are compared on (for good) and the checkpoint volume (while
            # trials run). One message names each field; the value in force stays.
            patch(kube, {"spec": first})
            said = await aeventually(
                lambda: (
                    condition(kube, contract.CONDITION_SPEC_EDITS_APPLIED).get("status") == "False"
                    and condition(kube, contract.CONDITION_SPEC_EDITS_APPLIED)
                ),
                timeout=20,
                interval=0.3,
            )
            assert said["reason"] == contract.REASON_SPEC_EDIT_REFUSED
            for field, wanted in leaves(COMPARED_ON):
                assert names_refusal(said["message"], field, wanted), (field, said["message"])
            assert "spec.objective: metric 'train_loss' (in force: 'val_loss'), direction 'maximize'" in said["message"]
            assert "spec.trialTemplate.checkpoints {'claimName': 'ckpt2'" in said["message"]
            await steps_go_on(kube, T0)  # metrics (new trials): still scraped on 9400, /metrics

            # Set back what is refused for good; the volume stays refused while T0 runs.
            # metrics.scrapeTimeoutSeconds (next cycle): no trainer answers within 1 ms.
            patch(kube, {"spec": merge_patch(undo(COMPARED_ON, spec), slow_scrapes)})
            said = await aeventually(
                lambda: (
                    "objective" not in condition(kube, contract.CONDITION_SPEC_EDITS_APPLIED)["message"]
                    and condition(kube, contract.CONDITION_SPEC_EDITS_APPLIED)
                ),
                timeout=20,
                interval=0.3,
            )
            assert (
                said["status"] == "False" and "spec.trialTemplate.checkpoints {'claimName': 'ckpt2'" in said["message"]
            )
            await aeventually(lambda: trial(kube, T0).get("failedScrapes", 0) >= 2, timeout=20, interval=0.3)
            assert any("no answer within 0.001 s" in error for error in scrape_errors(kube, T0))
            patch(kube, {"spec": undo(slow_scrapes, spec)})
            await aeventually(lambda: trial(kube, T0).get("failedScrapes") == 0, timeout=20, interval=0.3)
            await steps_go_on(kube, T0)

            # metrics.source (next cycle): this operator was given no Prometheus server, so the next
            # cycle says so and decides nothing; set back, the one after goes on.
            patch(kube, {"spec": through_prometheus})
            valid = await aeventually(
                lambda: condition(kube, "Valid").get("status") == "False" and condition(kube, "Valid"),
                timeout=20,
                interval=0.3,
            )
            assert "set the Helm value prometheus.url" in valid["message"]
            patch(kube, {"spec": undo(through_prometheus, spec)})
            await aeventually(lambda: condition(kube, "Valid").get("status") != "False", timeout=20, interval=0.3)
            await steps_go_on(kube, T0)

            # T0 done: no trial is active, so the volume edit applies. T1 is initialTrials' new
            # entry (next cycle), launched with the edited template, metrics, retention and queue.
            await aeventually(lambda: trial(kube, T1), timeout=60, interval=0.3)
            assert condition(kube, contract.CONDITION_SPEC_EDITS_APPLIED)["status"] == "True"
            assert trial(kube, T1)["hyperparameters"]["lr"] == 0.02
            job = await aeventually(lambda: kueue.job(T1), timeout=10, interval=0.3)
            assert job.spec.suspend is True and job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a"
            await aeventually(lambda: kueue.workload(T1), timeout=10, interval=0.3)
            kueue.admit(T1)
            container = container_of(kube, T1)
            assert {port.name: port.container_port for port in container.ports}["metrics"] == 9500
            env = {variable.name: variable.value for variable in container.env}
            assert env[contract.ENV_METRICS_PORT] == "9500" and env["FAKE_EDITED"] == "yes"
            config = trial_config(kube, T1)
            assert config["keep_checkpoint_tags"] == 1
            assert config["checkpoint_dir"].startswith(new_volume + "/")
            # retention (next cycle): a finished trial's children go after childrenAfterSeconds 0.
            await aeventually(
                lambda: not [j for j in kube.batch_v1().list_namespaced_job("default").items if j.metadata.name == T0],
                timeout=20,
                interval=0.3,
            )
            await aeventually(lambda: trial(kube, T1).get("step", 0) > 0, timeout=30, interval=0.3)  # on /m2

            # suspend (next cycle): no decision while suspended; the running trial goes on.
            patch(kube, {"spec": merge_patch(pause, hold_launches)})
            await aeventually(lambda: status_of(kube).get("phase") == "Suspended", timeout=20, interval=0.3)
            await aeventually(lambda: trial(kube, T1).get("state") == "Succeeded", timeout=60, interval=0.3)
            await asyncio.sleep(3)
            assert not trial(kube, T2) and status_of(kube)["phase"] == "Suspended"

            # Resumed: the next launch is held for sign-off (policy, next cycle) and proposes from
            # the edited search space (next cycle); it leaves the LocalQueue (queue, new trials) and
            # cannot be scheduled (trialTemplate.nodeSelector, new trials).
            patch(kube, {"spec": {"suspend": False}})
            held = await aeventually(
                lambda: [s for s in status_of(kube).get("signOffs", []) if s["state"] == "Pending"],
                timeout=20,
                interval=0.3,
            )
            assert held[0]["action"] == "launch"
            searched = held[0]["hyperparameters"]
            assert 0.005 <= searched["lr"] <= 0.05 and searched["weight_decay"] == 0.05
            # Signed by the requesting user, as the chart's admission policy requires (the test is the admin).
            approve = {contract.ANNOTATION_APPROVE: held[0]["id"], contract.ANNOTATION_APPROVED_BY: "kubernetes-admin"}
            patch(kube, {"metadata": {"annotations": approve}})
            await aeventually(lambda: trial(kube, T2), timeout=20, interval=0.3)
            assert trial(kube, T2)["hyperparameters"] == searched
            job = kube.batch_v1().read_namespaced_job(T2, "default")
            assert "kueue.x-k8s.io/queue-name" not in (job.metadata.labels or {}) and not job.spec.suspend
            assert job.spec.template.spec.node_selector == {"pool": "none"}

            # pendingTimeoutSeconds (next cycle): the trial already pending is timed against it.
            patch(kube, {"spec": merge_patch(time_out, undo(hold_launches, spec))})
            await aeventually(lambda: trial(kube, T2).get("state") == "Failed", timeout=30, interval=0.3)

            # objective.goal (next cycle): a finished trial has reached it, so the experiment ends.
            patch(kube, {"spec": goal})
            status = await aeventually(
                lambda: status_of(kube).get("phase") in ("Succeeded", "Failed") and status_of(kube),
                timeout=30,
                interval=0.3,
            )

    assert status["phase"] == "Succeeded", status.get("message")
    found = kube.custom().get_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, NAME
    )
    assert found["status"]["observedGeneration"] == found["metadata"]["generation"]  # the last edit's
    assert status["trialsLaunched"] < 5
    records = ledger_of(kube, NAME)
    assert records[-1].decision.action == "complete" and records[-1].decision.reason == "goal-reached"
    [timed_out] = [r for r in records if r.decision.trial == T2 and r.decision.action == "terminate"]
    assert timed_out.decision.reason == "pending-timeout" and "(5 s;" in timed_out.decision.rationale
    settings = status["launchSettings"]
    launched = {t["name"]: settings[t["launch"]] for t in status["trials"]}
    assert launched[T0]["metrics"]["port"] == 9400 and launched[T1]["metrics"]["port"] == 9500
    assert launched[T0]["trialTemplate"]["checkpoints"]["claimName"] == "ckpt"
    assert launched[T1]["trialTemplate"]["checkpoints"]["claimName"] == "ckpt2"
    refusals = [e for e in kube.events_posted("default") if e.reason == contract.REASON_SPEC_EDIT_REFUSED]
    assert len(refusals) == 1 and refusals[0].involved_object.name == NAME
    assert [d.attributes for d in kube.forbidden()] == []  # the chart's RBAC covers it all
