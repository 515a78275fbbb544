"""Pure functions from an experiment and a trial to the Kubernetes objects that run it.

No API calls here: each function returns a plain dict manifest, so what the operator creates can
be read, diffed and tested without a cluster.

A trial is an Indexed batch/v1 Job (one pod per node; Kueue and kubectl understand it) plus a
headless Service that gives pod `<job>-0` a stable DNS name for torchrun's rendezvous, a
ConfigMap with the trial config and a ConfigMap with the control file.
"""

from __future__ import annotations

import json
from typing import Any

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentSpec, TrialStatus
from trainpilot.api.trial import ControlFile, TrialConfig
from trainpilot.runtime.kubernetes import kueue

CONFIG_MOUNT = "/etc/trainpilot/trial"
CONFIG_KEY = "trial.json"
CONTROL_MOUNT = "/etc/trainpilot/control"
CONTROL_KEY = "control.json"
RENDEZVOUS_PORT = 29500
# Enough for the trainer to finish a step, checkpoint and exit (it aims for well under this).
TERMINATION_GRACE_SECONDS = 30
CONTAINER_NAME = "trainer"
TERMINATION_LOG = "/dev/termination-log"
# Pods that Kubernetes itself disrupts (the eviction API, the scheduler's preemption, node pressure,
# a node going away, taint eviction) get the DisruptionTarget condition before they are stopped.
# Such a failure is ignored: it does not count toward backoffLimit and the pod is replaced.
POD_FAILURE_POLICY: dict[str, Any] = {
    "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
}


def owner_reference(experiment: dict[str, Any]) -> dict[str, Any]:
    """Children point at the experiment, so deleting it garbage-collects them."""
    metadata = experiment["metadata"]
    return {
        "apiVersion": contract.API_VERSION,
        "kind": contract.EXPERIMENT_KIND,
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_labels(experiment: str, trial: str | None = None) -> dict[str, str]:
    labels = {contract.LABEL_EXPERIMENT: experiment}
    if trial is not None:
        labels[contract.LABEL_TRIAL] = trial
    return labels


def config_map_name(trial: str) -> str:
    return f"{trial}-config"


def control_map_name(trial: str) -> str:
    return f"{trial}-control"


def checkpoint_dir(spec: AgentExperimentSpec, owner: dict[str, Any], trial: str) -> str | None:
    """`<mountPath>/<experiment>/<uid>/<trial>`: an experiment deleted and re-created under the same
    name is another incarnation (another uid), whose trials never resume the earlier one's checkpoints."""
    volume = spec.trial_template.checkpoints
    if volume is None:
        return None
    metadata = owner["metadata"]
    return f"{volume.mount_path.rstrip('/')}/{metadata['name']}/{metadata['uid']}/{trial}"


def owned_config_map(
    owner: dict[str, Any],
    name: str,
    data: dict[str, str],
    trial: str | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A ConfigMap the experiment owns (deleted with it), labelled as its child (and `trial`'s)."""
    experiment = owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": owner["metadata"]["namespace"],
            "labels": {**child_labels(experiment, trial), **(labels or {})},
            "ownerReferences": [owner_reference(owner)],
        },
        "data": data,
    }


def build_config_map(owner: dict[str, Any], trial: str, config: TrialConfig) -> dict[str, Any]:
    return owned_config_map(owner, config_map_name(trial), {CONFIG_KEY: config.model_dump_json(indent=2)}, trial)


def build_control_map(owner: dict[str, Any], trial: str, control: ControlFile) -> dict[str, Any]:
    data = {CONTROL_KEY: control.model_dump_json(exclude_none=True)}
    return owned_config_map(owner, control_map_name(trial), data, trial)


def build_service(owner: dict[str, Any], trial: str) -> dict[str, Any]:
    """Headless, and publishing not-ready pods: rendezvous happens before readiness."""
    experiment = owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": trial,
            "namespace": owner["metadata"]["namespace"],
            "labels": child_labels(experiment, trial),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": child_labels(experiment, trial),
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def trainer_command(command: list[str], nodes: int, processes: int) -> list[str]:
    """The template's command, wrapped in torchrun when a trial has more than one process.

    torchrun reads its node rank and rendezvous settings from PET_* variables (set in the pod's
    environment), so the command itself needs no shell and no variable expansion.
    """
    if nodes * processes == 1:
        return list(command)
    launcher = [command[0], "-m", "torch.distributed.run"]
    if len(command) >= 3 and command[1] == "-m":
        return [*launcher, "-m", *command[2:]]
    return [*launcher, *command[1:]]


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def build_job(
    owner: dict[str, Any],
    spec: AgentExperimentSpec,
    trial: TrialStatus,
    decision_id: str,
) -> dict[str, Any]:
    """The trial's Indexed Job: completions = parallelism = nodes, one trainer container per pod.

    With spec.queue.name it goes to that Kueue LocalQueue (and WorkloadPriorityClass): labelled for
    Kueue and created suspended, so that no pod starts before Kueue admits it by unsuspending it.
    From then on spec.suspend is Kueue's alone: nothing in the operator ever changes it."""
    labels = child_labels(owner["metadata"]["name"], trial.name)
    queue_labels = kueue.job_labels(spec)
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": trial.name,
            "namespace": owner["metadata"]["namespace"],
            "labels": {**labels, **queue_labels},
            "annotations": {
                contract.ANNOTATION_HYPERPARAMETERS: json.dumps(trial.hyperparameters, sort_keys=True),
                contract.ANNOTATION_DECISION: decision_id,
            },
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "completionMode": "Indexed",
            "completions": trial.nodes,
            "parallelism": trial.nodes,
            # A failed trial is a fact for the policy to weigh, not something to retry blindly.
            "backoffLimit": 0,
            # ... but an evicted or preempted pod is not a failure of the trial: the Job controller
            # replaces it, and the trainer resumes its own latest checkpoint.
            "podFailurePolicy": POD_FAILURE_POLICY,
            # A replacement starts only once the pod it replaces has stopped (the default with a
            # podFailurePolicy, spelled out): one index never runs twice, on one checkpoint directory.
            "podReplacementPolicy": "Failed",
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(spec.metrics.port),
                        "prometheus.io/path": spec.metrics.path,
                    },
                },
                "spec": build_pod_spec(spec, trial),
            },
        },
    }
    if queue_labels:
        job["spec"]["suspend"] = True
    return job


