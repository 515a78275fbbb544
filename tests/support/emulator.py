"""
An emulated Kubernetes API server for tests: kmock's KubernetesEmulator, made to behave
enough like a real API server for kopf and for the kubernetes Python client.

kmock 0.8 keeps objects as plain dicts and merges every write into them. A real API server
does much more, and an operator under test relies on it. This subclass keeps kmock's HTTP
server, its reaction DSL (tests can still inject faults: ``emulator['create jobs'] << 500``),
its discovery endpoints and its object store (``emulator.objects[...]`` for assertions),
and replaces the request parsing and the write path with API-server semantics:

* metadata: uid, creationTimestamp, resourceVersion (one cluster-wide counter, bumped on every
  write, carried by watch events), generation (1 on create, +1 when anything but metadata and
  status changes), generateName (+5 random characters), name and label validation;
* label selectors (``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``)
  and field selectors (``metadata.name=x``, any dotted path, ``=``/``==``/``!=``) on lists and
  watches, pagination with ``limit``/``continue``;
* watches: ADDED/MODIFIED/DELETED with resourceVersion, ``resourceVersion=N`` resumes from the
  event log (410 Gone when too old), ``sendInitialEvents`` ends with the initial-events-end
  BOOKMARK, ``timeoutSeconds`` closes the stream server-side; objects that stop (or start)
  matching a label selector are delivered as DELETED (or ADDED), as the watch cache does;
* PATCH as JSON patch (RFC 6902, ``test`` failures are 422 as kopf expects), merge patch
  (RFC 7386) and strategic merge patch (approximated: lists of maps are merged by ``name``,
  ``type`` or ``uid``; refused with 415 on custom resources, as a real server does); PUT with
  optimistic concurrency (409 Conflict on a stale resourceVersion);
* the status subresource for resources that declare it: writes to the main resource ignore
  ``.status``, writes to ``/status`` change only ``.status``; create drops ``.status``;
* errors as ``Status`` objects: 404 NotFound, 409 AlreadyExists / Conflict, 422 Invalid (with
  the fields as causes, ``<Kind>.<group> "name" is invalid: ...``), 400 BadRequest, 415
  UnsupportedMediaType, 401 Unauthorized, 403 Forbidden (RBAC, admission, terminating namespace);
* authentication by bearer token (``tokens``; none is ``system:anonymous``) and RBAC
  authorization of every request from the stored ClusterRoles/Roles and their bindings, with the
  API server's 403 messages (tests/support/rbac.py); every decision is kept in ``authorizations``;
* the OwnerReferencesPermissionEnforcement admission plugin: setting ``blockOwnerDeletion`` needs
  ``update`` on the owner's ``<plural>/finalizers``, changing an object's ownerReferences needs
  ``delete`` on it;
* the ValidatingAdmissionPolicy plugin (admissionregistration.k8s.io/v1, tests/support/admission.py):
  every create, update and patch of any resource (status included, dry runs and no-op writes too),
  as it would be stored, runs through the stored policies and their bindings (resource rules,
  namespace and object selectors, matchConditions, variables, validations in CEL with the
  requesting user in ``request.userInfo``); a denial is the API server's 422 (or the validation's
  reason: 401, 403, 413) with its message; a policy whose expressions do not compile is 422 with
  the field;
* quantities in pods and Job templates decoded as the API server does (``"4x"``: 400
  BadRequest), container resources validated (negative, non-integer extended resources,
  requests above limits: 422; tests/support/quantity.py);
* Events expire ``event_ttl`` seconds after their last write (--event-ttl; watchers see them
  DELETED), what expired is kept in ``expired_events`` for tests;
* deletion: finalizers (deletionTimestamp; the object goes once the finalizers are empty),
  garbage collection through ownerReferences (Background; Foreground behaves the same;
  Orphan strips the references); batch/v1 Jobs default to **Orphan** when no
  propagationPolicy is given, exactly like a real API server (with its Warning header);
  pods bound to a node are deleted gracefully (deletionTimestamp + grace period) and go away
  when the kubelet (the fake node) confirms with gracePeriodSeconds=0; namespaces terminate
  with their contents;
* namespaced objects need an existing namespace (404 otherwise), as in a real cluster;
* CustomResourceDefinitions created through the API are served (discovery, scope, short
  names, status subresource), and their structural schema prunes unknown fields
  (``fieldValidation=Strict``: 400), applies defaults, checks types, enums, bounds, lengths,
  patterns, item and property counts, required fields and list types, then runs the CRD's CEL
  rules (``x-kubernetes-validations``, transition rules with ``oldSelf`` on updates) with
  cel-python (422, tests/support/openapi.py), as a real API server does;
* events.k8s.io/v1 Events are the core v1 Events seen through the other schema (note/message,
  regarding/involvedObject, ...), one store as in a real cluster;
* API-server defaulting for Jobs (selector and controller-uid labels, backoffLimit 6,
  completions/parallelism 1, completionMode NonIndexed), immutability of a Job's pod
  template and of most of a Pod's spec;
* ``pods/{name}/binding`` (what a scheduler uses) and ``pods/{name}/log`` (served from the
  fake node's log files when one is attached).

Not emulated: admission webhooks, ValidatingAdmissionPolicy on DELETE and CONNECT (and its
paramKind and authorizer, refused at creation; CEL type checking), ClusterRole aggregation
(aggregationRule), impersonation, CRD validation ratcheting, ``optionalOldSelf``,
quotas/LimitRanges, server-side apply field ownership (apply patches are treated as merge
patches), managedFields, protobuf/CBOR, the watch cache's bookmarks every minute, Service
clusterIP allocation, and every controller except the garbage collector and the namespace
lifecycle (the fake node plays the job controller, the scheduler and the kubelet).

kmock itself mis-parses ``/api/v1/namespaces`` (it raises while parsing the URL, so the
request never reaches any handler), so this module parses request paths itself and
overrides ``__call__`` — the one place where kmock builds its Request objects.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import copy
import datetime
import json
import logging
import random
import re
import threading
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import dsl as _kmock_dsl  # the view classes, to match a request without a scan
from kmock._internal import rendering as _kmock_rendering  # StreamingError: kmock's own wrapper

from tests.support import admission, openapi, quantity, rbac

logger = logging.getLogger(__name__)

JsonDict = dict[str, Any]

# Letters the real API server uses for generateName suffixes (no vowels, no ambiguous chars).
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")

# Immediate deletions of these return the deleted object; other built-ins answer with a Status
# object. (The kubernetes client's return types follow: delete_namespaced_service -> V1Service,
# so a Status there fails its pydantic validation.) Custom resources return the object, too.
_RETURNS_DELETED_OBJECT = {
    ("", "pods"),
    ("", "services"),
    ("", "serviceaccounts"),
    ("", "persistentvolumeclaims"),
    ("", "persistentvolumes"),
    ("", "podtemplates"),
    ("", "resourcequotas"),
}

# Resources without metadata.generation in a real cluster.
_NO_GENERATION = {
    ("", "configmaps"),
    ("", "secrets"),
    ("", "events"),
    ("", "services"),
    ("", "nodes"),
    ("", "namespaces"),
    ("", "serviceaccounts"),
    ("", "persistentvolumeclaims"),
    ("events.k8s.io", "events"),
    ("coordination.k8s.io", "leases"),
    ("rbac.authorization.k8s.io", "clusterroles"),
    ("rbac.authorization.k8s.io", "clusterrolebindings"),
    ("rbac.authorization.k8s.io", "roles"),
    ("rbac.authorization.k8s.io", "rolebindings"),
}

# Resources whose default deletion propagation is Orphan (legacy API-server behaviour).
_ORPHAN_BY_DEFAULT = {("batch", "jobs"), ("", "replicationcontrollers")}
JOB_ORPHAN_WARNING = (
    '299 - "child pods are preserved by default when jobs are deleted; '
    "set propagationPolicy=Background to remove them or "
    'set propagationPolicy=Orphan to suppress this warning"'
)


@attrs.define(kw_only=True)
class ResourceSpec:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str | None = None
    shortnames: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    custom: bool = False  # served from a CRD: no strategic merge, schema pruning applies
    schema: JsonDict | None = None  # structural openAPIV3Schema, if known

    @property
    def api_version(self) -> str:
        return self.version if not self.group else f"{self.group}/{self.version}"

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(group=self.group, version=self.version, plural=self.plural)

    @property
    def qualified(self) -> str:  # as in error messages: "jobs.batch", "pods"
        return self.plural if not self.group else f"{self.plural}.{self.group}"

    @property
    def qualified_kind(self) -> str:  # as in 422 messages: "Job.batch", "Pod", "AgentExperiment.trainpilot.dev"
        return self.kind if not self.group else f"{self.kind}.{self.group}"


BUILTIN_RESOURCES: tuple[ResourceSpec, ...] = (
    ResourceSpec(
        group="",
        version="v1",
        plural="namespaces",
        kind="Namespace",
        namespaced=False,
        shortnames=("ns",),
        subresources=("status",),
    ),
    ResourceSpec(
        group="",
        version="v1",
        plural="nodes",
        kind="Node",
        namespaced=False,
        shortnames=("no",),
        subresources=("status",),
    ),
    ResourceSpec(
        group="",
        version="v1",
        plural="pods",
        kind="Pod",
        namespaced=True,
        shortnames=("po",),
        categories=("all",),
        subresources=("status", "log", "binding"),
    ),
    ResourceSpec(
        group="",
        version="v1",
        plural="services",
        kind="Service",
        namespaced=True,
        shortnames=("svc",),
        categories=("all",),
        subresources=("status",),
    ),
    ResourceSpec(group="", version="v1", plural="configmaps", kind="ConfigMap", namespaced=True, shortnames=("cm",)),
    ResourceSpec(group="", version="v1", plural="secrets", kind="Secret", namespaced=True),
    ResourceSpec(group="", version="v1", plural="events", kind="Event", namespaced=True, shortnames=("ev",)),
    ResourceSpec(
        group="", version="v1", plural="serviceaccounts", kind="ServiceAccount", namespaced=True, shortnames=("sa",)
    ),
    ResourceSpec(
        group="",
        version="v1",
        plural="persistentvolumeclaims",
        kind="PersistentVolumeClaim",
        namespaced=True,
        shortnames=("pvc",),
        subresources=("status",),
    ),
    ResourceSpec(
        group="batch",
        version="v1",
        plural="jobs",
        kind="Job",
        namespaced=True,
        categories=("all",),
        subresources=("status",),
    ),
    ResourceSpec(group="coordination.k8s.io", version="v1", plural="leases", kind="Lease", namespaced=True),
    ResourceSpec(
        group="apiextensions.k8s.io",
        version="v1",
        plural="customresourcedefinitions",
        kind="CustomResourceDefinition",
        namespaced=False,
        shortnames=("crd", "crds"),
        subresources=("status",),
    ),
    ResourceSpec(
        group="events.k8s.io", version="v1", plural="events", kind="Event", namespaced=True, shortnames=("ev",)
    ),
    ResourceSpec(group=rbac.RBAC_GROUP, version="v1", plural="clusterroles", kind="ClusterRole", namespaced=False),
    ResourceSpec(
        group=rbac.RBAC_GROUP,
        version="v1",
        plural="clusterrolebindings",
        kind="ClusterRoleBinding",
        namespaced=False,
    ),
    ResourceSpec(group=rbac.RBAC_GROUP, version="v1", plural="roles", kind="Role", namespaced=True),
    ResourceSpec(group=rbac.RBAC_GROUP, version="v1", plural="rolebindings", kind="RoleBinding", namespaced=True),
    ResourceSpec(
        group=admission.GROUP,
        version=admission.VERSION,
        plural=admission.POLICIES,
        kind="ValidatingAdmissionPolicy",
        namespaced=False,
        subresources=("status",),
    ),
    ResourceSpec(
        group=admission.GROUP,
        version=admission.VERSION,
        plural=admission.BINDINGS,
        kind="ValidatingAdmissionPolicyBinding",
        namespaced=False,
    ),
)
_RBAC_PLURALS = {"clusterroles", "clusterrolebindings", "roles", "rolebindings"}

# The public contract of TrainPilot (design.md). Replaced by the real CRDs once they are applied.
TRAINPILOT_RESOURCES: tuple[ResourceSpec, ...] = (
    ResourceSpec(
        group="trainpilot.dev",
        version="v1alpha1",
        plural="agentexperiments",
        kind="AgentExperiment",
        namespaced=True,
        shortnames=("aexp",),
        subresources=("status",),
        custom=True,
    ),
    ResourceSpec(
        group="trainpilot.dev",
        version="v1alpha1",
        plural="quotapolicies",
        kind="QuotaPolicy",
        namespaced=False,
        subresources=("status",),
        custom=True,
    ),
)


_EVENT_V1_FIELDS = (
    ("message", "note"),
    ("involvedObject", "regarding"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
)


def event_to_v1(obj: Mapping[str, Any]) -> JsonDict:
    """A core v1 Event as events.k8s.io/v1 shows it."""
    result = copy.deepcopy(dict(obj))
    for core_name, v1_name in _EVENT_V1_FIELDS:
        if core_name in result:
            result[v1_name] = result.pop(core_name)
    result["apiVersion"], result["kind"] = "events.k8s.io/v1", "Event"
    return result


def event_from_v1(obj: Mapping[str, Any]) -> JsonDict:
    """An events.k8s.io/v1 Event in its core v1 form (the storage form)."""
    result = copy.deepcopy(dict(obj))
    for core_name, v1_name in _EVENT_V1_FIELDS:
        if v1_name in result:
            result[core_name] = result.pop(v1_name)
    result["apiVersion"], result["kind"] = "v1", "Event"
    return result


def _convert_events(payload: Any) -> Any:
    if isinstance(payload, kmock.Response):
        return attrs.evolve(payload, payload=_convert_events(payload.payload))
    if isinstance(payload, dict):
        if payload.get("kind") == "Event":
            return event_to_v1(payload)
        if payload.get("kind") == "EventList":
            return {
                **payload,
                "apiVersion": "events.k8s.io/v1",
                "items": [event_to_v1(item) for item in payload.get("items", [])],
            }
        if "type" in payload and isinstance(payload.get("object"), dict):
            return {**payload, "object": _convert_events(payload["object"])}
    if hasattr(payload, "__aiter__"):

        async def converted() -> AsyncIterator[Any]:
            async for item in payload:
                yield _convert_events(item)

        return converted()
    return payload


# Who sent the request being handled (None: the emulator's own work, e.g. the garbage collector).
_REQUEST_USER: contextvars.ContextVar[rbac.User | None] = contextvars.ContextVar("request_user", default=None)


SELF_SUBJECT_REVIEWS = "/apis/authentication.k8s.io/v1/selfsubjectreviews"


def self_subject_review(user: rbac.User) -> JsonDict:
    """`kubectl auth whoami`: the caller as this server authenticated it (authentication.k8s.io/v1)."""
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "SelfSubjectReview",
        "metadata": {"creationTimestamp": now_rfc3339()},
        "status": {"userInfo": {"username": user.name, "groups": list(user.groups)}},
    }


class ApiError(kmock.KubernetesError):
    """Raised by the emulator's handlers; rendered as a Kubernetes Status object."""


