"""ValidatingAdmissionPolicy in the emulated API server: the chart's sign-off policy for real, and the
evaluator (tests/support/admission.py) on hand-written policies."""

from __future__ import annotations

import json
from typing import Any

import kubernetes
import pytest
from kubernetes.client import ApiException

from tests.support import admission, rbac
from tests.support.chart import OperatorRelease
from tests.support.kube import Kube
from trainpilot.api import contract

GROUP, VERSION, PLURAL = contract.GROUP, contract.VERSION, contract.EXPERIMENT_PLURAL
APPROVE, REJECT, BY = contract.ANNOTATION_APPROVE, contract.ANNOTATION_REJECT, contract.ANNOTATION_APPROVED_BY
POLICY = "tp-trainpilot-approvals"  # the default release ("tp") of tests.support.chart
VAP_PATH = f"/apis/{admission.GROUP}/v1/validatingadmissionpolicies"
BINDING_PATH = f"/apis/{admission.GROUP}/v1/validatingadmissionpolicybindings"
EXPERIMENTS = f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}"
TOKENS = {"alice": "alice-token", "bob": "bob-token"}
ALICE, BOB = rbac.User("alice", (rbac.AUTHENTICATED,)), rbac.User("bob", (rbac.AUTHENTICATED,))


@pytest.fixture
def kube_crd_paths() -> list[str]:
    return ["crds/"]


def refusal(user: str) -> str:
    """The chart's denial of a sign-off that does not name `user`, word for word."""
    return (
        f"ValidatingAdmissionPolicy '{POLICY}' with binding '{POLICY}' denied request: "
        f"{BY} must be the requesting user '{user}' (use `trainpilot approve` or `trainpilot reject`, "
        f"which set it, or add {BY}={user})"
    )


@pytest.fixture
def people(kube: Kube) -> dict[str, kubernetes.client.CustomObjectsApi]:
    """alice and bob: authenticated by token, allowed (by an admin's Role) to create and patch experiments."""
    kube.call(lambda: kube.emulator.tokens.update({TOKENS["alice"]: ALICE, TOKENS["bob"]: BOB}))
    kube.apply(
        [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "experimenters", "namespace": "default"},
                "rules": [{"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "create", "patch"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "experimenters", "namespace": "default"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "experimenters"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": n} for n in TOKENS],
            },
        ]
    )
    clients = {}
    for name, token in TOKENS.items():
        config = kubernetes.client.Configuration(
            host=kube.url, api_key={"authorization": token}, api_key_prefix={"authorization": "Bearer"}
        )
        clients[name] = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(config))
    return clients


def experiment(name: str = "exp", annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, **({"annotations": annotations} if annotations else {})}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AgentExperiment",
        "metadata": meta,
        "spec": {"searchSpace": [{"name": "lr", "min": 0.001, "max": 0.1}]},
    }


def annotate(client: kubernetes.client.CustomObjectsApi, changes: dict[str, str | None]) -> dict[str, Any]:
    return client.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "exp", {"metadata": {"annotations": changes}}
    )


def refused(call: Any, *args: Any) -> dict[str, Any]:
    """The Status body of a call that must fail."""
    with pytest.raises(ApiException) as error:
        call(*args)
    return {"code": error.value.status, **json.loads(error.value.body)}


def stored(kube: Kube) -> dict[str, Any]:
    return kube.custom().get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "exp")


# ---------------------------------------------------------------------------------------------
# The chart's policy, installed as Helm installs it, against real kubernetes-client requests
# ---------------------------------------------------------------------------------------------


def test_the_chart_installs_the_policy_and_its_binding_cluster_wide(kube: Kube) -> None:
    status, discovery = kube.request("GET", f"/apis/{admission.GROUP}/v1")
    resources = {r["name"]: r for r in discovery["resources"]}
    assert resources["validatingadmissionpolicies"]["kind"] == "ValidatingAdmissionPolicy"
    assert resources["validatingadmissionpolicybindings"]["kind"] == "ValidatingAdmissionPolicyBinding"
    assert not resources["validatingadmissionpolicies"]["namespaced"]
    assert not resources["validatingadmissionpolicybindings"]["namespaced"]
    (policy,) = kube.request("GET", VAP_PATH)[1]["items"]
    (binding,) = kube.request("GET", BINDING_PATH)[1]["items"]
    assert policy["metadata"]["name"] == POLICY and policy["spec"]["failurePolicy"] == "Fail"
    assert policy["spec"]["matchConstraints"]["matchPolicy"] == "Equivalent"  # the API server's default
    assert binding["spec"] == {"policyName": POLICY, "validationActions": ["Deny"]}


