"""Bad specs are rejected twice: by the API server (CRD schema + CEL) and by the pydantic models.

`admit` plays the API server (strict fields, defaulting, schema, CEL evaluated by cel-python);
`parse_spec` is what the operator and `trainpilot run` use. Each bad spec below must fail in
both, each with a message that names the field; the few that only pydantic can catch are listed
separately, so the gap is written down rather than discovered.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.support.openapi import admit
from tests.support.paths import REPO
from trainpilot.api import contract
from trainpilot.api.crd import build_crds
from trainpilot.api.experiment import EXPERIMENT_NAME_RULE, TrialStatus, check_experiment_name, parse_spec
from trainpilot.api.quota import parse_quota_policy

ROOT = REPO

GOOD: dict[str, Any] = {
    "apiVersion": "trainpilot.dev/v1alpha1",
    "kind": "AgentExperiment",
    "metadata": {"name": "quickstart", "namespace": "ml"},
    "spec": {
        "objective": {"metric": "val_loss", "direction": "minimize", "goal": 2.1},
        "searchSpace": [
            {"name": "lr", "min": 1.0e-4, "max": 5.0, "log": True},
            {"name": "weight_decay", "min": 0, "max": 0.1},
            {"name": "micro_batch", "values": [8, 16, 32]},
        ],
        "initialTrials": [{"lr": 5, "micro_batch": 16}, {"lr": 0.003, "weight_decay": 0}],
        "trialTemplate": {
            "image": "trainpilot/trainer:0.1.0",
            "nodes": 2,
            "gpusPerNode": 1,
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
            "hyperparameters": {"dataset": "synthetic", "n_layer": 2, "n_head": 2, "n_embd": 32, "max_steps": 300},
            "checkpoints": {"claimName": "ckpt"},
            "env": {"OMP_NUM_THREADS": "2"},
        },
        "budget": {"maxTrials": 4, "parallelTrials": 2, "maxFailedTrials": 2, "maxGPUHours": 10},
        "policy": {"type": "heuristic", "intervalSeconds": 2, "heuristic": {"rungs": [0.25, 0.5]}},
        "metrics": {"port": 9400, "path": "/metrics"},
    },
}


@pytest.fixture(scope="module")
def crds() -> dict[str, dict]:
    return {c["spec"]["names"]["kind"]: c for c in build_crds()}


def edited(change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    obj = copy.deepcopy(GOOD)
    change(obj["spec"])
    return obj


def test_good_spec_is_admitted_and_defaults_agree_with_pydantic(crds: dict[str, dict]) -> None:
    stored, errors = admit(crds[contract.EXPERIMENT_KIND], GOOD)
    assert errors == []
    # The API server filled in the CRD's defaults ...
    assert stored["spec"]["budget"]["maxFailedTrials"] == 2
    assert stored["spec"]["policy"]["heuristic"]["spikeFactor"] == 3.0
    assert stored["spec"]["searchSpace"][1]["log"] is False
    assert stored["spec"]["trialTemplate"]["imagePullPolicy"] == "IfNotPresent"
    # ... and they are pydantic's defaults: the stored spec means exactly what the user wrote.
    assert parse_spec(stored["spec"]) == parse_spec(GOOD["spec"])


def test_minimal_spec_is_admitted(crds: dict[str, dict]) -> None:
    minimal = {**GOOD, "spec": {"searchSpace": [{"name": "lr", "min": 0.001, "max": 0.1}]}}
    stored, errors = admit(crds[contract.EXPERIMENT_KIND], minimal)
    assert errors == []
    # Scalars get their defaults; absent objects stay absent (pydantic fills them in).
    assert stored["spec"] == {
        "searchSpace": [{"name": "lr", "min": 0.001, "max": 0.1, "log": False}],
        "suspend": False,
    }
    assert parse_spec(stored["spec"]).budget.max_trials == 8


# (id, change to the good spec, what the API server says, what pydantic says)
BAD: list[tuple[str, Callable[[dict[str, Any]], Any], str, str]] = [
    # --- caught by the OpenAPI schema ---
    ("no-search-space", lambda s: s.pop("searchSpace"), "spec.searchSpace: Required value", "spec.searchSpace: Field required"),
    ("empty-search-space", lambda s: s.update(searchSpace=[]), "spec.searchSpace: Invalid value: 0: should have at least 1", "spec.searchSpace"),
    ("unknown-direction", lambda s: s["objective"].update(direction="up"), "spec.objective.direction: Unsupported value", "spec.objective.direction"),
    ("metric-pattern", lambda s: s["objective"].update(metric="Val-Loss"), "spec.objective.metric: Invalid value", "spec.objective.metric"),
    ("max-trials-zero", lambda s: s["budget"].update(maxTrials=0), "spec.budget.maxTrials: Invalid value: 0: must be greater than or equal to 1", "spec.budget.maxTrials"),
    ("max-trials-string", lambda s: s["budget"].update(maxTrials="eight"), "spec.budget.maxTrials: Invalid value: \"eight\": must be of type integer", "spec.budget.maxTrials"),
    ("gpu-hours-zero", lambda s: s["budget"].update(maxGPUHours=0), "spec.budget.maxGPUHours: Invalid value: 0: must be greater than 0", "spec.budget.maxGPUHours"),
    ("too-many-nodes", lambda s: s["trialTemplate"].update(nodes=65), "spec.trialTemplate.nodes: Invalid value: 65: must be less than or equal to 64", "spec.trialTemplate.nodes"),
    ("empty-image", lambda s: s["trialTemplate"].update(image=""), "spec.trialTemplate.image", "spec.trialTemplate.image"),
    ("env-not-string", lambda s: s["trialTemplate"]["env"].update(OMP_NUM_THREADS=2), "spec.trialTemplate.env.OMP_NUM_THREADS: Invalid value: 2: must be of type string", "spec.trialTemplate.env.OMP_NUM_THREADS"),
    ("metrics-path", lambda s: s["metrics"].update(path="metrics"), "spec.metrics.path: Invalid value", "spec.metrics.path"),
    ("unknown-action", lambda s: s["policy"].update(allowedActions=["launch", "delete"]), "spec.policy.allowedActions[1]: Unsupported value", "spec.policy.allowedActions.1"),
    ("unknown-policy", lambda s: s["policy"].update(type="gpt"), "spec.policy.type: Unsupported value", "spec.policy.type"),
    ("unknown-field", lambda s: s["budget"].update(maxTrails=3), 'spec.budget: unknown field "maxTrails"', "spec.budget.maxTrails: Extra inputs are not permitted"),
    ("unknown-hyperparameter", lambda s: s["searchSpace"][0].update(name="learning_rate"), "spec.searchSpace[0].name: Unsupported value", "unknown hyperparameter 'learning_rate'"),
    ("searched-validation-set", lambda s: s["searchSpace"][0].update(name="eval_windows"), "spec.searchSpace[0].name: Unsupported value", "eval_windows fixes the validation set every trial is scored on"),
    ("duplicate-parameter", lambda s: s["searchSpace"].append({"name": "lr", "min": 0.1, "max": 1}), "spec.searchSpace: Duplicate value", "['lr'] listed more than once"),
    ("empty-values", lambda s: s["searchSpace"][2].update(values=[]), "spec.searchSpace[2].values: Invalid value: 0: should have at least 1", "spec.searchSpace.2.values"),
    ("rung-out-of-range", lambda s: s["policy"]["heuristic"].update(rungs=[0.5, 1.0]), "spec.policy.heuristic.rungs[1]: Invalid value: 1.0: must be less than 1", "spec.policy.heuristic.rungs"),
    ("too-many-initial-trials", lambda s: s.update(initialTrials=[{"lr": 0.01}] * 65), "spec.initialTrials: Too many: 65", "spec.initialTrials"),
    # --- caught by CEL rules ---
    ("values-and-range", lambda s: s["searchSpace"][2].update(min=8), "spec.searchSpace[2]: Invalid value: searchSpace[micro_batch]: give either values, or both min and max", "searchSpace[micro_batch]: give either values or min/max, not both"),
    ("half-a-range", lambda s: s["searchSpace"][1].pop("max"), "spec.searchSpace[1]: Invalid value: searchSpace[weight_decay]: give either values, or both min and max", "searchSpace[weight_decay]: a range needs both min and max"),
    ("min-above-max", lambda s: s["searchSpace"][1].update(min=0.2), "spec.searchSpace[1]: Invalid value: searchSpace[weight_decay]: min must be below max", "searchSpace[weight_decay]: min (0.2) must be below max (0.1)"),
    ("log-from-zero", lambda s: s["searchSpace"][1].update(log=True), "spec.searchSpace[1]: Invalid value: searchSpace[weight_decay]: log: true needs min > 0", "searchSpace[weight_decay]: log scale needs min > 0"),
    ("parallel-above-max", lambda s: s["budget"].update(parallelTrials=5), "spec.budget.parallelTrials: Invalid value: budget.parallelTrials must not exceed budget.maxTrials", "budget.parallelTrials (5) must not exceed budget.maxTrials (4)"),
    ("default-parallel-above-max", lambda s: s.update(budget={"maxTrials": 1}), "spec.budget.parallelTrials: Invalid value: budget.parallelTrials must not exceed", "budget.parallelTrials (2) must not exceed budget.maxTrials (1)"),
    ("initial-trial-not-in-space", lambda s: s["initialTrials"].append({"dropout": 0.1}), "spec.initialTrials: Invalid value: initialTrials: every hyperparameter must be named in searchSpace", "initialTrials[2].dropout: not in searchSpace"),
    ("initial-trial-out-of-range", lambda s: s["initialTrials"].append({"lr": 6}), "spec.initialTrials: Invalid value: initialTrials: every value must lie within [min, max]", "initialTrials[2].lr: 6.0 is outside the search space"),
    ("resources-key", lambda s: s["trialTemplate"]["resources"].update(claims=s["trialTemplate"]["resources"].pop("limits")), "spec.trialTemplate.resources: Invalid value: trialTemplate.resources: only requests and limits", "only requests and limits are allowed"),
    ("rungs-unsorted", lambda s: s["policy"]["heuristic"].update(rungs=[0.5, 0.25]), "spec.policy.heuristic.rungs: Invalid value: policy.heuristic.rungs: list the fractions in increasing order", "rungs must be strictly increasing"),
    ("rungs-repeated", lambda s: s["policy"]["heuristic"].update(rungs=[0.5, 0.5]), "spec.policy.heuristic.rungs: Duplicate value", "rungs must be strictly increasing"),
    # GPUs come only from gpusPerNode, which the budget and the QuotaPolicy count.
    ("gpu-in-limits", lambda s: s["trialTemplate"]["resources"]["limits"].update({"nvidia.com/gpu": "1"}), "spec.trialTemplate.resources: Invalid value: trialTemplate.resources: GPUs (*/gpu) are asked for with trialTemplate.gpusPerNode", "limits.nvidia.com/gpu: GPUs are asked for with trialTemplate.gpusPerNode"),
    ("amd-gpu-in-requests", lambda s: s["trialTemplate"]["resources"]["requests"].update({"amd.com/gpu": "2"}), "spec.trialTemplate.resources: Invalid value: trialTemplate.resources: GPUs (*/gpu)", "requests.amd.com/gpu: GPUs are asked for with trialTemplate.gpusPerNode"),
    # What the operator and torchrun inject cannot be overridden.
    ("env-trial-config", lambda s: s["trialTemplate"]["env"].update(TRAINPILOT_TRIAL_CONFIG="/tmp/mine.json"), "spec.trialTemplate.env: Invalid value: trialTemplate.env may not set TRAINPILOT_*", "spec.trialTemplate.env: TRAINPILOT_TRIAL_CONFIG: the operator or torchrun sets these"),
    ("env-torchrun-rank", lambda s: s["trialTemplate"]["env"].update(PET_NNODES="8"), "spec.trialTemplate.env: Invalid value: trialTemplate.env may not set", "PET_NNODES: the operator or torchrun sets these"),
    ("env-visible-gpus", lambda s: s["trialTemplate"]["env"].update(NVIDIA_VISIBLE_DEVICES="all"), "spec.trialTemplate.env: Invalid value: trialTemplate.env may not set", "NVIDIA_VISIBLE_DEVICES: the operator or torchrun sets these"),
    ("env-world-size", lambda s: s["trialTemplate"]["env"].update(WORLD_SIZE="1"), "spec.trialTemplate.env: Invalid value: trialTemplate.env may not set", "WORLD_SIZE: the operator or torchrun sets these"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "server_says", "pydantic_says"), [case[1:] for case in BAD], ids=[case[0] for case in BAD]
)
def test_bad_spec_is_rejected_by_the_api_server_and_by_pydantic(
    crds: dict[str, dict], change: Callable, server_says: str, pydantic_says: str
) -> None:
    obj = edited(change)
    _, errors = admit(crds[contract.EXPERIMENT_KIND], obj)
    assert errors, "the API server would admit this"
    assert any(server_says in error for error in errors), errors
    with pytest.raises(ValueError) as raised:
        parse_spec(obj["spec"])
    assert pydantic_says in str(raised.value)


# Children are `<experiment>-tNNN` Jobs and Services (a Service name is a DNS-1035 label: it
# starts with a letter), `<experiment>-tNNN-config` and `<experiment>-ledger-N` ConfigMaps and
# `<job>-<index>` pod hostnames: each of these names would make one of them invalid.
BAD_NAMES = ["x" * 41, "1st-try", "lr.search", "LR-search", "lr_search", "lr-", "-lr", ""]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_that_make_invalid_child_names_are_refused_by_cel_and_by_the_operator(
    crds: dict[str, dict], name: str
) -> None:
    obj = copy.deepcopy(GOOD)
    obj["metadata"]["name"] = name
    _, errors = admit(crds[contract.EXPERIMENT_KIND], obj)
    # One message, from the API server and from the operator, that says what a name may be.
    assert errors == [f"Invalid value: {EXPERIMENT_NAME_RULE}"]
    assert EXPERIMENT_NAME_RULE.startswith("metadata.name must be 1-40 lowercase letters, digits or '-', starting")
    with pytest.raises(ValueError) as raised:
        check_experiment_name(name)
    assert str(raised.value) == f"{EXPERIMENT_NAME_RULE}; {name!r} is not"


@pytest.mark.parametrize("name", ["x" * 40, "lr-search-2", "a", "q1"])
def test_names_that_make_valid_child_names_are_admitted(crds: dict[str, dict], name: str) -> None:
    obj = copy.deepcopy(GOOD)
    obj["metadata"]["name"] = name
    assert admit(crds[contract.EXPERIMENT_KIND], obj)[1] == []
    check_experiment_name(name)
    # The longest child name stays a DNS-1035 label, whatever the trial and pod index.
    longest = f"{name}-t999-63"
    assert len(longest) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", longest)


def test_every_variable_the_operator_injects_is_reserved() -> None:
    """builders.py and the validation share contract.RESERVED_ENV: nothing injected may be overridden."""
    from trainpilot.runtime.kubernetes.builders import build_job

    owner = {"metadata": {"name": "quickstart", "namespace": "ml", "uid": "u"}}
    spec = parse_spec({**GOOD["spec"], "trialTemplate": {**GOOD["spec"]["trialTemplate"], "env": {}}})
    injected: set[str] = set()
    for nodes, gpus in ((1, 0), (2, 0), (2, 4)):
        trial = TrialStatus(name="quickstart-t000", index=0, nodes=nodes, gpus_per_node=gpus)
        (container,) = build_job(owner, spec, trial, "quickstart-d00000")["spec"]["template"]["spec"]["containers"]
        injected |= {entry["name"] for entry in container["env"]}
    assert {"TRAINPILOT_TRIAL_CONFIG", "PET_NNODES", "PET_MASTER_ADDR", "DS_ACCELERATOR"} <= injected
    assert [name for name in sorted(injected) if not contract.is_reserved_env(name)] == []


def test_cel_sees_numbers_as_doubles(crds: dict[str, dict]) -> None:
    """`lr: 5` (an int in YAML) against `max: 5.0`: Kubernetes types both as double, so no error."""
    obj = edited(lambda s: s.update(initialTrials=[{"lr": 5}], searchSpace=[{"name": "lr", "min": 1, "max": 5}]))
    assert admit(crds[contract.EXPERIMENT_KIND], obj)[1] == []
    assert parse_spec(obj["spec"]).initial_trials == [{"lr": 5.0}]


# What only the operator's pydantic validation can catch: the trainer's own settings live in a
# free-form map the CRD preserves as is (so a newer trainer needs no CRD change).
PYDANTIC_ONLY: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("hyperparameter-typo", lambda s: s["trialTemplate"]["hyperparameters"].update(n_layers=4), "spec.trialTemplate.hyperparameters: n_layers: Extra inputs are not permitted"),
    ("hyperparameter-type", lambda s: s["trialTemplate"]["hyperparameters"].update(max_steps="many"), "max_steps"),
    ("heads-do-not-divide", lambda s: s["trialTemplate"]["hyperparameters"].update(n_head=3), "n_embd (32) must be divisible by n_head (3)"),
    ("fixed-and-searched", lambda s: s["trialTemplate"]["hyperparameters"].update(lr=0.1), "trialTemplate.hyperparameters fixes ['lr'], which searchSpace also moves"),
    ("value-not-listed", lambda s: s["initialTrials"].append({"micro_batch": 12}), "initialTrials[2].micro_batch: 12.0 is outside the search space (one of [8.0, 16.0, 32.0])"),
    ("corner-breaks-template", lambda s: s["searchSpace"].append({"name": "warmup_steps", "min": 400, "max": 500}), "warmup_steps (400) must not exceed max_steps (300)"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "pydantic_says"), [c[1:] for c in PYDANTIC_ONLY], ids=[c[0] for c in PYDANTIC_ONLY])
def test_what_only_pydantic_catches(crds: dict[str, dict], change: Callable, pydantic_says: str) -> None:
    obj = edited(change)
    assert admit(crds[contract.EXPERIMENT_KIND], obj)[1] == []
    with pytest.raises(ValueError) as raised:
        parse_spec(obj["spec"])
    assert pydantic_says in str(raised.value)


def test_quota_policies(crds: dict[str, dict]) -> None:
    crd = crds[contract.QUOTA_KIND]
    good = {
        "apiVersion": "trainpilot.dev/v1alpha1",
        "kind": "QuotaPolicy",
        "metadata": {"name": "team-ml"},
        "spec": {
            "namespaceSelector": {"matchNames": ["ml"]},
            "maxGPUs": 16,
            "maxGPUHoursPerExperiment": 100.5,
            "allowedActions": ["launch", "terminate", "complete"],
            "requireApprovalFor": ["scale"],
            "allowedImages": ["ghcr.io/org/trainer:", "ghcr.io/org/trainer@"],
            "allowedServiceAccounts": ["trainer", "ci.bots"],
        },
    }
    assert admit(crd, good)[1] == []
    assert parse_quota_policy(good).spec.max_gpus == 16
    assert parse_quota_policy(good).spec.allowed_service_accounts == ["trainer", "ci.bots"]
    assert admit(crd, {**good, "spec": {}})[1] == []
    for spec, server_says, pydantic_says in [
        ({"maxGPUs": -1}, "spec.maxGPUs: Invalid value: -1", "spec.maxGPUs"),
        ({"maxGpus": 4}, 'spec: unknown field "maxGpus"', "spec.maxGpus: Extra inputs"),
        ({"allowedActions": ["fly"]}, "spec.allowedActions[0]: Unsupported value", "spec.allowedActions.0"),
        (
            {"namespaceSelector": {"matchNames": []}},
            "spec.namespaceSelector.matchNames: Invalid value: 0",
            "spec.namespaceSelector.matchNames",
        ),
        ({"maxNodesPerTrial": 0}, "spec.maxNodesPerTrial: Invalid value: 0", "spec.maxNodesPerTrial"),
        ({"allowedImages": [""]}, "spec.allowedImages[0]: Invalid value", "spec.allowedImages.0"),
        (
            {"allowedServiceAccounts": ["Admin_SA"]},
            "spec.allowedServiceAccounts[0]: Invalid value",
            "spec.allowedServiceAccounts.0",
        ),
    ]:
        obj = {**good, "spec": spec}
        errors = admit(crd, obj)[1]
        assert any(server_says in error for error in errors), (spec, errors)
        with pytest.raises(ValueError, match="QuotaPolicy team-ml: ") as raised:
            parse_quota_policy(obj)
        assert pydantic_says in str(raised.value)


def example_documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted((ROOT / "examples").glob("**/*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(document, dict) and document.get("kind") in (
                contract.EXPERIMENT_KIND,
                contract.QUOTA_KIND,
            ):
                found.append((f"{path.relative_to(ROOT)}#{index}", document))
    return found


@pytest.mark.parametrize("document", [d for _, d in example_documents()], ids=[n for n, _ in example_documents()])
def test_examples_are_admitted(crds: dict[str, dict], document: dict) -> None:
    stored, errors = admit(crds[document["kind"]], document)
    assert errors == []
    if document["kind"] == contract.EXPERIMENT_KIND:
        assert parse_spec(stored["spec"]) == parse_spec(document["spec"])
        check_experiment_name(document["metadata"]["name"])
    else:
        parse_quota_policy(document)
