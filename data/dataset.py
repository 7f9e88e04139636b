"""Normalised conversations -> measured, filtered rows -> model-ready examples for a DataLoader.

    load_conversations (data/sources.py)   rows: messages, source, row, at
      -> measure (datasets.map)            + num_tokens, num_media_tokens, num_label_tokens, drop_reason
      -> keep rows that fit                 (dropped ones counted by reason)
      -> SFTDataset[(epoch, row)]           decode + sample frames (seeded by seed/epoch/row), build with processor

Measuring needs no pixels: videos are only indexed (frame count, fps) and images only read for their size, so a
sample that cannot fit max_length is dropped before any GPU time, never truncated mid-video or mid-answer.
"""

from __future__ import annotations

import os
import random
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import numpy as np
import torch

from vidtune.data.audio import (
    AUDIO_MODES,
    Audio,
    has_audio_stream,
    load_clip_audio,
    load_sound,
    sound_span,
    span_of,
)
from vidtune.data.conversation import DataError, Message, media_parts
from vidtune.data.examples import LABEL_TURNS, ExampleBuilder, TokenCount, answer_replaced, with_time_instructions
from vidtune.data.families import ModelFamily
from vidtune.data.formats import DEFAULT_CAPTION_PROMPT
from vidtune.data.frame_cache import FrameCache, FrameCacheConfig
from vidtune.data.measure_cache import MeasureCache, settings_fingerprint
from vidtune.data.quality import MAX_FRAME_PIXELS, BadSampleConfig, BadSampleLog, time_limit, validate_bad_samples
from vidtune.data.sources import (
    MAX_ROW_BYTES,
    SourceConfig,
    load_conversations,
    source_name,
    stream_conversations,
)
from vidtune.data.video import (
    Clip,
    SamplingConfig,
    VideoError,
    VideoInfo,
    check_clip,
    image_size,
    load_clip,
    load_image,
    probe_video,
    sample_frame_indices,
    time_instruction,
    timestamps_for,
    validate_sampling,
)


@dataclass
class DataConfig:
    """What to train on and how each sample becomes model input."""

    sources: list[SourceConfig] = field(default_factory=list)  # training corpora, mixed by weight / num_samples
    eval_sources: list[SourceConfig] = field(default_factory=list)  # held-out corpora for eval loss
    eval_fraction: float = 0.0  # or: hold out this fraction of the training rows (seeded)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_length: int = 4096  # tokens per sample, video/image tokens included; longer samples are dropped
    label_turns: str = "all"  # all: learn every assistant turn | last: only the final one
    time_instruction: bool = False  # prepend "The video lasts 9.7 seconds; 8 frames were sampled at ..." per video
    # hear each video's sound for its sampled span: auto (when the model family hears) | on (refuse a family that
    # does not) | off; a source's own `audio` overrides it
    audio: str = "auto"
    caption_prompts: list[str] = field(default_factory=lambda: [DEFAULT_CAPTION_PROMPT])  # sampled per row
    streaming: bool = False  # stream corpora too large to prepare (measured and filtered on the fly)
    stream_shuffle_buffer: int = 1000  # streaming: rows held in the seeded shuffle buffer (1 = file order)
    # DataLoader worker processes per training process (decode + processing); unset: sized to the machine
    # (default_num_workers)
    num_workers: int | None = None
    max_row_bytes: int = MAX_ROW_BYTES  # larger annotation rows are bad rows, dropped before any parsing
    bad_samples: BadSampleConfig = field(default_factory=BadSampleConfig)  # what to do with unreadable samples
    frame_cache: FrameCacheConfig = field(default_factory=FrameCacheConfig)  # reuse decoded frames across epochs


def heard_sources(cfg: DataConfig, family: ModelFamily) -> set[str]:
    """The sources whose videos are heard with their sound: data.audio or the source's own `audio` is auto or on,
    and the family hears (`on` refuses a family that does not)."""
    heard = set()
    for source in [*cfg.sources, *cfg.eval_sources]:
        mode = source.audio or cfg.audio
        if mode not in AUDIO_MODES:
            raise DataError(f"{source.path}: audio must be one of {', '.join(AUDIO_MODES)}, got {mode!r}")
        if mode == "on" and not family.hears:
            raise DataError(f"{source.path}: audio=on, but {family.name} does not hear sound (use auto or off)")
        if mode != "off" and family.hears:
            heard.add(source_name(source))
    return heard


