"""The durable decision ledger in a cluster: JSON lines in ConfigMaps owned by the experiment.

Events expire after about an hour; this does not. The newest lines live in `<experiment>-ledger`;
when that segment would pass SEGMENT_BYTES it is copied to `<experiment>-ledger-<n>` (n = 1, 2, ...)
and started afresh, so no single object outgrows etcd's limit and nothing is ever dropped.
Writes use resourceVersion (optimistic concurrency), so two writers cannot silently interleave.
"""

from __future__ import annotations

import logging
from typing import Any

from trainpilot.core import ledger as ledger_format
from trainpilot.core.decision import DecisionRecord
from trainpilot.runtime.base import LedgerConflict
from trainpilot.runtime.kubernetes.api import Conflict, KubeApi, NotFound
from trainpilot.runtime.kubernetes.builders import owned_config_map
from trainpilot.runtime.kubernetes.ownership import controller_uid, create_owned, require_owned

logger = logging.getLogger(__name__)

SEGMENT_BYTES = 256 * 1024
KEY_LINES = "ledger.jsonl"
KEY_ARCHIVED = "archived-segments"


def ledger_name(experiment: str, segment: int | None = None) -> str:
    return f"{experiment}-ledger" if segment is None else f"{experiment}-ledger-{segment}"


class ConfigMapLedger:
    def __init__(self, api: KubeApi, owner: dict[str, Any]) -> None:
        self.api = api
        self.owner = owner
        self.namespace = owner["metadata"]["namespace"]
        self.experiment = owner["metadata"]["name"]
        self._text: str | None = None  # the current segment, cached after the first read
        self._archived = 0
        self._version: str | None = None
        self._records: dict[str, DecisionRecord] = {}  # the current segment's, by id

    async def _load(self) -> None:
        try:
            config_map = await self.api.call(
                f"ledger of {self.experiment}",
                self.api.core.read_namespaced_config_map,
                ledger_name(self.experiment),
                self.namespace,
            )
        except NotFound:
            self._text, self._archived, self._version = "", 0, None
        else:
            require_owned(config_map, self.owner, "ledger ConfigMap")  # an earlier incarnation's is not ours
            data = config_map.data or {}
            self._text = data.get(KEY_LINES, "")
            self._archived = int(data.get(KEY_ARCHIVED, "0"))
            self._version = config_map.metadata.resource_version
        records, problems = ledger_format.decode(self._text)
        for problem in problems:
            logger.warning("ledger %s: %s", ledger_name(self.experiment), problem)
        self._records = {record.id: record for record in records}

    async def since(self, seq: int) -> list[DecisionRecord]:
        """Every record with seq >= `seq`, oldest first: the current segment, and as many archived
        segments (newest first) as it takes to reach back that far."""
        if self._text is None:
            await self._load()
        records = list(self._records.values())
        segment = self._archived
        while segment >= 1 and (not records or records[0].seq > seq):
            older = await self._read_segment(segment)
            records = older + [record for record in records if record.id not in {r.id for r in older}]
            segment -= 1
        return [record for record in records if record.seq >= seq]

    async def _read_segment(self, segment: int) -> list[DecisionRecord]:
        try:
            config_map = await self.api.call(
                f"ledger segment {segment} of {self.experiment}",
                self.api.core.read_namespaced_config_map,
                ledger_name(self.experiment, segment),
                self.namespace,
            )
        except NotFound:
            logger.warning("ledger segment %s of %s is missing", segment, self.experiment)
            return []
        require_owned(config_map, self.owner, f"ledger segment {segment}")
        records, _ = ledger_format.decode((config_map.data or {}).get(KEY_LINES, ""))
        return records

    async def _stored(self, record: DecisionRecord) -> DecisionRecord | None:
        """The record already stored under this id, wherever it was rotated to; None if none is."""
        if record.id in self._records:
            return self._records[record.id]
        oldest = next(iter(self._records.values()), None)
        if self._archived and (oldest is None or oldest.seq > record.seq):
            return next((stored for stored in await self.since(record.seq) if stored.id == record.id), None)
        return None

    async def append(self, record: DecisionRecord) -> None:
        """Append `record`; the same record again is a no-op (a retried cycle), while another one under
        its id raises LedgerConflict: it was decided apart from what the ledger holds."""
        for _attempt in range(5):
            if self._text is None:
                await self._load()
            stored = await self._stored(record)
            if stored is not None:
                if stored != record:
                    raise LedgerConflict(record, stored)
                return
            try:
                await self._write(ledger_format.encode(record))
            except Conflict:
                self._text = None  # someone else wrote: re-read and try again
                continue
            self._records[record.id] = record
            return
        raise Conflict(
            f"ledger of {self.experiment}", 409, "kept conflicting with another writer, giving up this cycle"
        )

    async def _write(self, line: str) -> None:
        text = self._text or ""
        archived = self._archived
        rotated = bool(text) and len(text.encode()) + len(line.encode()) > SEGMENT_BYTES
        if rotated:
            archived += 1
            await create_owned(
                self.api,
                f"ledger segment {archived} of {self.experiment}",
                self.api.core.create_namespaced_config_map,
                self.namespace,
                self._manifest(ledger_name(self.experiment, archived), text, None),
            )
            text = ""
        manifest = self._manifest(ledger_name(self.experiment), text + line, archived)
        if self._version is None:
            created = await self.api.create_if_absent(
                f"ledger of {self.experiment}", self.api.core.create_namespaced_config_map, self.namespace, manifest
            )
            if not created:
                raise Conflict(f"ledger of {self.experiment}", 409, "created concurrently")
            result = None
        else:
            manifest["metadata"]["resourceVersion"] = self._version
            result = await self.api.call(
                f"ledger of {self.experiment}",
                self.api.core.replace_namespaced_config_map,
                ledger_name(self.experiment),
                self.namespace,
                manifest,
            )
        self._text, self._archived = text + line, archived
        if rotated:
            self._records = {}  # the current segment starts afresh with this line
        self._version = getattr(getattr(result, "metadata", None), "resource_version", None)
        if self._version is None:
            self._text = None  # version unknown: re-read before the next write

    def _manifest(self, name: str, text: str, archived: int | None) -> dict[str, Any]:
        data = {KEY_LINES: text} | ({KEY_ARCHIVED: str(archived)} if archived is not None else {})
        return owned_config_map(self.owner, name, data, labels={"trainpilot.dev/ledger": "true"})