def build_pod_spec(spec: AgentExperimentSpec, trial: TrialStatus) -> dict[str, Any]:
    template = spec.trial_template
    volumes, mounts = _volumes(spec, trial)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": trial.name,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "containers": [_trainer_container(spec, trial, mounts)],
        "volumes": volumes,
    }
    if template.node_selector:
        pod_spec["nodeSelector"] = dict(template.node_selector)
    if template.service_account_name:
        pod_spec["serviceAccountName"] = template.service_account_name
    return pod_spec


def _trainer_container(spec: AgentExperimentSpec, trial: TrialStatus, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    template = spec.trial_template
    processes = _processes_per_pod(spec, trial)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": template.image,
        "imagePullPolicy": template.image_pull_policy,
        "command": trainer_command(template.command, trial.nodes, processes),
        "env": _trainer_env(spec, trial, processes),
        "ports": [
            {"name": "metrics", "containerPort": spec.metrics.port},
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT},
        ],
        "volumeMounts": mounts,
        # The trainer writes its final result here; the kubelet copies it into the pod status,
        # so the last metrics survive even when no scrape caught them.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }
    resources = _resources(spec, trial)
    if resources:
        container["resources"] = resources
    return container


def _processes_per_pod(spec: AgentExperimentSpec, trial: TrialStatus) -> int:
    return spec.trial_template.processes_per_node or max(trial.gpus_per_node, 1)


