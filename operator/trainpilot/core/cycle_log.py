"""The cycle log: what each cycle's policy was given, so a replay needs nothing else.

The ledger says what was decided; the cycle log says what the policy saw when it decided (or
decided nothing): the spec, the status and the observation exactly as the engine handed them
over, the limits in force, and the ids of the records its proposals became. `trainpilot replay`
feeds these, in order, to a policy and compares what it would decide with what was recorded.

A line is JSON, or (in a cluster, where ConfigMaps are small) the same JSON zlib-compressed and
base64-encoded; `decode` reads both.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus
from trainpilot.api.quota import QuotaLimits
from trainpilot.core.decision import DecisionRecord
from trainpilot.core.observation import Observation


@dataclass(frozen=True)
class PolicyInput:
    """What the engine handed the policy in one cycle."""

    status: AgentExperimentStatus
    observation: Observation
    now: str
    limits: Any = None


class CycleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiment: str
    time: str
    spec: dict[str, Any]
    status: dict[str, Any]
    observation: dict[str, Any]
    limits: dict[str, Any] | None = None
    decided: list[str] = Field(default_factory=list, description="Ids of the records its proposals became.")

    def policy_input(self) -> tuple[AgentExperimentSpec, PolicyInput]:
        spec = AgentExperimentSpec.model_validate(self.spec)
        status = AgentExperimentStatus.model_validate(self.status)
        limits = QuotaLimits.model_validate(self.limits) if self.limits is not None else None
        return spec, PolicyInput(status, Observation.model_validate(self.observation), self.time, limits)


def entry(experiment: str, spec: AgentExperimentSpec, asked: PolicyInput, records: list[DecisionRecord]) -> CycleEntry:
    return CycleEntry(
        experiment=experiment,
        time=asked.now,
        # Python mode, written by json.dumps: a NaN loss stays NaN (pydantic's JSON mode makes it null).
        spec=spec.model_dump(by_alias=True),
        # Without launchSettings: no policy reads them, and each is a template's worth of text.
        status=asked.status.model_dump(by_alias=True, exclude={"launch_settings"}),
        observation=asked.observation.model_dump(),
        limits=_limits(asked.limits),
        decided=[record.id for record in records],
    )


def _limits(limits: Any) -> dict[str, Any] | None:
    """Limits as QuotaLimits fields (a local run's LocalLimits is a subset of them)."""
    if limits is None:
        return None
    if isinstance(limits, QuotaLimits):
        return limits.model_dump(mode="json", by_alias=True)
    fields = {name: getattr(limits, name) for name in QuotaLimits.model_fields if hasattr(limits, name)}
    return QuotaLimits.model_validate(fields).model_dump(mode="json", by_alias=True)


def encode(item: CycleEntry, compress: bool = False) -> str:
    text = json.dumps(item.model_dump(), separators=(",", ":"))
    if compress:
        text = base64.b64encode(zlib.compress(text.encode(), 9)).decode()
    return text + "\n"


def decode(text: str) -> tuple[list[CycleEntry], list[str]]:
    """Entries in order, and one problem per line that is not one (a torn last line, say)."""
    entries, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = line if line.startswith("{") else zlib.decompress(base64.b64decode(line, validate=True)).decode()
            entries.append(CycleEntry.model_validate(json.loads(raw)))
        except (ValueError, binascii.Error, zlib.error, ValidationError) as error:
            problems.append(f"line {number}: not a cycle entry ({type(error).__name__})")
    return entries, problems
