"""The manifests a trial becomes: checked against the contract and the kubernetes client's own models."""

import json

import pytest
from kubernetes import client

from trainpilot.api import contract
from trainpilot.api.experiment import TrialStatus, parse_spec
from trainpilot.api.trial import ControlFile, TrialConfig
from trainpilot.runtime.kubernetes import builders

OWNER = {"metadata": {"name": "lr-search", "namespace": "research", "uid": "0000-1111"}}


def make_spec(**template):
    return parse_spec(
        {
            "searchSpace": [{"name": "lr", "min": 1e-4, "max": 1.0, "log": True}],
            "trialTemplate": {"hyperparameters": {"max_steps": 100}, **template},
            "metrics": {"port": 9401, "path": "/prom"},
        }
    )


def make_trial(nodes=1, gpus=0):
    return TrialStatus(name="lr-search-t003", index=3, hyperparameters={"lr": 0.01}, nodes=nodes, gpusPerNode=gpus)


def env_of(job):
    return {item["name"]: item for item in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_job_follows_the_contract_and_validates_as_a_v1_job():
    job = builders.build_job(OWNER, make_spec(), make_trial(), "lr-search-d00007")
    client.V1Job.model_validate(job)  # the client rejects bad bodies before any request
    labels = {contract.LABEL_EXPERIMENT: "lr-search", contract.LABEL_TRIAL: "lr-search-t003"}
    assert job["metadata"]["labels"] == labels
    assert job["spec"]["template"]["metadata"]["labels"] == labels
    assert json.loads(job["metadata"]["annotations"][contract.ANNOTATION_HYPERPARAMETERS]) == {"lr": 0.01}
    assert job["metadata"]["annotations"][contract.ANNOTATION_DECISION] == "lr-search-d00007"
    assert job["spec"]["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9401",
        "prometheus.io/path": "/prom",
    }
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == (contract.EXPERIMENT_KIND, "0000-1111", True)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["backoffLimit"] == 0
    env = env_of(job)
    assert env[contract.ENV_TRIAL_CONFIG]["value"] == "/etc/trainpilot/trial/trial.json"
    assert env[contract.ENV_METRICS_PORT]["value"] == "9401"
    assert env[contract.ENV_METRICS_ADDR]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["DS_ACCELERATOR"]["value"] == "cpu"
    assert "PET_NNODES" not in env  # one process: no torchrun
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["python", "-m", "trainpilot_trainer"]


@pytest.mark.parametrize("nodes,gpus", [(1, 1), (2, 4), (4, 8)])
def test_gpus_and_nodes(nodes, gpus):
    job = builders.build_job(OWNER, make_spec(), make_trial(nodes, gpus), "d")
    client.V1Job.model_validate(job)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    env = env_of(job)
    assert "DS_ACCELERATOR" not in env
    if nodes * gpus > 1:
        assert container["command"] == ["python", "-m", "torch.distributed.run", "-m", "trainpilot_trainer"]
        assert env["PET_NNODES"]["value"] == str(nodes)
        assert env["PET_NPROC_PER_NODE"]["value"] == str(gpus)
        assert env["PET_MASTER_ADDR"]["value"] == "lr-search-t003-0.lr-search-t003"
        assert "job-completion-index" in env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert job["spec"]["template"]["spec"]["subdomain"] == "lr-search-t003"


def test_cpu_processes_per_node_use_torchrun_and_user_resources_survive():
    spec = make_spec(processesPerNode=2, resources={"requests": {"cpu": "2", "memory": "1Gi"}}, env={"FOO": "bar"})
    job = builders.build_job(OWNER, spec, make_trial(), "d")
    client.V1Job.model_validate(job)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["python", "-m", "torch.distributed.run"]
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "1Gi"}}
    assert env_of(job)["FOO"]["value"] == "bar"


def test_checkpoint_volume_is_mounted_and_named_per_trial():
    spec = make_spec(checkpoints={"claimName": "ckpt", "mountPath": "/ckpt"})
    job = builders.build_job(OWNER, spec, make_trial(), "d")
    pod = job["spec"]["template"]["spec"]
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt"}} in pod["volumes"]
    assert {"name": "checkpoints", "mountPath": "/ckpt"} in pod["containers"][0]["volumeMounts"]
    # Per incarnation: an experiment re-created under the same name (another uid) never resumes these.
    assert builders.checkpoint_dir(spec, OWNER, "lr-search-t003") == "/ckpt/lr-search/0000-1111/lr-search-t003"
    again = {"metadata": {**OWNER["metadata"], "uid": "2222-3333"}}
    assert builders.checkpoint_dir(spec, again, "lr-search-t003") == "/ckpt/lr-search/2222-3333/lr-search-t003"
    assert builders.checkpoint_dir(make_spec(), OWNER, "t") is None


