"""The real thing: `trainpilot run` with real DeepSpeed trainers on the CPU (slow: about 90 s in all)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.localkit import QUICKSTART, REPO
from trainpilot.cli.hints import shell_command
from trainpilot.core import ledger as ledger_format
from trainpilot.runtime.local import _descendants

pytestmark = pytest.mark.slow

DIVERGING_LR = 5.0


def trainpilot(*argv: str) -> list[str]:
    return [sys.executable, "-m", "trainpilot.cli", *argv]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    return env


def read_ledger(run_dir: Path):
    records, problems = ledger_format.decode((run_dir / "ledger.jsonl").read_text())
    assert problems == [], problems  # the ledger stays whole
    return records


def read_status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    started = time.monotonic()
    done = subprocess.run(
        trainpilot("run", str(QUICKSTART), "--plain", "--run-dir", str(run_dir)),
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    return run_dir, done, time.monotonic() - started


def test_quickstart_runs_to_success(quickstart_run):
    run_dir, done, seconds = quickstart_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "trialTemplate.image" in out and "ignored" in out  # said once, on startup
    assert out.count("trialTemplate.image") == 1
    assert "decision [quickstart-d00000]" in out
    assert "best trial: quickstart-t" in out and f"run directory: {run_dir.resolve()}" in out
    assert str(run_dir.resolve() / "report.html") in out and "ledger:" in out

    status = read_status(run_dir)
    assert status["phase"] == "Succeeded"
    assert status["bestTrial"]["name"].startswith("quickstart-t")

    records = read_ledger(run_dir)
    assert [r.seq for r in records] == list(range(len(records)))
    assert status["decisionsMade"] == len(records)
    assert records[-1].decision.action == "complete"
    launches = [r.new_trial for r in records if r.new_trial]
    assert len(launches) == len(set(launches))

    # The lr 5.0 trial is stopped: terminated by a decision, or detected as diverged.
    diverging = next(t for t in status["trials"] if t["hyperparameters"].get("lr") == DIVERGING_LR)
    terminated = [r for r in records if r.decision.action == "terminate" and r.decision.trial == diverging["name"]]
    assert terminated or diverging["state"] == "Diverged"
    assert diverging["state"] in ("Terminated", "Diverged")

    # Every trial left its files.
    for trial in status["trials"]:
        folder = run_dir / "trials" / trial["name"]
        assert (folder / "config.json").exists() and (folder / "log.txt").exists()
        assert (folder / "metrics.jsonl").stat().st_size > 0
    assert (run_dir / "experiment.yaml").read_text() == QUICKSTART.read_text()


def test_quickstart_relaunches_the_diverging_trial_with_a_lower_lr(quickstart_run):
    run_dir, done, _ = quickstart_run
    assert done.returncode == 0
    status = read_status(run_dir)
    diverging = next(t for t in status["trials"] if t["hyperparameters"].get("lr") == DIVERGING_LR)
    children = [t for t in status["trials"] if t.get("parent") == diverging["name"]]
    assert children and children[0]["hyperparameters"]["lr"] == pytest.approx(DIVERGING_LR * 0.1)
    relaunch = next(r for r in read_ledger(run_dir) if r.new_trial == children[0]["name"])
    assert relaunch.decision.action == "launch" and relaunch.outcome == "executed"


def test_quickstart_report(quickstart_run):
    run_dir, done, _ = quickstart_run
    assert done.returncode == 0
    png = (run_dir / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    page = (run_dir / "report.html").read_text()
    for record in read_ledger(run_dir):
        assert record.id in page
    for trial in read_status(run_dir)["trials"]:
        assert trial["name"] in page
    assert "data:image/png;base64," in page


def test_quickstart_history(quickstart_run):
    run_dir, done, _ = quickstart_run
    shown = subprocess.run(trainpilot("history", str(run_dir)), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "quickstart-d00000" in shown.stdout


def _long_quickstart(folder: Path) -> Path:
    """The quickstart with longer trials, so Ctrl-C lands while they train."""
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"]["trialTemplate"]["hyperparameters"].update(max_steps=1500, eval_interval=100, checkpoint_interval=100)
    doc["spec"]["budget"]["maxTrials"] = 3
    path = folder / "long.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def test_ctrl_c_stops_cleanly_and_resume_finishes_without_repeats(tmp_path):
    manifest = _long_quickstart(tmp_path)
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        trainpilot("run", str(manifest), "--plain", "--run-dir", str(run_dir)),
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    trainers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            trainers.update(_descendants(process.pid))
            checkpoints = list((run_dir / "checkpoints").glob("*/latest")) if run_dir.exists() else []
            ledger = run_dir / "ledger.jsonl"
            decisions = len(ledger.read_text().splitlines()) if ledger.exists() else 0
            if checkpoints and decisions >= 2 and (run_dir / "status.json").exists():
                break
            time.sleep(0.5)
        trainers.update(_descendants(process.pid))
        assert trainers
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, output[-3000:]
    # Named as the user's shell (this PATH, this directory) runs it: .venv/bin/trainpilot in CI.
    assert f"resume with: {shell_command(cwd=str(REPO))} run --resume {run_dir.resolve()}" in output
    assert not [pid for pid in trainers if _alive(pid)]

    before = read_ledger(run_dir)
    status = read_status(run_dir)
    assert status["phase"] not in ("Succeeded", "Failed")
    assert status["decisionsMade"] == len(before)
    active = [t["name"] for t in status["trials"] if t["state"] in ("Pending", "Running")]

    resumed = subprocess.run(
        trainpilot("run", "--resume", str(run_dir), "--plain", "--no-report"),
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for name in active:
        assert f"{name}: restarted" in resumed.stdout
        assert "resumed run" in (run_dir / "trials" / name / "log.txt").read_text()

    records = read_ledger(run_dir)
    assert [r.id for r in records[: len(before)]] == [r.id for r in before]
    assert [r.seq for r in records] == list(range(len(records)))
    launched = [r.new_trial for r in records if r.decision.action == "launch"]
    assert len(launched) == len(set(launched)), launched
    final = read_status(run_dir)
    assert final["phase"] == "Succeeded" and final["bestTrial"]
    # A restarted trial is not mistaken for a diverged one while it reloads its checkpoint.
    lrs = {t["name"]: t["hyperparameters"].get("lr") for t in final["trials"]}
    for record in records[len(before) :]:
        if record.decision.action == "terminate" and record.decision.trial in active:
            assert lrs[record.decision.trial] == DIVERGING_LR or "nan" not in record.decision.rationale.lower()
