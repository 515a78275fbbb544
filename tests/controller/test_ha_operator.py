"""High availability: two operator replicas on one cluster, one acting at a time (the Lease holder),
the other taking over when the first dies, and no decision made twice.

Both are the chart's ServiceAccount with exactly its RBAC (the leader Role included), on the
emulated API server with the fake node's real trainers; short lease timings keep it quick.
"""

from __future__ import annotations

import asyncio
import time

import kopf
import pytest

from tests.controller.test_operator_e2e import HANDLERS, events_of, experiment, finished, ledger_of, manifest
from tests.support.kube import KopfOperator, Kube, aeventually
from trainpilot.controller.leader import LEASE_NAME, LeaseTiming

pytestmark = pytest.mark.slow

TIMING = LeaseTiming(lease_seconds=4.0, renew_deadline_seconds=3.0, renew_seconds=0.5, retry_seconds=0.5)
# A standby takes over once it has seen the Lease unchanged for lease_seconds, trying every
# retry_seconds; the slack covers the emulator and two kopf event loops on a small machine.
TAKEOVER_BOUND_SECONDS = TIMING.lease_seconds + TIMING.retry_seconds + 3.0


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


def holder(kube: Kube) -> str | None:
    try:
        lease = kube.coordination_v1().read_namespaced_lease(LEASE_NAME, "default")
    except Exception:  # noqa: BLE001 - not created yet
        return None
    return lease.spec.holder_identity


def replica(name: str, dies: bool = False) -> KopfOperator:
    memo = kopf.Memo(leader_namespace="default", leader_identity=name, leader_timing=TIMING, leader_dies=dies)
    return KopfOperator(HANDLERS, namespace="default", memo=memo)


async def test_one_replica_acts_the_other_takes_over_when_it_dies_and_nothing_is_decided_twice(
    kube: Kube, fake_node
) -> None:
    first, second = replica("replica-a", dies=True), replica("replica-b")
    await asyncio.to_thread(first.start)
    try:
        await aeventually(lambda: holder(kube) == "replica-a", timeout=30, interval=0.2)
        await asyncio.to_thread(second.start)
        kube.apply(manifest())
        await aeventually(lambda: len(ledger_of(kube, "quickstart")) >= 3, timeout=120, interval=0.2)
        # The standby watches and waits: it never leads while the holder renews.
        for _ in range(10):
            assert holder(kube) == "replica-a" and not second.memo.leader.leading
            await asyncio.sleep(0.3)
        before = len(ledger_of(kube, "quickstart"))
    finally:
        died = time.monotonic()
        await asyncio.to_thread(first.stop)  # its Lease is not given up: as after a SIGKILL
    try:
        await aeventually(lambda: holder(kube) == "replica-b", timeout=30, interval=0.1)
        takeover = time.monotonic() - died
        status = await aeventually(lambda: finished(kube, "quickstart"), timeout=240, interval=1)
    finally:
        await asyncio.to_thread(second.stop)

    assert takeover <= TAKEOVER_BOUND_SECONDS, f"took {takeover:.1f} s to take over"
    assert status["phase"] == "Succeeded", status.get("message")
    records = ledger_of(kube, "quickstart")
    assert len(records) > before  # the second replica went on deciding
    assert [r.seq for r in records] == list(range(len(records)))  # gap-free: nothing lost, nothing twice
    launched = [r.new_trial for r in records if r.outcome == "executed" and r.new_trial]
    assert len(launched) == len(set(launched)) == len(status["trials"])  # no trial launched twice
    stops = [(r.decision.trial) for r in records if r.decision.action == "terminate" and r.outcome == "executed"]
    assert len(stops) == len(set(stops))  # no trial stopped twice
    uid = experiment(kube, "quickstart")["metadata"]["uid"]
    # One Event per record, by name: the new leader re-posts those of the records it replays (the same
    # Event again, idempotent), never a second one, and none is lost.
    assert {e.metadata.name for e in events_of(kube, "quickstart")} == {f"{r.id}.{uid}" for r in records}
    assert [d.attributes for d in kube.forbidden()] == []  # the chart's leader Role covers the Lease
    print(f"takeover after the leader died: {takeover:.1f} s (lease {TIMING.lease_seconds:g} s)")
