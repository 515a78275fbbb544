"""
Kubernetes resource quantities (k8s.io/apimachinery/pkg/api/resource) and the API server's checks
on container resources, for the emulated API server.

* :func:`parse_quantity` is a port of ``ParseQuantity`` (its scanner and suffixes): ``"500m"``,
  ``"1.5Gi"``, ``"1e3"``, ``2``; ``"4x"`` and ``"1.5.3"`` fail with the API server's own message.
  The API server fails such a value while decoding the request body, before any validation: a
  create or a replace is ``400 BadRequest`` ("Pod in version "v1" cannot be handled as a Pod:
  quantities must match the regular expression ..."), see :func:`undecodable_quantities`.
* :func:`resource_requirement_errors` is ``ValidateResourceRequirements``: resource names,
  non-negative values, integers for extended resources, requests no larger than limits (equal for
  resources that cannot be overcommitted, such as GPUs, which also need a limit); ``422 Invalid``
  with the field, e.g. ``spec.containers[0].resources.requests[cpu]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

FORMAT_WRONG = "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
SUFFIX_WRONG = "unable to parse quantity's suffix"

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_EXPONENT = re.compile(r"^[eE][-+]?[0-9]+$")
_SUFFIX_CHARS = set("eEinumkKMGTP")


class QuantityError(ValueError):
    pass


def _scan(text: str) -> tuple[str, str]:
    """(number, suffix) as ParseQuantity's scanner splits them; QuantityError if malformed."""
    pos, end = 0, len(text)
    if pos < end and text[0] in "+-":
        pos += 1
    while pos < end and text[pos] == "0":  # leading zeros
        pos += 1
    if pos >= end:
        return text, ""
    while pos < end and text[pos].isdigit():
        pos += 1
    if pos < end and text[pos] == ".":
        pos += 1
        while pos < end and text[pos].isdigit():
            pos += 1
    number, suffix_start = text[:pos], pos
    while pos < end and text[pos] in _SUFFIX_CHARS:
        pos += 1
    if pos < end and text[pos] in "+-":
        pos += 1
    while pos < end and text[pos].isdigit():
        pos += 1
    if pos < end:
        raise QuantityError(FORMAT_WRONG)
    return number, text[suffix_start:]


def parse_quantity(value: Any) -> Decimal:
    """A quantity's exact value, from a JSON string or number (as Quantity.UnmarshalJSON reads it)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise QuantityError(FORMAT_WRONG)
    text = value.strip() if isinstance(value, str) else json.dumps(value)
    if not text:
        raise QuantityError(FORMAT_WRONG)
    number, suffix = _scan(text)
    digits = number.lstrip("+-")
    if digits in ("", ".") or not any(c.isdigit() for c in digits):
        digits = "0"
    amount = Decimal(digits if not digits.endswith(".") else digits + "0")
    if number.startswith("-"):
        amount = -amount
    if suffix in _BINARY:
        return amount * _BINARY[suffix]
    if suffix in _DECIMAL:
        return amount.scaleb(_DECIMAL[suffix])
    if _EXPONENT.match(suffix):
        return amount.scaleb(int(suffix[1:]))
    raise QuantityError(SUFFIX_WRONG)


# ---------------------------------------------------------------------------------------------
# Where pods and pod templates carry quantities
# ---------------------------------------------------------------------------------------------

_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


def _pod_quantities(pod_spec: Any, path: str) -> Iterator[tuple[str, Any]]:
    if not isinstance(pod_spec, dict):
        return
    for list_name in _CONTAINER_LISTS:
        for index, container in enumerate(pod_spec.get(list_name) or []):
            resources = container.get("resources") if isinstance(container, dict) else None
            for kind in ("limits", "requests"):
                values = resources.get(kind) if isinstance(resources, dict) else None
                for name, value in (values or {}).items() if isinstance(values, dict) else ():
                    yield f"{path}.{list_name}[{index}].resources.{kind}[{name}]", value
    for name, value in (pod_spec.get("overhead") or {}).items():
        yield f"{path}.overhead[{name}]", value
    for index, volume in enumerate(pod_spec.get("volumes") or []):
        empty_dir = volume.get("emptyDir") if isinstance(volume, dict) else None
        if isinstance(empty_dir, dict) and "sizeLimit" in empty_dir:
            yield f"{path}.volumes[{index}].emptyDir.sizeLimit", empty_dir["sizeLimit"]


def pod_spec_paths(group: str, plural: str, obj: dict[str, Any]) -> list[tuple[str, Any]]:
    """(field path, pod spec) of the pod specs in a Pod or a Job."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return []
    if (group, plural) == ("", "pods"):
        return [("spec", spec)]
    if (group, plural) == ("batch", "jobs"):
        template = spec.get("template")
        return [("spec.template.spec", template.get("spec"))] if isinstance(template, dict) else []
    return []


