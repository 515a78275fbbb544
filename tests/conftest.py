"""Shared pytest configuration."""

# The emulated Kubernetes API server, the fake node and the kopf runner, the Messages-API server
# and the real Prometheus server (tests/support/).
pytest_plugins = ["tests.support.kube", "tests.support.messages_api", "tests.support.prometheus"]