def test_a_user_signs_off_in_her_own_name(kube: Kube, people: dict) -> None:
    kube.custom().create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, experiment())
    signed = annotate(people["alice"], {APPROVE: "d1", BY: "alice"})
    assert signed["metadata"]["annotations"] == {APPROVE: "d1", BY: "alice"}
    signed = annotate(people["alice"], {REJECT: "d2"})  # approved-by still names her
    assert signed["metadata"]["annotations"] == {APPROVE: "d1", REJECT: "d2", BY: "alice"}
    assert stored(kube)["metadata"]["annotations"] == {APPROVE: "d1", REJECT: "d2", BY: "alice"}


@pytest.mark.parametrize(
    "changes",
    [{APPROVE: "d1", BY: "bob"}, {APPROVE: "d1"}, {REJECT: "d1", BY: "bob"}, {REJECT: "d1"}, {BY: "bob"}],
    ids=["approve-as-bob", "approve-unsigned", "reject-as-bob", "reject-unsigned", "approved-by-alone"],
)
def test_a_sign_off_in_anyone_elses_name_is_refused_and_changes_nothing(
    kube: Kube, people: dict, changes: dict
) -> None:
    before = kube.custom().create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, experiment())
    reply = refused(annotate, people["alice"], changes)
    assert (reply["code"], reply["reason"]) == (422, "Invalid")
    assert reply["message"] == f'{PLURAL}.{GROUP} "exp" is forbidden: {refusal("alice")}'
    assert reply["details"] == {
        "name": "exp",
        "group": GROUP,
        "kind": PLURAL,
        "causes": [{"message": refusal("alice")}],
    }
    after = stored(kube)
    assert "annotations" not in after["metadata"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    # A dry run is admitted or refused exactly as the real request.
    status, reply = kube.request(
        "PATCH",
        f"{EXPERIMENTS}/exp",
        {"metadata": {"annotations": changes}},
        content_type="application/merge-patch+json",
        params={"dryRun": "All"},
        token=TOKENS["alice"],
    )
    assert status == 422 and reply["message"].endswith(refusal("alice"))


def test_removing_or_changing_a_sign_off_is_checked_too(kube: Kube, people: dict) -> None:
    kube.custom().create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, experiment())
    annotate(people["bob"], {APPROVE: "d1", BY: "bob"})
    # alice may not withdraw bob's approval, nor the signature alone, nor everything at once...
    for changes in ({APPROVE: None}, {BY: None}, {APPROVE: None, BY: None}, {BY: "bob", APPROVE: "d2"}):
        assert refused(annotate, people["alice"], changes)["details"]["causes"] == [{"message": refusal("alice")}]
    # ... nor with a JSON patch, nor as an admin replacing the whole object (PUT).
    ops = [{"op": "replace", "path": "/metadata/annotations/trainpilot.dev~1approve", "value": "d2"}]
    patch = people["alice"].patch_namespaced_custom_object
    assert refused(patch, GROUP, VERSION, "default", PLURAL, "exp", ops)["code"] == 422
    replaced = stored(kube)
    replaced["metadata"]["annotations"][REJECT] = "d1"
    reply = refused(kube.custom().replace_namespaced_custom_object, GROUP, VERSION, "default", PLURAL, "exp", replaced)
    assert reply["details"]["causes"] == [{"message": refusal("kubernetes-admin")}]
    assert stored(kube)["metadata"]["annotations"] == {APPROVE: "d1", BY: "bob"}
    # Signing as herself, she may withdraw it: the change is then on her name.
    assert annotate(people["alice"], {APPROVE: None, BY: "alice"})["metadata"]["annotations"] == {BY: "alice"}
    reply = refused(annotate, people["bob"], {BY: "bob-the-approver"})  # a changed signature is one
    assert reply["details"]["causes"] == [{"message": refusal("bob")}]
    assert annotate(people["bob"], {BY: "bob", REJECT: "d1"})["metadata"]["annotations"] == {BY: "bob", REJECT: "d1"}


