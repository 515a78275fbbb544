"""The real operator (kopf) against the emulated API server, with real DeepSpeed trainers.

The fake node under tests/support runs each trial pod's command as a local process, so these
tests exercise the whole path: Job -> pod -> trainer -> /metrics -> scrape -> policy -> guardrails
-> Events, annotation, status and ledger. The operator is the Helm chart's ServiceAccount, with
exactly the RBAC the chart grants (tests/support/kube.py); the test client is a cluster admin.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from tests.controller.test_rbac import unused_rules
from tests.support.chart import ALL_NAMESPACES, SINGLE_NAMESPACE, OperatorRelease
from tests.support.kube import Kube, aeventually, run_kopf_operator
from tests.support.paths import QUICKSTART_PATH
from trainpilot.api import contract
from trainpilot.core import ledger as ledger_format

pytestmark = pytest.mark.slow

HANDLERS = "trainpilot.controller.handlers"
QUICKSTART = yaml.safe_load(QUICKSTART_PATH.read_text())


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]  # the real CRDs: schema pruning and defaults as a real API server applies them


def experiment(kube: Kube, name: str) -> dict:
    return kube.custom().get_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, name
    )


def finished(kube: Kube, name: str) -> dict | None:
    status = experiment(kube, name).get("status") or {}
    return status if status.get("phase") in ("Succeeded", "Failed") else None


def events_of(kube: Kube, name: str) -> list:
    """Every decision Event posted for the experiment. Events expire (in seconds here, after an hour
    on a real cluster), so this reads what the emulator saw posted, not what is still listed."""
    return [
        event
        for event in kube.events_posted("default")
        if event.involved_object.name == name and event.reason in REASONS
    ]


REASONS = {
    contract.REASON_TRIAL_LAUNCHED,
    contract.REASON_TRIAL_TERMINATED,
    contract.REASON_HYPERPARAMETERS_MUTATED,
    contract.REASON_TRIAL_SCALED,
    contract.REASON_EXPERIMENT_SUCCEEDED,
    contract.REASON_EXPERIMENT_FAILED,
    contract.REASON_DECISION_REJECTED,
    contract.REASON_DECISION_PENDING_APPROVAL,
}


def ledger_of(kube: Kube, name: str):
    config_map = kube.core_v1().read_namespaced_config_map(f"{name}-ledger", "default")
    records, problems = ledger_format.decode(config_map.data["ledger.jsonl"])
    assert problems == []
    return records


def manifest(name: str = "quickstart", **spec_changes) -> dict:
    body = copy.deepcopy(QUICKSTART)
    body["metadata"] = {"name": name, "namespace": "default"}
    body["spec"].update(spec_changes)
    return body


@pytest.mark.parametrize(
    "kube_release",
    [pytest.param(SINGLE_NAMESPACE, id="single-namespace"), pytest.param(ALL_NAMESPACES, id="all-namespaces")],
)
async def test_quickstart_runs_to_success_and_records_every_decision(
    kube: Kube, fake_node, kube_release: OperatorRelease
) -> None:
    """As a cluster admin installs the chart, in either namespace mode: the operator is its
    ServiceAccount, with exactly the chart's RBAC, watching what the Deployment's arguments say."""
    applied = manifest()
    async with run_kopf_operator(HANDLERS, **kube_release.kopf_options()):
        kube.apply(applied)
        status = await aeventually(lambda: finished(kube, "quickstart"), timeout=240, interval=1)

    assert status["phase"] == "Succeeded", status.get("message")
    assert [d.attributes for d in kube.forbidden()] == []  # no 403 on the way
    # ... and nothing granted that it does not use (tests/controller/test_rbac.py names the exceptions).
    unused = unused_rules(kube_release, kube.decisions())
    assert unused == [], "granted but never used: remove from helm/trainpilot/templates (or explain in test_rbac.py)"
    assert status["bestTrial"]["objective"] < 2.0
    assert status["observedGeneration"] == experiment(kube, "quickstart")["metadata"]["generation"]

    records = ledger_of(kube, "quickstart")
    assert [r.seq for r in records] == list(range(len(records))) == list(range(status["decisionsMade"]))
    diverging = next(r for r in records if r.decision.action == "terminate" and r.decision.trial == "quickstart-t000")
    # lr 5 blows up within a few steps: the trainer's spike counter, or its first non-finite loss
    assert diverging.decision.reason in ("nonfinite-loss", "loss-spike")
    relaunch = next(r for r in records if r.decision.parent == "quickstart-t000")
    assert relaunch.decision.hyperparameters["lr"] == pytest.approx(0.5)  # 5.0 x 0.1
    assert records[-1].decision.action == "complete"

    # Every record is announced once, under the contract's reasons, with a deterministic name.
    events = events_of(kube, "quickstart")
    uid = experiment(kube, "quickstart")["metadata"]["uid"]  # Event names: <decision id>.<experiment uid>
    assert sorted(event.metadata.name for event in events) == sorted(f"{r.id}.{uid}" for r in records)
    by_name = {event.metadata.name.removesuffix(f".{uid}"): event for event in events}
    assert by_name[diverging.id].reason == contract.REASON_TRIAL_TERMINATED
    assert by_name[relaunch.id].reason == contract.REASON_TRIAL_LAUNCHED
    assert by_name[records[-1].id].reason == contract.REASON_EXPERIMENT_SUCCEEDED

    live = experiment(kube, "quickstart")
    last = json.loads(live["metadata"]["annotations"][contract.ANNOTATION_LAST_DECISION])
    assert last["id"] == records[-1].id and last["action"] == "complete"
    assert [d["id"] for d in status["decisions"]] == [r.id for r in records][-20:]

    # The user's spec is never rewritten: every field they wrote is still exactly what they wrote.
    for key, value in applied["spec"].items():
        if isinstance(value, dict):
            for inner, inner_value in value.items():
                assert live["spec"][key][inner] == inner_value, f"spec.{key}.{inner} changed"
        elif key != "searchSpace":  # the schema default log: false is added to each item
            assert live["spec"][key] == value, f"spec.{key} changed"

    # The best trial's Job (terminated trials' Jobs are deleted) carries the contract's metadata.
    best = status["bestTrial"]["name"]
    launch = next(r for r in records if r.new_trial == best)
    job = kube.batch_v1().read_namespaced_job(best, "default")
    assert job.metadata.labels == {contract.LABEL_EXPERIMENT: "quickstart", contract.LABEL_TRIAL: best}
    hyperparameters = json.loads(job.metadata.annotations[contract.ANNOTATION_HYPERPARAMETERS])
    assert hyperparameters == launch.decision.hyperparameters
    assert job.metadata.annotations[contract.ANNOTATION_DECISION] == launch.id
    assert job.metadata.owner_references[0].name == "quickstart"
    # Its pod's termination message carries the trainer's final gauges into the pod status.
    pods = kube.core_v1().list_namespaced_pod("default", label_selector=f"{contract.LABEL_TRIAL}={best}").items
    message = json.loads(pods[0].status.container_statuses[0].state.terminated.message)
    assert message["trainpilot_step"] == 300 and message["trainpilot_val_loss"] == pytest.approx(
        status["bestTrial"]["objective"]
    )
    terminated = {r.decision.trial for r in records if r.decision.action == "terminate"}
    remaining = {j.metadata.name for j in kube.batch_v1().list_namespaced_job("default").items}
    assert not terminated & remaining


async def test_operator_restarts_mid_run_without_duplicates(kube: Kube, fake_node) -> None:
    kube.apply(manifest())
    async with run_kopf_operator(HANDLERS, namespace="default"):
        await aeventually(lambda: len(ledger_of(kube, "quickstart")) >= 3, timeout=120, interval=0.5)
    # The operator is gone; trials kept running. Start a new one from the same status and ledger.
    async with run_kopf_operator(HANDLERS, namespace="default"):
        status = await aeventually(lambda: finished(kube, "quickstart"), timeout=240, interval=1)

    assert status["phase"] == "Succeeded"
    records = ledger_of(kube, "quickstart")
    assert [r.seq for r in records] == list(range(len(records)))
    launched = [r.new_trial for r in records if r.outcome == "executed" and r.new_trial]
    assert len(launched) == len(set(launched)) == len(status["trials"])
    # One Event per record, by name. The restarted operator re-posts the Events of the records it
    # replays (idempotent on a real cluster, where they live an hour); here they may have expired
    # in the 5 s since, and then come back: the same Event again, never a second one.
    uid = experiment(kube, "quickstart")["metadata"]["uid"]
    assert {event.metadata.name for event in events_of(kube, "quickstart")} == {f"{r.id}.{uid}" for r in records}


# What the API server refuses at admission (the CRD's schema and CEL rules): 422, with the field
# the cause names and the message the CRD gives. Such a spec never reaches the operator.
REFUSED_BY_THE_API_SERVER = {
    "min above max": (
        {"searchSpace": [{"name": "lr", "min": 1.0, "max": 0.1}]},
        "spec.searchSpace[0]",
        "min must be below max",
    ),
    "unknown hyperparameter": (
        {"searchSpace": [{"name": "learning_rate", "min": 0.1, "max": 1.0}]},
        "spec.searchSpace[0].name",
        'Unsupported value: "learning_rate"',
    ),
    "initial trial outside": (
        {"initialTrials": [{"lr": 50.0}]},
        "spec.initialTrials",
        "every value must lie within [min, max]",
    ),
    "parallel over max": (
        {"budget": {"maxTrials": 1, "parallelTrials": 2}},
        "spec.budget.parallelTrials",
        "budget.parallelTrials must not exceed budget.maxTrials",
    ),
    "log with zero min": (
        {"searchSpace": [{"name": "lr", "min": 0.0, "max": 1.0, "log": True}]},
        "spec.searchSpace[0]",
        "log: true needs min > 0",
    ),
    "range and values": (
        {"searchSpace": [{"name": "lr", "min": 0.1, "max": 1.0, "values": [0.5]}]},
        "spec.searchSpace[0]",
        "give either values, or both min and max",
    ),
    "duplicate parameter": (
        {"searchSpace": [{"name": "lr", "min": 0.1, "max": 1.0}, {"name": "lr", "min": 0.2, "max": 0.3}]},
        "spec.searchSpace",
        "Duplicate value",
    ),
}
# What only the operator can judge (the trainer's own settings, the policy's availability): the
# API server admits these, and the operator marks them Valid=False with its message.
JUDGED_BY_THE_OPERATOR = {
    "bad template value": (
        {"trialTemplate": {"hyperparameters": {"n_embd": 30, "n_head": 4}}},
        "n_embd (30) must be divisible by n_head (4)",
    ),
    "fp16 on cpu": ({"trialTemplate": {"hyperparameters": {"precision": "fp16", "device": "cpu"}}}, "fp16"),
    "fixed and searched": ({"trialTemplate": {"hyperparameters": {"lr": 0.1}}}, "which searchSpace also moves"),
    "claude without an API key": ({"policy": {"type": "claude"}}, "ANTHROPIC_API_KEY"),
    "typo in template field": ({"trialTemplate": {"hyperparameters": {"n_layers": 2}}}, "n_layers"),
}


async def test_invalid_experiments_are_reported_and_the_operator_stays_up(kube: Kube, fake_node) -> None:
    """What the CRD's schema and CEL rules express, the API server refuses; the rest becomes Valid=False."""
    base = {
        "searchSpace": [{"name": "lr", "min": 1e-4, "max": 1.0, "log": True}],
        "budget": {"maxTrials": 1, "parallelTrials": 1},
    }
    path = f"/apis/{contract.GROUP}/{contract.VERSION}/namespaces/default/{contract.EXPERIMENT_PLURAL}"

    def body(name: str, spec_change: dict) -> dict:
        return {
            "apiVersion": contract.API_VERSION,
            "kind": contract.EXPERIMENT_KIND,
            "metadata": {"name": name, "namespace": "default"},
            "spec": {**base, **spec_change},
        }

    async with run_kopf_operator(HANDLERS, namespace="default"):
        for index, (label, (spec_change, field, message)) in enumerate(REFUSED_BY_THE_API_SERVER.items()):
            status, reply = kube.request("POST", path, body(f"refused-{index}", spec_change))
            assert (status, reply.get("reason")) == (422, "Invalid"), (label, reply)
            assert message in reply["message"], (label, reply["message"])
            assert field in [cause["field"] for cause in reply["details"]["causes"]], (label, reply["details"])
        names = {}
        for index, (label, (spec_change, _)) in enumerate(JUDGED_BY_THE_OPERATOR.items()):
            status, reply = kube.request("POST", path, body(f"judged-{index}", spec_change))
            assert status == 201, (label, reply)
            names[label] = f"judged-{index}"
        # A valid experiment next to them still runs to the end.
        good = manifest("still-works", budget={"maxTrials": 1, "parallelTrials": 1}, initialTrials=[{"lr": 0.01}])
        kube.apply(good)
        for label, (_, expected) in JUDGED_BY_THE_OPERATOR.items():
            name = names[label]
            status = await aeventually(
                lambda name=name: (
                    (experiment(kube, name).get("status") or {}).get("phase") == "Invalid"
                    and experiment(kube, name)["status"]
                ),
                timeout=60,
                message=label,
            )
            condition = next(c for c in status["conditions"] if c["type"] == "Valid")
            assert condition["status"] == "False" and expected in condition["message"], (label, condition)
            selector = f"{contract.LABEL_EXPERIMENT}={name}"
            assert kube.batch_v1().list_namespaced_job("default", label_selector=selector).items == []
        done = await aeventually(lambda: finished(kube, "still-works"), timeout=180, interval=1)
        assert done["phase"] == "Succeeded"
    # Nothing the API server refused ever existed for the operator to see.
    listed = kube.custom().list_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL
    )["items"]
    assert not [e for e in listed if e["metadata"]["name"].startswith("refused-")]


