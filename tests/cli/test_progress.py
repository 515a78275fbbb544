"""Progress: plain lines when piped, a live table on a terminal."""

from __future__ import annotations

import io

from tests.support.localkit import HOSTILE, make_spec
from trainpilot.api.experiment import AgentExperimentStatus, BestTrial, TrialStatus
from trainpilot.api.metrics import TrialMetrics
from trainpilot.cli.progress import Progress
from trainpilot.core.decision import Decision, DecisionRecord


def record(seq: int, rationale: str) -> DecisionRecord:
    return DecisionRecord(
        id=f"quickstart-d{seq:05d}",
        seq=seq,
        time="2026-01-01T00:00:00+00:00",
        experiment="quickstart",
        decision=Decision(
            action="terminate", policy="heuristic", reason="asha-rung", rationale=rationale, trial="quickstart-t000"
        ),
        outcome="executed",
    )


def status(state: str) -> AgentExperimentStatus:
    trials = [
        TrialStatus(
            name="quickstart-t000",
            index=0,
            hyperparameters={"lr": 5.0},
            state=state,
            step=40,
            max_steps=300,
            objective=3.1,
            train_loss=3.0,
        ),
        TrialStatus(
            name="quickstart-t001",
            index=1,
            hyperparameters={"lr": 0.003},
            state="Running",
            step=120,
            max_steps=300,
            objective=2.6,
            best_objective=2.6,
        ),
    ]
    return AgentExperimentStatus(
        phase="Running",
        trials=trials,
        trials_launched=2,
        decisions_made=3,
        best_trial=BestTrial(name="quickstart-t001", objective=2.6, step=120),
    )


def test_plain_lines():
    out = io.StringIO()
    progress = Progress("quickstart", make_spec(), live=False, stream=out, summary_every=0)
    progress.start()
    progress.update(status("Running"))
    progress.decision(record(2, "val_loss 3.1 at rung 0.25"))
    progress.update(status("Terminated"))
    progress.message("quickstart-t001: restarted from its own checkpoint (resumed run)")
    progress.stop()
    lines = out.getvalue().splitlines()
    assert any("trial quickstart-t000: new -> Running at step 40" in line for line in lines)
    assert any(
        "decision [quickstart-d00002] heuristic: terminate quickstart-t000 (asha-rung)" in line for line in lines
    )
    assert any("quickstart-t000: Running -> Terminated" in line for line in lines)
    assert any("summary Running" in line and "best quickstart-t001 val_loss=2.6" in line for line in lines)
    assert any("restarted from its own checkpoint" in line for line in lines)
    # A resumed run does not announce old states as changes.
    again = io.StringIO()
    resumed = Progress("quickstart", make_spec(), live=False, stream=again, summary_every=1e9)
    resumed.remember(status("Running"))
    resumed.update(status("Running"))
    assert again.getvalue() == ""


def test_live_table_renders_trials_and_decisions():
    from rich.console import Console

    progress = Progress(
        "quickstart",
        make_spec(),
        live=True,
        stream=io.StringIO(),
        fresh_metrics=lambda: {
            "quickstart-t001": TrialMetrics(values={"trainpilot_step": 150, "trainpilot_train_loss": 2.5})
        },
    )
    progress.decision(record(2, HOSTILE + " [bold]not markup[/bold]"))
    progress.update(status("Running"))
    console = Console(file=io.StringIO(), width=200, force_terminal=False, color_system=None)
    console.print(progress._render())
    text = console.file.getvalue()
    assert "quickstart-t000" in text and "quickstart-t001 ★" in text
    assert "150/300" in text  # the fresher sample wins over the last cycle's step
    assert "asha-rung" in text and "[bold]not markup[/bold]" in text  # rationales are text, not markup


def test_a_condition_that_turns_false_and_back_is_a_line_each_time():
    from trainpilot.core.conditions import set_condition

    out = io.StringIO()
    progress = Progress("quickstart", make_spec(), live=False, stream=out, summary_every=1e9)
    healthy = set_condition(
        status("Running"), type="PolicyHealthy", value="True", reason="PolicyAnswered", message="ok", now="t0"
    )
    progress.update(healthy)
    assert "PolicyHealthy" not in out.getvalue()  # nothing to say while all is well
    failing = set_condition(
        healthy,
        type="PolicyHealthy",
        value="False",
        reason="PolicyFailing",
        message="policy heuristic failed 1 cycle(s) in a row: ModuleNotFoundError: No module named 'optuna'",
        now="t1",
    )
    progress.update(failing)
    progress.update(failing)  # said once, not every cycle
    lines = [line for line in out.getvalue().splitlines() if "PolicyHealthy" in line]
    assert len(lines) == 1 and "PolicyHealthy is False (PolicyFailing)" in lines[0] and "optuna" in lines[0]
    progress.update(healthy)
    assert "PolicyHealthy is True again (PolicyAnswered)" in out.getvalue()
