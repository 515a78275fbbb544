"""core.spec_edits: every spec field has a stated effect, and `review` holds what the table refuses
to the value the trials were launched with, applying everything else. One case per table row."""

from __future__ import annotations

from typing import Any, get_args

import pytest
from pydantic import BaseModel

from tests.support.builders import EXPERIMENT, NOW, make_spec, status_of, trial
from tests.support.paths import REPO
from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, LaunchSettings
from trainpilot.api.trial import VALIDATION_DATA_FIELDS, Hyperparameters
from trainpilot.core import spec_edits
from trainpilot.core.conditions import MAX_CONDITION_MESSAGE
from trainpilot.core.decision import Decision, DecisionRecord, decision_id
from trainpilot.core.spec_edits import (
    NEW_TRIALS,
    NEXT_CYCLE,
    REFUSED_ONCE_LAUNCHED,
    REFUSED_WHILE_RUNNING,
    RULES,
    changed_fields,
    review,
    rule_for,
)
from trainpilot.core.state import apply_record

BASE = {
    "trialTemplate": {
        "hyperparameters": {"max_steps": 200, "dataset": "synthetic", "block_size": 32},
        "checkpoints": {"claimName": "ckpt"},
    },
    "metrics": {"port": 9400},
}

# One edit per row of the table: (the rule's field, spec changes that edit it, the edited field).
EDITS: dict[str, dict[str, Any]] = {
    "objective.metric": {"objective": {"metric": "train_loss"}},
    "objective.direction": {"objective": {"direction": "maximize"}},
    "objective.goal": {"objective": {"goal": 1.5}},
    "searchSpace": {"searchSpace": [{"name": "lr", "min": 1e-4, "max": 0.5, "log": True}]},
    "initialTrials": {"initialTrials": [{"lr": 0.1}]},
    "budget": {"budget": {"maxTrials": 12}},
    "policy": {"policy": {"intervalSeconds": 5}},
    "suspend": {"suspend": True},
    "metrics.scrapeTimeoutSeconds": {"metrics": {"scrapeTimeoutSeconds": 5}},
    "metrics.source": {"metrics": {"source": "prometheus"}},
    "metrics.maxSampleAgeSeconds": {"metrics": {"maxSampleAgeSeconds": 60}},
    "metrics": {"metrics": {"port": 9500}},
    "queue": {"queue": {"name": "team-b"}},
    "retention": {"retention": {"checkpointTrials": 1}},
    "retention.checkpointTags": {"retention": {"checkpointTags": 1}},
    "trialTemplate.pendingTimeoutSeconds": {"trialTemplate": {"pendingTimeoutSeconds": 120}},
    "trialTemplate.checkpoints": {"trialTemplate": {"checkpoints": {"claimName": "other"}}},
    "trialTemplate": {"trialTemplate": {"image": "trainer:2"}},
}
DATA_VALUES: dict[str, Any] = {
    "dataset": "text",
    "data_path": ["corpus.txt"],
    "vocab_size": 24,
    "text_level": "char",
    "synthetic_order": 1,
    "synthetic_concentration": 0.7,
    "val_fraction": 0.2,
    "block_size": 48,
    "eval_windows": 256,
}
for _name, _value in DATA_VALUES.items():
    EDITS[f"trialTemplate.hyperparameters.{_name}"] = {"trialTemplate": {"hyperparameters": {_name: _value}}}


def spec(**changes: Any) -> AgentExperimentSpec:
    return make_spec(**_merge(BASE, changes))


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def applied(spec: AgentExperimentSpec, status: AgentExperimentStatus, seq: int, decision: Decision, new_trial: str):
    """`status` after the executed record number `seq` of `decision`, made under `spec`."""
    record = DecisionRecord(
        id=decision_id(EXPERIMENT, seq),
        seq=seq,
        time=NOW,
        experiment=EXPERIMENT,
        decision=decision,
        outcome="executed",
        new_trial=new_trial,
    )
    return apply_record(spec, status, record, NOW)


def launched(launched_with: AgentExperimentSpec, *names_and_states: tuple[str, str]) -> AgentExperimentStatus:
    """A status whose trials were launched under `launched_with` (through apply_record, as the loop does)."""
    status = AgentExperimentStatus()
    for seq, (name, _) in enumerate(names_and_states):
        decision = Decision(action="launch", policy="test", reason="test", hyperparameters={"lr": 0.01})
        status = applied(launched_with, status, seq, decision, name)
    for name, state in names_and_states:
        status.trial(name).state = state  # type: ignore[union-attr]
    return status


def value_at(spec: AgentExperimentSpec, field: str) -> Any:
    value: Any = spec.model_dump(by_alias=True, mode="json")
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


# ---- the table ------------------------------------------------------------------------------


