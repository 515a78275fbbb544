"""Whether the operator can read its running trainers' /metrics, and what to do when it cannot.

The operator scrapes each trial's rank-0 pod at its pod IP. Run in the cluster (the Helm chart)
it reaches them; run from a laptop against a remote or kind cluster it usually cannot, and
without this every trial would run blind (no ASHA, no divergence checks) while nothing says why.
"""

from __future__ import annotations

from datetime import datetime

from trainpilot.api.experiment import AgentExperimentStatus
from trainpilot.core.observation import Observation

# Cycles in a row a running trial's /metrics gave nothing before MetricsReachable turns False, once
# it has run STARTUP_GRACE_SECONDS: a trainer serves /metrics only after torch and DeepSpeed start.
MAX_FAILED_SCRAPES = 3
STARTUP_GRACE_SECONDS = 120

WHAT_TO_DO = (
    "the operator reads each trial's metrics at its pod IP (trainpilot run: on 127.0.0.1): run it in "
    "the cluster (helm install, docs/kind.md), or from a machine with a route to the pod network; a "
    "trainer that serves no /metrics (a custom command) needs spec.metrics.port and spec.metrics.path "
    "set to where it does; a slow one, a longer spec.metrics.scrapeTimeoutSeconds"
)
WHAT_TO_DO_PROMETHEUS = (
    "with spec.metrics.source prometheus the operator reads each trial's metrics from its Prometheus server: "
    "it must scrape the trial's rank-0 pod (the chart's podMonitor.enabled, and the Prometheus' "
    "podMonitorSelector matching podMonitor.labels) with the experiment, trial, pod and namespace labels, at "
    "least every spec.metrics.maxSampleAgeSeconds / 2; or use spec.metrics.source direct"
)


def unreachable(
    status: AgentExperimentStatus, observation: Observation, now: str, source: str = "direct"
) -> str | None:
    """Why MetricsReachable is False (the URLs that failed, and what to do for this spec.metrics.source);
    None when no trial past its start-up failed MAX_FAILED_SCRAPES times in a row."""
    failing = [
        (trial.name, trial.failed_scrapes, observation.trials[trial.name].scrape_error)
        for trial in status.launched_trials
        if trial.failed_scrapes >= MAX_FAILED_SCRAPES
        and trial.name in observation.trials
        and _seconds_since(trial.started_at, now) >= STARTUP_GRACE_SECONDS
    ]
    failing = [(name, count, error) for name, count, error in failing if error]
    if not failing:
        return None
    name, count, error = failing[0]
    others = f" (and {len(failing) - 1} more trial(s))" if len(failing) > 1 else ""
    what_to_do = WHAT_TO_DO_PROMETHEUS if source == "prometheus" else WHAT_TO_DO
    return f"{name}: {count} scrapes in a row failed, the last: {error}{others}; {what_to_do}"


def _seconds_since(then: str | None, now: str) -> float:
    try:
        return (datetime.fromisoformat(now) - datetime.fromisoformat(then or now)).total_seconds()
    except ValueError:
        return 0.0


def reached(observation: Observation) -> bool:
    """A running trial's metrics were read this cycle."""
    return any(
        seen.metrics is not None and seen.scrape_error is None and seen.phase == "Running"
        for seen in observation.trials.values()
    )
