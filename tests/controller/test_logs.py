"""The operator's JSON log lines: every line says which experiment, trial and decision it is about."""

from __future__ import annotations

import asyncio
import json
import logging

from trainpilot.api.experiment import AgentExperimentStatus
from trainpilot.controller.logs import JsonFormatter
from trainpilot.core import log_context


def line(message: str, **extra: object) -> dict:
    record = logging.LogRecord("trainpilot.x", logging.WARNING, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return json.loads(JsonFormatter().format(record))


def test_a_line_carries_the_experiment_trial_and_decision_it_is_about_and_only_inside():
    assert set(line("plain")) == {"time", "level", "logger", "message"}
    with log_context.about(experiment="ml/exp"):
        with log_context.about(trial="exp-t001", decision="exp-d00004"):
            inside = line('quote " and newline \n stay data')
        after = line("after")
    assert inside["experiment"] == "ml/exp" and inside["trial"] == "exp-t001" and inside["decision"] == "exp-d00004"
    assert inside["message"] == 'quote " and newline \n stay data' and inside["level"] == "warning"
    assert after == {**after, "experiment": "ml/exp"} and "trial" not in after and "decision" not in after
    assert "experiment" not in line("outside")
    # kopf's own per-object lines name the object they are about
    assert line("kopf", k8s_ref={"namespace": "ml", "name": "exp"})["experiment"] == "ml/exp"


async def test_each_experiments_daemon_task_has_its_own_context():
    async def daemon(name: str) -> dict:
        log_context.set_experiment(name)
        await asyncio.sleep(0.01)
        return line("cycle")

    first, second = await asyncio.gather(daemon("ml/a"), daemon("ml/b"))
    assert (first["experiment"], second["experiment"]) == ("ml/a", "ml/b")
    assert "experiment" not in line("the operator's own")


class JsonLines(logging.Handler):
    """Formats at emit, in the logging call's own context, as the operator's StreamHandler does."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


async def test_lines_logged_while_a_decision_is_carried_out_carry_its_id_and_trial():
    from tests.test_loop import FORBIDDEN, MemoryRuntime, cycle

    runtime = MemoryRuntime()
    runtime.refuse[("launch", "exp-t000")] = FORBIDDEN
    handler = JsonLines()
    logger = logging.getLogger("trainpilot")
    logger.addHandler(handler)
    try:
        with log_context.about(experiment="default/exp"):
            await cycle(runtime, AgentExperimentStatus())
    finally:
        logger.removeHandler(handler)
    [refused] = [entry for entry in handler.lines if "refused for good" in entry["message"]]
    assert (refused["experiment"], refused["trial"], refused["decision"]) == ("default/exp", "exp-t000", "exp-d00000")
