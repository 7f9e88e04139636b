"""Corpus row formats -> the one conversation type (data/conversation.py).

Formats, as peers and public datasets write them:
- llava: `video` and/or `image` (a path or a list), `conversations` [{from, value}] with human/gpt/system
  (LLaVA, LLaVA-Video-178K, lmms-finetune, LLaMA-Factory "sharegpt" with `videos`/`images` lists).
- openai: `messages` [{role, content}] with `videos`/`images` lists and `<video>`/`<image>` placeholders, or content
  as a list of typed parts (LLaMA-Factory, ms-swift).
- sound files, in both: an `audios` list with `<audio>` placeholders (LLaMA-Factory, ms-swift), typed parts
  `{"type": "audio", "audio": path}`, `audio_url` and OpenAI's `input_audio` (base64 bytes, stored once in the cache
  folder by their hash: every later stage reads media from a path). Rows may be audio-only. A row's `start`/`end`
  bound its videos, or its sounds when it has no video.
- caption: `video`, `caption`, optional `start`/`end` seconds -> a describe-style prompt (base variant).
- qa: `video`, `question`, `answer`.
- preference (DPO pairs): a prompt + `chosen` + `rejected` answers, in the layouts peers ship: LLaVA-Hound /
  RLAIF-V rows (`video`/`image`, `prompt` or `question`, `chosen`, `rejected` texts), LLaMA-Factory's sharegpt
  pairwise rows (`conversations` without the answer, `chosen`/`rejected` as {from, value} messages), ms-swift's
  rows (`messages` ending with the chosen answer, `rejected_response`). Normalised to the chosen conversation;
  `rejected_answer` gives the rejected text.
- multiple_choice: `video`, `question`, `options` list (or `candidates`, MVBench; or `a0`..`a4` columns, NExT-QA;
  or a column map listing several columns), `answer` as a letter, a 0-based index or the option's own text
  (MVBench, Perception Test). Options already lettered ("A. red", Video-MME) are recognised and lettered once.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vidtune.data.audio import store_sound
from vidtune.data.conversation import (
    DataError,
    Message,
    Part,
    check_conversation,
    media_part,
    media_parts,
    message,
    text_part,
)

FORMATS = ("llava", "openai", "caption", "qa", "multiple_choice", "preference")
DEFAULT_CAPTION_PROMPT = "Describe this video."
MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
PLACEHOLDER = re.compile(r"<(image|video|audio)>")
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LETTERED = re.compile(r"^\(?([A-Z])(?:[.:]|\))\s*(.*)$", re.DOTALL)  # "A. red", "(B) blue", "C) green", "D: red"


class UnknownFormat(DataError):
    """No format fits the corpus's columns: a configuration error of the whole source, not a bad row."""


@dataclass(frozen=True)
class RowContext:
    """What a normaliser needs besides the row: where it is (for errors) and how to resolve media paths."""

    at: str  # "file.jsonl row 3", prefixed to every error
    resolve_media: Callable[[str], str]
    caption_prompts: Sequence[str] = (DEFAULT_CAPTION_PROMPT,)
    seed: int = 0
    row: int = 0


def detect_format(columns: Sequence[str], at: str) -> str:
    cols = set(columns)
    if "chosen" in cols and cols & {"rejected", "rejected_response"}:
        return "preference"
    if "conversations" in cols:
        return "llava"
    if "messages" in cols:
        return "openai"
    if "caption" in cols:
        return "caption"
    if cols & {"options", "candidates"} or {"a0", "a1"} <= cols:
        return "multiple_choice"
    if {"question", "answer"} <= cols:
        return "qa"
    raise UnknownFormat(
        f"{at}: cannot tell the corpus format from its columns {sorted(cols)}; expected `conversations` (llava), "
        "`messages` (openai), `caption`, `question`+`answer` (qa) or `options`/`candidates` (multiple_choice), "
        "or set the source's `format` and `columns`"
    )


