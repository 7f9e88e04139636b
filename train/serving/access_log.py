"""One line per request, as vLLM's server logs them: method, path, status, latency, and for a chat completion its
prompt and completion tokens and media count; an error's OpenAI code (`error=invalid_request`). `--log-requests off`
turns it off.

    2026-12-07 13:22:01 POST /v1/chat/completions 200 1.234s prompt_tokens=612 completion_tokens=12 media=1
    2026-12-07 13:22:02 POST /v1/chat/completions 400 0.004s media=1 error=unreadable_media

The handlers leave what they know in the request's state (Starlette keeps it in scope["state"]): `usage` (prompt,
completion tokens), `media` (count), `error` (the code)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def access_line(scope: Scope, status: int, seconds: float) -> str:
    state: dict[str, Any] = scope.get("state") or {}
    fields = [time.strftime("%Y-%m-%d %H:%M:%S"), scope["method"], scope["path"], str(status), f"{seconds:.3f}s"]
    if "usage" in state:
        prompt_tokens, completion_tokens = state["usage"]
        fields += [f"prompt_tokens={prompt_tokens}", f"completion_tokens={completion_tokens}"]
    if "media" in state:
        fields.append(f"media={state['media']}")
    if status >= 400:
        fields.append(f"error={state.get('error') or status}")
    return " ".join(fields)


class AccessLog:
    """The outermost middleware (it sees a 413 from the body limit too). The line is written when the response's
    last part is about to go out: a client that has its whole answer finds the line already there."""

    def __init__(self, app: ASGIApp, write: Callable[[str], None]):
        self.app, self.write = app, write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})
        started, status = time.perf_counter(), 500

        async def logging_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self.write(access_line(scope, status, time.perf_counter() - started))
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        except Exception:  # unhandled: Starlette's outermost layer answers 500 after this
            self.write(access_line(scope, 500, time.perf_counter() - started))
            raise
