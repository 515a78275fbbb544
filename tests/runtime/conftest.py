"""Fixtures for the runtimes (the local one runs a fake trainer)."""

from __future__ import annotations

import pytest

from tests.support.localkit import fake_command, make_spec, no_gpus, quickstart_doc, spec_factory  # noqa: F401 - fixtures
from tests.support.trainerkit import start_trainer  # noqa: F401 - fixture


@pytest.fixture(autouse=True)
def _no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    no_gpus(monkeypatch)
