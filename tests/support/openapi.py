"""A small stand-in for the API server's custom resource validation, for tests.

It covers the subset of OpenAPI v3 that `trainpilot.api.crd` emits and does what the API
server does with a create request, in the same order:
  1. strict field validation (kubectl's default `--validate=strict`): unknown fields are errors;
  2. null pruning and defaulting (`default`);
  3. schema validation: type, nullable, enum, minimum/maximum (+exclusive), minLength/maxLength,
     pattern, minItems/maxItems, minProperties/maxProperties, required, list-type map/set;
  4. CEL rules (`x-kubernetes-validations`), evaluated for real with cel-python, on values typed
     the way Kubernetes types them (`number` fields are doubles, even when written as 3).
Each error is "<path>: <message>", like the API server's field errors.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import celpy
from celpy import celtypes

_ENV = celpy.Environment()


def _is_sorted(items: celtypes.ListType) -> celtypes.BoolType:
    values = list(items)
    return celtypes.BoolType(all(a <= b for a, b in zip(values, values[1:], strict=False)))


# The Kubernetes CEL list library functions the CRDs use (cel-python has only the standard ones).
K8S_FUNCTIONS = {"isSorted": _is_sorted}


def compile_cel(expression: str) -> celpy.Runner:
    """Parse (and prepare) one CEL expression; raises celpy.CELParseError on bad syntax."""
    return _ENV.program(_ENV.compile(expression), functions=K8S_FUNCTIONS)


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    raise AssertionError(f"unknown type {kind}")


def prune_unknown(schema: dict[str, Any], value: Any, path: str, errors: list[str]) -> None:
    """Report fields the schema does not know (strict field validation)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return
    if isinstance(value, dict) and schema.get("type") == "object":
        if "properties" in schema:
            for key, item in value.items():
                if key in schema["properties"]:
                    prune_unknown(schema["properties"][key], item, f"{path}.{key}", errors)
                elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                    errors.append(f'{path}: unknown field "{key}"')
        elif "additionalProperties" in schema:
            for key, item in value.items():
                prune_unknown(schema["additionalProperties"], item, f"{path}.{key}", errors)
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            prune_unknown(schema["items"], item, f"{path}[{index}]", errors)


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Prune nulls of non-nullable fields, then fill in defaults, recursively (in place)."""
    if isinstance(value, dict) and "properties" in schema:
        for key, prop in schema["properties"].items():
            if key in value and value[key] is None and not prop.get("nullable"):
                del value[key]
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
            if key in value:
                apply_defaults(prop, value[key])
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for item in value.values():
            apply_defaults(schema["additionalProperties"], item)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            apply_defaults(schema["items"], item)
    return value


def validate_schema(schema: dict[str, Any], value: Any, path: str, errors: list[str]) -> None:
    """Check one value against its schema node (no CEL)."""
    if value is None:
        if not schema.get("nullable"):
            errors.append(f"{path}: Invalid value: null: must not be null")
        return
    kind = schema.get("type")
    if kind is None:  # x-kubernetes-preserve-unknown-fields or x-kubernetes-int-or-string: anything goes
        if schema.get("x-kubernetes-int-or-string") and (isinstance(value, bool) or not isinstance(value, (int, str))):
            errors.append(f"{path}: Invalid value: {json.dumps(value)}: must be of type integer or string")
        return
    if not _type_ok(kind, value):
        errors.append(f"{path}: Invalid value: {json.dumps(value)}: must be of type {kind}")
        return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: Unsupported value: {json.dumps(value)}: supported values: {schema['enum']}")
    if kind in ("integer", "number"):
        if "minimum" in schema:
            low = schema["minimum"]
            if value < low or (schema.get("exclusiveMinimum") and value == low):
                bound = "" if schema.get("exclusiveMinimum") else " or equal to"
                errors.append(f"{path}: Invalid value: {value}: must be greater than{bound} {low}")
        if "maximum" in schema:
            high = schema["maximum"]
            if value > high or (schema.get("exclusiveMaximum") and value == high):
                bound = "" if schema.get("exclusiveMaximum") else " or equal to"
                errors.append(f"{path}: Invalid value: {value}: must be less than{bound} {high}")
    if kind == "string":
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(
                f"{path}: Invalid value: {json.dumps(value)}: should be at least {schema['minLength']} chars long"
            )
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: Too long: may not be more than {schema['maxLength']} bytes")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: Invalid value: {json.dumps(value)}: should match '{schema['pattern']}'")
    if kind == "array":
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{path}: Invalid value: {len(value)}: should have at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: Too many: {len(value)}: must have at most {schema['maxItems']} items")
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "set" and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
            errors.append(f"{path}: Duplicate value: a set lists each value once")
        if list_type == "map":
            keys = [
                tuple(json.dumps(item.get(k)) for k in schema["x-kubernetes-list-map-keys"])
                for item in value
                if isinstance(item, dict)
            ]
            if len(set(keys)) != len(keys):
                errors.append(
                    f"{path}: Duplicate value: entries must have unique {schema['x-kubernetes-list-map-keys']}"
                )
        for index, item in enumerate(value):
            validate_schema(schema["items"], item, f"{path}[{index}]", errors)
    if kind == "object":
        if "minProperties" in schema and len(value) < schema["minProperties"]:
            errors.append(f"{path}: Invalid value: should have at least {schema['minProperties']} properties")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            errors.append(f"{path}: Too many: {len(value)}: must have at most {schema['maxProperties']} items")
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}.{name}: Required value")
        for key, item in value.items():
            if key in schema.get("properties", {}):
                validate_schema(schema["properties"][key], item, f"{path}.{key}", errors)
            elif isinstance(schema.get("additionalProperties"), dict):
                validate_schema(schema["additionalProperties"], item, f"{path}.{key}", errors)


def to_cel(schema: dict[str, Any], value: Any, *, root: bool = False) -> Any:
    """A JSON value as Kubernetes hands it to CEL: typed by its schema, unknown fields hidden."""
    if value is None:
        return None
    kind = schema.get("type")
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if kind == "integer":
        return celtypes.IntType(value)
    if kind == "string":
        return celtypes.StringType(value)
    if kind == "boolean":
        return celtypes.BoolType(value)
    if kind == "array":
        return celtypes.ListType([to_cel(schema["items"], item) for item in value])
    if kind == "object":
        out = {}
        for key, item in value.items():
            if root and key == "metadata":
                # Only name and generateName of the root's metadata are visible to CEL.
                item = {k: v for k, v in item.items() if k in ("name", "generateName")}
                out[celtypes.StringType(key)] = celpy.json_to_cel(item)
            elif key in schema.get("properties", {}):
                out[celtypes.StringType(key)] = to_cel(schema["properties"][key], item)
            elif isinstance(schema.get("additionalProperties"), dict):
                out[celtypes.StringType(key)] = to_cel(schema["additionalProperties"], item)
        return celtypes.MapType(out)
    return celpy.json_to_cel(value)


NO_OLD = object()  # no old value: a create, or a value an update cannot correlate with an old one


def _correlated_items(schema: dict[str, Any], value: list[Any], old: Any) -> list[Any]:
    """The old value of each list item: only lists of type map correlate (by their keys)."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(old, list):
        return [NO_OLD] * len(value)
    keys = schema.get("x-kubernetes-list-map-keys") or []

    def key_of(item: Any) -> Any:
        return tuple(json.dumps(item.get(k)) for k in keys) if isinstance(item, dict) else None

    by_key = {key_of(item): item for item in old}
    return [by_key.get(key_of(item), NO_OLD) for item in value]


