"""
ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1) as kube-apiserver's admission plugin
applies it, for the emulated API server (tests/support/emulator.py).

For each policy that has bindings, in name order: the request must match the policy's
``matchConstraints`` (``resourceRules`` with ``*`` and ``resource/subresource`` forms, operations,
scope and resourceNames; ``excludeResourceRules``; ``namespaceSelector`` and ``objectSelector``,
absent or ``{}`` matching everything), then the binding's ``matchResources`` (absent: everything;
no resourceRules: every resource), then every ``matchCondition`` (one false: the policy does not
apply; an error, with none false: ``failurePolicy``). Then ``variables`` (in order; a failed one is
an error wherever it is used) and each validation: not true denies with ``messageExpression``
(a one-line string), else ``message``, else ``failed expression: <expr>``, and its ``reason``
(Invalid 422, Forbidden 403, Unauthorized 401, RequestEntityTooLarge 413); an expression that
fails denies under ``failurePolicy: Fail`` and is skipped under ``Ignore``. Only a binding whose
``validationActions`` hold ``Deny`` denies (``Warn`` becomes a warning, ``Audit`` nothing). The
first denial is the API server's 422 (or its reason's code): ``<resource> "<name>" is forbidden:
ValidatingAdmissionPolicy '<policy>' with binding '<binding>' denied request: <message>``.

CEL runs in cel-python, with cel-go's stricter has(), on the API server's variables: ``object``
and ``oldObject`` (null on CREATE; a custom resource's values typed by its schema), ``request``
(operation, userInfo, name, namespace, kind, resource, subResource, dryRun, ...),
``namespaceObject``, ``params`` (null) and ``variables`` (not in matchConditions, which run first,
as in Kubernetes). Creating a policy compiles every expression: syntax errors and
undeclared identifiers are 422 with the field, as on a real server.

Not emulated, and refused loudly where a test could rely on it: ``paramKind``/``paramRef`` and
the ``authorizer`` variable (refused at creation); DELETE and CONNECT (never evaluated);
``matchPolicy: Equivalent`` (rules match the request's own group/version only); auditAnnotations
(compiled, never published); cost budgets; CEL type checking (cel-python is dynamic, so a type
error shows only when evaluated); the Kubernetes CEL libraries beyond the standard ones
(``isSorted`` only, tests/support/openapi.py).
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import celpy
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError, Evaluator
from lark import Token, Tree

from tests.support import openapi, rbac

JsonDict = dict[str, Any]

GROUP = "admissionregistration.k8s.io"
VERSION = "v1"
POLICIES = "validatingadmissionpolicies"
BINDINGS = "validatingadmissionpolicybindings"
# Admission configuration is never subject to admission (rules.IsExemptAdmissionConfigurationResource):
# a broken policy must stay fixable.
_EXEMPT = {
    POLICIES,
    BINDINGS,
    "validatingwebhookconfigurations",
    "mutatingwebhookconfigurations",
    "mutatingadmissionpolicies",
    "mutatingadmissionpolicybindings",
}

REASON_CODES = {"Invalid": 422, "Forbidden": 403, "Unauthorized": 401, "RequestEntityTooLarge": 413}
_OPERATIONS = {"CREATE", "UPDATE", "DELETE", "CONNECT", "*"}
_ACTIONS = {"Deny", "Warn", "Audit"}
_SELECTOR_OPERATORS = {"In", "NotIn", "Exists", "DoesNotExist"}
# celconfig.MaxEvaluatedMessageExpressionSizeBytes: a longer message is not used.
_MAX_MESSAGE_BYTES = 5 * 1024

# What every expression may name (the API server's declarations), besides `variables`.
_DECLARED = {"object", "oldObject", "request", "params", "namespaceObject", "authorizer"}
_TYPE_NAMES = {"bool", "bytes", "double", "duration", "dyn", "int", "list", "map", "null_type", "string"}
_TYPE_NAMES |= {"timestamp", "type", "uint"}
_MACROS = {"all", "exists", "exists_one", "map", "filter"}
_IDENTIFIER = re.compile(r"^[_a-zA-Z][_a-zA-Z0-9]*$")
_QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_ACTIVATION_NOISE = re.compile(r" \(in activation .*", re.DOTALL)


# ---------------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------------


class _StrictEvaluator(Evaluator):
    """cel-python's evaluator with cel-go's has(): has(e.f) evaluates e, and is an error when e fails
    or is no map (null included), where cel-python would say false. So a policy that reads
    `has(oldObject.metadata.annotations)` on a CREATE fails here as it does in the API server."""

    def macro_has_eval(self, exprlist: Tree[Any]) -> Any:
        node: Any = exprlist.children[0] if exprlist.children else None
        while isinstance(node, Tree) and node.data != "member_dot" and len(node.children) == 1:
            node = node.children[0]
        if not isinstance(node, Tree) or node.data != "member_dot":
            return CELEvalError("invalid argument to has() macro")
        target, field = self.visit(node.children[0]), str(node.children[1])
        if isinstance(target, CELEvalError):
            return target
        if isinstance(target, celtypes.MapType):
            return celtypes.BoolType(celtypes.StringType(field) in target)
        return CELEvalError(f"invalid type for field selection: has() of {field!r} on {type(target).__name__}")

    def sub_evaluator(self, ast: Tree[Any]) -> Evaluator:  # the bodies of macros (exists, all, map...)
        return _StrictEvaluator(ast, activation=self.activation)


class _StrictRunner(celpy.InterpretedRunner):
    def evaluate(self, context: Any) -> Any:
        return _StrictEvaluator(ast=self.ast, activation=self.new_activation()).evaluate(context)


_ENV = celpy.Environment(runner_class=_StrictRunner)


@attrs.frozen
class _Program:
    expression: str
    runner: celpy.Runner | None
    error: str | None  # "compilation failed: ..." when it does not compile
    references: frozenset[str] = frozenset()  # the top-level names it uses


def _identifiers(tree: Tree[Any]) -> tuple[list[Token], set[str]]:
    """The identifiers an expression references (tokens, for their position) and its macros' loop variables."""
    references: list[Token] = []
    loop_variables: set[str] = set()
    for node in tree.iter_subtrees():
        if node.data == "ident" and node.children and isinstance(node.children[0], Token):
            references.append(node.children[0])
        elif node.data == "member_dot_arg" and len(node.children) >= 3 and str(node.children[1]) in _MACROS:
            arguments = node.children[2]
            if isinstance(arguments, Tree) and arguments.children and isinstance(arguments.children[0], Tree):
                loop_variables |= {str(t.children[0]) for t in arguments.children[0].find_data("ident")}
    return references, loop_variables


