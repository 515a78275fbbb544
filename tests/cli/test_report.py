"""`trainpilot report` on a synthetic run directory: a real PNG and a standalone, escaped HTML page."""

from __future__ import annotations

import base64
import html
import json
import re
from argparse import Namespace

from tests.support.localkit import HOSTILE, synthetic_run
from trainpilot.cli.main import main
from trainpilot.cli.report import load_run, main_report, read_series, write_report


def test_report_png_and_html(tmp_path):
    run = synthetic_run(tmp_path / "run")
    png, page = write_report(tmp_path / "run", tmp_path / "out")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 1200 and height >= 700

    text = page.read_text()
    for record in run["records"]:
        assert record.id in text
        assert html.escape(record.decision.rationale, quote=True) in text
    for name in run["trials"]:
        assert name in text
    # Hostile data stays data.
    assert "<script>" not in text and "<b>bold</b>" not in text
    assert html.escape(HOSTILE, quote=True) in text
    # The picture is embedded, so the page stands alone.
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert embedded and base64.b64decode(embedded.group(1)) == data
    assert "quota max_gpus is 0" in text  # a rejected decision's verdict
    assert "quickstart-t000" in text and "Diverged" in text


def test_report_cli_defaults_to_the_run_dir(tmp_path, capsys):
    synthetic_run(tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "run" / "report.html") in out
    assert (tmp_path / "run" / "report.png").exists()


def test_report_refuses_a_non_run_dir(tmp_path, capsys):
    assert main_report(Namespace(run_dir=str(tmp_path), out=None)) == 2
    assert "not a `trainpilot run` directory" in capsys.readouterr().err
    assert main_report(Namespace(run_dir=str(tmp_path / "missing"), out=None)) == 2


def test_report_of_a_run_that_just_started(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ledger.jsonl").write_text("")
    png, page = write_report(run_dir)
    assert png.exists() and "TrainPilot report" in page.read_text()


def test_restarted_trial_keeps_the_surviving_timeline(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        '{"time":"a","step":10,"values":{"trainpilot_val_loss":3.0}}',
        '{"time":"b","step":20,"values":{"trainpilot_val_loss":2.5}}',
        '{"time":"c","step":30,"values":{"trainpilot_val_loss":2.0}}',
        "torn {",
        '{"time":"d","step":20,"values":{"trainpilot_val_loss":2.4}}',
        '{"time":"e","step":40,"values":{"trainpilot_val_loss":"nan"}}',
    ]
    path.write_text("\n".join(lines) + "\n")
    series = read_series(path)
    assert [p.step for p in series.points] == [10, 20, 40]
    assert series.curve("trainpilot_val_loss") == ([10, 20], [3.0, 2.4])
    assert series.step_at("c") == 30 and series.step_at("d") == 20 and series.step_at("0") is None


def test_evaluations_are_plotted_where_they_were_measured(tmp_path):
    def scrape(step, val, eval_step=None):
        values = {"trainpilot_val_loss": val} | ({} if eval_step is None else {"trainpilot_eval_step": eval_step})
        return json.dumps({"time": str(step), "step": step, "values": values})

    with_steps = tmp_path / "with.jsonl"
    scrapes = [
        scrape(5, "nan", -1),
        scrape(63, 2.8, 50),
        scrape(71, 2.8, 50),
        scrape(104, 2.8, 100),
        scrape(160, 2.5, 150),
    ]
    with_steps.write_text("\n".join(scrapes))
    assert read_series(with_steps).evaluations("val_loss") == ([50, 100, 150], [2.8, 2.8, 2.5])
    # An exporter without trainpilot_eval_step: each new value at the scrape that first showed it.
    without = tmp_path / "without.jsonl"
    without.write_text("\n".join([scrape(63, 2.8), scrape(71, 2.8), scrape(104, 2.6)]))
    assert read_series(without).evaluations("val_loss") == ([63, 104], [2.8, 2.6])


def test_load_run_reads_everything(tmp_path):
    synthetic_run(tmp_path / "run")
    data = load_run(tmp_path / "run")
    assert data.name == "quickstart" and data.metric == "val_loss"
    assert len(data.records) == 9 and len(data.series) == 4
    assert data.loss_floor() == 1.31
