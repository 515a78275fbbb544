"""
Authentication and authorization as a Kubernetes API server does them, for the emulated one.

* **Who**: a bearer token names a :class:`User` (a static token file, in API-server terms); no
  token is ``system:anonymous``; an unknown token is 401. Service accounts are
  ``system:serviceaccount:<namespace>:<name>`` in the groups ``system:serviceaccounts``,
  ``system:serviceaccounts:<namespace>`` and ``system:authenticated``.
* **What**: :func:`request_attributes` maps a request to the attributes the authorizers see
  (verb, API group, resource, subresource, namespace, name; or a non-resource path), a port of
  the API server's RequestInfoFactory: GET is get/list/watch (``?watch=true`` or a ``/watch/``
  path), DELETE without a name is deletecollection, a list or watch with the field selector
  ``metadata.name=x`` is about the object x, ``/namespaces/x`` is in the namespace x.
* **Allowed?** The group ``system:masters`` is allowed everything (the privileged-group
  authorizer); everyone else gets what RBAC grants: the union of the rules of every
  ClusterRoleBinding and, for namespaced requests, every RoleBinding of that namespace whose
  subjects include the user (a RoleBinding's rules never reach beyond its namespace).
  Rules match on apiGroups, resources (``pods/log``, ``*/status``), verbs, resourceNames and
  nonResourceURLs, with ``*`` wildcards, exactly as in the RBAC authorizer.
* **Denied**: :func:`forbidden_message` is the API server's message, word for word.

The bootstrap roles every cluster has (discovery for authenticated users, /healthz and /version
for everyone, cluster-admin) are in :data:`BOOTSTRAP_OBJECTS`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

JsonDict = dict[str, Any]

RBAC_GROUP = "rbac.authorization.k8s.io"
MASTERS = "system:masters"
AUTHENTICATED = "system:authenticated"
UNAUTHENTICATED = "system:unauthenticated"


@attrs.frozen
class User:
    name: str
    groups: tuple[str, ...] = ()

    @property
    def privileged(self) -> bool:
        return MASTERS in self.groups


ANONYMOUS = User("system:anonymous", (UNAUTHENTICATED,))


def admin_user(name: str) -> User:
    return User(name, (MASTERS, AUTHENTICATED))


def service_account_user(namespace: str, name: str) -> User:
    return User(
        f"system:serviceaccount:{namespace}:{name}",
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED),
    )


@attrs.frozen
class Attributes:
    """What an authorizer is asked (k8s.io/apiserver's authorizer.Attributes)."""

    user: User
    verb: str
    resource_request: bool
    path: str = ""
    api_group: str = ""
    api_version: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    @property
    def combined_resource(self) -> str:
        """``pods`` or ``pods/log``: what RBAC rules list."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    @property
    def qualified_resource(self) -> str:
        """``jobs.batch``, ``configmaps``: how error messages name the resource."""
        return f"{self.resource}.{self.api_group}" if self.api_group else self.resource


@attrs.frozen
class Decision:
    """One authorization decision, as recorded by the emulator for tests to assert on."""

    attributes: Attributes
    allowed: bool
    reason: str  # why allowed (the binding), or why not ("" when no rule matched, as RBAC says)
    source: str = "request"  # or the admission plugin that asked (OwnerReferencesPermissionEnforcement)

    @property
    def verb_and_resource(self) -> tuple[str, str, str]:
        """(verb, API group, resource[/subresource]): the unit RBAC grants."""
        a = self.attributes
        return (a.verb, a.api_group, a.combined_resource) if a.resource_request else (a.verb, "", a.path)


# ---------------------------------------------------------------------------------------------
# Request -> attributes (RequestInfoFactory)
# ---------------------------------------------------------------------------------------------

_API_PREFIXES = {"api", "apis"}
_SPECIAL_VERBS = {"proxy", "watch"}
_NAMESPACE_SUBRESOURCES = {"status", "finalize"}
_METHOD_VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}  # Go's strconv.ParseBool


def _exact_name(field_selector: str) -> str:
    """x, when the selector requires metadata.name == x (and nothing else about the name)."""
    names = set()
    for requirement in field_selector.split(","):
        for operator in ("==", "="):
            key, sep, value = requirement.partition(operator)
            if sep:
                if key.strip() == "metadata.name":
                    names.add(value.strip())
                break
    (name,) = names if len(names) == 1 else ("",)
    return name if name not in ("", ".", "..") and "/" not in name and "%" not in name else ""


def request_attributes(user: User, method: str, path: str, params: Mapping[str, str]) -> Attributes:
    parts = [p for p in path.strip("/").split("/") if p]
    method = method.upper()
    non_resource = Attributes(user=user, verb=method.lower(), resource_request=False, path=path)
    if len(parts) < 3 or parts[0] not in _API_PREFIXES:
        return non_resource
    prefix, rest = parts[0], parts[1:]
    group = ""
    if prefix == "apis":
        if len(rest) < 3:
            return non_resource
        group, rest = rest[0], rest[1:]
    version, rest = rest[0], rest[1:]
    if rest[0] in _SPECIAL_VERBS:
        verb, rest = rest[0], rest[1:]
        by_method = False
    else:
        verb, by_method = _METHOD_VERBS.get(method, ""), True
    namespace = ""
    if rest and rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) >= 2 else ""
    subresource = rest[2] if len(rest) >= 3 and verb != "proxy" else ""
    if by_method and not name and verb == "get":
        verb = "watch" if params.get("watch") in _TRUE else "list"
        name = _exact_name(params.get("fieldSelector") or "")
    if by_method and not name and verb == "delete":
        verb = "deletecollection"
    return Attributes(
        user=user,
        verb=verb,
        resource_request=True,
        path=path,
        api_group=group,
        api_version=version,
        resource=resource,
        subresource=subresource,
        namespace=namespace,
        name=name,
    )


# ---------------------------------------------------------------------------------------------
# RBAC
# ---------------------------------------------------------------------------------------------


def _verb_matches(rule: Mapping[str, Any], verb: str) -> bool:
    return any(v in ("*", verb) for v in rule.get("verbs") or [])


def _group_matches(rule: Mapping[str, Any], group: str) -> bool:
    return any(g in ("*", group) for g in rule.get("apiGroups") or [])


def _resource_matches(rule: Mapping[str, Any], combined: str, subresource: str) -> bool:
    for resource in rule.get("resources") or []:
        if resource in ("*", combined):
            return True
        if subresource and resource == f"*/{subresource}":
            return True
    return False


def _name_matches(rule: Mapping[str, Any], name: str) -> bool:
    names = rule.get("resourceNames") or []
    return not names or name in names


def _url_matches(rule: Mapping[str, Any], path: str) -> bool:
    for url in rule.get("nonResourceURLs") or []:
        if url in ("*", path) or (url.endswith("*") and path.startswith(url.rstrip("*"))):
            return True
    return False


def rule_allows(rule: Mapping[str, Any], attributes: Attributes) -> bool:
    if not _verb_matches(rule, attributes.verb):
        return False
    if not attributes.resource_request:
        return _url_matches(rule, attributes.path)
    return (
        _group_matches(rule, attributes.api_group)
        and _resource_matches(rule, attributes.combined_resource, attributes.subresource)
        and _name_matches(rule, attributes.name)
    )


def _subject_applies(subject: Mapping[str, Any], user: User, binding_namespace: str) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return user.name == name
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return bool(namespace) and user.name == f"system:serviceaccount:{namespace}:{name}"
    return False


def _describe_subject(subject: Mapping[str, Any], binding_namespace: str) -> str:
    if subject.get("kind") == "ServiceAccount":
        return f'ServiceAccount "{subject.get("namespace") or binding_namespace}/{subject.get("name")}"'
    return f'{subject.get("kind")} "{subject.get("name")}"'


@attrs.frozen
class Policy:
    """The RBAC objects of a cluster, indexed: what the RBAC authorizer watches."""

    cluster_roles: Mapping[str, JsonDict]
    cluster_role_bindings: tuple[JsonDict, ...]
    roles: Mapping[tuple[str, str], JsonDict]  # (namespace, name)
    role_bindings: Mapping[str, tuple[JsonDict, ...]]  # by namespace

    @classmethod
    def from_objects(cls, objects: Iterable[Mapping[str, Any]]) -> Policy:
        cluster_roles: dict[str, JsonDict] = {}
        cluster_role_bindings: list[JsonDict] = []
        roles: dict[tuple[str, str], JsonDict] = {}
        role_bindings: dict[str, list[JsonDict]] = {}
        for obj in objects:
            kind, meta = obj.get("kind"), obj.get("metadata") or {}
            if kind == "ClusterRole":
                cluster_roles[meta["name"]] = dict(obj)
            elif kind == "ClusterRoleBinding":
                cluster_role_bindings.append(dict(obj))
            elif kind == "Role":
                roles[(meta.get("namespace", ""), meta["name"])] = dict(obj)
            elif kind == "RoleBinding":
                role_bindings.setdefault(meta.get("namespace", ""), []).append(dict(obj))
        return cls(
            cluster_roles=cluster_roles,
            cluster_role_bindings=tuple(cluster_role_bindings),
            roles=roles,
            role_bindings={ns: tuple(bindings) for ns, bindings in role_bindings.items()},
        )

    def _role_rules(self, role_ref: Mapping[str, Any], namespace: str) -> tuple[list[JsonDict], str | None]:
        """(rules, error) for a binding's roleRef; a missing role is an error RBAC reports."""
        kind, name = role_ref.get("kind"), role_ref.get("name", "")
        if kind == "ClusterRole":
            role = self.cluster_roles.get(name)
            if role is None:
                return [], f'clusterrole.rbac.authorization.k8s.io "{name}" not found'
        elif kind == "Role":
            role = self.roles.get((namespace, name))
            if role is None:
                return [], f'role.rbac.authorization.k8s.io "{name}" not found'
        else:
            return [], f"unknown roleRef kind {kind!r}"
        return list(role.get("rules") or []), None

    def bound_rules(self, user: User, namespace: str) -> Iterable[tuple[str, JsonDict | None, str | None]]:
        """(description of the binding, one of its rules or None, error or None) for every binding of `user`."""
        scopes: list[tuple[str, tuple[JsonDict, ...], str]] = [("ClusterRoleBinding", self.cluster_role_bindings, "")]
        if namespace:
            scopes.append(("RoleBinding", self.role_bindings.get(namespace, ()), namespace))
        for binding_kind, bindings, binding_namespace in scopes:
            for binding in bindings:
                subject = next(
                    (s for s in binding.get("subjects") or [] if _subject_applies(s, user, binding_namespace)), None
                )
                if subject is None:
                    continue
                ref = binding.get("roleRef") or {}
                where = f"{binding_namespace}/" if binding_namespace else ""
                description = (
                    f'{binding_kind} "{where}{binding["metadata"]["name"]}" of {ref.get("kind")} '
                    f'"{ref.get("name")}" to {_describe_subject(subject, binding_namespace)}'
                )
                rules, error = self._role_rules(ref, binding_namespace)
                if error is not None:
                    yield description, None, error
                for rule in rules:
                    yield description, rule, None

    def authorize(self, attributes: Attributes) -> tuple[bool, str]:
        """(allowed, reason), as the union of a privileged-group authorizer and the RBAC authorizer."""
        if attributes.user.privileged:
            return True, f"member of {MASTERS}"
        errors: list[str] = []
        for description, rule, error in self.bound_rules(attributes.user, attributes.namespace):
            if error is not None:
                errors.append(error)
            elif rule is not None and rule_allows(rule, attributes):
                return True, f"RBAC: allowed by {description}"
        if not errors:
            return False, ""
        return False, "RBAC: " + (errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]")


def forbidden_message(attributes: Attributes, reason: str = "") -> str:
    """The API server's 403 message (responsewriters.forbiddenMessage + apierrors.NewForbidden)."""
    user = attributes.user.name
    if not attributes.resource_request:
        text = f'User "{user}" cannot {attributes.verb} path "{attributes.path}"'
    elif attributes.namespace:
        text = (
            f'User "{user}" cannot {attributes.verb} resource "{attributes.combined_resource}" '
            f'in API group "{attributes.api_group}" in the namespace "{attributes.namespace}"'
        )
    else:
        text = (
            f'User "{user}" cannot {attributes.verb} resource "{attributes.combined_resource}" '
            f'in API group "{attributes.api_group}" at the cluster scope'
        )
    if reason:
        text = f"{text}: {reason}"
    return forbidden_status_message(
        attributes.qualified_resource if attributes.resource_request else "", attributes.name, text
    )


def forbidden_status_message(qualified_resource: str, name: str, error: str) -> str:
    """apierrors.NewForbidden's message: `<resource> "<name>" is forbidden: <error>`."""
    if not qualified_resource:
        return f"forbidden: {error}"
    if not name:
        return f"{qualified_resource} is forbidden: {error}"
    return f'{qualified_resource} "{name}" is forbidden: {error}'


# ---------------------------------------------------------------------------------------------
# What every cluster starts with (the bootstrap policy, the part that matters here)
# ---------------------------------------------------------------------------------------------


def _cluster_role(name: str, rules: list[JsonDict]) -> JsonDict:
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
        "rules": rules,
    }


