"""Which objects belong to this incarnation of an experiment, and what to do about the others.

An AgentExperiment deleted and created again under the same name is another object, with another
uid, and the two share every child name (`<experiment>-tNNN`, `<experiment>-ledger`). The garbage
collector removes the old one's children in the background, after the old object is gone, and
`kubectl delete --cascade=orphan` keeps them for good. So every ownership check carries the uid:
an object whose controller ownerReference names another uid is never observed as one of our
trials, never read as our ledger, and a create that finds it is not "already created by us".

Meanwhile the new incarnation waits (`LeftoverGate`): before its first cycle it looks for objects
labelled with its name that another uid owns (or nobody does), and while there are any it runs no
cycle, with a `NamesAvailable=False` condition, a Warning Event and a log line naming them. It
never deletes them and never takes them over: pods of the old incarnation may still be
checkpointing. Once they are gone it proceeds; if they are still there after
LEFTOVER_WAIT_SECONDS (orphaned on purpose), the experiment fails, saying which and how to remove
them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentStatus
from trainpilot.core.conditions import set_condition
from trainpilot.runtime.base import PermanentFailure, Runtime, RuntimeFailure
from trainpilot.runtime.kubernetes.api import Conflict, KubeApi, NotFound

logger = logging.getLogger(__name__)

# The garbage collector removes an owner's dependents within seconds, their pods within their grace
# period (30 s for trials); what is still there after this was orphaned and will never go by itself.
LEFTOVER_WAIT_SECONDS = 300
LEFTOVER_RECHECK_SECONDS = 5.0
CONDITION_NAMES_AVAILABLE = "NamesAvailable"
REASON_LEFTOVERS = "LeftoversOfEarlierExperiment"
MAX_LISTED = 5


class ForeignObject(PermanentFailure):
    """An object holds one of this experiment's names but belongs to another incarnation, or to none."""


def _metadata(obj: Any) -> Any:
    return obj["metadata"] if isinstance(obj, dict) else obj.metadata


def _get(metadata: Any, field: str, attribute: str) -> Any:
    return metadata.get(field) if isinstance(metadata, dict) else getattr(metadata, attribute, None)


def controller_uid(obj: Any) -> str | None:
    """The uid its controller ownerReference names (a dict manifest or a kubernetes client model)."""
    for ref in _get(_metadata(obj), "ownerReferences", "owner_references") or []:
        controller = ref.get("controller") if isinstance(ref, dict) else ref.controller
        if controller:
            return str(ref.get("uid") if isinstance(ref, dict) else ref.uid)
    return None


def is_owned(obj: Any, uid: str) -> bool:
    return controller_uid(obj) == uid


def experiment_uid(owner: dict[str, Any]) -> str:
    return str(owner["metadata"]["uid"])


def describe(obj: Any, kind: str) -> str:
    """`Job research/lr-t000 (owned by uid 1f2e..., being deleted)`: what it is and whose."""
    metadata = _metadata(obj)
    owner = controller_uid(obj)
    whose = f"owned by uid {owner}" if owner else "no owner: orphaned"
    if _get(metadata, "deletionTimestamp", "deletion_timestamp"):
        whose += ", being deleted"
    return f"{kind} {_get(metadata, 'namespace', 'namespace')}/{_get(metadata, 'name', 'name')} ({whose})"


def owned(objects: Iterable[Any], owner: dict[str, Any]) -> list[Any]:
    """The objects this incarnation of the experiment controls."""
    uid = experiment_uid(owner)
    return [obj for obj in objects if is_owned(obj, uid)]


def was_replaced(pod: Any) -> bool:
    """A pod that Kubernetes disrupted (DisruptionTarget) and that has stopped: the Job's
    podFailurePolicy ignores its failure and a replacement takes its index, so it is history."""
    status = pod.status
    if status is None or status.phase not in ("Succeeded", "Failed"):
        return False
    return any(c.type == "DisruptionTarget" and c.status == "True" for c in status.conditions or [])


def current_pods(pods: Iterable[Any], jobs: Iterable[Any]) -> list[Any]:
    """The pods of `jobs` (controlled by one of them, by uid) that still stand for their index."""
    uids = {job.metadata.uid for job in jobs}
    return [pod for pod in pods if controller_uid(pod) in uids and not was_replaced(pod)]


# ------------------------------------------------------------------------------------------ create


def _reader(api: KubeApi, kind: str) -> Callable[..., Any]:
    readers = {
        "ConfigMap": api.core.read_namespaced_config_map,
        "Service": api.core.read_namespaced_service,
        "Job": api.batch.read_namespaced_job,
    }
    return readers[kind]


async def create_owned(api: KubeApi, what: str, create: Callable[..., Any], namespace: str, manifest: dict) -> bool:
    """Create a child; True if created now, False if this experiment (same uid) already had (a retried
    cycle). An object of that name owned by anyone else raises ForeignObject: it is never adopted."""
    uid = controller_uid(manifest)
    name = manifest["metadata"]["name"]
    for _attempt in range(3):
        try:
            await api.call(what, create, namespace, manifest)
            return True
        except Conflict:
            pass
        try:
            existing = await api.call(what, _reader(api, manifest["kind"]), name, namespace)
        except NotFound:
            continue  # removed in between (the garbage collector at work): create it after all
        if uid is not None and is_owned(existing, uid):
            return False
        raise ForeignObject(
            f"{what}: {describe(existing, manifest['kind'])} already exists and is not this experiment's "
            f"(uid {uid}); it is never adopted"
        )
    raise Conflict(what, 409, "created and removed again and again by someone else")