def test_creating_an_experiment_with_a_sign_off_is_checked(kube: Kube, people: dict) -> None:
    create = people["alice"].create_namespaced_custom_object
    for signed in ({APPROVE: "d1", BY: "bob"}, {REJECT: "d1"}, {BY: "bob"}):
        reply = refused(create, GROUP, VERSION, "default", PLURAL, experiment(annotations=signed))
        assert reply["code"] == 422 and reply["message"] == f'{PLURAL}.{GROUP} "exp" is forbidden: {refusal("alice")}'
        assert kube.request("GET", f"{EXPERIMENTS}/exp")[0] == 404  # nothing was stored
    created = create(GROUP, VERSION, "default", PLURAL, experiment(annotations={APPROVE: "d1", BY: "alice"}))
    assert created["metadata"]["annotations"] == {APPROVE: "d1", BY: "alice"}
    # Unrelated annotations on a create are none of the policy's business.
    other = experiment("other", annotations={contract.ANNOTATION_LAST_DECISION: "x"})
    assert create(GROUP, VERSION, "default", PLURAL, other)["metadata"]["name"] == "other"


def test_the_operator_does_its_bookkeeping_next_to_a_sign_off_but_cannot_sign(kube: Kube, people: dict) -> None:
    kube.custom().create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, experiment())
    annotate(people["alice"], {APPROVE: "d1", BY: "alice"})
    operator = kubernetes.client.CustomObjectsApi(kube.operator_api_client())
    bookkeeping = {"metadata": {"annotations": {contract.ANNOTATION_LAST_DECISION: "d1"}, "finalizers": ["x/y"]}}
    patched = operator.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "exp", bookkeeping)
    assert patched["metadata"]["annotations"][contract.ANNOTATION_LAST_DECISION] == "d1"
    status = operator.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "exp", {"status": {"phase": "Running"}}
    )
    assert status["status"]["phase"] == "Running"
    assert stored(kube)["metadata"]["annotations"] == {
        APPROVE: "d1",
        BY: "alice",
        contract.ANNOTATION_LAST_DECISION: "d1",
    }
    # Its own name is checked like anyone's: it cannot consume the sign-off by removing it, either.
    reply = refused(
        operator.patch_namespaced_custom_object,
        GROUP,
        VERSION,
        "default",
        PLURAL,
        "exp",
        {"metadata": {"annotations": {APPROVE: None}}},
    )
    assert reply["details"]["causes"] == [{"message": refusal(kube.operator_user.name)}]  # type: ignore[union-attr]


@pytest.mark.parametrize("kube_release", [OperatorRelease(values={"approvalPolicy": {"enabled": False}})])
def test_without_the_policy_any_name_is_admitted(kube: Kube, people: dict) -> None:
    assert kube.request("GET", VAP_PATH)[1]["items"] == []
    assert kube.request("GET", BINDING_PATH)[1]["items"] == []
    kube.custom().create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, experiment())
    assert annotate(people["alice"], {APPROVE: "d1", BY: "bob"})["metadata"]["annotations"][BY] == "bob"


# ---------------------------------------------------------------------------------------------
# Hand-written policies through the emulator: any resource, the API server's replies
# ---------------------------------------------------------------------------------------------