def _cluster_role_binding(name: str, groups: list[str]) -> JsonDict:
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": name},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": group} for group in groups],
    }


BOOTSTRAP_OBJECTS: tuple[JsonDict, ...] = (
    _cluster_role(
        "cluster-admin",
        [
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]},
        ],
    ),
    _cluster_role_binding("cluster-admin", [MASTERS]),
    _cluster_role(
        "system:discovery",
        [
            {
                "nonResourceURLs": [
                    "/api",
                    "/api/*",
                    "/apis",
                    "/apis/*",
                    "/healthz",
                    "/livez",
                    "/openapi",
                    "/openapi/*",
                    "/readyz",
                    "/version",
                    "/version/",
                ],
                "verbs": ["get"],
            }
        ],
    ),
    _cluster_role_binding("system:discovery", [AUTHENTICATED]),
    _cluster_role(
        "system:public-info-viewer",
        [{"nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"], "verbs": ["get"]}],
    ),
    _cluster_role_binding("system:public-info-viewer", [AUTHENTICATED, UNAUTHENTICATED]),
    _cluster_role(
        "system:basic-user",
        [
            {
                "apiGroups": ["authorization.k8s.io"],
                "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                "verbs": ["create"],
            },
            {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]},
        ],
    ),
    _cluster_role_binding("system:basic-user", [AUTHENTICATED]),
)
