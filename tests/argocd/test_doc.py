"""docs/gitops.md says what to install; these check that what it says is what works: the
argocd-cm copy of the health check is the file, and its ignoreDifferences cover exactly what the
operator, kopf and reviewers write on an experiment, and nothing a user writes."""

from __future__ import annotations

import copy

import kopf
import pytest
import yaml

from tests.argocd.argo_diff import DOC, doc_application, doc_rules, doc_yaml_blocks, normalize
from tests.argocd.argo_lua import HEALTH_SCRIPT
from tests.support.paths import QUICKSTART_PATH
from trainpilot.api import contract
from trainpilot.controller import handlers

HEALTH_KEY = "resource.customizations.health.trainpilot.dev_AgentExperiment"


def test_the_argocd_cm_in_the_doc_carries_health_lua_verbatim() -> None:
    (config_map,) = [doc for doc in doc_yaml_blocks() if doc.get("kind") == "ConfigMap"]
    assert config_map["metadata"]["name"] == "argocd-cm"
    assert config_map["data"][HEALTH_KEY] == HEALTH_SCRIPT.read_text()


def test_the_application_respects_its_ignore_differences() -> None:
    application = doc_application()
    assert "RespectIgnoreDifferences=true" in application["spec"]["syncPolicy"]["syncOptions"]
    assert doc_rules(), "no ignoreDifferences entry for trainpilot.dev AgentExperiment"


@pytest.fixture
def kopf_settings(monkeypatch: pytest.MonkeyPatch) -> kopf.OperatorSettings:
    """The settings the operator's startup handler really sets (storage prefixes, finalizer)."""
    settings = kopf.OperatorSettings()
    handlers.apply_settings(settings)
    return settings


def desired() -> dict:
    """A manifest as a user keeps it in Git, with Argo CD's tracking on it."""
    body = yaml.safe_load(QUICKSTART_PATH.read_text())
    body["metadata"] = {
        "name": "lr-search",
        "namespace": "ml-team",
        "labels": {"team": "vision", "app.kubernetes.io/instance": "experiments"},
        "annotations": {
            "argocd.argoproj.io/tracking-id": "experiments:trainpilot.dev/AgentExperiment:ml-team/lr-search",
            "description": "lr sweep for the small model",
            "trainpilot.dev/notes": "a user's own annotation under our prefix",
        },
    }
    return body


def test_ignore_differences_cover_every_write_of_the_operator_kopf_and_reviewers(
    kopf_settings: kopf.OperatorSettings,
) -> None:
    progress, diffbase = kopf_settings.persistence.progress_storage, kopf_settings.persistence.diffbase_storage
    kopf_keys = [*progress.make_keys("agent"), *diffbase.make_keys("last-handled-configuration")]
    kopf_keys += progress.make_keys("touch-dummy")
    assert all(key.startswith("kopf.trainpilot.dev/") for key in kopf_keys), kopf_keys
    written = {
        contract.ANNOTATION_LAST_DECISION: '{"id":"lr-search-d00003"}',
        **{key: "lr-search-d00002" for key in (contract.ANNOTATION_APPROVE, contract.ANNOTATION_REJECT)},
        contract.ANNOTATION_APPROVED_BY: "alice",
        **{key: "{}" for key in kopf_keys},
    }
    live = desired()
    live["metadata"]["annotations"].update(written)
    live["metadata"]["finalizers"] = ["backup.example.com/snapshot", kopf_settings.persistence.finalizer]
    live["status"] = {"phase": "Running", "observedGeneration": 1}

    normalized = normalize(live, doc_rules())
    assert normalized["metadata"]["annotations"] == desired()["metadata"]["annotations"]
    # The whole list, another controller's finalizer too (tests/argocd/test_sync.py shows why).
    assert "finalizers" not in normalized["metadata"]
    assert "status" not in normalized


def test_ignore_differences_hide_nothing_a_user_writes() -> None:
    manifest = desired()
    assert normalize(manifest, doc_rules()) == manifest
    assert normalize(copy.deepcopy(manifest), []) == manifest  # and the normalizer alone changes nothing


def test_the_doc_names_the_operators_real_finalizer_and_prefix(kopf_settings: kopf.OperatorSettings) -> None:
    text = DOC.read_text()
    assert f"`{kopf_settings.persistence.finalizer}`" in text
    assert f"prefix `{kopf_settings.persistence.progress_storage.prefix}`" in text
    assert kopf_settings.persistence.diffbase_storage.prefix == kopf_settings.persistence.progress_storage.prefix
