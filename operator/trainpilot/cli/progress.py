"""What `trainpilot run` shows while it works.

On a terminal: a live table of the trials and the latest decisions with their reasons,
redrawn in place (rich). Piped, in CI, or with --plain: one line per decision, one line per
trial state change, and a summary line every so often, so a log file reads like a story.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import IO, Any

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, TrialStatus
from trainpilot.api.metrics import TrialMetrics
from trainpilot.core.decision import DecisionRecord

STATE_STYLES = {
    "Pending": "dim",
    "Running": "cyan",
    "Succeeded": "green",
    "Failed": "red",
    "Diverged": "bold red",
    "Terminated": "yellow",
}
ACTION_STYLES = {
    "launch": "cyan",
    "terminate": "red",
    "mutate": "magenta",
    "scale": "blue",
    "complete": "green",
}


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def trial_lr(spec: AgentExperimentSpec, trial: TrialStatus) -> float | None:
    value = trial.hyperparameters.get("lr", spec.trial_template.hyperparameters.get("lr"))
    return None if value is None else float(value)


def summary_line(spec: AgentExperimentSpec, status: AgentExperimentStatus) -> str:
    running = sum(1 for trial in status.trials if not trial.finished)
    done = len(status.trials) - running
    text = (
        f"{status.phase}: {running} running, {done} finished, {status.trials_launched}/"
        f"{spec.budget.max_trials} launched, {status.decisions_made} decisions"
    )
    if status.best_trial is not None:
        best = status.best_trial
        text += f"; best {best.name} {spec.objective.metric}={fmt(best.objective)} at step {best.step}"
    return text


class Progress:
    """Live table on a TTY, plain lines otherwise. Every method is cheap and safe to call often."""

    def __init__(
        self,
        experiment: str,
        spec: AgentExperimentSpec,
        *,
        live: bool,
        stream: IO[str] | None = None,
        summary_every: float = 15.0,
        max_decisions: int = 6,
        fresh_metrics: Callable[[], Mapping[str, TrialMetrics]] | None = None,
    ) -> None:
        self.experiment = experiment
        self.spec = spec
        self.stream = stream or sys.stdout
        self.live_mode = live
        self.summary_every = summary_every
        self.decisions: deque[DecisionRecord] = deque(maxlen=max_decisions)
        self.status: AgentExperimentStatus | None = None
        self.states: dict[str, str] = {}
        self.conditions: dict[str, str] = {}  # condition type -> its status, as last reported
        self.last_summary = time.monotonic()
        # The runtime's latest samples: a running trial's step and loss between two cycles.
        self.fresh_metrics = fresh_metrics
        self._live: Any = None
        self._console: Any = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if not self.live_mode:
            return
        from rich.console import Console
        from rich.live import Live

        self._console = Console(file=self.stream)
        self._live = Live(
            get_renderable=self._render,
            console=self._console,
            refresh_per_second=4,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None

    def __enter__(self) -> Progress:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ events

    def line(self, text: str) -> None:
        """A message for the user: above the live table, or a plain timestamped line."""
        if self._console is not None:
            self._console.print(f"[dim]{_clock()}[/dim] {_escape(text)}", highlight=False)
        else:
            self.stream.write(f"{_clock()} {text}\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        self.line(text)

    def decision(self, record: DecisionRecord) -> None:
        self.decisions.append(record)
        if self._live is None or record.outcome == "pending-approval":  # a human is needed: always a line
            self.line(f"decision {record.message()}")

    def remember(self, status: AgentExperimentStatus) -> None:
        """Take these trial states as known (a resumed run), so only later changes are reported."""
        self.status = status
        self.states.update({trial.name: trial.state for trial in status.trials})
        self.conditions.update({condition.type: condition.status for condition in status.conditions})

    def update(self, status: AgentExperimentStatus) -> None:
        """After each cycle: note state changes, and every so often a summary line."""
        self.status = status
        changes = []
        for trial in status.trials:
            previous = self.states.get(trial.name)
            if previous != trial.state:
                self.states[trial.name] = trial.state
                changes.append((trial, previous))
        self._report_conditions(status)
        if self._live is not None:
            self._live.refresh()
            return
        for trial, previous in changes:
            text = f"trial {trial.name}: {previous or 'new'} -> {trial.state} at step {trial.step}"
            if trial.objective is not None:
                text += f", {self.spec.objective.metric} {fmt(trial.objective)}"
            if trial.message:
                text += f" ({trial.message})"
            self.line(text)
        moment = time.monotonic()
        if moment - self.last_summary >= self.summary_every:
            self.last_summary = moment
            self.line(f"summary {summary_line(self.spec, status)}")

    def _report_conditions(self, status: AgentExperimentStatus) -> None:
        """One line when a condition turns False (what keeps the run from progressing) or back to True."""
        for condition in status.conditions:
            previous = self.conditions.get(condition.type)
            self.conditions[condition.type] = condition.status
            # AwaitingApproval is the one condition whose True needs the user (a decision waits for them).
            quiet = "False" if condition.type == contract.CONDITION_AWAITING_APPROVAL else "True"
            if previous == condition.status or (previous is None and condition.status == quiet):
                continue
            again = " again" if condition.status == quiet else ""
            self.line(f"{condition.type} is {condition.status}{again} ({condition.reason}): {condition.message}")

    # ------------------------------------------------------------------ the live view

    def _render(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        status = self.status
        metric = self.spec.objective.metric
        trials = Table(title=f"trainpilot run: {self.experiment}", title_justify="left", expand=False)
        for column, justify in (
            ("trial", "left"),
            ("state", "left"),
            ("step/max", "right"),
            ("train loss", "right"),
            (metric, "right"),
            ("lr", "right"),
            ("best", "right"),
            ("parent", "left"),
        ):
            trials.add_column(column, justify=justify)  # type: ignore[arg-type]
        best_name = status.best_trial.name if status and status.best_trial else None
        fresh = self.fresh_metrics() if self.fresh_metrics is not None else {}
        for trial in status.trials if status else []:
            name = Text(trial.name + (" ★" if trial.name == best_name else ""))
            if trial.name == best_name:
                name.stylize("bold green")
            step, train_loss = trial.step, trial.train_loss
            sample = fresh.get(trial.name)
            if sample is not None and not trial.finished and sample.step >= step:
                step, train_loss = sample.step, sample.train_loss if sample.train_loss is not None else train_loss
            steps = f"{step}/{trial.max_steps}" if trial.max_steps else str(step)
            trials.add_row(
                name,
                Text(trial.state, style=STATE_STYLES.get(trial.state, "")),
                steps,
                fmt(train_loss),
                fmt(trial.objective),
                fmt(trial_lr(self.spec, trial), 3),
                fmt(trial.best_objective),
                trial.parent or "",
            )
        decisions = Table(title="latest decisions", title_justify="left", expand=False, show_lines=False)
        decisions.add_column("id")
        decisions.add_column("action")
        decisions.add_column("trial")
        decisions.add_column("why", overflow="fold", max_width=90)
        for record in self.decisions:
            decision = record.decision
            action = Text(decision.action, style=ACTION_STYLES.get(decision.action, ""))
            if record.outcome != "executed":
                action.append(f" ({record.outcome})", style="dim")
            why = decision.reason + (f": {decision.rationale}" if decision.rationale else "")
            if record.verdict:
                why += f" [{record.verdict}]"
            if len(why) > 160:
                why = why[:159] + "…"
            decisions.add_row(record.id, action, record.trial or "-", Text(why))
        footer = Text(summary_line(self.spec, status) if status else "starting…", style="dim")
        return Group(trials, decisions, footer)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
