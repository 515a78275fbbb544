"""
pytest fixtures and helpers: an emulated API server (``kube``), a fake node (``fake_node``,
``make_fake_node``) and a real kopf operator running against them (``run_kopf_operator``).

Identities, as on a real cluster: the tests' own clients (``kube.core_v1()``, ``kube.request``,
``kube.kubeconfig``, $KUBECONFIG) and the fake node are cluster admins; the operator under test
(``run_kopf_operator``, ``kopf_operator``, ``kube.operator_api_client()``,
``kube.operator_kubeconfig``) is the Helm chart's ServiceAccount, with exactly the RBAC that Helm
renders from helm/trainpilot for the ``kube_release`` fixture's values (default: the chart's own,
installed in ``default``; override it, or parametrize it, with tests.support.chart's
SINGLE_NAMESPACE / ALL_NAMESPACES). Every authorization decision is recorded:
``kube.decisions()`` (the operator's), ``kube.forbidden()`` (its 403s).

Register with ``pytest_plugins = ["tests.support.kube"]`` in tests/conftest.py.

Example::

    from tests.support.kube import Kube, aeventually, run_kopf_operator

    async def test_experiment(kube: Kube, fake_node: FakeNode) -> None:
        async with run_kopf_operator('trainpilot.controller.handlers', namespace='default'):
            custom = kube.custom()
            custom.create_namespaced_custom_object('trainpilot.dev', 'v1alpha1', 'default',
                                                   'agentexperiments', {...})
            await aeventually(lambda: custom.get_namespaced_custom_object(...)['status']..., timeout=30)

Everything runs in threads of its own (the API server, the fake node, the operator), so a
test may use the sync kubernetes client freely, from sync or async tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import kopf
import kubernetes
import pytest
import yaml

from tests.support import rbac
from tests.support.chart import OperatorRelease
from tests.support.emulator import Emulator, EmulatorServer
from tests.support.fake_node import FakeNode
from tests.support.paths import REPO

logger = logging.getLogger(__name__)
T = TypeVar("T")
REPO_ROOT = REPO

# Bearer tokens of the emulated cluster's identities.
ADMIN_TOKEN = "emulator-admin-token"
NODE_TOKEN = "emulator-node-token"  # the fake node: kubelet, scheduler and job controller in one
OPERATOR_TOKEN = "emulator-operator-token"  # the chart's ServiceAccount
# How long an Event lives in tests (a real API server's --event-ttl is 1 h): nothing may depend
# on an Event staying around, so tests find out within seconds.
TEST_EVENT_TTL = 5.0


# ---------------------------------------------------------------------------------------------
# Waiting
# ---------------------------------------------------------------------------------------------

_RETRIED = (AssertionError, kubernetes.client.ApiException, LookupError, TypeError, ValueError, AttributeError)


def _attempt(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    """One try of a polled condition: its value, or the error that means "not yet"."""
    try:
        return fn(), None
    except _RETRIED as e:
        return None, e


def _timed_out(timeout: float, message: str, last_error: BaseException | None) -> AssertionError:
    return AssertionError(
        f"Condition not met in {timeout}s{': ' + message if message else ''}"
        + (f" (last error: {last_error!r})" if last_error else "")
    )


def eventually(fn: Callable[[], T], timeout: float = 10, interval: float = 0.05, message: str = "") -> T:
    """Call ``fn`` until it returns a truthy value (which is returned) or the time is out."""
    deadline = time.monotonic() + timeout
    while True:
        result, error = _attempt(fn)
        if result:
            return result
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, message, error)
        time.sleep(interval)


async def aeventually(
    fn: Callable[[], T | Awaitable[T]], timeout: float = 10, interval: float = 0.05, message: str = ""
) -> T:
    """Like :func:`eventually`, for async tests: ``fn`` may also be async (a coroutine function);
    the loop is not blocked between calls."""
    deadline = time.monotonic() + timeout
    while True:
        result, error = _attempt(fn)
        if inspect.isawaitable(result):
            try:
                result = await result
            except _RETRIED as e:
                result, error = None, e
        if result:
            return result
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, message, error)
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------------------------
# The emulated cluster
# ---------------------------------------------------------------------------------------------


class Kube:
    """What the ``kube`` fixture yields: an emulated API server and ways to talk to it."""

    def __init__(
        self,
        server: EmulatorServer,
        kubeconfig: Path,
        operator_kubeconfig: Path | None = None,
        release: OperatorRelease | None = None,
    ) -> None:
        self.server = server
        self.kubeconfig = kubeconfig  # a cluster admin's
        self.operator_kubeconfig = operator_kubeconfig or kubeconfig  # the chart's ServiceAccount's
        self.release = release

    @property
    def operator_user(self) -> rbac.User | None:
        return self.release.user if self.release is not None else None

    def operator_api_client(self) -> kubernetes.client.ApiClient:
        """An ApiClient that is the operator: the chart's ServiceAccount, with the chart's RBAC."""
        return kubernetes.config.new_client_from_config(config_file=str(self.operator_kubeconfig))

    def decisions(self, user: rbac.User | None = None) -> list[rbac.Decision]:
        """Every authorization decision about `user` (default: the operator), oldest first."""
        who = user or self.operator_user
        return [d for d in list(self.emulator.authorizations) if d.attributes.user == who]

    def forbidden(self, user: rbac.User | None = None) -> list[rbac.Decision]:
        """The decisions that refused `user` (default: the operator): each was a 403."""
        return [d for d in self.decisions(user) if not d.allowed]

    def events_posted(self, namespace: str | None = None) -> list[kubernetes.client.CoreV1Event]:
        """Every core v1 Event stored so far, in its last state, whether or not its TTL has dropped
        it since (``list_namespaced_event`` shows only the live ones, as on a real cluster)."""
        live = self.call(
            lambda: [obj for key, obj in self.emulator._live() if (key[0].group, key[0].plural) == ("", "events")]
        )
        found = [e for e in list(self.emulator.expired_events) + live]
        client = kubernetes.client.ApiClient()
        return [
            client.deserialize(json.dumps(e), "CoreV1Event", "application/json")
            for e in found
            if namespace is None or e["metadata"].get("namespace") == namespace
        ]

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def emulator(self) -> Emulator:
        """
        The emulator itself: kmock's DSL and stores, e.g. ``kube.emulator.objects['batch/v1/jobs',
        'default', 'trial-1']`` or ``list(kube.emulator['create jobs'])`` (the requests seen). It
        lives in another thread: read it for assertions; change state through the API or
        :meth:`call`, e.g. ``kube.call(lambda: kube.emulator['create jobs'][:1] << 503)``.
        """
        assert self.server.emulator is not None
        return self.server.emulator

    def api_client(self) -> kubernetes.client.ApiClient:
        """A new kubernetes ApiClient configured from this cluster's kubeconfig file."""
        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))

    def core_v1(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.api_client())

    def batch_v1(self) -> kubernetes.client.BatchV1Api:
        return kubernetes.client.BatchV1Api(self.api_client())

    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.api_client())

    def coordination_v1(self) -> kubernetes.client.CoordinationV1Api:
        return kubernetes.client.CoordinationV1Api(self.api_client())

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` inside the emulator's event loop (for direct state access)."""
        return self.server.call(fn)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        token: str | None = ADMIN_TOKEN,
    ) -> tuple[int, Any]:
        """A raw HTTP request (as `token`'s owner; None: anonymous); returns (status, parsed JSON or
        text). Never raises on HTTP errors."""
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def _path_for(self, manifest: Mapping[str, Any]) -> str:
        api_version, kind = manifest["apiVersion"], manifest["kind"]
        group, _, version = api_version.rpartition("/")
        emulator = self.emulator
        spec = next(
            (s for s in list(emulator._specs.values()) if s.group == group and s.version == version and s.kind == kind),
            None,
        )
        if spec is None:
            raise LookupError(f"The emulator serves no {kind} in {api_version}.")
        prefix = "/api/v1" if not group else f"/apis/{group}/{version}"
        if spec.namespaced:
            namespace = manifest.get("metadata", {}).get("namespace") or "default"
            return f"{prefix}/namespaces/{namespace}/{spec.plural}"
        return f"{prefix}/{spec.plural}"

    def apply(self, manifests: Mapping[str, Any] | list[Mapping[str, Any]] | str | os.PathLike[str]) -> list[Any]:
        """Create objects (or merge-patch them if they exist): dicts, lists, YAML text or files/dirs."""
        docs: list[Mapping[str, Any]] = []
        if isinstance(manifests, Mapping):
            docs = [manifests]
        elif isinstance(manifests, list):
            docs = list(manifests)
        else:
            path = Path(manifests) if not (isinstance(manifests, str) and "\n" in manifests) else None
            if path is not None and path.is_dir():
                texts = [p.read_text() for p in sorted(path.glob("*.y*ml"))]
            elif path is not None and path.exists():
                texts = [path.read_text()]
            else:
                texts = [str(manifests)]
            docs = [d for text in texts for d in yaml.safe_load_all(text) if d]
        results = []
        for doc in docs:
            path = self._path_for(doc)
            status, body = self.request("POST", path, doc)
            if status == 409:
                name = doc["metadata"]["name"]
                status, body = self.request("PATCH", f"{path}/{name}", doc, content_type="application/merge-patch+json")
            if status >= 400:
                raise RuntimeError(f"Applying {doc.get('kind')} {doc.get('metadata', {}).get('name')} failed: {body}")
            results.append(body)
        return results

    def apply_crds(self, path: str | os.PathLike[str]) -> list[Any]:
        """Apply the CRD manifests in a file or directory (e.g. the repository's crds/)."""
        return self.apply(path)

    def ensure_namespace(self, name: str) -> None:
        status, body = self.request(
            "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        )
        if status not in (201, 409):
            raise RuntimeError(f"Cannot create namespace {name}: {body}")


def _write_kubeconfig(path: Path, server: str, user: str, token: str, namespace: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "preferences": {},
                "clusters": [{"name": "emulator", "cluster": {"server": server}}],
                "users": [{"name": user, "user": {"token": token}}],
                "contexts": [
                    {"name": "emulator", "context": {"cluster": "emulator", "user": user, "namespace": namespace}}
                ],
                "current-context": "emulator",
            }
        )
    )
    return path


def install_release(kube: Kube, release: OperatorRelease) -> None:
    """`helm install`: the release's namespaces, then its ServiceAccount, RBAC and QuotaPolicies."""
    for namespace in release.namespaces():
        kube.ensure_namespace(namespace)
    kube.apply(release.installed_objects())


@contextlib.contextmanager
def emulated_cluster(
    directory: Path,
    crd_paths: list[str | os.PathLike[str]] = (),  # type: ignore[assignment]
    release: OperatorRelease | None = None,
    event_ttl: float | None = None,
) -> Iterator[Kube]:
    """Start an emulated API server and write kubeconfigs for it (KUBECONFIG is not touched).

    `release`: the chart installation whose ServiceAccount the operator kubeconfig logs in as
    (default: the chart's defaults in `default`). `event_ttl`: the API server's --event-ttl
    (default: a real server's hour)."""
    release = release if release is not None else OperatorRelease()
    tokens = {
        ADMIN_TOKEN: rbac.admin_user("kubernetes-admin"),
        NODE_TOKEN: rbac.admin_user("system:fake-node"),
        OPERATOR_TOKEN: release.user,
    }
    options: dict[str, Any] = {"tokens": tokens}
    if event_ttl is not None:
        options["event_ttl"] = event_ttl
    server = EmulatorServer(emulator_factory=lambda: Emulator(**options))
    server.start()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        kubeconfig = _write_kubeconfig(directory / "kubeconfig", server.url, "tester", ADMIN_TOKEN, "default")
        operator_kubeconfig = _write_kubeconfig(
            directory / "operator-kubeconfig",
            server.url,
            release.user.name,
            OPERATOR_TOKEN,
            release.watched_namespace or release.namespace,
        )
        kube = Kube(server, kubeconfig, operator_kubeconfig, release)
        kube.ensure_namespace("default")
        for path in crd_paths:
            candidate = Path(path)
            kube.apply_crds(candidate if candidate.is_absolute() else REPO_ROOT / candidate)
        install_release(kube, release)
        yield kube
    finally:
        server.stop()


@pytest.fixture
def kube_crd_paths() -> list[str]:
    """CRD files/directories applied to every ``kube`` cluster. Override to e.g. ``["crds/"]``."""
    return []


@pytest.fixture
def kube_release() -> OperatorRelease:
    """The chart installation the operator runs as. Override, or parametrize the test with
    ``@pytest.mark.parametrize("kube_release", [SINGLE_NAMESPACE, ALL_NAMESPACES])``."""
    return OperatorRelease()


@pytest.fixture
def kube_event_ttl() -> float | None:
    """The emulated API server's event TTL in seconds (None: never)."""
    return TEST_EVENT_TTL


@pytest.fixture
def kube(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kube_crd_paths: list[str],
    kube_release: OperatorRelease,
    kube_event_ttl: float | None,
) -> Iterator[Kube]:
    """An emulated API server on 127.0.0.1 (random port), namespace ``default``, KUBECONFIG set
    (an admin's); the chart installed; operators started with ``run_kopf_operator`` log in as its
    ServiceAccount."""
    with kube_session(tmp_path / "kube", monkeypatch, kube_crd_paths, kube_release, kube_event_ttl) as cluster:
        yield cluster


@contextlib.contextmanager
def kube_session(
    directory: Path,
    monkeypatch: pytest.MonkeyPatch,
    crd_paths: list[str],
    release: OperatorRelease,
    event_ttl: float | None = TEST_EVENT_TTL,
) -> Iterator[Kube]:
    """What the ``kube`` fixture provides, for fixtures of a wider scope (with their own monkeypatch)."""
    saved_default = kubernetes.client.Configuration._default
    access_log = logging.getLogger("aiohttp.access")  # one line per request (pollers!) drowns kopf's logs
    saved_level = access_log.level
    access_log.setLevel(logging.WARNING)
    with emulated_cluster(directory, crd_paths, release, event_ttl) as cluster:
        monkeypatch.setattr(sys.modules[__name__], "_operator_kubeconfig", cluster.operator_kubeconfig)
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
        for name, value in release.operator_env.items():  # the Deployment's TrainPilot settings, as its pod gets them
            if name.startswith("TRAINPILOT_"):
                monkeypatch.setenv(name, value)
        # The client reads $KUBECONFIG once, at import time: point its default location here too.
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(cluster.kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # never the in-cluster config
        try:
            yield cluster
        finally:
            # kopf.login_via_client() loads the kubeconfig into the client's global default.
            kubernetes.client.Configuration._default = saved_default
            access_log.setLevel(saved_level)


# ---------------------------------------------------------------------------------------------
# The fake node
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def make_fake_node(kube: Kube, tmp_path: Path) -> Iterator[Callable[..., FakeNode]]:
    """
    A factory: ``make_fake_node(max_pods=2, retry_backoff=1, ...)`` -> a started FakeNode.

    Several nodes make a multi-node cluster: each schedules and runs pods, and only the first
    one plays the job controller (``run_jobs``). All are stopped (processes killed) at teardown.
    """
    with fake_nodes(kube, tmp_path) as make:
        yield make


@contextlib.contextmanager
def fake_nodes(kube: Kube, directory: Path) -> Iterator[Callable[..., FakeNode]]:
    """What ``make_fake_node`` provides, for fixtures of a wider scope."""
    nodes: list[FakeNode] = []

    def make(**options: Any) -> FakeNode:
        options.setdefault("name", f"fake-node-{len(nodes)}" if nodes else "fake-node")
        options.setdefault("run_jobs", not nodes)  # one job controller per cluster, on the first node
        options.setdefault("workdir", directory / options["name"])
        options.setdefault("headers", {"Authorization": f"Bearer {NODE_TOKEN}"})
        node = FakeNode(kube.url, **options)
        node.start_sync()
        nodes.append(node)
        kube.emulator.pod_log_source = _log_source(nodes)
        return node

    try:
        yield make
    finally:
        kube.emulator.pod_log_source = None
        for node in nodes:
            node.stop_sync()


def _log_source(nodes: list[FakeNode]) -> Callable[[str, str, str | None], str | None]:
    def source(namespace: str, name: str, container: str | None) -> str | None:
        for node in nodes:
            text = node.read_log(name, namespace)
            if text is not None:
                return text
        return None

    return source


@pytest.fixture
def fake_node(make_fake_node: Callable[..., FakeNode]) -> FakeNode:
    """A started fake node (job controller + scheduler + kubelet); its processes die at teardown."""
    return make_fake_node()


# ---------------------------------------------------------------------------------------------
# A real kopf operator, in-process, in its own thread and event loop
# ---------------------------------------------------------------------------------------------


def default_operator_settings() -> kopf.OperatorSettings:
    """kopf settings that suit the emulator: short watch timeouts, no peering, quick exits."""
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 10  # the emulator closes watches after this (timeoutSeconds)
    settings.watching.client_timeout = 15
    settings.watching.connect_timeout = 5
    settings.watching.reconnect_backoff = 0.1
    settings.networking.request_timeout = 15
    settings.networking.connect_timeout = 5
    settings.networking.error_backoffs = (0.1, 0.2, 0.5, 1)
    queueing = getattr(settings, "queueing", None) or settings.batching  # renamed in kopf 1.4x
    queueing.idle_timeout = 2
    queueing.exit_timeout = 2
    settings.peering.standalone = True
    settings.process.ultimate_exiting_timeout = 10
    return settings


def _fresh_registry() -> kopf.OperatorRegistry:
    try:  # the registry kopf's CLI uses: login_via_client as a fallback login handler
        from kopf._core.intents.registries import SmartOperatorRegistry

        return SmartOperatorRegistry()
    except ImportError:  # pragma: no cover - a future kopf
        return kopf.OperatorRegistry()


def _has_login_handler(registry: kopf.OperatorRegistry) -> bool:
    activities = getattr(registry, "_activities", None)
    handlers = getattr(activities, "_handlers", None)
    if handlers is None:
        return True  # cannot tell: trust the caller
    return any(str(getattr(h, "activity", "")).lower().endswith("authentication") for h in handlers)


def load_operator_registry(
    module_or_path: str | os.PathLike[str] | types.ModuleType | None,
    registry: kopf.OperatorRegistry | None = None,
    *,
    reload: bool = True,
) -> kopf.OperatorRegistry:
    """
    Import a handlers module (dotted name, module object, or .py path) into a registry.

    The handlers' decorators register into kopf's default registry at import time, so it is
    swapped for ``registry`` (a fresh one by default) while importing, as ``kopf run`` does.
    A module that is already imported is re-executed (``importlib.reload``) unless
    ``reload=False``, in which case its handlers are wherever they were registered first.
    """
    target = registry if registry is not None else _fresh_registry()
    if module_or_path is not None:
        previous = kopf.get_default_registry()
        kopf.set_default_registry(target)
        try:
            if isinstance(module_or_path, types.ModuleType):
                if reload:
                    importlib.reload(module_or_path)
            elif str(module_or_path).endswith(".py") or os.sep in str(module_or_path):
                path = Path(module_or_path).resolve()
                name = f"_kopf_operator_{path.stem}_{uuid.uuid4().hex[:8]}"
                spec = importlib.util.spec_from_file_location(name, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            else:
                name = str(module_or_path)
                if name in sys.modules and reload:
                    importlib.reload(sys.modules[name])
                else:
                    importlib.import_module(name)
        finally:
            kopf.set_default_registry(previous)
    if not _has_login_handler(target):
        kopf.on.login(registry=target)(kopf.login_via_client)
    return target


# The operator's kubeconfig in the current test (set by the ``kube`` fixture): the chart's ServiceAccount.
_operator_kubeconfig: Path | None = None


@contextlib.contextmanager
def _default_kubeconfig(path: Path | None) -> Iterator[None]:
    """Point the kubernetes client's default kubeconfig (what kopf.login_via_client and the
    operator's own load_credentials() read) at `path` for as long as the operator runs."""
    if path is None:
        yield
        return
    saved_env, saved_location = os.environ.get("KUBECONFIG"), kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    os.environ["KUBECONFIG"] = str(path)
    kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(path)
    try:
        yield
    finally:
        kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = saved_location
        if saved_env is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved_env


class KopfOperator:
    """
    ``kopf.operator()`` in a thread with its own event loop; ``start()`` waits until it is
    ready, ``stop()`` sets its stop flag, waits for a clean exit and re-raises its failure.
    It logs in with ``kopf.login_via_client`` unless the handlers bring their own
    ``@kopf.on.login``, from ``kubeconfig``: by default the operator's (the chart's
    ServiceAccount, see the ``kube`` fixture); pass ``kube.kubeconfig`` to run as an admin.
    """

    def __init__(
        self,
        module_or_path: str | os.PathLike[str] | types.ModuleType | None = None,
        *,
        registry: kopf.OperatorRegistry | None = None,
        namespace: str | None = "default",
        namespaces: list[str] | None = None,
        clusterwide: bool = False,
        settings: kopf.OperatorSettings | None = None,
        configure: Callable[[kopf.OperatorSettings], None] | None = None,
        memo: Any = None,
        reload: bool = True,
        kubeconfig: str | os.PathLike[str] | None = None,
    ) -> None:
        self.kubeconfig = Path(kubeconfig) if kubeconfig is not None else _operator_kubeconfig
        self._identity: contextlib.ExitStack | None = None
        self.registry = load_operator_registry(module_or_path, registry, reload=reload)
        self.settings = settings if settings is not None else default_operator_settings()
        if configure is not None:
            configure(self.settings)
        if clusterwide or (namespace is None and not namespaces):
            self.namespaces: list[str] = []
            self.clusterwide = True
        else:
            self.namespaces = list(namespaces or [namespace])  # type: ignore[list-item]
            self.clusterwide = False
        self.memo = memo
        self._stop_flag = threading.Event()
        self._ready_flag = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._finished = threading.Event()

    def start(self, timeout: float = 20) -> KopfOperator:
        self._identity = contextlib.ExitStack()
        self._identity.enter_context(_default_kubeconfig(self.kubeconfig))
        self._thread = threading.Thread(target=self._run, name="kopf-operator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._ready_flag.wait(0.05):
            if self._finished.is_set():
                self._identity.close()
                raise RuntimeError("The kopf operator exited before it was ready.") from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("The kopf operator did not become ready in time.")
        return self

    def stop(self, timeout: float = 20) -> None:
        self._stop_flag.set()
        try:
            if self._thread is not None:
                self._thread.join(timeout)
                if self._thread.is_alive():
                    raise RuntimeError("The kopf operator did not stop in time.")
        finally:
            if self._identity is not None:
                self._identity.close()
        if self._error is not None:
            raise RuntimeError("The kopf operator failed.") from self._error

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(
                kopf.operator(
                    registry=self.registry,
                    settings=self.settings,
                    standalone=True,
                    clusterwide=self.clusterwide,
                    namespaces=self.namespaces,
                    stop_flag=self._stop_flag,
                    ready_flag=self._ready_flag,
                    memo=self.memo,
                )
            )
        except BaseException as e:  # noqa: BLE001 - re-raised in stop()
            self._error = e
            logger.exception("The kopf operator failed.")
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                self._finished.set()


@contextlib.asynccontextmanager
async def run_kopf_operator(
    module_or_path: str | os.PathLike[str] | types.ModuleType | None = None,
    **kwargs: Any,
) -> AsyncIterator[KopfOperator]:
    """
    Run a real kopf operator in the background for the duration of an ``async with`` block.

    ``module_or_path``: a dotted module name, a module, or a .py file with kopf handlers; or
    None with ``registry=`` for handlers registered into an explicit registry. Keyword options:
    ``namespace`` (default "default"), ``namespaces``, ``clusterwide``, ``settings``,
    ``configure`` (a callback to adjust :func:`default_operator_settings`), ``memo``, ``reload``,
    ``kubeconfig`` (default: the chart's ServiceAccount's, see :class:`KopfOperator`).
    """
    operator = KopfOperator(module_or_path, **kwargs)
    await asyncio.to_thread(operator.start)
    try:
        yield operator
    finally:
        await asyncio.to_thread(operator.stop)


@contextlib.contextmanager
def kopf_operator(
    module_or_path: str | os.PathLike[str] | types.ModuleType | None = None, **kwargs: Any
) -> Iterator[KopfOperator]:
    """The same as :func:`run_kopf_operator`, for sync tests."""
    operator = KopfOperator(module_or_path, **kwargs).start()
    try:
        yield operator
    finally:
        operator.stop()