def _policy(name: str = "p", **spec: Any) -> dict[str, Any]:
    spec.setdefault(
        "matchConstraints",
        {
            "resourceRules": [
                {"apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"], "operations": ["*"]}
            ]
        },
    )
    spec.setdefault("validations", [{"expression": "!has(object.data) || !('forbidden' in object.data)"}])
    return {
        "apiVersion": f"{admission.GROUP}/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def _binding(policy: str = "p", name: str | None = None, actions: tuple[str, ...] = ("Deny",), **spec: Any) -> dict:
    return {
        "apiVersion": f"{admission.GROUP}/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name or f"{policy}-binding"},
        "spec": {"policyName": policy, "validationActions": list(actions), **spec},
    }


def test_a_policy_guards_creates_replaces_and_patches_of_any_resource(kube: Kube) -> None:
    kube.apply([_policy(), _binding()])
    core = kube.core_v1()
    reply = refused(
        core.create_namespaced_config_map, "default", {"metadata": {"name": "cm"}, "data": {"forbidden": "1"}}
    )
    expected = (
        "ValidatingAdmissionPolicy 'p' with binding 'p-binding' denied request: "
        "failed expression: !has(object.data) || !('forbidden' in object.data)"
    )
    assert reply == {
        "code": 422,
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'configmaps "cm" is forbidden: {expected}',
        "reason": "Invalid",
        "details": {"name": "cm", "kind": "configmaps", "causes": [{"message": expected}]},
    }
    core.create_namespaced_config_map("default", {"metadata": {"name": "cm"}, "data": {"a": "1"}})
    reply = refused(core.patch_namespaced_config_map, "cm", "default", {"data": {"forbidden": "1"}})
    assert reply["code"] == 422 and reply["details"]["causes"] == [{"message": expected}]
    body = core.read_namespaced_config_map("cm", "default")
    body.data = {"forbidden": "1"}
    assert refused(core.replace_namespaced_config_map, "cm", "default", body)["code"] == 422
    assert core.read_namespaced_config_map("cm", "default").data == {"a": "1"}
    # generateName: the message names the prefix, as the API server's does.
    reply = refused(
        core.create_namespaced_config_map, "default", {"metadata": {"generateName": "g-"}, "data": {"forbidden": ""}}
    )
    assert reply["message"].startswith('configmaps "g-')


def test_a_policy_denying_everything_cannot_lock_the_admission_configuration(kube: Kube) -> None:
    rules = [{"apiGroups": ["*"], "apiVersions": ["*"], "resources": ["*/*"], "operations": ["*"]}]
    kube.apply(
        [
            _policy(
                matchConstraints={"resourceRules": rules}, validations=[{"expression": "false", "reason": "Forbidden"}]
            ),
            _binding(),
        ]
    )
    reply = refused(kube.core_v1().create_namespaced_config_map, "default", {"metadata": {"name": "cm"}})
    assert (reply["code"], reply["reason"]) == (403, "Forbidden")
    # Policies and bindings are exempt (rules.IsExemptAdmissionConfigurationResource): still fixable.
    fix = {"spec": {"validationActions": ["Audit"]}}
    status, reply = kube.request("PATCH", f"{BINDING_PATH}/p-binding", fix, content_type="application/merge-patch+json")
    assert status == 200, reply
    assert kube.core_v1().create_namespaced_config_map("default", {"metadata": {"name": "cm"}}).metadata.uid


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"validations": [{"expression": "object.data +"}]}, "spec.validations[0].expression"),
        ({"validations": [{"expression": "objet.data == null"}]}, "spec.validations[0].expression"),
        ({"validations": [{"expression": "true", "messageExpression": "'a' +"}]},
         "spec.validations[0].messageExpression"),
        ({"matchConditions": [{"name": "m", "expression": "variables.v"}],
          "variables": [{"name": "v", "expression": "true"}]}, "spec.matchConditions[0].expression"),
        ({"variables": [{"name": "v", "expression": "("}]}, "spec.variables[0].expression"),
        ({"validations": [{"expression": "true", "reason": "Teapot"}]}, "spec.validations[0].reason"),
        ({"validations": []}, "spec.validations"),
        ({"matchConstraints": {"resourceRules": []}}, "spec.matchConstraints.resourceRules"),
        ({"failurePolicy": "Sometimes"}, "spec.failurePolicy"),
        ({"paramKind": {"apiVersion": "v1", "kind": "ConfigMap"}}, "spec.paramKind"),
        ({"validations": [{"expression": "authorizer.group('').resource('pods').check('get').allowed()"}]},
         "spec.validations[0].expression"),
    ],
)  # fmt: skip
def test_a_policy_that_does_not_compile_or_validate_is_refused_with_its_field(
    kube: Kube, spec: dict, field: str
) -> None:
    status, reply = kube.request("POST", VAP_PATH, _policy(**spec))
    assert (status, reply["reason"]) == (422, "Invalid"), reply
    assert reply["message"].startswith(f'ValidatingAdmissionPolicy.{admission.GROUP} "p" is invalid: {field}: ')
    assert [c["field"] for c in reply["details"]["causes"]] == [field]
    assert kube.request("GET", f"{VAP_PATH}/p")[0] == 404


def test_a_compile_error_says_where_and_what(kube: Kube) -> None:
    status, reply = kube.request("POST", VAP_PATH, _policy(validations=[{"expression": "objet.data == null"}]))
    assert reply["details"]["causes"][0]["message"] == (
        'Invalid value: "objet.data == null": compilation failed: ERROR: <input>:1:1: '
        "undeclared reference to 'objet' (in container '')"
    )


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"validationActions": []}, "spec.validationActions"),
        ({"validationActions": ["Deny", "Warn"]}, "spec.validationActions"),
        ({"validationActions": ["Block"]}, "spec.validationActions[0]"),
        ({"policyName": ""}, "spec.policyName"),
    ],
)
def test_a_binding_that_does_not_validate_is_refused(kube: Kube, spec: dict, field: str) -> None:
    body = _binding()
    body["spec"].update(spec)
    status, reply = kube.request("POST", BINDING_PATH, body)
    assert status == 422 and [c["field"] for c in reply["details"]["causes"]] == [field]


