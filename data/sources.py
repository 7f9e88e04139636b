"""Corpus sources (json, jsonl, csv, parquet files or a Hugging Face dataset) -> normalised conversations.

Rows are read in Python, renamed through the source's column map, normalised (data/formats.py) and only then
handed to `datasets`, with an explicit schema: corpora in the wild mix types inside one column (an `answer` that is
"B" in one row and 2 in the next), which Arrow's own JSON reader refuses.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from vidtune.data.caption_files import caption_layout, dense_rows, msrvtt_rows
from vidtune.data.conversation import DataError
from vidtune.data.formats import (
    DEFAULT_CAPTION_PROMPT,
    FORMATS,
    RowContext,
    UnknownFormat,
    detect_format,
    normalise_row,
    rejected_answer,
)

FILE_LOADERS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
# Columns that hold lists or dicts; CSV stores them as JSON text.
STRUCTURED_COLUMNS = (
    "conversations", "messages", "videos", "images", "audios", "options", "candidates", "chosen", "rejected",
)  # fmt: skip
URL_PREFIXES = ("http://", "https://", "s3://", "gs://", "hf://", "ftp://")
MAX_ROW_BYTES = 1_000_000  # default of data.max_row_bytes: larger rows are bad rows, never parsed or tokenised

PART_FEATURES = {
    "type": datasets.Value("string"),
    "text": datasets.Value("string"),
    "path": datasets.Value("string"),
    "start_s": datasets.Value("float64"),
    "end_s": datasets.Value("float64"),
}
CONVERSATION_FEATURES = datasets.Features(
    {
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(PART_FEATURES)}),
        "source": datasets.Value("string"),
        "row": datasets.Value("int64"),
        "at": datasets.Value("string"),
        "problem": datasets.Value("string"),  # why a row is unusable (malformed); "" for good rows
        "rejected": datasets.Value("string"),  # preference rows: the rejected answer ("" for other formats)
    }
)


@dataclass
class SourceConfig:
    """One corpus in a recipe's mix."""

    path: str = ""  # a .json/.jsonl/.csv/.parquet file, or a Hugging Face dataset name or folder
    format: str = "auto"  # auto | llava | openai | caption | qa | multiple_choice
    media_root: str | None = None  # relative media paths resolve here; default: the annotation file's folder
    # our field name -> the column name in this corpus, or a list of columns gathered into one list
    # (NExT-QA: `options: [a0, a1, a2, a3, a4]`)
    columns: dict[str, Any] = field(default_factory=dict)
    # the media path built from any columns, relative to media_root (ActivityNet-QA: "v_{video_name}.mp4")
    media_template: str | None = None
    one_caption_per_clip: bool = False  # MSR-VTT-style collections: one row per clip, a caption drawn (seeded)
    split: str = "train"  # split of a Hugging Face dataset
    weight: float = 1.0  # rows are repeated (>1) or subsampled (<1) by this factor, seeded
    num_samples: int | None = None  # exact number of rows to take (repeating if needed); overrides weight
    audio: str | None = None  # auto | on | off: hear this source's videos (data/audio.py); None: data.audio


def source_name(cfg: SourceConfig) -> str:
    return Path(cfg.path).name if Path(cfg.path).suffix else cfg.path


def validate_source(cfg: SourceConfig) -> None:
    if not cfg.path:
        raise DataError("a data source has no `path`")
    if cfg.format != "auto" and cfg.format not in FORMATS:
        raise DataError(f"{cfg.path}: unknown format {cfg.format!r} (expected auto or one of {', '.join(FORMATS)})")
    if cfg.weight <= 0:
        raise DataError(f"{cfg.path}: weight must be > 0, got {cfg.weight}")
    if cfg.num_samples is not None and cfg.num_samples <= 0:
        raise DataError(f"{cfg.path}: num_samples must be > 0, got {cfg.num_samples}")
    for ours, theirs in cfg.columns.items():
        if not isinstance(theirs, str) and not (
            isinstance(theirs, (list, tuple)) and theirs and all(isinstance(c, str) for c in theirs)
        ):
            raise DataError(f"{cfg.path}: columns.{ours} must be a column name or a list of them, got {theirs!r}")
    if cfg.media_template is not None and "{" not in cfg.media_template:
        raise DataError(f"{cfg.path}: media_template {cfg.media_template!r} names no column (write e.g. '{{id}}.mp4')")


# ------------------------------------------------------------------------------------------------ media paths


