"""kopf handlers. Each one translates a kopf callback into one call; the logic lives elsewhere."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from trainpilot.api import contract
from trainpilot.api.quota import QuotaLimits, effective_limits, gpus_held, parse_quota_policy, spent
from trainpilot.controller import agent
from trainpilot.controller import metrics as operator_metrics
from trainpilot.controller.leader import ENV_NAMESPACE, LeaderElection
from trainpilot.core.quota_usage import ExperimentUsage, account
from trainpilot.runtime.kubernetes.api import KubeApi, load_credentials, namespace_of_context

# How often each QuotaPolicy's status adds up what its namespaces spent (the usage its bounds read).
QUOTA_ACCOUNTING_SECONDS = 10.0


def apply_settings(settings: kopf.OperatorSettings) -> None:
    # kopf's own bookkeeping goes to annotations, never into the user's spec or our status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.trainpilot.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.trainpilot.dev")
    settings.persistence.finalizer = "trainpilot.dev/daemons"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    apply_settings(settings)
    memo.api = KubeApi(
        load_credentials(),
        observe=operator_metrics.count_api_request,
        on_watch_restart=operator_metrics.count_watch_restart,
    )
    memo.gpu_pool = agent.GPUPool()
    # One replica acts at a time (controller.leader); a test passes its own lease settings in memo.
    memo.leader = LeaderElection(
        memo.api,
        getattr(memo, "leader_namespace", None) or os.environ.get(ENV_NAMESPACE) or namespace_of_context(),
        identity=getattr(memo, "leader_identity", None),
        timing=getattr(memo, "leader_timing", None),
    )
    memo.leader.start()


@kopf.on.cleanup()
async def release_leadership(memo: kopf.Memo, **_: Any) -> None:
    leader = getattr(memo, "leader", None)
    if leader is not None:
        await leader.stop(release=not getattr(memo, "leader_dies", False))


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_via_client(**kwargs)


@kopf.index(contract.GROUP, contract.VERSION, contract.QUOTA_PLURAL)
def quota_policies(body: kopf.Body, **_: Any) -> dict[None, dict[str, Any]]:
    # With its status: what the matched namespaces spent (GPU-hours in the period, tokens today).
    return {None: {key: dict(body.get(key) or {}) for key in ("metadata", "spec", "status")}}


@kopf.index(contract.GROUP, contract.VERSION, contract.EXPERIMENT_PLURAL)
def experiment_gpus(namespace: str, name: str, uid: str, status: kopf.Status, **_: Any) -> dict[str, dict[str, Any]]:
    """By namespace: what each experiment holds and has spent, as its last saved status says."""
    return {namespace: {"name": name, "uid": uid, "gpus": gpus_held(status), **spent(status)}}


@kopf.timer(contract.GROUP, contract.VERSION, contract.QUOTA_PLURAL, interval=QUOTA_ACCOUNTING_SECONDS, idle=None)
def account_usage(body: kopf.Body, patch: kopf.Patch, experiment_gpus: kopf.Index, **_: Any) -> None:
    """Add what the matched experiments spent since the last accounting to the policy's status."""
    policy = parse_quota_policy({key: dict(body.get(key) or {}) for key in ("metadata", "spec", "status")})
    experiments = [
        ExperimentUsage(namespace, entry["name"], entry["uid"], entry["gpus"], entry["gpu_hours"], entry["tokens"])
        for namespace, entries in experiment_gpus.items()
        for entry in entries
    ]
    moment = datetime.now(UTC)
    accounted = account(policy, experiments, moment.date(), moment.strftime("%Y-%m-%dT%H:%M:%SZ"))
    patch.status.update(accounted.wire())


def gpus_elsewhere(
    index: Mapping[str, Iterable[Mapping[str, Any]]],
    namespace: str,
    name: str,
    live: Mapping[tuple[str, str], int] | None = None,
) -> dict[str, int]:
    """GPUs held in each namespace by every experiment but `namespace/name` (which counts its own, live):
    what each one held after its last cycle in this operator (`live`), else what its saved status says."""
    held = dict(live or {})
    return {
        other: sum(
            held.get((other, entry["name"]), entry["gpus"])
            for entry in entries
            if (other, entry["name"]) != (namespace, name)
        )
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

    pool = getattr(memo, "gpu_pool", None) or agent.GPUPool()

    def limits(namespace: str) -> QuotaLimits:
        held = gpus_elsewhere(experiment_gpus, namespace, name, pool.held)
        return effective_limits(list(quota_policies.get(None, [])), namespace, held)

    await agent.drive(body, stopped, memo.api, limits, pool, leader=getattr(memo, "leader", None))