def normalise_row(row: dict[str, Any], fmt: str, ctx: RowContext) -> list[Message]:
    normalisers: dict[str, Callable[[dict[str, Any], RowContext], list[Message]]] = {
        "llava": from_llava,
        "openai": from_openai,
        "caption": from_caption,
        "qa": from_qa,
        "multiple_choice": from_multiple_choice,
        "preference": from_preference,
    }
    if fmt not in normalisers:
        raise DataError(f"{ctx.at}: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    messages = normalisers[fmt](row, ctx)
    check_conversation(messages, ctx.at)
    _bound_sounds(messages, row, ctx)
    return messages


# ----------------------------------------------------------------------------------------------------- helpers


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _require(row: dict[str, Any], keys: Sequence[str], ctx: RowContext) -> None:
    missing = [k for k in keys if row.get(k) is None]
    if missing:
        present = sorted(k for k, v in row.items() if v is not None)
        raise DataError(f"{ctx.at}: missing column(s) {missing}; the row has {present}")


def clip_bounds(row: dict[str, Any], ctx: RowContext) -> tuple[float | None, float | None]:
    start, end = row.get("start"), row.get("end")
    try:
        start_s = None if start is None else float(start)
        end_s = None if end is None else float(end)
    except (TypeError, ValueError):
        raise DataError(f"{ctx.at}: clip start/end must be seconds, got start={start!r} end={end!r}") from None
    if start_s is not None and start_s < 0:
        raise DataError(f"{ctx.at}: clip start {start_s}s is negative")
    if start_s is not None and end_s is not None and end_s <= start_s:
        raise DataError(f"{ctx.at}: clip end {end_s}s is not after start {start_s}s")
    return start_s, end_s


def _role(raw: Any, ctx: RowContext) -> str:
    role = ROLE_ALIASES.get(str(raw).lower()) if raw is not None else None
    if role is None:
        raise DataError(f"{ctx.at}: unknown role {raw!r} (expected one of {', '.join(sorted(ROLE_ALIASES))})")
    return role


def _bound_sounds(messages: list[Message], row: dict[str, Any], ctx: RowContext) -> None:
    """A row's `start`/`end` bound its videos; in a row without video (an audio-only row) they bound its sounds."""
    parts = media_parts(messages)
    if any(p["type"] == "video" for p in parts) or (row.get("start") is None and row.get("end") is None):
        return
    start_s, end_s = clip_bounds(row, ctx)
    for part in parts:
        if part["type"] == "audio" and part["start_s"] is None and part["end_s"] is None:
            part["start_s"], part["end_s"] = start_s, end_s


class _MediaQueue:
    """Hands out a row's media, in order, to the placeholders that ask for them."""

    def __init__(
        self,
        videos: list[str],
        images: list[str],
        ctx: RowContext,
        clip: tuple[float | None, ...],
        audios: list[str] | None = None,
    ):
        self.videos, self.images, self.ctx, self.clip = list(videos), list(images), ctx, clip
        self.audios = list(audios or [])
        self.used = {"video": 0, "image": 0, "audio": 0}

    def pool(self, kind: str) -> list[str]:
        return {"video": self.videos, "image": self.images, "audio": self.audios}[kind]

    def kind_for(self, tag: str) -> str:
        # LLaVA-Video rows write `<image>` for their video: a tag means the video when the row has only videos.
        if tag == "image" and not self.images and self.videos:
            return "video"
        return tag

    def take(self, kind: str) -> Part:
        pool = self.pool(kind)
        index = self.used[kind]
        if index >= len(pool):
            raise DataError(
                f"{self.ctx.at}: more <{kind}> placeholders than {kind}s ({len(pool)} given in the row's media list)"
            )
        self.used[kind] += 1
        path = self.ctx.resolve_media(str(pool[index]))
        if kind == "video":
            return media_part("video", path, *self.clip)
        return media_part(kind, path)  # (an audio-only row's bounds reach its sounds later: _bound_sounds)

    def check_all_used(self) -> None:
        for kind in self.used:
            pool = self.pool(kind)
            if self.used[kind] != len(pool):
                raise DataError(
                    f"{self.ctx.at}: {self.used[kind]} <{kind}> placeholder(s) in the text but {len(pool)} "
                    f"{kind}(s) in the row"
                )

    def remaining_parts(self) -> list[Part]:
        """Videos, then images, then sounds not yet taken (LLaMA-Factory's order of its media lists)."""
        return [self.take(kind) for kind in self.used for _ in range(len(self.pool(kind)) - self.used[kind])]

    def any(self) -> bool:
        return bool(self.videos or self.images or self.audios)


def _parts_from_text(text: str, media: _MediaQueue) -> list[Part]:
    """Split `text` at `<video>`/`<image>`/`<audio>` placeholders, each replaced by the next media part of its kind."""
    parts: list[Part] = []
    for i, piece in enumerate(PLACEHOLDER.split(text)):
        if i % 2 == 1:  # re.split puts the captured tag at odd positions
            parts.append(media.take(media.kind_for(piece)))
        elif piece.strip():
            parts.append(text_part(piece.strip()))
    return parts


def _count_placeholders(texts: Sequence[str]) -> int:
    return sum(len(PLACEHOLDER.findall(t)) for t in texts)


def _place_media_without_placeholders(messages: list[Message], media: _MediaQueue, ctx: RowContext) -> None:
    """No placeholder anywhere: the media go first in the first user turn (LLaVA's convention)."""
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is None:
        raise DataError(f"{ctx.at}: the row has media but no user turn to attach them to")
    first_user["content"][:0] = media.remaining_parts()


def _conversation_from_texts(turns: list[tuple[str, str]], media: _MediaQueue, ctx: RowContext) -> list[Message]:
    has_placeholders = _count_placeholders([t for _, t in turns]) > 0
    messages: list[Message] = []
    for role, text in turns:
        if role == "assistant" and PLACEHOLDER.search(text):
            raise DataError(f"{ctx.at}: an assistant turn holds a media placeholder: {text[:60]!r}")
        messages.append(message(role, _parts_from_text(text, media) if has_placeholders else [text_part(text.strip())]))
    if has_placeholders:
        media.check_all_used()
    elif media.any():
        _place_media_without_placeholders(messages, media, ctx)
    return messages


# ----------------------------------------------------------------------------------------------------- formats


def _row_media(row: dict[str, Any], ctx: RowContext, keys: Sequence[str]) -> _MediaQueue:
    """The row's media lists under `keys` (("video", "videos") reads both); an empty sound entry ("", as CSV
    exports write a missing one) is no sound."""

    def listed(kind: str) -> list[Any]:
        return [item for key in keys if key.startswith(kind) for item in _as_list(row.get(key))]

    sounds = [sound for sound in listed("audio") if sound]
    return _MediaQueue(listed("video"), listed("image"), ctx, clip_bounds(row, ctx), sounds)


def from_llava(row: dict[str, Any], ctx: RowContext) -> list[Message]:
    _require(row, ["conversations"], ctx)
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"{ctx.at}: `conversations` must be a list of {{from, value}} turns")
    media = _row_media(row, ctx, ("video", "videos", "image", "images", "audio", "audios"))
    pairs = []
    for turn in turns:
        if not isinstance(turn, dict) or "value" not in turn:
            raise DataError(f"{ctx.at}: each turn needs `from` and `value`, got {str(turn)[:80]}")
        pairs.append((_role(turn.get("from", turn.get("role")), ctx), str(turn["value"])))
    return _prepend_system(row, ctx) + _conversation_from_texts(pairs, media, ctx)


