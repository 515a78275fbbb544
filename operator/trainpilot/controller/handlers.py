"""kopf handlers. Each one translates a kopf callback into one call; the logic lives elsewhere."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import kopf

from trainpilot.api import contract
from trainpilot.api.quota import QuotaLimits, effective_limits, gpus_held
from trainpilot.controller import agent
from trainpilot.runtime.kubernetes.api import KubeApi, load_credentials


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's own bookkeeping goes to annotations, never into the user's spec or our status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.trainpilot.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.trainpilot.dev")
    settings.persistence.finalizer = "trainpilot.dev/daemons"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    memo.api = KubeApi(load_credentials())


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_via_client(**kwargs)


@kopf.index(contract.GROUP, contract.VERSION, contract.QUOTA_PLURAL)
def quota_policies(body: kopf.Body, **_: Any) -> dict[None, dict[str, Any]]:
    return {None: {"metadata": dict(body.metadata), "spec": dict(body.spec)}}


@kopf.index(contract.GROUP, contract.VERSION, contract.EXPERIMENT_PLURAL)
def experiment_gpus(namespace: str, name: str, status: kopf.Status, **_: Any) -> dict[str, dict[str, Any]]:
    """By namespace: the GPUs each experiment's unfinished trials hold, as its last saved status says."""
    return {namespace: {"name": name, "gpus": gpus_held(status)}}


def gpus_elsewhere(index: Mapping[str, Iterable[Mapping[str, Any]]], namespace: str, name: str) -> dict[str, int]:
    """GPUs held in each namespace by every experiment but `namespace/name` (which counts its own, live)."""
    return {
        other: sum(entry["gpus"] for entry in entries if (other, entry["name"]) != (namespace, name))
        for other, entries in index.items()
    }


@kopf.daemon(contract.GROUP, contract.VERSION, contract.EXPERIMENT_PLURAL, id="agent", cancellation_timeout=10.0)
async def run_agent(
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    quota_policies: kopf.Index,
    experiment_gpus: kopf.Index,
    **_: Any,
) -> None:
    name = body["metadata"]["name"]

    def limits(namespace: str) -> QuotaLimits:
        held = gpus_elsewhere(experiment_gpus, namespace, name)
        return effective_limits(list(quota_policies.get(None, [])), namespace, held)

    await agent.drive(body, stopped, memo.api, limits)
