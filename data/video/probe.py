"""Probing: every frame's presentation time from the demuxed packets (PyAV, no decoding), the display rotation,
and a clear reason for files no backend can read (no video stream, unsupported codec, truncated, zero duration).

Durations and timestamps come from the stream's real pts, the first frame at 0 s, never from index / average fps
(variable-rate phone clips). AVI stores no presentation times: there a frame is known by its place in order.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Any

from vidtune.data.video.base import CONTAINER_DEMUXERS, StreamIndex, VideoError, VideoInfo, check_file


def open_container(path: str, demuxers: str = CONTAINER_DEMUXERS, kind: str = "video") -> Any:
    """The file opened by PyAV, held to `demuxers` (sound files: data/audio.py's wider list)."""
    import av

    try:
        return av.open(path, options={"format_whitelist": demuxers})
    except (av.FFmpegError, OSError) as err:
        raise VideoError(f"{path}: cannot open it as {kind} ({str(err)[:120]})") from None


MAX_PROBE_DECODE_PIXELS = 8192 * 8192


def probe_stream(path: str) -> StreamIndex:
    """The stream's index; kept per file version in each process (a DataLoader worker reads a video every epoch)."""
    check_file(path)
    stat = os.stat(path)
    return _probe(os.path.realpath(path), stat.st_size, stat.st_mtime_ns, path)


@functools.lru_cache(maxsize=1024)
def _probe(real_path: str, size: int, mtime_ns: int, path: str) -> StreamIndex:
    container = open_container(path)
    try:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream (the file holds {_streams(container)})")
        stream = container.streams.video[0]
        codec = stream.codec_context.name or "unknown"
        if stream.codec_context.codec is None or not stream.codec_context.codec.is_decoder:
            raise VideoError(f"{path}: codec {codec} not supported by any installed backend")
        pts, keyframes, intra_only = _demux(container, stream, path)
        return _index(container, stream, path, pts, keyframes, intra_only)
    finally:
        container.close()


def _streams(container: Any) -> str:
    kinds = [s.type for s in container.streams]
    return ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds)) or "no streams"


def _demux(container: Any, stream: Any, path: str) -> tuple[list[int], list[int], bool]:
    pts, keyframes, intra_only = [], [], True
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet at the end
                continue
            value = packet.pts if packet.pts is not None else packet.dts
            if value is None:
                continue
            pts.append(value)
            if packet.is_keyframe:
                keyframes.append(value)
            else:
                intra_only = False
    except Exception as err:
        raise VideoError(f"{path}: truncated or damaged data ({str(err)[:120]})") from None
    declared = stream.frames or 0  # MP4 and AVI headers list every frame: fewer packets means a cut file
    if declared and len(pts) < declared:
        raise VideoError(f"{path}: truncated data ({len(pts)} of the {declared} frames its header lists are present)")
    if not pts:
        raise VideoError(f"{path}: the decoder finds no video frames")
    return sorted(pts), sorted(keyframes) or sorted(pts)[:1], intra_only  # decode order -> presentation order


def _rotation(stream: Any, container: Any) -> int:
    """Clockwise display rotation from the first frame's display matrix (PyAV exposes it per frame)."""
    try:
        frame = next(container.decode(stream))
    except Exception:
        return 0
    angle = round(-float(getattr(frame, "rotation", 0) or 0)) % 360  # FFmpeg's angle is counter-clockwise
    return angle if angle in (90, 180, 270) else 0


def _index(container: Any, stream: Any, path: str, pts: list[int], keyframes: list[int], intra_only: bool):
    repeats = sum(1 for a, b in itertools.pairwise(pts) if a >= b)
    if repeats:  # zero-duration frames: no timestamp points at one frame, seeks would lie
        raise VideoError(
            f"{path}: invalid frame timestamps ({repeats} of {len(pts)} frames repeat the previous one: zero "
            "frame duration)"
        )
    time_base = float(stream.time_base or 0)
    rate = stream.average_rate or stream.guessed_rate
    order_only = container.format.name == "avi" and not intra_only
    if order_only or not time_base:  # AVI: no presentation times; frames are equally spaced by definition
        if not rate or float(rate) <= 0:
            raise VideoError(f"{path}: invalid frame rate {rate}")
        times = [i / float(rate) for i in range(len(pts))]
        end = len(pts) / float(rate)
    else:
        times = [(p - pts[0]) * time_base for p in pts]
        last = times[-1] - times[-2] if len(times) > 1 else (1 / float(rate) if rate else 0.0)
        end = times[-1] + last
    if end <= 0:
        raise VideoError(f"{path}: zero duration ({len(pts)} frame(s), no time between them)")
    height, width = int(stream.codec_context.height or 0), int(stream.codec_context.width or 0)
    container.seek(0)
    # The rotation needs one decoded frame: not for a frame no pixel limit lets through (a 131-byte GIF can declare a
    # 16000x16000 screen, a gigabyte to decode); the caller's limit then refuses it by this size.
    rotation = _rotation(stream, container) if height * width <= MAX_PROBE_DECODE_PIXELS else 0
    shown = (width, height) if rotation in (90, 270) else (height, width)
    info = VideoInfo(len(pts), len(pts) / end, shown[0], shown[1], tuple(times), end)
    return StreamIndex(
        info, tuple(pts), tuple(keyframes), time_base, rotation, stream.codec_context.name, container.format.name,
        (height, width), order_only,
    )  # fmt: skip