def _prepend_system(row: dict[str, Any], ctx: RowContext) -> list[Message]:
    system = row.get("system")
    return [message("system", [text_part(str(system))])] if system else []


def _input_audio(block: dict[str, Any], ctx: RowContext) -> Part:
    """OpenAI's `{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}`: the bytes stored as a
    file (data/audio.py `store_sound`), so the part is a sound file like any other."""
    inner = block.get("input_audio")
    if not isinstance(inner, dict) or not isinstance(inner.get("data"), str) or not inner["data"]:
        raise DataError(f"{ctx.at}: an input_audio part needs `input_audio.data` (base64 sound bytes)")
    try:
        return media_part("audio", store_sound(inner["data"], str(inner.get("format") or "wav")))
    except (ValueError, OSError) as err:  # bad bytes or format; a cache folder that cannot be written
        raise DataError(f"{ctx.at}: input_audio: {err}") from None


def _typed_part(block: dict[str, Any], media: _MediaQueue, ctx: RowContext) -> Part | None:
    kind = block.get("type")
    if kind == "text":
        text = str(block.get("text") or "")
        return text_part(text) if text.strip() else None
    if kind == "input_audio":
        return _input_audio(block, ctx)
    if kind in ("image_url", "video_url", "audio_url"):
        inner = block.get(kind)
        url = inner.get("url") if isinstance(inner, dict) else inner
        kind, block = kind[:-4], {"type": kind[:-4], "path": url}
    if kind in ("video", "image", "audio"):
        path = next((block[k] for k in (kind, "path", "url") if isinstance(block.get(k), str)), None)
        if path is None:  # a bare {"type": "video"} takes the next entry of the row's media list
            return media.take(kind)
        if kind == "video":
            return media_part("video", ctx.resolve_media(path), *media.clip)
        return media_part(kind, ctx.resolve_media(path))
    raise DataError(f"{ctx.at}: unknown content part type {kind!r} (expected text, image, video, audio, input_audio)")


