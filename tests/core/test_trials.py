"""build_trial_config: what the operator tells a trainer beyond the hyperparameters."""

from __future__ import annotations

import pytest

from tests.support.builders import make_spec, trial
from trainpilot.core.state import rung_step
from trainpilot.core.trials import build_trial_config


def test_the_trial_config_carries_the_rung_steps_the_operator_compares():
    spec = make_spec(policy={"heuristic": {"rungs": [0.25, 0.5, 0.75]}}, trialTemplate={"hyperparameters": {}})
    searched = trial("t0", hyperparameters={"lr": 0.01, "max_steps": 301})
    config = build_trial_config("exp", spec, searched, checkpoint_dir="/ckpt/exp/t0", resume_from=None)
    assert config.eval_at_steps == [75, 150, 226]  # round(fraction * 301)
    # The same steps the rungs use once the trainer reports its max_steps.
    reported = searched.model_copy(update={"max_steps": config.hyperparameters.max_steps})
    assert config.eval_at_steps == [rung_step(spec, reported, f) for f in (0.25, 0.5, 0.75)]


def test_the_spike_rule_is_the_policys_and_a_resume_names_its_tag():
    spec = make_spec(policy={"heuristic": {"spikeFactor": 4.0, "smoothing": 0.25}})
    config = build_trial_config(
        "exp", spec, trial("t1"), checkpoint_dir="/ckpt/exp/t1", resume_from="/ckpt/exp/t0", resume_step=120
    )
    assert (config.loss_spike_factor, config.loss_spike_smoothing) == (4.0, 0.25)
    assert (config.resume_from, config.resume_tag) == ("/ckpt/exp/t0", "step120")
    assert build_trial_config("exp", spec, trial("t2"), None, "/ckpt/exp/t0").resume_tag is None  # `latest`
    with pytest.raises(ValueError, match="resume_step needs resume_from"):
        build_trial_config("exp", spec, trial("t3"), None, None, resume_step=120)


def test_the_trial_config_keeps_as_many_checkpoint_tags_as_the_retention_says():
    keep = build_trial_config("exp", make_spec(retention={"checkpointTags": 2}), trial("t"), "/ckpt/t", None)
    assert keep.keep_checkpoint_tags == 2
    assert build_trial_config("exp", make_spec(), trial("t"), "/ckpt/t", None).keep_checkpoint_tags == 3
    every = build_trial_config("exp", make_spec(retention={"checkpointTags": None}), trial("t"), "/ckpt/t", None)
    assert every.keep_checkpoint_tags is None
