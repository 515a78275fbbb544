"""The one small interface between the agent loop and the world.

`KubernetesRuntime` (Jobs, Services, ConfigMaps, Events) and `LocalRuntime` (processes and a run
directory) both implement it, so one loop (`trainpilot.loop`) drives both. Every method is
idempotent: a cycle retried after a crash repeats calls with the same names and ids, and a
second call must be a no-op, never a duplicate.
"""

from __future__ import annotations

from typing import Protocol

from trainpilot.api.experiment import AgentExperimentStatus, TrialStatus
from trainpilot.api.trial import ControlFile, TrialConfig
from trainpilot.core.decision import DecisionRecord
from trainpilot.core.observation import Observation


class RuntimeFailure(Exception):
    """A runtime operation failed in a way the loop should report, then retry next cycle."""


class Runtime(Protocol):
    name: str

    def checkpoint_dir(self, trial: str) -> str | None:
        """Where `trial` writes checkpoints as the trainer sees it; None when there is no volume."""

    async def observe(self, status: AgentExperimentStatus) -> Observation:
        """Phases and freshly scraped metrics of every trial that is not finished in `status`."""

    async def launch(self, trial: TrialStatus, config: TrialConfig, record: DecisionRecord) -> None:
        """Start `trial` with `config`. Already started (same name) is success."""

    async def stop(self, trial: str, reason: str) -> None:
        """Stop `trial` gracefully (SIGTERM, so it checkpoints). Already gone is success."""

    async def set_control(self, trial: str, control: ControlFile) -> None:
        """Publish in-place changes for a running trial (its control file)."""

    async def record(self, record: DecisionRecord) -> None:
        """Append to the durable ledger, then announce (Event, annotation, log). Same id twice is a no-op."""

    async def ledger(self) -> list[DecisionRecord]:
        """Every record so far, oldest first."""

    async def save_status(self, status: AgentExperimentStatus) -> None:
        """Persist the experiment's status (the status subresource, or status.json)."""
