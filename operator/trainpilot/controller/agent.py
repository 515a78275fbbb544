"""One experiment's life inside the operator: validate the live spec, run a cycle, wait, repeat.

Started by a kopf daemon per AgentExperiment. Invalid input never crashes or spins: it becomes a
`Valid=False` condition with the message, and the daemon waits for the user to fix the spec.
Failures talking to the cluster are logged and retried on the next cycle (the loop itself fails
the experiment after a named limit when the ledger or status cannot be written). A finished
experiment whose final status is saved is left alone until its spec changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import ValidationError

from trainpilot.api.experiment import (
    AgentExperimentSpec,
    AgentExperimentStatus,
    PolicySpec,
    check_experiment_name,
    parse_spec,
)
from trainpilot.api.quota import workload_refusal
from trainpilot.controller import metrics as operator_metrics
from trainpilot.core import log_context, retention
from trainpilot.core.conditions import set_condition
from trainpilot.core.policy import Policy
from trainpilot.loop import LoopMemory, run_cycle
from trainpilot.runtime.base import RuntimeFailure
from trainpilot.runtime.clock import cluster_now
from trainpilot.runtime.kubernetes.api import KubeApi
from trainpilot.runtime.kubernetes.ownership import LEFTOVER_RECHECK_SECONDS, LeftoverGate
from trainpilot.runtime.kubernetes.runtime import KubernetesRuntime
from trainpilot.runtime.policies import make_policy
from trainpilot.runtime.prometheus import PrometheusServer, check_metrics_source

logger = logging.getLogger(__name__)

INVALID_RECHECK_SECONDS = 5.0
FINISHED_RECHECK_SECONDS = 60.0
FAILURE_BACKOFF_SECONDS = 5.0
STANDBY_RECHECK_SECONDS = 1.0  # a standby replica looks this often whether it leads now


class Stopped(Protocol):
    def __bool__(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> Any: ...


class Leader(Protocol):
    @property
    def leading(self) -> bool: ...


def slot_wait(namespace: str, name: str, interval: float, now: float) -> float:
    """Seconds until this experiment's own slot in the interval (at least half an interval away).

    Spreading experiments over the interval by a hash of their name keeps hundreds of daemons
    from cycling in lockstep after an operator restart and hitting the API server all at once.
    """
    phase = zlib.crc32(f"{namespace}/{name}".encode()) / 2**32 * interval
    wait = (phase - now) % interval
    return wait + interval if wait < interval / 2 else wait


def restore_status(raw: Any) -> AgentExperimentStatus:
    """Status as the operator last saved it; kopf's own keys and unknown fields are ignored."""
    fields = set(AgentExperimentStatus.model_fields) | {
        field.alias for field in AgentExperimentStatus.model_fields.values() if field.alias
    }
    known = {key: value for key, value in dict(raw or {}).items() if key in fields}
    try:
        return AgentExperimentStatus.model_validate(known)
    except ValidationError as error:
        logger.warning("status could not be restored (%s); starting from the ledger", error.error_count())
        return AgentExperimentStatus()


async def mark_invalid(
    api: KubeApi, namespace: str, name: str, status: AgentExperimentStatus, message: str, generation: int | None
) -> AgentExperimentStatus:
    status = set_condition(
        status,
        type="Valid",
        value="False",
        reason="InvalidSpec",
        message=message,
        now=cluster_now(),
        generation=generation,
    )
    status = status.model_copy(
        update={"phase": "Invalid", "message": message[:1000], "observed_generation": generation}
    )
    await api.patch_experiment_status(namespace, name, status.wire())
    return status


def check_quota_allows(
    spec: AgentExperimentSpec, namespace: str, quota_limits: Callable[[str], object | None] | None
) -> None:
    """ValueError naming the QuotaPolicy when it refuses the pods this spec creates (image, service account)."""
    try:
        limits = quota_limits(namespace) if quota_limits is not None else None
    except ValueError:
        return  # a broken QuotaPolicy holds every decision (below); it does not make this spec invalid
    refusal = workload_refusal(limits, spec.trial_template.image, spec.trial_template.service_account_name)
    if refusal:
        raise ValueError(refusal)


