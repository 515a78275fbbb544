"""Operator at scale: N experiments x 4 running trials on the emulated API server (issue 3, section 6).

Targets: API requests per cycle per experiment O(1) (the same at 50 and 200 experiments), one
decision cycle per experiment under 50 ms at p95 (the metrics scrape excluded), operator memory
under 300 MB.

Three processes, so that the operator's CPU and memory are its own:
- child 1: the emulated API server (tests.support.kube.emulated_cluster, the repository's CRDs);
  it counts the requests it serves. Two costs of the test emulator that a real API server does not
  have are removed in that child, at run time (the emulator's files are not touched; pass
  --emulator-as-is and --emulator-request-log 5000 to keep them): kmock scans its whole request log
  (5000 by default) for every request, and each list walks every stored object of every kind,
  building a kmock.resource per object. As is, the emulator takes ~54 ms a request at 200
  experiments and saturates long before the operator does.
- child 2: a light metrics stand-in: one aiohttp server on 0.0.0.0:<port> answering every
  /metrics with the trainer's own exposition (trainpilot_trainer.metrics.Metrics; step 100 of
  100000, finite losses, no non-finite loss, a checkpoint), so the heuristic has nothing to decide.
- this process: the operator. Each experiment runs the kopf daemon's body, `agent.drive()`,
  unchanged (parse the spec, make the policy, one KubernetesRuntime kept across cycles,
  run_cycle), all of them on one shared KubeApi, as handlers.run_agent does; only kopf's
  `stopped` flag is replaced by one whose wait() paces the cycles and records figures.

Per scale (a fresh worker process and a fresh emulator each):
1. create N AgentExperiments (examples/quickstart.yaml with parallelTrials 4, maxTrials 500,
   max_steps 100000, metrics port = the stand-in's, intervalSeconds = --interval);
2. "launch": every daemon's first cycle, all at once; the heuristic launches 4 trials each
   through the real runtime (ledger, Event, annotation, 2 ConfigMaps, Service, Job per trial);
3. the bench plays kubelet: one Running rank-0 pod per Job (labels experiment, trial,
   job-completion-index "0"; podIP 127.1.x.y), created and status-patched through the API;
4. "warmup": one cycle each (the trials become Running);
5. "lockstep": rounds in which all N daemons start together, as after an operator restart (kopf
   starts every daemon at once);
6. "staggered": daemon i starts at interval * (round + i/N): daemons spread evenly in time;
7. "drive-paced": all start together once more, then each sleeps what drive() asks for
   (intervalSeconds after its cycle), i.e. the operator's own pacing after a restart.

Figures per cycle: wall time of one daemon iteration minus the time inside
runtime.scrape.scrape_all (the scrape is shown on its own line), split into time awaiting
KubeApi.call and the rest (the event loop's own work); API requests (KubeApi.call, per daemon
through a contextvar; also the emulator's own count); decisions made (0 after launch). Per phase:
this process's CPU time; at the end: its RSS, its peak RSS, and the RSS added since before the
runtimes were made.

Run:  cd /work/main && .venv/bin/python bench/operator_scale.py            (50 and 200, ~1.5 min here)
      options: --scales 50,200 --interval 5 --pool-maxsize 16 --executor-workers 16 --json
      diagnostics: --profile-operator /tmp/op (cProfile of the staggered phase), --tracemalloc,
      OPERATOR_SCALE_PROFILE_EMULATOR=/tmp/emu.prof (cProfile of the emulator's thread)
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "operator", REPO / "trainer_image"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

NAMESPACE = "default"
EXPERIMENTS_PATH = f"/apis/trainpilot.dev/v1alpha1/namespaces/{NAMESPACE}/agentexperiments"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="50,200", help="experiment counts, comma-separated")
    parser.add_argument("--trials", type=int, default=4, help="running trials per experiment")
    parser.add_argument("--lockstep-rounds", type=int, default=3, help="cycles with all daemons starting together")
    parser.add_argument("--staggered-rounds", type=int, default=3, help="rounds of staggered cycles")
    parser.add_argument(
        "--drive-rounds", type=int, default=3, help="rounds paced by drive() itself, all daemons starting together"
    )
    parser.add_argument(
        "--interval", type=float, default=5.0, help="seconds between one daemon's staggered cycles (default spec: 30)"
    )
    parser.add_argument("--pool-maxsize", type=int, default=0, help="urllib3 pool size (0: as the operator sets it)")
    parser.add_argument("--executor-workers", type=int, default=0, help="KubeApi thread pool size (0: as the operator)")
    parser.add_argument(
        "--emulator-request-log",
        type=int,
        default=1,
        help="requests the emulator keeps for kmock's reaction matching (its default, 5000, makes every request "
        "scan them all: ~10-50 ms a request once full)",
    )
    parser.add_argument(
        "--emulator-as-is",
        action="store_true",
        help="keep the emulator's list path as is (a kmock.resource built per stored object, every kind scanned)",
    )
    parser.add_argument(
        "--profile-operator",
        metavar="PREFIX",
        help="diagnostics: cProfile the staggered phase (event loop -> PREFIX.loop, KubeApi threads -> PREFIX.threads)",
    )
    parser.add_argument(
        "--tracemalloc", action="store_true", help="diagnostics: the allocations kept since before the runtimes"
    )
    parser.add_argument("--json", action="store_true", help="also print every scale's figures as JSON")
    # internal
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["emulator", "metrics"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# =============================================================================================
# Child processes: the emulated API server and the metrics stand-in
# =============================================================================================


def _serve_stdin(stats: Any) -> None:
    """Answer 'stats' lines on stdin with one JSON line; return at EOF."""
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps(stats()), flush=True)


def child_emulator(workdir: str, request_log: int, as_is: bool) -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    from tests.kube import emulator as emulator_module
    from tests.support.kube import emulated_cluster

    counters = {"requests": 0, "busy_s": 0.0}
    original = emulator_module.Emulator.__call__

    async def counted(self: Any, raw_request: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(self, raw_request)
        finally:
            counters["requests"] += 1
            counters["busy_s"] += time.perf_counter() - started

    emulator_module.Emulator.__call__ = counted  # type: ignore[method-assign]
    if not as_is:
        # Emulator._do_list compares every stored object's resource with `spec.resource`, a
        # property that builds a new kmock.resource (typing-Protocol isinstance checks, ~30 us)
        # for each object: ~190 ms per list at 200 experiments. Cache it (same values, same
        # semantics) so the figures show the operator, not this cost of the test emulator.
        import kmock

        cache: dict[tuple[str, str, str], Any] = {}

        def cached_resource(self: Any) -> Any:
            key = (self.group, self.version, self.plural)
            found = cache.get(key)
            if found is None:
                found = cache[key] = kmock.resource(group=self.group, version=self.version, plural=self.plural)
            return found

        emulator_module.ResourceSpec.resource = property(cached_resource)  # type: ignore[method-assign,assignment]

        # Emulator._do_list also scans every stored object of every kind (`self._live()`), so a
        # list costs O(all objects): ~50 ms at 200 experiments. A real API server reads one
        # resource's prefix. Index the keys by resource, and let _live() see only the listed
        # resource's objects while _do_list runs (it has no await: nothing interleaves).
        index: dict[Any, set[Any]] = {}
        listing: list[Any] = []
        original_store, original_live, original_do_list = (
            emulator_module.Emulator._store,
            emulator_module.Emulator._live,
            emulator_module.Emulator._do_list,
        )

        def indexed_store(self: Any, spec: Any, key: Any, new: Any, old: Any) -> Any:
            index.setdefault(key[0], set()).add(key)
            return original_store(self, spec, key, new, old)

        def indexed_live(self: Any) -> Any:
            if not listing:
                yield from original_live(self)
                return
            for key in list(index.get(listing[-1], ())):
                obj = self.objects[key] if key in self.objects else None
                if obj is not None and not obj.deleted:
                    yield key, obj.raw

        async def indexed_do_list(self: Any, request: Any) -> Any:
            try:
                resource = self._spec_of(request).resource
            except Exception:
                return await original_do_list(self, request)  # the original raises the same error
            listing.append(resource)
            try:
                return await original_do_list(self, request)
            finally:
                listing.pop()

        emulator_module.Emulator._store = indexed_store  # type: ignore[method-assign]
        emulator_module.Emulator._live = indexed_live  # type: ignore[method-assign]
        emulator_module.Emulator._do_list = indexed_do_list  # type: ignore[method-assign]
    profile_path = os.environ.get("OPERATOR_SCALE_PROFILE_EMULATOR")
    if profile_path:  # diagnostics: cProfile the emulator's thread, stats written at exit
        import cProfile

        original_run = emulator_module.EmulatorServer._run

        def profiled_run(self: Any) -> None:
            profiler = cProfile.Profile()
            try:
                profiler.runcall(original_run, self)
            finally:
                profiler.dump_stats(profile_path)

        emulator_module.EmulatorServer._run = profiled_run  # type: ignore[method-assign]
    with emulated_cluster(Path(workdir), [REPO / "crds"]) as kube:
        if request_log:
            # kmock matches each request against its reactions by scanning the request log
            # (`request in view`, by identity): keep it short so the emulator's cost is the
            # API server's work, not O(requests seen so far).
            def shorten() -> None:
                kube.emulator.request_log_size = request_log
                del kube.emulator._requests[:-request_log]

            kube.call(shorten)
        print(json.dumps({"url": kube.url, "kubeconfig": str(kube.kubeconfig)}), flush=True)
        _serve_stdin(lambda: {**counters, "cpu_s": time.process_time(), "rss": _rss()})


def _exposition() -> bytes:
    try:
        from prometheus_client import generate_latest

        from trainpilot_trainer.metrics import Metrics

        metrics = Metrics(max_steps=100_000, loss_floor=1.2)
        metrics.step.set(100)
        metrics.train_loss.set(2.5)
        metrics.val_loss.set(2.6)
        metrics.learning_rate.set(1e-3)
        metrics.weight_decay.set(0.01)
        metrics.grad_norm.set(0.9)
        metrics.tokens_per_second.set(12_000)
        metrics.checkpoint_step.set(100)
        for _ in range(100):
            metrics.step_seconds.observe(0.02)
        return generate_latest(metrics.registry)
    except ImportError:  # the trainer package is not importable: the same names by hand
        lines = [
            "trainpilot_step 100",
            "trainpilot_max_steps 100000",
            "trainpilot_train_loss 2.5",
            "trainpilot_val_loss 2.6",
            "trainpilot_learning_rate 0.001",
            "trainpilot_grad_norm 0.9",
            "trainpilot_tokens_per_second 12000",
            "trainpilot_checkpoint_step 100",
            "trainpilot_nonfinite_loss_total 0",
            "trainpilot_control_generation 0",
        ]
        return ("\n".join(lines) + "\n").encode()


def child_metrics() -> None:
    logging.basicConfig(level=logging.WARNING)
    from aiohttp import web

    body = _exposition()
    counters = {"requests": 0}
    ready = threading.Event()
    info: dict[str, Any] = {}

    async def handle(_request: web.Request) -> web.Response:
        counters["requests"] += 1
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/metrics", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        # 0.0.0.0: pods get podIPs 127.1.x.y, all of 127/8 is local, one socket answers them all.
        site = web.TCPSite(runner, "0.0.0.0", 0, backlog=4096)
        await site.start()
        info["port"] = runner.addresses[0][1]
        ready.set()
        await asyncio.Event().wait()

    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
    ready.wait(10)
    print(json.dumps({"port": info["port"], "bytes": len(body)}), flush=True)
    _serve_stdin(lambda: {**counters, "cpu_s": time.process_time(), "rss": _rss()})


class Child:
    """A child process of this script; `stats()` asks it for its counters."""

    def __init__(self, kind: str, workdir: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", kind, "--workdir", workdir, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the {kind} child did not start")
        self.info = json.loads(line)

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


# =============================================================================================
# The operator side (worker process, one scale)
# =============================================================================================


@dataclass
class Iteration:
    phase: str
    wall_s: float
    scrape_s: float
    cycle_s: float  # run_cycle alone (drive's own work per iteration is in wall_s)
    api_s: float  # awaiting KubeApi.call (thread pool queue + HTTP round trip + client (de)serialization)
    calls: int
    records: int
    scraped: int
    scrape_ok: int


@dataclass
class Daemon:
    """One experiment's daemon: its counters (fed through a contextvar) and its iterations."""

    index: int
    name: str
    calls: int = 0
    api_s: float = 0.0
    scrape_s: float = 0.0
    scraped: int = 0
    scrape_ok: int = 0
    cycle_s: float = 0.0
    records: int = 0
    status: Any = None
    iterations: list[Iteration] = field(default_factory=list)
    _mark: tuple[float, int, float, int, int, int, float] = (0.0, 0, 0.0, 0, 0, 0, 0.0)
    done: bool = False

    def begin(self) -> None:
        self.cycle_s = 0.0
        self._mark = (
            time.perf_counter(),
            self.calls,
            self.scrape_s,
            self.records,
            self.scraped,
            self.scrape_ok,
            self.api_s,
        )

    def end(self, phase: str) -> None:
        started, calls, scrape_s, records, scraped, ok, api_s = self._mark
        self.iterations.append(
            Iteration(
                phase=phase,
                wall_s=time.perf_counter() - started,
                scrape_s=self.scrape_s - scrape_s,
                cycle_s=self.cycle_s,
                api_s=self.api_s - api_s,
                calls=self.calls - calls,
                records=self.records - records,
                scraped=self.scraped - scraped,
                scrape_ok=self.scrape_ok - ok,
            )
        )


