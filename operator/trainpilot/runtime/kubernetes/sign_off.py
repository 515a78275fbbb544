"""Sign-offs in a cluster: the approve, reject and approved-by annotations of an AgentExperiment.

`trainpilot approve|reject NAME ID` asks the API server who the caller is (a SelfSubjectReview,
as `kubectl auth whoami` does) and sets the verdict's annotation with `approved-by` equal to that
name; the chart's ValidatingAdmissionPolicy refuses any other name, so the operator can take
`approved-by` as the API server's word. An annotation may name several ids, comma-separated.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentStatus, SignOff
from trainpilot.core.approvals import Approval, awaiting
from trainpilot.runtime.kubernetes.api import KubeApi

VERDICT_ANNOTATIONS = {"approve": contract.ANNOTATION_APPROVE, "reject": contract.ANNOTATION_REJECT}


def approvals_in(metadata: Mapping[str, Any]) -> list[Approval]:
    annotations = metadata.get("annotations") or {}
    by = str(annotations.get(contract.ANNOTATION_APPROVED_BY) or "")
    found = []
    for verdict, key in VERDICT_ANNOTATIONS.items():
        for decision in str(annotations.get(key) or "").split(","):
            if decision.strip():
                found.append(Approval(decision=decision.strip(), verdict=verdict, by=by))  # type: ignore[arg-type]
    return found


async def who_am_i(api: KubeApi) -> str:
    """The caller's user name as the API server authenticates it."""
    from kubernetes import client

    review = await api.call(
        "who am I (selfsubjectreviews)",
        client.AuthenticationV1Api(api.api_client).create_self_subject_review,
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    user = getattr(getattr(review.status, "user_info", None), "username", None)
    if not user:
        raise ValueError("the API server did not say who you are (its SelfSubjectReview names no user)")
    return str(user)


async def read_experiment(api: KubeApi, namespace: str, name: str) -> dict[str, Any]:
    return await api.call(
        f"experiment {namespace}/{name}",
        api.custom.get_namespaced_custom_object,
        contract.GROUP,
        contract.VERSION,
        namespace,
        contract.EXPERIMENT_PLURAL,
        name,
    )


async def sign_off(api: KubeApi, namespace: str, name: str, decision: str, verdict: str) -> str:
    """Annotate the experiment with the verdict on `decision`, signed with the caller's name; returns it."""
    experiment = await read_experiment(api, namespace, name)
    awaiting(AgentExperimentStatus.model_validate(experiment.get("status") or {}), decision)
    user = await who_am_i(api)
    await api.annotate_experiment(
        namespace, name, {VERDICT_ANNOTATIONS[verdict]: decision, contract.ANNOTATION_APPROVED_BY: user}
    )
    return user


async def wait_settled(api: KubeApi, namespace: str, name: str, decision: str, timeout: float) -> SignOff | None:
    """The sign-off once the operator has settled it; None if it has not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        experiment = await read_experiment(api, namespace, name)
        status = AgentExperimentStatus.model_validate(experiment.get("status") or {})
        found = status.sign_off(decision)
        if found is not None and found.state != "Pending":
            return found
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(1.0)
