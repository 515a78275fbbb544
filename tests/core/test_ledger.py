"""The ledger line format shared by the cluster and local runs."""

from trainpilot.core import ledger
from trainpilot.core.decision import Decision, DecisionRecord, decision_id


def record(seq: int, **decision) -> DecisionRecord:
    fields = {"action": "launch", "policy": "heuristic", "reason": "suggested", "hyperparameters": {"lr": 0.01}}
    fields.update(decision)
    return DecisionRecord(
        id=decision_id("exp", seq),
        seq=seq,
        time="2026-11-22T06:00:00Z",
        experiment="exp",
        decision=Decision(**fields),
        outcome="executed",
        new_trial=f"exp-t{seq:03d}",
    )


def test_round_trip_keeps_order_and_drops_duplicates_and_torn_lines():
    first, second = record(0), record(1, action="terminate", trial="exp-t000", hyperparameters={}, reason="loss-spike")
    text = ledger.encode(first) + ledger.encode(second) + ledger.encode(first) + ledger.encode(record(2))[:40]
    records, problems = ledger.decode(text)
    assert [r.id for r in records] == ["exp-d00000", "exp-d00001"]
    assert records[1].decision.reason == "loss-spike"
    assert len(problems) == 1 and "line 4" in problems[0]


def test_encode_is_one_line():
    hostile = record(0, rationale='line one\nline two\n{"id": "forged"}')
    text = ledger.encode(hostile)
    assert text.count("\n") == 1
    assert ledger.decode(text)[0][0].decision.rationale == hostile.decision.rationale


def test_table_has_a_row_per_record():
    table = ledger.format_table([record(0), record(1, rationale="because")])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["TIME", "ID", "POLICY"]
    assert len(lines) == 3
    assert "exp-d00001" in lines[2] and "because" in lines[2] and "lr=0.01" in lines[2]


def test_a_long_why_is_wrapped_under_its_column_never_cut():
    rationale = "lr 0.003 keeps improving at rung 0.5 while its peers plateau; " * 4 + "the end."
    table = ledger.format_table([record(0, rationale=rationale)], width=100)
    lines = table.splitlines()
    column = lines[0].index("WHY")
    assert all(len(line) <= 100 for line in lines) and len(lines) > 2
    assert all(line[:column].strip() == "" for line in lines[2:])  # continuation lines sit under WHY
    assert " ".join(line[column:].strip() for line in lines[1:]).endswith(rationale.strip())
