"""The Claude policy in the benchmark without a network: a scripted or recorded model.

`RecordedModel` answers each prompt with the answer an archive (`<run dir>/prompts.jsonl`, which
`trainpilot run` writes for every exchange with Claude) holds for that exact prompt's hash, and
with no decisions where it holds none: the Claude policy then keeps the heuristic's proposals,
as it does when Claude agrees. So the row measures the Claude policy's plumbing (the heuristic's
safety rules, the overrides it lets through, the tokens it would spend), not a model's judgement.
`--live` (an ANTHROPIC_API_KEY in the environment) asks the real model through the SDK instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainpilot.core.policy.claude import ModelReply, ModelRequest

# What a scripted answer costs, as the API's usage would report it: a prompt of the policy's size.
SCRIPTED_INPUT_TOKENS = 900
SCRIPTED_OUTPUT_TOKENS = 40


class RecordedModel:
    def __init__(self, archive: Path | None = None) -> None:
        self.answers: dict[str, dict[str, Any]] = {}
        self.asked = 0
        self.replayed = 0
        if archive is not None:
            for line in archive.read_text().splitlines():
                entry = json.loads(line)
                answer = entry.get("answer")
                if entry.get("prompt_sha256") and isinstance(answer, dict):
                    self.answers[entry["prompt_sha256"]] = answer

    async def ask(self, request: ModelRequest) -> ModelReply:
        self.asked += 1
        answer = self.answers.get(request.prompt_sha256)
        self.replayed += answer is not None
        return ModelReply(
            tool_input=answer if answer is not None else {"decisions": []},
            stop_reason="tool_use",
            input_tokens=SCRIPTED_INPUT_TOKENS,
            output_tokens=SCRIPTED_OUTPUT_TOKENS,
        )
