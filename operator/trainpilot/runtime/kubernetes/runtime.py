"""The Kubernetes runtime: trials as Indexed Jobs, records as Events, annotations and a ledger.

One instance serves one experiment for the life of its daemon. Per cycle it makes a constant
number of API requests (list Jobs, list Pods, patch status), plus a few per decision, however
many experiments the operator watches; an experiment with spec.queue lists its Kueue Workloads too,
once, in a cycle where one of its Jobs is suspended or just admitted (runtime.kubernetes.kueue).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, RetainedPart, TrialStatus
from trainpilot.api.metrics import TrainerExit, TrialMetrics
from trainpilot.api.trial import ControlFile, TrialConfig
from trainpilot.core import cycle_log
from trainpilot.core.approvals import Approval
from trainpilot.core.cycle_log import CycleEntry
from trainpilot.core.decision import DecisionRecord
from trainpilot.core.observation import Observation, TrialObservation
from trainpilot.runtime import scrape
from trainpilot.runtime.base import Departure, RuntimeFailure
from trainpilot.runtime.clock import cluster_now
from trainpilot.runtime.kubernetes import builders, claims, clean_ups, kueue, logs, ownership, waiting
from trainpilot.runtime.kubernetes.api import KubeApi, NotFound
from trainpilot.runtime.kubernetes.departures import Departures
from trainpilot.runtime.kubernetes.ledger import ConfigMapLedger
from trainpilot.runtime.kubernetes.logs import ConfigMapLog
from trainpilot.runtime.kubernetes.sign_off import approvals_in
from trainpilot.runtime.kubernetes.termination import final_metrics, trainer_exit
from trainpilot.runtime.prometheus import NO_PROMETHEUS, PrometheusServer

logger = logging.getLogger(__name__)

WARNING_REASONS = {
    contract.REASON_DECISION_REJECTED,
    contract.REASON_TRIAL_TERMINATED,
    contract.REASON_EXPERIMENT_FAILED,
    contract.REASON_DECISION_FAILED,
}


def _exit_reason(code: int | None, reported: TrainerExit | None = None) -> str:
    """The trainer's own reason when its termination message states one (torchrun exits 1
    whatever its workers did), else what the container's exit code says."""
    if reported is not None:
        return reported.reason
    if code is None:
        return "unknown"
    if code >= 128:  # killed by a signal the trainer did not handle (OOM kill, SIGKILL)
        return "crashed"
    return contract.EXIT_REASONS.get(code, "crashed")