def _status_error(code: int, reason: str, message: str, **details: Any) -> ApiError:
    return ApiError(status=code, reason=reason, message=message, details=details or None)


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# Request paths
# ---------------------------------------------------------------------------------------------


@attrs.frozen
class K8sPath:
    group: str | None = None  # None: not a Kubernetes API path
    version: str | None = None
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    watch: bool = False  # the deprecated /watch/ form of a watch


def parse_k8s_path(path: str) -> K8sPath:
    parts = [p for p in path.strip("/").split("/") if p != ""]
    if len(parts) >= 2 and parts[0] == "api":
        group = ""
        rest = parts[1:]
    elif len(parts) >= 2 and parts[0] == "apis":
        group = parts[1]
        rest = parts[2:]
    elif parts and parts[0] == "apis":
        return K8sPath(group=None)
    else:
        return K8sPath()
    if not rest:
        return K8sPath(group=group)
    version, rest = rest[0], rest[1:]
    if not rest:
        return K8sPath(group=group, version=version)
    if rest[0] == "watch" and len(rest) > 1:
        return attrs.evolve(parse_k8s_path("/".join(parts[: len(parts) - len(rest)] + rest[1:])), watch=True)
    # /namespaces, /namespaces/{name}, /namespaces/{name}/status|finalize are the namespace resource.
    if rest[0] == "namespaces" and (len(rest) <= 2 or (len(rest) == 3 and rest[2] in ("status", "finalize"))):
        return K8sPath(
            group=group,
            version=version,
            plural="namespaces",
            name=rest[1] if len(rest) >= 2 else None,
            subresource=rest[2] if len(rest) == 3 else None,
        )
    namespace = None
    if rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    plural = rest[0]
    name = rest[1] if len(rest) >= 2 else None
    subresource = "/".join(rest[2:]) or None
    return K8sPath(group=group, version=version, plural=plural, namespace=namespace, name=name, subresource=subresource)


# ---------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------

_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_SEL_SET = re.compile(rf"^\s*(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)\s*$")
_SEL_EQ = re.compile(rf"^\s*(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>[-A-Za-z0-9_.]*)\s*$")
_SEL_EXISTS = re.compile(rf"^\s*(?P<neg>!?)\s*(?P<key>{_KEY})\s*$")


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item for item in items if item.strip()]


def parse_label_selector(selector: str | None) -> Callable[[Mapping[str, str]], bool]:
    """Compile a label selector string into a predicate over a labels dict (400 if invalid)."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for requirement in _split_top_level(selector or ""):
        if m := _SEL_SET.match(requirement):
            key, values = m["key"], {v.strip() for v in m["values"].split(",") if v.strip()}
            if m["op"] == "in":
                checks.append(lambda labels, k=key, vs=values: k in labels and labels[k] in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: k not in labels or labels[k] not in vs)
        elif m := _SEL_EQ.match(requirement):
            key, value = m["key"], m["value"]
            if m["op"] == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: k in labels and labels[k] == v)
        elif m := _SEL_EXISTS.match(requirement):
            key = m["key"]
            if m["neg"]:
                checks.append(lambda labels, k=key: k not in labels)
            else:
                checks.append(lambda labels, k=key: k in labels)
        else:
            raise _status_error(400, "BadRequest", f"unable to parse requirement: invalid label selector: {selector!r}")
    return lambda labels: all(check(labels or {}) for check in checks)


def parse_field_selector(selector: str | None) -> Callable[[Mapping[str, Any]], bool]:
    """Field selectors: ``path=value``, ``path==value``, ``path!=value`` over dotted paths."""
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    for requirement in _split_top_level(selector or ""):
        m = re.match(r"^\s*(?P<path>[A-Za-z0-9_.]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^,]*?)\s*$", requirement)
        if not m:
            raise _status_error(400, "BadRequest", f"invalid field selector: {selector!r}")
        path, value, negate = m["path"].split("."), m["value"], m["op"] == "!="

        def check(obj: Mapping[str, Any], path: list[str] = path, value: str = value, negate: bool = negate) -> bool:
            current: Any = obj
            for part in path:
                current = current.get(part) if isinstance(current, Mapping) else None
            actual = "" if current is None else str(current).lower() if isinstance(current, bool) else str(current)
            return (actual != value) if negate else (actual == value)

        checks.append(check)
    return lambda obj: all(check(obj) for check in checks)


# ---------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


_MERGE_KEYS = ("name", "type", "uid")


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """
    An approximation of Kubernetes' strategic merge patch: like a merge patch, but lists of
    maps whose items all carry the same key (``name``: containers, env, volumes, ports...;
    ``type``: conditions; ``uid``: ownerReferences) are merged item by item, and
    ``$patch: delete`` removes such an item. The real thing reads per-field merge keys and
    strategies from the Go types; this is close enough for what operators send.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _strategic_merge_list(result[key], value)
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _strategic_merge_list(old: list[Any], new: list[Any]) -> list[Any]:
    for merge_key in _MERGE_KEYS:
        if (old or new) and all(isinstance(i, dict) and merge_key in i for i in old + new):
            merged = [copy.deepcopy(i) for i in old]
            for item in new:
                index = next((n for n, o in enumerate(merged) if o[merge_key] == item[merge_key]), None)
                if item.get("$patch") == "delete":
                    if index is not None:
                        del merged[index]
                elif index is None:
                    merged.append({k: v for k, v in item.items() if k != "$patch"})
                else:
                    merged[index] = strategic_merge_patch(merged[index], item)
            return merged
    return copy.deepcopy(new)


