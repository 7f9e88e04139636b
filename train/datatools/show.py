"""`vidtune show RECIPE`: what training feeds the model for the first rows of a recipe's data, as one HTML page a
user opens in a browser: each video's sampled frames as a contact sheet with their times and the backend that
decoded them (and, for a video the run hears, the sound of their span as a WAV file beside the page, played by the
page), the rendered prompt with visual and audio tokens collapsed (`<video x1152>`, `<audio x50>`), and the label
span (the tokens the loss learns) highlighted. Truncated answers, wrong placeholders, sideways frames and a silent
track show at a glance."""

from __future__ import annotations

import base64
import html
import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidtune.data.audio import Audio
from vidtune.data.conversation import DataError
from vidtune.data.dataset import audio_rate_for, heard_sources, load_media
from vidtune.data.examples import ExampleBuilder, with_time_instructions
from vidtune.data.families import family_for
from vidtune.data.sources import iter_conversations
from vidtune.data.video import Clip
from vidtune.train.datatools.frames import contact_sheet, write_wav
from vidtune.train.training.config import Recipe
from vidtune.train.training.model import load_model_config, load_processor

IGNORE_INDEX = -100
STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto}section{border-top:1px solid #ccc;padding:1em 0}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.8em}mark{background:#ffe58a}.media{color:#06c;font-weight:bold}
.bad{color:#b00}img{max-width:100%}"""


def render_tokens(builder: ExampleBuilder, input_ids: torch.Tensor, labels: torch.Tensor) -> str:
    """HTML of the tokens: runs of one visual token as `<video xN>`, learned tokens (labels != -100) in <mark>."""
    visual = {
        getattr(builder.processor, f"{kind}_token_id", None): kind for kind in ("video", "image", "audio")
    }  # fmt: skip
    pieces = []
    runs = itertools.groupby(
        zip(input_ids.tolist(), (labels != IGNORE_INDEX).tolist(), strict=True), key=_run_key(visual)
    )
    for (kind, learned), run in runs:
        ids = [token for token, _ in run]
        if kind:
            text = f'<span class="media">&lt;{kind} x{len(ids)}&gt;</span>'
        else:
            text = html.escape(builder.tokenizer.decode(ids))
        pieces.append(f"<mark>{text}</mark>" if learned else text)
    return "".join(pieces)


def _run_key(visual: dict[Any, str]):
    return lambda item: (visual.get(item[0], ""), item[1])


def sheet_html(path: str, clip: Clip) -> str:
    labels = [f"#{i}  {t:.2f}s" for i, t in zip(clip.indices, clip.timestamps_s, strict=True)]
    buffer = io.BytesIO()
    contact_sheet(clip.frames, labels, cell_px=160).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    shape = f"{clip.frames.shape[2]}x{clip.frames.shape[1]}"
    return (
        f"<p>{html.escape(path)}: {clip.info.duration_s:.2f}s, {len(clip.frames)} frames of {shape}, decoded by "
        f"{clip.backend}</p><img alt='frames of {html.escape(path)}' src='data:image/png;base64,{data}'>"
    )


def audio_html(audio: Audio | None, folder: Path, name: str) -> str:
    """A heard clip's sound (its sampled span) or a sound file's, written as `name` in `folder`, and a player."""
    if audio is None:
        return "<p>sound: no audio stream (heard as nothing)</p>"
    write_wav(audio.samples, audio.sampling_rate, folder / name)
    return (
        f"<p>sound {audio.start_s:.2f}-{audio.end_s:.2f}s, {audio.sampling_rate} Hz mono, decoded by {audio.backend}: "
        f"<a href='{name}'>{name}</a></p><audio controls src='{name}'></audio>"
    )


def show_row(
    recipe: Recipe, builder: ExampleBuilder, row: dict[str, Any], row_index: int, folder: Path, heard: set[str]
) -> str:
    """One row as an HTML section, with the frames training would sample for it in epoch 0 (and the sound of a video
    from a source in `heard`, written into `folder`)."""
    data = recipe.data
    title = f"<h2>{html.escape(row['at'])}</h2>"
    if row.get("problem"):
        return f"<section>{title}<p class='bad'>bad row: {html.escape(row['problem'])}</p></section>"
    rng = np.random.default_rng([recipe.train.seed, 0, row_index])  # the training jitter of the first epoch
    clips: list[tuple[str, Clip]] = []
    try:
        media, instructions = load_media(
            row["messages"], data.sampling, data.time_instruction, rng, data.bad_samples.decode_timeout_s,
            builder.frame_px, record=clips, max_frame_pixels=data.bad_samples.max_frame_pixels,
            audio_rate=builder.audio_rate if row.get("source") in heard else None, sound_rate=builder.sound_rate,
        )  # fmt: skip
        example = builder.build(with_time_instructions(row["messages"], instructions), media)
    except DataError as err:
        return f"<section>{title}<p class='bad'>bad sample: {html.escape(str(err))}</p></section>"
    heard_row = row.get("source") in heard
    tokens = len(example["input_ids"])
    learned = int((example["labels"] != IGNORE_INDEX).sum())
    over = f" <span class='bad'>over max_length {data.max_length}: dropped</span>" if tokens > data.max_length else ""
    sheets = [
        sheet_html(path, clip) + (audio_html(clip.audio, folder, f"row{row_index}_video{k}.wav") if heard_row else "")
        for k, (path, clip) in enumerate(clips)
    ]
    sounds = [m for _, m in sorted(media.items()) if isinstance(m, Audio)]
    sheets += [audio_html(sound, folder, f"row{row_index}_sound{k}.wav") for k, sound in enumerate(sounds)]
    return (
        f"<section>{title}{''.join(sheets)}"
        f"<p>{tokens:,} tokens, {learned:,} learned (highlighted){over}</p>"
        f"<pre>{render_tokens(builder, example['input_ids'], example['labels'])}</pre></section>"
    )


def run_show(recipe: Recipe, source: str, num_rows: int, out: str | Path) -> Path:
    """Write OUT/index.html for the first `num_rows` rows of the recipe's training sources; returns its path."""
    model = recipe.model
    family = family_for(load_model_config(model.name_or_path, model.trust_remote_code).model_type)
    processor = load_processor(model.name_or_path, family, model.trust_remote_code)
    data = recipe.data
    # videos the run hears (data.audio) are shown with their sound, as training builds them
    builder = ExampleBuilder(processor, family, data.label_turns, audio_rate=audio_rate_for(data, family, processor))
    heard = heard_sources(data, family) if builder.audio_rate else set()
    rows = (
        row
        for source_cfg in data.sources
        for row in iter_conversations(source_cfg, data.caption_prompts, recipe.train.seed, True, data.max_row_bytes)
    )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    sections = [
        show_row(recipe, builder, row, index, folder, heard)
        for index, row in enumerate(itertools.islice(rows, num_rows))
    ]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>vidtune show</title><style>{STYLE}</style></head>"
        f"<body><h1>What training feeds the model: {html.escape(source)}</h1>{''.join(sections)}</body></html>"
    )
    (folder / "index.html").write_text(page, encoding="utf-8")
    return folder / "index.html"
