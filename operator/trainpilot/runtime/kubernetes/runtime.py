"""The Kubernetes runtime: trials as Indexed Jobs, records as Events, annotations and a ledger.

One instance serves one experiment for the life of its daemon. Per cycle it makes a constant
number of API requests (list Jobs, list Pods, patch status), plus a few per decision, however
many experiments the operator watches.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, TrialStatus
from trainpilot.api.metrics import TrialMetrics
from trainpilot.api.trial import ControlFile, TrialConfig
from trainpilot.core.decision import DecisionRecord
from trainpilot.core.observation import Observation, TrialObservation
from trainpilot.runtime import scrape
from trainpilot.runtime.clock import cluster_now
from trainpilot.runtime.kubernetes import builders
from trainpilot.runtime.kubernetes.api import KubeApi, NotFound
from trainpilot.runtime.kubernetes.ledger import ConfigMapLedger

logger = logging.getLogger(__name__)

WARNING_REASONS = {
    contract.REASON_DECISION_REJECTED,
    contract.REASON_TRIAL_TERMINATED,
    contract.REASON_EXPERIMENT_FAILED,
}


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code >= 128:  # killed by a signal the trainer did not handle (OOM kill, SIGKILL)
        return "crashed"
    return contract.EXIT_REASONS.get(code, "crashed")


def final_metrics(termination_message: str | None) -> TrialMetrics | None:
    """The trainer's last values from the pod's termination message (its final summary, as JSON)."""
    try:
        return TrialMetrics.from_result(json.loads(termination_message or ""))
    except ValueError:
        return None


class KubernetesRuntime:
    name = "kubernetes"

    def __init__(self, api: KubeApi, experiment: dict[str, Any], spec: AgentExperimentSpec) -> None:
        self.api = api
        self.owner = experiment
        self.spec = spec
        self.namespace: str = experiment["metadata"]["namespace"]
        self.experiment: str = experiment["metadata"]["name"]
        self.ledger_store = ConfigMapLedger(api, experiment)

    def update(self, experiment: dict[str, Any], spec: AgentExperimentSpec) -> None:
        """The user changed the spec (or metadata): later cycles use the new one."""
        self.owner, self.spec = experiment, spec

    @property
    def selector(self) -> str:
        return f"{contract.LABEL_EXPERIMENT}={self.experiment}"

    def checkpoint_dir(self, trial: str) -> str | None:
        return builders.checkpoint_dir(self.spec, self.experiment, trial)

    # ---------------------------------------------------------------- observe

    async def observe(self, status: AgentExperimentStatus) -> Observation:
        active = [trial.name for trial in status.active_trials]
        observation = Observation(time=cluster_now())
        if not active:
            return observation
        jobs = await self.api.call(
            "list trial jobs", self.api.batch.list_namespaced_job, self.namespace, label_selector=self.selector
        )
        pods = await self.api.call(
            "list trial pods", self.api.core.list_namespaced_pod, self.namespace, label_selector=self.selector
        )
        jobs_by_trial = {job.metadata.name: job for job in jobs.items}
        pods_by_trial: dict[str, list[Any]] = {}
        for pod in pods.items:
            trial = (pod.metadata.labels or {}).get(contract.LABEL_TRIAL)
            if trial:
                pods_by_trial.setdefault(trial, []).append(pod)

        urls: dict[str, str] = {}
        for trial in active:
            rank0 = self._rank0(pods_by_trial.get(trial, []))
            if rank0 is not None and rank0.status and rank0.status.pod_ip and rank0.status.phase == "Running":
                urls[trial] = scrape.metrics_url(rank0.status.pod_ip, self.spec.metrics.port, self.spec.metrics.path)
        scraped = await scrape.scrape_all(urls, self.spec.metrics.scrape_timeout_seconds)

        for trial in active:
            observation.trials[trial] = self._observe_trial(
                trial, jobs_by_trial.get(trial), pods_by_trial.get(trial, []), scraped.get(trial)
            )
        return observation

    @staticmethod
    def _rank0(pods: list[Any]) -> Any | None:
        for pod in pods:
            if (pod.metadata.labels or {}).get(
                contract.LABEL_COMPLETION_INDEX
            ) == "0" and not pod.metadata.deletion_timestamp:
                return pod
        return None

    def _observe_trial(
        self, trial: str, job: Any | None, pods: list[Any], metrics: TrialMetrics | None
    ) -> TrialObservation:
        if job is None:
            return TrialObservation(name=trial, phase="Missing", message=f"Job {trial} is gone")
        conditions = {c.type: c for c in (job.status.conditions or []) if c.status == "True"} if job.status else {}
        terminated = self._terminated(pods)
        if metrics is None and terminated is not None:
            metrics = final_metrics(terminated.message)
        if "Complete" in conditions:
            return TrialObservation(
                name=trial, phase="Succeeded", exit_reason="completed", exit_code=0, metrics=metrics
            )
        if "Failed" in conditions:
            code = terminated.exit_code if terminated is not None else None
            failed = conditions["Failed"]
            message = failed.message or failed.reason or "Job failed"
            if terminated is None and not pods:
                message += " (its pods are gone)"
            return TrialObservation(
                name=trial,
                phase="Failed",
                exit_reason=_exit_reason(code),
                exit_code=code,
                metrics=metrics,
                message=message,
            )
        running = any(pod.status and pod.status.phase == "Running" for pod in pods)
        return TrialObservation(name=trial, phase="Running" if running else "Pending", metrics=metrics)

    @staticmethod
    def _terminated(pods: list[Any]) -> Any | None:
        """The terminated state of the trainer container, preferring a failed one, then rank 0."""
        states = []
        for pod in pods:
            for container in (pod.status.container_statuses or []) if pod.status else []:
                if container.state and container.state.terminated:
                    index = (pod.metadata.labels or {}).get(contract.LABEL_COMPLETION_INDEX)
                    states.append((container.state.terminated.exit_code == 0, index != "0", container.state.terminated))
        return sorted(states, key=lambda item: item[:2])[0][2] if states else None

    # ---------------------------------------------------------------- act

    async def launch(self, trial: TrialStatus, config: TrialConfig, record: DecisionRecord) -> None:
        owner, ns = self.owner, self.namespace
        control = ControlFile(generation=trial.control_generation)
        objects = [
            (
                "config map",
                self.api.core.create_namespaced_config_map,
                builders.build_config_map(owner, trial.name, config),
            ),
            (
                "control map",
                self.api.core.create_namespaced_config_map,
                builders.build_control_map(owner, trial.name, control),
            ),
            ("service", self.api.core.create_namespaced_service, builders.build_service(owner, trial.name)),
            ("job", self.api.batch.create_namespaced_job, builders.build_job(owner, self.spec, trial, record.id)),
        ]
        # The Job goes last: its pods mount the ConfigMaps, which must exist first.
        for kind, create, manifest in objects:
            await self.api.create_if_absent(f"{kind} of {trial.name}", create, ns, manifest)

    async def stop(self, trial: str, reason: str) -> None:
        # Background propagation: the Job goes now, its pods get SIGTERM and their grace period
        # (the trainer checkpoints), and the API call does not wait for any of it.
        body = {"propagationPolicy": "Background"}
        await self.api.delete_if_present(
            f"job {trial}", self.api.batch.delete_namespaced_job, trial, self.namespace, body=body
        )
        await self.api.delete_if_present(
            f"service {trial}", self.api.core.delete_namespaced_service, trial, self.namespace
        )

    async def set_control(self, trial: str, control: ControlFile) -> None:
        await self.api.call(
            f"control of {trial}",
            self.api.core.patch_namespaced_config_map,
            builders.control_map_name(trial),
            self.namespace,
            {"data": {builders.CONTROL_KEY: control.model_dump_json(exclude_none=True)}},
        )

    # ---------------------------------------------------------------- record

    async def record(self, record: DecisionRecord) -> None:
        # Ledger first: it is the durable truth; the Event and the annotation are announcements.
        await self.ledger_store.append(record)
        reason = record.event_reason()
        event = builders.build_event(
            self.owner, record.id, reason, record.message(), warning=reason in WARNING_REASONS, now=record.time
        )
        await self.api.create_if_absent(
            f"event {record.id}", self.api.core.create_namespaced_event, self.namespace, event
        )
        compact = json.dumps(record.compact(), separators=(",", ":"))
        try:
            await self.api.annotate_experiment(
                self.namespace, self.experiment, {contract.ANNOTATION_LAST_DECISION: compact}
            )
        except NotFound:
            logger.info("experiment %s is gone; not annotating %s", self.experiment, record.id)
        log = logger.warning if reason in WARNING_REASONS else logger.info
        log("%s/%s %s: %s", self.namespace, self.experiment, reason, record.message())

    async def ledger(self) -> list[DecisionRecord]:
        return await self.ledger_store.recent()

    async def save_status(self, status: AgentExperimentStatus) -> None:
        try:
            await self.api.patch_experiment_status(self.namespace, self.experiment, status.wire())
        except NotFound:
            logger.info("experiment %s is gone; status not saved", self.experiment)
