"""The cluster ledger against the emulated API server: append-only, idempotent, rotated, complete."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.kube import Kube
from trainpilot.core.decision import Decision, DecisionRecord, decision_id
from trainpilot.runtime.base import LedgerConflict
from trainpilot.runtime.kubernetes import ledger as kube_ledger
from trainpilot.runtime.kubernetes.api import KubeApi

OWNER = {"metadata": {"name": "exp", "namespace": "default", "uid": "uid-1"}}


def record(seq: int, rationale: str = "") -> DecisionRecord:
    return DecisionRecord(
        id=decision_id("exp", seq),
        seq=seq,
        time="2026-11-22T07:00:00Z",
        experiment="exp",
        decision=Decision(
            action="terminate", policy="heuristic", reason="loss-spike", trial="exp-t000", rationale=rationale
        ),
        outcome="executed",
    )


async def test_appends_are_idempotent_and_survive_a_new_writer(kube: Kube, monkeypatch: pytest.MonkeyPatch) -> None:
    api = KubeApi(kube.operator_api_client())
    store = kube_ledger.ConfigMapLedger(api, OWNER)
    for seq in range(3):
        await store.append(record(seq))
    await store.append(record(1))  # a retried cycle
    assert [r.seq for r in await store.since(0)] == [0, 1, 2]
    fresh = kube_ledger.ConfigMapLedger(api, OWNER)  # an operator restart: reads what is stored
    assert [r.id for r in await fresh.since(0)] == [decision_id("exp", s) for s in range(3)]
    await fresh.append(record(2))
    await fresh.append(record(3))
    assert [r.seq for r in await kube_ledger.read_all(api, "exp", "default")] == [0, 1, 2, 3]


async def test_segments_rotate_and_nothing_is_lost(kube: Kube, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_ledger, "SEGMENT_BYTES", 2000)
    api = KubeApi(kube.operator_api_client())
    store = kube_ledger.ConfigMapLedger(api, OWNER)
    for seq in range(20):
        await store.append(record(seq, rationale="x" * 200))
    names = sorted(cm.metadata.name for cm in kube.core_v1().list_namespaced_config_map("default").items)
    assert "exp-ledger" in names and "exp-ledger-1" in names and len(names) > 3
    for config_map in kube.core_v1().list_namespaced_config_map("default").items:
        assert len(config_map.data["ledger.jsonl"].encode()) <= 2000
        assert config_map.metadata.owner_references[0].uid == "uid-1"
    everything = await kube_ledger.read_all(api, "exp", "default")
    assert [r.seq for r in everything] == list(range(20))


async def test_a_concurrent_writer_is_detected_not_overwritten(kube: Kube) -> None:
    api = KubeApi(kube.operator_api_client())
    first, second = kube_ledger.ConfigMapLedger(api, OWNER), kube_ledger.ConfigMapLedger(api, OWNER)
    await first.append(record(0))
    await second.since(0)
    await first.append(record(1))
    await second.append(record(2))  # its cached version is stale: it must re-read, not clobber seq 1
    await asyncio.sleep(0)
    assert [r.seq for r in await kube_ledger.read_all(api, "exp", "default")] == [0, 1, 2]


async def test_recovery_after_a_rotation_sees_every_record_not_yet_in_status(
    kube: Kube, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube_ledger, "SEGMENT_BYTES", 2000)
    api = KubeApi(kube.operator_api_client())
    writer = kube_ledger.ConfigMapLedger(api, OWNER)
    for seq in range(20):
        await writer.append(record(seq, rationale="x" * 200))
    restarted = kube_ledger.ConfigMapLedger(api, OWNER)  # status saved after decision 2, then a crash
    tail = await restarted.since(3)
    assert [r.seq for r in tail] == list(range(3, 20))  # across every archived segment, in order
    assert [r.seq for r in await restarted.since(19)] == [19]
    assert await restarted.since(20) == []


async def test_a_different_record_under_an_id_already_in_the_ledger_is_refused(
    kube: Kube, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube_ledger, "SEGMENT_BYTES", 2000)
    api = KubeApi(kube.operator_api_client())
    writer = kube_ledger.ConfigMapLedger(api, OWNER)
    for seq in range(12):
        await writer.append(record(seq, rationale="x" * 200))
    other = kube_ledger.ConfigMapLedger(api, OWNER)
    for seq in (11, 1):  # in the current segment, and in an archived one
        with pytest.raises(LedgerConflict, match=f"exp-d{seq:05d} is already in the ledger"):
            await other.append(record(seq, rationale="decided apart"))
        await other.append(record(seq, rationale="x" * 200))  # the very same record: a retry, a no-op
    assert [r.rationale for r in (r.decision for r in await kube_ledger.read_all(api, "exp", "default"))] == [
        "x" * 200
    ] * 12