def from_openai(row: dict[str, Any], ctx: RowContext) -> list[Message]:
    _require(row, ["messages"], ctx)
    raw_messages = row["messages"]
    if not isinstance(raw_messages, list):
        raise DataError(f"{ctx.at}: `messages` must be a list of {{role, content}}")
    media = _row_media(row, ctx, ("videos", "images", "audios"))
    if all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in raw_messages):
        pairs = [(_role(m.get("role"), ctx), m["content"]) for m in raw_messages]
        return _prepend_system(row, ctx) + _conversation_from_texts(pairs, media, ctx)
    messages: list[Message] = []
    for m in raw_messages:
        if not isinstance(m, dict) or "content" not in m:
            raise DataError(f"{ctx.at}: each message needs `role` and `content`, got {str(m)[:80]}")
        content = m["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else _as_list(content)
        parts = [p for b in blocks if (p := _typed_part(b if isinstance(b, dict) else {}, media, ctx)) is not None]
        messages.append(message(_role(m.get("role"), ctx), parts))
    media.check_all_used()
    return _prepend_system(row, ctx) + messages


def from_caption(row: dict[str, Any], ctx: RowContext) -> list[Message]:
    _require(row, ["video", "caption"], ctx)
    prompts = list(ctx.caption_prompts)
    # Seeded per row, so the normalised corpus (and the datasets cache of it) is the same on every run and rank.
    prompt = prompts[0] if len(prompts) == 1 else random.Random(f"{ctx.seed}:{ctx.row}").choice(prompts)
    video = media_part("video", ctx.resolve_media(str(row["video"])), *clip_bounds(row, ctx))
    return [
        message("user", [video, text_part(prompt)]),
        message("assistant", [text_part(str(row["caption"]).strip())]),
    ]


def from_qa(row: dict[str, Any], ctx: RowContext) -> list[Message]:
    _require(row, ["video", "question", "answer"], ctx)
    video = media_part("video", ctx.resolve_media(str(row["video"])), *clip_bounds(row, ctx))
    return [
        message("user", [video, text_part(str(row["question"]).strip())]),
        message("assistant", [text_part(str(row["answer"]).strip())]),
    ]


def multiple_choice_prompt(question: str, options: Sequence[str]) -> str:
    lines = [question.strip(), *(f"{OPTION_LETTERS[i]}. {str(o).strip()}" for i, o in enumerate(options))]
    return "\n".join([*lines, MULTIPLE_CHOICE_INSTRUCTION])


def option_texts(options: Sequence[Any], at: str) -> list[str]:
    """Options without their letters: ["A. red", "B. blue"] (Video-MME) -> ["red", "blue"], so a prompt letters
    them once. Only a list lettered A, B, C... in order counts as lettered; "A cat" is an option, not a letter."""
    texts = [str(o).strip() for o in options]
    matches = [LETTERED.match(t) for t in texts]
    if not all(matches):
        return texts
    letters = "".join(m.group(1) for m in matches if m)
    if letters != OPTION_LETTERS[: len(texts)]:
        raise DataError(f"{at}: options are lettered {', '.join(letters)}, not A, B, C... in order: {texts}")
    return [m.group(2).strip() for m in matches if m]


def _matching(answer: str, texts: Sequence[str], key: Callable[[str], str]) -> list[int]:
    return [i for i, text in enumerate(texts) if key(text) == key(answer)]


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_index(answer: Any, options: Sequence[Any], at: str) -> int:
    """The 0-based option an answer means: a number is an index (NExT-QA); a string is the option's text
    (MVBench, exact, before any guess: counting tasks have options "3", "4", "5"), else a letter ("B", "b", "B.",
    "(B)"), else a 0-based index ("1"), else the option's text normalised (case, punctuation, spaces)."""
    texts = option_texts(options, at)
    if isinstance(answer, bool) or answer is None:
        raise DataError(f"{at}: answer {answer!r} is not an option letter, index or text")
    if isinstance(answer, (int, float)):
        if isinstance(answer, float) and not answer.is_integer():  # 1.5, NaN (an empty cell of a number column)
            raise DataError(f"{at}: answer {answer!r} is not a 0-based option index")
        if not 0 <= answer < len(texts):
            raise DataError(f"{at}: answer {answer!r} points outside the {len(texts)} options")
        return int(answer)
    text = str(answer).strip()
    raw = [str(o).strip() for o in options]
    exact = sorted(set(_matching(text, texts, str.strip) + _matching(text, raw, str.strip)))
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        raise DataError(f"{at}: answer {text!r} matches options {_letters(exact)}; cannot tell which is meant")
    letter = re.fullmatch(r"\(?([A-Za-z])[.)]?", text)
    if letter:
        index = OPTION_LETTERS.index(letter.group(1).upper())
    elif text.isdigit():
        index = int(text)
    else:
        loose = _matching(text, texts, _normalised)
        if len(loose) != 1:
            found = f"matches options {_letters(loose)}" if loose else "is no option letter, index or option text"
            raise DataError(f"{at}: answer {text!r} {found} (options: {texts})")
        return loose[0]
    if not 0 <= index < len(texts):
        raise DataError(f"{at}: answer {answer!r} points outside the {len(texts)} options")
    return index


def _letters(indices: Sequence[int]) -> str:
    return " and ".join(OPTION_LETTERS[i] for i in indices)


def answer_letter(answer: Any, options: Sequence[Any], at: str) -> str:
    return OPTION_LETTERS[answer_index(answer, options, at)]


def row_options(row: dict[str, Any], ctx: RowContext) -> list[Any]:
    """The row's option list: `options`, `candidates` (MVBench) or the columns a0, a1, ... (NExT-QA)."""
    options = row.get("options", row.get("candidates"))
    if options is None:
        options = [row[f"a{i}"] for i in range(len(OPTION_LETTERS)) if row.get(f"a{i}") is not None]
    if not isinstance(options, (list, tuple)) or not 2 <= len(options) <= len(OPTION_LETTERS):
        raise DataError(f"{ctx.at}: `options` must be a list of 2 to 26 choices, got {options!r}")
    return list(options)


def from_multiple_choice(row: dict[str, Any], ctx: RowContext) -> list[Message]:
    _require(row, ["video", "question", "answer"], ctx)
    options = row_options(row, ctx)
    video = media_part("video", ctx.resolve_media(str(row["video"])), *clip_bounds(row, ctx))
    prompt = multiple_choice_prompt(str(row["question"]), option_texts(options, ctx.at))
    return [
        message("user", [video, text_part(prompt)]),
        message("assistant", [text_part(answer_letter(row["answer"], options, ctx.at))]),
    ]


# ------------------------------------------------------------------------------------------------- preference


def _answer_text(value: Any, what: str, ctx: RowContext) -> str:
    """A chosen/rejected answer: a text, or one {from, value} / {role, content} message (LLaMA-Factory)."""
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):  # [{role, content}]
        value = value[0].get("content", value[0].get("value"))
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{ctx.at}: `{what}` must be a non-empty answer text or message, got {str(value)[:80]!r}")
    return value.strip()


