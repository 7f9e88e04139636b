"""The OpenAI chat-completions request as vLLM accepts it (text, `image_url`, `video_url`, and for models that hear
`input_audio` (base64 bytes) and `audio_url` parts), parsed by pydantic, and OpenAI-style error objects
(`{"error": {"message", "type", "param", "code"}}`).

Statuses: 400 a malformed request or unreadable media, 404 an unknown model or route, 413 a body over the limit,
500 a failure inside generation (the request fails, the server stays up).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TOKENS_LIMIT = 4096


class APIError(Exception):
    """A request the server refuses: the HTTP status and the OpenAI error object's fields."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class MediaURL(BaseModel):
    url: str


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: MediaURL | str


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: MediaURL | str


class InputAudio(BaseModel):
    data: str  # base64 sound bytes
    format: Literal["wav", "mp3", "flac"] = "wav"


class InputAudioPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURLPart(BaseModel):
    type: Literal["audio_url"]
    audio_url: MediaURL | str


Part = Annotated[TextPart | ImagePart | VideoPart | InputAudioPart | AudioURLPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class ChatCompletionRequest(BaseModel):
    """Fields OpenAI clients send; others (logprobs, user, ...) are ignored as vLLM ignores them."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # 0 = greedy, the same answer as `vidtune infer`
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class FramesRequest(BaseModel):
    """vidtune's own endpoint: the frames the model would see for one video (for the web page)."""

    video_url: MediaURL | str


def url_of(media: MediaURL | str) -> str:
    return media.url if isinstance(media, MediaURL) else media


def _location(loc: tuple[Any, ...]) -> str:
    """`messages.0.content.1.video_url.url` from pydantic's location, without its union-branch names."""
    parts: list[str] = []
    for item in map(str, loc):
        if item == "body" or "[" in item or item in ("str", "MediaURL"):
            continue
        if not parts or parts[-1] != item:  # a tagged union repeats its tag: `video_url.video_url`
            parts.append(item)
    return ".".join(parts)


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """One line from pydantic's errors and its location (the error's `param`). Of the errors a union collects
    (content: a string, or a list of parts), the deepest is the one that says what is wrong."""
    for error in errors:
        if error.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})", None
    deepest = max(errors, key=lambda error: len(error.get("loc", ())))
    param = _location(tuple(deepest.get("loc", ()))) or None
    return (f"{param}: {deepest.get('msg')}" if param else str(deepest.get("msg"))), param
