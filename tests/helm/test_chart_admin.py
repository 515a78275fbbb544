"""The chart as a cluster admin meets it: documented values, a schema that refuses bad ones at
`helm install`, every rendered object valid for the API server, and the optional monitoring and
network objects doing what they say for the pods the operator really builds.

Rendered and linted by real Helm (helm-python embeds Helm's Go SDK). Built-in kinds are checked
against the Kubernetes OpenAPI schemas that kubernetes-validate bundles (strict: unknown fields
are errors), the QuotaPolicy against the chart's own CRD, and ServiceMonitor/PodMonitor against a
small hand-written schema of the fields the chart sets (no prometheus-operator CRD offline).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

from tests.support import builders as spec_builders
from tests.support import chart as chart_support
from tests.support.openapi import admit
from tests.support.paths import CHART, REPO
from trainpilot.api import contract
from trainpilot.api.experiment import TrialStatus
from trainpilot.runtime.kubernetes import builders

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

RELEASE_NAMESPACE = "trainpilot-system"
KUBE_VERSIONS = ("1.30", "1.32")
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("chart_values_table", REPO / "scripts" / "chart_values_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


table = _generator()

EVERYTHING: dict[str, Any] = {
    "imagePullSecrets": [{"name": "regcred"}],
    "anthropic": {"secretName": "anthropic"},
    "quotaPolicies": [{"name": "team-ml", "spec": {"namespaceSelector": {"matchNames": ["ml"]}, "maxGPUs": 8}}],
    "metricsService": {"enabled": True},
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "interval": "15s"},
    "networkPolicy": {
        "enabled": True,
        "extraIngress": [
            {"from": [{"podSelector": {"matchLabels": {"app": "tensorboard"}}}], "ports": [{"port": 6006}]}
        ],
    },
    "podLabels": {"team": "ml"},
    "podAnnotations": {"example.com/owner": "ml-platform"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "single-namespace": {"watchNamespace": "ml"},
    "all-namespaces": {"watchAllNamespaces": True},
    "everything-on": {**EVERYTHING, "watchNamespace": "ml"},
    "everything-on-all-namespaces": {
        **EVERYTHING,
        "watchAllNamespaces": True,
        "networkPolicy": {**EVERYTHING["networkPolicy"], "namespaces": ["ml", "vision"]},
    },
    "metrics-off": {
        "metricsPort": 0,
        "metricsService": {"enabled": True},
        "podMonitor": {"enabled": True},
        "networkPolicy": {"enabled": True, "metricsPort": 9400, "prometheus": []},
    },
    "minimal": {"approvalPolicy": {"enabled": False}, "serviceAccount": {"create": False, "name": "ops"}},
}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return chart_support.render(values, RELEASE_NAMESPACE)


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind]


def one(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = of_kind(documents, kind)
    return found


# ----------------------------------------------------------------------------- object validation

DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
PROMETHEUS_LABEL = r"^[a-zA-Z_][a-zA-Z0-9_]*$"
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": list(required)}


# The fields of monitoring.coreos.com/v1 ServiceMonitor and PodMonitor the chart sets, with their
# types, enums and patterns as prometheus-operator's CRDs (v0.93) declare them; closed, so a field
# the CRDs lack (or a typo) fails here as strict field validation fails it on a cluster.
_SELECTOR = _closed(
    {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": _closed(
                {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
                ("key", "operator"),
            ),
        },
    }
)
_NAMESPACE_SELECTOR = _closed(
    {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}
)
_RELABEL = _closed(
    {
        "action": {
            "enum": [
                *("replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep"),
                *("lowercase", "uppercase", "keepequal", "dropequal"),
                *("Replace", "Keep", "Drop", "HashMod", "LabelMap", "LabelDrop", "LabelKeep"),
                *("Lowercase", "Uppercase", "KeepEqual", "DropEqual"),
            ]
        },
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": PROMETHEUS_LABEL}},
        "separator": {"type": "string"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "targetLabel": {"type": "string"},
        "modulus": {"type": "integer", "minimum": 0},
    }
)
_ENDPOINT = {
    "port": {"type": "string"},
    "path": {"type": "string"},
    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "interval": {"type": "string", "pattern": DURATION},
    "scrapeTimeout": {"type": "string", "pattern": DURATION},
    "honorLabels": {"type": "boolean"},
    "relabelings": {"type": "array", "items": _RELABEL},
    "metricRelabelings": {"type": "array", "items": _RELABEL},
}


def _monitor_schema(kind: str, endpoints: str, required: tuple[str, ...]) -> dict[str, Any]:
    return _closed(
        {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object"},
            "spec": _closed(
                {
                    "selector": _SELECTOR,
                    "namespaceSelector": _NAMESPACE_SELECTOR,
                    "jobLabel": {"type": "string"},
                    endpoints: {"type": "array", "items": _closed(_ENDPOINT)},
                },
                required,
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


MONITOR_SCHEMAS = {
    "ServiceMonitor": _monitor_schema("ServiceMonitor", "endpoints", ("endpoints", "selector")),
    "PodMonitor": _monitor_schema("PodMonitor", "podMetricsEndpoints", ("selector",)),
}


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural schema as the API server applies it to a create: unknown fields refused
    (strict field validation), `nullable` allowing null; the x-kubernetes-* extensions left out."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: _strict(node) for name, node in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _strict(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_strict(node) for node in value]
        else:
            out[key] = value
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in schema and "additionalProperties" not in schema:
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def _crd(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "crds" / name).read_text())


QUOTA_CRD = _crd("quotapolicies.trainpilot.dev.yaml")


def _crd_schema(crd: dict[str, Any], api_version: str) -> dict[str, Any]:
    group, version = api_version.split("/")
    assert group == crd["spec"]["group"]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return _strict(served["schema"]["openAPIV3Schema"])


def _check_metadata(document: dict[str, Any], kube_version: str) -> None:
    """ObjectMeta is one schema for every kind: the object's, checked as a ConfigMap's."""
    metadata = document["metadata"]
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}, kube_version, True)
    assert re.fullmatch(DNS_SUBDOMAIN, metadata["name"]) and len(metadata["name"]) <= 253, metadata["name"]
    if "namespace" in metadata:
        assert re.fullmatch(DNS_LABEL, metadata["namespace"]), metadata["namespace"]


def validate_object(document: dict[str, Any], kube_version: str) -> None:
    """Raise when the API server (with the CRDs the object needs) would refuse `document`."""
    kind = document["kind"]
    if kind == "QuotaPolicy":
        jsonschema.validate(document, _crd_schema(QUOTA_CRD, document["apiVersion"]))
        assert "namespace" not in document["metadata"]  # cluster-scoped
        assert admit(QUOTA_CRD, document)[1] == []  # CEL rules too
    elif kind in MONITOR_SCHEMAS:
        jsonschema.validate(document, MONITOR_SCHEMAS[kind])
    else:
        kubernetes_validate.validate(document, kube_version, strict=True)
        if kind in ("Service", "NetworkPolicy"):  # names that must be DNS-1035/1123 labels
            assert re.fullmatch(DNS_LABEL, document["metadata"]["name"]) and len(document["metadata"]["name"]) <= 63
    _check_metadata(document, kube_version)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_rendered_object_is_valid_for_the_api_server(name: str, kube_version: str) -> None:
    documents = render(VALUE_SETS[name])
    assert documents
    for document in documents:
        validate_object(document, kube_version)


def test_the_value_sets_render_every_kind_the_chart_has() -> None:
    kinds = {d["kind"] for name in VALUE_SETS for d in render(VALUE_SETS[name])}
    assert kinds == {
        *("Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"),
        *("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "QuotaPolicy"),
        *("Service", "ServiceMonitor", "PodMonitor", "NetworkPolicy"),
    }


@pytest.mark.parametrize(
    "kind,breakage,message",
    [
        ("NetworkPolicy", lambda d: d["spec"].update(policyType=["Ingress"]), "policyType"),
        ("NetworkPolicy", lambda d: d["spec"]["ingress"][0]["ports"][0].update(port=[9400]), "9400"),
        ("Service", lambda d: d["spec"]["ports"][0].update(targetport="metrics"), "targetport"),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="30 s"), "30 s"),
        ("ServiceMonitor", lambda d: d["spec"].update(endpoint=[]), "endpoint"),
        ("PodMonitor", lambda d: d["spec"]["podMetricsEndpoints"][0]["relabelings"][0].update(source=["a"]), "source"),
        (
            "PodMonitor",
            lambda d: d["spec"]["podMetricsEndpoints"][0]["relabelings"][0].update(action="rename"),
            "rename",
        ),
        ("QuotaPolicy", lambda d: d["spec"].update(maxGPU=2), "maxGPU"),
        ("QuotaPolicy", lambda d: d["metadata"].update(labels={"team": 1}), "is not of type 'string'"),
    ],
)
def test_the_validation_refuses_broken_objects(kind: str, breakage: Any, message: str) -> None:
    """The checks above can fail: each breakage is one the API server refuses."""
    document = copy.deepcopy(of_kind(render(VALUE_SETS["everything-on"]), kind)[0])
    validate_object(document, KUBE_VERSIONS[-1])
    breakage(document)
    with pytest.raises((jsonschema.ValidationError, AssertionError)) as refused:
        validate_object(document, KUBE_VERSIONS[-1])
    assert message in str(refused.value)


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint_passes(name: str) -> None:
    report = helm.lint(str(CHART), VALUE_SETS[name], strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# ----------------------------------------------------------------------------- the values schema

REFUSED = [
    ({"logLevel": "loud"}, "/logLevel", "value must be one of 'info', 'debug'"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "value must be one of"),
    ({"image": {"repositry": "x"}}, "/image", "additional properties 'repositry' not allowed"),
    ({"watchAllNamespace": True}, "", "additional properties 'watchAllNamespace' not allowed"),
    ({"watchAllNamespaces": "yes"}, "/watchAllNamespaces", "want boolean"),
    ({"watchNamespace": "ML_Team"}, "/watchNamespace", "does not match pattern"),
    ({"metricsPort": 70000}, "/metricsPort", "maximum"),
    ({"metricsPort": -1}, "/metricsPort", "minimum"),
    ({"metricsPort": "8081"}, "/metricsPort", "got string, want integer"),
    ({"healthPort": 0}, "/healthPort", "minimum"),
    ({"resources": {"request": {"cpu": "1"}}}, "/resources", "additional properties 'request' not allowed"),
    ({"resources": {"limits": {"memory": "512MB"}}}, "/resources/limits/memory", "does not match pattern"),
    ({"resources": {"limits": "512Mi"}}, "/resources/limits", "want object"),
    ({"quotaPolicies": [{"name": "Team_ML", "spec": {}}]}, "/quotaPolicies/0/name", "does not match pattern"),
    ({"quotaPolicies": [{"name": "team-ml", "spec": "maxGPUs=2"}]}, "/quotaPolicies/0/spec", "want object"),
    ({"quotaPolicies": [{"name": "team-ml", "sepc": {}}]}, "/quotaPolicies/0", "additional properties 'sepc'"),
    ({"quotaPolicies": {"team-ml": {}}}, "/quotaPolicies", "want array"),
    ({"serviceMonitor": {"enabled": "true"}}, "/serviceMonitor/enabled", "want boolean"),
    ({"serviceMonitor": {"interval": "30 seconds"}}, "/serviceMonitor/interval", "does not match pattern"),
    ({"podMonitor": {"labels": {"release": 1}}}, "/podMonitor/labels/release", "want string"),
    ({"networkPolicy": {"metricsPort": "Metrics"}}, "/networkPolicy/metricsPort", "'anyOf' failed"),
    ({"networkPolicy": {"namespaces": "ml"}}, "/networkPolicy/namespaces", "want array"),
    (
        {"networkPolicy": {"prometheus": [{"podSelector": {"app": "prometheus"}}]}},
        "/networkPolicy/prometheus/0/podSelector",
        "additional properties 'app' not allowed",
    ),
    ({"networkPolicy": {"prometheus": [{}]}}, "/networkPolicy/prometheus/0", "minProperties"),
    ({"networkPolicy": {"prometheus": {"enabled": False}}}, "/networkPolicy/prometheus", "want array"),
    ({"podLabels": {"team": 1}}, "/podLabels/team", "want string"),
    ({"anthropic": {"secretKey": "api key"}}, "/anthropic/secretKey", "does not match pattern"),
]


@pytest.mark.parametrize("values,pointer,message", REFUSED, ids=[p or "/" for _, p, _ in REFUSED])
def test_helm_install_refuses_a_wrong_value_naming_it(values: dict, pointer: str, message: str) -> None:
    """Helm validates the merged values against values.schema.json before rendering anything
    (install, upgrade, template and lint alike); the error names the field as a JSON pointer."""
    with pytest.raises(helm.HelmValuesError) as refused:
        render(values)
    lines = [line for line in str(refused.value).splitlines() if line.lstrip("- ").startswith("at '")]
    assert any(f"at '{pointer}'" in line and message in line for line in lines), str(refused.value)
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match=re.escape(f"at '{pointer}'")):
            chart.validate_schema(values)
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.30.0")
    assert any(f"at '{pointer}'" in error for error in report["errors"]), report


def test_the_schema_accepts_the_defaults() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})
        chart.validate_schema(yaml.safe_load((CHART / "values.yaml").read_text()))
        assert chart.schema == SCHEMA
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert SCHEMA["additionalProperties"] is False


def _set(keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return values


def _documented_examples() -> list[Any]:
    entries = table.parse((CHART / "values.yaml").read_text())
    return [pytest.param(e.keys, e.example, id=e.path) for e in entries if e.has_example]


@pytest.mark.parametrize("keys,example", _documented_examples())
def test_the_documented_examples_install(keys: tuple[str, ...], example: Any) -> None:
    """Each `e.g.` in values.yaml (and so in the README) is a value helm install takes, and what it
    renders is valid; sections with an `enabled` switch are switched on to render the example."""
    values = _set(keys, example)
    without = {}
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    if len(keys) > 1 and "enabled" in defaults[keys[0]]:
        values[keys[0]]["enabled"] = True
        without = {keys[0]: {"enabled": True}}
    documents = render(values)
    for document in documents:
        validate_object(document, KUBE_VERSIONS[-1])
    assert documents != render(without)  # the example shows in what is installed


# ----------------------------------------------------------------------------- documentation

README = CHART / "README.md"


def test_the_readme_values_table_is_what_the_generator_writes() -> None:
    readme = README.read_text()
    assert table.BEGIN in readme and table.END in readme
    assert table.update(readme, (CHART / "values.yaml").read_text()) == readme, (
        "stale: run python scripts/chart_values_table.py"
    )
    assert table.main(["--check"]) == 0


def test_a_changed_comment_makes_the_table_stale(tmp_path: Path) -> None:
    chart = tmp_path / "trainpilot"
    shutil.copytree(CHART, chart)
    values = chart / "values.yaml"
    values.write_text(values.read_text().replace("# info, or debug (passes --verbose).", "# info, debug or trace."))
    assert table.main(["--chart", str(chart), "--check"]) == 1
    assert table.main(["--chart", str(chart)]) == 0
    assert table.main(["--chart", str(chart), "--check"]) == 0
    assert '| `logLevel` | `"info"` | info, debug or trace. |' in (chart / "README.md").read_text()


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return _resolve(SCHEMA["definitions"][ref.rsplit("/", 1)[1]]) if ref else node


def _schema_node(keys: tuple[str, ...], resolve: bool = True) -> dict[str, Any]:
    node = SCHEMA
    for key in keys:
        node = _resolve(node)["properties"][key]
    return _resolve(node) if resolve else node


def test_every_value_is_documented() -> None:
    """Each key has a comment right above it, unless it lies inside a value the table shows whole.
    Such a value must be a Kubernetes shape the chart hands on as it is (a label selector, resource
    quantities, a securityContext: a definition of the schema, or an object it leaves open), never
    a group of the chart's own settings (an inline closed object in the schema)."""
    entries = table.parse((CHART / "values.yaml").read_text())
    shown = {e.keys for e in table.rows(entries)}
    assert [e.path for e in table.rows(entries) if not e.prose] == []
    for entry in entries:
        if entry.keys not in shown:
            assert any(entry.keys[: len(row)] == row for row in shown), entry.path
    for entry in table.rows(entries):
        if isinstance(entry.default, dict) and entry.default and not entry.section:
            node = _schema_node(entry.keys, resolve=False)
            assert "$ref" in node or node.get("additionalProperties") is not False, (
                f"{entry.path}: a group of the chart's settings: each needs a comment"
            )


