"""The bounded cycle log and prompt archive in ConfigMaps, written as the chart's ServiceAccount:
rotated like the ledger, but only the newest segments kept, so a long experiment cannot fill etcd."""

from __future__ import annotations

import copy

import pytest

from tests.runtime.kubernetes.test_incarnations import hold_garbage_collector
from tests.support.kube import Kube
from tests.support.paths import QUICKSTART_PATH
from trainpilot.api import contract
from trainpilot.runtime.kubernetes import logs
from trainpilot.runtime.kubernetes.api import KubeApi


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


@pytest.fixture
def owner(kube: Kube) -> dict:
    """A real experiment to own the logs (the garbage collector deletes what an absent owner owns)."""
    import yaml

    body = copy.deepcopy(yaml.safe_load(QUICKSTART_PATH.read_text()))
    body["metadata"] = {"name": "exp", "namespace": "default"}
    kube.apply(body)
    stored = kube.custom().get_namespaced_custom_object(
        contract.GROUP, contract.VERSION, "default", contract.EXPERIMENT_PLURAL, "exp"
    )
    return {"metadata": stored["metadata"]}


def names(kube: Kube) -> list[str]:
    return sorted(cm.metadata.name for cm in kube.core_v1().list_namespaced_config_map("default").items)


async def test_the_log_rotates_keeps_the_newest_segments_and_reads_back_in_order(
    kube: Kube, owner: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "SEGMENT_BYTES", 1000)
    monkeypatch.setattr(logs, "KEEP_SEGMENTS", 3)
    api = KubeApi(kube.operator_api_client())
    log = logs.ConfigMapLog(api, owner, logs.CYCLES)
    lines = [f"{n:04d} " + "x" * 94 + "\n" for n in range(60)]  # 100 bytes each: 10 to a segment
    for line in lines:
        await log.append(line)
    kept = names(kube)
    assert kept == ["exp-cycles", "exp-cycles-3", "exp-cycles-4", "exp-cycles-5"]  # 1 and 2 deleted
    for config_map in kube.core_v1().list_namespaced_config_map("default").items:
        assert len(config_map.data["lines"].encode()) <= 1000
        assert config_map.metadata.owner_references[0].uid == owner["metadata"]["uid"]
        assert config_map.metadata.labels["trainpilot.dev/cycles"] == "true"
    text = await logs.read_log(api, "exp", "default", logs.CYCLES)
    assert text == "".join(lines[20:])  # a contiguous, ordered suffix ending in the newest line
    # A restarted operator carries on in the same segments.
    again = logs.ConfigMapLog(api, owner, logs.CYCLES)
    await again.append("last\n")
    assert (await logs.read_log(api, "exp", "default", logs.CYCLES)).endswith(lines[-1] + "last\n")
    assert [denied.attributes for denied in kube.forbidden()] == []


async def test_an_absent_log_reads_empty_and_another_incarnations_segments_are_not_read(
    kube: Kube, owner: dict
) -> None:
    api = KubeApi(kube.operator_api_client())
    assert await logs.read_log(api, "exp", "default", logs.PROMPTS) == ""
    hold_garbage_collector(kube)  # the earlier experiment's segment, not yet collected
    old = logs.ConfigMapLog(api, {"metadata": {**owner["metadata"], "uid": "uid-0"}}, logs.PROMPTS)
    old._archived = 1  # as if the earlier experiment of this name had rotated once
    await old._rotate("old\n")
    current = logs.ConfigMapLog(api, owner, logs.PROMPTS)
    current._archived = 0
    await current.append("new\n")
    kube.core_v1().patch_namespaced_config_map(
        "exp-prompts", "default", {"data": {logs.KEY_SEGMENTS: "2"}}
    )  # claims the earlier incarnation's segment 2 as its own
    assert await logs.read_log(api, "exp", "default", logs.PROMPTS) == "new\n"