def test_service_config_maps_and_event_validate():
    service = builders.build_service(OWNER, "lr-search-t003")
    client.V1Service.model_validate(service)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"][contract.LABEL_TRIAL] == "lr-search-t003"

    config = TrialConfig(experiment="lr-search", trial="lr-search-t003")
    config_map = builders.build_config_map(OWNER, "lr-search-t003", config)
    client.V1ConfigMap.model_validate(config_map)
    assert TrialConfig.model_validate_json(config_map["data"]["trial.json"]) == config

    control = builders.build_control_map(OWNER, "lr-search-t003", ControlFile(generation=2, lr=0.5))
    assert json.loads(control["data"]["control.json"]) == {"generation": 2, "lr": 0.5}

    event = builders.build_event(OWNER, "lr-search-d00001", "TrialLaunched", "x" * 5000, False, "2026-01-01T00:00:00Z")
    client.CoreV1Event.model_validate(event)
    assert len(event["message"]) <= 1024
    # The decision id, then the experiment's uid: a re-created experiment's d00001 is another Event.
    assert event["metadata"]["name"] == "lr-search-d00001.0000-1111" == builders.event_name(OWNER, "lr-search-d00001")
    assert event["involvedObject"]["uid"] == "0000-1111"
    again = {"metadata": {**OWNER["metadata"], "uid": "2222-3333"}}
    assert builders.build_event(again, "lr-search-d00001", "TrialLaunched", "x", False, "t")["metadata"]["name"] == (
        "lr-search-d00001.2222-3333"
    )


@pytest.mark.parametrize(
    "gpus,processes,shared_memory", [(0, None, False), (1, None, False), (4, None, True), (0, 2, True)]
)
def test_pods_with_several_processes_get_a_memory_backed_dev_shm(gpus, processes, shared_memory):
    template = {"processesPerNode": processes} if processes else {}
    job = builders.build_job(OWNER, make_spec(**template), make_trial(gpus=gpus), "d")
    client.V1Job.model_validate(job)
    pod = job["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in pod["containers"][0]["volumeMounts"]}
    assert ("/dev/shm" in mounts) == shared_memory
    if shared_memory:
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}


@pytest.mark.parametrize("nodes", [1, 3])
def test_disruptions_are_ignored_by_a_pod_failure_policy(nodes):
    job = builders.build_job(OWNER, make_spec(), make_trial(nodes=nodes), "d")
    client.V1Job.model_validate(job)
    spec = job["spec"]
    # An evicted or preempted pod (DisruptionTarget) does not count toward backoffLimit 0: the Job
    # controller replaces it, once it has stopped, and the trainer resumes its own checkpoint.
    assert spec["podFailurePolicy"] == {
        "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    }
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["backoffLimit"] == 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # what a podFailurePolicy requires


def test_a_cleanup_job_deletes_one_trials_checkpoint_folder_on_the_claim_as_the_trial_ran():
    spec = make_spec(
        checkpoints={"claimName": "ckpt", "mountPath": "/ckpt"},
        serviceAccountName="trainer",
        nodeSelector={"pool": "gpu"},
    )
    spec = spec.model_copy(update={"queue": spec.queue.model_copy(update={"name": "team-a"})})
    job = builders.build_cleanup_job(OWNER, spec, "lr-search-t003")
    assert job is not None and job["metadata"]["name"] == "lr-search-t003-cleanup"
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["rm", "-rf", "--", "/ckpt/lr-search/0000-1111/lr-search-t003"]
    assert container["image"] == spec.trial_template.image
    assert pod["volumes"] == [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt"}}]
    assert (pod["serviceAccountName"], pod["nodeSelector"]) == ("trainer", {"pool": "gpu"})
    # No trial's: nothing observes it as one. In the trials' LocalQueue, suspended for Kueue to admit.
    assert contract.LABEL_TRIAL not in job["metadata"]["labels"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and job["spec"]["suspend"] is True
    assert builders.build_cleanup_job(OWNER, make_spec(), "lr-search-t003") is None  # no volume, nothing to delete
