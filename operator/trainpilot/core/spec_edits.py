"""What an edit of a live experiment's spec does, field by field (docs/spec-edits.md).

A `kubectl edit`, a Git sync or `trainpilot run --resume RUN_DIR edited.yaml` may change any field
while trials run. Each field has one of four effects:

- next cycle: decisions from the next cycle on use the new value (budget, policy, search space);
- new trials: trials launched after the edit use it; a running trial keeps what it was launched
  with (status.launchSettings), and so do its restarts and relaunches from its checkpoints, so its
  checkpoints stay loadable and it is scraped where it serves;
- refused while trials run: the old value stays in force, said by the SpecEditsApplied condition,
  until no trial is active;
- refused once a trial has launched: what the trials are compared on (the objective, the data
  and validation set); a different value needs a new experiment.

Pure: `review` takes the spec as edited and the status, and returns the spec a cycle runs with.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, LaunchSettings
from trainpilot.api.trial import VALIDATION_DATA_FIELDS, Hyperparameters

Effect = Literal["next cycle", "new trials", "refused while trials run", "refused once a trial has launched"]
NEXT_CYCLE: Effect = "next cycle"
NEW_TRIALS: Effect = "new trials"
REFUSED_WHILE_RUNNING: Effect = "refused while trials run"
REFUSED_ONCE_LAUNCHED: Effect = "refused once a trial has launched"
HYPERPARAMETERS = "trialTemplate.hyperparameters"
# Maps whose keys a user names freely: an edit changes the map as one field.
WHOLE_MAPS = frozenset({"trialTemplate.env", "trialTemplate.resources", "trialTemplate.nodeSelector"})


@dataclass(frozen=True)
class EditRule:
    field: str  # a spec path as written in YAML; a rule covers the fields under it
    effect: Effect
    why: str


RULES: tuple[EditRule, ...] = (
    EditRule(
        "objective.metric", REFUSED_ONCE_LAUNCHED, "trials already scored on one metric cannot be ranked on another"
    ),
    EditRule("objective.direction", REFUSED_ONCE_LAUNCHED, "the trials so far were ranked the other way"),
    EditRule("objective.goal", NEXT_CYCLE, "the next cycle ends the experiment if a trial has reached it"),
    EditRule(
        "searchSpace",
        NEXT_CYCLE,
        "proposals, mutations and scales are checked against the new space; running trials keep their values",
    ),
    EditRule("initialTrials", NEXT_CYCLE, "initial trials not launched yet are the new list's"),
    EditRule(
        "budget",
        NEXT_CYCLE,
        "launches and scales are checked against the new bounds; running trials are not stopped for a lower one",
    ),
    EditRule("policy", NEXT_CYCLE, "the next decision is the new policy's"),
    EditRule("suspend", NEXT_CYCLE, "the next cycle pauses or resumes deciding; running trials go on"),
    EditRule("metrics.scrapeTimeoutSeconds", NEXT_CYCLE, "the next scrape waits the new time"),
    EditRule("metrics.source", NEXT_CYCLE, "the next cycle reads every trial's metrics from the new source"),
    EditRule("metrics.maxSampleAgeSeconds", NEXT_CYCLE, "the next read from Prometheus takes the new window"),
    EditRule("metrics", NEW_TRIALS, "a trainer serves its metrics where it was launched to, and is scraped there"),
    EditRule("queue", NEW_TRIALS, "a Job already created stays in the LocalQueue and priority it was created with"),
    EditRule("retention", NEXT_CYCLE, "the next cycle deletes what the new rules call for; nothing deleted comes back"),
    EditRule(
        "retention.checkpointTags",
        NEW_TRIALS,
        "a running trainer keeps the count it was started with; restarts and new trials take the new one",
    ),
    EditRule("trialTemplate.pendingTimeoutSeconds", NEXT_CYCLE, "pending trials are timed against the new limit"),
    EditRule(
        "trialTemplate.checkpoints",
        REFUSED_WHILE_RUNNING,
        "running trials save to, and their restarts resume from, the volume they were launched with",
    ),
    *(
        EditRule(
            f"{HYPERPARAMETERS}.{name}",
            REFUSED_ONCE_LAUNCHED,
            "it defines the data and the validation set every trial is scored on",
        )
        for name in sorted(VALIDATION_DATA_FIELDS)
    ),
    EditRule(
        "trialTemplate",
        NEW_TRIALS,
        "a trial, its restarts and its relaunches from its checkpoints keep the template it was launched with",
    ),
)


def rule_for(field: str) -> EditRule:
    """The rule of the most specific entry covering `field` (a dotted spec path)."""
    covering = [rule for rule in RULES if field == rule.field or field.startswith(rule.field + ".")]
    if not covering:
        raise KeyError(f"no edit rule covers spec field {field!r}")
    return max(covering, key=lambda rule: len(rule.field))


def changed_fields(before: AgentExperimentSpec, after: AgentExperimentSpec) -> list[str]:
    """The dotted paths whose values differ, at the depth a rule decides on (a list counts as one value)."""
    return sorted(_diff(_dump(before), _dump(after), ""))


def _dump(spec: AgentExperimentSpec) -> dict[str, Any]:
    return spec.model_dump(by_alias=True, mode="json")


def _diff(before: Any, after: Any, prefix: str) -> Iterator[str]:
    if isinstance(before, dict) and isinstance(after, dict) and prefix not in WHOLE_MAPS:
        for key in sorted(set(before) | set(after), key=str):
            yield from _diff(before.get(key), after.get(key), f"{prefix}.{key}" if prefix else str(key))
    elif before != after:
        yield prefix


@dataclass(frozen=True)
class Refusal:
    field: str
    wanted: Any
    in_force: Any
    rule: EditRule

    @property
    def edit(self) -> str:
        return f"spec.{self.field} {self.wanted!r} (in force: {self.in_force!r})"


# What each refusing effect means to whoever edited, and what to do: the message's sentence per effect.
_MEANS: dict[Effect, str] = {
    REFUSED_ONCE_LAUNCHED: "trials are compared on it; set it back, or start a new experiment for the new value",
    REFUSED_WHILE_RUNNING: (
        "running trials use what they were launched with; it applies once no trial is active, "
        "or set it back to keep the spec and the cluster in step"
    ),
}


@dataclass(frozen=True)
class EditReview:
    spec: AgentExperimentSpec  # the spec as edited, with each refused edit undone
    refused: tuple[Refusal, ...]

    @property
    def message(self) -> str:
        """Every refused edit with the value in force, grouped by effect (what it means and the fix
        said once), sibling fields under their parent: a dozen refusals fit one condition message.
        docs/spec-edits.md has each field's reason."""
        parts = []
        for effect, means in _MEANS.items():
            refusals = [refusal for refusal in self.refused if refusal.rule.effect == effect]
            if refusals:
                parts.append(f"{effect} ({means}): {_edits(refusals)}")
        return "edits refused (docs/spec-edits.md): " + "; ".join(parts)