@functools.lru_cache(maxsize=4096)
def compile_expression(expression: str, *, with_variables: bool = True) -> _Program:
    """Compile once per text (and environment): matchConditions see no `variables`."""
    try:
        tree = _ENV.compile(expression)
    except CELParseError as e:
        line, column = getattr(e, "line", None) or 1, getattr(e, "column", None) or 1
        return _Program(expression, None, f"compilation failed: ERROR: <input>:{line}:{column}: Syntax error")
    declared = _DECLARED | _TYPE_NAMES | ({"variables"} if with_variables else set())
    references, loop_variables = _identifiers(tree)
    for token in references:
        if str(token) not in declared | loop_variables:
            return _Program(
                expression,
                None,
                f"compilation failed: ERROR: <input>:{token.line}:{token.column}: "
                f"undeclared reference to '{token}' (in container '')",
            )
    runner = _ENV.program(tree, functions=dict(openapi.K8S_FUNCTIONS))
    return _Program(expression, runner, None, frozenset(str(token) for token in references))


# ---------------------------------------------------------------------------------------------
# Validation and defaulting of the objects themselves (what the API server's strategy does)
# ---------------------------------------------------------------------------------------------


def default_policy(policy: JsonDict) -> None:
    """The API server's defaults for a ValidatingAdmissionPolicy (in place)."""
    spec = policy.setdefault("spec", {})
    spec.setdefault("failurePolicy", "Fail")
    if isinstance(spec.get("matchConstraints"), dict):
        _default_match_resources(spec["matchConstraints"])