# ---------------------------------------------------------------------------------------------
# The evaluator on its own
# ---------------------------------------------------------------------------------------------


def request(**fields: Any) -> admission.Request:
    fields.setdefault("operation", "CREATE")
    fields.setdefault("user", ALICE)
    fields.setdefault("group", "")
    fields.setdefault("version", "v1")
    fields.setdefault("resource", "configmaps")
    fields.setdefault("kind", "ConfigMap")
    fields.setdefault("namespace", "default")
    fields.setdefault("name", "cm")
    fields.setdefault("object", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": fields["name"]}})
    return admission.Request(**fields)


def deny_all(**spec: Any) -> dict[str, Any]:
    """A policy (defaulted as stored) whose one validation fails every request it applies to."""
    spec.setdefault("validations", [{"expression": "false"}])
    policy = _policy(**spec)
    admission.default_policy(policy)
    assert admission.policy_errors(policy) == []
    return policy


def decide(policy: dict, req: admission.Request, **binding: Any) -> admission.Result:
    return admission.evaluate([policy], [_binding(**binding)], req)


def rules(**rule: Any) -> dict[str, Any]:
    base = {"apiGroups": ["*"], "apiVersions": ["*"], "resources": ["*"], "operations": ["*"]}
    return {"resourceRules": [{**base, **rule}]}


@pytest.mark.parametrize(
    ("rule", "where", "applies"),
    [
        ({}, {}, True),
        ({}, {"resource": "pods", "subresource": "status", "operation": "UPDATE"}, False),  # "*": no subresources
        ({"resources": ["*/*"]}, {"resource": "pods", "subresource": "status"}, True),
        ({"resources": ["pods/*"]}, {"resource": "pods"}, True),
        ({"resources": ["pods/*"]}, {"resource": "pods", "subresource": "status"}, True),
        ({"resources": ["pods/*"]}, {}, False),
        ({"resources": ["*/status"]}, {"resource": "pods", "subresource": "status"}, True),
        ({"resources": ["*/status"]}, {"resource": "pods"}, False),
        ({"resources": ["pods/status"]}, {"resource": "pods"}, False),
        ({"resources": ["configmaps"]}, {}, True),
        ({"operations": ["CREATE"]}, {"operation": "UPDATE"}, False),
        ({"operations": ["CREATE", "UPDATE"]}, {"operation": "UPDATE"}, True),
        ({"apiGroups": ["apps"]}, {}, False),
        ({"apiGroups": ["", "apps"]}, {}, True),
        ({"apiVersions": ["v2"]}, {}, False),
        ({"scope": "Namespaced"}, {}, True),
        ({"scope": "Namespaced"}, {"namespace": ""}, False),
        ({"scope": "Cluster"}, {}, False),
        ({"scope": "Cluster"}, {"namespace": ""}, True),
        ({"scope": "Cluster"}, {"resource": "namespaces", "namespace": "ns"}, True),
        ({"scope": "Namespaced"}, {"resource": "namespaces", "namespace": "ns"}, False),
        ({"resourceNames": ["other"]}, {}, False),
        ({"resourceNames": ["other", "cm"]}, {}, True),
    ],
)
def test_resource_rules_match_as_in_kubernetes(rule: dict, where: dict, applies: bool) -> None:
    result = decide(deny_all(matchConstraints=rules(**rule)), request(**where))
    assert result.allowed is not applies


def test_exclude_rules_and_operations_outside_create_and_update() -> None:
    policy = deny_all(
        matchConstraints={**rules(), "excludeResourceRules": rules(resources=["configmaps"])["resourceRules"]}
    )
    assert decide(policy, request()).allowed
    assert not decide(policy, request(resource="secrets", kind="Secret")).allowed
    assert decide(deny_all(matchConstraints=rules()), request(operation="DELETE")).allowed  # not emulated: skipped


@pytest.mark.parametrize(
    ("selector", "labels", "selected"),
    [
        (None, {}, True),
        ({}, {"a": "1"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        ({"matchLabels": {"a": "1"}}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"b": ""}, False),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"b": ""}, True),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": ""}, False),
        ({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]}, {"a": "1"}, False),
    ],
)
def test_label_selectors(selector: dict | None, labels: dict, selected: bool) -> None:
    assert admission.selector_matches(selector, labels) is selected


