"""The FastAPI app: `POST /v1/chat/completions` (plain or `stream: true` server-sent events), `GET /v1/models`,
`GET /health`, `POST /v1/frames` (the frames the model sees, for the page) and the web chat page at `/`.

Requests are parsed in a thread pool, their media decoded in a child process with a time limit (decode.py), then
queued to the engine's one model thread. At most `max_queue` requests are in the server at once (429 beyond); a
prompt longer than the model's context is refused (400) by its token count before any media is touched; a request
whose client disconnects is cancelled wherever it is (decoding, queued or generating).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import threading
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

from vidtune.data.audio import sound_bytes
from vidtune.data.conversation import DataError, media_part, message, text_part
from vidtune.data.conversation import Message as Turn
from vidtune.data.examples import with_time_instructions
from vidtune.data.families import ModelFamily
from vidtune.data.quality import MAX_FRAME_PIXELS
from vidtune.train.generation.infer import AnswerText, InferenceModel
from vidtune.train.serving.access_log import AccessLog
from vidtune.train.serving.decode import Cancelled, Decoder
from vidtune.train.serving.engine import Engine, Job, Result, Settings
from vidtune.train.serving.media import MediaPolicy, RequestFiles, resolve_media
from vidtune.train.serving.protocol import (
    APIError,
    AudioURLPart,
    ChatCompletionRequest,
    ChatMessage,
    FramesRequest,
    InputAudioPart,
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
    max_queue: int = 64  # requests in the server at once (decoding, queued or generating); 429 beyond
    decode_timeout_s: float = 120.0  # a request's media decode is killed after this long (400)
    max_frame_pixels: int = MAX_FRAME_PIXELS  # the pixel limit training applies, from the header, before decoding
    log_requests: bool = True  # one access line per request on stdout (access_log.py)


class Admission:
    """Counts the requests inside the server; past the limit a request is refused at once with 429."""

    def __init__(self, limit: int):
        self.limit, self.active, self.refused = limit, 0, 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            if self.active >= self.limit:
                self.refused += 1
                raise APIError(
                    429, f"the server is busy ({self.limit} requests in progress); retry shortly", code="queue_full"
                )
            self.active += 1

    def leave(self) -> None:
        with self.lock:
            self.active -= 1


@dataclass(frozen=True)
class ContextLimit:
    """The model's context in tokens, and the longest text one token covers (so a prompt's character count alone can
    prove it too long, before tokenizing megabytes of it)."""

    tokens: int
    max_token_chars: int

    @classmethod
    def of(cls, im: InferenceModel) -> ContextLimit:
        config = im.model.config
        text = getattr(config, "text_config", None) or config
        vocab = im.processor.tokenizer.get_vocab()
        return cls(int(getattr(text, "max_position_embeddings", 0) or 1 << 30), max(map(len, vocab), default=1))

    def check_text(self, im: InferenceModel, messages: list[ChatMessage]) -> None:
        texts = [
            part.text if not isinstance(part, str) else part
            for msg in messages
            for part in ([msg.content] if isinstance(msg.content, str) else msg.content)
            if isinstance(part, str) or part.type == "text"
        ]
        chars = sum(map(len, texts))
        if chars // self.max_token_chars >= self.tokens:
            self.refuse(f"at least {chars // self.max_token_chars:,}")
        tokens = sum(len(im.processor.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
        if tokens >= self.tokens:
            self.refuse(f"{tokens:,}")

    def refuse(self, count: str) -> None:
        raise APIError(
            400,
            f"the messages hold {count} tokens; this model's context is {self.tokens:,} tokens",
            "messages",
            "context_length_exceeded",
        )


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


def sound_file(part: InputAudioPart | AudioURLPart, policy: MediaPolicy, files: RequestFiles, where: str) -> str:
    """A sound part as a local file: `input_audio`'s bytes written into the request's folder, or `audio_url`'s
    file resolved as any media URL."""
    if isinstance(part, AudioURLPart):
        return resolve_media(url_of(part.audio_url), policy, files, where)
    try:
        content = sound_bytes(part.input_audio.data, part.input_audio.format)
    except ValueError as err:
        raise APIError(400, f"{where}.input_audio: {err}", where, "bad_audio") from None
    path = files.new_path(f".{part.input_audio.format}")
    path.write_bytes(content)
    return str(path)


def to_conversation(
    messages: list[ChatMessage], policy: MediaPolicy, files: RequestFiles, family: ModelFamily
) -> list[Turn]:
    """The request's messages as a vidtune conversation, each media URL resolved to a local file; a sound part for
    a model whose family does not hear is refused (400) before anything is written or decoded."""
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
            elif isinstance(part, (InputAudioPart, AudioURLPart)):
                if not family.hears:
                    refused = f"{where}: this model ({family.name}) does not hear sound; send text, images or videos"
                    raise APIError(400, refused, where, "audio_not_supported")
                parts.append(media_part("audio", sound_file(part, policy, files, where)))
            else:
                media = part.video_url if part.type == "video_url" else part.image_url
                kind = "video" if part.type == "video_url" else "image"
                parts.append(media_part(kind, resolve_media(url_of(media), policy, files, where)))
        turns.append(message(msg.role, parts))
    return turns


def client_text(err: Exception, policy: MediaPolicy, files: RequestFiles) -> str:
    """An error as the client may see it: paths relative to the media root, uploads by their part."""
    text = str(err).replace(files.folder.name + "/", "uploaded ")
    if policy.media_root is not None:
        text = text.replace(str(policy.media_root.resolve()) + "/", "")
    return text.replace(str(files.folder.name), "uploads")


def build_example(
    im: InferenceModel,
    request: ChatCompletionRequest,
    settings: ServeSettings,
    context: ContextLimit,
    decoder: Decoder,
    cancelled: threading.Event,
) -> dict[str, Any]:
    """The prompt example (media decoded as in training, in a child process with a time limit); a prompt over the
    context is refused by its text's tokens before any download or decode; unreadable media are a 400 naming the
    part."""
    context.check_text(im, request.messages)
    files = RequestFiles()
    try:
        conversation = to_conversation(request.messages, settings.policy, files, im.family)
        try:
            media, instructions = decoder.decode(
                conversation, im.sampling, im.time_instruction, im.builder.frame_px, settings.max_frame_pixels,
                settings.decode_timeout_s, files.folder.name, cancelled, audio_rate=im.builder.audio_rate,
                sound_rate=im.builder.sound_rate,
            )  # fmt: skip
            example = im.builder.build(with_time_instructions(conversation, instructions), media, for_generation=True)
        except DataError as err:
            raise APIError(400, client_text(err, settings.policy, files), code="unreadable_media") from None
    finally:
        files.close()
    if len(example["input_ids"]) >= context.tokens:  # the text fitted; its video and image tokens do not
        context.refuse(f"{len(example['input_ids']):,} (video, image and sound tokens included)")
    return example


def sampled_frames(
    im: InferenceModel, url: str, settings: ServeSettings, decoder: Decoder, cancelled: threading.Event
) -> dict[str, Any]:
    """The frames the model sees for a video, as JPEG data URLs with their times."""
    from PIL import Image

    files = RequestFiles()
    try:
        try:
            path = resolve_media(url, settings.policy, files, "video_url")
            media, _ = decoder.decode(
                [message("user", [media_part("video", path)])], im.sampling, False, im.builder.frame_px,
                settings.max_frame_pixels, settings.decode_timeout_s, files.folder.name, cancelled,
            )  # fmt: skip
        except DataError as err:
            raise APIError(400, client_text(err, settings.policy, files), code="unreadable_media") from None
    finally:
        files.close()
    clip = media[0]
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


def _queue_job(
    engine: Engine, example: dict[str, Any], settings: Settings, cancelled: threading.Event
) -> asyncio.Queue[tuple[str, Any]]:
    """Submit a job; its events arrive on the returned asyncio queue (posted from the engine's thread)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def emit(kind: str, value: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    engine.submit(Job(example, settings, emit, AnswerText(engine.im), cancelled=cancelled))
    return events


async def _watch_disconnect(request: Request, cancelled: threading.Event) -> None:
    """Set `cancelled` when the client goes away (the decode child is killed, the job dropped or stopped)."""
    while not cancelled.is_set():
        if await request.is_disconnected():
            cancelled.set()
            return
        await asyncio.sleep(0.2)


async def _decode_work(
    request: Request, cancelled: threading.Event, work: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run a blocking decode in the thread pool while watching the client; a gone client cancels it."""
    watcher = asyncio.create_task(_watch_disconnect(request, cancelled))
    try:
        return await run_in_threadpool(work)
    except Cancelled:
        raise APIError(400, "the client disconnected", code="cancelled") from None
    finally:
        watcher.cancel()


def create_app(im: InferenceModel, settings: ServeSettings, decoder: Decoder | None = None) -> FastAPI:
    """The app; `decoder` is best started before the model loads (decode.py says why), else it starts here."""
    decoder = decoder or Decoder()
    engine = Engine(im, settings.max_batch_size)
    admission = Admission(settings.max_queue)
    context = ContextLimit.of(im)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()
        decoder.close()

    app = FastAPI(title="vidtune", lifespan=lifespan)
    app.state.engine = engine
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.log_requests:  # added last: the outermost, it sees the body limit's 413 too
        app.add_middleware(AccessLog, write=lambda line: print(line, flush=True))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "requests_answered": engine.answered,
            "batches": engine.batches,
            "requests_cancelled": engine.cancelled,
            "requests_in_progress": admission.active,
            "requests_refused_busy": admission.refused,
        }

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
    async def frames(request: FramesRequest, http: Request) -> dict[str, Any]:
        http.state.media = 1
        admission.enter()
        try:
            cancelled = threading.Event()
            url = url_of(request.video_url)
            return await _decode_work(http, cancelled, lambda: sampled_frames(im, url, settings, decoder, cancelled))
        finally:
            admission.leave()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest, http: Request) -> JSONResponse | StreamingResponse:
        http.state.media = media_count(request.messages)
        if request.model not in (None, "", settings.model_name):
            unknown = f"the model {request.model!r} does not exist (this server serves {settings.model_name!r})"
            raise APIError(404, unknown, "model", "model_not_found")
        admission.enter()
        streaming = False
        cancelled = threading.Event()
        try:
            example = await _decode_work(
                http, cancelled, lambda: build_example(im, request, settings, context, decoder, cancelled)
            )
            max_tokens = request.max_completion_tokens or request.max_tokens or settings.default_max_tokens
            max_tokens = min(max_tokens, context.tokens - len(example["input_ids"]))  # what the context leaves
            sampling = Settings(max_tokens, request.temperature, request.top_p)
            events = _queue_job(engine, example, sampling, cancelled)
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            if request.stream:
                stream = _stream(events, request_id, settings.model_name, cancelled, admission.leave, http.state)
                streaming = True  # the stream leaves the admission when it ends
                return StreamingResponse(stream, media_type="text/event-stream")
            watcher = asyncio.create_task(_watch_disconnect(http, cancelled))
            try:
                text_done = await _finish(events)
            finally:
                watcher.cancel()
            http.state.usage = (text_done.prompt_tokens, text_done.completion_tokens)
            return JSONResponse(_completion(request_id, settings.model_name, text_done))
        finally:
            if not streaming:
                admission.leave()

    return app


async def _finish(events: asyncio.Queue[tuple[str, Any]]) -> Result:
    while True:
        kind, value = await events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise APIError(500, value, code="generation_failed")
        if kind == "cancelled":
            raise APIError(400, "the client disconnected", code="cancelled")


async def _stream(
    events: asyncio.Queue[tuple[str, Any]],
    request_id: str,
    model: str,
    cancelled: threading.Event,
    leave: Callable[[], None],
    state: Any,
) -> AsyncIterator[str]:
    try:
        yield _chunk(request_id, model, {"role": "assistant", "content": ""}, None)
        while True:
            kind, value = await events.get()
            if kind == "delta":
                yield _chunk(request_id, model, {"content": value}, None)
            elif kind == "done":
                state.usage = (value.prompt_tokens, value.completion_tokens)  # for the access log
                yield _chunk(request_id, model, {}, value.finish_reason)
                break
            elif kind == "cancelled":
                return
            else:  # the status line has gone out: report the failure in the stream, as OpenAI does
                yield f"data: {json.dumps(APIError(500, value, code='generation_failed').body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnected (the server stops iterating): the job is cancelled
        cancelled.set()
        leave()


def _add_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, error: APIError) -> JSONResponse:
        request.state.error = error.code or error.kind  # for the access log
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

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


def serve(im: InferenceModel, settings: ServeSettings, host: str, port: int, decoder: Decoder | None = None) -> None:
    """Run the server until Ctrl-C (uvicorn finishes open requests, then returns)."""
    import uvicorn

    config = uvicorn.Config(
        create_app(im, settings, decoder), host=host, port=port, log_level="warning", timeout_graceful_shutdown=10
    )
    listener = config.bind_socket()  # bound before it is announced: --port 0 takes a free port and names it
    port = listener.getsockname()[1]
    print(f"vidtune serve: {settings.model_name} on http://{host}:{port}  (chat page: /, OpenAI API: /v1)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run: Ctrl-C ends the server quietly
        uvicorn.Server(config).run(sockets=[listener])