def default_binding(binding: JsonDict) -> None:
    """The API server's defaults for a ValidatingAdmissionPolicyBinding (in place)."""
    spec = binding.setdefault("spec", {})
    if isinstance(spec.get("matchResources"), dict):
        _default_match_resources(spec["matchResources"])


def _default_match_resources(match: JsonDict) -> None:
    match.setdefault("matchPolicy", "Equivalent")
    match.setdefault("namespaceSelector", {})
    match.setdefault("objectSelector", {})
    for key in ("resourceRules", "excludeResourceRules"):
        for rule in match.get(key) or []:
            if isinstance(rule, dict):
                rule.setdefault("scope", "*")


def _expression_errors(field: str, expression: Any, *, with_variables: bool = True) -> list[str]:
    if not isinstance(expression, str) or not expression.strip():
        return [f"{field}: Required value"]
    program = compile_expression(expression, with_variables=with_variables)
    if program.error is not None:
        return [f"{field}: Invalid value: {_quote(expression)}: {program.error}"]
    if "authorizer" in program.references:
        return [f"{field}: Forbidden: the emulated API server does not support the authorizer variable"]
    return []


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _selector_errors(field: str, selector: Any) -> list[str]:
    if selector is None:
        return []
    if not isinstance(selector, dict):
        return [f"{field}: Invalid value: must be a label selector"]
    errors = []
    for index, requirement in enumerate(selector.get("matchExpressions") or []):
        operator = requirement.get("operator")
        values = requirement.get("values") or []
        where = f"{field}.matchExpressions[{index}]"
        if operator not in _SELECTOR_OPERATORS:
            errors.append(f"{where}.operator: Invalid value: {_quote(str(operator))}: not a valid selector operator")
        elif operator in ("In", "NotIn") and not values:
            errors.append(f"{where}.values: Required value: must be specified when `operator` is 'In' or 'NotIn'")
        elif operator in ("Exists", "DoesNotExist") and values:
            errors.append(
                f"{where}.values: Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'"
            )
    return errors


def _rule_errors(field: str, rules: Any) -> list[str]:
    errors = []
    for index, rule in enumerate(rules or []):
        where = f"{field}[{index}]"
        for key in ("apiGroups", "apiVersions", "resources", "operations"):
            if not rule.get(key):
                errors.append(f"{where}.{key}: Required value")
        for operation in rule.get("operations") or []:
            if operation not in _OPERATIONS:
                errors.append(
                    f'{where}.operations: Unsupported value: "{operation}": supported values: '
                    '"*", "CONNECT", "CREATE", "DELETE", "UPDATE"'
                )
        if rule.get("scope", "*") not in ("*", "Cluster", "Namespaced"):
            errors.append(f'{where}.scope: Unsupported value: "{rule["scope"]}"')
    return errors


def _match_errors(field: str, match: Any, *, rules_required: bool) -> list[str]:
    if match is None:
        return [f"{field}: Required value"] if rules_required else []
    errors = []
    if rules_required and not match.get("resourceRules"):
        errors.append(f"{field}.resourceRules: Required value")
    errors += _rule_errors(f"{field}.resourceRules", match.get("resourceRules"))
    errors += _rule_errors(f"{field}.excludeResourceRules", match.get("excludeResourceRules"))
    errors += _selector_errors(f"{field}.namespaceSelector", match.get("namespaceSelector"))
    errors += _selector_errors(f"{field}.objectSelector", match.get("objectSelector"))
    if match.get("matchPolicy", "Equivalent") not in ("Equivalent", "Exact"):
        errors.append(f'{field}.matchPolicy: Unsupported value: "{match["matchPolicy"]}"')
    return errors