def test_namespace_and_object_selectors() -> None:
    team = {"matchLabels": {"team": "ml"}}
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default", "labels": {"team": "ml"}}}
    policy = deny_all(matchConstraints={**rules(), "namespaceSelector": team})
    assert not decide(policy, request(namespace_object=namespace)).allowed
    assert decide(policy, request(namespace_object={"metadata": {"name": "default"}})).allowed
    # Cluster-scoped objects other than namespaces always match; a Namespace matches by its own labels.
    assert not decide(policy, request(namespace="", resource="nodes", kind="Node")).allowed
    assert not decide(
        policy, request(resource="namespaces", kind="Namespace", namespace="default", object=namespace)
    ).allowed
    policy = deny_all(matchConstraints={**rules(), "objectSelector": team})
    labelled = {"metadata": {"name": "cm", "labels": {"team": "ml"}}}
    assert decide(policy, request()).allowed
    assert not decide(policy, request(object=labelled)).allowed
    # Either the new or the old object may match (a label being removed is still checked).
    assert not decide(
        policy, request(operation="UPDATE", object={"metadata": {"name": "cm"}}, old_object=labelled)
    ).allowed


def test_a_binding_narrows_what_its_policy_applies_to() -> None:
    policy = deny_all(matchConstraints=rules())
    narrow = {"matchResources": {"namespaceSelector": {"matchLabels": {"env": "prod"}}}}
    assert decide(policy, request(namespace_object={"metadata": {"labels": {"env": "dev"}}}), **narrow).allowed
    assert not decide(policy, request(namespace_object={"metadata": {"labels": {"env": "prod"}}}), **narrow).allowed
    only_secrets = {"matchResources": rules(resources=["secrets"])}
    assert decide(policy, request(), **only_secrets).allowed
    assert not decide(policy, request(resource="secrets", kind="Secret"), **only_secrets).allowed
    # A binding of another policy, or a policy without a binding, does nothing.
    assert admission.evaluate([policy], [_binding("q")], request()).allowed
    assert admission.evaluate([policy], [], request()).allowed


@pytest.mark.parametrize(("failure_policy", "allowed"), [("Fail", False), ("Ignore", True)])
def test_an_expression_that_fails_follows_the_failure_policy(failure_policy: str, allowed: bool) -> None:
    policy = deny_all(failurePolicy=failure_policy, validations=[{"expression": "object.spec.replicas < 3"}])
    result = decide(policy, request())
    assert result.allowed is allowed
    if not allowed:
        assert result.denial is not None and result.denial.code == 422
        assert result.denial.message == (
            "ValidatingAdmissionPolicy 'p' with binding 'p-binding' denied request: "
            "expression 'object.spec.replicas < 3' resulted in error: no such member in mapping: 'spec'"
        )


@pytest.mark.parametrize(
    ("reason", "code"),
    [(None, 422), ("Invalid", 422), ("Forbidden", 403), ("Unauthorized", 401), ("RequestEntityTooLarge", 413)],
)
def test_the_reason_sets_the_status_code(reason: str | None, code: int) -> None:
    validation = {"expression": "false", **({"reason": reason} if reason else {})}
    denial = decide(deny_all(validations=[validation]), request()).denial
    assert denial is not None and (denial.reason, denial.code) == (reason or "Invalid", code)


@pytest.mark.parametrize(
    ("validation", "message"),
    [
        ({"messageExpression": "'no ' + object.metadata.name + ' for ' + request.userInfo.username",
          "message": "m"}, "no cm for alice"),
        ({"messageExpression": "'  padded  '"}, "padded"),
        ({"messageExpression": "object.nope", "message": " fallback "}, "fallback"),  # fails: the message
        ({"messageExpression": "1", "message": "not a string"}, "not a string"),
        ({"messageExpression": "'two\\nlines'", "message": "one line only"}, "one line only"),
        ({"messageExpression": "'x'.repeat(1)", "message": "unknown function"}, "unknown function"),
        ({}, "failed expression: 1 > 2"),
    ],
)  # fmt: skip
def test_the_denial_message(validation: dict, message: str) -> None:
    denial = decide(deny_all(validations=[{"expression": " 1 > 2 ", **validation}]), request()).denial
    assert denial is not None
    assert denial.message == f"ValidatingAdmissionPolicy 'p' with binding 'p-binding' denied request: {message}"