async def test_a_failing_job_and_a_hanging_scrape_are_survived(kube: Kube, fake_node) -> None:
    hang = (
        "import socket, time\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "import os; s.bind((os.environ['TRAINPILOT_METRICS_ADDR'], int(os.environ['TRAINPILOT_METRICS_PORT'])))\n"
        "s.listen(); conns = []\n"
        "end = time.time() + 6\n"
        "s.settimeout(0.2)\n"
        "while time.time() < end:\n"
        "    try: conns.append(s.accept())\n"  # accept, never answer: the scrape must time out
        "    except OSError: pass\n"
        "raise SystemExit(1)\n"
    )
    crashing = manifest(
        "crashing",
        initialTrials=[],
        # Two trials and no third: both crash, whichever cycle sees them go, and 2 > maxFailedTrials.
        budget={"maxTrials": 2, "parallelTrials": 2, "maxFailedTrials": 1},
        trialTemplate={**QUICKSTART["spec"]["trialTemplate"], "command": ["python", "-c", hang]},
        metrics={"port": 9400, "path": "/metrics", "scrapeTimeoutSeconds": 0.5},
    )
    async with run_kopf_operator(HANDLERS, namespace="default"):
        kube.apply(crashing)
        status = await aeventually(lambda: finished(kube, "crashing"), timeout=120, interval=1)
    assert status["phase"] == "Failed"
    assert status["trialsFailed"] == 2
    records = ledger_of(kube, "crashing")
    assert records[-1].decision.reason == "too-many-failures"
    failed_event = [e for e in events_of(kube, "crashing") if e.reason == contract.REASON_EXPERIMENT_FAILED]
    assert len(failed_event) == 1 and failed_event[0].type == "Warning"
    assert all(trial["state"] == "Failed" for trial in status["trials"])