def audio_rate_for(cfg: DataConfig, family: ModelFamily, processor: Any) -> int | None:
    """The rate videos are heard at in this run (the family's feature extractor's), None when none is."""
    if cfg.audio not in AUDIO_MODES:
        raise DataError(f"data.audio must be one of {', '.join(AUDIO_MODES)}, got {cfg.audio!r}")
    return family.audio_sampling_rate(processor) if heard_sources(cfg, family) else None


def default_num_workers(processes_per_node: int) -> int:
    """DataLoader workers per training process when data.num_workers is unset: the cores this process may run on
    (its CPU affinity, which schedulers such as SLURM set, not the machine's count), shared by the training
    processes of the node, one core kept for each main process; at least one, so decoding never runs in the
    main process between steps."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, processes_per_node) - 1)


def validate_data(cfg: DataConfig) -> None:
    if not cfg.sources:
        raise DataError("data.sources is empty: list at least one corpus")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.eval_fraction and cfg.eval_sources:
        raise DataError("set either data.eval_sources or data.eval_fraction, not both")
    if cfg.max_length < 16:
        raise DataError(f"data.max_length must be at least 16 tokens, got {cfg.max_length}")
    if cfg.label_turns not in LABEL_TURNS:
        raise DataError(f"data.label_turns must be one of {', '.join(LABEL_TURNS)}, got {cfg.label_turns!r}")
    if not cfg.caption_prompts:
        raise DataError("data.caption_prompts is empty")
    if cfg.stream_shuffle_buffer < 1:
        raise DataError(f"data.stream_shuffle_buffer must be >= 1, got {cfg.stream_shuffle_buffer}")
    if (cfg.num_workers is not None and cfg.num_workers < 0) or cfg.max_row_bytes < 1:
        raise DataError(
            f"data.num_workers must be >= 0 and max_row_bytes >= 1, got {cfg.num_workers}, {cfg.max_row_bytes}"
        )
    validate_sampling(cfg.sampling)
    validate_bad_samples(cfg.bad_samples)


@dataclass
class DropReport:
    """What preparation dropped, by reason, with a few examples each (for logs and `vidtune check`)."""

    kept: int = 0
    kept_by_source: dict[str, int] = field(default_factory=dict)
    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    bad: BadSampleLog = field(default_factory=BadSampleLog)  # unreadable media, malformed rows

    def add(self, reason: str, at: str) -> None:
        kind = reason.split(" (")[0] if "exceed max_length" not in reason else "longer than max_length"
        self.reasons[kind] += 1
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(f"{at}: {reason}")

    @property
    def dropped(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        bad = f"; {self.bad.summary()}" if self.bad.bad else ""
        if not self.dropped:
            return f"{self.kept} samples kept, none dropped for length{bad}"
        parts = "; ".join(f"{n} {kind} (e.g. {self.examples[kind][0]})" for kind, n in self.reasons.most_common())
        return f"{self.kept} samples kept, {self.dropped} dropped: {parts}{bad}"


# --------------------------------------------------------------------------------------------------- measuring


class Measurer:
    """Token counts of a row without decoding pixels (videos indexed once per path, images read for size)."""

    def __init__(self, builder: ExampleBuilder, cfg: DataConfig, cache: MeasureCache | None = None):
        self.builder, self.cfg, self.cache = builder, cfg, cache
        self._video_info: dict[str, VideoInfo] = {}
        self.heard = heard_sources(cfg, builder.family) if builder.audio_rate else set()

    def video_info(self, path: str) -> VideoInfo:
        if path not in self._video_info:
            self._video_info[path] = probe_video(path, self.cfg.sampling.backend)
        return self._video_info[path]

    def media_tokens(self, messages: list[Message], heard: bool = False) -> tuple[list[int], dict[int, str]]:
        """Tokens per media item, and the time instruction each video gets (with centre-of-segment sampling).
        `heard`: the row's source is heard; when one of its videos has sound, each video's span joins its tokens.
        A sound file costs its span's tokens (its length from its header: nothing is decoded)."""
        tokens, instructions = [], {}
        spans: list[tuple[float, float]] = []  # per video
        videos: list[tuple[int, str]] = []  # (media index, path)
        for index, part in enumerate(media_parts(messages)):
            path = part["path"] or ""
            quality = self.cfg.bad_samples
            if part["type"] == "audio":
                start_s, end_s = sound_span(path, part["start_s"], part["end_s"])
                tokens.append(self.builder.tokens.audio_tokens(end_s - start_s))
                continue
            if part["type"] == "image":
                height, width = image_size(path)
                if height * width > quality.max_frame_pixels:  # the header alone: pixels are never decoded
                    raise VideoError(
                        f"{path}: {width}x{height} image exceeds the {quality.max_frame_pixels:,}-pixel limit"
                    )
                tokens.append(self.builder.tokens.image_tokens(height, width))
                continue
            info = self.video_info(path)
            videos.append((len(tokens), path))
            check_clip(
                path,
                info,
                self.cfg.sampling,
                part["start_s"],
                part["end_s"],
                quality.max_frame_pixels,
                quality.too_short,
            )
            indices = sample_frame_indices(info, self.cfg.sampling, part["start_s"], part["end_s"], None, path)
            timestamps = timestamps_for(indices, info)
            tokens.append(self.builder.tokens.video_tokens(len(indices), info.height, info.width, timestamps))
            spans.append(span_of(info, indices))
            if self.cfg.time_instruction:
                instructions[index] = time_instruction(info, timestamps, part["start_s"], part["end_s"])
        if heard and any(has_audio_stream(path) for _, path in videos):  # the sample is heard (silence: none)
            for (position, _), (start_s, end_s) in zip(videos, spans, strict=True):
                tokens[position] += self.builder.tokens.video_audio_tokens(end_s - start_s)
        return tokens, instructions

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        """Token counts, a drop reason (too long, nothing to learn) or a problem (unreadable media: a bad sample)."""
        if self.cache is None:
            return self.measure(row)
        key = self.cache.key(row, [part["path"] or "" for part in media_parts(row["messages"])])
        measured = self.cache.get(key)
        if measured is None:
            measured = self.measure(row)
            self.cache.put_many([(key, measured)])
        return measured

    def measure_batch(self, columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """`__call__` over a batch of rows (datasets' batched map: columns in, columns out)."""
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        if self.cache is None:
            results = [self(row) for row in rows]
        else:  # one write transaction per batch, after measuring it: parallel processes never wait on each other
            keys = [self.cache.key(row, [part["path"] or "" for part in media_parts(row["messages"])]) for row in rows]
            results = [self.cache.get(key) or {} for key in keys]
            missing = [
                (key, self.measure(row)) for key, row, found in zip(keys, rows, results, strict=True) if not found
            ]
            self.cache.put_many(missing)
            fresh = iter(measured for _, measured in missing)
            results = [found or next(fresh) for found in results]
        return {key: [result[key] for result in results] for key in results[0]} if results else {}

    def measure(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("problem"):  # malformed when it was read
            return {
                "num_tokens": 0,
                "num_media_tokens": 0,
                "num_label_tokens": 0,
                "drop_reason": "",
                "problem": row["problem"],
            }
        # a configuration error, not a bad sample (rows built in code may carry no `at`)
        self.builder.refuse_unheard(row["messages"], row.get("at") or "a row")
        try:
            tokens, instructions = self.media_tokens(row["messages"], row.get("source") in self.heard)
        except VideoError as err:
            problem = {"drop_reason": "", "problem": str(err)}
            return {"num_tokens": 0, "num_media_tokens": 0, "num_label_tokens": 0, **problem}
        messages = with_time_instructions(row["messages"], instructions)
        count = self.builder.count(messages, tokens)
        if row.get("rejected"):  # a preference pair: both answers must fit (and have tokens to learn)
            other = self.builder.count(answer_replaced(messages, row["rejected"]), tokens)
            count = TokenCount(max(count.total, other.total), count.media, min(count.labels, other.labels))
        return {
            "num_tokens": count.total,
            "num_media_tokens": count.media,
            "num_label_tokens": count.labels,
            "drop_reason": count.drop_reason(self.cfg.max_length) or "",
            "problem": "",
        }


ROWS_PER_MEASURING_PROCESS = 1000  # fewer: one process (starting more costs seconds)


def measuring_processes(num_rows: int) -> int | None:
    """Parallel measuring processes for a corpus: one per CPU core, each with enough rows to pay for its start."""
    processes = min(len(os.sched_getaffinity(0)), num_rows // ROWS_PER_MEASURING_PROCESS)
    return processes if processes > 1 else None


def cached_measurer(builder: ExampleBuilder, cfg: DataConfig) -> Measurer:
    """A Measurer whose results are kept on disk (data/measure_cache.py), keyed by all they depend on."""
    quality = cfg.bad_samples
    data_settings = {
        "sampling": asdict(cfg.sampling),
        "max_length": cfg.max_length,
        "time_instruction": cfg.time_instruction,
        "audio_rate": builder.audio_rate,
        "limits": [quality.max_frame_pixels, quality.too_short],
    }
    settings = settings_fingerprint(builder.processor, builder.chat_template, builder.label_turns, data_settings)
    return Measurer(builder, cfg, MeasureCache(settings))


def measure_and_filter(
    rows: datasets.Dataset, measurer: Measurer, bad: BadSampleLog | None = None, num_proc: int | None = None
) -> tuple[datasets.Dataset, DropReport]:
    """Measure every row; drop over-long ones (counted by reason) and bad ones (within the bad-sample budget)."""
    processes = num_proc or measuring_processes(len(rows))
    if measurer.cache is None:
        measured = rows.map(measurer, num_proc=processes, desc="measuring samples")
    else:
        # Batched: on a relaunch the per-row cost is a cache lookup, so datasets' per-row overhead would dominate.
        # The measure cache, not datasets' own, decides what is reused (it checks the files): a fresh fingerprint
        # also spares hashing the measurer (its tokenizer), which took most of a relaunch's fixed cost.
        measured = rows.map(
            measurer.measure_batch,
            batched=True,
            batch_size=500,
            num_proc=processes,
            desc="measuring samples",
            new_fingerprint=uuid.uuid4().hex,
        )
    report = DropReport(bad=bad if bad is not None else BadSampleLog(measurer.cfg.bad_samples))
    for reason, problem, at in zip(measured["drop_reason"], measured["problem"], measured["at"], strict=True):
        if problem:
            report.bad.add(at, problem)
            continue
        report.bad.good()
        if reason:
            report.add(reason, at)
    report.bad.check("data")
    kept = measured.filter(lambda reason, problem: not reason and not problem, input_columns=["drop_reason", "problem"])
    report.kept = len(kept)
    report.kept_by_source = dict(Counter(kept["source"]))
    if report.kept == 0:
        raise DataError(f"no sample fits: {report.summary()}")
    return kept, report


def split_eval(rows: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    indices = list(range(len(rows)))
    random.Random(seed).shuffle(indices)
    num_eval = max(1, round(len(rows) * fraction))
    return rows.select(sorted(indices[num_eval:])), rows.select(sorted(indices[:num_eval]))


def prepare_eval_rows(
    cfg: DataConfig, builder: ExampleBuilder, seed: int, measured: bool = True
) -> datasets.Dataset | None:
    """Held-out rows from eval_sources (streaming runs hold nothing out of the stream)."""
    if not cfg.eval_sources:
        return None
    bad = BadSampleLog(cfg.bad_samples)
    rows = load_conversations(
        cfg.eval_sources, cfg.caption_prompts, seed, keep_bad=True, max_row_bytes=cfg.max_row_bytes
    )
    if not measured:
        return rows
    return measure_and_filter(rows, cached_measurer(builder, cfg), bad)[0]


def prepare_rows(
    cfg: DataConfig, builder: ExampleBuilder, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None, DropReport]:
    """Training rows, evaluation rows (or None) and the training drop report (length drops and bad samples)."""
    measurer = cached_measurer(builder, cfg)
    bad = BadSampleLog(cfg.bad_samples)
    train_rows = load_conversations(
        cfg.sources, cfg.caption_prompts, seed, keep_bad=True, max_row_bytes=cfg.max_row_bytes
    )
    eval_rows = prepare_eval_rows(cfg, builder, seed, measured=False)
    if cfg.eval_fraction:
        train_rows, eval_rows = split_eval(train_rows, cfg.eval_fraction, seed)
    train_rows, report = measure_and_filter(train_rows, measurer, bad)
    if eval_rows is not None:
        eval_rows, _ = measure_and_filter(eval_rows, measurer)
    return train_rows, eval_rows, report


# ---------------------------------------------------------------------------------------------------- examples


def load_media(
    messages: list[Message],
    sampling: SamplingConfig,
    with_time_instruction: bool,
    rng: np.random.Generator | None,
    decode_timeout_s: float = 120.0,
    shortest_edge: int | None = None,
    cache: FrameCache | None = None,
    record: list[tuple[str, Clip]] | None = None,
    max_frame_pixels: int = MAX_FRAME_PIXELS,
    audio_rate: int | None = None,
    sound_rate: int | None = None,
) -> tuple[dict[int, np.ndarray | Clip | Audio], dict[int, str]]:
    """Decoded pixels per media index (conversation order), and each video's time instruction when asked for.
    Frames are decoded at the model's input size (`shortest_edge`), from the frame cache when there is one;
    `record` (when given) collects each video's (path, clip): its times and the decoder that served it.
    With `audio_rate`, each clip also carries the sound of its sampled span (`clip.audio`; None when the file has
    no audio stream). Sound files (audio parts) are decoded at `sound_rate` (ExampleBuilder.sound_rate)."""
    media: dict[int, np.ndarray | Clip | Audio] = {}
    instructions = {}
    for index, part in enumerate(media_parts(messages)):
        path = part["path"] or ""
        if part["type"] == "audio":
            if not sound_rate:  # (rows with sound files are refused for a family that does not hear, earlier)
                raise DataError(f"{path}: a sound file, but no rate to hear it at (the model does not hear sound)")
            with time_limit(decode_timeout_s, path):
                media[index] = load_sound(path, sound_rate, part["start_s"], part["end_s"])
            continue
        if part["type"] == "image":
            media[index] = load_image(path, max_frame_pixels)
            continue
        with time_limit(decode_timeout_s, path):
            if cache is not None:
                clip = cache.load(path, part["start_s"], part["end_s"], rng)
            else:
                clip = load_clip(
                    path, sampling, part["start_s"], part["end_s"], rng, decode_timeout_s, shortest_edge,
                    max_frame_pixels,
                )  # fmt: skip
        if audio_rate:
            with time_limit(decode_timeout_s, path):
                clip.audio = load_clip_audio(path, clip, audio_rate)
        media[index] = clip  # frames with their timestamps (time-aware families hand these to the processor)
        if record is not None:
            record.append((path, clip))
        if with_time_instruction:
            instructions[index] = time_instruction(clip.info, clip.timestamps_s, part["start_s"], part["end_s"])
    return media, instructions


class ExampleMaker:
    """Decode a row's media and build its example; jitter (training) is seeded by (seed, epoch, row)."""

    def __init__(self, builder: ExampleBuilder, cfg: DataConfig, seed: int, train: bool):
        self.builder, self.cfg, self.seed, self.train = builder, cfg, seed, train
        self.heard = heard_sources(cfg, builder.family) if builder.audio_rate else set()
        self._cache: FrameCache | None = None

    @property
    def cache(self) -> FrameCache | None:
        """Opened lazily, so each DataLoader worker holds its own."""
        if self._cache is None and self.cfg.frame_cache.dir:
            self._cache = FrameCache(
                self.cfg.frame_cache, self.cfg.sampling, self.builder.frame_px, self.cfg.bad_samples.max_frame_pixels
            )
        return self._cache

    def make(self, row: dict[str, Any], epoch: int, row_index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, epoch, row_index]) if self.train else None
        example = self._build(row, rng)
        if len(example["input_ids"]) > self.cfg.max_length and rng is not None:
            # Jittered timestamps can lengthen the time instruction by a token or two; the centre sampling that
            # measuring used is known to fit.
            example = self._build(row, None)
        if len(example["input_ids"]) > self.cfg.max_length:
            raise DataError(
                f"{row['at']}: built {len(example['input_ids'])} tokens > max_length, measured "
                f"{row.get('num_tokens')} (the video changed since it was measured?)"
            )
        return example

    def _build(self, row: dict[str, Any], rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        media, instructions = self.decode(row, rng)
        return self.builder.build(with_time_instructions(row["messages"], instructions), media)

    def decode(self, row: dict[str, Any], rng: np.random.Generator | None) -> tuple[Any, Any]:
        """The row's media, sampled and decoded under the data limits (time, pixels), and its time instructions;
        every example maker (SFT, preference pairs, rollout prompts) decodes through here."""
        try:
            return load_media(
                row["messages"],
                self.cfg.sampling,
                self.cfg.time_instruction,
                rng,
                self.cfg.bad_samples.decode_timeout_s,
                self.builder.frame_px,
                self.cache,
                max_frame_pixels=self.cfg.bad_samples.max_frame_pixels,
                audio_rate=self.builder.audio_rate if row.get("source") in self.heard else None,
                sound_rate=self.builder.sound_rate,
            )
        except DataError as err:  # unreadable media, decode time limit, pixel limit
            raise DataError(f"{row['at']}: {err}") from None


class SFTDataset(torch.utils.data.Dataset):
    """Map-style: indexed by (epoch, row) so the frame jitter of a row differs per epoch yet is reproducible on
    resume and identical whichever worker or rank builds it.

    A row that measured fine but fails now (a file truncated or deleted since, a decode that times out) is replaced
    by the next rows, deterministically; the example carries the reasons (`skipped`) for the loop to count against
    the bad-sample budget. Batches stay full, so every rank keeps the same number of steps.
    """

    def __init__(self, rows: datasets.Dataset, maker: ExampleMaker):
        self.rows, self.maker = rows, maker

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        return list(self.rows["num_tokens"])

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, row = key if isinstance(key, tuple) else (0, key)
        skipped: list[str] = []
        for attempt in range(min(self.maker.cfg.bad_samples.max_bad_in_a_row, len(self.rows))):
            index = (row + attempt) % len(self.rows)
            try:
                example: dict[str, Any] = self.maker.make(self.rows[index], epoch, index)
            except DataError as err:
                if self.maker.cfg.bad_samples.policy == "error":
                    raise
                skipped.append(str(err))
                continue
            example["skipped"] = skipped
            return example
        raise DataError(f"{len(skipped)} samples in a row failed to load (max_bad_in_a_row), e.g. {skipped[0]}")


def replace_failed(skipped: list[str], reason: str, cfg: BadSampleConfig) -> list[str]:
    """A sample that failed to load is replaced by the next one (its reason rides on the replacement, which the
    loop counts against the bad-sample budget); policy "error" stops at it, and so do max_bad_in_a_row at once."""
    if cfg.policy == "error":
        raise DataError(reason)
    skipped = [*skipped, reason]
    if len(skipped) >= cfg.max_bad_in_a_row:
        raise DataError(f"{len(skipped)} samples in a row failed to load (max_bad_in_a_row), e.g. {skipped[0]}")
    return skipped


class StreamingSFTDataset(torch.utils.data.IterableDataset):
    """For corpora too large to prepare: rows are measured and filtered as they stream.

    The stream is shuffled through a seeded buffer (`data.stream_shuffle_buffer` rows, reshuffled every pass) and
    split per rank *and* DataLoader worker (every N-th row, N = ranks x workers), so a one-file stream feeds every
    worker. With repeat, it is read again and again (pass after pass), so every rank always has a next batch:
    shards that lose different numbers of rows to filtering never leave one rank waiting for another.
    `skip_batches(n)` resumes after n batches: the skipped rows are measured (to know which are kept) but never
    decoded.
    """

    def __init__(
        self,
        cfg: DataConfig,
        measurer: Measurer,
        maker: ExampleMaker,
        rank: int,
        world_size: int,
        seed: int,
        repeat: bool = False,
        batch_size: int = 1,
    ):
        stream = stream_conversations(cfg.sources, cfg.caption_prompts, seed, cfg.max_row_bytes)
        if cfg.stream_shuffle_buffer > 1:
            stream = stream.shuffle(seed=seed, buffer_size=cfg.stream_shuffle_buffer)
        self.stream, self.measurer, self.maker, self.repeat = stream, measurer, maker, repeat
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.batches_to_skip = 0
        self.dropped: Counter = Counter()
        self.bad = BadSampleLog(cfg.bad_samples)

    def skip_batches(self, num_batches: int) -> None:
        """Resume after `num_batches` batches of this rank's loader (set before its workers start)."""
        self.batches_to_skip = num_batches

    def _rows(self, shard: int, num_shards: int, epoch: int) -> Iterator[dict[str, Any]]:
        from datasets.distributed import split_dataset_by_node

        part = split_dataset_by_node(self.stream, rank=shard, world_size=num_shards)
        part.set_epoch(epoch)
        # .iter() rather than plain iteration: inside a DataLoader worker, `datasets` would hand out whole shards
        # to workers itself, and a one-file stream (one shard) would leave every worker but the first with nothing.
        for batch in part.iter(batch_size=64):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns), strict=True):
                yield dict(zip(columns, values, strict=True))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        shard, num_shards = self.rank * num_workers + worker_id, self.world_size * num_workers
        # The DataLoader takes batches from its workers in turn: this worker made batches id, id + W, id + 2W, ...
        to_skip = len(range(worker_id, self.batches_to_skip, num_workers)) * self.batch_size
        epoch, skipped = 0, list[str]()
        while True:
            kept = 0
            for index, row in enumerate(self._rows(shard, num_shards, epoch)):
                measured = self.measurer(row)
                if measured["problem"]:
                    self.bad.add(row["at"], measured["problem"])
                    self.bad.check("streamed data")
                    continue
                self.bad.good()
                if measured["drop_reason"]:
                    self.dropped[measured["drop_reason"].split(" (")[0]] += 1
                    continue
                kept += 1
                if to_skip:  # trained on before the resume: not decoded again
                    to_skip -= 1
                    continue
                try:
                    example = self.maker.make({**row, **measured}, epoch, index)
                except DataError as err:  # measured fine, fails now: replaced by the next row, as SFTDataset does
                    skipped = replace_failed(skipped, str(err), self.maker.cfg.bad_samples)
                    continue
                example["skipped"], skipped = skipped, []
                yield example
            if not self.repeat:
                return
            if kept == 0:
                raise DataError(
                    f"rank {self.rank}, DataLoader worker {worker_id}: its share of the stream holds no sample "
                    "that fits"
                )
            epoch += 1


# ----------------------------------------------------------------------------------------------------- batching


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (epoch, row) keys in an order that is a pure function of (seed, epoch), so a resumed run replays
    it exactly. With group_by_length, rows of similar token count (video tokens included) share batches: shuffled
    mega-batches of 64 batches are sorted by length and cut, and the batches shuffled again."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        group_by_length: bool = False,
        drop_last: bool = False,
    ):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.shuffle, self.group_by_length, self.drop_last = shuffle, group_by_length, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths)).tolist() if self.shuffle else list(range(len(self.lengths)))
        if self.group_by_length:
            mega = self.batch_size * 64
            order = [
                i
                for s in range(0, len(order), mega)
                for i in sorted(order[s : s + mega], key=lambda i: -self.lengths[i])
            ]
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.group_by_length and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches():
            yield [(self.epoch, i) for i in batch]

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)
