"""Shared pytest configuration."""

# The emulated Kubernetes API server, the fake node and the kopf runner (tests/support/).
pytest_plugins = ["tests.support.kube", "tests.support.messages_api"]