def media_root_for(cfg: SourceConfig) -> Path | None:
    if cfg.media_root:
        return Path(cfg.media_root).expanduser().resolve()
    path = Path(cfg.path)
    return path.resolve().parent if path.is_file() else None


def make_media_resolver(root: Path | None, at: str):
    """Resolve a media path from an annotation, confined to `root`.

    Annotations are untrusted input: a `../../etc/passwd` or an absolute path elsewhere must not be opened.
    """

    def resolve(raw: str) -> str:
        if "\x00" in raw:  # the OS refuses such a path with a ValueError, which no bad-row handler expects
            raise DataError(f"{at}: media path {raw!r} holds a NUL byte")
        if raw.lower().startswith(URL_PREFIXES):
            raise DataError(f"{at}: media {raw!r} is a URL; download it and point the source's media_root at it")
        if root is None:
            if not os.path.isabs(raw):
                raise DataError(f"{at}: media path {raw!r} is relative; set the source's media_root")
            return str(Path(raw).resolve())
        resolved = (root / raw).resolve()
        if not resolved.is_relative_to(root):
            raise DataError(
                f"{at}: media path {raw!r} lies outside the media root {root} (set the source's media_root)"
            )
        return str(resolved)

    return resolve


# --------------------------------------------------------------------------------------------------- raw rows


TOO_DEEP = "nested too deeply"


def _decode_structured(row: dict[str, Any]) -> dict[str, Any]:
    for key in STRUCTURED_COLUMNS:
        value = row.get(key)
        if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
            try:
                row[key] = json.loads(value)
            except RecursionError:
                return InvalidRow(f"{key}: invalid JSON ({TOO_DEEP})")
    return row


class InvalidRow(dict):
    """A line that is not JSON: carried to the normaliser, which reports it like any other bad row."""

    def __init__(self, problem: str):
        super().__init__()
        self.problem = problem


def _caption_file_rows(data: dict[str, Any], cfg: SourceConfig, seed: int) -> Iterator[tuple[str, int, Any]]:
    name = source_name(cfg)
    if caption_layout(data) == "msrvtt":
        rows = msrvtt_rows(data, name, cfg.split, cfg.one_caption_per_clip, seed)
    else:
        rows = dense_rows(data, name)
    for i, (at, row) in enumerate(rows):
        yield at, i, InvalidRow(row["problem"]) if "problem" in row else row