async def test_a_vanished_pod_fails_its_trial_and_the_experiment_goes_on(kube: Kube, fake_node) -> None:
    def running_pod(trial: str):
        selector = f"{contract.LABEL_TRIAL}={trial}"
        pods = kube.core_v1().list_namespaced_pod("default", label_selector=selector).items
        return next((p for p in pods if p.status.phase == "Running"), None)

    def step_of(trial: str) -> int:
        status = experiment(kube, "quickstart").get("status") or {}
        return next((t.get("step", 0) for t in status.get("trials", []) if t["name"] == trial), 0)

    async with run_kopf_operator(HANDLERS, namespace="default"):
        kube.apply(manifest(budget={"maxTrials": 4, "parallelTrials": 2, "maxFailedTrials": 2}))
        await aeventually(lambda: step_of("quickstart-t001") > 0, timeout=120, interval=0.5)
        pod = await aeventually(lambda: running_pod("quickstart-t001"), timeout=30)
        kube.core_v1().delete_namespaced_pod(pod.metadata.name, "default", grace_period_seconds=0)
        status = await aeventually(lambda: finished(kube, "quickstart"), timeout=240, interval=1)

    vanished = next(t for t in status["trials"] if t["name"] == "quickstart-t001")
    assert vanished["state"] == "Failed", vanished
    assert status["trialsFailed"] >= 1
    assert status["phase"] == "Succeeded" and status["bestTrial"]["name"] != "quickstart-t001"