def test_match_conditions_decide_whether_anything_is_evaluated() -> None:
    failing = {"expression": "object.spec.replicas < 3"}  # fails on a ConfigMap: a denial under Fail

    def conditions(*expressions: str) -> list[dict[str, str]]:
        return [{"name": f"c{i}", "expression": e} for i, e in enumerate(expressions)]

    policy = deny_all(validations=[failing], matchConditions=conditions("true", "object.metadata.name == 'other'"))
    assert decide(policy, request()).allowed  # one false: the validations never run
    policy = deny_all(validations=[failing], matchConditions=conditions("true", "object.metadata.name == 'cm'"))
    assert "resulted in error" in str(decide(policy, request()).denial)
    # An error with none false follows failurePolicy; with one false, the policy does not apply.
    broken = conditions("object.nope == 1")
    denial = decide(deny_all(matchConditions=broken), request()).denial
    assert denial is not None and denial.message.endswith(
        "denied request: expression 'object.nope == 1' resulted in error: no such member in mapping: 'nope'"
    )
    assert decide(deny_all(matchConditions=broken, failurePolicy="Ignore"), request()).allowed
    assert decide(deny_all(matchConditions=conditions("object.nope == 1", "false")), request()).allowed
    # They run before the variables, and cannot see them.
    stored_anyway = deny_all(variables=[{"name": "v", "expression": "true"}])
    stored_anyway["spec"]["matchConditions"] = conditions("variables.v")
    assert "undeclared reference to 'variables'" in str(decide(stored_anyway, request()).denial)


def test_variables_compose_in_order_and_fail_only_where_used() -> None:
    variables = [
        {"name": "name", "expression": "object.metadata.name"},
        {"name": "greeting", "expression": "'hello ' + variables.name"},
        {"name": "broken", "expression": "object.nope"},
    ]
    policy = deny_all(
        variables=variables,
        validations=[{"expression": "variables.greeting == 'hello other'", "messageExpression": "variables.greeting"}],
    )
    denial = decide(policy, request()).denial
    assert denial is not None and denial.message.endswith("denied request: hello cm")
    assert decide(policy, request(name="other")).allowed  # the unused broken variable changes nothing
    policy = deny_all(variables=variables, validations=[{"expression": "variables.broken == 1"}])
    denial = decide(policy, request()).denial
    assert denial is not None and denial.message.endswith(
        "denied request: expression 'variables.broken == 1' resulted in error: no such member in mapping: 'nope'"
    )


def test_the_cel_variables_are_the_api_servers() -> None:
    checks = [
        "request.operation == 'UPDATE'",
        "request.userInfo.username == 'alice' && 'system:authenticated' in request.userInfo.groups",
        "request.name == 'cm' && request.namespace == 'default' && !request.dryRun",
        "request.kind.kind == 'ConfigMap' && request.resource.resource == 'configmaps' && request.resource.group == ''",
        "request.subResource == '' && params == null",
        "oldObject.data.a == '1' && object.data.a == '2'",
        "namespaceObject.metadata.name == 'default'",
    ]
    policy = deny_all(validations=[{"expression": check} for check in checks])
    update = request(
        operation="UPDATE",
        object={"metadata": {"name": "cm"}, "data": {"a": "2"}},
        old_object={"metadata": {"name": "cm"}, "data": {"a": "1"}},
        namespace_object={"metadata": {"name": "default"}},
    )
    assert decide(policy, update).allowed
    assert decide(deny_all(validations=[{"expression": "oldObject == null"}]), request()).allowed
    # A custom resource's values are typed by its schema: a `number` written as 3 is a double.
    schema = {"type": "object", "properties": {"spec": {"type": "object", "properties": {"ratio": {"type": "number"}}}}}
    typed = request(object={"metadata": {"name": "cm"}, "spec": {"ratio": 3}}, schema=schema)
    assert decide(deny_all(validations=[{"expression": "type(object.spec.ratio) == double"}]), typed).allowed
    assert not decide(
        deny_all(validations=[{"expression": "type(object.spec.ratio) == double"}]), request(object=typed.object)
    ).allowed


def test_only_deny_actions_deny_and_the_first_denial_is_reported() -> None:
    policy = deny_all()
    warned = decide(policy, request(), actions=("Warn",))
    assert warned.allowed and warned.warnings == (
        "Validation failed for ValidatingAdmissionPolicy 'p' with binding 'p-binding': failed expression: false",
    )
    audited = decide(policy, request(), actions=("Audit",))
    assert audited.allowed and audited.warnings == ()
    assert not decide(policy, request(), actions=("Audit", "Deny")).allowed
    second = deny_all(name="a-first", validations=[{"expression": "false", "message": "from a"}])
    result = admission.evaluate([policy, second], [_binding(), _binding("a-first")], request())
    assert result.denial is not None and result.denial.policy == "a-first" and result.denial.message.endswith("from a")


