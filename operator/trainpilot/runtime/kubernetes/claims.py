"""The checkpoint claim must fit the trial: pods on several nodes need a ReadWriteMany volume.

A ReadWriteOnce volume attaches to one node at a time (ReadWriteOncePod: to one pod), so the pods
of a trial with nodes > 1 could not all mount it: some would wait in ContainerCreating, or, on the
same node, write one checkpoint directory through one attachment while the others cannot. The
operator reads the claim's spec.accessModes at launch and refuses such a trial for good.
"""

from __future__ import annotations

from trainpilot.api.experiment import AgentExperimentSpec, TrialStatus
from trainpilot.runtime.base import PermanentFailure
from trainpilot.runtime.kubernetes.api import KubeApi, NotFound

SHARED_MODE = "ReadWriteMany"


class ClaimRefused(PermanentFailure):
    """The trial's checkpoint claim cannot serve all its pods."""


async def check_checkpoint_claim(api: KubeApi, spec: AgentExperimentSpec, trial: TrialStatus, namespace: str) -> None:
    """ClaimRefused when a trial of several nodes would share a claim that is not ReadWriteMany."""
    volume = spec.trial_template.checkpoints
    if volume is None or trial.nodes <= 1:
        return
    name = volume.claim_name
    try:
        claim = await api.call(
            f"checkpoint claim {name}", api.core.read_namespaced_persistent_volume_claim, name, namespace
        )
    except NotFound:
        return  # its pods wait for it (ContainerCreating), and pendingTimeoutSeconds says so in time
    modes = list((claim.spec.access_modes if claim.spec else None) or [])
    if SHARED_MODE in modes:
        return
    raise ClaimRefused(
        f"{trial.name} has nodes: {trial.nodes}, but its checkpoint claim {namespace}/{name} "
        f"(spec.trialTemplate.checkpoints.claimName) is {', '.join(modes) or 'of no access mode'}: a "
        "ReadWriteOnce volume attaches to one node at a time (ReadWriteOncePod: to one pod), so pods on "
        "several nodes cannot all write checkpoints to it; use a ReadWriteMany claim, or nodes: 1"
    )
