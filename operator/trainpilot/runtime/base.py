"""The one small interface between the agent loop and the world.

`KubernetesRuntime` (Jobs, Services, ConfigMaps, Events) and `LocalRuntime` (processes and a run
directory) both implement it, so one loop (`trainpilot.loop`) drives both. Every method is
idempotent: a cycle retried after a crash repeats calls with the same names and ids, and a
second call must be a no-op, never a duplicate. Failures are RuntimeFailure (transient: retried
next cycle) or PermanentFailure (refused for good: the loop records it and goes on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, RetainedPart, TrialStatus
from trainpilot.api.trial import ControlFile, TrialConfig
from trainpilot.core.approvals import Approval
from trainpilot.core.cycle_log import CycleEntry
from trainpilot.core.decision import DecisionRecord
from trainpilot.core.observation import Observation


class RuntimeFailure(Exception):
    """A runtime operation failed in a way the loop should report, then retry next cycle."""


class PermanentFailure(RuntimeFailure):
    """The world refused the operation for good (a 4xx from the API server other than 409 and 429,
    a trainer that cannot start): retrying the same request cannot help, so the loop marks the
    trial or the decision failed instead of retrying it every cycle."""


class LedgerConflict(RuntimeFailure):
    """The ledger already holds a record with this id and different content: two writers decided
    apart (an operator restarted from a stale status, or two of them ran at once)."""

    def __init__(self, record: DecisionRecord, existing: DecisionRecord) -> None:
        super().__init__(
            f"{record.id} is already in the ledger with different content "
            f"({existing.decision.action} by {existing.decision.policy}, not "
            f"{record.decision.action} by {record.decision.policy})"
        )
        self.record = record
        self.existing = existing


@dataclass(frozen=True)
class Departure:
    """A stopped trial of which no process or pod remains, and the checkpoint step it reported last
    (its final summary, written after the save on SIGTERM); None when the runtime did not see it."""

    checkpoint_step: int | None = None


class Runtime(Protocol):
    name: str
    # What of a finished trial this runtime can delete under spec.retention (core.retention).
    removable: frozenset[RetainedPart]

    def checkpoint_dir(self, trial: str, spec: AgentExperimentSpec) -> str | None:
        """Where `trial` writes checkpoints as the trainer sees it under `spec` (the one it runs
        under: its launch settings); None when there is no volume."""

    async def observe(self, status: AgentExperimentStatus) -> Observation:
        """Phases and freshly scraped metrics of every trial that is not finished in `status`, each
        scraped where it was launched to serve (status.launchSettings)."""

    async def launch(self, trial: TrialStatus, config: TrialConfig, spec: AgentExperimentSpec) -> None:
        """Start `trial` (launched by decision `trial.decision`) with `config`, as `spec` says (the
        spec with the trial's launch settings). Already started (same name) is success."""

    async def stop(self, trial: str, reason: str) -> None:
        """Stop `trial` gracefully (SIGTERM, so it checkpoints). Already gone is success."""

    async def remove(self, trial: str, part: RetainedPart, spec: AgentExperimentSpec) -> None:
        """Delete `part` of finished trial `trial` (launched under `spec`). Already gone is success."""

    async def departed(self, trial: str) -> Departure | None:
        """None while any process or pod of the stopped `trial` remains (it may still be saving its
        checkpoint); then what it reported last. Never started, or long gone, is departed."""

    async def set_control(self, trial: str, control: ControlFile) -> None:
        """Publish in-place changes for a running trial (its control file)."""

    async def record(self, record: DecisionRecord) -> None:
        """Append to the durable ledger, then announce (Event, annotation, log). Same record twice is a no-op.

        Raises RuntimeFailure only when the ledger append failed (announcing is best effort), and
        LedgerConflict when the id is already taken by a different record.
        """

    async def ledger(self, since: int = 0) -> list[DecisionRecord]:
        """Every record with seq >= `since`, oldest first (whatever segments they were rotated into)."""

    async def approvals(self) -> list[Approval]:
        """The humans' approvals and rejections of held decisions as they stand now (annotations
        vouched for by the API server's admission policy, or files in the run directory)."""

    async def log_cycle(self, entry: CycleEntry) -> None:
        """Append one cycle's policy input to the cycle log (bounded; `trainpilot replay` reads it)."""

    async def announce(self, reason: str, message: str) -> None:
        """Best effort, never raises: say what keeps the experiment from progressing (a Warning Event)."""

    async def save_status(self, status: AgentExperimentStatus) -> None:
        """Persist the experiment's status (the status subresource, or status.json)."""
