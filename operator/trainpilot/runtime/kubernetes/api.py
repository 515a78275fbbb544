"""A thin async face over the official (synchronous) kubernetes client.

Calls run in a bounded thread pool so the operator's event loop never blocks, and ApiException is
turned into the few outcomes the runtime reasons about: gone (NotFound), already there or stale
(Conflict), refused for good (PermanentApiError: a 4xx but 409/429) or worth a retry (ApiError:
429, 5xx, no answer), each with the status code and the API server's own message.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException, ApiTypeError, ApiValueError

from trainpilot.api import contract
from trainpilot.runtime.base import PermanentFailure, RuntimeFailure

T = TypeVar("T")
_EXECUTOR_WORKERS = 16
_EXECUTOR = ThreadPoolExecutor(max_workers=_EXECUTOR_WORKERS, thread_name_prefix="kube-api")


class ApiError(RuntimeFailure):
    """The API server (or the way to it) failed a request: `status` is the HTTP code (None when no
    answer came), `api_message` what the server said. Transient unless it is a PermanentApiError."""

    def __init__(self, what: str, status: int | None, api_message: str) -> None:
        super().__init__(f"{what}: API error {status}: {api_message}" if status else f"{what}: {api_message}")
        self.status = status
        self.api_message = api_message


class PermanentApiError(ApiError, PermanentFailure):
    """A 4xx other than 409 and 429 (403 Forbidden, 422 Invalid, ...): the same request fails again."""


class NotFound(PermanentApiError):
    pass


class Conflict(ApiError):
    """AlreadyExists on create, or a stale resourceVersion on replace: retry with fresh state."""


def is_permanent(status: int | None) -> bool:
    """4xx but 409 Conflict and 429 TooManyRequests; 5xx and no answer at all are worth a retry."""
    return status is not None and 400 <= status < 500 and status not in (409, 429)


class NoCluster(Exception):
    """Neither an in-cluster service account nor a kubeconfig to log in with."""


def client_configuration(config_file: str | None = None) -> client.Configuration:
    """Log in like kubectl: in-cluster service account first, else KUBECONFIG / ~/.kube/config;
    or exactly `config_file` when given. NoCluster when there is nothing to log in with."""
    configuration = client.Configuration()
    try:
        if config_file is not None:
            config.load_kube_config(config_file=config_file, client_configuration=configuration)
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                config.load_kube_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as error:
        where = config_file or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise NoCluster(
            f"no cluster to log in to: not in a pod, and no usable kubeconfig at {where} ({error}); "
            "point KUBECONFIG at one (kind get kubeconfig > kind.yaml), or run an experiment here "
            "with `trainpilot run`"
        ) from None
    # One connection per worker thread, so bursts reuse connections instead of opening more.
    configuration.connection_pool_maxsize = _EXECUTOR_WORKERS
    return configuration


def load_credentials() -> client.ApiClient:
    return client.ApiClient(client_configuration())


def namespace_of_context() -> str:
    """The current kubeconfig context's namespace, as kubectl defaults to it."""
    try:
        _, context = config.list_kube_config_contexts()
    except config.ConfigException:
        return "default"
    return (context or {}).get("context", {}).get("namespace") or "default"


def _translate(error: ApiException, what: str) -> ApiError:
    message = error.reason or ""
    try:
        message = json.loads(error.body or "{}").get("message") or message
    except (TypeError, ValueError, AttributeError):
        pass
    status = error.status
    if status == 404:
        return NotFound(what, status, message or "not found")
    if status == 409:
        return Conflict(what, status, message or "conflict")
    return (PermanentApiError if is_permanent(status) else ApiError)(what, status, message)


# (verb, resource, outcome) of each request: outcome "ok", the HTTP status of an error, "no-answer"
# or "refused-by-client". For the operator's own metrics.
RequestObserver = Callable[[str, str, str], None]
# (resource, reason) of a watch that had to start again: "expired" (its timeout passed) or "gone" (410).
WatchRestartObserver = Callable[[str, str], None]
_VERBS = ("delete_collection", "list", "read", "create", "patch", "replace", "delete", "watch")
_SCOPES = ("namespaced_", "cluster_")
_CUSTOM_PLURALS = frozenset({contract.EXPERIMENT_PLURAL, contract.QUOTA_PLURAL, "workloads", "localqueues"})


def request_kind(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[str, str]:
    """(verb, resource) of a call to a kubernetes client method, a bounded pair for metric labels:
    list_namespaced_job -> (list, jobs), patch_namespaced_custom_object_status with plural
    agentexperiments -> (patch, agentexperiments/status), read_namespaced_pod_log -> (read, pods/log)."""
    name = getattr(fn, "__name__", "").lstrip("_")
    verb = next((v for v in _VERBS if name.startswith(v + "_")), "")
    if not verb:
        return "other", "other"
    rest = name[len(verb) + 1 :]
    rest = next((rest[len(scope) :] for scope in _SCOPES if rest.startswith(scope)), rest)
    subresource = ""
    for suffix in ("_status", "_log"):
        if rest.endswith(suffix):
            rest, subresource = rest[: -len(suffix)], suffix[1:]
    if rest == "custom_object":  # (group, version, [namespace,] plural, ...)
        resource = next((a for a in args[2:4] if a in _CUSTOM_PLURALS), "other")
    else:
        resource = rest.replace("_", "") + "s"
    return verb, f"{resource}/{subresource}" if subresource else resource


class KubeApi:
    def __init__(
        self,
        api_client: client.ApiClient | None = None,
        observe: RequestObserver | None = None,
        on_watch_restart: WatchRestartObserver | None = None,
    ) -> None:
        self.api_client = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.coordination = client.CoordinationV1Api(self.api_client)
        self.calls = 0  # for benchmarks: API requests made through this object
        self.observe = observe
        self.on_watch_restart = on_watch_restart

    def watch_restarted(self, resource: str, reason: str) -> None:
        if self.on_watch_restart is not None:
            self.on_watch_restart(resource, reason)

    async def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self.calls += 1
        loop = asyncio.get_running_loop()
        outcome = "ok"
        try:
            return await loop.run_in_executor(_EXECUTOR, functools.partial(fn, *args, **kwargs))
        except ApiException as error:
            outcome = str(error.status or "no-answer")
            raise _translate(error, what) from None
        except (ApiTypeError, ApiValueError) as error:  # the client refused the body: sending it again cannot help
            outcome = "refused-by-client"
            raise PermanentApiError(what, None, f"request refused by the client: {error}") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:  # refused, reset, timed out: try again later
            outcome = "no-answer"
            raise ApiError(what, None, f"no answer from the API server ({type(error).__name__}: {error})") from None
        finally:
            if self.observe is not None:
                self.observe(*request_kind(fn, args), outcome)

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