CURRENT: contextvars.ContextVar[Daemon | None] = contextvars.ContextVar("daemon", default=None)


FREE_RUNNING = ("staggered", "drive")  # phases whose rounds follow each other without a gate


class Controller:
    """Paces every daemon's iterations.

    A gate after iteration k (all N daemons arrive, the bench does its work, all are released at
    once) precedes every change of phase and every lockstep round. Within a free-running phase
    there is no gate: "staggered" starts daemon i at phase_start + interval * (round + i/N);
    "drive" sleeps whatever timeout drive() asked for (spec.policy.intervalSeconds).
    """

    def __init__(self, n: int, phases: list[str], interval: float) -> None:
        self.n = n
        self.phases = phases  # phase of iteration i
        self.interval = interval
        self.arrived: dict[int, int] = {}
        self.all_arrived: dict[int, asyncio.Event] = {}
        self.release: dict[int, asyncio.Event] = {}
        self.phase_start: dict[int, float] = {}  # first iteration of a free-running phase -> its start

    def gated(self, k: int) -> bool:
        """Whether a gate follows iteration k."""
        if k + 1 >= len(self.phases):
            return False
        return not (self.phases[k] == self.phases[k + 1] and self.phases[k] in FREE_RUNNING)

    def gates(self) -> list[int]:
        return [k for k in range(len(self.phases)) if self.gated(k)]

    def gate(self, k: int) -> tuple[asyncio.Event, asyncio.Event]:
        if k not in self.release:
            self.all_arrived[k], self.release[k] = asyncio.Event(), asyncio.Event()
            self.arrived[k] = 0
        return self.all_arrived[k], self.release[k]

    async def after(self, daemon: Daemon, timeout: float | None = None) -> None:
        """Called when `daemon` finished iteration k = len(iterations) - 1; returns when it may go on."""
        k = len(daemon.iterations) - 1
        if k + 1 >= len(self.phases):
            daemon.done = True
            return
        following = self.phases[k + 1]
        if self.gated(k):
            all_arrived, release = self.gate(k)
            self.arrived[k] += 1
            if self.arrived[k] == self.n:
                all_arrived.set()
            await release.wait()
        if following == "drive" and self.phases[k] == "drive":
            await asyncio.sleep(timeout or 0)  # drive()'s own pacing; its first round starts at once
        elif following == "staggered":
            first = k + 1
            while first > 0 and self.phases[first - 1] == "staggered":
                first -= 1
            slot = self.phase_start[first] + self.interval * (daemon.index / self.n + (k + 1 - first))
            delay = slot - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)