def _trainer_env(spec: AgentExperimentSpec, trial: TrialStatus, processes: int) -> list[dict[str, Any]]:
    """What the operator injects (the contract's TRAINPILOT_* names, torchrun's PET_*), then the user's env."""
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_TRIAL_CONFIG, "value": f"{CONFIG_MOUNT}/{CONFIG_KEY}"},
        {"name": contract.ENV_CONTROL_FILE, "value": f"{CONTROL_MOUNT}/{CONTROL_KEY}"},
        {"name": contract.ENV_METRICS_PORT, "value": str(spec.metrics.port)},
        # Bind to the pod's own address: the same in a real pod, and it keeps trials on a
        # shared host network (or a test's fake node) from fighting over one port.
        _field_env(contract.ENV_METRICS_ADDR, "status.podIP"),
        {"name": contract.ENV_TERMINATION_LOG, "value": TERMINATION_LOG},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if trial.nodes * processes > 1:
        index_path = f"metadata.annotations['{contract.LABEL_COMPLETION_INDEX}']"
        env += [
            _field_env("PET_NODE_RANK", index_path),
            {"name": "PET_NNODES", "value": str(trial.nodes)},
            {"name": "PET_NPROC_PER_NODE", "value": str(processes)},
            {"name": "PET_MASTER_ADDR", "value": f"{trial.name}-0.{trial.name}"},
            {"name": "PET_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        ]
    if trial.gpus_per_node == 0:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    return env + [{"name": key, "value": value} for key, value in sorted(spec.trial_template.env.items())]


def _resources(spec: AgentExperimentSpec, trial: TrialStatus) -> dict[str, dict[str, str]]:
    resources = {kind: dict(values) for kind, values in spec.trial_template.resources.items()}
    if trial.gpus_per_node:
        # The kubernetes client validates quantities as strings.
        resources.setdefault("limits", {})["nvidia.com/gpu"] = str(trial.gpus_per_node)
    return resources


def cleanup_job_name(trial: str) -> str:
    return f"{trial}-cleanup"


def build_cleanup_job(owner: dict[str, Any], spec: AgentExperimentSpec, trial: str) -> dict[str, Any] | None:
    """A Job that deletes `trial`'s checkpoint folder on the claim (the operator never mounts it),
    run with the trial's own image, service account and node selector. None without a volume.
    Labelled with the experiment only: it is no trial's, and nothing observes it as one."""
    volume = spec.trial_template.checkpoints
    directory = checkpoint_dir(spec, owner, trial)
    if volume is None or directory is None:
        return None
    template = spec.trial_template
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "cleanup",
                "image": template.image,
                "imagePullPolicy": template.image_pull_policy,
                "command": ["rm", "-rf", "--", directory],
                "volumeMounts": [{"name": "checkpoints", "mountPath": volume.mount_path}],
                "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
            }
        ],
        "volumes": [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": volume.claim_name}}],
    }
    if template.node_selector:
        pod_spec["nodeSelector"] = dict(template.node_selector)
    if template.service_account_name:
        pod_spec["serviceAccountName"] = template.service_account_name
    labels = child_labels(owner["metadata"]["name"])
    # In the trials' LocalQueue when they have one: a Kueue that manages every Job admits it there.
    queue_labels = kueue.job_labels(spec)
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": cleanup_job_name(trial),
            "namespace": owner["metadata"]["namespace"],
            "labels": {**labels, **queue_labels},
            "ownerReferences": [owner_reference(owner)],
        },
        # No ttlSecondsAfterFinished: the operator deletes it once it succeeded (runtime.kubernetes.
        # clean_ups); one that failed stays, the record of checkpoints not deleted.
        "spec": {
            "backoffLimit": 3,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    if queue_labels:
        job["spec"]["suspend"] = True
    return job


def _volumes(spec: AgentExperimentSpec, trial: TrialStatus) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the trainer's mounts of them: trial config, control file, checkpoints."""
    volumes: list[dict[str, Any]] = [
        {"name": "trial-config", "configMap": {"name": config_map_name(trial.name)}},
        {"name": "control", "configMap": {"name": control_map_name(trial.name)}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "trial-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "control", "mountPath": CONTROL_MOUNT, "readOnly": True},
    ]
    checkpoints = spec.trial_template.checkpoints
    if checkpoints is not None:
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": checkpoints.claim_name}})
        mounts.append({"name": "checkpoints", "mountPath": checkpoints.mount_path})
    if _processes_per_pod(spec, trial) > 1:
        # Processes of one pod talk through shared memory (NCCL between GPUs, torch's worker
        # queues); a container runtime's default /dev/shm is 64 MiB, which makes NCCL fail or crawl.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def event_name(owner: dict[str, Any], key: str) -> str:
    """`<key>.<experiment uid>`: deterministic, so a retried post is a conflict, not a duplicate, and
    per incarnation, so an experiment re-created under the same name never collides with the Events
    of the one deleted before it (decision ids restart at d00000)."""
    uid = owner["metadata"].get("uid")
    return f"{key}.{uid}" if uid else key


def build_event(owner: dict[str, Any], key: str, reason: str, message: str, warning: bool, now: str) -> dict[str, Any]:
    """A core/v1 Event on the experiment, named `event_name(owner, key)` (key: a decision id, say)."""
    metadata = owner["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": event_name(owner, key),
            "namespace": metadata["namespace"],
            "labels": child_labels(metadata["name"]),
        },
        "involvedObject": {
            "apiVersion": contract.API_VERSION,
            "kind": contract.EXPERIMENT_KIND,
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "uid": metadata.get("uid"),
        },
        "reason": reason,
        "message": message[:1024],
        "type": "Warning" if warning else "Normal",
        "source": {"component": "trainpilot-operator"},
        "reportingComponent": "trainpilot.dev/operator",
        "reportingInstance": "trainpilot-operator",
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
