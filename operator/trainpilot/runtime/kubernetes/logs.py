"""Bounded logs in ConfigMaps: the cycle log and the prompt archive of an experiment in a cluster.

Lines go to `<experiment>-<stem>`; when it would pass SEGMENT_BYTES it is copied to
`<experiment>-<stem>-<n>` and started afresh, like the ledger, but unlike the ledger (which keeps
everything) only the newest KEEP_SEGMENTS copies are kept: these logs serve replay and audit of
recent cycles, and an experiment that runs for weeks must not fill etcd. Writes are best effort
for the loop (a failure is logged; the ledger is the record), and owned by the experiment, so
deleting it deletes them.
"""

from __future__ import annotations

import logging
from typing import Any

from trainpilot.runtime.kubernetes.api import KubeApi, NotFound
from trainpilot.runtime.kubernetes.builders import owned_config_map
from trainpilot.runtime.kubernetes.ownership import controller_uid, create_owned

logger = logging.getLogger(__name__)

SEGMENT_BYTES = 512 * 1024
KEEP_SEGMENTS = 8
KEY_LINES = "lines"
KEY_SEGMENTS = "archived-segments"
CYCLES = "cycles"
PROMPTS = "prompts"


def log_name(experiment: str, stem: str, segment: int | None = None) -> str:
    return f"{experiment}-{stem}" if segment is None else f"{experiment}-{stem}-{segment}"


class ConfigMapLog:
    def __init__(self, api: KubeApi, owner: dict[str, Any], stem: str) -> None:
        self.api, self.owner, self.stem = api, owner, stem
        self.namespace = owner["metadata"]["namespace"]
        self.experiment = owner["metadata"]["name"]
        self._text: str | None = None
        self._archived = 0
        self._version: str | None = None

    @property
    def name(self) -> str:
        return log_name(self.experiment, self.stem)

    async def append(self, lines: str) -> None:
        if self._text is None:
            await self._load()
        text = self._text or ""
        if text and len(text.encode()) + len(lines.encode()) > SEGMENT_BYTES:
            await self._rotate(text)
            text = ""
        manifest = self._manifest(self.name, text + lines, self._archived)
        if self._version is None:
            await create_owned(
                self.api, self.name, self.api.core.create_namespaced_config_map, self.namespace, manifest
            )
            self._text = None  # read its version back before the next write
            return
        manifest["metadata"]["resourceVersion"] = self._version
        try:
            result = await self.api.call(
                self.name, self.api.core.replace_namespaced_config_map, self.name, self.namespace, manifest
            )
        except Exception:
            self._text = None  # a conflict or a failure: re-read before the next write
            raise
        self._text, self._version = text + lines, result.metadata.resource_version

    async def _load(self) -> None:
        try:
            found = await self.api.call(self.name, self.api.core.read_namespaced_config_map, self.name, self.namespace)
        except NotFound:
            self._text, self._archived, self._version = "", 0, None
            return
        data = found.data or {}
        self._text, self._archived = data.get(KEY_LINES, ""), int(data.get(KEY_SEGMENTS, "0"))
        self._version = found.metadata.resource_version

    async def _rotate(self, text: str) -> None:
        self._archived += 1
        copy = log_name(self.experiment, self.stem, self._archived)
        await create_owned(
            self.api, copy, self.api.core.create_namespaced_config_map, self.namespace, self._manifest(copy, text, None)
        )
        dropped = self._archived - KEEP_SEGMENTS
        if dropped >= 1:
            await self.api.delete_if_present(
                copy,
                self.api.core.delete_namespaced_config_map,
                log_name(self.experiment, self.stem, dropped),
                self.namespace,
            )

    def _manifest(self, name: str, text: str, archived: int | None) -> dict[str, Any]:
        data = {KEY_LINES: text} | ({KEY_SEGMENTS: str(archived)} if archived is not None else {})
        return owned_config_map(self.owner, name, data, labels={f"trainpilot.dev/{self.stem}": "true"})


async def read_log(api: KubeApi, experiment: str, namespace: str, stem: str) -> str:
    """The lines of every segment still kept, oldest first; segments of an earlier incarnation are skipped."""
    try:
        current = await api.call("log", api.core.read_namespaced_config_map, log_name(experiment, stem), namespace)
    except NotFound:
        return ""
    data = current.data or {}
    archived = int(data.get(KEY_SEGMENTS, "0"))
    texts = []
    for segment in range(max(1, archived - KEEP_SEGMENTS + 1), archived + 1):
        try:
            copy = await api.call(
                "log segment", api.core.read_namespaced_config_map, log_name(experiment, stem, segment), namespace
            )
        except NotFound:
            continue
        if controller_uid(copy) == controller_uid(current):
            texts.append((copy.data or {}).get(KEY_LINES, ""))
    texts.append(data.get(KEY_LINES, ""))
    return "".join(texts)


def read_run(name: str, namespace: str | None) -> tuple[str, list[Any], str]:
    """For `trainpilot replay <experiment>`: the cycle log, the ledger and the prompt archive."""
    import asyncio

    from trainpilot.runtime.kubernetes.api import load_credentials, namespace_of_context
    from trainpilot.runtime.kubernetes.ledger import read_all

    api = KubeApi(load_credentials())
    where = namespace or namespace_of_context()

    async def read() -> tuple[str, list[Any], str]:
        return (
            await read_log(api, name, where, CYCLES),
            await read_all(api, name, where),
            await read_log(api, name, where, PROMPTS),
        )

    return asyncio.run(read())