class BenchStopped:
    """kopf's DaemonStopped for agent.drive(): false until the bench's last iteration."""

    def __init__(self, daemon: Daemon, controller: Controller) -> None:
        self.daemon, self.controller = daemon, controller

    def __bool__(self) -> bool:
        return self.daemon.done

    async def wait(self, timeout: float | None = None) -> None:
        daemon = self.daemon
        daemon.end(self.controller.phases[len(daemon.iterations)])
        await self.controller.after(daemon, timeout)
        daemon.begin()


def experiment_manifest(name: str, port: int, trials: int, interval: int = 30) -> dict[str, Any]:
    import yaml

    quickstart = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    spec = quickstart["spec"]
    spec["budget"] = {"maxTrials": 500, "parallelTrials": trials, "maxFailedTrials": 2}
    spec["trialTemplate"]["hyperparameters"]["max_steps"] = 100_000  # ASHA rungs far beyond step 100
    spec["metrics"] = {"port": port, "path": "/metrics", "scrapeTimeoutSeconds": 2}
    spec["policy"]["intervalSeconds"] = interval
    return {
        "apiVersion": quickstart["apiVersion"],
        "kind": quickstart["kind"],
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


async def _bulk(session: Any, requests: list[tuple[str, str, Any, str]], concurrency: int = 32) -> list[Any]:
    """Send (method, path, body, content type) requests, `concurrency` at a time; all must succeed."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(method: str, path: str, body: Any, content_type: str) -> Any:
        async with semaphore:
            headers = {"Content-Type": content_type}
            async with session.request(method, path, data=json.dumps(body), headers=headers) as response:
                payload = await response.json(content_type=None)
                if response.status >= 400:
                    raise RuntimeError(f"{method} {path}: {response.status} {payload}")
                return payload

    return await asyncio.gather(*(one(*request) for request in requests))


def rank0_pod(experiment: str, trial: str, ip_index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the job controller and the kubelet would make of a trial's Job: its Running rank-0 pod."""
    from trainpilot.api import contract

    ip = f"127.1.{ip_index // 250}.{ip_index % 250 + 1}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{trial}-0",
            "namespace": NAMESPACE,
            "labels": {
                contract.LABEL_EXPERIMENT: experiment,
                contract.LABEL_TRIAL: trial,
                contract.LABEL_COMPLETION_INDEX: "0",
                "batch.kubernetes.io/job-name": trial,
                "job-name": trial,
            },
        },
        "spec": {"restartPolicy": "Never", "containers": [{"name": "trainer", "image": "trainpilot/trainer:0.1.0"}]},
    }
    status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1"}}
    return pod, status


