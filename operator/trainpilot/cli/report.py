"""`trainpilot report <run-dir>`: a picture and a page of what the agent did and why.

report.png: every trial's loss curve by step (objective bold, train loss thin and faded), each
decision marked on its trial's curve at the step it was taken, the best trial highlighted, and
the loss floor where the trainer knows it. report.html: the same picture embedded (so the file
stands alone), a table of the trials and a table of the decisions with their rationales.
Everything read from the run directory is data and is HTML-escaped.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentSpec, AgentExperimentStatus, TrialStatus
from trainpilot.core import ledger as ledger_format
from trainpilot.core.decision import DecisionRecord
from trainpilot.core.observation import new_evaluation

TRAIN = "trainpilot_train_loss"
FLOOR = "trainpilot_loss_floor"

# action -> (matplotlib marker, legend label, HTML symbol)
MARKERS = {
    "terminate": ("X", "terminate", "✕"),
    "mutate": ("D", "mutate", "◆"),
    "scale": ("^", "scale", "▲"),
    "launch": ("o", "launch / relaunch", "●"),
    "complete": ("*", "complete", "★"),
}


class ReportError(Exception):
    """The folder is not a run directory we can report on."""


@dataclass
class Point:
    time: str
    step: int
    values: dict[str, float]


@dataclass
class Series:
    """One trial's history from metrics.jsonl, restarts folded (the surviving timeline)."""

    points: list[Point] = field(default_factory=list)
    # Every scrape's (time, step), restarts included: where a trial was when a decision was taken.
    timeline: list[tuple[str, int]] = field(default_factory=list)

    def curve(self, metric: str, finite: bool = True) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric as scraped; non-finite values (not measured yet, or diverged) left out."""
        steps: list[int] = []
        values: list[float] = []
        for point in self.points:
            value = point.values.get(metric)
            if value is None or (finite and not math.isfinite(value)):
                continue
            steps.append(point.step)
            values.append(value)
        return steps, values

    def evaluations(self, objective: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the objective, one point per evaluation: at the step the trainer
        measured it (trainpilot_eval_step), or else at the first scrape that showed a new value."""
        steps: list[int] = []
        values: list[float] = []
        for point in self.points:
            last = (steps[-1], values[-1]) if steps else None
            evaluation = new_evaluation(point.values, objective, point.step, last)
            if evaluation is not None:
                steps.append(evaluation[0])
                values.append(evaluation[1])
        return steps, values

    def step_at(self, time: str) -> int | None:
        """The step the trial was at when a decision was taken at `time` (last scrape at or before it)."""
        step = None
        for moment, at in self.timeline:
            if moment <= time:
                step = at
            else:
                break
        return step

    def first_step(self) -> int | None:
        return self.points[0].step if self.points else None

    def last(self, metric: str) -> float | None:
        for point in reversed(self.points):
            if metric in point.values:
                return point.values[metric]
        return None


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_series(path: Path) -> Series:
    series = Series()
    if not path.exists():
        return series
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            raw = json.loads(line)
            values = {str(k): v for k, v in ((k, _number(v)) for k, v in raw["values"].items()) if v is not None}
            point = Point(time=str(raw.get("time", "")), step=int(raw.get("step", 0)), values=values)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a torn line, or not ours
        series.timeline.append((point.time, point.step))
        # A trial restarted from a checkpoint goes back in steps: keep the curve that survived.
        while series.points and series.points[-1].step > point.step:
            series.points.pop()
        if series.points and series.points[-1].step == point.step:
            series.points[-1] = point
        else:
            series.points.append(point)
    return series


