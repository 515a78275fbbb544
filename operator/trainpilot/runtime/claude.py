"""Claude through the anthropic SDK: one forced tool call per question, errors made safe to record.

The key and the endpoint come from the environment as the SDK defines them (ANTHROPIC_API_KEY,
ANTHROPIC_BASE_URL, so a gateway works); in a cluster the chart puts the key there from the Secret
the admin names. The SDK retries timeouts, 429 and 5xx itself (honouring retry-after) up to
spec.policy.claude.maxRetries times; what is left is a ModelUnavailable whose message carries
the status and the error type, never the key or a request header.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from trainpilot.api.experiment import ClaudeSettings
from trainpilot.core.policy.briefing import TOOL_NAME
from trainpilot.core.policy.claude import ModelReply, ModelRequest, ModelUnavailable

KEY_VARIABLE = "ANTHROPIC_API_KEY"


class MissingKey(ValueError):
    """No API key where the SDK looks for one."""


# Receives every exchange (the exact prompt, the answer or the error, the usage; never the key),
# so an auditor can see what the model saw: `trainpilot run` appends them to <run dir>/prompts.jsonl.
Archive = Callable[[dict[str, Any]], None]


class AnthropicModel:
    def __init__(
        self, settings: ClaudeSettings, environ: Mapping[str, str] | None = None, archive: Archive | None = None
    ) -> None:
        import anthropic

        env = os.environ if environ is None else environ
        if not env.get(KEY_VARIABLE):
            raise MissingKey(
                f"spec.policy.type claude needs {KEY_VARIABLE}: set it in the environment (trainpilot run), "
                "or name its Secret in the Helm values anthropic.secretName (operator)"
            )
        self._anthropic = anthropic
        self._archive = archive
        self._client = anthropic.AsyncAnthropic(
            api_key=env[KEY_VARIABLE],
            base_url=env.get("ANTHROPIC_BASE_URL") or None,
            timeout=settings.request_timeout_seconds,
            max_retries=settings.max_retries,
        )

    async def ask(self, request: ModelRequest) -> ModelReply:
        started = time.monotonic()
        try:
            reply = await self._ask(request)
        except ModelUnavailable as error:
            self._keep(request, time.monotonic() - started, error=str(error))
            raise
        self._keep(request, time.monotonic() - started, reply=reply)
        return reply

    def _keep(
        self, request: ModelRequest, seconds: float, reply: ModelReply | None = None, error: str | None = None
    ) -> None:
        if self._archive is None:
            return
        exchange: dict[str, Any] = {
            "seconds": round(seconds, 3),
            "prompt_sha256": request.prompt_sha256,
            "model": request.model,
            "system": request.system,
            "prompt": request.prompt,
        }
        if reply is not None:
            exchange |= {
                "answer": reply.tool_input,
                "stop_reason": reply.stop_reason,
                "input_tokens": reply.input_tokens,
                "output_tokens": reply.output_tokens,
            }
        else:
            exchange["error"] = error
        self._archive(exchange)

    async def _ask(self, request: ModelRequest) -> ModelReply:
        anthropic = self._anthropic
        try:
            message = await self._client.messages.create(
                model=request.model,
                max_tokens=request.max_tokens,
                system=request.system,
                messages=[{"role": "user", "content": request.prompt}],
                tools=[request.tool],  # type: ignore[list-item]
                tool_choice={"type": "tool", "name": TOOL_NAME},
            )
        except anthropic.APITimeoutError:
            raise ModelUnavailable("timed out") from None
        except anthropic.APIStatusError as error:
            why = f"HTTP {error.status_code} {_error_type(error.body)}".strip()
            raise ModelUnavailable(why, permanent=error.status_code in REFUSED_FOR_GOOD) from None
        except anthropic.APIConnectionError:
            raise ModelUnavailable("could not connect") from None
        tool_input = next(
            (
                dict(block.input)
                for block in message.content
                if block.type == "tool_use" and block.name == TOOL_NAME and isinstance(block.input, dict)
            ),
            None,
        )
        usage = message.usage
        return ModelReply(tool_input, message.stop_reason, usage.input_tokens, usage.output_tokens)

    async def close(self) -> None:
        await self._client.close()


# The caller, not the call, is refused: a bad key (401), no access (403), no such model (404).
REFUSED_FOR_GOOD = frozenset({401, 403, 404})


def _error_type(body: Any) -> str:
    """The API's error type (rate_limit_error, overloaded_error, ...): a fixed word, safe to record."""
    error = body.get("error") if isinstance(body, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return kind if isinstance(kind, str) and kind.replace("_", "").isalnum() else ""