def test_the_schema_knows_exactly_the_values() -> None:
    """The top level and every section of values.yaml have exactly the keys the schema lists."""
    entries = table.parse((CHART / "values.yaml").read_text())
    sections = [()] + [e.keys for e in entries if e.section]
    for section in sections:
        keys = {e.keys[-1] for e in entries if e.keys[:-1] == section}
        schema = set(_schema_node(section)["properties"]) - ({"global"} if section == () else set())
        assert keys == schema, section
    assert {"image", "resources", "networkPolicy", "serviceMonitor"} <= {".".join(s) for s in sections}


# ----------------------------------------------------------------------------- the operator's metrics


def _operator_pod(documents: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, Any]]:
    template = one(documents, "Deployment")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    return template["metadata"]["labels"], container


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (an empty one selects everything)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
    return True


def test_no_monitoring_or_network_objects_by_default() -> None:
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"Service", "ServiceMonitor", "PodMonitor", "NetworkPolicy"}


@pytest.mark.parametrize("values", [{"metricsService": {"enabled": True}}, {"serviceMonitor": {"enabled": True}}])
def test_the_metrics_service_reaches_the_operators_metrics_port(values: dict) -> None:
    values = {**values, "metricsPort": 9100}
    documents = render(values)
    service = one(documents, "Service")
    pod_labels, container = _operator_pod(documents)
    assert service["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert _selects({"matchLabels": service["spec"]["selector"]}, pod_labels)
    (port,) = service["spec"]["ports"]
    (target,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert target["containerPort"] == port["port"] == 9100
    assert "--metrics-port=9100" in container["args"]
    assert bool(of_kind(documents, "ServiceMonitor")) == values.get("serviceMonitor", {}).get("enabled", False)


def test_the_service_monitor_scrapes_the_metrics_service() -> None:
    values = {"serviceMonitor": {"enabled": True, "interval": "1m", "labels": {"release": "kube-prometheus-stack"}}}
    documents = render(values)
    service, monitor = one(documents, "Service"), one(documents, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert _selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": service["spec"]["ports"][0]["name"], "path": "/metrics", "interval": "1m"}
    assert (
        "interval"
        not in one(render({"serviceMonitor": {"enabled": True, "interval": ""}}), "ServiceMonitor")["spec"][
            "endpoints"
        ][0]
    )
    # It picks the metrics Service only, not any other Service with the release's labels.
    other = {k: v for k, v in service["metadata"]["labels"].items() if k != "app.kubernetes.io/component"}
    assert not _selects(monitor["spec"]["selector"], other)


def test_metrics_port_0_renders_no_metrics_service_and_refuses_a_service_monitor() -> None:
    assert not of_kind(render({"metricsPort": 0, "metricsService": {"enabled": True}}), "Service")
    with pytest.raises(helm.HelmError, match=r"serviceMonitor.enabled needs metricsPort > 0"):
        render({"metricsPort": 0, "serviceMonitor": {"enabled": True}})


# ----------------------------------------------------------------------------- the trainers' metrics

OWNER = {"metadata": {"name": "lr-search", "namespace": "ml", "uid": "0000-1111"}}


def trial_pods(
    experiment: str = "lr-search", trial: str = "lr-search-t003", nodes: int = 2, namespace: str = "ml", **spec: Any
) -> list[dict[str, Any]]:
    """The pods of one trial as the Job controller makes them from the operator's own Job: the
    template's labels and annotations, plus the completion index (a label since Kubernetes 1.28)."""
    owner = {"metadata": {**OWNER["metadata"], "name": experiment, "namespace": namespace}}
    status = TrialStatus(name=trial, index=3, hyperparameters={"lr": 0.01}, nodes=nodes)
    job = builders.build_job(owner, spec_builders.make_spec(**spec), status, "d")
    template = job["spec"]["template"]
    pods = []
    for index in range(nodes):
        pod = copy.deepcopy(template)
        pod["metadata"]["namespace"] = namespace
        pod["metadata"]["labels"][contract.LABEL_COMPLETION_INDEX] = str(index)
        pod["metadata"]["annotations"][contract.LABEL_COMPLETION_INDEX] = str(index)
        pods.append(pod)
    return pods


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabelling (replace and keep, the actions the chart uses); None: dropped."""
    labels = dict(labels)
    for config in configs:
        action = config.get("action", "replace").lower()
        value = config.get("separator", ";").join(labels.get(s, "") for s in config.get("sourceLabels", []))
        match = re.fullmatch(config.get("regex", "(.*)"), value)
        if action == "keep":
            if not match:
                return None
        elif action == "replace":
            if match:
                # Prometheus' $1 / ${1} are Python's \g<1>.
                result = match.expand(re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", config.get("replacement", "$1")))
                if result:
                    labels[config["targetLabel"]] = result
                else:
                    labels.pop(config["targetLabel"], None)
        else:
            raise AssertionError(f"relabel action {action} not simulated")
    return labels


def pod_monitor_targets(monitor: dict[str, Any], pods: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The scrape targets Prometheus makes of `pods` for a PodMonitor, after relabelling."""
    spec = monitor["spec"]
    namespaces = spec.get("namespaceSelector", {})
    targets = []
    for pod in pods:
        metadata = pod["metadata"]
        if not namespaces.get("any") and metadata["namespace"] not in namespaces.get(
            "matchNames", [monitor["metadata"]["namespace"]]
        ):
            continue
        if not _selects(spec["selector"], metadata["labels"]):
            continue
        for endpoint in spec["podMetricsEndpoints"]:
            for container in pod["spec"]["containers"]:
                for port in container.get("ports", []):
                    if port.get("name") != endpoint["port"]:
                        continue
                    meta = {
                        "__address__": f"10.0.0.1:{port['containerPort']}",
                        "__metrics_path__": endpoint.get("path", "/metrics"),
                        "__meta_kubernetes_namespace": metadata["namespace"],
                        **{f"__meta_kubernetes_pod_label_{_sanitize(k)}": v for k, v in metadata["labels"].items()},
                        **{
                            f"__meta_kubernetes_pod_annotation_{_sanitize(k)}": v
                            for k, v in metadata["annotations"].items()
                        },
                    }
                    target = relabel(meta, endpoint.get("relabelings", []))
                    if target is not None:
                        targets.append(target)
    return targets


def test_the_pod_monitor_scrapes_rank_0_of_each_trial_labelled_by_experiment_and_trial() -> None:
    monitor = one(render({"podMonitor": {"enabled": True}, "watchNamespace": "ml"}), "PodMonitor")
    assert monitor["metadata"]["namespace"] == RELEASE_NAMESPACE
    pods = trial_pods(nodes=2, metrics={"port": 9401, "path": "/prom"}) + trial_pods(
        experiment="bs-search", trial="bs-search-t000", nodes=1
    )
    targets = pod_monitor_targets(monitor, pods)
    assert [(t["experiment"], t["trial"], t["__address__"], t["__metrics_path__"]) for t in targets] == [
        ("lr-search", "lr-search-t003", "10.0.0.1:9401", "/prom"),  # rank 0 only: rank 1 serves nothing
        ("bs-search", "bs-search-t000", f"10.0.0.1:{contract.DEFAULT_METRICS_PORT}", "/metrics"),
    ]
    # Only the watched namespace; every namespace when the operator watches every namespace.
    elsewhere = trial_pods(namespace="vision", nodes=1)
    assert pod_monitor_targets(monitor, elsewhere) == []
    everywhere = one(render({"podMonitor": {"enabled": True}, "watchAllNamespaces": True}), "PodMonitor")
    assert [t["experiment"] for t in pod_monitor_targets(everywhere, elsewhere)] == ["lr-search"]


def test_the_pod_monitor_relabels_from_the_pod_labels_the_operator_sets() -> None:
    monitor = one(render({"podMonitor": {"enabled": True, "interval": "10s", "labels": {"team": "ml"}}}), "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["interval"] == "10s" and monitor["metadata"]["labels"]["team"] == "ml"
    sources = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert sources["experiment"] == [f"__meta_kubernetes_pod_label_{_sanitize(contract.LABEL_EXPERIMENT)}"]
    assert sources["trial"] == [f"__meta_kubernetes_pod_label_{_sanitize(contract.LABEL_TRIAL)}"]
    assert sources["experiment"] == ["__meta_kubernetes_pod_label_trainpilot_dev_experiment"]
    # A pod without the trainpilot labels is no trial: not scraped.
    stranger = trial_pods(nodes=1)[0]
    del stranger["metadata"]["labels"][contract.LABEL_EXPERIMENT]
    assert pod_monitor_targets(monitor, [stranger]) == []


# ----------------------------------------------------------------------------- the trials' NetworkPolicy


@attrs.frozen
class Pod:
    namespace: str
    labels: dict[str, str]
    ports: dict[str, int] = attrs.field(factory=dict)  # container ports by name

    @classmethod
    def of(cls, pod: dict[str, Any]) -> Pod:
        ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        return cls(pod["metadata"]["namespace"], pod["metadata"]["labels"], ports)


def _namespace_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}  # every namespace has it since Kubernetes 1.21


def _peer_allows(peer: dict[str, Any], source: Pod, policy_namespace: str) -> bool:
    assert "ipBlock" not in peer
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"] or {}, _namespace_labels(source.namespace)):
            return False
    elif source.namespace != policy_namespace:
        return False
    return _selects(peer.get("podSelector") or {}, source.labels)


def _port_allows(rule_port: dict[str, Any], destination: Pod, port: int) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    if "port" not in rule_port:
        return True
    if isinstance(rule_port["port"], str):  # a named port: the destination container's port of that name
        return destination.ports.get(rule_port["port"]) == port
    return rule_port["port"] <= port <= rule_port.get("endPort", rule_port["port"])


def allowed(policies: list[dict[str, Any]], source: Pod, destination: Pod, port: int) -> bool:
    """Whether a TCP connection from `source` to `destination`:`port` is admitted (Ingress rules)."""
    isolating = [
        p
        for p in policies
        if p["metadata"]["namespace"] == destination.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"], destination.labels)
    ]
    if not isolating:
        return True
    for policy in isolating:
        for rule in policy["spec"].get("ingress") or []:
            peers, ports = rule.get("from") or [], rule.get("ports") or []
            peer_ok = not peers or any(_peer_allows(p, source, policy["metadata"]["namespace"]) for p in peers)
            port_ok = not ports or any(_port_allows(p, destination, port) for p in ports)
            if peer_ok and port_ok:
                return True
    return False


PROMETHEUS = Pod("monitoring", {"app.kubernetes.io/name": "prometheus", "prometheus": "k8s"})
WEB = Pod("ml", {"app": "web"})
RENDEZVOUS = builders.RENDEZVOUS_PORT
NCCL = 45678  # gloo and NCCL connect on ports of their own choosing


def _operator(documents: list[dict[str, Any]], namespace: str = RELEASE_NAMESPACE) -> Pod:
    return Pod(namespace, _operator_pod(documents)[0])


def test_the_network_policy_admits_exactly_what_trials_need() -> None:
    documents = render({"networkPolicy": {"enabled": True}, "watchNamespace": "ml"})
    (policy,) = policies = of_kind(documents, "NetworkPolicy")
    assert policy["metadata"]["namespace"] == "ml"
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress untouched: registries, storage, API server
    operator = _operator(documents)
    rank0, rank1 = (Pod.of(p) for p in trial_pods(nodes=2, metrics={"port": 9401}))
    other_trial = Pod.of(trial_pods(experiment="bs-search", trial="bs-search-t000", nodes=1)[0])
    # The operator scrapes rank 0's metrics port, whatever the experiment's spec.metrics.port.
    assert allowed(policies, operator, rank0, 9401)
    assert allowed(policies, operator, other_trial, contract.DEFAULT_METRICS_PORT)
    assert not allowed(policies, operator, rank0, RENDEZVOUS)
    # Prometheus: the metrics port too, nothing else.
    assert allowed(policies, PROMETHEUS, rank0, 9401)
    assert not allowed(policies, PROMETHEUS, rank0, RENDEZVOUS)
    assert not allowed(policies, Pod("monitoring", {"app": "grafana"}), rank0, 9401)
    # Multi-node training: rank 1 reaches rank 0's rendezvous, then the ranks talk on any port.
    assert allowed(policies, rank1, rank0, RENDEZVOUS)
    assert allowed(policies, rank0, rank1, NCCL) and allowed(policies, rank1, rank0, NCCL)
    # Anyone else, including a pod wearing the operator's labels outside the release namespace: no.
    assert not allowed(policies, WEB, rank0, 9401)
    assert not allowed(policies, WEB, rank0, RENDEZVOUS)
    assert not allowed(policies, Pod("ml", operator.labels), rank0, 9401)
    # Pods that are no trial are not isolated by it.
    assert allowed(policies, PROMETHEUS, WEB, 8080)


def test_the_network_policy_metrics_port_and_prometheus_are_configurable() -> None:
    values = {
        "networkPolicy": {
            "enabled": True,
            "metricsPort": contract.DEFAULT_METRICS_PORT,
            "prometheus": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
                    "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["vmagent"]}]},
                }
            ],
        }
    }
    documents = render(values)
    policies = of_kind(documents, "NetworkPolicy")
    assert policies[0]["metadata"]["namespace"] == RELEASE_NAMESPACE  # the watched namespace by default
    default_port = Pod.of(trial_pods(namespace=RELEASE_NAMESPACE, nodes=1)[0])
    other_port = Pod.of(trial_pods(namespace=RELEASE_NAMESPACE, nodes=1, metrics={"port": 9401})[0])
    operator = _operator(documents)
    assert allowed(policies, operator, default_port, contract.DEFAULT_METRICS_PORT)
    # A number holds only for experiments that use it (the named default follows each experiment).
    assert not allowed(policies, operator, other_port, 9401)
    vmagent = Pod("observability", {"app": "vmagent"})
    assert allowed(policies, vmagent, default_port, contract.DEFAULT_METRICS_PORT)
    assert not allowed(policies, PROMETHEUS, default_port, contract.DEFAULT_METRICS_PORT)
    off = of_kind(render({"networkPolicy": {"enabled": True, "prometheus": []}}), "NetworkPolicy")
    assert len(off[0]["spec"]["ingress"]) == 2  # the operator's and the trials' own rules
    assert not allowed(off, PROMETHEUS, default_port, contract.DEFAULT_METRICS_PORT)
    assert allowed(off, operator, default_port, contract.DEFAULT_METRICS_PORT)


def test_the_network_policy_takes_extra_ingress_rules() -> None:
    rule = {"from": [{"podSelector": {"matchLabels": {"app": "tensorboard"}}}], "ports": [{"port": 6006}]}
    policies = of_kind(render({"networkPolicy": {"enabled": True, "extraIngress": [rule]}}), "NetworkPolicy")
    trial = Pod.of(trial_pods(namespace=RELEASE_NAMESPACE, nodes=1)[0])
    assert policies[0]["spec"]["ingress"][-1] == rule
    assert allowed(policies, Pod(RELEASE_NAMESPACE, {"app": "tensorboard"}), trial, 6006)
    assert not allowed(policies, Pod(RELEASE_NAMESPACE, {"app": "tensorboard"}), trial, 6007)


def test_all_namespaces_mode_needs_one_network_policy_per_listed_namespace() -> None:
    with pytest.raises(helm.HelmError, match="networkPolicy.namespaces is required with watchAllNamespaces"):
        render({"watchAllNamespaces": True, "networkPolicy": {"enabled": True}})
    documents = render({"watchAllNamespaces": True, "networkPolicy": {"enabled": True, "namespaces": ["ml", "vision"]}})
    policies = of_kind(documents, "NetworkPolicy")
    assert [p["metadata"]["namespace"] for p in policies] == ["ml", "vision"]
    operator = _operator(documents)
    for namespace in ("ml", "vision"):
        rank0, rank1 = (Pod.of(p) for p in trial_pods(namespace=namespace, nodes=2))
        assert allowed(policies, operator, rank0, contract.DEFAULT_METRICS_PORT)
        assert not allowed(policies, WEB, rank0, contract.DEFAULT_METRICS_PORT)
        assert allowed(policies, rank1, rank0, RENDEZVOUS)
    # Trial pods of another namespace are no peers for the rendezvous rule.
    stranger = Pod.of(trial_pods(namespace="vision", nodes=1)[0])
    assert not allowed(policies, stranger, Pod.of(trial_pods(namespace="ml", nodes=1)[0]), RENDEZVOUS)
    # A namespace not listed has none (NOTES.txt says so).
    assert allowed(policies, WEB, Pod.of(trial_pods(namespace="nlp", nodes=1)[0]), RENDEZVOUS)


def test_the_install_notes_name_the_optional_objects() -> None:
    values = {**VALUE_SETS["everything-on-all-namespaces"]}
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=values, name="tp", namespace=RELEASE_NAMESPACE, is_install=True)
        plain = chart.render(values={}, name="tp", namespace=RELEASE_NAMESPACE, is_install=True)
    notes = next(text for name, text in manifests.items() if name.endswith("NOTES.txt"))
    for line in (
        "Service tp-trainpilot-metrics",
        "ServiceMonitor tp-trainpilot",
        "PodMonitor tp-trainpilot-trials",
        "NetworkPolicy tp-trainpilot-trials in ml, vision",
        "add it to networkPolicy.namespaces",
    ):
        assert line in notes, notes
    assert "Also installed" not in next(text for name, text in plain.items() if name.endswith("NOTES.txt"))