def validate_cel(
    schema: dict[str, Any], value: Any, path: str, errors: list[str], *, root: bool = False, old: Any = NO_OLD
) -> None:
    """Evaluate every x-kubernetes-validations rule at and below this node.

    `old` is the value before an update: transition rules (those that use oldSelf) run only where
    there is one, as the API server does; a create or an uncorrelatable value skips them."""
    if value is None:
        return
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and (old is NO_OLD or old is None):
            continue  # (optionalOldSelf is not supported: cel-python has no optional types)
        activation = {"self": to_cel(schema, value, root=root)}
        if transition:
            activation["oldSelf"] = to_cel(schema, old, root=root)
        try:
            result = compile_cel(rule["rule"]).evaluate(activation)
        except celpy.CELEvalError as error:
            errors.append(f"{path}: Invalid value: CEL evaluation error: {error.args[0]}")
            continue
        if not isinstance(result, celtypes.BoolType):
            errors.append(f"{path}: Invalid value: rule {rule['rule']!r} gave {result!r}, not a bool")
        elif not result:
            message = rule.get("message", f"failed rule: {rule['rule']}")
            if "messageExpression" in rule:
                message = str(compile_cel(rule["messageExpression"]).evaluate(activation))
            errors.append(f"{path}{rule.get('fieldPath', '')}: Invalid value: {message}")
    kind = schema.get("type")
    if kind == "object" and isinstance(value, dict):
        old_map = old if isinstance(old, dict) else {}
        for key, item in value.items():
            child = schema.get("properties", {}).get(key)
            if child is None and isinstance(schema.get("additionalProperties"), dict):
                child = schema["additionalProperties"]
            if child is not None:
                validate_cel(child, item, f"{path}.{key}", errors, old=old_map.get(key, NO_OLD))
    elif kind == "array" and isinstance(value, list):
        for index, (item, old_item) in enumerate(zip(value, _correlated_items(schema, value, old), strict=True)):
            validate_cel(schema["items"], item, f"{path}[{index}]", errors, old=old_item)


