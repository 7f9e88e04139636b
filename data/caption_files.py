"""Caption corpora published as one JSON object rather than rows -> caption rows (data/formats.py `caption`).

- MSR-VTT style: `{"videos": [{"video_id": "video0", "split": "train", ...}], "sentences": [{"video_id": "video0",
  "caption": "..."}]}`, ~20 captions per clip, the clip stored as `{video_id}.mp4`. One row per caption, or (the
  source's `one_caption_per_clip`) one row per clip with a caption drawn for it, seeded.
- ActivityNet Captions style (dense captions): `{"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86],
  ...], "sentences": ["...", ...]}}`, the video stored as `{id}.mp4`. One row per segment, with the segment's
  start/end as the clip bounds, so each caption trains on the frames it describes.

A video whose annotation is inconsistent (a segment outside the video, timestamps and sentences of different
lengths, a caption naming no listed video) becomes bad rows with the reason, counted against the bad-sample budget.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from vidtune.data.conversation import DataError

Rows = Iterator[tuple[str, dict[str, Any]]]  # (where, row) pairs; a row that is a DataError is a bad one


def caption_layout(data: Any) -> str | None:
    """Which published caption layout a JSON object is in (None: not one of them)."""
    if isinstance(data, dict) and isinstance(data.get("videos"), list) and isinstance(data.get("sentences"), list):
        return "msrvtt"
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "timestamps" in v for v in data.values()):
        return "dense"
    return None


def msrvtt_rows(data: dict[str, Any], name: str, split: str, one_per_clip: bool, seed: int) -> Rows:
    """Caption rows of an MSR-VTT-style collection, in the order of its `videos` list.

    The file's `start time`/`end time` locate the clip in its YouTube original; the published clips are already cut,
    so they are not clip bounds here. Videos carry a `split` (train/validate/test in one file): the source's `split`
    picks one, and a split the file lacks is an error, not an empty corpus.
    """
    videos = [v for v in data["videos"] if isinstance(v, dict) and "video_id" in v]
    splits = sorted({str(v["split"]) for v in videos if "split" in v})
    if splits:
        if split not in splits:
            raise DataError(f"{name}: no video has split {split!r}; the file has {splits} (set the source's split)")
        videos = [v for v in videos if v.get("split") == split]
    captions: dict[str, list[str]] = {str(v["video_id"]): [] for v in videos}
    listed = {str(v["video_id"]) for v in data["videos"] if isinstance(v, dict) and "video_id" in v}
    for i, sentence in enumerate(data["sentences"]):
        video_id = str(sentence.get("video_id")) if isinstance(sentence, dict) else None
        if video_id in captions:
            captions[video_id].append(str(sentence.get("caption", "")))
        elif video_id not in listed:  # other splits' captions are skipped; unknown ids are annotation errors
            yield f"{name} sentence {i}", {"problem": f"caption names video {video_id!r}, which `videos` lacks"}
    for video_id, texts in captions.items():
        row = {"video_id": video_id, "video": f"{video_id}.mp4"}
        if not texts:
            yield f"{name} video {video_id}", {"problem": "no caption in `sentences`"}
        elif one_per_clip:
            caption = random.Random(f"{seed}:{name}:{video_id}").choice(texts)
            yield f"{name} video {video_id}", {**row, "caption": caption}
        else:
            for k, caption in enumerate(texts):
                yield f"{name} video {video_id} caption {k}", {**row, "caption": caption}


def dense_rows(data: dict[str, Any], name: str) -> Rows:
    """One caption row per segment of an ActivityNet-Captions-style file, bounds checked against `duration`."""
    for video_id, entry in data.items():
        at = f"{name} video {video_id}"
        stamps, sentences = entry.get("timestamps") or [], entry.get("sentences") or []
        if len(stamps) != len(sentences):
            yield at, {"problem": f"{len(stamps)} timestamps but {len(sentences)} sentences"}
            continue
        for k, (stamp, sentence) in enumerate(zip(stamps, sentences, strict=True)):
            where = f"{at} segment {k}"
            problem = segment_problem(stamp, entry.get("duration"))
            if problem:
                yield where, {"problem": problem}
                continue
            start, end = float(stamp[0]), float(stamp[1])
            if entry.get("duration") is not None:
                # Published ends often overshoot `duration` by a fraction of a second: keep the part that exists.
                end = min(end, float(entry["duration"]))
            yield (
                where,
                {"video_id": video_id, "video": f"{video_id}.mp4", "caption": sentence, "start": start, "end": end},
            )


def segment_problem(stamp: Any, duration: Any) -> str | None:
    """Why a [start, end] segment cannot be trained on (None when it can)."""
    if not isinstance(stamp, (list, tuple)) or len(stamp) != 2:
        return f"timestamp {stamp!r} is not [start, end]"
    try:
        start, end = float(stamp[0]), float(stamp[1])
        length = None if duration is None else float(duration)
    except (TypeError, ValueError):
        return f"timestamp {stamp!r} or duration {duration!r} is not seconds"
    if start < 0 or end <= start:
        return f"segment [{start:g}, {end:g}]s is empty or starts before the video"
    if length is not None and start >= length:
        return f"segment [{start:g}, {end:g}]s lies outside the video (duration {length:g}s)"
    return None
