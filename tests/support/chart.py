"""The Helm chart as a cluster admin installs it, rendered by real Helm (helm-python embeds Helm's Go SDK).

An :class:`OperatorRelease` is one `helm install` (release name, namespace, values): the emulated
cluster installs its ServiceAccount, RBAC objects and QuotaPolicies, and the operator under test
authenticates as that ServiceAccount, with the watch scope the release's Deployment passes on its
command line. :data:`SINGLE_NAMESPACE` and :data:`ALL_NAMESPACES` are the chart's two modes.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from typing import Any

import attrs
import yaml

from tests.support.paths import CHART
from tests.support.rbac import User, service_account_user

JsonDict = dict[str, Any]
RELEASE_NAME = "tp"
RBAC_KINDS = ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@functools.cache
def _render(values_json: str, namespace: str, name: str) -> tuple[JsonDict, ...]:
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=json.loads(values_json), name=name, namespace=namespace, is_install=True)
    documents: list[JsonDict] = []
    for filename, text in sorted(manifests.items()):
        if filename.endswith(".yaml"):
            documents.extend(d for d in yaml.safe_load_all(text) if d)
    return tuple(documents)


def render(
    values: Mapping[str, Any] | None = None, namespace: str = "default", name: str = RELEASE_NAME
) -> list[JsonDict]:
    """The chart's manifests for `helm install <name> -n <namespace>` with `values` (fresh copies)."""
    return copy.deepcopy(list(_render(json.dumps(dict(values or {}), sort_keys=True), namespace, name)))


def _freeze(values: Mapping[str, Any]) -> Mapping[str, Any]:
    return copy.deepcopy(dict(values))


@attrs.frozen
class OperatorRelease:
    """One installation of the chart: `helm install <name> helm/trainpilot -n <namespace> --set ...`."""

    values: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze, hash=False)
    namespace: str = "default"
    name: str = RELEASE_NAME

    def documents(self) -> list[JsonDict]:
        return render(self.values, self.namespace, self.name)

    def installed_objects(self) -> list[JsonDict]:
        """What the release leaves in the API server: everything but the Deployment (the operator
        under test runs in the test process instead, with the Deployment's identity and arguments)."""
        return [d for d in self.documents() if d["kind"] != "Deployment"]

    def rbac_objects(self) -> list[JsonDict]:
        return [d for d in self.documents() if d["kind"] in RBAC_KINDS]

    def _container(self) -> JsonDict:
        (deployment,) = [d for d in self.documents() if d["kind"] == "Deployment"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        return container

    @property
    def service_account(self) -> str:
        (deployment,) = [d for d in self.documents() if d["kind"] == "Deployment"]
        return deployment["spec"]["template"]["spec"]["serviceAccountName"]

    @property
    def user(self) -> User:
        """Who the operator is to the API server: the Deployment's service account."""
        return service_account_user(self.namespace, self.service_account)

    @property
    def operator_args(self) -> list[str]:
        return list(self._container()["args"])

    @property
    def watched_namespace(self) -> str | None:
        """The one namespace the Deployment watches, or None when it watches all of them."""
        for arg in self.operator_args:
            if arg.startswith("--namespace="):
                return arg.split("=", 1)[1]
        assert "--all-namespaces" in self.operator_args, self.operator_args
        return None

    def namespaces(self) -> list[str]:
        """The namespaces the release needs before it can be installed."""
        return sorted({self.namespace} | ({self.watched_namespace} - {None}))  # type: ignore[operator]

    @property
    def operator_env(self) -> dict[str, str]:
        """The Deployment's environment as its pod gets it: plain values, and the downward API's
        metadata.namespace and metadata.name (the pod's: `<release>-0`); not those from Secrets."""
        pod = {"metadata.namespace": self.namespace, "metadata.name": f"{self.name}-0"}
        env: dict[str, str] = {}
        for entry in self._container().get("env", []):
            if "value" in entry:
                env[entry["name"]] = entry["value"]
            elif (path := entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")) in pod:
                env[entry["name"]] = pod[path]
        return env

    def kopf_options(self) -> dict[str, Any]:
        """run_kopf_operator's scope arguments, as the Deployment's command line sets them."""
        watched = self.watched_namespace
        return {"namespace": watched} if watched is not None else {"clusterwide": True}

    def cli_args(self) -> list[str]:
        """`trainpilot operator`'s scope arguments, as the Deployment's command line sets them."""
        return [a for a in self.operator_args if a.startswith("--namespace=") or a == "--all-namespaces"]


# The chart's two modes, installed as an admin would: in a namespace of its own.
SINGLE_NAMESPACE = OperatorRelease(values={"watchNamespace": "default"}, namespace="trainpilot-system")
ALL_NAMESPACES = OperatorRelease(values={"watchAllNamespaces": True}, namespace="trainpilot-system")
