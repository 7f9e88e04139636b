"""The one conversation type every corpus format is normalised to.

A conversation is a list of chat messages whose content is a list of typed parts, the shape
`processor.apply_chat_template` takes, so nothing translates between our rows and the processor:

    {"role": "user", "content": [{"type": "video", "path": "/data/a.mp4", "start_s": 2.0, "end_s": 9.5, ...},
                                 {"type": "text", "text": "What happens?", ...}]}

Media parts are videos, images and sound files (`audio`: a WAV, FLAC or MP3, or a video file's sound track, whole or
from start_s to end_s), in the order the model consumes their features.

Every part carries every key (unused ones are None) so that rows share one Arrow schema inside `datasets`.
"""

from __future__ import annotations

from typing import Any, TypedDict

ROLES = ("system", "user", "assistant")
MEDIA_TYPES = ("video", "image", "audio")
PART_TYPES = ("text", *MEDIA_TYPES)


class Part(TypedDict):
    type: str
    text: str | None
    path: str | None
    start_s: float | None
    end_s: float | None


class Message(TypedDict):
    role: str
    content: list[Part]


class DataError(ValueError):
    """Bad user input. The message is one line that says where (file, row) and what is wrong."""


def where(source: str, row: int | None = None) -> str:
    """`captions.jsonl row 12`: the prefix of every data error, so the user can open the file at the row."""
    return f"{source} row {row}" if row is not None else source


def text_part(text: str) -> Part:
    return {"type": "text", "text": text, "path": None, "start_s": None, "end_s": None}


def media_part(kind: str, path: str, start_s: float | None = None, end_s: float | None = None) -> Part:
    if kind not in MEDIA_TYPES:
        raise ValueError(f"media kind must be one of {', '.join(MEDIA_TYPES)}, got {kind!r}")
    return {"type": kind, "text": None, "path": path, "start_s": start_s, "end_s": end_s}


def message(role: str, parts: list[Part]) -> Message:
    return {"role": role, "content": parts}


def media_parts(messages: list[Message]) -> list[Part]:
    """The video, image and sound parts in conversation order (the order the model consumes their features)."""
    return [part for msg in messages for part in msg["content"] if part["type"] in MEDIA_TYPES]


def assistant_texts(messages: list[Message]) -> list[str]:
    return [
        "".join(p["text"] or "" for p in m["content"] if p["type"] == "text")
        for m in messages
        if m["role"] == "assistant"
    ]


def check_conversation(messages: list[Message], at: str) -> None:
    """Structural rules every normalised conversation obeys; `at` names the row for the error."""
    if not messages:
        raise DataError(f"{at}: the conversation is empty")
    for msg in messages:
        if msg["role"] not in ROLES:
            raise DataError(f"{at}: unknown role {msg['role']!r} (expected one of {', '.join(ROLES)})")
        for part in msg["content"]:
            if part["type"] not in PART_TYPES:
                raise DataError(f"{at}: unknown content part type {part['type']!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{at}: no assistant turn, so nothing to train on")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{at}: the conversation ends with a {messages[-1]['role']} turn, not an assistant answer")


def to_template_messages(messages: list[Message], media: dict[int, Any] | None = None) -> list[dict[str, Any]]:
    """Messages in the form the processor's chat template renders.

    `media` maps the index of a media part (conversation order) to its decoded pixels (a sound: its samples); the
    processor then takes them from the part itself. Without it, media parts render as bare placeholders (for token
    counting and prompts). Paths are never handed to the processor: it would try to load them itself, with its own
    sampling.
    """
    out: list[dict[str, Any]] = []
    media_index = 0
    for msg in messages:
        content: list[dict[str, Any]] = []
        for part in msg["content"]:
            if part["type"] == "text":
                content.append({"type": "text", "text": part["text"] or ""})
                continue
            block: dict[str, Any] = {"type": part["type"]}
            if media is not None:
                block[part["type"]] = media[media_index]
            content.append(block)
            media_index += 1
        out.append({"role": msg["role"], "content": content})
    return out
