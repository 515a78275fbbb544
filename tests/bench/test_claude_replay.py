"""The benchmark's Claude without a network: recorded answers by prompt hash, agreement otherwise."""

from __future__ import annotations

import json

from bench.policybench.claude_replay import RecordedModel
from trainpilot.core.policy.claude import ModelRequest


def request(sha: str) -> ModelRequest:
    return ModelRequest(model="m", system="s", prompt="p", tool={}, max_tokens=64, prompt_sha256=sha)


async def test_a_recorded_answer_is_replayed_for_its_prompt_and_nothing_is_decided_for_others(tmp_path):
    answer = {"decisions": [{"action": "launch", "reason": "r", "hyperparameters": {"lr": 0.01}}]}
    archive = tmp_path / "prompts.jsonl"
    archive.write_text(
        json.dumps({"prompt_sha256": "aa", "answer": answer})
        + "\n"
        + json.dumps({"prompt_sha256": "bb", "error": "HTTP 529"})
        + "\n"
    )
    model = RecordedModel(archive)
    assert (await model.ask(request("aa"))).tool_input == answer
    assert (await model.ask(request("bb"))).tool_input == {"decisions": []}  # an error has no answer to replay
    assert (await model.ask(request("cc"))).tool_input == {"decisions": []}
    assert (model.asked, model.replayed) == (3, 1)
