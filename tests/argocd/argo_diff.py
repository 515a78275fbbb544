"""Argo CD's diff and sync of a custom resource, in Python, after gitops-engine and Argo CD's code.

- `normalize`: the ignoreDifferences normalizer (util/argo/normalizers): each jsonPointer is an
  RFC 6902 remove, each jqPathExpression runs as `del(<expression>)` (here in the jq binary, there
  in gojq); an entry that does not apply is skipped, as Argo CD skips it.
- `legacy_diff`: the default diff (gitops-engine pkg/diff ThreeWayDiff for a type outside the
  client's scheme): normalize config, live and last-applied-configuration, drop from live what
  last-applied never had, build kubectl's three-way JSON merge patch and apply it to live; the
  resource is Synced when that predicted live state is the live state.
- `sync`: what a sync with RespectIgnoreDifferences=true applies (controller/sync.go
  normalizeTargetResources: the normalized target, with the live values of the ignored fields
  copied back, status excepted), applied as `kubectl apply` does client-side: a create carrying
  last-applied-configuration, then three-way JSON merge patches.

The rules come from docs/gitops.md's Application, so the test and the page cannot drift apart.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import yaml

from tests.support.emulator import merge_patch
from tests.support.kube import Kube
from tests.support.paths import REPO

DOC = REPO / "docs" / "gitops.md"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
# Argo CD 3.x's default compare option (ignoreResourceStatusField: all), as it adds it for */*.
STATUS_IGNORED_BY_DEFAULT = {"group": "*", "kind": "*", "jsonPointers": ["/status"]}

Json = dict[str, Any]


def doc_yaml_blocks() -> list[Any]:
    """Every document of every ```yaml block of docs/gitops.md."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc is not None]


def doc_application() -> Json:
    (application,) = [doc for doc in doc_yaml_blocks() if doc.get("kind") == "Application"]
    return application


def doc_rules(group: str = "trainpilot.dev", kind: str = "AgentExperiment") -> list[Json]:
    return [
        rule
        for rule in doc_application()["spec"]["ignoreDifferences"]
        if rule.get("group") in (group, "*") and rule.get("kind") in (kind, "*")
    ]


# ---- the normalizer -----------------------------------------------------------------------


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def remove_pointer(doc: Json, pointer: str) -> bool:
    """RFC 6902 remove; False (and nothing changed) when the path is not there."""
    *parents, last = [_unescape(token) for token in pointer.lstrip("/").split("/")]
    node: Any = doc
    for token in parents:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return False
    if isinstance(node, dict) and last in node:
        del node[last]
        return True
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        del node[int(last)]
        return True
    return False


def jq_delete(doc: Json, expression: str) -> Json:
    """`del(<expression>)` in real jq (libjq, through the `jq` package), as Argo CD's gojq runs it."""
    import jq

    try:
        program = jq.compile(f"del({expression})")
    except ValueError as error:
        raise ValueError(f"jq refused {expression!r}: {error}") from None
    return program.input_value(doc).first()


def normalize(obj: Json, rules: list[Json]) -> Json:
    obj = copy.deepcopy(obj)
    obj.get("metadata", {}).pop("creationTimestamp", None)  # gitops-engine's Normalize drops it
    for rule in rules:
        for pointer in rule.get("jsonPointers", []):
            remove_pointer(obj, pointer)
        for expression in rule.get("jqPathExpressions", []):
            obj = jq_delete(obj, expression)
    return obj


# ---- kubectl's three-way JSON merge patch ----------------------------------------------------


def create_merge_patch(original: Any, modified: Any) -> Any:
    """RFC 7386: the merge patch that turns `original` into `modified`."""
    if not (isinstance(original, dict) and isinstance(modified, dict)):
        return modified
    patch: Json = {key: None for key in original if key not in modified}
    for key, value in modified.items():
        if key not in original:
            patch[key] = value
        elif original[key] != value:
            patch[key] = create_merge_patch(original[key], value)
    return patch


def _keep_or_drop_nulls(patch: Json, keep_nulls: bool) -> Json:
    """apimachinery's keepOrDeleteNullInObj: only the deletions, or only additions and changes."""
    kept: Json = {}
    for key, value in patch.items():
        if value is None:
            if keep_nulls:
                kept[key] = None
        elif isinstance(value, dict) and value:
            sub = _keep_or_drop_nulls(value, keep_nulls)
            if sub:
                kept[key] = sub
        elif not keep_nulls:
            kept[key] = value
    return kept


def _deep_merge(base: Json, over: Json) -> Json:
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def three_way_merge_patch(original: Json, modified: Json, current: Json) -> Json:
    """jsonmergepatch.CreateThreeWayJSONMergePatch: changes from current to modified, deletions
    only of what original (last applied) had and modified no longer has."""
    add_and_change = _keep_or_drop_nulls(create_merge_patch(current, modified), keep_nulls=False)
    deletions = _keep_or_drop_nulls(create_merge_patch(original, modified), keep_nulls=True)
    return _deep_merge(deletions, add_and_change)


def remove_map_fields(config: Any, live: Any) -> Any:
    """gitops-engine's RemoveMapFields: keep only what config has (lists item by item)."""
    if isinstance(config, dict) and isinstance(live, dict):
        return {key: remove_map_fields(value, live[key]) for key, value in config.items() if key in live}
    if isinstance(config, list) and isinstance(live, list):
        return [remove_map_fields(config[i], item) if i < len(config) else item for i, item in enumerate(live)]
    return live


def _without_namespace_and_empty_annotations(obj: Json) -> Json:
    obj = copy.deepcopy(obj)
    metadata = obj.get("metadata", {})
    metadata.pop("namespace", None)
    if "annotations" in metadata and not metadata["annotations"]:
        del metadata["annotations"]
    return obj


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """The JSON paths where a and b differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b)):
            found += differences(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{path}/{key}")
        return found
    return [] if a == b else [path or "/"]


def legacy_diff(desired: Json, live: Json, rules: list[Json]) -> list[str]:
    """What Argo CD's default diff reports for one resource: [] when Synced."""
    rules = [STATUS_IGNORED_BY_DEFAULT, *rules]
    config, live = normalize(desired, rules), normalize(live, rules)
    applied = live.get("metadata", {}).get("annotations", {}).get(LAST_APPLIED)
    orig = normalize(json.loads(applied), rules) if applied else copy.deepcopy(config)  # else: TwoWayDiff
    orig, config = _without_namespace_and_empty_annotations(orig), _without_namespace_and_empty_annotations(config)
    patch = three_way_merge_patch(orig, config, remove_map_fields(orig, live))
    return differences(live, merge_patch(live, patch))


# ---- a sync ---------------------------------------------------------------------------------


def _path(desired: Json) -> str:
    group_version = desired["apiVersion"]
    plural = {"AgentExperiment": "agentexperiments"}[desired["kind"]]
    return f"/apis/{group_version}/namespaces/{desired['metadata']['namespace']}/{plural}"


def live_object(kube: Kube, desired: Json) -> Json | None:
    status, body = kube.request("GET", f"{_path(desired)}/{desired['metadata']['name']}")
    if status == 404:
        return None
    assert status == 200, body
    return body


def target_to_apply(desired: Json, live: Json | None, rules: list[Json]) -> Json:
    """RespectIgnoreDifferences=true: the desired state with the live values of ignored fields."""
    if live is None:
        return copy.deepcopy(desired)  # a create is applied as it is
    rules = [STATUS_IGNORED_BY_DEFAULT, *rules]
    live_without_status = {key: value for key, value in live.items() if key != "status"}
    live_patch = create_merge_patch(normalize(live_without_status, rules), live_without_status)
    return merge_patch(normalize(desired, rules), live_patch)


class ApplyRefused(Exception):
    def __init__(self, patch: Json, status: int, body: Any) -> None:
        self.patch, self.status = patch, status
        self.message = body.get("message", str(body)) if isinstance(body, dict) else str(body)
        super().__init__(f"{status}: {self.message}")


def kubectl_apply(kube: Kube, target: Json) -> Json:
    """Client-side `kubectl apply` of one custom resource; the patch it sent ({} for a create).
    ApplyRefused when the API server refuses the patch."""
    applied = copy.deepcopy(target)
    applied.get("metadata", {}).get("annotations", {}).pop(LAST_APPLIED, None)
    modified = copy.deepcopy(applied)
    modified["metadata"].setdefault("annotations", {})[LAST_APPLIED] = json.dumps(
        applied, sort_keys=True, separators=(",", ":")
    )
    current = live_object(kube, target)
    if current is None:
        status, body = kube.request("POST", _path(target), modified)
        assert status == 201, body
        return {}
    original_text = current.get("metadata", {}).get("annotations", {}).get(LAST_APPLIED)
    original = json.loads(original_text) if original_text else {}
    patch = three_way_merge_patch(original, modified, current)
    if patch:
        name = target["metadata"]["name"]
        status, body = kube.request(
            "PATCH", f"{_path(target)}/{name}", patch, content_type="application/merge-patch+json"
        )
        if status != 200:
            raise ApplyRefused(patch, status, body)
    return patch


def respects_ignore_differences() -> bool:
    return "RespectIgnoreDifferences=true" in doc_application()["spec"]["syncPolicy"].get("syncOptions", [])


def sync(kube: Kube, desired: Json, rules: list[Json]) -> Json:
    """One Argo CD sync of `desired` with the doc's Application's sync options; the patch it sent."""
    live = live_object(kube, desired) if respects_ignore_differences() else None
    return kubectl_apply(kube, target_to_apply(desired, live, rules))
