"""Shared pytest configuration."""

# The emulated Kubernetes API server, the fake node and the kopf runner (tests/kube/).
pytest_plugins = ["tests.kube.fixtures"]