def iter_raw_rows(
    cfg: SourceConfig, seed: int = 0, max_row_bytes: int = MAX_ROW_BYTES
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(where, row index, row) for every row of a source; `where` is what errors print ("a.jsonl line 3").

    A row that is not JSON, not UTF-8, or larger than `max_row_bytes` comes through as an InvalidRow (a bad row,
    counted like any other) before anything parses or tokenises it: one 50 MB row once took 17 GB to measure."""
    path, name = Path(cfg.path), source_name(cfg)
    loader = FILE_LOADERS.get(path.suffix.lower())
    if loader and not path.is_file():
        raise DataError(f"{cfg.path}: annotation file not found")
    if loader == "json":
        yield from _json_rows(path, name, max_row_bytes, cfg, seed)
    elif loader == "jsonl":
        yield from _jsonl_rows(path, name, max_row_bytes)
    else:
        rows = _library_rows(cfg, loader)
        for i in itertools.count():
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as err:  # a corrupt parquet, an undecodable CSV: the file, not a row, is unreadable
                raise DataError(f"{name}: cannot read the file ({' '.join(str(err).split())[:160]})") from None
            size = len(json.dumps(row, default=str))
            yield (
                f"{name} row {i}",
                i,
                _decode_structured(dict(row)) if size <= max_row_bytes else _too_large(size, max_row_bytes),
            )


def _library_rows(cfg: SourceConfig, loader: str | None) -> Iterator[dict[str, Any]]:
    """Rows of a csv / parquet file through datasets' own readers, or of a Hugging Face dataset (name or folder);
    a generator, so that opening the file fails where reading it does."""
    if loader:
        yield from datasets.load_dataset(loader, data_files=cfg.path, split="train", streaming=True)
    else:
        yield from datasets.load_dataset(cfg.path, split=cfg.split, streaming=True)


def _too_large(size: int, max_row_bytes: int) -> InvalidRow:
    return InvalidRow(f"row of {size:,} bytes exceeds data.max_row_bytes={max_row_bytes:,}")


def _json_rows(
    path: Path, name: str, max_row_bytes: int, cfg: SourceConfig, seed: int
) -> Iterator[tuple[str, int, Any]]:
    # utf-8-sig reads a BOM as what it is; surrogateescape keeps a stray non-UTF-8 byte inside its row, which is
    # then refused alone instead of failing the whole file.
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{name} line {err.lineno}: invalid JSON ({err.msg})") from None
    except RecursionError:
        raise DataError(f"{name}: invalid JSON ({TOO_DEEP})") from None
    if isinstance(rows, dict) and caption_layout(rows):  # MSR-VTT / ActivityNet Captions: one object, not rows
        yield from _caption_file_rows(rows, cfg, seed)
        return
    if not isinstance(rows, list):
        raise DataError(
            f"{name}: expected a JSON list of rows, an MSR-VTT-style {{videos, sentences}} object or "
            f"ActivityNet-Captions-style {{id: {{duration, timestamps, sentences}}}}, got {type(rows).__name__}"
        )
    for i, row in enumerate(rows):
        encoded = json.dumps(row, ensure_ascii=False).encode("utf-8", errors="surrogateescape")
        if len(encoded) > max_row_bytes:
            row = _too_large(len(encoded), max_row_bytes)
        else:
            try:
                encoded.decode("utf-8")
            except UnicodeDecodeError as err:
                row = InvalidRow(f"not UTF-8 text (byte 0x{encoded[err.start]:02x})")
        yield f"{name} row {i}", i, row


def _jsonl_rows(path: Path, name: str, max_row_bytes: int) -> Iterator[tuple[str, int, Any]]:
    with path.open("rb") as lines:
        row_index = 0
        for line_no, raw in enumerate(lines, start=1):
            if line_no == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a BOM: read, not a bad first row
            if not raw.strip():
                continue
            row: Any
            if len(raw) > max_row_bytes:
                row = _too_large(len(raw), max_row_bytes)
            else:
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    row = InvalidRow(f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})")
                except json.JSONDecodeError as err:
                    row = InvalidRow(f"invalid JSON ({err.msg})")
                except RecursionError:  # 200 kB of `[`: one bad row, not a crash of the whole run
                    row = InvalidRow(f"invalid JSON ({TOO_DEEP})")
            yield f"{name} line {line_no}", row_index, row
            row_index += 1


def apply_column_map(row: Any, columns: dict[str, Any], at: str) -> dict[str, Any]:
    """Our field names over the corpus's; a field mapped to a list of columns gets their values as a list."""
    if not isinstance(row, dict):
        raise DataError(f"{at}: a row must be an object, got {type(row).__name__}")
    if not columns:
        return row
    named = {ours: [theirs] if isinstance(theirs, str) else list(theirs) for ours, theirs in columns.items()}
    used = {column for sources in named.values() for column in sources}
    missing = [column for sources in named.values() for column in sources if column not in row]
    if missing:
        raise DataError(f"{at}: column map names column(s) {missing} that the row lacks; it has {sorted(row)}")
    renamed = {k: v for k, v in row.items() if k not in used}
    for ours, sources in named.items():
        renamed[ours] = row[sources[0]] if isinstance(columns[ours], str) else [row[c] for c in sources]
    return renamed


def apply_media_template(fields: dict[str, Any], raw: dict[str, Any], template: str | None, at: str) -> None:
    """Set `video` from the source's media_template, filled from the row's columns (its own names or ours)."""
    if template is None:
        return
    try:
        fields["video"] = template.format_map({**raw, **fields})
    except KeyError as err:
        raise DataError(
            f"{at}: media_template {template!r} names column {err.args[0]!r}, which the row lacks"
        ) from None
    except (ValueError, IndexError, AttributeError) as err:
        raise DataError(f"{at}: media_template {template!r} cannot be filled: {err}") from None


def row_fields(raw: Any, cfg: SourceConfig, at: str) -> dict[str, Any]:
    """A raw row under our field names (column map, media template); a row unreadable as such raises."""
    if isinstance(raw, InvalidRow):
        raise DataError(f"{at}: {raw.problem}")
    fields = apply_column_map(raw, dict(cfg.columns), at)
    apply_media_template(fields, raw, cfg.media_template, at)
    return fields


def iter_conversations(
    cfg: SourceConfig,
    caption_prompts: Sequence[str] = (DEFAULT_CAPTION_PROMPT,),
    seed: int = 0,
    keep_bad: bool = False,
    max_row_bytes: int = MAX_ROW_BYTES,
) -> Iterator[dict[str, Any]]:
    """Normalised rows of one source: {messages, source, row, at, problem}. A malformed row raises, or with
    keep_bad comes through with empty messages and its `problem`, for the bad-sample policy to count in order."""
    validate_source(cfg)
    root = media_root_for(cfg)
    fmt = None if cfg.format == "auto" else cfg.format
    for at, index, raw in iter_raw_rows(cfg, seed, max_row_bytes):
        row = {"source": source_name(cfg), "row": index, "at": at}
        try:
            fields = row_fields(raw, cfg, at)
            if fmt is None:  # a first row in an unknown shape is a wrong format or column map, not a bad row
                fmt = detect_format(list(fields), at)
            ctx = RowContext(at, make_media_resolver(root, at), tuple(caption_prompts), seed, index)
            messages = normalise_row(fields, fmt, ctx)
            rejected = rejected_answer(fields, ctx) if fmt == "preference" else ""
            yield {**row, "messages": messages, "problem": "", "rejected": rejected}
        except DataError as err:
            if not keep_bad or isinstance(err, UnknownFormat):  # one configuration error, said once
                raise
            yield {**row, "messages": [], "problem": str(err).removeprefix(f"{at}: "), "rejected": ""}


# ---------------------------------------------------------------------------------------------- mixing, loading


def resample_indices(num_rows: int, cfg: SourceConfig, seed: int) -> list[int] | None:
    """Row indices realising the source's weight or sample count (None: all rows once, in order)."""
    target = cfg.num_samples if cfg.num_samples is not None else round(num_rows * cfg.weight)
    if target == num_rows and cfg.num_samples is None:
        return None
    rng = random.Random(f"{seed}:{cfg.path}")
    indices: list[int] = []
    while len(indices) < target:  # whole passes first, then a seeded subset, so no row repeats before all are used
        indices.extend(rng.sample(range(num_rows), num_rows))
    return sorted(indices[:target])


def _generate(
    sources: list[SourceConfig], caption_prompts: list[str], seed: int, max_row_bytes: int = MAX_ROW_BYTES
) -> Iterator[dict[str, Any]]:
    for cfg in sources:
        yield from iter_conversations(cfg, caption_prompts, seed, keep_bad=True, max_row_bytes=max_row_bytes)


def load_conversations(
    sources: Sequence[SourceConfig],
    caption_prompts: Sequence[str] = (DEFAULT_CAPTION_PROMPT,),
    seed: int = 0,
    keep_bad: bool = False,
    max_row_bytes: int = MAX_ROW_BYTES,
) -> datasets.Dataset:
    """All sources normalised and mixed into one in-memory `datasets.Dataset` (text only: cheap to rebuild)."""
    parts = []
    for cfg in sources:
        rows = list(iter_conversations(cfg, caption_prompts, seed, keep_bad, max_row_bytes))
        if not rows:
            raise DataError(f"{cfg.path}: the source has no rows")
        ds = datasets.Dataset.from_list(rows, features=CONVERSATION_FEATURES)
        indices = resample_indices(len(ds), cfg, seed)
        parts.append(ds if indices is None else ds.select(indices))
    if not parts:
        raise DataError("the recipe lists no data sources")
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def stream_conversations(
    sources: Sequence[SourceConfig],
    caption_prompts: Sequence[str] = (DEFAULT_CAPTION_PROMPT,),
    seed: int = 0,
    max_row_bytes: int = MAX_ROW_BYTES,
) -> datasets.IterableDataset:
    """The same rows as a streaming dataset, for corpora too large to prepare on disk.

    Sources are interleaved with probabilities proportional to their weights (sample counts need a known length
    and are refused here).
    """
    if any(cfg.num_samples is not None for cfg in sources):
        raise DataError("num_samples needs the corpus length; use weight with streaming sources")
    streams = [
        datasets.IterableDataset.from_generator(
            _generate,
            gen_kwargs={
                "sources": [cfg],
                "caption_prompts": list(caption_prompts),
                "seed": seed,
                "max_row_bytes": max_row_bytes,
            },
            features=CONVERSATION_FEATURES,
        )
        for cfg in sources
    ]
    if len(streams) == 1:
        return streams[0]
    total = sum(cfg.weight for cfg in sources)
    return datasets.interleave_datasets(
        streams, probabilities=[cfg.weight / total for cfg in sources], seed=seed, stopping_strategy="all_exhausted"
    )