async def test_deleting_an_experiment_removes_its_children_without_hanging(kube: Kube, fake_node) -> None:
    selector = f"{contract.LABEL_EXPERIMENT}=quickstart"

    def children() -> list[str]:
        core, batch = kube.core_v1(), kube.batch_v1()
        found = [j.metadata.name for j in batch.list_namespaced_job("default", label_selector=selector).items]
        found += [s.metadata.name for s in core.list_namespaced_service("default", label_selector=selector).items]
        found += [c.metadata.name for c in core.list_namespaced_config_map("default", label_selector=selector).items]
        found += [p.metadata.name for p in core.list_namespaced_pod("default", label_selector=selector).items]
        return found

    def gone() -> bool:
        try:
            experiment(kube, "quickstart")
        except Exception as error:  # ApiException 404
            return getattr(error, "status", None) == 404
        return False

    async with run_kopf_operator(HANDLERS, namespace="default"):
        kube.apply(manifest())
        await aeventually(lambda: len([c for c in children() if c.endswith("-config")]) >= 2, timeout=60)
        kube.custom().delete_namespaced_custom_object(
            contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, "quickstart"
        )
        await aeventually(gone, timeout=30, message="the daemon's finalizer is released")
        await aeventually(lambda: children() == [], timeout=60, message="children garbage-collected")
