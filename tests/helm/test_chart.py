"""The Helm chart, rendered and linted for real (helm-python embeds Helm's Go SDK)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support import chart as chart_support
from tests.support.openapi import admit
from tests.support.paths import CHART, REPO
from trainpilot.api import crd

helm = pytest.importorskip("helm_python")

RELEASE_NAMESPACE = "trainpilot-system"

# What the operator does, per API group and resource, and nothing more (least privilege: the
# quickstart end-to-end test in tests/controller/test_operator_e2e.py runs the operator with exactly
# the chart's rules and fails on a 403 or on a rule it never uses, tests/controller/test_rbac.py):
# kopf's watches and patches, the finalizers its children's blocking ownerReferences need, trial
# Jobs (and cleanup Jobs), rendezvous Services, trial/control/
# ledger ConfigMaps (the ledger is replaced with PUT: update), metric scraping from pods and a
# restarted trial's pods watched until gone, the checkpoint claim's access modes, decision Events.
NAMESPACED_NEEDS: list[tuple[str, str, set[str]]] = [
    ("trainpilot.dev", "agentexperiments", {"list", "watch", "patch"}),
    ("trainpilot.dev", "agentexperiments/status", {"patch"}),
    ("trainpilot.dev", "agentexperiments/finalizers", {"update"}),
    ("batch", "jobs", {"create", "get", "list", "delete"}),
    ("", "services", {"create", "get", "list", "delete"}),
    ("", "configmaps", {"create", "get", "list", "patch", "update", "delete"}),
    ("", "pods", {"list", "watch"}),
    ("", "persistentvolumeclaims", {"get"}),
    ("", "events", {"create", "patch"}),
    ("kueue.x-k8s.io", "workloads", {"list"}),
]
CLUSTER_NEEDS: list[tuple[str, str, set[str]]] = [
    ("trainpilot.dev", "quotapolicies", {"list", "watch", "patch"}),
    ("trainpilot.dev", "quotapolicies/status", {"patch"}),
    ("apiextensions.k8s.io", "customresourcedefinitions", {"list", "watch"}),
]
# Only when watching named namespaces: kopf lists and watches namespaces to see them come and go.
SINGLE_NAMESPACE_CLUSTER_NEEDS: list[tuple[str, str, set[str]]] = [("", "namespaces", {"list", "watch"})]


def render(values: dict[str, Any] | None = None, namespace: str = RELEASE_NAMESPACE) -> list[dict[str, Any]]:
    return chart_support.render(values, namespace)


def granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    """Every (API group, resource, verb) the rules grant (the chart uses no wildcards)."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def expand(needs: list[tuple[str, str, set[str]]]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for group, resource, verbs in needs for verb in verbs}


def one(documents: list[dict], kind: str) -> dict:
    """The one document of `kind`; for Roles and RoleBindings, the one for the watched namespace
    (the leader-election pair has its own test)."""
    (found,) = [d for d in documents if d["kind"] == kind and not is_leader_rbac(d)]
    return found


def is_leader_rbac(document: dict) -> bool:
    return document["kind"] in ("Role", "RoleBinding") and document["metadata"]["name"].endswith("-leader")


def grants(rules: list[dict], group: str, resource: str, verbs: set[str]) -> bool:
    granted: set[str] = set()
    for rule in rules:
        if group in rule.get("apiGroups", []) and resource in rule.get("resources", []):
            granted |= set(rule["verbs"])
    return verbs <= granted


@pytest.mark.parametrize(
    "values", [{}, {"watchAllNamespaces": True}, {"quotaPolicies": [{"name": "q", "spec": {"maxGPUs": 2}}]}]
)
def test_chart_lints_clean(values: dict) -> None:
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_chart_ships_the_generated_crds() -> None:
    with helm.Chart.load(CHART) as chart:
        shipped = {Path(c["filename"]).name: c["data"] for c in chart.crds}
        assert chart.metadata["name"] == "trainpilot"
    assert shipped == crd.crd_files()