@dataclass
class RunData:
    run_dir: Path
    name: str
    spec: AgentExperimentSpec | None
    status: AgentExperimentStatus
    records: list[DecisionRecord]
    series: dict[str, Series]

    @property
    def metric(self) -> str:
        return self.spec.objective.metric if self.spec else "val_loss"

    @property
    def objective_metric(self) -> str:
        return contract.objective_metric(self.metric)

    def loss_floor(self) -> float | None:
        for trial in self.status.trials:
            if trial.loss_floor is not None and math.isfinite(trial.loss_floor):
                return trial.loss_floor
        for series in self.series.values():
            value = series.last(FLOOR)
            if value is not None and math.isfinite(value):
                return value
        return None


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    status_path = run_dir / "status.json"
    ledger_path = run_dir / "ledger.jsonl"
    manifest = run_dir / "experiment.yaml"
    if not (status_path.exists() or ledger_path.exists()):
        raise ReportError(f"{run_dir}: no status.json or ledger.jsonl, so not a `trainpilot run` directory")
    status = AgentExperimentStatus()
    if status_path.exists():
        try:
            status = AgentExperimentStatus.model_validate_json(status_path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ReportError(f"{status_path}: unreadable ({type(error).__name__})") from None
    records: list[DecisionRecord] = []
    if ledger_path.exists():
        records, _ = ledger_format.decode(ledger_path.read_text(encoding="utf-8"))
    spec = None
    name = run_dir.name
    if manifest.exists():
        try:
            from trainpilot.cli.manifest import load_experiment

            experiment = load_experiment(manifest)
            spec, name = experiment.spec, experiment.name
        except ValueError:
            pass
    if records:
        name = records[0].experiment
    names = [trial.name for trial in status.trials]
    trials_dir = run_dir / "trials"
    if trials_dir.is_dir():
        names += sorted(p.name for p in trials_dir.iterdir() if p.is_dir() and p.name not in names)
    series = {trial: read_series(trials_dir / trial / "metrics.jsonl") for trial in names}
    return RunData(run_dir=run_dir, name=name, spec=spec, status=status, records=records, series=series)


# ------------------------------------------------------------------------------------------
# The picture
# ------------------------------------------------------------------------------------------


def _marker_targets(record: DecisionRecord) -> list[tuple[str, str, bool]]:
    """(action, trial, at_start) marks for one executed decision."""
    decision = record.decision
    marks: list[tuple[str, str, bool]] = []
    if decision.action in ("terminate", "mutate", "scale") and decision.trial:
        marks.append((decision.action, decision.trial, False))
    if record.new_trial and decision.action in ("launch", "mutate", "scale"):
        marks.append(("launch", record.new_trial, True))
    return marks


def _mark_label(record: DecisionRecord, action: str, at_start: bool) -> str:
    decision = record.decision
    if at_start:
        parent = decision.parent or (decision.trial if decision.action in ("mutate", "scale") else None)
        return f"from {parent}" if parent else ""
    return decision.reason[:40]


def plot(data: RunData, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = _y_range(data)
    fig, ax = plt.subplots(figsize=(14, 7.5), dpi=110)
    fig.subplots_adjust(left=0.06, right=0.64, top=0.90, bottom=0.09)
    color_of = {name: plt.get_cmap("tab10")(index % 10) for index, name in enumerate(data.series)}
    handles = [_plot_trial(ax, data, name, color_of[name], y) for name in data.series]
    _plot_decisions(ax, data, color_of, y)
    _decorate(ax, data, y)
    _legends(fig, handles, data.loss_floor())
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class _YRange:
    low: float
    high: float

    @property
    def span(self) -> float:
        return self.high - self.low

    def clamp(self, value: float | None) -> float:
        """Where a value is drawn: off-scale and non-finite values sit at the top edge."""
        if value is None or not math.isfinite(value) or value > self.high:
            return self.high
        return max(value, self.low)


def _y_range(data: RunData) -> _YRange:
    """A robust y range: a blown-up trial must not flatten everybody else's curves. A healthy loss
    stays below where training started, so the top is capped at twice the lowest first loss."""
    everything: list[float] = []
    firsts: list[float] = []
    for series in data.series.values():
        for key in (TRAIN, data.objective_metric):
            _, values = series.curve(key)
            everything += values
            if values:
                firsts.append(values[0])
    floor = data.loss_floor()
    cap = 2 * min(firsts) if firsts and min(firsts) > 0 else math.inf
    base = [v for v in everything if v <= cap] or everything or [0.0, 1.0]
    low = min(base + ([floor] if floor is not None else []))
    high = max(base)
    pad = max((high - low) * 0.06, 1e-3)
    return _YRange(low - pad, high + pad)


def _trial_label(data: RunData, name: str) -> str:
    trial = next((t for t in data.status.trials if t.name == name), None)
    label = name
    if trial is not None and trial.hyperparameters:
        label += "  " + ", ".join(f"{k}={v:.3g}" for k, v in sorted(trial.hyperparameters.items()))
    if trial is not None:
        label += f"  [{trial.state}]"
    best = data.status.best_trial
    return "★ best: " + label if best is not None and best.name == name else label


def _plot_trial(ax: Any, data: RunData, name: str, color: Any, y: _YRange) -> Any:
    """One trial's curves (train loss thin and faded, the objective bold); returns its legend handle."""
    from matplotlib.lines import Line2D

    series = data.series[name]
    best = data.status.best_trial
    is_best = best is not None and best.name == name
    train_steps, train_values = series.curve(TRAIN)
    if train_steps:
        ax.plot(train_steps, [y.clamp(v) for v in train_values], color=color, linewidth=0.9, alpha=0.35, zorder=2)
    steps, values = series.evaluations(data.metric)
    label = _trial_label(data, name)
    if not steps:
        return Line2D([], [], color=color, linewidth=1.6, label=label + " (never evaluated)")
    shown = [y.clamp(v) for v in values]
    (line,) = ax.plot(
        steps,
        shown,
        color=color,
        linewidth=3.4 if is_best else 1.6,
        marker="o" if len(steps) < 40 else None,
        markersize=3.5 if not is_best else 4.5,
        alpha=1.0 if is_best or best is None else 0.85,
        zorder=5 if is_best else 3,
        label=label,
    )
    if is_best and best is not None:
        at = best.step if best.step in steps else steps[-1]
        _annotate_best(ax, data, name, color, (at, shown[steps.index(at)]), y)
    return line


def _annotate_best(ax: Any, data: RunData, name: str, color: Any, point: tuple[int, float], y: _YRange) -> None:
    """Beside the best point, on the side away from the rest of the curve where the axes leave
    room for two lines of text, else on the other side."""
    assert data.status.best_trial is not None
    at, value = point
    below = data.spec is None or data.spec.objective.direction == "minimize"
    room = (value - y.low if below else y.high - value) / y.span
    below = below if room > 0.2 else not below
    ax.annotate(
        f"best {name}\n{data.metric} {data.status.best_trial.objective:.4g}",
        xy=(at, value),
        xytext=(-12, -40 if below else 28),
        textcoords="offset points",
        ha="right",
        fontsize=9,
        fontweight="bold",
        color=color,
        arrowprops={"arrowstyle": "-", "color": color, "lw": 1.0},
        zorder=7,
    )


def _plot_decisions(ax: Any, data: RunData, color_of: dict[str, Any], y: _YRange) -> None:
    """Decisions on their trial's curve, at the step they were taken, labelled with their reason
    (and a relaunch with its parent) while there are few enough to read."""
    executed = [record for record in data.records if record.outcome == "executed"]
    label_marks = sum(len(_marker_targets(record)) for record in executed) <= 30
    # Labels of marks that (nearly) coincide are stacked downwards instead of printed over each other.
    x_span = max((s.points[-1].step for s in data.series.values() if s.points), default=1) or 1
    placed: list[tuple[float, float]] = []
    for record in executed:
        for action, trial, at_start in _marker_targets(record):
            series = data.series.get(trial)
            if series is None or not series.points:
                continue
            step = series.first_step() if at_start else series.step_at(record.time)
            if step is None:
                step = series.first_step()
            assert step is not None
            value = y.clamp(_value_at(series, data.metric, step))
            ax.scatter(
                [step],
                [value],
                marker=MARKERS[action][0],
                s=120 if action != "launch" else 55,
                color=color_of.get(trial, "black"),
                edgecolors="black",
                linewidths=1.0,
                zorder=8,
                clip_on=False,
            )
            note = _mark_label(record, action, at_start)
            if not (label_marks and note):
                continue
            where = (step / x_span, (value - y.low) / y.span)
            stacked = sum(abs(where[0] - x) < 0.08 and abs(where[1] - v) < 0.03 for x, v in placed)
            placed.append(where)
            ax.annotate(
                note,
                xy=(step, value),
                xytext=(7, (-11 if at_start or value >= y.high else 7) - 9 * stacked),
                textcoords="offset points",
                fontsize=7.5,
                color="0.25",
                zorder=9,
                annotation_clip=False,
            )


def _decorate(ax: Any, data: RunData, y: _YRange) -> None:
    """Loss floor, axes, title, and a note when some values are drawn at the edge."""
    status = data.status
    floor = data.loss_floor()
    if floor is not None:
        ax.axhline(floor, color="0.35", linestyle="--", linewidth=1.2, zorder=1)
        ax.text(
            0.005,
            floor,
            f" loss floor {floor:.4g}",
            va="bottom",
            ha="left",
            fontsize=9,
            color="0.3",
            transform=ax.get_yaxis_transform(),
        )
    ax.set_ylim(y.low, y.high)
    ax.set_xlim(left=0)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{data.metric} (thick)  /  train loss (thin, faded)")
    ax.grid(True, alpha=0.25)
    done = sum(1 for trial in status.trials if trial.finished)
    title = f"{data.name}: {status.phase}, {len(status.trials)} trials ({done} finished), {len(data.records)} decisions"
    if status.best_trial is not None:
        title += f"; best {status.best_trial.name} {data.metric}={status.best_trial.objective:.4g}"
    ax.set_title(title, fontsize=12, loc="left", pad=14)
    if any(
        not math.isfinite(v) or v > y.high
        for s in data.series.values()
        for key in (data.objective_metric, TRAIN)
        for v in s.curve(key, finite=False)[1]
    ):
        ax.text(
            0.99,
            0.99,
            "losses above the top edge are drawn at the edge; non-finite ones are left out",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            color="0.4",
        )


def _legends(fig: Any, trial_handles: list[Any], floor: float | None) -> None:
    from matplotlib.lines import Line2D

    trials = fig.legend(
        handles=trial_handles,
        title="trials (val loss thick, train loss faded)",
        loc="upper left",
        bbox_to_anchor=(0.655, 0.90),
        fontsize=8,
        title_fontsize=9,
        frameon=False,
    )
    decision_handles = [
        Line2D(
            [],
            [],
            linestyle="none",
            marker=MARKERS[a][0],
            markersize=9,
            color="0.6",
            markeredgecolor="black",
            label=MARKERS[a][1],
        )
        for a in ("terminate", "mutate", "scale", "launch")
    ]
    extra = (
        [Line2D([], [], color="0.35", linestyle="--", label="loss floor (entropy rate)")] if floor is not None else []
    )
    fig.legend(
        handles=decision_handles + extra,
        title="decisions",
        loc="lower left",
        bbox_to_anchor=(0.655, 0.09),
        fontsize=8,
        title_fontsize=9,
        frameon=False,
    )
    fig.add_artist(trials)  # a second fig.legend() replaces the first unless it is re-added


def _value_at(series: Series, objective: str, step: int) -> float | None:
    """Where a mark at `step` sits: on the objective curve once it has a value, else on train loss.

    A diverged curve ends in non-finite values; the mark goes where it was last finite (which the
    plot clamps to the top edge when it had already shot up).
    """
    for steps, values in (series.evaluations(objective), series.curve(TRAIN)):
        earlier = [v for s, v in zip(steps, values, strict=True) if s <= step]
        if earlier:
            return earlier[-1]
    for key in (TRAIN, contract.objective_metric(objective)):
        _, values = series.curve(key)
        if values:
            return values[0]
    return None


# ------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1400px;
  color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em}
.meta{color:#555} img{max-width:100%;border:1px solid #ddd}
table{border-collapse:collapse;width:100%;font-size:.88em}
th,td{border-bottom:1px solid #e3e3e3;padding:.35em .5em;text-align:left;vertical-align:top}
th{background:#f6f6f6} tr.best td{background:#eefaf0;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums} code{font-size:.95em}
.executed{color:#1a7f37} .rejected{color:#b42318} .pending-approval{color:#9a6700}
"""


def render_html(data: RunData, png: bytes) -> str:
    status = data.status
    best = status.best_trial
    image = base64.b64encode(png).decode("ascii")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>TrainPilot report: {_e(data.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>TrainPilot report: {_e(data.name)}</h1>",
        f'<p class="meta">phase <b>{_e(status.phase)}</b>'
        + (f" — {_e(status.message)}" if status.message else "")
        + f"; {len(status.trials)} trials, {len(data.records)} decisions"
        + (f"; started {_e(status.started_at)}" if status.started_at else "")
        + (f", finished {_e(status.finished_at)}" if status.finished_at else "")
        + "</p>",
    ]
    if best is not None:
        values = ", ".join(f"{_e(k)}={_e(f'{v:g}')}" for k, v in sorted(best.hyperparameters.items()))
        parts.append(
            f"<p>Best trial: <b>{_e(best.name)}</b>, {_e(data.metric)} = <b>{_e(_fmt(best.objective))}</b> "
            f"at step {_e(best.step)} ({values})</p>"
        )
    floor = data.loss_floor()
    if floor is not None:
        parts.append(f'<p class="meta">Loss floor known to the trainer: {_e(_fmt(floor))}</p>')
    parts.append(f'<img alt="loss curves and decisions of {_e(data.name)}" src="data:image/png;base64,{image}">')
    parts += _trials_table(data)
    parts += _decisions_table(data)
    parts.append(
        f'<p class="meta">Run directory: <code>{_e(data.run_dir)}</code>. '
        "The full ledger is ledger.jsonl there (<code>trainpilot history</code> prints it).</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _trials_table(data: RunData) -> list[str]:
    status = data.status
    best = status.best_trial
    parts: list[str] = []
    searched = sorted({k for trial in status.trials for k in trial.hyperparameters})
    parts.append("<h2>Trials</h2><table><thead><tr><th>trial</th><th>state</th>")
    parts += [f"<th>{_e(name)}</th>" for name in searched]
    parts.append(
        f"<th>step</th><th>best {_e(data.metric)}</th><th>last {_e(data.metric)}</th>"
        "<th>parent</th><th>launched by</th><th>message</th></tr></thead><tbody>"
    )
    for trial in _all_trials(data):
        css = ' class="best"' if best is not None and trial.name == best.name else ""
        row = [f"<tr{css}><td>{_e(trial.name)}</td><td>{_e(trial.state)}</td>"]
        row += [f'<td class="num">{_e(_g(trial.hyperparameters.get(name)))}</td>' for name in searched]
        steps = f"{trial.step}/{trial.max_steps}" if trial.max_steps else str(trial.step)
        row.append(
            f'<td class="num">{_e(steps)}</td><td class="num">{_e(_fmt(trial.best_objective))}</td>'
            f'<td class="num">{_e(_fmt(trial.objective))}</td><td>{_e(trial.parent or "")}</td>'
            f"<td>{_e(trial.decision)}</td><td>{_e(trial.message)}</td></tr>"
        )
        parts.append("".join(row))
    parts.append("</tbody></table>")

    return parts


def _decisions_table(data: RunData) -> list[str]:
    parts: list[str] = []
    parts.append(
        "<h2>Decisions</h2><table><thead><tr><th>id</th><th>time</th><th>policy</th><th>action</th>"
        "<th>trial</th><th>values</th><th>outcome</th><th>reason</th><th>rationale</th></tr></thead><tbody>"
    )
    for record in data.records:
        decision = record.decision
        symbol = MARKERS.get(decision.action, ("", "", ""))[2]
        values = ", ".join(f"{k}={v:g}" for k, v in sorted(decision.hyperparameters.items()))
        if record.before and record.after and record.before != record.after:
            values += (" " if values else "") + f"(before {json.dumps(record.before, sort_keys=True)})"
        outcome = record.outcome + (f": {record.verdict}" if record.verdict else "")
        parts.append(
            f"<tr><td><code>{_e(record.id)}</code></td><td>{_e(record.time)}</td><td>{_e(decision.policy)}</td>"
            f"<td>{_e(symbol)} {_e(decision.action)}</td><td>{_e(record.trial or '')}</td><td>{_e(values)}</td>"
            f'<td class="{_e(record.outcome)}">{_e(outcome)}</td><td>{_e(decision.reason)}</td>'
            f"<td>{_e(decision.rationale)}</td></tr>"
        )
    parts.append("</tbody></table>")
    return parts


def _g(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _all_trials(data: RunData) -> list[TrialStatus]:
    trials = list(data.status.trials)
    known = {trial.name for trial in trials}
    for index, name in enumerate(data.series):
        if name not in known:
            trials.append(TrialStatus(name=name, index=len(trials) + index))
    return trials


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    data = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    png_path = plot(data, out / "report.png")
    html_path = out / "report.html"
    tmp = html_path.with_name(".report.html.tmp")
    tmp.write_text(render_html(data, png_path.read_bytes()), encoding="utf-8")
    tmp.replace(html_path)
    return png_path, html_path


def main_report(args: argparse.Namespace) -> int:
    try:
        png, page = write_report(args.run_dir, getattr(args, "out", None))
    except ReportError as error:
        print(f"trainpilot report: {error}", file=sys.stderr)
        return 2
    print(f"report: {page}")
    print(f"plot:   {png}")
    return 0