async def read_all(api: KubeApi, experiment: str, namespace: str) -> list[DecisionRecord]:
    """Every record, archived segments first."""
    try:
        current = await api.call("ledger", api.core.read_namespaced_config_map, ledger_name(experiment), namespace)
    except NotFound:
        return []
    data = current.data or {}
    texts = []
    for segment in range(1, int(data.get(KEY_ARCHIVED, "0")) + 1):
        try:
            archived = await api.call(
                "ledger segment", api.core.read_namespaced_config_map, ledger_name(experiment, segment), namespace
            )
            if controller_uid(archived) != controller_uid(current):  # an earlier incarnation's: not this ledger
                logger.warning("ledger segment %s of %s belongs to another incarnation; skipped", segment, experiment)
                continue
            texts.append((archived.data or {}).get(KEY_LINES, ""))
        except NotFound:
            logger.warning("ledger segment %s of %s is missing", segment, experiment)
    texts.append(data.get(KEY_LINES, ""))
    records, _ = ledger_format.decode("".join(texts))
    return records


def read_ledger(name: str, namespace: str | None) -> list[DecisionRecord]:
    """For `trainpilot history <experiment>`: log in like kubectl and read every segment."""
    import asyncio

    from trainpilot.runtime.kubernetes.api import load_credentials, namespace_of_context

    api_client = load_credentials()
    return asyncio.run(read_all(KubeApi(api_client), name, namespace or namespace_of_context()))