def admit(crd: dict[str, Any], obj: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """What `kubectl apply` of `obj` gets from an API server serving `crd`: (stored, errors)."""
    (version,) = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    obj = copy.deepcopy(obj)
    errors: list[str] = []
    if obj.get("apiVersion") != f"{crd['spec']['group']}/{version['name']}":
        errors.append(f"apiVersion: Invalid value: {obj.get('apiVersion')!r}")
    if obj.get("kind") != crd["spec"]["names"]["kind"]:
        errors.append(f"kind: Invalid value: {obj.get('kind')!r}")
    prune_unknown(schema, obj, "", errors)
    apply_defaults(schema, obj)
    validate_schema(schema, obj, "", errors)
    if not errors:
        # CEL sees typed values: it runs on an object that passed the schema.
        validate_cel(schema, obj, "", errors, root=True)
    return obj, [error.lstrip(".").removeprefix(": ") for error in errors]


def structural_problems(schema: dict[str, Any], path: str = "") -> list[str]:
    """Why a schema is not structural (in the sense the API server checks), or []."""
    problems: list[str] = []
    forbidden = {"$ref", "$defs", "definitions", "anyOf", "oneOf", "allOf", "not", "title", "const",
                 "uniqueItems", "patternProperties", "dependencies", "additionalItems", "id", "$schema"}  # fmt: skip
    for key in sorted(forbidden & set(schema)):
        problems.append(f"{path or '<root>'}: has {key}")
    if "type" not in schema and not (
        schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string")
    ):
        problems.append(f"{path or '<root>'}: no type")
    if schema.get("type") == "array" and "items" not in schema:
        problems.append(f"{path}: array without items")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{path}: both properties and additionalProperties")
    if schema.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties: false")
    if "default" in schema:
        node_errors: list[str] = []
        validate_schema(schema, copy.deepcopy(schema["default"]), path, node_errors)
        problems.extend(f"{path}: default does not validate: {e}" for e in node_errors)
    for name, prop in schema.get("properties", {}).items():
        problems.extend(structural_problems(prop, f"{path}.{name}"))
    if isinstance(schema.get("items"), dict):
        problems.extend(structural_problems(schema["items"], f"{path}[]"))
    if isinstance(schema.get("additionalProperties"), dict):
        problems.extend(structural_problems(schema["additionalProperties"], f"{path}.*"))
    return problems


def walk(schema: dict[str, Any], path: str = ""):
    """Every schema node with its path."""
    yield path, schema
    for name, prop in schema.get("properties", {}).items():
        yield from walk(prop, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}.*")