def check_deployment(documents: list[dict]) -> dict:
    deployment = one(documents, "Deployment")
    assert deployment["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["command"] == ["trainpilot"]
    assert container["args"][0] == "operator"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["runAsNonRoot"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    (port,) = [p for p in container["ports"] if p["name"] == probe["port"]]
    assert port["containerPort"] == 8080
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    # The service account the pod runs as is the one the bindings name.
    account = one(documents, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    for binding in (d for d in documents if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": RELEASE_NAMESPACE}
        ]
    return container


def test_single_namespace_mode() -> None:
    documents = render()
    container = check_deployment(documents)
    assert f"--namespace={RELEASE_NAMESPACE}" in container["args"]
    assert "--all-namespaces" not in container["args"]
    role = one(documents, "Role")
    assert role["metadata"]["namespace"] == RELEASE_NAMESPACE
    for group, resource, verbs in NAMESPACED_NEEDS:
        assert grants(role["rules"], group, resource, verbs), (group, resource)
    cluster_role = one(documents, "ClusterRole")
    for group, resource, verbs in CLUSTER_NEEDS:
        assert grants(cluster_role["rules"], group, resource, verbs), (group, resource)
    # Exactly what is needed, nothing more.
    assert granted(role["rules"]) == expand(NAMESPACED_NEEDS)
    assert granted(cluster_role["rules"]) == expand(CLUSTER_NEEDS + SINGLE_NAMESPACE_CLUSTER_NEEDS)
    # Nothing namespaced is granted cluster-wide in this mode.
    for group, resource, _ in NAMESPACED_NEEDS:
        assert not grants(cluster_role["rules"], group, resource, {"get"}), resource
    binding = one(documents, "RoleBinding")
    assert binding["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }


def test_single_namespace_mode_elsewhere() -> None:
    documents = render({"watchNamespace": "ml-team"})
    container = check_deployment(documents)
    assert "--namespace=ml-team" in container["args"]
    assert one(documents, "Role")["metadata"]["namespace"] == "ml-team"
    assert one(documents, "RoleBinding")["metadata"]["namespace"] == "ml-team"


def test_all_namespaces_mode() -> None:
    documents = render({"watchAllNamespaces": True})
    container = check_deployment(documents)
    assert "--all-namespaces" in container["args"]
    assert not any(arg.startswith("--namespace") for arg in container["args"])
    assert not [d for d in documents if d["kind"] in ("Role", "RoleBinding") and not is_leader_rbac(d)]
    cluster_role = one(documents, "ClusterRole")
    for group, resource, verbs in NAMESPACED_NEEDS + CLUSTER_NEEDS:
        assert grants(cluster_role["rules"], group, resource, verbs), (group, resource)
    assert granted(cluster_role["rules"]) == expand(NAMESPACED_NEEDS + CLUSTER_NEEDS)
    binding = one(documents, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]


@pytest.mark.parametrize("values", [{}, {"watchAllNamespaces": True}, {"watchNamespace": "x", "logLevel": "debug"}])
def test_operator_cli_accepts_the_chart_arguments(values: dict) -> None:
    cli = pytest.importorskip("trainpilot.cli.main")
    (container,) = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"]
    args = cli.build_parser().parse_args(container["args"])
    assert args.command == "operator"
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    assert args.standalone is True
    assert args.all_namespaces == bool(values.get("watchAllNamespaces"))
    assert args.verbose == (values.get("logLevel") == "debug")
    assert args.metrics_port == 8081


@pytest.mark.parametrize("port", [8081, 9100, 0])
def test_the_operator_serves_its_metrics_where_the_pod_says_prometheus_should_look(port: int) -> None:
    cli = pytest.importorskip("trainpilot.cli.main")
    template = one(render({"metricsPort": port}), "Deployment")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert cli.build_parser().parse_args(container["args"]).metrics_port == port
    annotations = template["metadata"].get("annotations") or {}
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    if port:
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(port)
        assert named["metrics"] == port
    else:
        assert "prometheus.io/scrape" not in annotations and "metrics" not in named


@pytest.mark.parametrize("values", [{}, {"watchAllNamespaces": True}, {"watchNamespace": "ml-team"}])
def test_leader_election_gets_one_lease_in_the_release_namespace_and_nothing_else(values: dict) -> None:
    documents = render(values)
    role, binding = (d for d in documents if is_leader_rbac(d))
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["trainpilot-operator"],
            "verbs": ["get", "update"],
        },
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (container,) = one(documents, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert env["TRAINPILOT_OPERATOR_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["TRAINPILOT_OPERATOR_IDENTITY"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_replicas_roll_one_at_a_time_and_one_replica_is_recreated() -> None:
    single = one(render(), "Deployment")["spec"]
    assert single["replicas"] == 1 and single["strategy"] == {"type": "Recreate"}
    pair = one(render({"replicas": 2}), "Deployment")["spec"]
    assert pair["replicas"] == 2
    assert pair["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    with pytest.raises(helm.HelmError, match="replicas"):
        render({"replicas": 0})


def test_json_logs_and_the_prometheus_server_reach_the_operator() -> None:
    cli = pytest.importorskip("trainpilot.cli.main")
    values = {"logFormat": "json", "prometheus": {"url": "http://prom:9090", "bearerTokenSecret": {"name": "prom"}}}
    (container,) = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert cli.build_parser().parse_args(container["args"]).log_format == "json"
    env = {e["name"]: e for e in container["env"]}
    assert env["TRAINPILOT_PROMETHEUS_URL"]["value"] == "http://prom:9090"
    assert env["TRAINPILOT_PROMETHEUS_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "prom", "key": "token"}}
    (plain,) = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "TRAINPILOT_PROMETHEUS_URL" not in {e["name"] for e in plain["env"]}
    assert cli.build_parser().parse_args(plain["args"]).log_format == "text"
    with pytest.raises(helm.HelmError, match="logFormat"):
        render({"logFormat": "yaml"})


def test_anthropic_secret_and_log_level() -> None:
    (container,) = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "ANTHROPIC_API_KEY" not in {e["name"] for e in container["env"]}
    assert "--verbose" not in container["args"]
    values = {"anthropic": {"secretName": "anthropic"}, "logLevel": "debug"}
    (container,) = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"]
    (key,) = [e for e in container["env"] if e["name"] == "ANTHROPIC_API_KEY"]
    assert key["valueFrom"] == {"secretKeyRef": {"name": "anthropic", "key": "ANTHROPIC_API_KEY"}}
    assert "--verbose" in container["args"]
    with pytest.raises(helm.HelmError, match="at '/logLevel': value must be one of 'info', 'debug'"):
        render({"logLevel": "loud"})


def test_quota_policies_from_values_are_valid_objects() -> None:
    assert not [d for d in render() if d["kind"] == "QuotaPolicy"]
    values = {
        "quotaPolicies": [
            {"name": "cluster-default", "spec": {"maxGPUs": 32, "requireApprovalFor": ["scale"]}},
            {"name": "team-ml", "spec": {"namespaceSelector": {"matchNames": ["ml"]}, "maxParallelTrials": 2}},
        ]
    }
    policies = [d for d in render(values) if d["kind"] == "QuotaPolicy"]
    assert [p["metadata"]["name"] for p in policies] == ["cluster-default", "team-ml"]
    quota_crd = next(c for c in crd.build_crds() if c["spec"]["names"]["kind"] == "QuotaPolicy")
    for policy in policies:
        assert "namespace" not in policy["metadata"]  # cluster-scoped
        assert admit(quota_crd, policy)[1] == []
    with pytest.raises(helm.HelmError, match="at '/quotaPolicies/0': missing property 'name'"):
        render({"quotaPolicies": [{"spec": {"maxGPUs": 1}}]})


@pytest.mark.parametrize("values", [{}, {"watchAllNamespaces": True, "anthropic": {"secretName": "a"}}])
def test_rendered_objects_survive_the_official_kubernetes_models(values: dict) -> None:
    """The kubernetes client's models drop fields they do not know: a round trip catches typos
    (readOnlyRootFileSystem, serviceAcountName, ...) that Helm itself renders without a word."""
    kubernetes = pytest.importorskip("kubernetes")
    api = kubernetes.client.ApiClient()
    for document in render(values):
        if document["apiVersion"].startswith("trainpilot.dev/"):
            continue
        model = api.deserialize(json.dumps(document), f"V1{document['kind']}", "application/json")
        assert api.sanitize_for_serialization(model) == document, document["kind"]


def test_the_chart_runs_the_operator_as_the_user_its_image_creates() -> None:
    """A Deployment whose runAsUser has no home in the image: the operator's ~/.kube, Python's caches
    and the kopf state would all fall back to paths that user cannot write."""
    import re

    deployment = one(render(), "Deployment")
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    for dockerfile in (
        REPO / "operator" / "Dockerfile",
        REPO / "trainer_image" / "Dockerfile",
    ):
        text = dockerfile.read_text()
        user, group = re.search(r"^USER (\d+):(\d+)$", text, re.MULTILINE).groups()
        assert f"useradd --uid {user} --gid {group}" in text, dockerfile
        assert (security["runAsUser"], security["runAsGroup"]) == (int(user), int(group)), dockerfile


def test_the_install_notes_name_the_watched_namespace_on_every_command():
    """`helm install` prints these; in single-namespace mode a command without `-n` would look in
    the user's current namespace, where nothing is watched."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values={}, name="trainpilot", namespace="ml", is_install=True)
    notes = next(text for name, text in manifests.items() if name.endswith("NOTES.txt"))
    commands = [line.strip() for line in notes.splitlines() if line.strip().startswith(("kubectl", "trainpilot"))]
    assert len(commands) == 4 and all(" -n ml " in command for command in commands), notes
    assert "watching namespace ml" in notes


def test_the_approval_policy_checks_the_contracts_sign_off_annotations() -> None:
    import re

    from tests.support import admission
    from trainpilot.api import contract

    documents = render()
    policy, binding = one(documents, "ValidatingAdmissionPolicy"), one(documents, "ValidatingAdmissionPolicyBinding")
    assert policy["apiVersion"] == binding["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert policy["metadata"]["name"] == binding["metadata"]["name"] == "tp-trainpilot-approvals"
    assert policy["metadata"]["labels"] == one(documents, "ServiceAccount")["metadata"]["labels"]
    assert "namespace" not in policy["metadata"] and "namespace" not in binding["metadata"]  # cluster-scoped
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["matchConstraints"] == {
        "resourceRules": [
            {
                "apiGroups": [contract.GROUP],
                "apiVersions": [contract.VERSION],
                "resources": [contract.EXPERIMENT_PLURAL],
                "operations": ["CREATE", "UPDATE"],
            }
        ]
    }
    (condition,) = spec["matchConditions"]
    watched = re.match(r"\[([^\]]*)\]\.exists\(", condition["expression"])
    assert watched is not None and re.findall(r"'([^']*)'", watched.group(1)) == list(contract.APPROVAL_ANNOTATIONS)
    (validation,) = spec["validations"]
    assert f"'{contract.ANNOTATION_APPROVED_BY}'" in validation["expression"]
    assert "request.userInfo.username" in validation["expression"]
    admission.default_policy(policy)
    assert admission.policy_errors(policy) == []  # every expression compiles, as the API server checks
    assert binding["spec"] == {"policyName": "tp-trainpilot-approvals", "validationActions": ["Deny"]}
    assert one(render(namespace="ml"), "ValidatingAdmissionPolicy")["metadata"]["name"] == "tp-trainpilot-approvals"
    assert not [
        d for d in render({"approvalPolicy": {"enabled": False}}) if d["kind"].startswith("ValidatingAdmission")
    ]


def test_the_approval_policy_needs_kubernetes_1_30(capfd: pytest.CaptureFixture[str]) -> None:
    """v1 ValidatingAdmissionPolicy is GA from 1.30: older clusters get a clear message instead (lint
    mode only logs `fail`), and lint clean with the policy off."""
    needs = "approvalPolicy needs Kubernetes >= 1.30"
    helm.lint(str(CHART), {}, strict=True, kube_version="v1.30.0")
    assert needs not in capfd.readouterr().err
    helm.lint(str(CHART), {}, strict=True, kube_version="v1.29.0")
    assert needs in capfd.readouterr().err
    report = helm.lint(str(CHART), {"approvalPolicy": {"enabled": False}}, strict=True, kube_version="v1.29.0")
    assert report["errors"] == [] and needs not in capfd.readouterr().err