def test_a_policy_with_params_is_refused_rather_than_ignored() -> None:
    policy = deny_all()
    policy["spec"]["paramKind"] = {"apiVersion": "v1", "kind": "ConfigMap"}
    with pytest.raises(NotImplementedError, match="paramKind"):
        decide(policy, request())


def test_has_fails_on_a_missing_parent_or_null_as_in_cel_go() -> None:
    """cel-python alone says false: a policy that forgets oldObject is null on CREATE would pass here."""
    assert decide(deny_all(validations=[{"expression": "!has(object.metadata.labels)"}]), request()).allowed
    for expression in ("!has(object.spec.replicas)", "!has(oldObject.metadata)", "![1].exists(i, has(oldObject.a))"):
        denial = decide(deny_all(validations=[{"expression": expression}]), request()).denial
        assert denial is not None and f"expression '{expression}' resulted in error" in denial.message


def test_a_no_op_write_is_admitted_or_denied_like_any_other(kube: Kube) -> None:
    """The API server runs admission before it finds out that nothing changed."""
    core = kube.core_v1()
    core.create_namespaced_config_map("default", {"metadata": {"name": "cm"}, "data": {"forbidden": "1"}})
    kube.apply([_policy(), _binding()])
    assert refused(core.patch_namespaced_config_map, "cm", "default", {"data": {"forbidden": "1"}})["code"] == 422
    assert not core.patch_namespaced_config_map("cm", "default", {"data": {"forbidden": None}}).data


def test_policies_see_a_custom_resource_as_stored_typed_by_its_schema(kube: Kube) -> None:
    """Defaults applied, unknown fields pruned, and a `number` written as 1 a double (as in the API server)."""
    checks = [
        "object.spec.objective.metric == 'val_loss'",  # the schema's default
        "type(object.spec.objective.goal) == double",
        "!has(object.spec.unknown)",
        "object.spec.trialTemplate.hyperparameters.max_steps == 200",  # preserve-unknown-fields: all there
        "object.metadata.generation == 1 && size(object.metadata.uid) == 36",
    ]
    rule = {"apiGroups": [GROUP], "apiVersions": [VERSION], "resources": [PLURAL], "operations": ["CREATE"]}
    kube.apply(
        [
            _policy(matchConstraints={"resourceRules": [rule]}, validations=[{"expression": c} for c in checks]),
            _binding(),
        ]
    )
    body = experiment()
    body["spec"].update(objective={"goal": 1}, unknown="pruned", trialTemplate={"hyperparameters": {"max_steps": 200}})
    status, reply = kube.request("POST", EXPERIMENTS, body)
    assert status == 201, reply


def test_the_namespace_selector_and_namespace_object_come_from_the_stored_namespace(kube: Kube) -> None:
    for name, labels in (("ml", {"team": "ml"}), ("web", {})):
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
    rules = _policy()["spec"]["matchConstraints"]["resourceRules"]
    selector = {"resourceRules": rules, "namespaceSelector": {"matchLabels": {"team": "ml"}}}
    validation = {"expression": "false", "messageExpression": "'not in ' + namespaceObject.metadata.name"}
    kube.apply([_policy(matchConstraints=selector, validations=[validation]), _binding()])
    core = kube.core_v1()
    reply = refused(core.create_namespaced_config_map, "ml", {"metadata": {"name": "cm"}})
    assert reply["details"]["causes"] == [
        {"message": "ValidatingAdmissionPolicy 'p' with binding 'p-binding' denied request: not in ml"}
    ]
    assert core.create_namespaced_config_map("web", {"metadata": {"name": "cm"}}).metadata.namespace == "web"


def test_request_says_who_asked_and_whether_it_is_a_dry_run(kube: Kube, people: dict) -> None:
    checks = [{"expression": "!request.dryRun", "message": "dry run"}]
    checks.append({"expression": "request.userInfo.username == 'kubernetes-admin'", "message": "not the admin"})
    kube.apply([_policy(validations=checks), _binding()])
    path, body = "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "cm"}}
    status, reply = kube.request("POST", path, body, params={"dryRun": "All"})
    assert status == 422 and reply["message"].endswith("denied request: dry run")
    kube.apply(  # alice may create configmaps: the policy, not RBAC, refuses her
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "alice-admin"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}],
        }
    )
    status, reply = kube.request("POST", path, body, token=TOKENS["alice"])
    assert status == 422 and reply["message"].endswith("denied request: not the admin")
    assert kube.request("POST", path, body)[0] == 201
