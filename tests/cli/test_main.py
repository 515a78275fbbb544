"""The `trainpilot` command itself: its version, and the operator's first words without a cluster."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest

from trainpilot.cli.main import main


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"trainpilot {version('trainpilot')}"


def test_the_operator_without_a_cluster_says_so_in_one_line_and_exits_2(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "missing.yaml")}
    finished = subprocess.run(
        [sys.executable, "-m", "trainpilot.cli", "operator", "--liveness", ""],
        env={**env, "PYTHONPATH": ":".join(sys.path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 2, finished.stderr
    [line] = finished.stderr.strip().splitlines()  # one line, no traceback, no retries
    assert line.startswith("trainpilot operator: no cluster to log in to") and "missing.yaml" in line
    assert "KUBECONFIG" in line and "trainpilot run" in line


def test_hints_name_the_trainpilot_the_users_shell_runs(tmp_path):
    from trainpilot.cli.hints import shell_command

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    python, script = bin_dir / "python", bin_dir / "trainpilot"
    for path in (python, script):
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    # On PATH (an activated venv, a pip install --user): the bare name.
    assert shell_command(path=str(bin_dir), cwd=str(tmp_path), executable=str(python)) == "trainpilot"
    # Not on PATH (after scripts/quickstart.sh): the path from where the user stands.
    assert shell_command(path="/usr/bin", cwd=str(tmp_path), executable=str(python)) == "venv/bin/trainpilot"
    assert shell_command(path="/usr/bin", cwd="/", executable=str(python)) == str(script).lstrip("/")
    script.unlink()  # run from a checkout that was never installed
    assert shell_command(path="/usr/bin", cwd=str(tmp_path), executable=str(python)) == f"{python} -m trainpilot.cli"
