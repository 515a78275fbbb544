"""Invalid trial configs: exit 2 and one stderr line that names the field, never a traceback.

Every check runs before DeepSpeed starts, so each case costs one Python start (about a second).
"""

from __future__ import annotations

import json

import pytest

from tests.support.trainerkit import TINY, run_trainer, write_config


def _hp(**changes):
    return {"hyperparameters": {**TINY, **changes}}


CASES = {
    "unknown field": (_hp(n_layers=2), "hyperparameters.n_layers: Extra inputs are not permitted"),
    "unknown top-level field": ({"checkpoint_directory": "/x"}, "checkpoint_directory"),
    "n_head not dividing n_embd": (_hp(n_head=3, n_embd=32), "n_embd (32) must be divisible by n_head (3)"),
    "fp16 on an explicit cpu": (_hp(precision="fp16", device="cpu"), "precision: fp16 is GPU-only"),
    "fp16 on a machine without GPU": (_hp(precision="fp16"), "hyperparameters.precision: fp16 is GPU-only"),
    "cuda on a machine without GPU": (_hp(device="cuda"), "hyperparameters.device: cuda"),
    "negative lr": (_hp(lr=-0.1), "hyperparameters.lr: Input should be greater than 0"),
    "tokens without data_path": (_hp(dataset="tokens", vocab_size=50), "data_path: the tokens dataset needs a folder"),
    "tokens folder without bins": (
        _hp(dataset="tokens", vocab_size=50, data_path=["/nonexistent/x"]),
        "hyperparameters.data_path",
    ),
    "text path missing": (
        _hp(dataset="text", data_path=["/nonexistent/corpus.txt"]),
        "hyperparameters.data_path: no such file",
    ),
    "wrong type": (_hp(n_layer="two"), "hyperparameters.n_layer: Input should be a valid integer"),
    "min_lr above lr": (_hp(lr=1e-3, min_lr=1e-2), "min_lr (0.01) must not exceed lr (0.001)"),
    "synthetic table too large": (_hp(vocab_size=64, synthetic_order=4), "vocab_size: synthetic data"),
    "resume_from without checkpoint": ({"resume_from": "/nonexistent/checkpoints"}, "resume_from: no checkpoint in"),
}


def _assert_one_clear_line(finished, expected: str) -> None:
    assert finished.returncode == 2, finished.stdout + finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, finished.stderr
    assert "Traceback" not in finished.stderr
    assert expected in lines[0]
    assert finished.result["exit_reason"] == "invalid-config"


@pytest.mark.parametrize("case", CASES)
def test_invalid_config_exits_2_naming_the_field(case, tmp_path):
    config, expected = CASES[case]
    path = tmp_path / "trial.json"
    path.write_text(json.dumps(config))
    _assert_one_clear_line(run_trainer(path, tmp_path), expected)


def test_not_json(tmp_path):
    path = tmp_path / "trial.json"
    path.write_text("{hyperparameters: ")
    _assert_one_clear_line(run_trainer(path, tmp_path), "trial config is not valid JSON")


def test_not_an_object(tmp_path):
    path = tmp_path / "trial.json"
    path.write_text("[1, 2]")
    _assert_one_clear_line(run_trainer(path, tmp_path), "trial config must be a JSON object")


def test_missing_file(tmp_path):
    _assert_one_clear_line(run_trainer(tmp_path / "absent.json", tmp_path), "cannot be read: No such file or directory")


def test_config_from_the_environment_and_none_at_all(tmp_path):
    path = write_config(tmp_path / "trial.json", {"n_head": 5})
    _assert_one_clear_line(run_trainer(None, tmp_path, args=[], TRAINPILOT_TRIAL_CONFIG=str(path)), "n_head (5)")
    _assert_one_clear_line(run_trainer(None, tmp_path, args=[]), "set TRAINPILOT_TRIAL_CONFIG or pass --config")


def test_bad_metrics_port(tmp_path):
    path = write_config(tmp_path / "trial.json")
    _assert_one_clear_line(run_trainer(path, tmp_path, TRAINPILOT_METRICS_PORT="ninety"), "TRAINPILOT_METRICS_PORT")


def test_a_token_id_past_vocab_size_in_training_data_exits_2_naming_the_field(tmp_path):
    """Found in a batch once training runs (the training file is never read whole): still exit 2 and
    the field, not a device-side assert or a traceback."""
    import numpy as np

    (np.arange(4000, dtype=np.uint16) % 300).tofile(tmp_path / "train.bin")
    (np.arange(400, dtype=np.uint16) % 50).tofile(tmp_path / "val.bin")
    data = {"dataset": "tokens", "data_path": [str(tmp_path)], "vocab_size": 64}
    finished = run_trainer(write_config(tmp_path / "trial.json", {**data, "max_steps": 20}), tmp_path)
    assert finished.returncode == 2, finished.stdout + finished.stderr
    assert "Traceback" not in finished.stderr
    assert "hyperparameters.vocab_size: train.bin holds token id" in finished.stderr
    assert finished.result["exit_reason"] == "invalid-config"