def spec_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field of the spec as a dotted wire path, submodels walked."""
    paths = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        nested = [arg for arg in (info.annotation, *get_args(info.annotation)) if isinstance(arg, type)]
        models = [arg for arg in nested if issubclass(arg, BaseModel)]
        paths += spec_fields(models[0], path + ".") if models else [path]
    return paths


def test_every_field_of_the_spec_and_every_trainer_setting_has_a_rule():
    fields = spec_fields(AgentExperimentSpec)
    fields += [f"trialTemplate.hyperparameters.{name}" for name in Hyperparameters.model_fields]
    assert "trialTemplate.checkpoints.claimName" in fields and "policy.claude.model" in fields
    for field in fields:
        assert rule_for(field).effect in get_args(spec_edits.Effect)
    assert {rule.field for rule in RULES} == set(EDITS)  # and this test edits each row


def test_the_data_and_the_objective_are_fixed_once_a_trial_has_launched():
    for name in VALIDATION_DATA_FIELDS:
        assert rule_for(f"trialTemplate.hyperparameters.{name}").effect == REFUSED_ONCE_LAUNCHED
    assert rule_for("trialTemplate.hyperparameters.lr").effect == NEW_TRIALS
    assert rule_for("trialTemplate.checkpoints.mountPath").effect == REFUSED_WHILE_RUNNING
    assert rule_for("metrics.path").effect == NEW_TRIALS and rule_for("budget.maxGPUHours").effect == NEXT_CYCLE


def test_a_field_no_rule_covers_is_an_error():
    with pytest.raises(KeyError, match="no edit rule"):
        rule_for("spec")


def test_the_docs_table_is_the_rules():
    text = (REPO / "docs" / "spec-edits.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    documented = [tuple(cell.strip().strip("`") for cell in row.strip("|").split("|")) for row in rows]
    assert documented == [(rule.field, rule.effect, rule.why) for rule in RULES]


# ---- review: one edit per row, with a trial running ---------------------------------------------


@pytest.mark.parametrize("field", list(EDITS))
def test_an_edit_while_a_trial_runs_does_what_its_row_says(field):
    before = spec()
    edited = spec(**EDITS[field])
    [changed] = {rule_for(path).field for path in changed_fields(before, edited)}
    assert changed == field
    status = launched(before, ("exp-t000", "Running"))
    result = review(edited, status)
    effect = rule_for(field).effect
    if effect in (REFUSED_ONCE_LAUNCHED, REFUSED_WHILE_RUNNING):
        [refusal] = result.refused
        assert refusal.field == field
        assert f"spec.{field} {refusal.wanted!r} (in force: {refusal.in_force!r})" in result.message
        assert result.message.startswith(f"edits refused (docs/spec-edits.md): {effect} (")
        assert value_at(result.spec, field) == value_at(before, field) != value_at(edited, field)
        assert (
            result.spec.model_copy(update={"trial_template": edited.trial_template, "objective": edited.objective})
            == edited
        )
    else:
        assert result.refused == () and result.spec == edited
    if effect == NEW_TRIALS:
        # The running trial keeps what it was launched with.
        assert status.spec_for(result.spec, "exp-t000").trial_template == before.trial_template
        assert status.spec_for(result.spec, "exp-t000").metrics == before.metrics


def test_an_edit_with_no_trial_yet_applies_whatever_the_field():
    edited = spec(objective={"direction": "maximize"}, trialTemplate={"checkpoints": {"claimName": "other"}})
    assert review(edited, AgentExperimentStatus()).spec == edited


def test_checkpoints_apply_once_no_trial_is_active_but_the_data_stays_fixed():
    before = spec()
    status = launched(before, ("exp-t000", "Succeeded"), ("exp-t001", "Terminated"))
    edited = spec(trialTemplate={"checkpoints": {"claimName": "other"}, "hyperparameters": {"block_size": 64}})
    result = review(edited, status)
    assert [r.field for r in result.refused] == ["trialTemplate.hyperparameters.block_size"]
    assert result.spec.trial_template.checkpoints.claim_name == "other"  # type: ignore[union-attr]
    assert result.spec.trial_template.hyperparameters["block_size"] == 32


def test_a_default_written_out_is_no_edit():
    before = spec()
    status = launched(before, ("exp-t000", "Running"))
    written = spec(trialTemplate={"hyperparameters": {"eval_windows": Hyperparameters().eval_windows}})
    assert review(written, status).refused == ()


def test_refused_and_allowed_edits_together_apply_the_allowed_ones():
    before = spec()
    status = launched(before, ("exp-t000", "Running"))
    edited = spec(objective={"direction": "maximize"}, budget={"maxTrials": 12}, trialTemplate={"image": "trainer:2"})
    result = review(edited, status)
    assert [r.field for r in result.refused] == ["objective.direction"]
    assert result.spec.objective.direction == "minimize"
    assert result.spec.budget.max_trials == 12 and result.spec.trial_template.image == "trainer:2"
    assert "set it back, or start a new experiment" in result.message


def test_many_refused_edits_fit_one_condition_message_each_named_with_the_value_in_force():
    before = spec()
    status = launched(before, ("exp-t000", "Running"))
    edited = spec(
        objective={"metric": "train_loss", "direction": "maximize"},
        trialTemplate={"hyperparameters": DATA_VALUES, "checkpoints": {"claimName": "other"}},
    )
    result = review(edited, status)
    assert len(result.refused) == 2 + len(DATA_VALUES) + 1
    assert len(result.message) <= MAX_CONDITION_MESSAGE
    data = [r for r in result.refused if r.field.startswith("trialTemplate.hyperparameters.")]
    assert len(data) == len(DATA_VALUES)
    [volume] = [r for r in result.refused if r.field == "trialTemplate.checkpoints"]
    assert result.message == (
        "edits refused (docs/spec-edits.md): refused once a trial has launched (trials are compared on it; set it "
        "back, or start a new experiment for the new value): spec.objective: metric 'train_loss' (in force: "
        "'val_loss'), direction 'maximize' (in force: 'minimize'), spec.trialTemplate.hyperparameters: "
        + ", ".join(f"{r.field.rpartition('.')[2]} {r.wanted!r} (in force: {r.in_force!r})" for r in data)
        + "; refused while trials run (running trials use what they were launched with; it applies once no trial "
        "is active, or set it back to keep the spec and the cluster in step): spec.trialTemplate.checkpoints "
        f"{volume.wanted!r} (in force: {volume.in_force!r})"
    )


def test_changed_fields_names_hyperparameters_one_by_one_and_maps_as_a_whole():
    before = spec()
    after = spec(trialTemplate={"env": {"A": "1", "B": "2"}, "hyperparameters": {"dropout": 0.1, "block_size": 64}})
    assert changed_fields(before, after) == [
        "trialTemplate.env",
        "trialTemplate.hyperparameters.block_size",
        "trialTemplate.hyperparameters.dropout",
    ]
    assert changed_fields(before, before) == []


# ---- launch settings: what a trial runs under --------------------------------------------------


def test_a_fresh_trial_takes_the_spec_now_and_a_relaunch_from_a_checkpoint_its_sources():
    before = spec()
    status = launched(before, ("exp-t000", "Diverged"))
    status.trial("exp-t000").checkpoint_step = 50  # type: ignore[union-attr]
    edited = spec(trialTemplate={"image": "trainer:2", "nodes": 2}, metrics={"port": 9500})
    fresh = Decision(action="launch", policy="test", reason="test", hyperparameters={"lr": 0.02})
    relaunch = fresh.model_copy(update={"resume_from": "exp-t000", "parent": "exp-t000"})
    for seq, (decision, name) in enumerate([(fresh, "exp-t001"), (relaunch, "exp-t002")], start=1):
        status = applied(edited, status, seq, decision, name)
    t000, t001, t002 = (status.trial(f"exp-t00{i}") for i in range(3))
    assert t001.launch != t000.launch == t002.launch  # type: ignore[union-attr]
    assert status.spec_for(edited, "exp-t001").trial_template.image == "trainer:2"
    assert status.spec_for(edited, "exp-t002").trial_template.image == before.trial_template.image
    assert status.spec_for(edited, "exp-t002").metrics.port == 9400
    assert (t001.nodes, t002.nodes) == (2, 1)  # type: ignore[union-attr]
    assert set(status.launch_settings) == {t000.launch, t001.launch}  # type: ignore[union-attr]
    assert status.launch_settings[t001.launch] == LaunchSettings.of(edited)  # type: ignore[union-attr,index]


def test_a_restart_keeps_the_launch_settings_of_the_trial_it_replaces():
    before = spec()
    status = launched(before, ("exp-t000", "Running"))
    edited = spec(trialTemplate={"processesPerNode": 4})
    scale = Decision(action="scale", policy="test", reason="test", trial="exp-t000", nodes=2)
    status = applied(edited, status, 1, scale, "exp-t001")
    child = status.trial("exp-t001")
    assert child is not None and child.launch == status.trial("exp-t000").launch  # type: ignore[union-attr]
    assert status.spec_for(edited, "exp-t001").trial_template.processes_per_node is None


def test_a_trial_recorded_before_launch_settings_runs_under_the_spec():
    edited = spec(metrics={"port": 9500})
    status = status_of(edited, trial("exp-t000"))
    assert status.spec_for(edited, "exp-t000") is edited