class JsonPatchError(Exception):
    pass


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise JsonPatchError(f"invalid JSON pointer: {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve_parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    current = doc
    for part in parts[:-1]:
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            raise JsonPatchError(f"path not found: /{'/'.join(parts)}")
    return current, parts[-1]


def _get_at(doc: Any, parts: list[str]) -> Any:
    if not parts:
        return doc
    parent, last = _resolve_parent(doc, parts)
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent[int(last)]
    raise JsonPatchError(f"path not found: /{'/'.join(parts)}")


def json_patch(doc: Any, ops: list[JsonDict]) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, parts = op.get("op"), _pointer(op.get("path", ""))
        if kind == "test":
            if _get_at(doc, parts) != op.get("value"):
                raise JsonPatchError(f"test operation failed at {op.get('path')}")
            continue
        if kind in ("move", "copy"):
            value = copy.deepcopy(_get_at(doc, _pointer(op["from"])))
            if kind == "move":
                doc = json_patch(doc, [{"op": "remove", "path": op["from"]}])
            kind, op = "add", {**op, "value": value}
        if not parts:
            if kind in ("add", "replace"):
                doc = copy.deepcopy(op["value"])
                continue
            raise JsonPatchError("cannot remove the root")
        parent, last = _resolve_parent(doc, parts)
        if kind == "add":
            if isinstance(parent, dict):
                parent[last] = copy.deepcopy(op["value"])
            elif isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if index > len(parent):
                    raise JsonPatchError(f"index out of range: {op['path']}")
                parent.insert(index, copy.deepcopy(op["value"]))
            else:
                raise JsonPatchError(f"cannot add into a scalar: {op['path']}")
        elif kind in ("remove", "replace"):
            _get_at(doc, parts)  # must exist
            if isinstance(parent, dict):
                if kind == "remove":
                    del parent[last]
                else:
                    parent[last] = copy.deepcopy(op["value"])
            else:
                if kind == "remove":
                    del parent[int(last)]
                else:
                    parent[int(last)] = copy.deepcopy(op["value"])
        else:
            raise JsonPatchError(f"unsupported operation: {kind!r}")
    return doc


# ---------------------------------------------------------------------------------------------
# Structural schemas (CRDs): pruning here; defaulting, validation and CEL in tests/support/openapi
# ---------------------------------------------------------------------------------------------


def prune(value: Any, schema: JsonDict | None, path: str = "", unknown: list[str] | None = None) -> Any:
    """Drop the fields a structural schema does not know, silently like the API server (in place);
    their paths go to `unknown` (what fieldValidation=Strict refuses)."""
    if not schema:
        return value
    if isinstance(value, dict):
        props: JsonDict | None = schema.get("properties")
        extra = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        for key in list(value):
            if props is not None and key in props:
                value[key] = prune(value[key], props[key], f"{path}.{key}", unknown)
            elif isinstance(extra, dict):
                value[key] = prune(value[key], extra, f"{path}.{key}", unknown)
            elif extra is True or preserve or schema.get("x-kubernetes-embedded-resource"):
                pass
            elif props is not None or schema.get("type") == "object":
                del value[key]
                if unknown is not None:
                    unknown.append(f"{path}.{key}".lstrip("."))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            value[index] = prune(item, schema["items"], f"{path}[{index}]", unknown)
    return value


def _custom_resource_errors(
    schema: JsonDict, obj: JsonDict, old: JsonDict | None, *, status_only: bool, unknown: list[str]
) -> list[str]:
    """What the API server does with a custom resource's body: prune, default, validate the schema
    (types, enums, bounds, lengths, patterns, item and property counts, required, list types),
    then, on an object that passed, the CEL rules (transition rules against `old` on updates)."""
    errors: list[str] = []
    props: JsonDict = schema.get("properties", {})
    for key in list(obj):
        if key in ("apiVersion", "kind", "metadata"):
            continue
        if key in props:
            obj[key] = prune(obj[key], props[key], key, unknown)
        elif not schema.get("x-kubernetes-preserve-unknown-fields"):
            del obj[key]
            unknown.append(key)
    openapi.apply_defaults(schema, obj)
    checked = ["status"] if status_only else [k for k in obj if k not in ("apiVersion", "kind", "metadata")]
    for key in checked:
        if key in obj and key in props:
            openapi.validate_schema(props[key], obj[key], key, errors)
    if not status_only:
        errors += [f"{key}: Required value" for key in schema.get("required", []) if key not in obj]
    if not errors:
        if status_only:
            if "status" in obj and "status" in props:
                old_status = (old or {}).get("status", openapi.NO_OLD)
                openapi.validate_cel(props["status"], obj["status"], "status", errors, old=old_status)
        else:
            openapi.validate_cel(schema, obj, "", errors, root=True, old=old if old is not None else openapi.NO_OLD)
    return [error.lstrip(".").removeprefix(": ") for error in errors]


# ---------------------------------------------------------------------------------------------
# Validation of names and labels
# ---------------------------------------------------------------------------------------------

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def _validate_metadata(spec: ResourceSpec, body: JsonDict) -> list[str]:
    errors: list[str] = []
    meta = body.get("metadata", {})
    name = meta.get("name", "")
    if spec.group == "" and spec.plural in ("services",):
        if not (_DNS1035_LABEL.match(name) and len(name) <= 63):
            errors.append(
                f'metadata.name: Invalid value: "{name}": a DNS-1035 label must consist of '
                f"lower case alphanumeric characters or '-', start with an alphabetic character, "
                f"and end with an alphanumeric character (at most 63 characters)"
            )
    elif spec.group == "" and spec.plural in ("namespaces",):
        if not (_DNS1123_LABEL.match(name) and len(name) <= 63):
            errors.append(f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 label (at most 63 characters)')
    elif spec.group in ("", "batch", "trainpilot.dev", "coordination.k8s.io", "apiextensions.k8s.io") or spec.custom:
        if not (_DNS1123_SUBDOMAIN.match(name) and len(name) <= 253):
            errors.append(
                f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must '
                f"consist of lower case alphanumeric characters, '-' or '.'"
            )
    if (spec.group, spec.plural) == ("batch", "jobs") and len(name) > 63:
        errors.append(f'metadata.name: Invalid value: "{name}": must be no more than 63 characters')
    for key, value in (meta.get("labels") or {}).items():
        _validate_label("metadata.labels", key, value, errors)
    for key, value in (meta.get("annotations") or {}).items():
        if not isinstance(value, str):
            errors.append(f"metadata.annotations: Invalid value: {key}: must be a string")
    return errors


def _validate_label(where: str, key: Any, value: Any, errors: list[str]) -> None:
    name = key.rsplit("/", 1)[-1] if isinstance(key, str) else ""
    prefix = key.rsplit("/", 1)[0] if isinstance(key, str) and "/" in key else ""
    if not (
        isinstance(key, str)
        and _LABEL_NAME.match(name)
        and len(name) <= 63
        and (not prefix or (_DNS1123_SUBDOMAIN.match(prefix) and len(prefix) <= 253))
    ):
        errors.append(
            f'{where}: Invalid value: "{key}": name part must consist of alphanumeric '
            f"characters, '-', '_' or '.' (at most 63 characters)"
        )
    if not (isinstance(value, str) and _LABEL_VALUE.match(value) and len(value) <= 63):
        errors.append(
            f'{where}: Invalid value: "{value}": a valid label must be an empty string or '
            f"consist of alphanumeric characters, '-', '_' or '.' (at most 63 characters)"
        )


# Fields of a Pod's spec that may change after creation (everything else is immutable).
_POD_MUTABLE_SPEC = {"activeDeadlineSeconds", "tolerations", "schedulingGates", "terminationGracePeriodSeconds"}


def _pod_spec_violations(old: JsonDict, new: JsonDict) -> list[str]:
    def strip(spec: JsonDict) -> JsonDict:
        spec = {k: v for k, v in copy.deepcopy(spec).items() if k not in _POD_MUTABLE_SPEC}
        for field in ("containers", "initContainers"):
            for container in spec.get(field, []) or []:
                container.pop("image", None)
        return spec

    if strip(old.get("spec", {})) != strip(new.get("spec", {})):
        return [
            "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`, "
            "`spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` "
            "(only additions to existing tolerations), `spec.terminationGracePeriodSeconds`"
        ]
    return []


def _job_spec_violations(old: JsonDict, new: JsonDict) -> list[str]:
    errors = []
    old_spec, new_spec = old.get("spec", {}), new.get("spec", {})
    if old_spec.get("template") != new_spec.get("template") and not (
        old_spec.get("suspend") and new_spec.get("suspend")
    ):
        errors.append("spec.template: Invalid value: field is immutable")
    if old_spec.get("selector") != new_spec.get("selector"):
        errors.append("spec.selector: Invalid value: field is immutable")
    if old_spec.get("completionMode") != new_spec.get("completionMode"):
        errors.append("spec.completionMode: Invalid value: field is immutable")
    if old_spec.get("completions") != new_spec.get("completions"):
        elastic = new_spec.get("completionMode") == "Indexed" and new_spec.get("completions") == new_spec.get(
            "parallelism"
        )
        if not elastic:
            errors.append(
                "spec.completions: Invalid value: field is immutable "
                "(except for Indexed Jobs that keep completions == parallelism)"
            )
    return errors


# The cause types of field errors (k8s.io/apimachinery/pkg/util/validation/field), by their text.
_CAUSE_TYPES = {
    "Invalid value": "FieldValueInvalid",
    "Required value": "FieldValueRequired",
    "Unsupported value": "FieldValueNotSupported",
    "Too long": "FieldValueTooLong",
    "Too many": "FieldValueTooMany",
    "Duplicate value": "FieldValueDuplicate",
    "Forbidden": "FieldValueForbidden",
}


def field_cause(error: str) -> JsonDict:
    """A "<field>: <what>" error as a Status cause: {reason, message (without the field), field}."""
    field, body = "", error
    if not any(error.startswith(text) for text in _CAUSE_TYPES):
        field, _, body = error.partition(": ")
    reason = next((cause for text, cause in _CAUSE_TYPES.items() if body.startswith(text)), "FieldValueInvalid")
    return {"reason": reason, "message": body, "field": field}


# ---------------------------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """
    kmock's KubernetesEmulator with the semantics of a real API server (see module docs).

    Must be used inside one event loop (the one that serves it). :class:`EmulatorServer`
    runs it in a background thread for tests.
    """

    event_log_size: int = 20000  # events kept for watch resumption; older ones give 410 Gone
    request_log_size: int = 5000  # requests kept for kmock's assertions (the latest ones)
    gc_delay: float = 0.02  # the garbage collector is asynchronous in a real cluster, too

    # pod log source: (namespace, name, container) -> text or None; set by the fake node fixture.
    pod_log_source: Callable[[str, str, str | None], str | None] | None = None

    # Authentication: bearer token -> user (a static token file). No token is system:anonymous.
    tokens: dict[str, rbac.User] = attrs.field(factory=dict)
    # Every authorization decision (requests, and the admission plugin's checks), oldest first.
    authorizations: list[rbac.Decision] = attrs.field(factory=list, init=False)
    authorization_log_size: int = 500_000
    # The OwnerReferencesPermissionEnforcement admission plugin (on in OpenShift, off by default
    # in kube-apiserver; on here: the stricter of the two).
    owner_references_permission_enforcement: bool = True
    # The API server's --event-ttl (1 h by default): an Event goes this long after its last write.
    event_ttl: float | None = 3600.0
    expired_events: list[JsonDict] = attrs.field(factory=list, init=False)  # what the TTL dropped

    _specs: dict[tuple[str, str, str], ResourceSpec] = attrs.field(factory=dict, init=False)
    _policy: rbac.Policy | None = attrs.field(default=None, init=False)
    # The stored ValidatingAdmissionPolicies and bindings (rebuilt after any of them changes).
    _admission_objects: tuple[list[JsonDict], list[JsonDict]] | None = attrs.field(default=None, init=False)
    _rv: int = attrs.field(default=100, init=False)
    _log: list[JsonDict] = attrs.field(factory=list, init=False)
    _tick: asyncio.Event | None = attrs.field(default=None, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _gc_handle: asyncio.TimerHandle | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for spec in BUILTIN_RESOURCES + TRAINPILOT_RESOURCES:
            self.register(spec)
        for obj in rbac.BOOTSTRAP_OBJECTS:
            self.seed(obj)

    def seed(self, manifest: Mapping[str, Any]) -> JsonDict:
        """Create an object directly, as the cluster's own bootstrapping does (no request, no checks)."""
        group, _, version = manifest["apiVersion"].rpartition("/")
        spec = next(
            s for s in self._specs.values() if (s.group, s.version, s.kind) == (group, version, manifest["kind"])
        )
        obj = copy.deepcopy(dict(manifest))
        meta = obj.setdefault("metadata", {})
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339())
        return self._store(spec, self._key(spec, meta.get("namespace"), meta["name"]), obj, None)

    # -- resources ----------------------------------------------------------------------------

    def register(self, spec: ResourceSpec) -> None:
        """Serve a resource (discovery included). Replaces an earlier spec of the same resource."""
        self._specs[(spec.group, spec.version, spec.plural)] = spec
        self.resources[spec.resource] = kmock.ResourceInfo(
            namespaced=spec.namespaced,
            kind=spec.kind,
            singular=spec.singular or spec.kind.lower(),
            verbs=set(ALL_VERBS),
            shortnames=set(spec.shortnames),
            categories=set(spec.categories),
            subresources=set(spec.subresources),
        )

    def unregister(self, group: str, version: str, plural: str) -> None:
        spec = self._specs.pop((group, version, plural), None)
        if spec is not None and spec.resource in self.resources:
            del self.resources[spec.resource]

    def spec_for(self, group: str, version: str, plural: str) -> ResourceSpec | None:
        return self._specs.get((group, version, plural))

    def _get_resources(self) -> list[kmock.resource]:
        # Only what is registered (kmock would also list anything ever stored or matched).
        return [spec.resource for spec in self._specs.values()]

    # -- HTTP plumbing: replaces kmock's parsing (it fails on /api/v1/namespaces) --------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            request = await self._parse_request(raw_request)
            self._requests.append(request)
            if len(self._requests) > self.request_log_size:  # pollers would grow it forever
                del self._requests[: len(self._requests) - self.request_log_size]
            user = self._authenticate(raw_request)
            self._authorize_request(user, raw_request)
            _REQUEST_USER.set(user)
            if raw_request.method == "POST" and raw_request.path == SELF_SUBJECT_REVIEWS:
                return aiohttp.web.json_response(self_subject_review(user), status=201)
            try:
                return await self._handle(request)
            except _kmock_rendering.StreamingError as e:
                raw_response = e.args[0]
                raise (e.__cause__ or e) from None
        except Exception as e:
            if not isinstance(e, kmock.KubernetesError):
                logger.error(
                    "Emulator failed on %s %s:\n%s", raw_request.method, raw_request.path_qs, traceback.format_exc()
                )
                if self._errors:
                    self._errors[-1].append(e)
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(e)
            await self._stream_error(e, raw_response)
            await raw_response.write_eof()
            return raw_response

    # -- authentication, authorization, OwnerReferencesPermissionEnforcement ---------------------

    def _authenticate(self, raw: aiohttp.web.BaseRequest) -> rbac.User:
        header = raw.headers.get("Authorization", "")
        if not header:
            return rbac.ANONYMOUS
        scheme, _, token = header.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise _status_error(401, "Unauthorized", "Unauthorized")
        return user

    @property
    def policy(self) -> rbac.Policy:
        """The RBAC objects now stored (rebuilt after any of them changes, as the authorizer's cache)."""
        if self._policy is None:
            self._policy = rbac.Policy.from_objects(
                obj for key, obj in self._live() if key[0].group == rbac.RBAC_GROUP and key[0].plural in _RBAC_PLURALS
            )
        return self._policy

    def authorize(self, attributes: rbac.Attributes, source: str = "request") -> rbac.Decision:
        """Decide as the API server's authorizers do, and record the decision."""
        allowed, reason = self.policy.authorize(attributes)
        decision = rbac.Decision(attributes=attributes, allowed=allowed, reason=reason, source=source)
        self.authorizations.append(decision)
        if len(self.authorizations) > self.authorization_log_size:
            del self.authorizations[: len(self.authorizations) - self.authorization_log_size]
        return decision

    def _authorize_request(self, user: rbac.User, raw: aiohttp.web.BaseRequest) -> None:
        attributes = rbac.request_attributes(user, raw.method, raw.path, dict(raw.query))
        decision = self.authorize(attributes)
        if not decision.allowed:
            details = (
                {"group": attributes.api_group, "kind": attributes.resource} if attributes.resource_request else {}
            )
            if attributes.name:
                details["name"] = attributes.name
            raise _status_error(403, "Forbidden", rbac.forbidden_message(attributes, decision.reason), **details)

    def _enforce_owner_references(
        self, spec: ResourceSpec, request: kmock.Request, new: JsonDict, old: JsonDict | None
    ) -> None:
        """OwnerReferencesPermissionEnforcement: changing ownerReferences on an update needs `delete`
        on the object; setting blockOwnerDeletion needs `update` on the owner's finalizers."""
        user = _REQUEST_USER.get()
        if user is None or not self.owner_references_permission_enforcement:
            return
        if (spec.group, spec.plural, request.subresource) == ("", "pods", "status"):
            return  # the plugin's whitelist
        new_refs = new.get("metadata", {}).get("ownerReferences") or []
        old_refs = (old or {}).get("metadata", {}).get("ownerReferences") or []
        if (old is None and not new_refs) or (old is not None and new_refs == old_refs):
            return
        namespace = new["metadata"].get("namespace") or ""
        name = new["metadata"].get("name") or ""

        def forbidden(error: str) -> ApiError:
            return _status_error(
                403,
                "Forbidden",
                rbac.forbidden_status_message(spec.qualified, name, error),
                name=name,
                group=spec.group,
                kind=spec.plural,
            )

        source = "OwnerReferencesPermissionEnforcement"
        if old is not None:
            delete = rbac.Attributes(
                user=user,
                verb="delete",
                resource_request=True,
                api_group=spec.group,
                api_version=spec.version,
                resource=spec.plural,
                subresource=request.subresource or "",
                namespace=namespace,
                name=name,
            )
            decision = self.authorize(delete, source)
            if not decision.allowed:
                raise forbidden(f"cannot set an ownerRef on a resource you can't delete: {decision.reason}, <nil>")
        was_blocking = {r.get("uid") for r in old_refs if r.get("blockOwnerDeletion")}
        for ref in new_refs:
            if not ref.get("blockOwnerDeletion") or ref.get("uid") in was_blocking:
                continue
            group, _, version = str(ref.get("apiVersion", "")).rpartition("/")
            owners = [s for s in self._specs.values() if (s.group, s.kind) == (group, ref.get("kind"))]
            owners = [s for s in owners if s.version == version] or owners
            if not owners:
                raise forbidden(
                    f"cannot set blockOwnerDeletion in this case because cannot find RESTMapping for APIVersion "
                    f'{ref.get("apiVersion")} Kind {ref.get("kind")}: no matches for kind "{ref.get("kind")}" '
                    f'in version "{ref.get("apiVersion")}"'
                )
            owner = owners[0]
            finalizers = rbac.Attributes(
                user=user,
                verb="update",
                resource_request=True,
                api_group=owner.group,
                api_version=owner.version,
                resource=owner.plural,
                subresource="finalizers",
                namespace=namespace if owner.namespaced else "",
                name=str(ref.get("name", "")),
            )
            decision = self.authorize(finalizers, source)
            if not decision.allowed:
                raise forbidden(
                    "cannot set blockOwnerDeletion if an ownerReference refers to a resource you can't set "
                    f"finalizers on: {decision.reason}, <nil>"
                )

    # -- ValidatingAdmissionPolicy (tests/support/admission.py) -------------------------------------

    def admission_objects(self) -> tuple[list[JsonDict], list[JsonDict]]:
        """The ValidatingAdmissionPolicies and bindings now stored (the plugin's informer cache)."""
        if self._admission_objects is None:
            policies, bindings = [], []
            for key, obj in self._live():
                if (key[0].group, key[0].plural) == (admission.GROUP, admission.POLICIES):
                    policies.append(obj)
                elif (key[0].group, key[0].plural) == (admission.GROUP, admission.BINDINGS):
                    bindings.append(obj)
            self._admission_objects = (policies, bindings)
        return self._admission_objects

    def _admit(
        self, spec: ResourceSpec, request: kmock.Request, new: JsonDict, old: JsonDict | None, *, name: str
    ) -> None:
        """Run the ValidatingAdmissionPolicies on a write, as it would be stored (422 or the policy's
        reason when one denies it). `name`: as the request named it ("" on a create by generateName)."""
        policies, bindings = self.admission_objects()
        if not bindings:
            return
        meta = new["metadata"]
        if (spec.group, spec.plural) == ("", "namespaces"):
            namespace = meta["name"]  # the namespace of a Namespace request is its own name
        else:
            namespace = (meta.get("namespace") or "") if spec.namespaced else ""
        ns_spec = self._specs[("", "v1", "namespaces")]
        namespace_object = self._current(self._key(ns_spec, None, namespace)) if namespace else None
        result = admission.evaluate(
            policies,
            bindings,
            admission.Request(
                operation="CREATE" if old is None else "UPDATE",
                user=_REQUEST_USER.get() or rbac.ANONYMOUS,
                group=spec.group,
                version=spec.version,
                resource=spec.plural,
                kind=spec.kind,
                subresource=request.subresource or "",
                object=new,
                old_object=old,
                namespace=namespace,
                name=name,
                dry_run=bool(request.params.get("dryRun")),
                namespace_object=namespace_object,
                schema=spec.schema,
            ),
        )
        if result.denial is not None:
            # admission.NewForbidden's message and details, with the policy's reason and code.
            shown = meta.get("name") or meta.get("generateName") or "Unknown"
            details: JsonDict = {"name": shown, "group": spec.group, "kind": spec.plural}
            details["causes"] = [{"message": result.denial.message}]
            raise _status_error(
                result.denial.code,
                result.denial.reason,
                rbac.forbidden_status_message(spec.qualified, shown, result.denial.message),
                **{k: v for k, v in details.items() if v != ""},  # Go's omitempty: no "group" for the core group
            )

    async def _parse_request(self, raw: aiohttp.web.BaseRequest) -> kmock.Request:
        body = await raw.read()
        text = body.decode("utf-8", errors="replace")
        data: Any = None
        if body.strip():
            try:
                data = json.loads(body)
            except ValueError:
                data = None
        params = dict(raw.query)
        path = parse_k8s_path(raw.path)
        resource = None
        action = None
        if path.group is not None:
            resource = kmock.resource(group=path.group, version=path.version, plural=path.plural)
        if path.plural is not None:
            method = raw.method.upper()
            if method == "GET":
                action = (
                    kmock.action.WATCH
                    if params.get("watch") in ("true", "1") or path.watch
                    else kmock.action.FETCH
                    if path.name
                    else kmock.action.LIST
                )
            elif method == "POST":
                action = kmock.action.CREATE
            elif method in ("PATCH", "PUT") and path.name:
                action = kmock.action.UPDATE
            elif method == "DELETE":
                action = kmock.action.DELETE
        return kmock.Request(
            id=len(self._requests),
            raw_request=raw,
            url=raw.url,
            method=raw.method,
            params=params,
            headers=dict(raw.headers),
            cookies=dict(raw.cookies),
            body=body,
            text=text,
            data=data,
            action=action,
            resource=resource,
            namespace=path.namespace,
            name=path.name,
            subresource=path.subresource,
        )

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Skip KubernetesEmulator._handle (its dict-merging write path); keep the DSL matching:
        # user reactions first, then this class's fallbacks (the _serve_* methods below). This is
        # kmock.RawHandler._handle, except that a reaction's view is matched against this request
        # alone where it can be (`request in view` scans the whole request log for every reaction
        # of every request: quadratic, and a long test's pollers made it eat a core).
        priorities = [payload.priorities for payload in self._payloads]
        width = max((len(priority) for priority in priorities), default=0)
        keys = [tuple(-p for p in priority) + (0,) * (width - len(priority)) for priority in priorities]
        for index in sorted(range(len(keys)), key=lambda index: keys[index]):
            payload = self._payloads[index]
            if not payload._disabled.is_set() and self._sees(payload._source, request):
                try:
                    return await payload(request)
                except _kmock_rendering.ReactionMismatchError:  # a mismatch, or depleted
                    payload._disabled.set()
                except NotImplementedError:  # matched, but nothing to respond with
                    pass
        raise NotImplementedError("no reaction matches the request")

    def _sees(self, view: Any, request: kmock.Request) -> bool:
        """Whether `view` holds `request`, the newest request: criteria filters and priorities over
        this root are checked on the request itself; anything else (slices, groups, exclusions,
        which depend on the requests before it) the way kmock does, by scanning the log."""
        if view is self:
            return True
        if type(view) is _kmock_dsl.Filter:
            return self._sees(view._source, request) and bool(view.criteria(request))
        if type(view) is _kmock_dsl.Priority:
            return self._sees(view._source, request)
        return request in view

    async def _serve_version(self, request: kmock.Request) -> Any:
        result = await super()._serve_version(request)
        if isinstance(result, dict) and result.get("groupVersion", "").startswith("/"):
            result["groupVersion"] = result["groupVersion"][1:]  # kmock writes "/v1" for the core group
        return result

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, kmock.KubernetesError):
            status = {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": exc.message or "",
                "reason": exc.reason or "",
                "code": exc.status,
            }
            if exc.details:
                status["details"] = exc.details
            return aiohttp.web.json_response(status, status=exc.status)
        return await super()._render_error(exc)

    # -- helpers ------------------------------------------------------------------------------

    def _spec_of(self, request: kmock.Request) -> ResourceSpec:
        res = request.resource
        spec = self._specs.get((res.group, res.version, res.plural)) if res is not None else None
        if spec is None:
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        if (
            spec.namespaced
            and request.namespace is None
            and request.action not in (kmock.action.LIST, kmock.action.WATCH, kmock.action.CREATE)
        ):
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        if not spec.namespaced and request.namespace is not None:
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        return spec

    def _not_found(self, spec: ResourceSpec, name: str | None) -> ApiError:
        return _status_error(
            404, "NotFound", f'{spec.qualified} "{name}" not found', name=name, group=spec.group, kind=spec.plural
        )

    def _key(self, spec: ResourceSpec, namespace: str | None, name: str) -> tuple[Any, ...]:
        return (spec.resource, namespace if spec.namespaced else None, name)

    def _current(self, key: tuple[Any, ...]) -> JsonDict | None:
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key].raw
        return None

    def _live(self) -> Iterable[tuple[tuple[Any, ...], JsonDict]]:
        for key, obj in list(self.objects.items()):
            if not obj.deleted:
                yield key, obj.raw

    def _spec_of_key(self, key: tuple[Any, ...]) -> ResourceSpec | None:
        res = key[0]
        return self._specs.get((res.group, res.version, res.plural))

    @property
    def resource_version(self) -> int:
        return self._rv

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _emit(self, spec: ResourceSpec, event_type: str, obj: JsonDict, old: JsonDict | None) -> None:
        self._log.append(
            {
                "rv": int(obj["metadata"]["resourceVersion"]),
                "resource": spec.resource,
                "type": event_type,
                "object": copy.deepcopy(obj),
                "old": copy.deepcopy(old) if old is not None else None,
            }
        )
        if len(self._log) > self.event_log_size:
            del self._log[: len(self._log) - self.event_log_size]
        self._wake_watchers()

    def _wake_watchers(self) -> None:
        if self._tick is not None:
            self._tick.set()
        self._tick = asyncio.Event()

    def _store(self, spec: ResourceSpec, key: tuple[Any, ...], new: JsonDict, old: JsonDict | None) -> JsonDict:
        new["metadata"]["resourceVersion"] = self._next_rv()
        if old is None:
            if key in self.objects:
                self.objects[key].create(new)
            else:
                self.objects[key] = new
            self._emit(spec, "ADDED", new, None)
        else:
            self.objects[key].history.append(new)
            self._emit(spec, "MODIFIED", new, old)
        self._after_write(spec, new, old)
        return copy.deepcopy(new)

    def _remove(self, spec: ResourceSpec, key: tuple[Any, ...], old: JsonDict) -> JsonDict:
        final = copy.deepcopy(old)
        final["metadata"]["resourceVersion"] = self._next_rv()
        self.objects[key].delete()
        self._emit(spec, "DELETED", final, old)
        self._schedule_gc()
        if (spec.group, spec.plural) == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._crd_removed(final)
        if spec.group == rbac.RBAC_GROUP:
            self._policy = None
        if spec.group == admission.GROUP:
            self._admission_objects = None
        return final

    def _after_write(self, spec: ResourceSpec, new: JsonDict, old: JsonDict | None) -> None:
        if (spec.group, spec.plural) == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._crd_written(new)
        if spec.group == rbac.RBAC_GROUP:
            self._policy = None
        if spec.group == admission.GROUP:
            self._admission_objects = None
        if (spec.group, spec.plural) == ("", "events") and self.event_ttl is not None:
            self._expire_later(spec, new)

    def _expire_later(self, spec: ResourceSpec, event: JsonDict) -> None:
        """Drop the Event `event_ttl` seconds after this write, unless it is written again by then
        (each write renews its lease in etcd); watchers see it DELETED, as with a real lease expiry."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        key = self._key(spec, event["metadata"].get("namespace"), event["metadata"]["name"])
        version = event["metadata"]["resourceVersion"]

        def expire() -> None:
            current = self._current(key)
            if current is not None and current["metadata"]["resourceVersion"] == version:
                self.expired_events.append(copy.deepcopy(current))
                self._remove(spec, key, current)

        assert self.event_ttl is not None
        loop.call_later(self.event_ttl, expire)

    # -- CRDs -----------------------------------------------------------------------------------

    def _crd_written(self, crd: JsonDict) -> None:
        crd_spec = crd.get("spec", {})
        names = crd_spec.get("names", {})
        group = crd_spec.get("group", "")
        for version in crd_spec.get("versions", []):
            if not version.get("served", True):
                continue
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            subresources = tuple(sorted((version.get("subresources") or {}).keys()))
            self.register(
                ResourceSpec(
                    group=group,
                    version=version["name"],
                    plural=names.get("plural", ""),
                    kind=names.get("kind", ""),
                    singular=names.get("singular"),
                    shortnames=tuple(names.get("shortNames", []) or []),
                    categories=tuple(names.get("categories", []) or []),
                    namespaced=crd_spec.get("scope", "Namespaced") == "Namespaced",
                    subresources=subresources,
                    custom=True,
                    schema=schema,
                )
            )

    def _crd_removed(self, crd: JsonDict) -> None:
        crd_spec = crd.get("spec", {})
        for version in crd_spec.get("versions", []):
            self.unregister(crd_spec.get("group", ""), version["name"], crd_spec.get("names", {}).get("plural", ""))

    # -- defaulting and validation ----------------------------------------------------------------

    def _prepare(
        self,
        spec: ResourceSpec,
        obj: JsonDict,
        *,
        creating: bool,
        old: JsonDict | None = None,
        status_only: bool = False,
        strict: bool = False,
    ) -> None:
        """Kind/apiVersion, schema pruning/defaulting/validation (CEL included), built-in defaults
        and checks. `strict`: fieldValidation=Strict, unknown fields are refused (400)."""
        obj["apiVersion"] = spec.api_version
        obj["kind"] = spec.kind
        errors = [] if status_only else _validate_metadata(spec, obj)
        if spec.schema:
            unknown: list[str] = []
            errors += _custom_resource_errors(spec.schema, obj, old, status_only=status_only, unknown=unknown)
            if strict and unknown:
                raise self._undecodable(
                    spec, "strict decoding error: " + ", ".join(f'unknown field "{u}"' for u in unknown)
                )
        if (spec.group, spec.plural) == ("batch", "jobs") and creating:
            self._default_job(obj)
        if (spec.group, spec.plural) == ("batch", "jobs"):
            job_spec = obj.get("spec", {})
            policy = job_spec.get("template", {}).get("spec", {}).get("restartPolicy")
            if policy not in ("Never", "OnFailure"):
                errors.append('spec.template.spec.restartPolicy: Required value: valid values: "OnFailure", "Never"')
            if job_spec.get("completionMode") == "Indexed" and job_spec.get("completions") is None:
                errors.append("spec.completions: Required value: when completion mode is Indexed")
        if (spec.group, spec.plural) == ("", "pods") and creating:
            containers = obj.get("spec", {}).get("containers") or []
            if not containers:
                errors.append("spec.containers: Required value")
        errors += quantity.resource_requirement_errors(spec.group, spec.plural, obj)
        if (spec.group, spec.plural) == (admission.GROUP, admission.POLICIES) and not status_only:
            admission.default_policy(obj)
            errors += admission.policy_errors(obj)
        if (spec.group, spec.plural) == (admission.GROUP, admission.BINDINGS):
            admission.default_binding(obj)
            errors += admission.binding_errors(obj)
        if errors:
            raise self._invalid(spec, obj.get("metadata", {}).get("name"), errors)

    def _decode(self, spec: ResourceSpec, body: JsonDict, *, patched: bool = False) -> None:
        """What fails while the API server decodes a body into its Go type: unparseable quantities.
        A create or replace is 400 BadRequest; a patch whose result does not decode, 422 on `patch`."""
        problems = quantity.undecodable_quantities(spec.group, spec.plural, body)
        if not problems:
            return
        if patched:
            raise self._invalid(spec, body.get("metadata", {}).get("name"), [
                f"patch: Invalid value: {json.dumps(body, sort_keys=True)[:200]}: {problems[0][1]}"
            ])  # fmt: skip
        raise self._undecodable(spec, problems[0][1])

    @staticmethod
    def _undecodable(spec: ResourceSpec, detail: str) -> ApiError:
        return _status_error(
            400, "BadRequest", f'{spec.kind} in version "{spec.version}" cannot be handled as a {spec.kind}: {detail}'
        )

    def _invalid(self, spec: ResourceSpec, name: str | None, errors: list[str]) -> ApiError:
        """422 Invalid as apierrors.NewInvalid builds it: every error a cause with its field."""
        aggregate = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
        return _status_error(
            422,
            "Invalid",
            f'{spec.qualified_kind} "{name}" is invalid: {aggregate}',
            name=name,
            group=spec.group,
            kind=spec.kind,
            causes=[field_cause(error) for error in errors],
        )

    @staticmethod
    def _default_job(job: JsonDict) -> None:
        spec = job.setdefault("spec", {})
        meta = job["metadata"]
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        template_meta = spec.setdefault("template", {}).setdefault("metadata", {})
        if not spec.get("manualSelector"):
            uid = meta["uid"]
            labels = template_meta.setdefault("labels", {})
            labels.update(
                {
                    "controller-uid": uid,
                    "batch.kubernetes.io/controller-uid": uid,
                    "job-name": meta["name"],
                    "batch.kubernetes.io/job-name": meta["name"],
                }
            )
            spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        template_spec = spec["template"].setdefault("spec", {})
        template_spec.setdefault("terminationGracePeriodSeconds", 30)
        template_spec.setdefault("dnsPolicy", "ClusterFirst")
        template_spec.setdefault("schedulerName", "default-scheduler")

    @staticmethod
    def _reset_status_on_create(spec: ResourceSpec, obj: JsonDict) -> None:
        if "status" not in spec.subresources:
            return
        obj.pop("status", None)
        if (spec.group, spec.plural) == ("", "pods"):
            obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
            obj.setdefault("spec", {})
            obj["spec"].setdefault("terminationGracePeriodSeconds", 30)
            obj["spec"].setdefault("restartPolicy", "Always")
            obj["spec"].setdefault("schedulerName", "default-scheduler")
        elif (spec.group, spec.plural) == ("", "namespaces"):
            obj["status"] = {"phase": "Active"}
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        elif (spec.group, spec.plural) == ("", "services"):
            obj["status"] = {"loadBalancer": {}}
        elif (spec.group, spec.plural) == ("batch", "jobs"):
            obj["status"] = {}
        elif (spec.group, spec.plural) == ("apiextensions.k8s.io", "customresourcedefinitions"):
            names = obj.get("spec", {}).get("names", {})
            obj["status"] = {
                "acceptedNames": names,
                "storedVersions": [v["name"] for v in obj.get("spec", {}).get("versions", []) if v.get("storage")],
                "conditions": [
                    {
                        "type": "NamesAccepted",
                        "status": "True",
                        "reason": "NoConflicts",
                        "lastTransitionTime": now_rfc3339(),
                        "message": "no conflicts found",
                    },
                    {
                        "type": "Established",
                        "status": "True",
                        "reason": "InitialNamesAccepted",
                        "lastTransitionTime": now_rfc3339(),
                        "message": "the initial names have been accepted",
                    },
                ],
            }

    def _check_namespace(self, spec: ResourceSpec, namespace: str | None) -> None:
        if not spec.namespaced:
            return
        ns_spec = self._specs[("", "v1", "namespaces")]
        ns = self._current(self._key(ns_spec, None, namespace or ""))
        if ns is None:
            raise _status_error(
                404, "NotFound", f'namespaces "{namespace}" not found', name=namespace, kind="namespaces"
            )
        if ns["metadata"].get("deletionTimestamp"):
            raise _status_error(
                403,
                "Forbidden",
                f"unable to create new content in namespace {namespace} because it is being terminated",
                name=namespace,
                kind="namespaces",
            )

    # -- responses ----------------------------------------------------------------------------------

    # kmock keeps one Response object per fallback reaction and, when a handler returns a
    # Response, copies its status into it and merges its headers into it; whatever a reply
    # leaves unset leaks into the next reply of that fallback. So every reply sets them all.
    @staticmethod
    def _reply(result: Any) -> kmock.Response:
        if isinstance(result, kmock.Response):
            headers = {"Content-Type": "application/json", "Warning": None, **(result.headers or {})}
            return kmock.Response(status=result.status or 200, payload=result.payload, headers=headers)
        return kmock.Response(status=200, payload=result, headers={"Content-Type": "application/json", "Warning": None})

    async def _serve_list(self, request: kmock.Request) -> kmock.Response:
        request, convert = self._events_alias(request)
        return self._reply(convert(await self._do_list(request)))

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Response:
        request, convert = self._events_alias(request)
        return self._reply(convert(await self._do_fetch(request)))

    async def _serve_create(self, request: kmock.Request) -> kmock.Response:
        request, convert = self._events_alias(request)
        return self._reply(convert(await self._do_create(request)))

    async def _serve_update(self, request: kmock.Request) -> kmock.Response:
        request, convert = self._events_alias(request)
        return self._reply(convert(await self._do_update(request)))

    async def _serve_delete(self, request: kmock.Request) -> kmock.Response:
        request, convert = self._events_alias(request)
        return self._reply(convert(await self._do_delete(request)))

    # -- events.k8s.io/v1 Events are the core v1 Events, seen through another schema --------------

    def _events_alias(self, request: kmock.Request) -> tuple[kmock.Request, Callable[[Any], Any]]:
        res = request.resource
        if res is None or (res.group, res.version, res.plural) != ("events.k8s.io", "v1", "events"):
            return request, lambda payload: payload
        core = kmock.resource(group="", version="v1", plural="events")
        data = request.data
        method = str(getattr(request.method, "value", request.method)).upper()
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            data = event_from_v1(data)
        elif request.action == kmock.action.UPDATE and method == "PUT" and isinstance(data, dict):
            data = event_from_v1(data)
        elif request.action == kmock.action.UPDATE:
            # Apply the patch to the events.k8s.io view, then store the core form (as a PUT).
            key = (core, request.namespace, request.name)
            old = self._current(key)
            if old is None:
                raise _status_error(
                    404,
                    "NotFound",
                    f'events.events.k8s.io "{request.name}" not found',
                    name=request.name,
                    group="events.k8s.io",
                    kind="events",
                )
            view = event_to_v1(old)
            content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            try:
                patched = (
                    json_patch(view, data)
                    if content_type == "application/json-patch+json"
                    else strategic_merge_patch(view, data)
                    if content_type == "application/strategic-merge-patch+json"
                    else merge_patch(view, data)
                )
            except JsonPatchError as e:
                raise _status_error(
                    422, "Invalid", f"the server rejected our request due to an error in our request: {e}"
                ) from None
            data, method = event_from_v1(patched), "PUT"
        evolved = attrs.evolve(request, resource=core, data=data, method=method)
        return evolved, lambda payload: _convert_events(payload)

    # -- LIST ---------------------------------------------------------------------------------------

    async def _do_list(self, request: kmock.Request) -> Any:
        spec = self._spec_of(request)
        if request.subresource:
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        match_labels = parse_label_selector(request.params.get("labelSelector"))
        match_fields = parse_field_selector(request.params.get("fieldSelector"))
        items = [
            copy.deepcopy(obj)
            for key, obj in self._live()
            if key[0] == spec.resource
            and (request.namespace is None or key[1] == request.namespace)
            and match_labels(obj.get("metadata", {}).get("labels") or {})
            and match_fields(obj)
        ]
        items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        rv = str(self._rv)
        meta: JsonDict = {"resourceVersion": rv}
        limit = int(request.params.get("limit") or 0)
        token = request.params.get("continue")
        if token:
            try:
                decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
                offset, rv = int(decoded["offset"]), str(decoded["rv"])
            except Exception:
                raise _status_error(400, "BadRequest", "invalid continue token") from None
            meta["resourceVersion"] = rv
            items = items[offset:]
        else:
            offset = 0
        if limit and len(items) > limit:
            next_offset = offset + limit
            meta["continue"] = base64.urlsafe_b64encode(json.dumps({"offset": next_offset, "rv": rv}).encode()).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {"apiVersion": spec.api_version, "kind": f"{spec.kind}List", "metadata": meta, "items": items}

    # -- WATCH --------------------------------------------------------------------------------------

    async def _serve_watch(self, request: kmock.Request) -> Any:
        spec = self._spec_of(request)
        # Validate before streaming starts: errors after the headers can only go into the stream.
        parse_label_selector(request.params.get("labelSelector"))
        parse_field_selector(request.params.get("fieldSelector"))
        since_raw = request.params.get("resourceVersion")
        if since_raw and not since_raw.isdigit():
            raise _status_error(400, "BadRequest", f"invalid resource version: {since_raw!r}")
        request, convert = self._events_alias(request)
        spec = self._spec_of(request)
        return self._reply(convert(kmock.Response(payload=self._watch_stream(spec, request))))

    def _watch_event(
        self,
        entry: JsonDict,
        request: kmock.Request,
        match_labels: Callable[..., bool],
        match_fields: Callable[..., bool],
    ) -> JsonDict | None:
        obj, old = entry["object"], entry["old"]
        meta = obj.get("metadata", {})
        if request.namespace is not None and meta.get("namespace") != request.namespace:
            return None
        if request.name is not None and meta.get("name") != request.name:
            return None

        def matches(o: JsonDict | None) -> bool:
            return o is not None and match_labels(o.get("metadata", {}).get("labels") or {}) and match_fields(o)

        now_matches = matches(obj)
        if entry["type"] == "DELETED":
            return {"type": "DELETED", "object": obj} if matches(old) or now_matches else None
        was_matching = matches(old) if entry["type"] == "MODIFIED" else False
        if now_matches and (was_matching or entry["type"] == "ADDED"):
            return {"type": entry["type"], "object": obj}
        if now_matches:
            return {"type": "ADDED", "object": obj}
        if was_matching:
            return {"type": "DELETED", "object": obj}
        return None

    async def _watch_stream(self, spec: ResourceSpec, request: kmock.Request) -> AsyncIterator[Any]:
        yield b""  # send the headers now: clients wait for them before anything happens
        params = request.params
        match_labels = parse_label_selector(params.get("labelSelector"))
        match_fields = parse_field_selector(params.get("fieldSelector"))
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        since_raw = params.get("resourceVersion")
        initial = params.get("sendInitialEvents") in ("true", "1")
        bookmarks = params.get("allowWatchBookmarks") in ("true", "1")

        if not since_raw or since_raw == "0" or initial:
            # A snapshot first (as synthetic ADDED events), then the changes after it.
            since = self._rv
            snapshot = [
                obj
                for key, obj in self._live()
                if key[0] == spec.resource
                and (request.namespace is None or key[1] == request.namespace)
                and (request.name is None or key[2] == request.name)
                and match_labels(obj.get("metadata", {}).get("labels") or {})
                and match_fields(obj)
            ]
            for obj in snapshot:
                yield {"type": "ADDED", "object": copy.deepcopy(obj)}
            if initial:
                yield {
                    "type": "BOOKMARK",
                    "object": {
                        "kind": spec.kind,
                        "apiVersion": spec.api_version,
                        "metadata": {
                            "resourceVersion": str(since),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    },
                }
        else:
            try:
                since = int(since_raw)
            except ValueError:
                raise _status_error(400, "BadRequest", f"invalid resource version: {since_raw!r}") from None
            oldest = self._log[0]["rv"] if self._log else self._rv + 1
            if since < oldest - 1 and since < self._rv:
                yield {
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": f"too old resource version: {since} ({oldest - 1})",
                        "reason": "Expired",
                        "code": 410,
                    },
                }
                return

        cursor = since
        transport_check = request._raw_request
        while not self._closing:
            if self._tick is None:
                self._tick = asyncio.Event()
            tick = self._tick
            for entry in self._log:
                if entry["rv"] <= cursor or entry["resource"] != spec.resource:
                    continue
                event = self._watch_event(entry, request, match_labels, match_fields)
                if event is not None:
                    yield copy.deepcopy(event)
            cursor = max(cursor, self._log[-1]["rv"] if self._log else cursor)
            remaining = deadline - loop.time() if deadline is not None else 1.0
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(tick.wait(), timeout=min(remaining, 1.0))
            except TimeoutError:
                pass
            transport = getattr(transport_check, "transport", None)
            if transport_check is not None and (transport is None or transport.is_closing()):
                return  # the client has gone
        if bookmarks and not self._closing:
            yield {
                "type": "BOOKMARK",
                "object": {
                    "kind": spec.kind,
                    "apiVersion": spec.api_version,
                    "metadata": {"resourceVersion": str(self._rv)},
                },
            }

    # -- GET --------------------------------------------------------------------------------------

    async def _do_fetch(self, request: kmock.Request) -> Any:
        spec = self._spec_of(request)
        key = self._key(spec, request.namespace, request.name or "")
        obj = self._current(key)
        if obj is None:
            raise self._not_found(spec, request.name)
        if request.subresource == "log" and (spec.group, spec.plural) == ("", "pods"):
            text = None
            if self.pod_log_source is not None:
                text = self.pod_log_source(request.namespace or "", request.name or "", request.params.get("container"))
            if text is None:
                raise _status_error(
                    400, "BadRequest", f'container in pod "{request.name}" is waiting to start: no logs'
                )
            tail = request.params.get("tailLines")
            if tail:
                text = "".join(text.splitlines(keepends=True)[-int(tail) :])
            return kmock.Response(payload=text.encode(), headers={"Content-Type": "text/plain"})
        if request.subresource not in (None, "status") or (
            request.subresource == "status" and "status" not in spec.subresources
        ):
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        return copy.deepcopy(obj)

    # -- POST -------------------------------------------------------------------------------------

    async def _do_create(self, request: kmock.Request) -> Any:
        spec = self._spec_of(request)
        body = request.data
        if request.subresource == "binding" and (spec.group, spec.plural) == ("", "pods") and request.name:
            return self._bind_pod(spec, request)
        if request.name is not None or request.subresource is not None:
            raise _status_error(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )
        if not isinstance(body, dict):
            raise _status_error(400, "BadRequest", "the request body is not a JSON object")
        obj = copy.deepcopy(body)
        self._decode(spec, obj)
        meta = obj.setdefault("metadata", {})
        requested_name = str(meta.get("name") or "")
        if meta.get("resourceVersion"):
            raise _status_error(400, "BadRequest", "resourceVersion should not be set on objects to be created")
        if spec.namespaced:
            namespace = request.namespace or meta.get("namespace")
            if request.namespace and meta.get("namespace") and meta["namespace"] != request.namespace:
                raise _status_error(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            if not namespace:
                raise _status_error(404, "NotFound", "the server could not find the requested resource")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
            namespace = None
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(random.choices(_NAME_ALPHABET, k=5))
            else:
                raise self._invalid(spec, None, ["metadata.name: Required value: name or generateName is required"])
        key = self._key(spec, namespace, meta["name"])
        if self._current(key) is not None:
            raise _status_error(
                409,
                "AlreadyExists",
                f'{spec.qualified} "{meta["name"]}" already exists',
                name=meta["name"],
                group=spec.group,
                kind=spec.plural,
            )
        self._check_namespace(spec, namespace)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(field, None)
        if (spec.group, spec.plural) not in _NO_GENERATION:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        self._reset_status_on_create(spec, obj)
        self._prepare(spec, obj, creating=True, strict=request.params.get("fieldValidation") == "Strict")
        self._enforce_owner_references(spec, request, obj, None)
        self._admit(spec, request, obj, None, name=requested_name)
        if request.params.get("dryRun"):
            return kmock.Response(status=201, payload=obj)
        stored = self._store(spec, key, obj, None)
        return kmock.Response(status=201, payload=stored)

    def _bind_pod(self, spec: ResourceSpec, request: kmock.Request) -> Any:
        key = self._key(spec, request.namespace, request.name or "")
        pod = self._current(key)
        if pod is None:
            raise self._not_found(spec, request.name)
        target = ((request.data or {}).get("target") or {}).get("name")
        if not target:
            raise self._invalid(spec, request.name, ["target.name: Required value"])
        if pod.get("spec", {}).get("nodeName"):
            raise _status_error(
                409,
                "Conflict",
                f'pod {request.name} is already assigned to node "{pod["spec"]["nodeName"]}"',
                name=request.name,
                kind="pods",
            )
        new = copy.deepcopy(pod)
        new["spec"]["nodeName"] = target
        conditions = [c for c in new.get("status", {}).get("conditions", []) if c.get("type") != "PodScheduled"]
        conditions.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()})
        new.setdefault("status", {})["conditions"] = conditions
        self._store(spec, key, new, pod)
        return kmock.Response(
            status=201, payload={"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}
        )

    # -- PATCH / PUT ------------------------------------------------------------------------------

    async def _do_update(self, request: kmock.Request) -> Any:
        spec = self._spec_of(request)
        if request.subresource not in (None, "status") or (
            request.subresource == "status" and "status" not in spec.subresources
        ):
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        key = self._key(spec, request.namespace, request.name or "")
        old = self._current(key)
        method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
        body = request.data

        if old is None:  # NB: no create-on-PUT (which a real server allows for some resources)
            raise self._not_found(spec, request.name)

        if method == "PUT":
            if not isinstance(body, dict):
                raise _status_error(400, "BadRequest", "the request body is not a JSON object")
            candidate = copy.deepcopy(body)
            self._decode(spec, candidate)
            candidate_meta = candidate.setdefault("metadata", {})
            wanted_rv = candidate_meta.get("resourceVersion")
            if candidate_meta.get("name") not in (None, request.name):
                raise _status_error(400, "BadRequest", "the name of the object does not match the name on the URL")
        else:
            content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            try:
                if content_type == "application/json-patch+json":
                    if not isinstance(body, list):
                        raise _status_error(400, "BadRequest", "a JSON patch must be a list of operations")
                    candidate = json_patch(old, body)
                elif content_type == "application/merge-patch+json":
                    candidate = merge_patch(old, body)
                elif content_type == "application/strategic-merge-patch+json":
                    if spec.custom:
                        raise _status_error(
                            415,
                            "UnsupportedMediaType",
                            "the body of the request was in an unknown format - accepted media types include: "
                            "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                        )
                    candidate = strategic_merge_patch(old, body)
                elif content_type in ("application/apply-patch+yaml", "application/apply-patch+json"):
                    # Server-side apply, approximated as a merge patch (no field ownership).
                    candidate = merge_patch(old, body)
                else:
                    raise _status_error(
                        415,
                        "UnsupportedMediaType",
                        f"the body of the request was in an unknown format: {content_type!r}",
                    )
            except JsonPatchError as e:
                raise _status_error(
                    422,
                    "Invalid",
                    f"the server rejected our request due to an error in our request: {e}",
                    name=request.name,
                    group=spec.group,
                    kind=spec.kind,
                ) from None
            if not isinstance(candidate, dict):
                raise _status_error(422, "Invalid", "the patched object is not a JSON object")
            self._decode(spec, candidate, patched=True)
            candidate.setdefault("metadata", {})
            wanted_rv = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None

        if wanted_rv and str(wanted_rv) != old["metadata"]["resourceVersion"]:
            raise _status_error(
                409,
                "Conflict",
                f"Operation cannot be fulfilled on {spec.qualified} "
                f'"{request.name}": the object has been modified; please apply your changes '
                f"to the latest version and try again",
                name=request.name,
                group=spec.group,
                kind=spec.plural,
            )

        new = self._merge_update(spec, old, candidate, status_only=request.subresource == "status")
        # NB: admission runs on a no-op write too (the API server only skips the storage write).
        if new == old:
            self._admit(spec, request, new, old, name=request.name or "")
            return copy.deepcopy(old)  # a no-op write: no new resourceVersion, no event
        status_only = request.subresource == "status"
        strict = request.params.get("fieldValidation") == "Strict"
        self._prepare(spec, new, creating=False, old=old, status_only=status_only, strict=strict)
        if new == old:
            self._admit(spec, request, new, old, name=request.name or "")
            return copy.deepcopy(old)
        errors: list[str] = []
        if (spec.group, spec.plural) == ("", "pods"):
            errors += _pod_spec_violations(old, new)
        if (spec.group, spec.plural) == ("batch", "jobs"):
            errors += _job_spec_violations(old, new)
        if errors:
            raise self._invalid(spec, request.name, errors)
        self._enforce_owner_references(spec, request, new, old)
        if (spec.group, spec.plural) not in _NO_GENERATION:
            strip = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
            if "status" not in spec.subresources:
                strip = lambda o: {k: v for k, v in o.items() if k != "metadata"}  # noqa: E731
            if strip(old) != strip(new):
                new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        self._admit(spec, request, new, old, name=request.name or "")
        if request.params.get("dryRun"):
            return new
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not self._awaits_kubelet(spec, new):
            self._store(spec, key, new, old)
            return self._remove(spec, key, new)
        return self._store(spec, key, new, old)

    def _merge_update(self, spec: ResourceSpec, old: JsonDict, candidate: JsonDict, *, status_only: bool) -> JsonDict:
        if status_only:
            new = copy.deepcopy(old)
            if "status" in candidate:
                new["status"] = candidate["status"]
            else:
                new.pop("status", None)
            return new
        new = copy.deepcopy(candidate)
        if "status" in spec.subresources:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
        for field in (
            "uid",
            "creationTimestamp",
            "namespace",
            "name",
            "resourceVersion",
            "generation",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ):
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        if old_meta.get("deletionTimestamp"):
            # While deleting, finalizers may only be removed, never added.
            meta["finalizers"] = [f for f in meta.get("finalizers") or [] if f in (old_meta.get("finalizers") or [])]
        for field in ("labels", "annotations", "finalizers", "ownerReferences"):
            if field in meta and meta[field] in (None, [], {}):
                del meta[field]
        return new

    # -- DELETE -----------------------------------------------------------------------------------

    async def _do_delete(self, request: kmock.Request) -> Any:
        spec = self._spec_of(request)
        if request.subresource is not None:
            raise _status_error(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )
        options = request.data if isinstance(request.data, dict) else {}
        propagation = request.params.get("propagationPolicy") or options.get("propagationPolicy")
        if propagation is None and (
            request.params.get("orphanDependents") == "true" or options.get("orphanDependents")
        ):
            propagation = "Orphan"
        grace_raw = request.params.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
        grace = int(grace_raw) if grace_raw is not None else None
        # NB: always give every header a value: kmock keeps a fallback's Response object between
        # requests and merges headers into it, so a header left out would leak from the last one.
        headers: dict[str, str | None] = {"Warning": None}
        if propagation is None and (spec.group, spec.plural) in _ORPHAN_BY_DEFAULT:
            headers["Warning"] = JOB_ORPHAN_WARNING
            propagation = "Orphan"
        if request.name is None:  # deletecollection
            listing = await self._do_list(request)
            for item in listing["items"]:
                key = self._key(spec, item["metadata"].get("namespace"), item["metadata"]["name"])
                self.delete_object(spec, key, propagation=propagation, grace=grace)
            return kmock.Response(
                payload={
                    "apiVersion": spec.api_version,
                    "kind": f"{spec.kind}List",
                    "metadata": {"resourceVersion": str(self._rv)},
                    "items": listing["items"],
                },
                headers=headers,
            )
        key = self._key(spec, request.namespace, request.name)
        if self._current(key) is None:
            raise self._not_found(spec, request.name)
        preconditions = options.get("preconditions") or {}
        current = self._current(key) or {}
        if preconditions.get("uid") and preconditions["uid"] != current["metadata"]["uid"]:
            raise _status_error(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {preconditions['uid']}, "
                f"UID in object meta: {current['metadata']['uid']}",
            )
        if (
            preconditions.get("resourceVersion")
            and preconditions["resourceVersion"] != current["metadata"]["resourceVersion"]
        ):
            raise _status_error(409, "Conflict", "Precondition failed: resourceVersion mismatch")
        result, gone = self.delete_object(spec, key, propagation=propagation, grace=grace)
        if gone and (spec.group, spec.plural) not in _RETURNS_DELETED_OBJECT and not spec.custom:
            payload: JsonDict = {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {
                    "name": request.name,
                    "group": spec.group,
                    "kind": spec.plural,
                    "uid": result["metadata"]["uid"],
                },
            }
        else:
            payload = result
        return kmock.Response(payload=payload, headers=headers)

    def _awaits_kubelet(self, spec: ResourceSpec, obj: JsonDict) -> bool:
        """A bound, non-terminal pod is only removed once its kubelet confirms (grace 0)."""
        if (spec.group, spec.plural) != ("", "pods"):
            return False
        if obj["metadata"].get("deletionGracePeriodSeconds", 0) == 0:
            return False
        return bool(obj.get("spec", {}).get("nodeName")) and obj.get("status", {}).get("phase") not in (
            "Succeeded",
            "Failed",
        )

    def delete_object(
        self, spec: ResourceSpec, key: tuple[Any, ...], *, propagation: str | None = None, grace: int | None = None
    ) -> tuple[JsonDict, bool]:
        """Delete as the API server does; returns (the object's last state, whether it is gone now)."""
        old = self._current(key)
        if old is None:
            raise self._not_found(spec, key[2])
        if propagation == "Orphan":
            self._orphan_dependents(old["metadata"]["uid"])
        meta = old["metadata"]
        is_pod = (spec.group, spec.plural) == ("", "pods")
        if is_pod:
            pod_grace = grace if grace is not None else old.get("spec", {}).get("terminationGracePeriodSeconds", 30)
            if not old.get("spec", {}).get("nodeName") or old.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                pod_grace = 0
        else:
            pod_grace = 0
        is_namespace = (spec.group, spec.plural) == ("", "namespaces")
        needs_wait = bool(meta.get("finalizers")) or pod_grace > 0 or is_namespace
        if not needs_wait:
            return self._remove(spec, key, old), True
        new = copy.deepcopy(old)
        new_meta = new["metadata"]
        previous_grace = new_meta.get("deletionGracePeriodSeconds")
        if not new_meta.get("deletionTimestamp") or (previous_grace is not None and pod_grace < previous_grace):
            stamp = datetime.datetime.now(tz=datetime.UTC) + datetime.timedelta(seconds=pod_grace)
            new_meta["deletionTimestamp"] = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
            new_meta["deletionGracePeriodSeconds"] = pod_grace
            if is_namespace:
                new.setdefault("status", {})["phase"] = "Terminating"
        if new == old:
            return copy.deepcopy(old), False
        if is_pod and pod_grace == 0 and not meta.get("finalizers"):
            self._store(spec, key, new, old)
            return self._remove(spec, key, self._current(key) or new), True
        stored = self._store(spec, key, new, old)
        self._schedule_gc()
        return stored, False

    def _orphan_dependents(self, owner_uid: str) -> None:
        for key, obj in list(self._live()):
            refs = obj["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == owner_uid for ref in refs):
                spec = self._spec_of_key(key)
                if spec is None:
                    continue
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != owner_uid]
                if not new["metadata"]["ownerReferences"]:
                    del new["metadata"]["ownerReferences"]
                self._store(spec, key, new, obj)

    # -- garbage collector and namespace lifecycle ----------------------------------------------

    def _schedule_gc(self) -> None:
        if self._gc_handle is None:
            loop = asyncio.get_running_loop()
            self._gc_handle = loop.call_later(self.gc_delay, self._run_gc)

    def _run_gc(self) -> None:
        self._gc_handle = None
        try:
            self.collect_garbage()
        except Exception:
            logger.exception("Garbage collection failed.")

    def collect_garbage(self) -> None:
        """One pass of the garbage collector and the namespace controller."""
        live = list(self._live())
        uids = {obj["metadata"]["uid"] for _, obj in live if obj["metadata"].get("uid")}
        for key, obj in live:
            spec = self._spec_of_key(key)
            if spec is None or self._current(key) is None:
                continue
            refs = obj["metadata"].get("ownerReferences") or []
            if not refs:
                continue
            dead = [r for r in refs if r.get("uid") not in uids]
            if not dead:
                continue
            if len(dead) == len(refs):
                if not obj["metadata"].get("deletionTimestamp"):
                    self.delete_object(spec, key, propagation="Background")
            else:
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") in uids]
                self._store(spec, key, new, obj)
        ns_spec = self._specs[("", "v1", "namespaces")]
        for key, ns in list(self._live()):
            if key[0] != ns_spec.resource or not ns["metadata"].get("deletionTimestamp"):
                continue
            name = ns["metadata"]["name"]
            contents = [(k, o) for k, o in self._live() if k[1] == name and k[0] != ns_spec.resource]
            for k, o in contents:
                spec = self._spec_of_key(k)
                if spec is not None and not o["metadata"].get("deletionTimestamp"):
                    self.delete_object(spec, k, propagation="Background")
            if not contents and not ns["metadata"].get("finalizers"):
                self._remove(ns_spec, key, ns)
            elif contents:
                self._schedule_gc()

    # -- direct access for tests (same semantics, no HTTP) -----------------------------------------

    def close_watches(self) -> None:
        self._closing = True
        self._wake_watchers()


# ---------------------------------------------------------------------------------------------
# Running the emulator in a background thread (so that sync clients in tests never deadlock)
# ---------------------------------------------------------------------------------------------


class EmulatorServer:
    """
    Runs an :class:`Emulator` behind kmock's HTTP server in a dedicated thread and event loop.

    The thread makes the emulator usable from sync tests, from async tests that call the sync
    kubernetes client, and from operators running in their own threads at the same time.
    """

    def __init__(
        self, *, host: str = "127.0.0.1", port: int | None = None, emulator_factory: Callable[[], Emulator] = Emulator
    ) -> None:
        self._host = host
        self._port = port
        self._factory = emulator_factory
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.emulator: Emulator | None = None
        self.url: str = ""

    def start(self, timeout: float = 10) -> str:
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("The emulated API server did not start in time.")
        if self._error is not None:
            raise RuntimeError("The emulated API server failed to start.") from self._error
        return self.url

    def stop(self, timeout: float = 10) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)

    def call(self, fn: Callable[[], Any], timeout: float = 10) -> Any:
        """Run a plain function inside the emulator's loop (e.g. to inspect or seed state)."""
        assert self._loop is not None

        async def _call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(_call(), self._loop).result(timeout)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported to the starting thread
            self._error = e
            self._ready.set()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self.emulator = self._factory()
        async with self.emulator, kmock.Server(self.emulator, host=self._host, port=self._port) as server:
            self.url = f"http://{server.host}:{server.port}"
            self._ready.set()
            await self._stop.wait()
            self.emulator.close_watches()
            await asyncio.sleep(0.05)  # let the watch streams notice and end


def crd_spec_from_manifest(manifest: Mapping[str, Any]) -> list[ResourceSpec]:
    """The resources a CustomResourceDefinition manifest would serve (for inspection)."""
    spec = manifest.get("spec", {})
    names = spec.get("names", {})
    return [
        ResourceSpec(
            group=spec.get("group", ""),
            version=v["name"],
            plural=names.get("plural", ""),
            kind=names.get("kind", ""),
            namespaced=spec.get("scope") == "Namespaced",
            subresources=tuple((v.get("subresources") or {}).keys()),
            custom=True,
            schema=(v.get("schema") or {}).get("openAPIV3Schema"),
        )
        for v in spec.get("versions", [])
    ]
