"""The operator SIGKILLed at random points of random cycles, over and over, while an experiment runs.

`trainpilot operator` runs as a process of its own (the chart's ServiceAccount, exactly its RBAC,
its leader election), against the emulated API server; the fake node runs fake trainers. A seeded
draw picks each kill: after the process has made its first cycle (its status write), at a random
moment within the next interval, so kills land before, during and after the ledger write, the
Job create, the status patch and the Event post. A new process (the same pod, as after a kubelet
restart) starts each time. Then: no trial twice, no decision twice or lost, no Event lost.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.controller.test_operator_e2e import QUICKSTART, events_of, experiment, ledger_of
from tests.support.kube import Kube, aeventually
from tests.support.localkit import FAKE_TRAINER

pytestmark = pytest.mark.slow

KILLS = 30
NAME = "quickstart"  # events_of and ledger_of read the quickstart's name


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


def manifest() -> dict:
    body = copy.deepcopy(QUICKSTART)
    body["metadata"] = {"name": NAME, "namespace": "default"}
    spec = body["spec"]
    spec["initialTrials"] = [{"lr": 0.01}, {"lr": 0.02}]
    spec["budget"] = {"maxTrials": 8, "parallelTrials": 2, "maxFailedTrials": 2}
    spec["policy"] = {"type": "heuristic", "intervalSeconds": 1}
    spec["trialTemplate"].update(
        command=["python", str(FAKE_TRAINER)], env={"FAKE_STEP_SECONDS": "0.04", "FAKE_METRICS_PATH": "/metrics"}
    )
    spec["trialTemplate"]["hyperparameters"].update(max_steps=800, eval_interval=50, checkpoint_interval=100)
    return body


def start_operator(kube: Kube, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "KUBECONFIG": str(kube.operator_kubeconfig),
        "TRAINPILOT_OPERATOR_NAMESPACE": "default",
        "TRAINPILOT_OPERATOR_IDENTITY": "tp-trainpilot-0",  # the same pod each time, as after a container restart
    }
    args = [sys.executable, "-m", "trainpilot.cli", "operator", "--namespace=default", "--liveness="]
    args += ["--metrics-port=0", "--standalone"]
    with open(log, "a") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)


def last_cycle(kube: Kube) -> str | None:
    return (experiment(kube, NAME).get("status") or {}).get("lastCycleTime")


async def cycled(kube: Kube, process: subprocess.Popen, before: str | None) -> None:
    """Until the process has made a cycle (or died)."""
    await aeventually(lambda: last_cycle(kube) != before or process.poll() is not None, timeout=60, interval=0.05)


def phase(kube: Kube) -> str | None:
    return (experiment(kube, NAME).get("status") or {}).get("phase")


async def test_thirty_sigkills_at_random_points_lose_nothing_and_do_nothing_twice(
    kube: Kube, fake_node, tmp_path: Path
) -> None:
    draw = random.Random(7)
    log = tmp_path / "operator.log"
    kube.apply(manifest())
    kills, started = 0, time.monotonic()
    while kills < KILLS and phase(kube) not in ("Succeeded", "Failed"):
        before = last_cycle(kube)
        process = start_operator(kube, log)
        try:
            await cycled(kube, process, before)
            assert process.poll() is None, log.read_text()[-3000:]
            await asyncio.sleep(draw.uniform(0.0, 1.2))  # somewhere in the next cycle
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        kills += 1
    process = start_operator(kube, log)
    try:
        await aeventually(lambda: phase(kube) in ("Succeeded", "Failed"), timeout=300, interval=0.5)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    elapsed = time.monotonic() - started

    assert kills >= KILLS, f"the experiment ended after {kills} kills: make it longer"
    status = experiment(kube, NAME)["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    records = ledger_of(kube, NAME)
    # No decision lost or made twice: a gap-free ledger, status counting exactly it, unique ids.
    assert [r.seq for r in records] == list(range(len(records))) and status["decisionsMade"] == len(records)
    assert len({r.id for r in records}) == len(records)
    # No duplicate trial: each launched once, each in status once, at most one Job each.
    launched = [r.new_trial for r in records if r.outcome == "executed" and r.new_trial]
    assert len(launched) == len(set(launched)) == len(status["trials"])
    assert Counter(t["name"] for t in status["trials"]) == Counter(launched)
    jobs = {job.metadata.name for job in kube.batch_v1().list_namespaced_job("default").items}
    assert jobs <= set(launched), jobs - set(launched)  # no Job that is not a recorded trial
    stopped = Counter(r.decision.trial for r in records if r.decision.action == "terminate" and r.outcome == "executed")
    assert all(count == 1 for count in stopped.values()), stopped
    # No Event lost: every record announced, under its deterministic name (re-posts are the same Event).
    uid = experiment(kube, NAME)["metadata"]["uid"]
    assert {e.metadata.name for e in events_of(kube, NAME)} == {f"{r.id}.{uid}" for r in records}
    print(
        f"{kills} SIGKILLs in {elapsed:.0f} s: {len(records)} decisions, {len(launched)} trials, "
        "0 duplicate trials, 0 duplicate or lost decisions, 0 lost Events"
    )
