"""The quickstart with `policy.type: claude`, run by `trainpilot run` with real trainers, Claude scripted.

The local Messages API answers every call with the same launch; on a launch the seeded draw gives
to Claude (overrideShare 1 here) it replaces Optuna's proposal, and nothing else changes hands:
the initial trials, the relaunch after the divergence and the end of the budget stay the heuristic's.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.support.localkit import QUICKSTART, REPO
from tests.support.messages_api import tool_reply
from trainpilot.core import ledger as ledger_format

pytestmark = pytest.mark.slow

KEY = "sk-ant-api03-run-SECRET-never-in-the-run-dir"
CLAUDE_LR = 0.02


def test_the_quickstart_with_a_scripted_claude_runs_to_success_on_the_record(messages_api, tmp_path):
    experiment = yaml.safe_load(QUICKSTART.read_text())
    experiment["spec"]["policy"] = {
        "type": "claude",
        "intervalSeconds": 2,
        "claude": {"overrideShare": 1.0, "minIntervalSeconds": 0},
    }
    path = tmp_path / "quickstart-claude.yaml"
    path.write_text(yaml.safe_dump(experiment))
    messages_api.will(
        tool_reply(
            [
                {
                    "action": "launch",
                    "reason": "between-the-two",
                    "rationale": "lr between the survivors",
                    "hyperparameters": {"lr": CLAUDE_LR, "weight_decay": 0.01},
                    "confidence": 0.6,
                }
            ]
        )
    )
    run_dir = tmp_path / "run"
    env = {**os.environ, "ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": messages_api.url}
    env.pop("COLUMNS", None)
    done = subprocess.run(
        [sys.executable, "-m", "trainpilot.cli", "run", str(path), "--plain", "--run-dir", str(run_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records, problems = ledger_format.decode((run_dir / "ledger.jsonl").read_text())
    assert problems == []
    voices = {r.decision.policy for r in records}
    assert voices <= {"claude", "heuristic"}, voices
    by_claude = [r for r in records if r.decision.policy == "claude"]
    assert by_claude and all(r.decision.action == "launch" and r.outcome == "executed" for r in by_claude)
    assert all(r.decision.call is not None and r.decision.call.input_tokens == 900 for r in by_claude)
    assert any(r.decision.hyperparameters.get("lr") == CLAUDE_LR for r in by_claude)
    kept = {r.decision.reason for r in records if r.decision.policy == "heuristic"}
    assert {"initial-trial", "relaunch-after-divergence"} <= kept
    assert messages_api.requests  # asked, with the key in its header only
    # Every exchange is archived, and each of Claude's decisions names the exact prompt it came from.
    archive = [json.loads(line) for line in (run_dir / "prompts.jsonl").read_text().splitlines()]
    assert len(archive) == len(messages_api.requests)
    for exchange in archive:
        digest = hashlib.sha256((exchange["system"] + exchange["prompt"]).encode()).hexdigest()
        assert exchange["prompt_sha256"] == digest and exchange["input_tokens"] == 900
    assert {r.decision.call.prompt_sha256 for r in by_claude} <= {e["prompt_sha256"] for e in archive}
    assert [e["prompt"] for e in archive] == messages_api.prompts()
    # The key is nowhere in what the run wrote or printed, nor in what the trainers saw.
    assert KEY not in done.stdout + done.stderr
    for file in run_dir.rglob("*"):
        if file.is_file():
            assert KEY.encode() not in file.read_bytes(), file
