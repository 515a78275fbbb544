"""Following a stopped trial's pods until they are gone, and the checkpoint step it reported last.

A trial stopped for a restart (scale, restart-mutate) saves a checkpoint on SIGTERM and writes the
step in its termination message; its child may start only once every pod of it is gone, and then
from exactly that step. The kubelet deletes a stopped pod right after posting that last status,
so a list once a cycle would usually miss it: a watch, label-selected to the trial on the server,
sees every state the pod passes through, the DELETED event too, which carries its final status.
What was seen is kept in memory only: after an operator restart the child falls back to the step
the parent's metrics reported last (the loop's rule).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from kubernetes import watch

from trainpilot.api import contract
from trainpilot.runtime.base import Departure, RuntimeFailure
from trainpilot.runtime.kubernetes.api import ApiError, KubeApi
from trainpilot.runtime.kubernetes.termination import final_metrics

logger = logging.getLogger(__name__)

# One watch request lasts at most this long (then another starts from where it ended), so a worker
# thread is never held for long and a stop of the operator is noticed.
WATCH_SECONDS = 10


@dataclass
class _Follow:
    """What one stopped trial's watch has seen so far."""

    pods: set[str] = field(default_factory=set)  # names of its pods that still exist
    steps: list[int] = field(default_factory=list)  # checkpoint steps its pods reported on the way out
    task: asyncio.Task[None] | None = None


def reported_step(pod: Any) -> int | None:
    """The checkpoint step a stopped trainer container wrote in its termination message, if any."""
    statuses = (pod.status.container_statuses or []) if pod.status else []
    steps = []
    for container in statuses:
        terminated = container.state.terminated if container.state else None
        if terminated is None:
            continue
        final = final_metrics(terminated.message)
        if final is not None and final.checkpoint_step is not None:
            steps.append(final.checkpoint_step)
    return max(steps, default=None)


class Departures:
    """The stopped trials of one experiment this operator is waiting on, each followed by a watch."""

    def __init__(self, api: KubeApi, namespace: str, experiment: str) -> None:
        self.api, self.namespace, self.experiment = api, namespace, experiment
        self._follows: dict[str, _Follow] = {}

    def selector(self, trial: str) -> str:
        return f"{contract.LABEL_EXPERIMENT}={self.experiment},{contract.LABEL_TRIAL}={trial}"

    def follow(self, trial: str) -> None:
        """Start watching `trial`'s pods (stop() calls this before deleting its Job)."""
        follow = self._follows.setdefault(trial, _Follow())
        if follow.task is None:
            follow.task = asyncio.create_task(self._watch(trial, follow), name=f"departure of {trial}")

    async def departed(self, trial: str) -> Departure | None:
        self.follow(trial)  # after an operator restart: first seen here
        follow = self._follows[trial]
        assert follow.task is not None
        if not follow.task.done():
            return None
        error = follow.task.exception()
        if error is not None:
            follow.task = None  # the next cycle watches again; what was seen so far is kept
            if isinstance(error, RuntimeFailure):
                raise error
            raise RuntimeFailure(f"watching the pods of {trial}: {error}") from error
        return Departure(checkpoint_step=max(follow.steps, default=None))

    def forget(self, trial: str) -> None:
        follow = self._follows.pop(trial, None)
        if follow is not None and follow.task is not None:
            follow.task.cancel()

    def close(self) -> None:
        for trial in list(self._follows):
            self.forget(trial)

    async def _watch(self, trial: str, follow: _Follow) -> None:
        selector = self.selector(trial)
        listed = await self.api.call(
            f"pods of {trial}", self.api.core.list_namespaced_pod, self.namespace, label_selector=selector
        )
        follow.pods = {pod.metadata.name for pod in listed.items}
        self._note(follow, listed.items)
        version = listed.metadata.resource_version
        while follow.pods:
            try:
                version = await self.api.call(
                    f"watch of the pods of {trial}", self.watch_namespaced_pod, selector, version, follow
                )
                if follow.pods:
                    self.api.watch_restarted("pods", "expired")  # WATCH_SECONDS passed: the next one goes on
            except ApiError as error:
                if error.status != 410:
                    raise
                self.api.watch_restarted("pods", "gone")
                # Too old to resume (410 Gone): list again; a pod deleted meanwhile is simply absent.
                listed = await self.api.call(
                    f"pods of {trial}", self.api.core.list_namespaced_pod, self.namespace, label_selector=selector
                )
                follow.pods = {pod.metadata.name for pod in listed.items}
                self._note(follow, listed.items)
                version = listed.metadata.resource_version
        logger.info("%s/%s: every pod of %s is gone", self.namespace, self.experiment, trial)

    def watch_namespaced_pod(self, selector: str, version: str, follow: _Follow) -> str:
        """One watch request (in a worker thread): until every pod is gone or WATCH_SECONDS pass."""
        stream = watch.Watch()
        for event in stream.stream(
            self.api.core.list_namespaced_pod,
            self.namespace,
            label_selector=selector,
            resource_version=version,
            timeout_seconds=WATCH_SECONDS,
        ):
            pod = event["object"]
            version = pod.metadata.resource_version or version
            self._note(follow, [pod])
            if event["type"] == "DELETED":
                follow.pods.discard(pod.metadata.name)
            else:
                follow.pods.add(pod.metadata.name)
            if not follow.pods:
                stream.stop()
        return version

    @staticmethod
    def _note(follow: _Follow, pods: list[Any]) -> None:
        for pod in pods:
            step = reported_step(pod)
            if step is not None:
                follow.steps.append(step)
