"""`trainpilot history`: a run directory's ledger as a table or JSON lines; a name asks the cluster."""

from __future__ import annotations

import json
import sys
import types

from tests.support.localkit import synthetic_run
from trainpilot.cli.main import main


def test_history_table(tmp_path, capsys):
    run = synthetic_run(tmp_path / "run")
    assert main(["history", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("TIME")
    for record in run["records"]:
        assert record.id in out
    assert "nonfinite-loss" in out and "lr=0.5" in out


def test_history_json_lines(tmp_path, capsys):
    run = synthetic_run(tmp_path / "run")
    with open(tmp_path / "run" / "ledger.jsonl", "a") as handle:
        handle.write('{"torn": ')
    assert main(["history", str(tmp_path / "run"), "--json"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["id"] for line in lines] == [r.id for r in run["records"]]
    assert "unreadable ledger entry" in captured.err


def test_history_of_an_empty_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "experiment.yaml").write_text("x")
    assert main(["history", str(tmp_path / "run")]) == 0
    assert "no decisions" in capsys.readouterr().out


def test_history_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["history", str(tmp_path)]) == 2
    assert "not a trainpilot run directory" in capsys.readouterr().err


def test_history_of_a_cluster_experiment_needs_the_cluster_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "trainpilot.runtime.kubernetes.ledger", None)  # import fails
    assert main(["history", "quickstart", "-n", "ml"]) == 2
    err = capsys.readouterr().err
    assert "cluster extra" in err and "pip install -e '.[operator]'" in err


def test_history_of_a_cluster_experiment(tmp_path, capsys, monkeypatch):
    run = synthetic_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "run")
    calls = []
    fake = types.ModuleType("trainpilot.runtime.kubernetes.ledger")

    def read_ledger(name, namespace):
        calls.append((name, namespace))
        return run["records"]

    fake.read_ledger = read_ledger
    monkeypatch.setitem(sys.modules, "trainpilot.runtime.kubernetes.ledger", fake)
    assert main(["history", "quickstart", "-n", "ml"]) == 0
    assert calls == [("quickstart", "ml")]
    assert run["records"][-1].id in capsys.readouterr().out
