"""A thin async face over the official (synchronous) kubernetes client.

Calls run in a bounded thread pool so the operator's event loop never blocks, and ApiException is
turned into the few outcomes the runtime reasons about: gone, already there, or a failure.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from trainpilot.api import contract
from trainpilot.runtime.base import RuntimeFailure

T = TypeVar("T")
_EXECUTOR_WORKERS = 16
_EXECUTOR = ThreadPoolExecutor(max_workers=_EXECUTOR_WORKERS, thread_name_prefix="kube-api")


class NotFound(RuntimeFailure):
    pass


class Conflict(RuntimeFailure):
    """AlreadyExists on create, or a stale resourceVersion on replace."""


def client_configuration(config_file: str | None = None) -> client.Configuration:
    """Log in like kubectl: in-cluster service account first, else KUBECONFIG / ~/.kube/config;
    or exactly `config_file` when given."""
    configuration = client.Configuration()
    if config_file is not None:
        config.load_kube_config(config_file=config_file, client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    # One connection per worker thread, so bursts reuse connections instead of opening more.
    configuration.connection_pool_maxsize = _EXECUTOR_WORKERS
    return configuration


def load_credentials() -> client.ApiClient:
    return client.ApiClient(client_configuration())


def _translate(error: ApiException, what: str) -> RuntimeFailure:
    if error.status == 404:
        return NotFound(f"{what}: not found")
    if error.status == 409:
        return Conflict(f"{what}: conflict")
    reason = error.reason or ""
    try:
        reason = json.loads(error.body or "{}").get("message", reason)
    except (TypeError, ValueError):
        pass
    return RuntimeFailure(f"{what}: API error {error.status}: {reason}")


class KubeApi:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api_client = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.calls = 0  # for benchmarks: API requests made through this object

    async def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self.calls += 1
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(_EXECUTOR, functools.partial(fn, *args, **kwargs))
        except ApiException as error:
            raise _translate(error, what) from None

    async def create_if_absent(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Create; True if created now, False if it already existed (a retried cycle)."""
        try:
            await self.call(what, fn, *args, **kwargs)
        except Conflict:
            return False
        return True

    async def delete_if_present(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        try:
            await self.call(what, fn, *args, **kwargs)
        except NotFound:
            return False
        return True

    # Experiment-level helpers used by the runtime and the handlers.

    async def patch_experiment_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self.call(
            f"status of {namespace}/{name}",
            self.custom.patch_namespaced_custom_object_status,
            contract.GROUP,
            contract.VERSION,
            namespace,
            contract.EXPERIMENT_PLURAL,
            name,
            {"status": status},
        )

    async def annotate_experiment(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        await self.call(
            f"annotations of {namespace}/{name}",
            self.custom.patch_namespaced_custom_object,
            contract.GROUP,
            contract.VERSION,
            namespace,
            contract.EXPERIMENT_PLURAL,
            name,
            {"metadata": {"annotations": annotations}},
        )
