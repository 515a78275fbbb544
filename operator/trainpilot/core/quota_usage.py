"""What the namespaces a QuotaPolicy matches have used: GPUs now, GPU-hours in the rolling period,
LLM tokens today. The policy's status keeps it, so it survives operator restarts and experiments
that are deleted (deleting an experiment must not give its GPU-hours back).

Each experiment's status holds cumulative totals (gpuHoursUsed, modelUsage); an accounting adds
what each one spent since the last accounting (by uid, so a new experiment under an old name
starts from zero) to its namespace's bucket for today. The period sums the last periodDays UTC
days of buckets, today included.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta

from trainpilot.api.quota import Accounted, NamespaceUsage, QuotaPolicy, QuotaPolicyStatus, UsageBucket


@dataclass(frozen=True)
class ExperimentUsage:
    """One experiment's totals, as its last saved status says."""

    namespace: str
    name: str
    uid: str
    gpus_now: int
    gpu_hours: float
    tokens: int


def account(policy: QuotaPolicy, experiments: Iterable[ExperimentUsage], today: date, now: str) -> QuotaPolicyStatus:
    """The policy's status after adding what its experiments spent since the last accounting."""
    status = policy.status
    first_day = (today - timedelta(days=policy.spec.period_days - 1)).isoformat()
    day = today.isoformat()
    before = {entry.uid: entry for entry in status.accounted}
    buckets = {(b.namespace, b.day): b.model_copy() for b in status.buckets if b.day >= first_day}
    accounted: list[Accounted] = []
    gpus_now: dict[str, int] = {}
    for experiment in experiments:
        if not policy.spec.applies_to(experiment.namespace):
            continue
        seen = before.get(experiment.uid)
        hours = max(experiment.gpu_hours - (seen.gpu_hours if seen else 0.0), 0.0)
        tokens = max(experiment.tokens - (seen.tokens if seen else 0), 0)
        if hours or tokens:
            bucket = buckets.setdefault(
                (experiment.namespace, day), UsageBucket(namespace=experiment.namespace, day=day)
            )
            bucket.gpu_hours = round(bucket.gpu_hours + hours, 6)
            bucket.tokens += tokens
        accounted.append(
            Accounted(
                uid=experiment.uid,
                namespace=experiment.namespace,
                gpu_hours=experiment.gpu_hours,
                tokens=experiment.tokens,
            )
        )
        gpus_now[experiment.namespace] = gpus_now.get(experiment.namespace, 0) + experiment.gpus_now
    namespaces = sorted(set(gpus_now) | {namespace for namespace, _ in buckets})
    usage = [
        NamespaceUsage(
            namespace=namespace,
            gpus_now=gpus_now.get(namespace, 0),
            gpu_hours_in_period=round(sum(b.gpu_hours for (n, _), b in buckets.items() if n == namespace), 6),
            tokens_today=buckets[(namespace, day)].tokens if (namespace, day) in buckets else 0,
        )
        for namespace in namespaces
    ]
    totals = NamespaceUsage(
        namespace="*",
        gpus_now=sum(u.gpus_now for u in usage),
        gpu_hours_in_period=round(sum(u.gpu_hours_in_period for u in usage), 6),
        tokens_today=sum(u.tokens_today for u in usage),
    )
    return status.model_copy(
        update={
            "usage": usage,
            "totals": totals,
            "accounted_at": now,
            "buckets": sorted(buckets.values(), key=lambda b: (b.namespace, b.day)),
            "accounted": sorted(accounted, key=lambda a: a.uid),
        }
    )