class KubernetesRuntime:
    name = "kubernetes"
    removable: frozenset[RetainedPart] = frozenset({"checkpoints", "children"})

    def __init__(
        self,
        api: KubeApi,
        experiment: dict[str, Any],
        spec: AgentExperimentSpec,
        prometheus: PrometheusServer | None = None,
    ) -> None:
        self.api = api
        # spec.metrics.source prometheus reads through this server (the operator's --prometheus-url).
        self.prometheus = prometheus if prometheus is not None else PrometheusServer.from_environment()
        self.owner = experiment
        self.spec = spec
        self.namespace: str = experiment["metadata"]["namespace"]
        self.experiment: str = experiment["metadata"]["name"]
        self.ledger_store = ConfigMapLedger(api, experiment)
        self.cycle_log = ConfigMapLog(api, experiment, logs.CYCLES)
        self.prompt_log = ConfigMapLog(api, experiment, logs.PROMPTS)
        self._prompts: list[dict[str, Any]] = []
        self.departures = Departures(api, self.namespace, self.experiment)
        self.workloads = kueue.Workloads(api, self.namespace, self.experiment)
        # Whether the last cycle saw a checkpoint clean-up not done yet: a finished experiment keeps
        # cycling until it is, so that one that cannot run is said (RetentionApplied).
        self.unfinished_clean_ups = False
        # Why each running trial's metrics could not be read in the last cycle (scrape.failure_reason).
        self.scrape_failures: list[str] = []
        # The status as last saved (the object's own at first), so a save can clear what became empty.
        stored = experiment.get("status")
        self.saved: dict[str, Any] | None = dict(stored) if isinstance(stored, dict) and stored else None

    def update(self, experiment: dict[str, Any], spec: AgentExperimentSpec) -> None:
        """The user changed the spec (or metadata): later cycles use the new one."""
        self.owner, self.spec = experiment, spec

    @property
    def selector(self) -> str:
        return f"{contract.LABEL_EXPERIMENT}={self.experiment}"

    def checkpoint_dir(self, trial: str, spec: AgentExperimentSpec) -> str | None:
        return builders.checkpoint_dir(spec, self.owner, trial)

    # ---------------------------------------------------------------- observe

    async def observe(self, status: AgentExperimentStatus) -> Observation:
        active = [trial.name for trial in status.launched_trials]
        observation = Observation(time=cluster_now())
        cleaning = [trial.name for trial in status.trials if "checkpoints" in trial.removed]
        if not active and not cleaning:
            return observation
        jobs = await self.api.call(
            "list trial jobs", self.api.batch.list_namespaced_job, self.namespace, label_selector=self.selector
        )
        pods = await self.api.call(
            "list trial pods", self.api.core.list_namespaced_pod, self.namespace, label_selector=self.selector
        )
        # Only this incarnation's (by uid): an earlier experiment of this name may have left some.
        jobs_by_trial = {job.metadata.name: job for job in ownership.owned(jobs.items, self.owner)}
        observation.clean_ups = await clean_ups.observe(self.api, self.namespace, cleaning, jobs_by_trial, pods.items)
        self.unfinished_clean_ups = bool(observation.clean_ups)
        if not active:
            return observation
        pods_by_trial: dict[str, list[Any]] = {}
        for pod in ownership.current_pods(pods.items, jobs_by_trial.values()):
            trial = (pod.metadata.labels or {}).get(contract.LABEL_TRIAL)
            if trial:
                pods_by_trial.setdefault(trial, []).append(pod)

        serving = {}
        for trial in active:
            rank0 = self._rank0(pods_by_trial.get(trial, []))
            if rank0 is not None and rank0.status and rank0.status.pod_ip and rank0.status.phase == "Running":
                serving[trial] = rank0
        scraped, errors = await self._read_metrics(status, serving)
        self.scrape_failures = [scrape.failure_reason(error) for error in errors.values()]

        for trial in active:
            observation.trials[trial] = self._observe_trial(
                trial, jobs_by_trial.get(trial), pods_by_trial.get(trial, []), scraped.get(trial)
            )
            if trial in errors:
                observation.trials[trial].scrape_error = errors[trial]
        # Kueue's reasons for suspended Jobs (and admission times): one list, only when some Job needs it.
        queued = [
            job for name, job in jobs_by_trial.items() if name in active and waiting.wants_workload(job, pods.items)
        ]
        workloads = await self.workloads.of(queued)
        checkpoints = self.spec.trial_template.checkpoints is not None
        # For spec.trialTemplate.pendingTimeoutSeconds, which counts only while a Job may run.
        waiting.note_pending(observation, jobs_by_trial, pods.items, workloads, checkpoints)
        return observation

    async def _read_metrics(
        self, status: AgentExperimentStatus, serving: dict[str, Any]
    ) -> tuple[dict[str, TrialMetrics | None], dict[str, str]]:
        """Each serving trial's metrics (trial -> its running rank-0 pod), and why each that gave
        none failed: scraped at the pod IP, or read from Prometheus (spec.metrics.source)."""
        if self.spec.metrics.source == "prometheus":
            if self.prometheus is None:
                return dict.fromkeys(serving), dict.fromkeys(serving, NO_PROMETHEUS)
            pods = {trial: pod.metadata.name for trial, pod in serving.items()}
            return await self.prometheus.trial_metrics(
                self.namespace, self.experiment, pods, self.spec.metrics.max_sample_age_seconds
            )
        urls = {}
        for trial, pod in serving.items():
            # Where it was launched to serve: an edit of spec.metrics applies to new trials only.
            endpoint = status.spec_for(self.spec, trial).metrics
            urls[trial] = scrape.metrics_url(pod.status.pod_ip, endpoint.port, endpoint.path)
        failed: dict[str, str] = {}
        scraped = await scrape.scrape_all(urls, self.spec.metrics.scrape_timeout_seconds, failed)
        errors = {trial: f"{url}: {failed[url]}" for trial, url in urls.items() if url in failed}
        return scraped, errors

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
            reported = trainer_exit(terminated.message) if terminated is not None else None
            failed = conditions["Failed"]
            message = failed.message or failed.reason or "Job failed"
            if terminated is None and not pods:
                message += " (its pods are gone)"
            return TrialObservation(
                name=trial,
                phase="Failed",
                exit_reason=_exit_reason(code, reported),
                exit_code=reported.code if reported is not None else code,
                metrics=metrics,
                message=message,
            )
        if kueue.is_suspended(job):
            # Queued, or preempted (by Kueue) and its pods stopping: waiting, never Running, so no
            # GPU time accrues and the trial is neither a crash nor a candidate for a relaunch.
            return TrialObservation(name=trial, phase="Pending", metrics=metrics)
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

    async def launch(self, trial: TrialStatus, config: TrialConfig, spec: AgentExperimentSpec) -> None:
        owner, ns = self.owner, self.namespace
        await claims.check_checkpoint_claim(self.api, spec, trial, ns)  # nodes > 1 needs ReadWriteMany
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
            ("job", self.api.batch.create_namespaced_job, builders.build_job(owner, spec, trial, trial.decision)),
        ]
        # The Job goes last: its pods mount the ConfigMaps, which must exist first.
        for kind, create, manifest in objects:
            await ownership.create_owned(self.api, f"{kind} of {trial.name}", create, ns, manifest)

    async def stop(self, trial: str, reason: str) -> None:
        # Background propagation: the Job goes now, its pods get SIGTERM and their grace period
        # (the trainer checkpoints), and the API call does not wait for any of it. Its pods are
        # watched from before the deletion, so their last status (the step saved) is seen.
        self.departures.follow(trial)
        body = {"propagationPolicy": "Background"}
        await self.api.delete_if_present(
            f"job {trial}", self.api.batch.delete_namespaced_job, trial, self.namespace, body=body
        )
        await self.api.delete_if_present(
            f"service {trial}", self.api.core.delete_namespaced_service, trial, self.namespace
        )

    async def remove(self, trial: str, part: RetainedPart, spec: AgentExperimentSpec) -> None:
        """children: the Job (its pods with it), Service and ConfigMaps; checkpoints: a cleanup Job
        on the claim. Each delete or create is idempotent, so a replayed record repeats it safely."""
        ns = self.namespace
        if part == "checkpoints":
            job = builders.build_cleanup_job(self.owner, spec, trial)
            if job is not None:
                await ownership.create_owned(
                    self.api, f"cleanup job of {trial}", self.api.batch.create_namespaced_job, ns, job
                )
                self.unfinished_clean_ups = True  # until a cycle sees it done
            return
        body = {"propagationPolicy": "Background"}
        await self.api.delete_if_present(f"job {trial}", self.api.batch.delete_namespaced_job, trial, ns, body=body)
        await self.api.delete_if_present(f"service {trial}", self.api.core.delete_namespaced_service, trial, ns)
        for name in (builders.config_map_name(trial), builders.control_map_name(trial)):
            await self.api.delete_if_present(f"config map {name}", self.api.core.delete_namespaced_config_map, name, ns)

    async def departed(self, trial: str) -> Departure | None:
        return await self.departures.departed(trial)

    def close(self) -> None:
        """The daemon is ending: stop watching."""
        self.departures.close()

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
        # Ledger first: it is the durable truth, and the only write here whose failure stops the
        # cycle. The Event and the annotation are announcements: best effort.
        await self.ledger_store.append(record)
        reason = record.event_reason()
        event = builders.build_event(
            self.owner, record.id, reason, record.message(), warning=reason in WARNING_REASONS, now=record.time
        )
        try:
            await self.api.create_if_absent(
                f"event {record.id}", self.api.core.create_namespaced_event, self.namespace, event
            )
        except RuntimeFailure as failure:
            logger.warning("%s/%s: Event for %s not posted: %s", self.namespace, self.experiment, record.id, failure)
        compact = json.dumps(record.compact(), separators=(",", ":"))
        try:
            await self.api.annotate_experiment(
                self.namespace, self.experiment, {contract.ANNOTATION_LAST_DECISION: compact}
            )
        except NotFound:
            logger.info("experiment %s is gone; not annotating %s", self.experiment, record.id)
        except RuntimeFailure as failure:
            logger.warning("%s/%s: %s not annotated: %s", self.namespace, self.experiment, record.id, failure)
        log = logger.warning if reason in WARNING_REASONS else logger.info
        log("%s/%s %s: %s", self.namespace, self.experiment, reason, record.message())

    async def ledger(self, since: int = 0) -> list[DecisionRecord]:
        return await self.ledger_store.since(since)

    def keep_prompt(self, exchange: dict[str, Any]) -> None:
        """An exchange with Claude, for the prompt archive; written with this cycle's log line."""
        self._prompts.append(exchange)

    async def log_cycle(self, entry: CycleEntry) -> None:
        if self._prompts:
            lines = "".join(json.dumps(exchange, sort_keys=True) + "\n" for exchange in self._prompts)
            await self.prompt_log.append(lines)
            self._prompts.clear()
        await self.cycle_log.append(cycle_log.encode(entry, compress=True))

    async def approvals(self) -> list[Approval]:
        return approvals_in(self.owner["metadata"])  # the object as the watch last delivered it

    async def announce(self, reason: str, message: str) -> None:
        """One Warning Event per reason, its message and time brought up to date on each repeat."""
        name = f"{self.experiment}.{reason.lower()}"
        now = cluster_now()
        try:
            created = await self.api.create_if_absent(
                f"event {name}",
                self.api.core.create_namespaced_event,
                self.namespace,
                builders.build_event(self.owner, name, reason, message, warning=True, now=now),
            )
            if not created:
                await self.api.call(
                    f"event {name}",
                    self.api.core.patch_namespaced_event,
                    builders.event_name(self.owner, name),  # build_event's name: with the experiment's uid
                    self.namespace,
                    {"message": message[:1024], "lastTimestamp": now},
                )
        except RuntimeFailure as failure:  # best effort: the log line the loop writes says it too
            logger.warning("%s/%s: Event %s not posted: %s", self.namespace, self.experiment, reason, failure)

    async def save_status(self, status: AgentExperimentStatus) -> None:
        wire = status.wire()
        try:
            await self.api.patch_experiment_status(self.namespace, self.experiment, status_patch(self.saved, wire))
        except NotFound:
            logger.info("experiment %s is gone; status not saved", self.experiment)
            return
        self.saved = wire


def status_patch(saved: dict[str, Any] | None, wire: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that makes the stored status `wire`: every value, and null for
    whatever became empty, or the API server would keep it (a bestTrial that crashed since).

    Every field the model knows is cleared when empty; inside objects, which a merge patch merges
    rather than replaces, keys of the status last saved that are gone now are cleared too. Lists
    are replaced whole. Values are always sent, so another writer (mark_invalid) cannot make a
    field look unchanged when it is not."""
    known: dict[str, Any] = {name: None for name in _STATUS_FIELDS}
    return _merge_patch({**known, **{k: v for k, v in (saved or {}).items() if k in known}}, wire)


def _merge_patch(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    patch: dict[str, Any] = {key: None for key in before if key not in after}
    for key, value in after.items():
        prior = before.get(key)
        patch[key] = _merge_patch(prior, value) if isinstance(value, dict) and isinstance(prior, dict) else value
    return patch


_STATUS_FIELDS = tuple(field.alias or name for name, field in AgentExperimentStatus.model_fields.items())