def policy_errors(policy: Mapping[str, Any]) -> list[str]:
    """Why the API server would refuse this ValidatingAdmissionPolicy ("<field>: <what>"), or []."""
    spec = policy.get("spec") or {}
    errors = []
    if spec.get("paramKind") is not None:
        errors.append("spec.paramKind: Forbidden: the emulated API server does not support paramKind")
    if spec.get("failurePolicy") not in ("Fail", "Ignore"):
        errors.append(
            f'spec.failurePolicy: Unsupported value: "{spec.get("failurePolicy")}": supported values: "Fail", "Ignore"'
        )
    errors += _match_errors("spec.matchConstraints", spec.get("matchConstraints"), rules_required=True)
    if not spec.get("validations") and not spec.get("auditAnnotations"):
        errors.append(
            "spec.validations: Required value: validations or auditAnnotations must contain at least one item"
        )
    names: set[str] = set()
    for index, condition in enumerate(spec.get("matchConditions") or []):
        where = f"spec.matchConditions[{index}]"
        name = condition.get("name")
        if not name:
            errors.append(f"{where}.name: Required value")
        elif not _QUALIFIED_NAME.match(name) or len(name) > 63:
            errors.append(f"{where}.name: Invalid value: {_quote(name)}: must be a qualified name")
        elif name in names:
            errors.append(f"{where}.name: Duplicate value: {_quote(name)}")
        names.add(name or "")
        errors += _expression_errors(f"{where}.expression", condition.get("expression"), with_variables=False)
    variables: set[str] = set()
    for index, variable in enumerate(spec.get("variables") or []):
        where = f"spec.variables[{index}]"
        name = variable.get("name")
        if not name:
            errors.append(f"{where}.name: Required value")
        elif not _IDENTIFIER.match(name):
            errors.append(f"{where}.name: Invalid value: {_quote(name)}: name is not a valid CEL identifier")
        elif name in variables:
            errors.append(f"{where}.name: Duplicate value: {_quote(name)}")
        variables.add(name or "")
        errors += _expression_errors(f"{where}.expression", variable.get("expression"))
    for index, validation in enumerate(spec.get("validations") or []):
        where = f"spec.validations[{index}]"
        errors += _expression_errors(f"{where}.expression", validation.get("expression"))
        if validation.get("messageExpression") is not None:
            errors += _expression_errors(f"{where}.messageExpression", validation["messageExpression"])
        if validation.get("reason") is not None and validation["reason"] not in REASON_CODES:
            errors.append(
                f'{where}.reason: Unsupported value: "{validation["reason"]}": supported values: '
                '"Forbidden", "Invalid", "RequestEntityTooLarge", "Unauthorized"'
            )
    for index, annotation in enumerate(spec.get("auditAnnotations") or []):
        where = f"spec.auditAnnotations[{index}]"
        if not annotation.get("key"):
            errors.append(f"{where}.key: Required value")
        errors += _expression_errors(f"{where}.valueExpression", annotation.get("valueExpression"))
    return errors


def binding_errors(binding: Mapping[str, Any]) -> list[str]:
    """Why the API server would refuse this ValidatingAdmissionPolicyBinding, or []."""
    spec = binding.get("spec") or {}
    errors = []
    if not spec.get("policyName"):
        errors.append("spec.policyName: Required value")
    actions = spec.get("validationActions") or []
    if not actions:
        errors.append("spec.validationActions: Required value: at least one validation action is required")
    for index, action in enumerate(actions):
        if action not in _ACTIONS:
            errors.append(
                f'spec.validationActions[{index}]: Unsupported value: "{action}": supported values: '
                '"Audit", "Deny", "Warn"'
            )
        elif action in actions[:index]:
            errors.append(f'spec.validationActions[{index}]: Duplicate value: "{action}"')
    if "Deny" in actions and "Warn" in actions:
        errors.append(
            "spec.validationActions: Invalid value: "
            '["Deny","Warn"]: must not contain both Deny and Warn (repeating the same validation failure '
            "information in the API response and headers serves no purpose)"
        )
    if spec.get("paramRef") is not None:
        errors.append("spec.paramRef: Forbidden: the emulated API server does not support paramRef")
    errors += _match_errors("spec.matchResources", spec.get("matchResources"), rules_required=False)
    return errors


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Request:
    """What the admission plugin sees of one write (admission.Attributes)."""

    operation: str  # CREATE or UPDATE (a PATCH is an UPDATE)
    user: rbac.User
    group: str
    version: str
    resource: str  # the plural
    kind: str
    object: JsonDict | None
    old_object: JsonDict | None = None
    subresource: str = ""
    namespace: str = ""  # a Namespace's own name for namespaces; "" for other cluster-scoped objects
    name: str = ""  # as the request names it: "" on a create by generateName
    dry_run: bool = False
    namespace_object: JsonDict | None = None  # the request's Namespace, if it exists
    schema: JsonDict | None = None  # a custom resource's openAPIV3Schema: CEL sees its values typed by it


