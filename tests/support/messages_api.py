"""A local server that speaks Anthropic's Messages API, with scripted replies, for the real SDK.

The anthropic client is pointed at it with ANTHROPIC_BASE_URL, so tests exercise the SDK's own
request building, retries (with retry-after), timeouts and response parsing. Each request takes
the next scripted reply (the last one repeats); every request is kept for assertions.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

TOOL = "submit_decisions"


@dataclass
class Reply:
    status: int = 200
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (a hang, when longer than the client's timeout)


def tool_reply(decisions: list[dict[str, Any]], input_tokens: int = 900, output_tokens: int = 120) -> Reply:
    """A 200 whose content is one submit_decisions tool call."""
    return message(
        [{"type": "tool_use", "id": "toolu_01", "name": TOOL, "input": {"decisions": decisions}}],
        "tool_use",
        input_tokens,
        output_tokens,
    )


def prose_reply(text: str, stop_reason: str = "end_turn") -> Reply:
    return message([{"type": "text", "text": text}], stop_reason, 500, 40)


def message(content: list[dict[str, Any]], stop_reason: str, input_tokens: int, output_tokens: int) -> Reply:
    return Reply(
        body={
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-haiku-5-5",
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }
    )


def error_reply(status: int, kind: str, retry_after: float | None = None) -> Reply:
    headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
    return Reply(status, {"type": "error", "error": {"type": kind, "message": f"scripted {kind}"}}, headers)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


class MessagesApi:
    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with api._lock:
                    api.requests.append(
                        Seen(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic())
                    )
                    reply = api.script.pop(0) if len(api.script) > 1 else (api.script[0] if api.script else Reply())
                if reply.delay:
                    time.sleep(reply.delay)
                payload = json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> MessagesApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def will(self, *replies: Reply) -> None:
        with self._lock:
            self.script = list(replies)

    def prompts(self) -> list[str]:
        return [seen.body["messages"][0]["content"] for seen in self.requests]


@pytest.fixture
def messages_api() -> Iterator[MessagesApi]:
    api = MessagesApi().start()
    yield api
    api.stop()
