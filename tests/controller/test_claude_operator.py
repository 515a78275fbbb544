"""The operator with `policy.type: claude`, on the emulated cluster with the chart's RBAC and real
trainers, Claude scripted by the local Messages API (tests/support/messages_api.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.controller.test_operator_e2e import HANDLERS, experiment, finished, ledger_of, manifest
from tests.support.kube import Kube, aeventually, run_kopf_operator
from tests.support.messages_api import MessagesApi, tool_reply
from tests.support.paths import REPO
from trainpilot.api import contract
from trainpilot.controller import metrics

pytestmark = pytest.mark.slow

KEY = "sk-ant-api03-operator-SECRET-never-in-the-cluster"
CLAUDE_LR = 0.02


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


async def test_the_quickstart_with_a_scripted_claude_on_the_cluster(
    kube: Kube, fake_node, messages_api: MessagesApi, monkeypatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)  # what the chart's secretKeyRef gives the operator
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_api.url)
    launch = {
        "action": "launch",
        "reason": "between-the-two",
        "rationale": "lr between the survivors",
        "hyperparameters": {"lr": CLAUDE_LR, "weight_decay": 0.01},
        "confidence": 0.6,
    }
    messages_api.will(tool_reply([launch]))
    policy = {"type": "claude", "intervalSeconds": 2, "claude": {"overrideShare": 1.0, "minIntervalSeconds": 0}}
    decided_by_claude = (
        metrics.REGISTRY.get_sample_value(
            contract.METRIC_OPERATOR_DECISIONS,
            {"action": "launch", "policy": "claude", "outcome": "executed"},
        )
        or 0.0
    )
    async with run_kopf_operator(HANDLERS, namespace="default"):
        kube.apply(manifest(policy=policy))
        status = await aeventually(lambda: finished(kube, "quickstart"), timeout=240, interval=1)

    assert status["phase"] == "Succeeded", status.get("message")
    assert [d.attributes for d in kube.forbidden()] == []
    records = ledger_of(kube, "quickstart")
    by_claude = [r for r in records if r.decision.policy == "claude"]
    assert by_claude and all(r.decision.action == "launch" and r.outcome == "executed" for r in by_claude)
    assert any(r.decision.hyperparameters.get("lr") == CLAUDE_LR for r in by_claude)
    assert status["modelUsage"]["calls"] == len(messages_api.requests) > 0
    assert status["modelUsage"]["inputTokens"] == 900 * len(messages_api.requests)
    counted = metrics.REGISTRY.get_sample_value(
        contract.METRIC_OPERATOR_DECISIONS, {"action": "launch", "policy": "claude", "outcome": "executed"}
    )
    assert counted == decided_by_claude + len(by_claude)
    # The key is in no object the operator wrote: status, annotations, ledger, Events, trial config.
    written = json.dumps(experiment(kube, "quickstart")) + json.dumps(
        [cm.to_dict() for cm in kube.core_v1().list_namespaced_config_map("default").items], default=str
    )
    written += json.dumps([e.to_dict() for e in kube.events_posted("default")], default=str)
    written += json.dumps([j.to_dict() for j in kube.batch_v1().list_namespaced_job("default").items], default=str)
    assert KEY not in written

    # The exact prompt and answer of every call, in the cluster: size-bounded ConfigMaps owned by the experiment.
    archived = kube.core_v1().read_namespaced_config_map("quickstart-prompts", "default")
    kept = [json.loads(line) for line in archived.data["lines"].splitlines()]
    assert [exchange["prompt"] for exchange in kept] == messages_api.prompts()
    assert all(exchange["answer"]["decisions"] == [launch] for exchange in kept if "answer" in exchange)
    assert archived.metadata.owner_references[0].name == "quickstart"
    # An auditor replays the run from the cluster alone: Claude's recorded answers give its decisions again.
    done = subprocess.run(
        [sys.executable, "-m", "trainpilot.cli", "replay", "quickstart", "-n", "default", "--from-archive"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "with the claude policy" in done.stdout and " 0 cycle(s) differ" in done.stdout
