"""`trainpilot operator` and `trainpilot history` as a user runs them: separate processes, KUBECONFIG login."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.kube import Kube, aeventually
from tests.support.paths import QUICKSTART_PATH
from trainpilot.api import contract

pytestmark = pytest.mark.slow

QUICKSTART = yaml.safe_load(QUICKSTART_PATH.read_text())


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def phase(kube: Kube, name: str) -> str | None:
    body = kube.custom().get_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, name
    )
    return (body.get("status") or {}).get("phase")


async def test_operator_command_serves_healthz_runs_an_experiment_and_history_reads_the_ledger(
    kube: Kube, fake_node, tmp_path: Path
) -> None:
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig)}  # a user's (an admin's), for `history`
    env.pop("KUBERNETES_SERVICE_HOST", None)
    # The operator runs as the chart's Deployment would: its ServiceAccount, its watch arguments.
    operator_env = {**env, "KUBECONFIG": str(kube.operator_kubeconfig)}
    log = (tmp_path / "operator.log").open("w")
    command = [
        sys.executable,
        "-m",
        "trainpilot.cli",
        "operator",
        *kube.release.cli_args(),
        "--liveness",
        liveness,
        "--standalone",
    ]
    operator = subprocess.Popen(command, env=operator_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        await aeventually(lambda: healthy(liveness), timeout=60, message="liveness endpoint")
        body = copy.deepcopy(QUICKSTART)
        body["metadata"] = {"name": "one-trial", "namespace": "default"}
        body["spec"]["initialTrials"] = [{"lr": 0.01}]
        body["spec"]["budget"] = {"maxTrials": 1, "parallelTrials": 1}
        kube.apply(body)
        await aeventually(lambda: phase(kube, "one-trial") == "Succeeded", timeout=180, interval=1)
        assert operator.poll() is None, "the operator exited"
        assert [d.attributes for d in kube.forbidden()] == []  # the chart's RBAC was enough
    finally:
        operator.send_signal(signal.SIGINT)
        try:
            operator.wait(30)
        except subprocess.TimeoutExpired:
            operator.kill()
        log.close()
    output = (tmp_path / "operator.log").read_text()
    assert "TrialLaunched" in output or "one-trial-d00000" in output, output[-2000:]

    history = subprocess.run(
        [sys.executable, "-m", "trainpilot.cli", "history", "one-trial", "--namespace", "default"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert history.returncode == 0, history.stderr
    lines = history.stdout.splitlines()
    assert lines[0].split()[:4] == ["TIME", "ID", "POLICY", "ACTION"]
    assert any("one-trial-d00000" in line and "launch" in line for line in lines)
    assert any("complete" in line for line in lines)