class GPUPool:
    """What the operator's experiments hold right now, and whose turn it is to decide.

    The index of experiments (their saved status) lags a cycle: two experiments deciding at once
    would each see the other's GPUs as free. One lock per operator makes their cycles take turns,
    and `held` is each one's count after its last cycle, which the limits read first."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.held: dict[tuple[str, str], int] = {}

    def holds(self, namespace: str, name: str, gpus: int) -> None:
        self.held[(namespace, name)] = gpus

    def forget(self, namespace: str, name: str) -> None:
        self.held.pop((namespace, name), None)


async def drive(
    body: Any,
    stopped: Stopped,
    api: KubeApi,
    quota_limits: Callable[[str], object | None] | None = None,
    pool: GPUPool | None = None,
    leader: Leader | None = None,
) -> None:
    """Run one experiment's agent loop until kopf stops the daemon (deletion or shutdown).

    `quota_limits(namespace)` gives the admins' current QuotaPolicy limits, read fresh each cycle.
    `leader`: this replica acts only while it leads (controller.leader); a standby only watches.
    """
    name: str = body["metadata"]["name"]
    namespace: str = body["metadata"]["namespace"]
    log_context.set_experiment(f"{namespace}/{name}")  # this daemon's task: every line it logs is about it
    status = restore_status(body.get("status"))
    runtime: KubernetesRuntime | None = None
    reported_invalid: str | None = None
    memory = LoopMemory()
    policy: Policy | None = None
    policy_spec: PolicySpec | None = None
    # The generation whose final status is saved: a finished experiment is patched again only when
    # its spec changes (status.observedGeneration reports that), not on every recheck.
    settled: int | None = status.observed_generation if status.finished else None
    gate = LeftoverGate(api, {"metadata": dict(body["metadata"])})
    pool = pool if pool is not None else GPUPool()

    def keep_exchange(exchange: dict[str, Any]) -> None:  # Claude is asked only once the runtime exists
        archive(runtime, exchange)

    try:
        while not stopped:
            if leader is not None and not leader.leading:
                await stopped.wait(STANDBY_RECHECK_SECONDS)
                continue
            generation = body["metadata"].get("generation")
            try:
                check_experiment_name(name)
                spec: AgentExperimentSpec = parse_spec(dict(body.get("spec") or {}))
                # One policy while spec.policy stays the same: Claude's remembers what it last asked.
                if policy is None or policy_spec != spec.policy:
                    policy = make_policy(spec, archive=keep_exchange)
                    policy_spec = spec.policy
                check_quota_allows(spec, namespace, quota_limits)
                check_metrics_source(spec.metrics.source, PrometheusServer.from_environment())
            except ValueError as error:
                message = str(error)
                if message != reported_invalid:
                    logger.warning("%s/%s is invalid: %s", namespace, name, message)
                    try:
                        status = await mark_invalid(api, namespace, name, status, message, generation)
                        operator_metrics.experiment_phase(namespace, name, status.phase)
                        reported_invalid = message
                    except RuntimeFailure as failure:
                        logger.warning("could not report invalid spec of %s/%s: %s", namespace, name, failure)
                await stopped.wait(INVALID_RECHECK_SECONDS)
                continue
            reported_invalid = None
            if status.phase == "Invalid":
                status = status.model_copy(
                    update={"phase": "Running" if status.active_trials else "Pending", "message": ""}
                )

            owner = {"metadata": dict(body["metadata"])}
            if runtime is None:
                runtime = KubernetesRuntime(api, {**owner, "status": body.get("status")}, spec)
            else:
                runtime.update(owner, spec)
            now = cluster_now()
            if (
                status.finished
                and settled == generation
                and not retention.due(spec, status, now, runtime.removable)
                and not runtime.unfinished_clean_ups
            ):
                # Final and saved for this spec, and nothing for spec.retention to delete or to see done:
                # wake when the next finished trial's children are due, or to recheck.
                await stopped.wait(_finished_wait(spec, status, now))
                continue
            held, status = await gate.hold(runtime, status, cluster_now())  # an earlier incarnation's leftovers
            if held:
                await stopped.wait(LEFTOVER_RECHECK_SECONDS)
                continue

            wait = float(spec.policy.interval_seconds)
            try:
                limits = quota_limits(namespace) if quota_limits is not None else None
            except ValueError as error:
                # Fail closed: a broken QuotaPolicy must not lift a limit, so hold all decisions.
                logger.warning("holding %s/%s: %s", namespace, name, error)
                await stopped.wait(wait)
                continue
            # Experiments that share a QuotaPolicy's GPUs decide one at a time, each seeing what the
            # others hold after their last cycle (not only what their saved status said).
            shared = bool(getattr(limits, "gpu_pools", None)) and quota_limits is not None
            async with pool.lock if shared else contextlib.nullcontext():
                if shared and quota_limits is not None:
                    limits = quota_limits(namespace)  # again, now that it is this one's turn
                status, wait, saved = await _one_cycle(runtime, policy, spec, status, generation, limits, memory, wait)
                pool.holds(namespace, name, sum(t.nodes * t.gpus_per_node for t in status.active_trials))
            settled = generation if saved and status.finished else None
            await stopped.wait(wait)
    finally:
        pool.forget(namespace, name)
        operator_metrics.experiment_phase(namespace, name, None)
        if runtime is not None:
            runtime.close()  # its watches of stopping trials end with it


def _finished_wait(spec: AgentExperimentSpec, status: AgentExperimentStatus, now: str) -> float:
    until = retention.seconds_until_due(spec, status, now)
    return FINISHED_RECHECK_SECONDS if until is None else min(FINISHED_RECHECK_SECONDS, until + 1.0)


def archive(runtime: KubernetesRuntime | None, exchange: dict[str, Any]) -> None:
    """Each exchange with Claude: counted in the operator's metrics, kept in the prompt archive."""
    operator_metrics.observe_exchange(exchange)
    if runtime is not None:
        runtime.keep_prompt(exchange)


