"""Fixtures for the one-machine path (`trainpilot run`, report, history)."""

from __future__ import annotations

import pytest

from tests.local.localkit import fake_command, make_spec, quickstart_doc, spec_factory  # noqa: F401 - fixtures


@pytest.fixture(autouse=True)
def _quiet_torch_import(monkeypatch):
    # count_gpus() imports torch; the tests never need CUDA, and the answer must not depend on the box.
    monkeypatch.setattr("trainpilot.runtime.local.count_gpus", lambda: 0)
    monkeypatch.setattr("trainpilot.localrun.count_gpus", lambda: 0)
