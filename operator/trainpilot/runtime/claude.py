"""Claude through the anthropic SDK: one forced tool call per question, errors made safe to record.

The key and the endpoint come from the environment as the SDK defines them (ANTHROPIC_API_KEY,
ANTHROPIC_BASE_URL, so a gateway works); in a cluster the chart puts the key there from the Secret
the admin names. The SDK retries timeouts, 429 and 5xx itself (honouring retry-after) up to
spec.policy.claude.maxRetries times; what is left is a ModelUnavailable whose message carries
the status and the error type, never the key or a request header.
"""

from __future__ import annotations

import os
from typing import Any

from trainpilot.api.experiment import ClaudeSettings
from trainpilot.core.policy.briefing import TOOL_NAME
from trainpilot.core.policy.claude import ModelReply, ModelRequest, ModelUnavailable

KEY_VARIABLE = "ANTHROPIC_API_KEY"


class MissingKey(ValueError):
    """No API key where the SDK looks for one."""


class AnthropicModel:
    def __init__(self, settings: ClaudeSettings, environ: dict[str, str] | None = None) -> None:
        import anthropic

        env = os.environ if environ is None else environ
        if not env.get(KEY_VARIABLE):
            raise MissingKey(
                f"spec.policy.type claude needs {KEY_VARIABLE}: set it in the environment (trainpilot run), "
                "or name its Secret in the Helm values anthropic.secretName (operator)"
            )
        self._anthropic = anthropic
        self._client = anthropic.AsyncAnthropic(
            api_key=env[KEY_VARIABLE],
            base_url=env.get("ANTHROPIC_BASE_URL") or None,
            timeout=settings.request_timeout_seconds,
            max_retries=settings.max_retries,
        )

    async def ask(self, request: ModelRequest) -> ModelReply:
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
            raise ModelUnavailable(f"HTTP {error.status_code} {_error_type(error.body)}".strip()) from None
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


def _error_type(body: Any) -> str:
    """The API's error type (rate_limit_error, overloaded_error, ...): a fixed word, safe to record."""
    error = body.get("error") if isinstance(body, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return kind if isinstance(kind, str) and kind.replace("_", "").isalnum() else ""
