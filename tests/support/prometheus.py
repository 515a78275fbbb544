"""A real Prometheus server (Debian's `prometheus` package) scraping trainers as the chart's PodMonitor would.

No Kubernetes service discovery here, so the targets come from a file (file_sd) that the test
writes, each with the `__meta_kubernetes_*` labels Prometheus's pod discovery would give it; the
scrape configuration applies exactly the relabelings of the PodMonitor the chart renders
(helm/trainpilot/templates/podmonitor.yaml), after the ones the Prometheus Operator adds to every
PodMonitor endpoint (namespace, container, pod). `scripts/test.sh` installs the package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.chart import render
from tests.support.trainerkit import free_port

# What the Prometheus Operator puts before a PodMonitor endpoint's own relabelings.
OPERATOR_RELABELINGS: list[dict[str, Any]] = [
    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
    {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
]
_KEYS = {"sourceLabels": "source_labels", "targetLabel": "target_label"}


def chart_relabelings() -> list[dict[str, Any]]:
    """The chart's PodMonitor relabelings, in Prometheus's own configuration spelling."""
    [monitor] = [d for d in render({"podMonitor": {"enabled": True}}) if d["kind"] == "PodMonitor"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    return [{_KEYS.get(key, key): value for key, value in rule.items()} for rule in endpoint["relabelings"]]


def pod_target(
    address: str, *, namespace: str, pod: str, experiment: str, trial: str, path: str = "/metrics"
) -> dict[str, Any]:
    """A file_sd target with the labels pod discovery gives a trial's rank-0 pod (builders.py's labels)."""
    return {
        "targets": [address],
        "labels": {
            "__meta_kubernetes_namespace": namespace,
            "__meta_kubernetes_pod_name": pod,
            "__meta_kubernetes_pod_container_name": "trainer",
            "__meta_kubernetes_pod_label_trainpilot_dev_experiment": experiment,
            "__meta_kubernetes_pod_label_trainpilot_dev_trial": trial,
            "__meta_kubernetes_pod_annotation_prometheus_io_path": path,
        },
    }


class PrometheusProcess:
    def __init__(self, directory: Path, scrape_interval: float = 1.0) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail(
                "no `prometheus` on PATH: scripts/test.sh installs Debian's package (apt-get install prometheus)"
            )
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.targets_file = directory / "targets.json"
        self.set_targets([])
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = {
            "global": {"scrape_interval": f"{scrape_interval:g}s", "scrape_timeout": f"{scrape_interval:g}s"},
            "scrape_configs": [
                {
                    "job_name": "trainpilot-trials",
                    "file_sd_configs": [{"files": [str(self.targets_file)], "refresh_interval": "1s"}],
                    "relabel_configs": OPERATOR_RELABELINGS + chart_relabelings(),
                }
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(directory / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"Prometheus did not start:\n{(self.directory / 'prometheus.log').read_text()}")

    def set_targets(self, targets: Iterable[dict[str, Any]]) -> None:
        """Replace the scraped targets (atomically: Prometheus may read the file at any time)."""
        partial = self.targets_file.with_suffix(".tmp")
        partial.write_text(json.dumps(list(targets)))
        os.replace(partial, self.targets_file)

    def series(self, promql: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{query}", timeout=5) as response:
            return json.load(response)["data"]["result"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture
def prometheus(tmp_path) -> Iterator[PrometheusProcess]:
    server = PrometheusProcess(tmp_path / "prometheus")
    try:
        yield server
    finally:
        server.stop()