async def _one_cycle(
    runtime: KubernetesRuntime,
    policy: Policy,
    spec: AgentExperimentSpec,
    status: AgentExperimentStatus,
    generation: int | None,
    limits: object | None,
    memory: LoopMemory,
    wait: float,
) -> tuple[AgentExperimentStatus, float, bool]:
    """Run one cycle: the status after it, the seconds to wait, and whether its status was saved."""
    namespace, name = runtime.namespace, runtime.experiment
    saved = False
    started = time.monotonic()
    try:
        result = await run_cycle(
            name, spec, status, runtime, policy, cluster_now(), generation=generation, limits=limits, memory=memory
        )
        status, saved = result.status, result.unrecorded is None
        wait = slot_wait(namespace, name, wait, time.time())
        operator_metrics.count_decisions([*result.recovered, *result.records])
        operator_metrics.CYCLES.labels("ok").inc()
    except RuntimeFailure as failure:
        logger.warning("cycle of %s/%s failed, retrying: %s", namespace, name, failure)
        operator_metrics.CYCLE_ERRORS.labels("api").inc()
        operator_metrics.CYCLES.labels("api-error").inc()
        wait = min(wait, FAILURE_BACKOFF_SECONDS)
    except Exception:  # a bug must not kill the daemon for good; it is logged in full
        logger.exception("cycle of %s/%s crashed, retrying", namespace, name)
        operator_metrics.CYCLE_ERRORS.labels("crash").inc()
        operator_metrics.CYCLES.labels("crash").inc()
        wait = max(wait, FAILURE_BACKOFF_SECONDS)
    operator_metrics.CYCLE_SECONDS.observe(time.monotonic() - started)
    operator_metrics.count_scrape_failures(runtime.scrape_failures)
    runtime.scrape_failures = []
    operator_metrics.experiment_phase(namespace, name, status.phase)
    if status.finished and not runtime.unfinished_clean_ups:  # else: watch it at the policy's pace
        wait = max(wait, _finished_wait(spec, status, cluster_now()))
    return status, wait, saved
