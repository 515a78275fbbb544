"""One acting replica at a time: leader election on a coordination.k8s.io Lease.

Every replica watches (kopf runs on each), but an experiment's daemon runs a cycle only while its
replica holds the Lease `trainpilot-operator` in the operator's namespace. As client-go's leader
election does it: the holder renews the Lease every RENEW_SECONDS; another replica takes it over
once it has seen the Lease unchanged for LEASE_SECONDS by its own clock (so the clocks of the
replicas do not matter), with the Lease's resourceVersion as the referee (two that try at once:
one gets 409 Conflict). A holder that cannot renew for RENEW_DEADLINE_SECONDS stops acting before
anyone may take over. Should two replicas ever still act at once, the ledger's write-ahead
sequence refuses the second writer's decision ("two writers decided apart"), so none is carried
out twice.

Takeover when the holder dies: at most LEASE_SECONDS + RETRY_SECONDS, then the next cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from trainpilot.runtime.base import RuntimeFailure
from trainpilot.runtime.kubernetes.api import Conflict, KubeApi, NotFound

logger = logging.getLogger(__name__)

LEASE_NAME = "trainpilot-operator"
ENV_NAMESPACE = "TRAINPILOT_OPERATOR_NAMESPACE"  # the chart sets it (downward API)
ENV_IDENTITY = "TRAINPILOT_OPERATOR_IDENTITY"  # the pod's name


@dataclass(frozen=True)
class LeaseTiming:
    lease_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    renew_seconds: float = 2.0
    retry_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not self.renew_seconds < self.renew_deadline_seconds < self.lease_seconds:
            raise ValueError("lease timing: renew < renew deadline < lease duration")


def default_identity() -> str:
    """The pod's name: unique among the replicas, and the same for a container the kubelet restarted
    in it (whose predecessor is dead), so that one takes its Lease back at once."""
    return os.environ.get(ENV_IDENTITY) or f"{socket.gethostname()}-{os.getpid()}"


class LeaderElection:
    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        identity: str | None = None,
        timing: LeaseTiming | None = None,
        name: str = LEASE_NAME,
    ) -> None:
        self.api, self.namespace, self.name = api, namespace, name
        self.identity = identity or default_identity()
        self.timing = timing or LeaseTiming()
        self._leading = asyncio.Event()
        self._renewed_at = -float("inf")  # monotonic time of our last successful renewal
        self._seen: tuple[str | None, float] = (None, -float("inf"))  # (resourceVersion, when we first saw it)
        self._task: asyncio.Task[None] | None = None
        self.transitions = 0  # times this replica became the leader

    @property
    def leading(self) -> bool:
        """Whether to act now: leading, and renewed recently enough that nobody may have taken over."""
        if self._leading.is_set() and time.monotonic() - self._renewed_at > self.timing.renew_deadline_seconds:
            self._lose("could not renew the Lease within its renew deadline")
        return self._leading.is_set()

    async def wait_leading(self) -> None:
        while not self.leading:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._leading.wait(), timeout=self.timing.retry_seconds)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"leader election {self.namespace}/{self.name}")

    async def stop(self, release: bool = True) -> None:
        """Stop electing; with `release`, give the Lease up so another replica takes over at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if release and self._leading.is_set():
            with contextlib.suppress(RuntimeFailure):
                lease = await self._read()
                if lease is not None and _holder(lease) == self.identity:
                    lease["spec"]["holderIdentity"] = None
                    await self._replace(lease)
        self._leading.clear()

    async def _run(self) -> None:
        while True:
            try:
                await self._try()
            except RuntimeFailure as failure:
                logger.warning("leader election: %s", failure)
            if self.leading:
                await asyncio.sleep(self.timing.renew_seconds)
            else:
                await asyncio.sleep(self.timing.retry_seconds)

    async def _try(self) -> None:
        lease = await self._read()
        now = time.monotonic()
        if lease is None:
            try:
                await self._create()
            except Conflict:
                return  # another replica created it first
            return self._won(now, "created")
        version = lease["metadata"].get("resourceVersion")
        if version != self._seen[0]:
            self._seen = (version, now)
        holder = _holder(lease)
        if holder == self.identity:
            return await self._renew(lease, now)
        if self._leading.is_set():
            self._lose(f"the Lease is held by {holder}")
        expired = now - self._seen[1] >= float(lease["spec"].get("leaseDurationSeconds") or self.timing.lease_seconds)
        if holder and not expired:
            return
        lease["spec"].update(self._spec(acquired=True))
        lease["spec"]["leaseTransitions"] = int(lease["spec"].get("leaseTransitions") or 0) + 1
        try:
            await self._replace(lease)
        except Conflict:
            return  # another replica took it first
        self._won(now, f"taken over from {holder or 'nobody'}")

    async def _renew(self, lease: dict[str, Any], now: float) -> None:
        lease["spec"]["renewTime"] = _micro_time()
        try:
            await self._replace(lease)
        except Conflict:
            return  # changed under us: the next try reads it again
        self._renewed_at = now
        if not self._leading.is_set():
            self._won(now, "still ours")

    def _won(self, now: float, how: str) -> None:
        self._renewed_at = now
        if not self._leading.is_set():
            self.transitions += 1
            logger.info("leader election: %s leads (%s)", self.identity, how)
        self._leading.set()

    def _lose(self, why: str) -> None:
        if self._leading.is_set():
            logger.warning("leader election: %s stops acting: %s", self.identity, why)
        self._leading.clear()

    def _spec(self, acquired: bool = False) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.timing.lease_seconds)),
            "renewTime": _micro_time(),
        }
        if acquired:
            spec["acquireTime"] = spec["renewTime"]
        return spec

    async def _read(self) -> dict[str, Any] | None:
        try:
            lease = await self.api.call(
                f"Lease {self.namespace}/{self.name}",
                self.api.coordination.read_namespaced_lease,
                self.name,
                self.namespace,
            )
        except NotFound:
            return None
        return self.api.api_client.sanitize_for_serialization(lease)  # type: ignore[no-any-return]

    async def _create(self) -> None:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {**self._spec(acquired=True), "leaseTransitions": 0},
        }
        await self.api.call(
            f"Lease {self.namespace}/{self.name}", self.api.coordination.create_namespaced_lease, self.namespace, body
        )

    async def _replace(self, lease: dict[str, Any]) -> None:
        await self.api.call(
            f"Lease {self.namespace}/{self.name}",
            self.api.coordination.replace_namespaced_lease,
            self.name,
            self.namespace,
            lease,
        )


def _holder(lease: dict[str, Any]) -> str | None:
    return (lease.get("spec") or {}).get("holderIdentity") or None


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
