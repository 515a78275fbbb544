"""Test infrastructure: an emulated Kubernetes API server and a fake node (test-only)."""