def require_owned(obj: Any, owner: dict[str, Any], kind: str) -> None:
    """ForeignObject unless this incarnation of the experiment controls `obj`."""
    if not is_owned(obj, experiment_uid(owner)):
        raise ForeignObject(
            f"{describe(obj, kind)} belongs to an earlier AgentExperiment named "
            f"{owner['metadata']['name']}, not to this one (uid {experiment_uid(owner)}); it is never read as ours"
        )


# -------------------------------------------------------------------------------------- leftovers


def _terminal(pod: Any) -> bool:
    return pod.status is not None and pod.status.phase in ("Succeeded", "Failed")


async def leftovers(api: KubeApi, owner: dict[str, Any]) -> list[str]:
    """Objects labelled with this experiment's name that are not this incarnation's: Jobs, Services
    and ConfigMaps (trial config, control, ledger) under our names, and pods still running under our
    trials' hostnames. Events need no check: their names carry the uid."""
    metadata = owner["metadata"]
    namespace, selector = metadata["namespace"], f"{contract.LABEL_EXPERIMENT}={metadata['name']}"
    found: dict[str, list[Any]] = {}
    for kind, list_fn in (
        ("Job", api.batch.list_namespaced_job),
        ("Service", api.core.list_namespaced_service),
        ("ConfigMap", api.core.list_namespaced_config_map),
        ("Pod", api.core.list_namespaced_pod),
    ):
        listing = await api.call(f"{kind} objects labelled {selector}", list_fn, namespace, label_selector=selector)
        found[kind] = list(listing.items)
    our_jobs = {job.metadata.uid for job in owned(found["Job"], owner)}
    uid = experiment_uid(owner)
    left = [
        describe(obj, kind) for kind in ("Job", "Service", "ConfigMap") for obj in found[kind] if not is_owned(obj, uid)
    ]
    left += [describe(pod, "Pod") for pod in found["Pod"] if not _terminal(pod) and controller_uid(pod) not in our_jobs]
    return left


def _age_seconds(owner: dict[str, Any], now: datetime) -> float:
    created = owner["metadata"].get("creationTimestamp")
    try:
        return (now - datetime.fromisoformat(str(created).replace("Z", "+00:00"))).total_seconds()
    except ValueError:
        return 0.0


class LeftoverGate:
    """Holds a new incarnation of an experiment until what an earlier one left under its names is gone.

    Checked before each cycle until it first finds nothing (4 list requests); from then on every
    child is created by this incarnation and it costs nothing.
    """

    def __init__(self, api: KubeApi, owner: dict[str, Any], wait_seconds: float | None = None) -> None:
        self.api = api
        self.owner = owner
        self.wait_seconds = LEFTOVER_WAIT_SECONDS if wait_seconds is None else wait_seconds
        self.open = False

    async def hold(
        self, runtime: Runtime, status: AgentExperimentStatus, now: str
    ) -> tuple[bool, AgentExperimentStatus]:
        """(held, status): held is True while the experiment may not run its cycle, status what it now is
        (saved when it changed). Once nothing is left the gate opens for good."""
        if self.open:
            return False, status
        metadata = self.owner["metadata"]
        who = f"{metadata['namespace']}/{metadata['name']}"
        try:
            left = await leftovers(self.api, self.owner)
        except RuntimeFailure as failure:
            logger.warning("%s: cannot check for leftovers of an earlier incarnation, retrying: %s", who, failure)
            return True, status
        if not left:
            self.open = True
            if any(c.type == CONDITION_NAMES_AVAILABLE for c in status.conditions):
                status = set_condition(
                    status,
                    type=CONDITION_NAMES_AVAILABLE,
                    value="True",
                    reason="NoLeftovers",
                    message="nothing of an earlier AgentExperiment of this name is left",
                    now=now,
                )
                if not status.finished:
                    status = status.model_copy(update={"message": ""})
            return False, status
        shown = ", ".join(left[:MAX_LISTED]) + (f" and {len(left) - MAX_LISTED} more" if len(left) > MAX_LISTED else "")
        if status.finished or _age_seconds(self.owner, _parse(now)) > self.wait_seconds:
            message = (
                f"an earlier AgentExperiment named {metadata['name']} left {shown}, still there after "
                f"{self.wait_seconds:g} s (LEFTOVER_WAIT_SECONDS): orphaned, they will not go by themselves; "
                f"delete them (kubectl delete jobs,services,configmaps,pods -n {metadata['namespace']} "
                f"-l {contract.LABEL_EXPERIMENT}={metadata['name']}) and create this experiment again"
            )
            reason, phase = "LeftoversRemain", "Failed"
        else:
            message = (
                f"waiting for the garbage collector to remove what an earlier AgentExperiment named "
                f"{metadata['name']} left under this experiment's names: {shown}"
            )
            reason, phase = "WaitingForGarbageCollection", status.phase
        logger.warning("%s: %s", who, message)
        held = set_condition(
            status, type=CONDITION_NAMES_AVAILABLE, value="False", reason=reason, message=message, now=now
        )
        update: dict[str, Any] = {"phase": phase, "message": message[:1000]}
        if phase == "Failed" and held.finished_at is None:
            update["finished_at"] = now
        held = held.model_copy(update=update)
        if held != status:
            await runtime.announce(REASON_LEFTOVERS, message)
            try:
                await runtime.save_status(held)
            except RuntimeFailure as failure:
                logger.warning("%s: status not saved, retrying: %s", who, failure)
                return True, status
        return True, held


def _parse(now: str) -> datetime:
    return datetime.fromisoformat(now.replace("Z", "+00:00")).astimezone(UTC)
