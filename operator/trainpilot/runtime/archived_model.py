"""A language model that answers from a prompt archive: each exact prompt gets the answer it got.

For `trainpilot replay --policy claude --from-archive`: the recorded run's Claude decisions come
back exactly, with no key and no network; a prompt the archive does not hold (a changed briefing,
a changed rule) is unavailable, so the Claude policy falls back to the heuristic and says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainpilot.core.policy.claude import ModelReply, ModelRequest, ModelUnavailable


class ArchivedModel:
    def __init__(self, exchanges: list[dict[str, Any]]) -> None:
        self.answers = {e["prompt_sha256"]: e for e in exchanges if "answer" in e and e.get("prompt_sha256")}
        self.misses = 0

    @classmethod
    def from_file(cls, path: Path) -> ArchivedModel:
        exchanges = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    exchanges.append(json.loads(line))
                except ValueError:
                    continue  # a torn last line
        return cls(exchanges)

    async def ask(self, request: ModelRequest) -> ModelReply:
        found = self.answers.get(request.prompt_sha256)
        if found is None:
            self.misses += 1
            raise ModelUnavailable("prompt not in the archive")
        return ModelReply(
            found["answer"], found.get("stop_reason"), found.get("input_tokens", 0), found.get("output_tokens", 0)
        )
