"""Fixtures for the policy tests: the local Messages API."""

from tests.support.messages_api import messages_api  # noqa: F401 - fixture
