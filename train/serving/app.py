"""The FastAPI app: `POST /v1/chat/completions` (plain or `stream: true` server-sent events), `GET /v1/models`,
`GET /health`, `POST /v1/frames` (the frames the model sees, for the page) and the web chat page at `/`.

Requests are parsed and their media decoded in a thread pool, then queued to the engine's one model thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vidtune.data.conversation import DataError, media_part, message, text_part
from vidtune.data.conversation import Message as Turn
from vidtune.train.generation.infer import AnswerText, InferenceModel, prompt_example
from vidtune.train.serving.access_log import AccessLog
from vidtune.train.serving.engine import Engine, Job, Result, Settings
from vidtune.train.serving.media import MediaPolicy, RequestFiles, resolve_media
from vidtune.train.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    FramesRequest,
    url_of,
    validation_message,
)


@dataclass(frozen=True)
class ServeSettings:
    model_name: str  # the id /v1/models lists and requests may name
    policy: MediaPolicy
    max_body_bytes: int = 64 << 20
    default_max_tokens: int = 128
    max_batch_size: int = 8
    log_requests: bool = True  # one access line per request on stdout (access_log.py)


class BodyLimit:
    """413 for a body over the limit: by its Content-Length before reading, or while it streams in (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            scope.setdefault("state", {})["error"] = "body_too_large"  # for the access log
            await self._too_large()(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            msg = await receive()
            received += len(msg.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, f"the request body is larger than {self.max_bytes:,} bytes")
            return msg

        await self.app(scope, counting_receive, send)

    def _too_large(self) -> JSONResponse:
        error = APIError(413, f"the request body is larger than {self.max_bytes:,} bytes", code="body_too_large")
        return JSONResponse(error.body(), status_code=413)


def media_count(messages: list[ChatMessage]) -> int:
    return sum(part.type != "text" for msg in messages if not isinstance(msg.content, str) for part in msg.content)


def to_conversation(messages: list[ChatMessage], policy: MediaPolicy, files: RequestFiles) -> list[Turn]:
    """The request's messages as a vidtune conversation, each media URL resolved to a local file."""
    if messages[-1].role != "user":
        raise APIError(400, "the last message must be the user's", "messages", "last_message_not_user")
    turns = []
    for i, msg in enumerate(messages):
        parts = [text_part(msg.content)] if isinstance(msg.content, str) else []
        for j, part in enumerate([] if isinstance(msg.content, str) else msg.content):
            where = f"messages.{i}.content.{j}"
            if part.type == "text":
                parts.append(text_part(part.text))
            elif msg.role != "user":
                raise APIError(400, f"{where}: only user messages may carry media", where)
            else:
                media = part.video_url if part.type == "video_url" else part.image_url
                kind = "video" if part.type == "video_url" else "image"
                parts.append(media_part(kind, resolve_media(url_of(media), policy, files, where)))
        turns.append(message(msg.role, parts))
    return turns


def build_example(im: InferenceModel, request: ChatCompletionRequest, policy: MediaPolicy) -> dict[str, Any]:
    """The prompt example (media decoded as in training); unreadable media are a 400 naming the part."""
    files = RequestFiles()
    try:
        conversation = to_conversation(request.messages, policy, files)
        try:
            return prompt_example(im, conversation)
        except DataError as err:  # an upload's temporary name means nothing to the client
            raise APIError(
                400, str(err).replace(files.folder.name + "/", "uploaded "), code="unreadable_media"
            ) from None
    finally:
        files.close()


def sampled_frames(im: InferenceModel, url: str, policy: MediaPolicy) -> dict[str, Any]:
    """The frames the model sees for a video, as JPEG data URLs with their times."""
    from PIL import Image

    from vidtune.data.video import load_clip

    files = RequestFiles()
    try:
        try:
            clip = load_clip(resolve_media(url, policy, files, "video_url"), im.sampling)
        except DataError as err:
            raise APIError(
                400, str(err).replace(files.folder.name + "/", "uploaded "), code="unreadable_media"
            ) from None
    finally:
        files.close()
    images = []
    for frame in clip.frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=85)
        images.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return {"frames": images, "timestamps_s": [round(t, 3) for t in clip.timestamps_s]}


def _chunk(request_id: str, model: str, delta: dict[str, str], finish_reason: str | None) -> str:
    body = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return f"data: {json.dumps(body)}\n\n"


def _completion(request_id: str, model: str, result: Result) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }


def _queue_job(engine: Engine, example: dict[str, Any], settings: Settings) -> asyncio.Queue[tuple[str, Any]]:
    """Submit a job; its events arrive on the returned asyncio queue (posted from the engine's thread)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def emit(kind: str, value: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    engine.submit(Job(example, settings, emit, AnswerText(engine.im)))
    return events


def create_app(im: InferenceModel, settings: ServeSettings) -> FastAPI:
    engine = Engine(im, settings.max_batch_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="vidtune", lifespan=lifespan)
    app.state.engine = engine
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.log_requests:  # added last: the outermost, it sees the body limit's 413 too
        app.add_middleware(AccessLog, write=lambda line: print(line, flush=True))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "requests_answered": engine.answered, "batches": engine.batches}

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)  # browsers ask; a 404 would be noise in their consoles

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "vidtune"}
        return {"object": "list", "data": [card]}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("vidtune.train.serving").joinpath("chat.html").read_text(encoding="utf-8")

    @app.post("/v1/frames")
    async def frames(request: FramesRequest, raw: Request) -> dict[str, Any]:
        raw.state.media = 1
        return await run_in_threadpool(sampled_frames, im, url_of(request.video_url), settings.policy)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> JSONResponse | StreamingResponse:
        raw.state.media = media_count(request.messages)
        if request.model not in (None, "", settings.model_name):
            unknown = f"the model {request.model!r} does not exist (this server serves {settings.model_name!r})"
            raise APIError(404, unknown, "model", "model_not_found")
        example = await run_in_threadpool(build_example, im, request, settings.policy)
        max_tokens = request.max_completion_tokens or request.max_tokens or settings.default_max_tokens
        events = _queue_job(engine, example, Settings(max_tokens, request.temperature, request.top_p))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if request.stream:
            chunks = _stream(events, request_id, settings.model_name, raw.state)
            return StreamingResponse(chunks, media_type="text/event-stream")
        text_done = await _finish(events)
        raw.state.usage = (text_done.prompt_tokens, text_done.completion_tokens)
        return JSONResponse(_completion(request_id, settings.model_name, text_done))

    return app


async def _finish(events: asyncio.Queue[tuple[str, Any]]) -> Result:
    while True:
        kind, value = await events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise APIError(500, value, code="generation_failed")


async def _stream(
    events: asyncio.Queue[tuple[str, Any]], request_id: str, model: str, state: Any
) -> AsyncIterator[str]:
    yield _chunk(request_id, model, {"role": "assistant", "content": ""}, None)
    while True:
        kind, value = await events.get()
        if kind == "delta":
            yield _chunk(request_id, model, {"content": value}, None)
        elif kind == "done":
            state.usage = (value.prompt_tokens, value.completion_tokens)
            yield _chunk(request_id, model, {}, value.finish_reason)
            break
        else:  # the status line has gone out: report the failure in the stream, as OpenAI does
            yield f"data: {json.dumps(APIError(500, value, code='generation_failed').body())}\n\n"
            break
    yield "data: [DONE]\n\n"


def _add_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, error: APIError) -> JSONResponse:
        request.state.error = error.code or error.kind  # for the access log
        return JSONResponse(error.body(), status_code=error.status)

    async def api_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, APIError)
        return respond(request, err)

    async def invalid(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        text, param = validation_message(list(err.errors()))
        return respond(request, APIError(400, text, param, "invalid_request"))

    async def http_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, HTTPException)
        code = "body_too_large" if err.status_code == 413 else None
        return respond(request, APIError(err.status_code, str(err.detail), code=code))

    handlers: dict[type[Exception], Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
        APIError: api_error,
        RequestValidationError: invalid,
        HTTPException: http_error,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)


def serve(im: InferenceModel, settings: ServeSettings, host: str, port: int) -> None:
    """Run the server until Ctrl-C (uvicorn finishes open requests, then returns)."""
    import uvicorn

    config = uvicorn.Config(
        create_app(im, settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=10
    )
    listener = config.bind_socket()  # bound before it is announced: --port 0 takes a free port and names it
    port = listener.getsockname()[1]
    print(f"vidtune serve: {settings.model_name} on http://{host}:{port}  (chat page: /, OpenAI API: /v1)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run: Ctrl-C ends the server quietly
        uvicorn.Server(config).run(sockets=[listener])