def from_preference(row: dict[str, Any], ctx: RowContext) -> list[Message]:
    """The chosen conversation of a preference row (the rejected answer: `rejected_answer`)."""
    chosen = _answer_text(row.get("chosen"), "chosen", ctx)
    rejected_answer(row, ctx)  # a row with no usable rejected answer is bad here, before it is measured
    if "messages" in row:  # ms-swift: the messages end with the chosen answer
        messages = from_openai(row, ctx)
        if messages[-1]["role"] != "assistant":
            messages = from_openai(
                {**row, "messages": [*row["messages"], {"role": "assistant", "content": chosen}]}, ctx
            )
        return messages
    if "conversations" in row:  # LLaMA-Factory sharegpt pairwise: the prompt turns, then chosen/rejected
        return from_llava({**row, "conversations": [*row["conversations"], {"from": "gpt", "value": chosen}]}, ctx)
    prompt = row.get("prompt", row.get("question"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{ctx.at}: a preference row needs a `prompt` (or `question`), `conversations` or `messages`")
    turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": chosen}]
    return from_llava({**row, "conversations": turns}, ctx)


def rejected_answer(row: dict[str, Any], ctx: RowContext) -> str:
    """The rejected answer of a preference row; the same text as the chosen one is a bad row (nothing to prefer)."""
    key = "rejected" if row.get("rejected") is not None else "rejected_response"
    rejected = _answer_text(row.get(key), key, ctx)
    if rejected == _answer_text(row.get("chosen"), "chosen", ctx):
        raise DataError(f"{ctx.at}: chosen and rejected answers are the same ({rejected[:60]!r}): nothing to prefer")
    return rejected
