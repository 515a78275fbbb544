"""kopf handlers. Each one translates a kopf callback into one call; the logic lives elsewhere."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from trainpilot.api import contract
from trainpilot.api.quota import QuotaLimits, effective_limits
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


@kopf.daemon(contract.GROUP, contract.VERSION, contract.EXPERIMENT_PLURAL, id="agent", cancellation_timeout=10.0)
async def run_agent(
    body: kopf.Body, stopped: kopf.DaemonStopped, memo: kopf.Memo, quota_policies: kopf.Index, **_: Any
) -> None:
    def limits(namespace: str) -> QuotaLimits:
        return effective_limits(list(quota_policies.get(None, [])), namespace)

    await agent.drive(body, stopped, memo.api, limits)