def undecodable_quantities(group: str, plural: str, obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, the parser's message) for every quantity the API server could not even decode."""
    problems = []
    for path, pod_spec in pod_spec_paths(group, plural, obj):
        for field, value in _pod_quantities(pod_spec, path):
            if value is None:
                continue
            try:
                parse_quantity(value)
            except QuantityError as error:
                problems.append((field, str(error)))
    return problems


# ---------------------------------------------------------------------------------------------
# ValidateResourceRequirements
# ---------------------------------------------------------------------------------------------

_STANDARD_CONTAINER_RESOURCES = {"cpu", "memory", "ephemeral-storage"}
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _is_native(name: str) -> bool:
    return "/" not in name or name.split("/", 1)[0].endswith("kubernetes.io")


def _is_hugepages(name: str) -> bool:
    return name.startswith("hugepages-")


def _overcommit_allowed(name: str) -> bool:
    return _is_native(name) and not _is_hugepages(name)


def _is_integer_resource(name: str) -> bool:
    return not _is_native(name)  # extended resources (and attachable volumes, not emulated)


def _name_errors(name: str, field: str) -> list[str]:
    prefix, _, short = name.rpartition("/")
    well_formed = (
        bool(_QUALIFIED_NAME.match(short))
        and len(short) <= 63
        and (not prefix or (bool(_DNS_SUBDOMAIN.match(prefix)) and len(prefix) <= 253))
    )
    if not well_formed:
        return [f"{field}: Invalid value: {json.dumps(name)}: name part must consist of alphanumeric characters"]
    if "/" not in name and name not in _STANDARD_CONTAINER_RESOURCES and not _is_hugepages(name):
        return [f"{field}: Invalid value: {json.dumps(name)}: must be a standard resource for containers"]
    return []


def _requirements_errors(resources: dict[str, Any], path: str) -> list[str]:
    errors: list[str] = []
    parsed: dict[str, dict[str, Decimal]] = {"limits": {}, "requests": {}}
    for kind in ("limits", "requests"):
        values = resources.get(kind)
        for name, raw in values.items() if isinstance(values, dict) else ():
            if raw is None:
                continue
            field = f"{path}.{kind}[{name}]"
            errors += _name_errors(name, field)
            value = parse_quantity(raw)
            parsed[kind][name] = value
            if value < 0:
                errors.append(f"{field}: Invalid value: {json.dumps(str(raw))}: must be greater than or equal to 0")
            if _is_integer_resource(name) and value != value.to_integral_value():
                errors.append(f"{field}: Invalid value: {json.dumps(str(raw))}: must be an integer")
    for name, request in parsed["requests"].items():
        limit = parsed["limits"].get(name)
        raw_request = resources["requests"][name]
        if limit is not None:
            raw_limit = resources["limits"][name]
            if request != limit and not _overcommit_allowed(name):
                errors.append(
                    f"{path}.requests: Invalid value: {json.dumps(str(raw_request))}: "
                    f"must be equal to {name} limit of {raw_limit}"
                )
            elif request > limit:
                errors.append(
                    f"{path}.requests: Invalid value: {json.dumps(str(raw_request))}: "
                    f"must be less than or equal to {name} limit of {raw_limit}"
                )
        elif not _overcommit_allowed(name):
            errors.append(f"{path}.limits: Required value: Limit must be set for non overcommitable resources")
    return errors


def resource_requirement_errors(group: str, plural: str, obj: dict[str, Any]) -> list[str]:
    """Field errors ("<field>: <what>") for the container resources of a Pod or a Job's template.
    Call only on objects whose quantities decode (see :func:`undecodable_quantities`)."""
    errors: list[str] = []
    for path, pod_spec in pod_spec_paths(group, plural, obj):
        if not isinstance(pod_spec, dict):
            continue
        for list_name in _CONTAINER_LISTS:
            for index, container in enumerate(pod_spec.get(list_name) or []):
                resources = container.get("resources") if isinstance(container, dict) else None
                if isinstance(resources, dict):
                    errors += _requirements_errors(resources, f"{path}.{list_name}[{index}].resources")
    return errors