class _CountFilter(logging.Filter):
    """Counts (and hides) urllib3's 'Connection pool is full' warnings; counts trainpilot's warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.pool_full = 0
        self.warnings: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Connection pool is full" in message:
            self.pool_full += 1
            return False
        if record.name.startswith("trainpilot") and record.levelno >= logging.WARNING:
            self.warnings.append(message)
            return len(self.warnings) <= 5
        return True


async def run_scale(args: argparse.Namespace, n: int) -> dict[str, Any]:
    import psutil

    counter = _CountFilter()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(counter)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])

    process = psutil.Process()
    import aiohttp
    import kopf  # noqa: F401  the real operator has it loaded: count its memory
    import kubernetes

    from trainpilot.api.quota import effective_limits
    from trainpilot.controller import agent
    from trainpilot.runtime import scrape
    from trainpilot.runtime.kubernetes import api as api_module
    from trainpilot.runtime.kubernetes.api import KubeApi

    if args.executor_workers:
        from concurrent.futures import ThreadPoolExecutor

        api_module._EXECUTOR = ThreadPoolExecutor(max_workers=args.executor_workers, thread_name_prefix="kube-api")

    # Counting hooks: per daemon, through the contextvar each daemon's task carries.
    import cProfile

    thread_profiles: list[cProfile.Profile] = []
    local = threading.local()
    profiling = [False]

    def profiled(fn: Any) -> Any:
        def run(*a: Any, **kw: Any) -> Any:
            if not profiling[0]:
                return fn(*a, **kw)
            if not hasattr(local, "profile"):
                local.profile = cProfile.Profile()
                thread_profiles.append(local.profile)
            return local.profile.runcall(fn, *a, **kw)

        return run

    class CountingKubeApi(KubeApi):
        async def call(self, what: str, fn: Any, *a: Any, **kw: Any) -> Any:
            if args.profile_operator:
                fn = profiled(fn)
            daemon = CURRENT.get()
            if daemon is None:
                return await super().call(what, fn, *a, **kw)
            daemon.calls += 1
            started = time.perf_counter()
            try:
                return await super().call(what, fn, *a, **kw)
            finally:
                daemon.api_s += time.perf_counter() - started

    original_scrape_all = scrape.scrape_all

    async def timed_scrape_all(urls: Any, timeout: float) -> Any:
        started = time.perf_counter()
        try:
            result = await original_scrape_all(urls, timeout)
        finally:
            daemon = CURRENT.get()
            if daemon is not None:
                daemon.scrape_s += time.perf_counter() - started
        if daemon is not None:
            daemon.scraped += len(urls)
            daemon.scrape_ok += sum(value is not None for value in result.values())
        return result

    scrape.scrape_all = timed_scrape_all  # runtime.py calls scrape.scrape_all: module attribute lookup
    original_run_cycle = agent.run_cycle

    async def counted_run_cycle(*a: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        result = await original_run_cycle(*a, **kw)
        daemon = CURRENT.get()
        if daemon is not None:
            daemon.cycle_s += time.perf_counter() - started
            daemon.records += len(result.records) + len(result.recovered)
            daemon.status = result.status
        return result

    agent.run_cycle = counted_run_cycle  # drive() calls the name it imported into agent

    rss_imports = process.memory_info().rss
    workdir = tempfile.mkdtemp(prefix="operator-scale-")
    emulator = Child(
        "emulator",
        workdir,
        f"--emulator-request-log={args.emulator_request_log}",
        f"--drive-rounds={args.drive_rounds}",
        *(["--emulator-as-is"] if args.emulator_as_is else []),
    )
    metrics = Child("metrics", workdir)
    figures: dict[str, Any] = {"experiments": n, "trials": args.trials}
    try:
        base = emulator.info["url"]
        port = metrics.info["port"]
        names = [f"scale-{i:04d}" for i in range(n)]
        spec_interval = max(1, round(args.interval))  # what drive() waits between cycles
        started = time.perf_counter()
        async with aiohttp.ClientSession(base) as session:
            bodies = await _bulk(
                session,
                [
                    (
                        "POST",
                        EXPERIMENTS_PATH,
                        experiment_manifest(name, port, args.trials, spec_interval),
                        "application/json",
                    )
                    for name in names
                ],
            )
        figures["seed_experiments_s"] = time.perf_counter() - started

        configuration = api_module.client_configuration(config_file=emulator.info["kubeconfig"])
        if args.pool_maxsize:
            configuration.connection_pool_maxsize = args.pool_maxsize
        api = CountingKubeApi(kubernetes.client.ApiClient(configuration))
        figures["pool_maxsize"] = configuration.connection_pool_maxsize
        figures["executor_workers"] = api_module._EXECUTOR._max_workers

        phases = (
            ["launch", "warmup"]
            + ["lockstep"] * args.lockstep_rounds
            + ["staggered"] * args.staggered_rounds
            + ["drive"] * args.drive_rounds
        )
        controller = Controller(n, phases, args.interval)
        daemons = [Daemon(index=i, name=name) for i, name in enumerate(names)]

        def quota_limits(namespace: str) -> Any:
            return effective_limits([], namespace)  # what handlers.run_agent computes with no QuotaPolicy

        async def run_daemon(daemon: Daemon, body: dict[str, Any]) -> None:
            CURRENT.set(daemon)
            daemon.begin()
            await agent.drive(body, BenchStopped(daemon, controller), api, quota_limits)

        snapshots: dict[str, dict[str, Any]] = {}

        def snapshot(label: str) -> None:
            snapshots[label] = {
                "t": time.perf_counter(),
                "cpu_s": time.process_time(),
                "rss": process.memory_info().rss,
                "calls": api.calls,
                "emulator": emulator.stats(),
                "metrics": metrics.stats(),
            }

        if args.tracemalloc:
            import tracemalloc

            tracemalloc.start(8)
            traced_before = tracemalloc.take_snapshot()
        snapshot("before_runtimes")
        tasks = [asyncio.create_task(run_daemon(daemon, body)) for daemon, body in zip(daemons, bodies, strict=True)]

        async def gate(k: int) -> None:
            all_arrived, release = controller.gate(k)
            waiting = asyncio.create_task(all_arrived.wait())
            done, _ = await asyncio.wait({waiting, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            if waiting not in done:
                for task in done:
                    task.result()  # a daemon ended early: show why
                raise RuntimeError("a daemon ended before the gate")

        # Gate after iteration 0 (launch): the bench plays kubelet before anyone goes on.
        await gate(0)
        snapshot("gate_0")
        pods: list[tuple[str, str, Any, str]] = []
        statuses: list[tuple[str, str, Any, str]] = []
        ip_index = 0
        for daemon in daemons:
            trials = [trial.name for trial in daemon.status.active_trials] if daemon.status else []
            if len(trials) != args.trials:
                raise RuntimeError(f"{daemon.name} launched {len(trials)} trials, not {args.trials}")
            for trial in trials:
                pod, status = rank0_pod(daemon.name, trial, ip_index)
                ip_index += 1
                pods.append(("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod, "application/json"))
                statuses.append(
                    (
                        "PATCH",
                        f"/api/v1/namespaces/{NAMESPACE}/pods/{pod['metadata']['name']}/status",
                        status,
                        "application/merge-patch+json",
                    )
                )
        started = time.perf_counter()
        async with aiohttp.ClientSession(base) as session:
            await _bulk(session, pods)
            await _bulk(session, statuses)
        figures["seed_pods_s"] = time.perf_counter() - started
        del pods, statuses
        controller.release[0].set()

        # The other gates: warmup, each lockstep round, and the start of each free-running phase.
        for k in controller.gates()[1:]:
            await gate(k)
            snapshot(f"gate_{k}")
            if phases[k + 1] in FREE_RUNNING:
                controller.phase_start[k + 1] = time.perf_counter()
            if args.profile_operator and phases[k + 1] == "staggered":
                loop_profile = cProfile.Profile()
                profiling[0] = True
                loop_profile.enable()
            if args.profile_operator and phases[k] == "staggered":
                loop_profile.disable()
                profiling[0] = False
            controller.release[k].set()
        await asyncio.gather(*tasks)
        if args.profile_operator:
            loop_profile.disable()
            profiling[0] = False  # the staggered phase only: its figures are the ones to explain
            loop_profile.dump_stats(f"{args.profile_operator}.loop")
            if thread_profiles:
                import pstats

                merged = pstats.Stats(thread_profiles[0])
                for extra in thread_profiles[1:]:
                    merged.add(extra)
                merged.dump_stats(f"{args.profile_operator}.threads")
        snapshot("end")
        if args.tracemalloc:
            import gc

            gc.collect()
            traced_after = tracemalloc.take_snapshot()
            print(f"tracemalloc, kept since before runtimes ({n} experiments):", file=sys.stderr)
            for stat in traced_after.compare_to(traced_before, "traceback")[:12]:
                print(f"  {stat.size_diff / 2**20:+.2f} MiB {stat.count_diff:+d} blocks", file=sys.stderr)
                for line in stat.traceback.format()[-6:]:
                    print("      " + line, file=sys.stderr)
            current, _peak = tracemalloc.get_traced_memory()
            print(f"  traced now {current / 2**20:.1f} MiB", file=sys.stderr)
        figures.update(summarize(args, n, daemons, snapshots, phases, rss_imports, counter, metrics.info))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        figures["ru_maxrss"] = max(peak, snapshots["end"]["rss"])
    finally:
        emulator.close()
        metrics.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return figures


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize(
    args: argparse.Namespace,
    n: int,
    daemons: list[Daemon],
    snaps: dict[str, dict[str, Any]],
    phases: list[str],
    rss_imports: int,
    counter: _CountFilter,
    metrics_info: dict[str, Any],
) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def window(phase: str) -> tuple[str, str]:
        ks = [k for k, name in enumerate(phases) if name == phase]
        start = "before_runtimes" if ks[0] == 0 else f"gate_{ks[0] - 1}"
        end = f"gate_{ks[-1]}" if f"gate_{ks[-1]}" in snaps else "end"
        return start, end

    for phase in ("launch", "lockstep", "staggered", "drive"):
        its = [it for daemon in daemons for it in daemon.iterations if it.phase == phase]
        if not its:
            continue
        first, last = (snaps[label] for label in window(phase))
        cycles = len(its)
        excl = [1000 * (it.wall_s - it.scrape_s) for it in its]
        out[phase] = {
            "cycles": cycles,
            "excl_scrape_ms_p50": _pct(excl, 50),
            "excl_scrape_ms_p95": _pct(excl, 95),
            "excl_scrape_ms_max": max(excl),
            "run_cycle_excl_scrape_ms_p95": _pct([1000 * (it.cycle_s - it.scrape_s) for it in its], 95),
            "api_wait_ms_p50": _pct([1000 * it.api_s for it in its], 50),
            "api_wait_ms_p95": _pct([1000 * it.api_s for it in its], 95),
            "own_ms_p50": _pct([1000 * (it.wall_s - it.scrape_s - it.api_s) for it in its], 50),
            "own_ms_p95": _pct([1000 * (it.wall_s - it.scrape_s - it.api_s) for it in its], 95),
            "scrape_ms_p50": _pct([1000 * it.scrape_s for it in its], 50),
            "scrape_ms_p95": _pct([1000 * it.scrape_s for it in its], 95),
            "calls_per_cycle": sum(it.calls for it in its) / cycles,
            "calls_min": min(it.calls for it in its),
            "calls_max": max(it.calls for it in its),
            "kubeapi_calls_delta_per_cycle": (last["calls"] - first["calls"]) / cycles,
            "emulator_requests_per_cycle": (last["emulator"]["requests"] - first["emulator"]["requests"]) / cycles,
            "emulator_busy_ms_per_request": 1000
            * (last["emulator"]["busy_s"] - first["emulator"]["busy_s"])
            / max(1, last["emulator"]["requests"] - first["emulator"]["requests"]),
            "emulator_cpu_s": last["emulator"]["cpu_s"] - first["emulator"]["cpu_s"],
            "operator_cpu_ms_per_cycle": 1000 * (last["cpu_s"] - first["cpu_s"]) / cycles,
            "operator_cpu_s": last["cpu_s"] - first["cpu_s"],
            "wall_s": last["t"] - first["t"],
            "decisions": sum(it.records for it in its),
            "scraped": sum(it.scraped for it in its),
            "scrape_ok": sum(it.scrape_ok for it in its),
            "metrics_requests": last["metrics"]["requests"] - first["metrics"]["requests"],
        }
    if "drive" in out:
        # drive()'s pacing after the restart-like start: the rounds after the first show whether the
        # daemons stay in lockstep (they do unless drive() spreads them) or spread out.
        later = [
            1000 * (it.wall_s - it.scrape_s)
            for daemon in daemons
            for it in [it for it in daemon.iterations if it.phase == "drive"][1:]
        ]
        out["drive"]["later_excl_scrape_ms_p50"] = _pct(later, 50)
        out["drive"]["later_excl_scrape_ms_p95"] = _pct(later, 95)
    lock_rounds = [k for k, phase in enumerate(phases) if phase == "lockstep"]
    if lock_rounds:
        # Makespan of a lockstep round: from its release to the last daemon's arrival.
        spans = []
        for k in lock_rounds:
            spans.append(snaps[f"gate_{k}"]["t"] - snaps[f"gate_{k - 1}"]["t"])
        out["lockstep"]["round_makespan_s"] = statistics.median(spans)
    out["rss_imports_mb"] = rss_imports / 2**20
    out["rss_before_runtimes_mb"] = snaps["before_runtimes"]["rss"] / 2**20
    out["rss_end_mb"] = snaps["end"]["rss"] / 2**20
    out["rss_delta_mb"] = (snaps["end"]["rss"] - snaps["before_runtimes"]["rss"]) / 2**20
    out["emulator_rss_mb"] = snaps["end"]["emulator"]["rss"] / 2**20
    out["pool_full_warnings"] = counter.pool_full
    out["operator_warnings"] = len(counter.warnings)
    out["operator_warning_samples"] = counter.warnings[:3]
    out["exposition_bytes"] = metrics_info.get("bytes")
    return out


# =============================================================================================
# Report
# =============================================================================================


def report(args: argparse.Namespace, results: list[dict[str, Any]], command: str) -> None:
    cols = [f"{r['experiments']} exp" for r in results]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fmt: Any) -> None:
        cells = []
        for r in results:
            try:
                cells.append(fmt(r))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        rows.append((label, cells))

    def p50_95(phase: str, key: str, digits: int = 1) -> Any:
        return lambda r: f"{r[phase][key + '_ms_p50']:.{digits}f} / {r[phase][key + '_ms_p95']:.{digits}f}"

    S, L, D, LA = "staggered", "lockstep", "drive", "launch"
    row(
        "API requests / cycle / experiment",
        lambda r: f"{r[S]['calls_per_cycle']:.2f} (min {r[S]['calls_min']}, max {r[S]['calls_max']})",
    )
    row("  same, counted by the emulator", lambda r: f"{r[S]['emulator_requests_per_cycle']:.2f}")
    row(
        "  same, lockstep / drive-paced rounds",
        lambda r: f"{r[L]['calls_per_cycle']:.2f} / {r[D]['calls_per_cycle']:.2f}",
    )
    row("cycle excl. scrape ms p50 / p95: staggered", p50_95(S, "excl_scrape"))
    row("  of which awaiting KubeApi.call", p50_95(S, "api_wait"))
    row("  of which in the event loop", p50_95(S, "own"))
    row("cycle excl. scrape ms p50 / p95: lockstep", p50_95(L, "excl_scrape", 0))
    row("cycle excl. scrape ms p50 / p95: drive-paced", p50_95(D, "excl_scrape", 0))
    row("  drive-paced, rounds after the first", p50_95(D, "later_excl_scrape", 0))
    row("scrape (excluded) ms p50 / p95: staggered", p50_95(S, "scrape"))
    row("scrape (excluded) ms p50 / p95: lockstep", p50_95(L, "scrape", 0))
    row(
        "operator CPU ms / cycle, scrape incl. (stag / lock)",
        lambda r: f"{r[S]['operator_cpu_ms_per_cycle']:.1f} / {r[L]['operator_cpu_ms_per_cycle']:.1f}",
    )
    row(
        "emulator ms / request (stag / lock)",
        lambda r: f"{r[S]['emulator_busy_ms_per_request']:.1f} / {r[L]['emulator_busy_ms_per_request']:.1f}",
    )
    row(
        "lockstep round: all N cycles take s",
        lambda r: f"{r[L]['round_makespan_s']:.2f} ({r['experiments'] / r[L]['round_makespan_s']:.0f}/s)",
    )
    row(
        "launch cycle: requests / exp, p95 ms",
        lambda r: f"{r[LA]['calls_per_cycle']:.1f}, {r[LA]['excl_scrape_ms_p95']:.0f}",
    )
    row("decisions after launch (must be 0)", lambda r: f"{sum(r[ph]['decisions'] for ph in (L, S, D))}")
    row(
        "scrapes answered",
        lambda r: f"{sum(r[ph]['scrape_ok'] for ph in (L, S, D))}/{sum(r[ph]['scraped'] for ph in (L, S, D))}",
    )
    row(
        "operator RSS MB at end (+ since before runtimes)",
        lambda r: f"{r['rss_end_mb']:.0f} (+{r['rss_delta_mb']:.0f})",
    )
    row("operator peak RSS MB", lambda r: f"{r['ru_maxrss'] / 2**20:.0f}")
    row("urllib3 'Connection pool is full' warnings", lambda r: f"{r['pool_full_warnings']}")
    row("operator warnings logged", lambda r: f"{r['operator_warnings']}")

    width = max(len(label) for label, _ in rows)
    widths = [max(len(c), *(len(cells[i]) for _, cells in rows)) for i, c in enumerate(cols)]
    first = results[0]
    print()
    print(
        f"operator scale: {args.trials} running trials per experiment; "
        f"KubeApi threads {first.get('executor_workers')}, "
        f"urllib3 pool {first.get('pool_maxsize')}; interval {args.interval:g} s (spec default 30 s); rounds: "
        f"lockstep {args.lockstep_rounds}, staggered {args.staggered_rounds}, drive-paced {args.drive_rounds}"
    )
    print(f"{'':<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)))
    for label, cells in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    big = results[-1]
    verdicts = []
    if len(results) >= 2:
        ratio = big[S]["calls_per_cycle"] / first[S]["calls_per_cycle"]
        verdicts.append(
            f"requests/cycle/experiment {big['experiments']} vs {first['experiments']} experiments: ratio {ratio:.3f} "
            f"-> O(1) {'yes' if abs(ratio - 1) < 0.05 else 'NO'}"
        )
    p95 = {phase: big[phase]["excl_scrape_ms_p95"] for phase in (S, L)}
    p95[D] = big[D].get("later_excl_scrape_ms_p95", big[D]["excl_scrape_ms_p95"])
    verdicts.append(
        f"p95 < 50 ms at {big['experiments']}: staggered {'yes' if p95[S] < 50 else 'NO'} ({p95[S]:.1f} ms), "
        f"lockstep {'yes' if p95[L] < 50 else 'NO'} ({p95[L]:.0f} ms), drive-paced after its first round "
        f"{'yes' if p95[D] < 50 else 'NO'} "
        f"({p95[D]:.0f} ms)"
    )
    verdicts.append(
        f"memory < 300 MB at {big['experiments']}: {'yes' if big['ru_maxrss'] < 300 * 2**20 else 'NO'} "
        f"(peak RSS {big['ru_maxrss'] / 2**20:.0f} MB)"
    )
    for line in verdicts:
        print(line)
    for r in results:
        for sample in r.get("operator_warning_samples", []):
            print(f"  warning at {r['experiments']}: {sample}")
    print(f"command: {command}")


def main() -> None:
    args = parse_args()
    if args.child == "emulator":
        child_emulator(args.workdir, args.emulator_request_log, args.emulator_as_is)
        return
    if args.child == "metrics":
        child_metrics()
        return
    if args.worker:
        figures = asyncio.run(run_scale(args, args.worker))
        print("RESULT " + json.dumps(figures), flush=True)
        return

    command = f"cd {REPO} && .venv/bin/python bench/operator_scale.py " + " ".join(sys.argv[1:])
    results = []
    passthrough = [
        f"--trials={args.trials}",
        f"--lockstep-rounds={args.lockstep_rounds}",
        f"--staggered-rounds={args.staggered_rounds}",
        f"--interval={args.interval}",
        f"--pool-maxsize={args.pool_maxsize}",
        f"--executor-workers={args.executor_workers}",
        f"--emulator-request-log={args.emulator_request_log}",
        f"--drive-rounds={args.drive_rounds}",
        *(["--emulator-as-is"] if args.emulator_as_is else []),
        *([f"--profile-operator={args.profile_operator}"] if args.profile_operator else []),
        *(["--tracemalloc"] if args.tracemalloc else []),
    ]
    for n in [int(part) for part in args.scales.split(",") if part.strip()]:
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(n), *passthrough],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"the worker for {n} experiments failed (exit {proc.returncode})")
        figures = json.loads(line[len("RESULT ") :])
        figures["worker_s"] = time.perf_counter() - started
        print(f"{n} experiments: done in {figures['worker_s']:.0f} s", file=sys.stderr, flush=True)
        results.append(figures)
        if args.json:
            print(json.dumps(figures, indent=1))
    report(args, results, command.strip())


if __name__ == "__main__":
    main()