def _edits(refusals: list[Refusal]) -> str:
    by_parent: dict[str, list[Refusal]] = {}
    for refusal in refusals:
        by_parent.setdefault(refusal.field.rpartition(".")[0], []).append(refusal)
    said = []
    for parent, siblings in by_parent.items():
        if parent and len(siblings) > 1:
            named = ", ".join(f"{r.field.rpartition('.')[2]} {r.wanted!r} (in force: {r.in_force!r})" for r in siblings)
            said.append(f"spec.{parent}: {named}")
        else:
            said.extend(refusal.edit for refusal in siblings)
    return ", ".join(said)


def review(desired: AgentExperimentSpec, status: AgentExperimentStatus) -> EditReview:
    """The spec a cycle runs with: `desired` where the table allows it, else what the trials were
    launched with. Fields refused once a trial has launched are held to the first trial's launch
    settings; trialTemplate.checkpoints to the active trials'."""
    refused: list[Refusal] = []
    objective, template = desired.objective, desired.trial_template
    first = _first_launch(status)
    if first is not None:
        kept_objective = {name: getattr(first.objective, name) for name in ("metric", "direction")}
        for name, kept in kept_objective.items():
            wanted = getattr(desired.objective, name)
            if wanted != kept:
                refused.append(Refusal(f"objective.{name}", wanted, kept, rule_for(f"objective.{name}")))
        objective = objective.model_copy(update=kept_objective)
        hyperparameters = dict(template.hyperparameters)
        for name in sorted(VALIDATION_DATA_FIELDS):
            wanted = _template_value(desired.trial_template.hyperparameters, name)
            kept = _template_value(first.trial_template.hyperparameters, name)
            if wanted != kept:
                field = f"{HYPERPARAMETERS}.{name}"
                refused.append(Refusal(field, wanted, kept, rule_for(field)))
                hyperparameters.pop(name, None)
                if name in first.trial_template.hyperparameters:
                    hyperparameters[name] = kept
        template = template.model_copy(update={"hyperparameters": hyperparameters})
    volumes = [settings.trial_template.checkpoints for settings in _active_settings(status)]
    kept_volume = next((volume for volume in volumes if volume != desired.trial_template.checkpoints), None)
    if any(volume != desired.trial_template.checkpoints for volume in volumes):
        field = "trialTemplate.checkpoints"
        refused.append(Refusal(field, _plain(template.checkpoints), _plain(kept_volume), rule_for(field)))
        template = template.model_copy(update={"checkpoints": kept_volume})
    if not refused:
        return EditReview(spec=desired, refused=())
    spec = desired.model_copy(update={"objective": objective, "trial_template": template})
    return EditReview(spec=spec, refused=tuple(refused))


def _first_launch(status: AgentExperimentStatus) -> LaunchSettings | None:
    for trial in sorted(status.trials, key=lambda trial: trial.index):
        if trial.launch is not None and trial.launch in status.launch_settings:
            return status.launch_settings[trial.launch]
    return None


def _active_settings(status: AgentExperimentStatus) -> list[LaunchSettings]:
    keys = {trial.launch for trial in status.active_trials if trial.launch is not None}
    return [status.launch_settings[key] for key in sorted(keys) if key in status.launch_settings]


def _template_value(hyperparameters: dict[str, Any], name: str) -> Any:
    """A template's value with the trainer's default filled in: leaving a default out is no edit."""
    if name in hyperparameters:
        return hyperparameters[name]
    return Hyperparameters.model_fields[name].get_default(call_default_factory=True)


def _plain(value: Any) -> Any:
    return value.model_dump(by_alias=True, mode="json") if isinstance(value, BaseModel) else value