@attrs.frozen
class Denial:
    """The first denial: `message` is the plugin's ("ValidatingAdmissionPolicy ... denied request: ...")."""

    policy: str
    binding: str
    reason: str
    message: str

    @property
    def code(self) -> int:
        return REASON_CODES.get(self.reason, 422)


@attrs.frozen
class Result:
    denial: Denial | None = None
    warnings: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.denial is None


def _rule_matches(rule: Mapping[str, Any], request: Request) -> bool:
    """rules.Matcher: operations, apiGroups, apiVersions, resources ("*", "res/sub", "*/*"), scope."""
    operations = rule.get("operations") or []
    if "*" not in operations and request.operation not in operations:
        return False
    groups, versions = rule.get("apiGroups") or [], rule.get("apiVersions") or []
    if "*" not in groups and request.group not in groups:
        return False
    if "*" not in versions and request.version not in versions:
        return False
    for text in rule.get("resources") or []:
        resource, _, subresource = str(text).partition("/")
        if resource in ("*", request.resource) and subresource in ("*", request.subresource):
            break
    else:
        return False
    scope = rule.get("scope") or "*"
    is_namespace = (request.group, request.resource) == ("", "namespaces")
    if scope == "Namespaced":
        return not is_namespace and bool(request.namespace)
    if scope == "Cluster":
        return is_namespace or not request.namespace
    return True


