"""`trainpilot run` refuses bad input with one clear line and exit 2, and never touches a run dir."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from argparse import Namespace

import pytest

from tests.support.localkit import QUICKSTART, quickstart_raw, snapshot, write_yaml
from trainpilot.cli import run as localrun
from trainpilot.cli.main import main


def run(argv, capsys) -> tuple[int, str]:
    code = main(["run", *argv])
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.fixture
def existing_run(tmp_path):
    """A run directory of the quickstart that was stopped half-way."""
    run_dir = tmp_path / "runs" / "quickstart"
    (run_dir / "trials" / "quickstart-t000").mkdir(parents=True)
    (run_dir / "experiment.yaml").write_text(QUICKSTART.read_text())
    (run_dir / "status.json").write_text(json.dumps({"phase": "Running", "decisionsMade": 2}))
    (run_dir / "ledger.jsonl").write_text("")
    (run_dir / "trials" / "quickstart-t000" / "log.txt").write_text("hello\n")
    return run_dir


def test_invalid_yaml(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    code, err = run([str(bad)], capsys)
    assert code == 2 and "not valid YAML" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "trainpilot-runs").exists()


def test_unknown_field(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = quickstart_raw()
    doc["spec"]["budget"]["maxTrails"] = 3
    code, err = run([str(write_yaml(tmp_path / "typo.yaml", doc))], capsys)
    assert code == 2 and "maxTrails" in err
    assert not (tmp_path / "trainpilot-runs").exists()


def test_gpus_without_cpu_flag_on_a_gpu_less_machine(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = quickstart_raw()
    doc["spec"]["trialTemplate"]["gpusPerNode"] = 1
    code, err = run([str(write_yaml(tmp_path / "gpu.yaml", doc))], capsys)
    assert code == 2
    assert "trialTemplate.gpusPerNode" in err and "--cpu" in err and "no GPU" in err
    assert not (tmp_path / "trainpilot-runs").exists()


def test_cpu_flag_treats_gpus_as_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(localrun, "trainer_command", lambda: [sys.executable, "fake.py"])
    doc = quickstart_raw()
    doc["spec"]["trialTemplate"]["gpusPerNode"] = 2
    path = write_yaml(tmp_path / "gpu.yaml", doc)
    args = Namespace(
        experiment=str(path), run_dir=str(tmp_path / "r"), resume=None, cpu=True, plain=True, no_report=True
    )
    prepared = localrun.prepare(args, gpus=0, cores=2)
    try:
        assert prepared.spec.trial_template.gpus_per_node == 0
        assert any("--cpu" in note and "treated as 0" in note for note in prepared.notes)
        assert any("trialTemplate.image" in note and "ignored" in note for note in prepared.notes)
        assert (tmp_path / "r" / "experiment.yaml").read_text() == path.read_text()
    finally:
        import os

        os.close(prepared.lock_fd)


def test_parallel_trials_bounded_by_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(localrun, "trainer_command", lambda: [sys.executable, "fake.py"])
    args = Namespace(
        experiment=str(QUICKSTART), run_dir=str(tmp_path / "r"), resume=None, cpu=False, plain=True, no_report=True
    )
    prepared = localrun.prepare(args, gpus=0, cores=1)
    try:
        assert prepared.spec.budget.parallel_trials == 1
        assert any("1 trial(s) at a time instead of budget.parallelTrials 2" in note for note in prepared.notes)
    finally:
        import os

        os.close(prepared.lock_fd)


def test_run_dir_with_an_edited_experiment_says_what_changed(existing_run, tmp_path, capsys):
    before = snapshot(existing_run)
    doc = quickstart_raw()
    maximum = doc["spec"]["budget"]["maxTrials"]
    doc["spec"]["budget"]["maxTrials"] = 6
    code, err = run([str(write_yaml(tmp_path / "edited.yaml", doc)), "--run-dir", str(existing_run)], capsys)
    assert code == 2 and "started from a different spec" in err
    assert f"spec.budget.maxTrials: {maximum} -> 6" in err
    assert f"run --resume {existing_run}" in err and "new --run-dir" in err
    assert snapshot(existing_run) == before


def test_run_dir_with_a_different_experiment(existing_run, tmp_path, capsys):
    before = snapshot(existing_run)
    doc = quickstart_raw()
    doc["metadata"]["name"] = "another"
    code, err = run([str(write_yaml(tmp_path / "other.yaml", doc)), "--run-dir", str(existing_run)], capsys)
    assert code == 2 and "different run" in err and "--resume" in err and "--run-dir" in err
    assert snapshot(existing_run) == before


def test_run_dir_with_a_stopped_run_of_the_same_experiment(existing_run, capsys):
    before = snapshot(existing_run)
    code, err = run([str(QUICKSTART), "--run-dir", str(existing_run)], capsys)
    assert code == 2 and f"--resume {existing_run}" in err
    assert snapshot(existing_run) == before


def test_run_dir_with_a_finished_run(existing_run, capsys):
    (existing_run / "status.json").write_text(json.dumps({"phase": "Succeeded"}))
    before = snapshot(existing_run)
    code, err = run([str(QUICKSTART), "--run-dir", str(existing_run)], capsys)
    assert code == 2 and "finished" in err and "new --run-dir" in err
    assert snapshot(existing_run) == before


def test_run_dir_that_is_not_a_run_dir(tmp_path, capsys):
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code, err = run([str(QUICKSTART), "--run-dir", str(folder)], capsys)
    assert code == 2 and "not a trainpilot run directory" in err
    assert snapshot(folder) == {"notes.txt": b"mine"} and not (folder / "run.lock").exists()


def test_resume_without_experiment_yaml(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    code, err = run(["--resume", str(folder)], capsys)
    assert code == 2 and "no experiment.yaml" in err
    assert list(folder.iterdir()) == []


def test_resume_of_missing_dir(tmp_path, capsys):
    code, err = run(["--resume", str(tmp_path / "nope")], capsys)
    assert code == 2 and "no such run directory" in err


def test_no_experiment_and_no_resume(capsys):
    code, err = run([], capsys)
    assert code == 2 and "--resume" in err


def running_status(spec_doc: dict) -> str:
    """status.json of a run whose first trial runs, launched under `spec_doc`."""
    from trainpilot.api.experiment import LaunchSettings, parse_spec

    settings = LaunchSettings.of(parse_spec(spec_doc))
    trial = {"name": "quickstart-t000", "index": 0, "state": "Running", "launch": settings.key}
    status = {
        "phase": "Running",
        "decisionsMade": 1,
        "trials": [trial],
        "launchSettings": {settings.key: settings.model_dump(by_alias=True, mode="json")},
    }
    return json.dumps(status)


def test_resume_with_an_edit_the_table_allows_applies_it_and_keeps_the_yaml_before(existing_run, tmp_path, monkeypatch):
    monkeypatch.setattr(localrun, "trainer_command", lambda: [sys.executable, "fake.py"])
    (existing_run / "status.json").write_text(running_status(quickstart_raw()["spec"]))
    doc = quickstart_raw()
    doc["spec"]["budget"]["maxTrials"] = 6
    doc["spec"]["trialTemplate"]["hyperparameters"]["warmup_steps"] = 20
    path = write_yaml(tmp_path / "edited.yaml", doc)
    args = Namespace(
        experiment=str(path), run_dir=None, resume=str(existing_run), cpu=False, plain=True, no_report=True
    )
    prepared = localrun.prepare(args, gpus=0, cores=2)
    try:
        assert prepared.spec.budget.max_trials == 6
        [note] = [note for note in prepared.notes if note.startswith("applying the edits")]
        assert "spec.budget.maxTrials (next cycle)" in note
        assert "spec.trialTemplate.hyperparameters.warmup_steps (new trials)" in note
        assert (existing_run / "experiment.yaml").read_text() == path.read_text()
        assert (existing_run / "experiment.1.yaml").read_text() == QUICKSTART.read_text()
    finally:
        import os

        os.close(prepared.lock_fd)


@pytest.mark.parametrize(
    ("section", "changes", "field"),
    [
        ("objective", {"direction": "maximize"}, "spec.objective.direction"),
        ("hyperparameters", {"eval_windows": 512}, "spec.trialTemplate.hyperparameters.eval_windows"),
        ("trialTemplate", {"checkpoints": {"claimName": "other"}}, "spec.trialTemplate.checkpoints"),
    ],
)
def test_resume_with_an_edit_the_table_refuses_names_the_field_and_changes_nothing(
    existing_run, tmp_path, capsys, section, changes, field
):
    (existing_run / "status.json").write_text(running_status(quickstart_raw()["spec"]))
    doc = quickstart_raw()
    target = doc["spec"]["trialTemplate"]["hyperparameters"] if section == "hyperparameters" else doc["spec"][section]
    target.update(changes)
    doc["spec"]["budget"]["maxTrials"] = 6  # allowed, but nothing is half applied
    before = snapshot(existing_run)
    code, err = run([str(write_yaml(tmp_path / "edited.yaml", doc)), "--resume", str(existing_run)], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{field} " in err and "(in force: " in err and "edits refused" in err and "(nothing was changed)" in err
    assert snapshot(existing_run) == before


def test_resume_with_another_experiments_yaml(existing_run, tmp_path, capsys):
    doc = quickstart_raw()
    doc["metadata"]["name"] = "another"
    before = snapshot(existing_run)
    code, err = run([str(write_yaml(tmp_path / "other.yaml", doc)), "--resume", str(existing_run)], capsys)
    assert code == 2 and "metadata.name 'another'" in err and "new --run-dir" in err
    assert snapshot(existing_run) == before


def test_resume_of_a_finished_run_does_nothing(existing_run, capsys):
    (existing_run / "status.json").write_text(json.dumps({"phase": "Succeeded"}))
    before = snapshot(existing_run)
    code, err = run(["--resume", str(existing_run)], capsys)
    assert code == 0 and "already finished" in err
    assert snapshot(existing_run) == before


def test_run_dir_in_use_by_another_process(existing_run, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import fcntl, os, sys, time
                fd = os.open({str(existing_run / "run.lock")!r}, os.O_RDWR | os.O_CREAT)
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.ftruncate(fd, 0); os.write(fd, f"{{os.getpid()}}\\n".encode())
                print("ready", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        before = snapshot(existing_run)
        lock_before = (existing_run / "run.lock").read_text()
        for argv in (["--resume", str(existing_run)], [str(QUICKSTART), "--run-dir", str(existing_run)]):
            code, err = run(argv, capsys)
            assert code == 2 and "in use" in err and f"pid {holder.pid}" in err
        assert snapshot(existing_run) == before
        assert (existing_run / "run.lock").read_text() == lock_before
    finally:
        holder.kill()
        holder.wait()
