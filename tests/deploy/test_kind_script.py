"""scripts/kind.sh and docs/kind.md, run here with stand-ins for docker, kind, kubectl and helm.

No container engine or cluster runs here. Each stand-in records the words it was called with and
answers as the real tool would for the script's questions, so these tests check what can be
checked without them: the script runs top to bottom, every command docs/kind.md shows is one the
script runs with exactly those words, and the names it builds, loads and installs are the ones the
chart and the quickstart use."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import chart as chart_support
from tests.support.paths import CHART, QUICKSTART_PATH, REPO

SCRIPT = REPO / "scripts" / "kind.sh"
DOC = REPO / "docs" / "kind.md"
TOOLS = ("docker", "kind", "kubectl", "helm", "trainpilot")
# What the stand-ins answer; anything else succeeds silently.
STAND_IN = """#!{python}
import json, os, sys
words = [os.path.basename(sys.argv[0]), *sys.argv[1:]]
with open({log!r}, "a") as log:
    log.write(json.dumps(words) + "\\n")
if words[:3] == ["kind", "get", "clusters"]:
    print(os.environ.get("STAND_IN_CLUSTERS", ""))
elif words[0] == "kubectl" and "jsonpath={{.status.phase}}" in words:
    print(os.environ.get("STAND_IN_PHASE", "Succeeded"), end="")
"""


@pytest.fixture
def stand_ins(tmp_path):
    """PATH with the stand-ins first; returns (env, calls()) where calls() lists every call's words."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    for name in TOOLS:
        tool = bin_dir / name
        tool.write_text(STAND_IN.format(python=sys.executable, log=str(log)))
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "TIMEOUT_SECONDS": "30"}
    env.pop("KIND_EXPERIMENTAL_PROVIDER", None)

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls


def run_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)


def doc_commands() -> list[list[str]]:
    """The words of every docker/kind/kubectl/helm/trainpilot command in docs/kind.md's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and line.split()[0] in TOOLS:
                commands.append(shlex.split(line))
    return commands


def test_from_nothing_to_a_finished_experiment_runs_every_step_in_order(stand_ins):
    env, calls = stand_ins
    finished = run_script(env)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    steps = [words[:3] for words in calls()]
    order = [
        ["kind", "create", "cluster"],
        ["docker", "build", "-f"],
        ["docker", "build", "-f"],
        ["kind", "load", "docker-image"],
        ["helm", "upgrade", "--install"],
        ["kubectl", "--context", "kind-trainpilot"],
        ["trainpilot", "history", "quickstart"],
    ]
    positions = [steps.index(step, (steps.index(order[i - 1]) + 1) if i else 0) for i, step in enumerate(order)]
    assert positions == sorted(positions), steps
    assert "Tear down with: bash scripts/kind.sh down" in finished.stdout


def test_it_builds_and_loads_the_images_the_chart_and_the_quickstart_run(stand_ins):
    env, calls = stand_ins
    assert run_script(env, "up").returncode == 0
    builds = {
        words[words.index("-f") + 1]: words[words.index("-t") + 1]
        for words in calls()
        if words[:2] == ["docker", "build"]
    }
    loads = next(words for words in calls() if words[:3] == ["kind", "load", "docker-image"])
    install = next(words for words in calls() if words[:3] == ["helm", "upgrade", "--install"])
    namespace = install[install.index("--namespace") + 1]

    quickstart_image = yaml.safe_load(QUICKSTART_PATH.read_text())["spec"]["trialTemplate"]["image"]
    release, chart = install[3], install[4]
    assert chart == str(CHART.relative_to(REPO))
    deployment = next(d for d in chart_support.render({}, namespace, release) if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert builds == {"trainer_image/Dockerfile": quickstart_image, "operator/Dockerfile": container["image"]}
    assert set(builds.values()) <= set(loads[3:])
    # The chart watches its release namespace, which is where the script applies the experiment.
    assert f"--namespace={namespace}" in container["args"]
    kind_config = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    assert loads[loads.index("--name") + 1] == kind_config["name"]
    # The rollout the script waits for is the chart's Deployment.
    rollout = next(w for w in calls() if w[:1] == ["kubectl"] and "rollout" in w)
    assert rollout[rollout.index("status") + 1] == f"deployment/{deployment['metadata']['name']}"


def test_the_trainer_image_for_kind_is_the_cpu_one_unless_asked(stand_ins):
    env, calls = stand_ins
    assert run_script(env, "up").returncode == 0
    trainer = next(w for w in calls() if w[:2] == ["docker", "build"] and "trainer_image/Dockerfile" in w)
    assert (
        "BASE_IMAGE=python:3.11-slim" in trainer and "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in trainer
    )
    assert run_script({**env, "TRAINER_BASE": "cuda"}, "up").returncode == 0
    trainer = [w for w in calls() if w[:2] == ["docker", "build"] and "trainer_image/Dockerfile" in w][-1]
    assert not any(word.startswith("BASE_IMAGE=") for word in trainer)


def test_an_existing_cluster_is_reused_not_recreated(stand_ins):
    env, calls = stand_ins
    assert run_script({**env, "STAND_IN_CLUSTERS": "trainpilot"}, "up").returncode == 0
    assert not [w for w in calls() if w[:3] == ["kind", "create", "cluster"]]


@pytest.mark.parametrize(
    ("phase", "says"), [("Failed", "the experiment Failed"), ("Pending", "still Pending after 1 s")]
)
def test_an_experiment_that_does_not_succeed_exits_1_and_says_so(stand_ins, phase, says):
    env, _ = stand_ins
    finished = run_script({**env, "STAND_IN_PHASE": phase, "TIMEOUT_SECONDS": "1"}, "experiment")
    assert finished.returncode == 1
    assert says in finished.stdout


def test_missing_tools_are_named_before_anything_runs(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    for name in ("sed", "grep", "dirname"):
        (bare / name).symlink_to(f"/bin/{name}" if Path(f"/bin/{name}").exists() else f"/usr/bin/{name}")
    finished = subprocess.run(
        ["/bin/bash", str(SCRIPT), "up"], env={"PATH": str(bare)}, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 2
    assert "docker kind kubectl helm not found on PATH" in finished.stderr


def test_every_command_in_the_doc_is_one_the_script_runs(stand_ins):
    env, calls = stand_ins
    assert run_script(env).returncode == 0 and run_script(env, "down").returncode == 0
    # Without trainpilot installed the script prints the ledger with kubectl alone.
    (Path(env["PATH"].split(":")[0]) / "trainpilot").unlink()
    assert run_script(env, "experiment").returncode == 0
    shown = doc_commands()
    assert len(shown) >= 8, shown
    ran = calls()
    missing = [" ".join(words) for words in shown if words not in ran]
    assert not missing, "docs/kind.md shows commands scripts/kind.sh does not run:\n" + "\n".join(missing)