def _rules_match(rules: Iterable[Mapping[str, Any]], request: Request) -> bool:
    for rule in rules:
        if _rule_matches(rule, request):
            names = rule.get("resourceNames") or []
            if not names or request.name in names:
                return True
    return False


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str] | None) -> bool:
    """metav1.LabelSelectorAsSelector(selector).Matches(labels); absent or {} selects everything."""
    labels = labels or {}
    for key, value in ((selector or {}).get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for requirement in (selector or {}).get("matchExpressions") or []:
        key, operator, values = requirement["key"], requirement["operator"], requirement.get("values") or []
        if operator == "In" and not (key in labels and labels[key] in values):
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
        if operator not in _SELECTOR_OPERATORS:
            raise ValueError(f"{operator!r} is not a valid label selector operator")
    return True


def _labels(obj: Mapping[str, Any] | None) -> Mapping[str, str] | None:
    return None if obj is None else (obj.get("metadata") or {}).get("labels") or {}


def _namespace_matches(selector: Mapping[str, Any] | None, request: Request) -> bool:
    is_namespace = (request.group, request.resource) == ("", "namespaces")
    if not request.namespace and not is_namespace:
        return True  # cluster-scoped objects other than namespaces are never exempted
    if not selector:
        return True
    if is_namespace and not request.subresource and request.operation in ("CREATE", "UPDATE"):
        return selector_matches(selector, _labels(request.object))  # the namespace as it is being written
    return selector_matches(selector, _labels(request.namespace_object))


def _object_matches(selector: Mapping[str, Any] | None, request: Request) -> bool:
    if not selector:
        return True
    return any(
        obj is not None and selector_matches(selector, _labels(obj)) for obj in (request.object, request.old_object)
    )


def _resources_match(match: Mapping[str, Any] | None, request: Request) -> bool:
    """Matcher.Matches: namespaceSelector, objectSelector, excludeResourceRules, resourceRules."""
    if match is None:
        return True
    if not _namespace_matches(match.get("namespaceSelector"), request):
        return False
    if not _object_matches(match.get("objectSelector"), request):
        return False
    if _rules_match(match.get("excludeResourceRules") or [], request):
        return False
    rules = match.get("resourceRules") or []
    return not rules or _rules_match(rules, request)


# ---------------------------------------------------------------------------------------------
# Evaluating
# ---------------------------------------------------------------------------------------------


def _object_to_cel(schema: Mapping[str, Any] | None, value: Any) -> Any:
    """A value as CEL sees it: typed by a custom resource's schema where it has one (a `number` is a
    double even when written as 3), as it is elsewhere (metadata, preserve-unknown-fields)."""
    if value is None:
        return None
    kind = (schema or {}).get("type")
    if kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return celtypes.DoubleType(float(value))
    if kind == "array" and isinstance(value, list):
        return celtypes.ListType([_object_to_cel((schema or {}).get("items"), item) for item in value])
    if kind == "object" and isinstance(value, dict):
        properties, extra = (schema or {}).get("properties") or {}, (schema or {}).get("additionalProperties")
        return celtypes.MapType(
            {
                celtypes.StringType(key): _object_to_cel(
                    properties.get(key) if key in properties else extra if isinstance(extra, dict) else None, item
                )
                for key, item in value.items()
            }
        )
    return json_to_cel(value)


def _request_to_cel(request: Request) -> Any:
    kind = {"group": request.group, "version": request.version, "kind": request.kind}
    resource = {"group": request.group, "version": request.version, "resource": request.resource}
    options_kind = {"CREATE": "CreateOptions", "UPDATE": "UpdateOptions"}.get(request.operation, "DeleteOptions")
    return json_to_cel(
        {
            "uid": str(uuid.uuid4()),
            "kind": kind,
            "resource": resource,
            "subResource": request.subresource,
            "requestKind": kind,
            "requestResource": resource,
            "requestSubResource": request.subresource,
            "name": request.name,
            "namespace": request.namespace,
            "operation": request.operation,
            "userInfo": {"username": request.user.name, "uid": "", "groups": list(request.user.groups), "extra": {}},
            "dryRun": request.dry_run,
            "options": {"kind": options_kind, "apiVersion": "meta.k8s.io/v1"},
        }
    )


def _error_detail(error: CELEvalError) -> str:
    detail = str(error.args[0]) if error.args else str(error)
    detail = _ACTIVATION_NOISE.sub("", detail)
    if detail == "no such key" and len(error.args) > 2 and error.args[2]:
        detail = f"no such key: {error.args[2][0]}"
    return detail


class _EvaluationError(Exception):
    pass


def _evaluate(program: _Program, activation: Mapping[str, Any]) -> Any:
    """The expression's value; _EvaluationError with the API server's wording when it fails."""
    if program.runner is None:
        raise _EvaluationError(f"expression '{program.expression}' {program.error}")
    try:
        return program.runner.evaluate(dict(activation))
    except CELEvalError as e:
        raise _EvaluationError(f"expression '{program.expression}' resulted in error: {_error_detail(e)}") from None


@attrs.frozen
class _Decision:
    deny: bool
    message: str = ""
    reason: str = ""  # "" on an evaluation error: the denial is Invalid


def _aggregate(errors: list[str]) -> str:
    return errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"


def _policy_decisions(spec: Mapping[str, Any], request: Request) -> list[_Decision]:
    """What the policy's validator decides: [] when a matchCondition is false (nothing evaluated)."""
    fail = (spec.get("failurePolicy") or "Fail") == "Fail"

    def on_error(message: str) -> list[_Decision]:
        return [_Decision(deny=True, message=message)] if fail else []

    activation: dict[str, Any] = {
        "object": _object_to_cel(request.schema, request.object),
        "oldObject": _object_to_cel(request.schema, request.old_object),
        "request": _request_to_cel(request),
        "namespaceObject": json_to_cel(request.namespace_object) if request.namespace_object else None,
        "params": None,
    }
    errors = []
    for condition in spec.get("matchConditions") or []:
        program = compile_expression(condition["expression"], with_variables=False)
        try:
            result = _evaluate(program, activation)
        except _EvaluationError as e:
            errors.append(str(e))
            continue
        if isinstance(result, celtypes.BoolType) and not result:
            return []  # one false condition: the policy does not apply, whatever the others did
    if errors:
        return on_error(_aggregate(errors))

    # Variables in order, each seeing the earlier ones; a failure is kept as CEL's error value, so
    # it fails exactly the expressions that use it.
    variables: dict[Any, Any] = {}
    for variable in spec.get("variables") or []:
        program = compile_expression(variable["expression"])
        value: Any = CELEvalError(program.error)
        if program.runner is not None:
            try:
                value = program.runner.evaluate({**activation, "variables": celtypes.MapType(dict(variables))})
            except CELEvalError as e:
                value = e
        variables[celtypes.StringType(variable["name"])] = value
    activation["variables"] = celtypes.MapType(variables)

    decisions = []
    for validation in spec.get("validations") or []:
        try:
            result = _evaluate(compile_expression(validation["expression"]), activation)
        except _EvaluationError as e:
            decisions += on_error(str(e))
            continue
        if isinstance(result, celtypes.BoolType) and result:
            continue
        decisions.append(
            _Decision(
                deny=True,
                message=_failure_message(validation, activation),
                reason=validation.get("reason") or "Invalid",
            )
        )
    return decisions


def _failure_message(validation: Mapping[str, Any], activation: Mapping[str, Any]) -> str:
    """messageExpression's one-line string, else message, else the expression (validator.go)."""
    message = ""
    if validation.get("messageExpression"):
        try:
            value = _evaluate(compile_expression(validation["messageExpression"]), activation)
        except _EvaluationError:
            value = None  # the API server logs it and falls back
        if isinstance(value, str):
            message = value.strip()
            if len(message.encode()) > _MAX_MESSAGE_BYTES or "\n" in message:
                message = ""
    return (
        message
        or str(validation.get("message") or "").strip()
        or f"failed expression: {validation['expression'].strip()}"
    )


def evaluate(policies: Iterable[Mapping[str, Any]], bindings: Iterable[Mapping[str, Any]], request: Request) -> Result:
    """Admit or deny one CREATE or UPDATE against the stored policies and bindings."""
    if request.operation not in ("CREATE", "UPDATE"):
        return Result()
    if request.group == GROUP and request.resource in _EXEMPT:
        return Result()
    by_policy: dict[str, list[Mapping[str, Any]]] = {}
    for binding in bindings:
        by_policy.setdefault((binding.get("spec") or {}).get("policyName") or "", []).append(binding)
    denials: list[Denial] = []
    warnings: list[str] = []
    for policy in sorted(policies, key=lambda p: p["metadata"]["name"]):
        name = policy["metadata"]["name"]
        spec = policy.get("spec") or {}
        policy_bindings = sorted(by_policy.get(name, []), key=lambda b: b["metadata"]["name"])
        if not policy_bindings:
            continue
        if spec.get("paramKind") is not None:
            raise NotImplementedError(
                f"ValidatingAdmissionPolicy {name!r} has a paramKind: the emulator cannot evaluate it"
            )
        if not spec.get("matchConstraints") or not _resources_match(spec["matchConstraints"], request):
            continue
        decisions: list[_Decision] | None = None  # no params: one evaluation serves every binding
        for binding in policy_bindings:
            binding_spec = binding.get("spec") or {}
            if not _resources_match(binding_spec.get("matchResources"), request):
                continue
            if decisions is None:
                decisions = _policy_decisions(spec, request)
            actions = binding_spec.get("validationActions") or []
            for decision in decisions:
                if not decision.deny:
                    continue
                if "Deny" in actions:
                    message = (
                        f"ValidatingAdmissionPolicy '{name}' with binding '{binding['metadata']['name']}' "
                        f"denied request: {decision.message}"
                    )
                    denials.append(Denial(name, binding["metadata"]["name"], decision.reason or "Invalid", message))
                if "Warn" in actions:
                    warnings.append(
                        f"Validation failed for ValidatingAdmissionPolicy '{name}' with binding "
                        f"'{binding['metadata']['name']}': {decision.message}"
                    )
    return Result(denial=denials[0] if denials else None, warnings=tuple(warnings))
