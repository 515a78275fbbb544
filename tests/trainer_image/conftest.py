"""Fixtures for the trainer's tests: the real trainer as a subprocess."""

from tests.support.trainerkit import start_trainer  # noqa: F401 - fixture
