"""Decode and sample video frames: decord first, PyAV as fallback.

Frame counts and rates come from what the decoder finds when it indexes the file (decord's frame index, PyAV's
demuxed packets), never from container headers, which are often wrong (variable-rate phone clips, AVI).
Sampling depends only on (frame count, fps, clip bounds, config, rng), so both backends pick the same indices.
Timestamps are index / fps: decord's own timestamps are garbage on AVI files.
Frames stay uint8 (T, H, W, C): resizing float frames is ~20x slower on CPU.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from vidtune.data.conversation import DataError
from vidtune.data.quality import time_limit

BACKENDS = ("auto", "decord", "pyav")


class VideoError(DataError):
    """A video that cannot be read; the message names the file and the reason."""


@dataclass
class SamplingConfig:
    """How frames are picked from a clip."""

    num_frames: int = 8  # uniform sampling: exactly this many frames; with `fps`: the most frames kept
    fps: float | None = None  # sample at this rate (frames per second of video), capped at num_frames
    backend: str = "auto"  # auto (decord, else PyAV) | decord | pyav


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int = 0  # from the stream header (0 when unknown)
    width: int = 0

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


@dataclass
class Clip:
    frames: np.ndarray  # uint8 (T, H, W, C)
    indices: list[int]
    timestamps_s: list[float]
    info: VideoInfo


def validate_sampling(cfg: SamplingConfig) -> None:
    if cfg.num_frames < 1:
        raise DataError(f"sampling.num_frames must be >= 1, got {cfg.num_frames}")
    if cfg.fps is not None and cfg.fps <= 0:
        raise DataError(f"sampling.fps must be > 0, got {cfg.fps}")
    if cfg.backend not in BACKENDS:
        raise DataError(f"sampling.backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")


# ------------------------------------------------------------------------------------------------------ sampling


def frame_range(info: VideoInfo, start_s: float | None, end_s: float | None, path: str = "") -> tuple[int, int]:
    """[first, stop) frame indices of the clip between start_s and end_s."""
    first = 0 if start_s is None else min(info.num_frames, round(start_s * info.fps))
    stop = info.num_frames if end_s is None else min(info.num_frames, round(end_s * info.fps))
    if stop <= first:
        raise VideoError(
            f"{path}: clip {start_s}s-{end_s}s holds no frames (the video has {info.num_frames} frames, "
            f"{info.duration_s:.2f}s)"
        )
    return first, stop


def num_sampled_frames(info: VideoInfo, cfg: SamplingConfig, start_s: float | None, end_s: float | None) -> int:
    first, stop = frame_range(info, start_s, end_s)
    if cfg.fps is None:
        return cfg.num_frames
    return max(1, min(cfg.num_frames, math.floor((stop - first) / info.fps * cfg.fps)))


def sample_frame_indices(
    info: VideoInfo,
    cfg: SamplingConfig,
    start_s: float | None = None,
    end_s: float | None = None,
    rng: np.random.Generator | None = None,
    path: str = "",
) -> list[int]:
    """Split the clip into equal segments, one frame per segment.

    Evaluation (rng None) takes each segment's centre; training (rng given) a seeded random frame inside each
    segment, so epochs see different frames while the coverage stays uniform. A clip shorter than the frame count
    repeats frames (the count, hence the video-token count, never changes).
    """
    first, stop = frame_range(info, start_s, end_s, path)
    count = num_sampled_frames(info, cfg, start_s, end_s)
    return segment_indices(first, stop, count, rng)


def segment_indices(first: int, stop: int, count: int, rng: np.random.Generator | None = None) -> list[int]:
    """One frame per equal segment of [first, stop): the centre, or a seeded random frame inside it.

    Centres are first + (2i+1)(stop-first)/(2 count), one exact division: the centre of segment i on a grid k times
    finer (k odd) is then the very same number, so a frame cache keeping the finer grid returns the frames uncached
    sampling would (data/frame_cache.py)."""
    span = stop - first
    if rng is None:
        positions = first + ((2 * np.arange(count) + 1) * span) / (2 * count)
    else:
        edges = first + np.arange(count + 1) * span / count
        positions = rng.uniform(edges[:-1], edges[1:])
    return np.clip(np.floor(positions).astype(np.int64), first, stop - 1).tolist()


def timestamps_for(indices: list[int], info: VideoInfo) -> list[float]:
    return [i / info.fps for i in indices]


# ------------------------------------------------------------------------------------------------------ backends


def scaled_size(height: int, width: int, shortest_edge: int | None) -> tuple[int, int] | None:
    """(height, width) with the shorter side brought down to `shortest_edge` (aspect kept, never upscaled);
    None when no resize is needed."""
    if not shortest_edge or not height or not width or min(height, width) <= shortest_edge:
        return None
    scale = shortest_edge / min(height, width)
    return max(shortest_edge, round(height * scale)), max(shortest_edge, round(width * scale))


def decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


# FFmpeg picks a demuxer from the file's content, whatever its name: an HLS playlist or a concat list saved as
# `.mp4` inside media_root makes it read files (or URLs) the playlist names, outside the media root. Only files
# whose first bytes are a real video container are opened, in every backend; PyAV is also held to these demuxers.
CONTAINER_DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,ogg,asf"
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")


def is_video_container(head: bytes) -> bool:
    """MP4/MOV/3GP, Matroska/WebM, AVI, MPEG-TS, MPEG-PS, FLV, Ogg or ASF, by their first bytes."""
    return (
        head[4:8] in _ISO_BOXES
        or head.startswith((b"\x1a\x45\xdf\xa3", b"FLV", b"OggS", b"\x00\x00\x01\xba", b"\x30\x26\xb2\x75"))
        or (head.startswith(b"RIFF") and head[8:12] == b"AVI ")
        or (len(head) > 188 and head[0] == 0x47 and head[188] == 0x47)  # TS packets: a sync byte every 188
    )


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoError(f"{path}: video not found")
    if not os.path.isfile(path):
        raise VideoError(f"{path}: not a file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(192)
    if not is_video_container(head):
        kind = "a playlist" if head.lstrip().startswith((b"#EXTM3U", b"ffconcat", b"<?xml", b"[playlist]")) else ""
        raise VideoError(
            f"{path}: cannot open it: {kind or 'not'} a video container file (only MP4/MOV, MKV/WebM, AVI, "
            "MPEG-TS/PS, FLV, Ogg and ASF files are opened)"
        )


def _checked_info(num_frames: int, fps: float, path: str) -> VideoInfo:
    if num_frames <= 0:
        raise VideoError(f"{path}: the decoder finds no video frames")
    if not math.isfinite(fps) or fps <= 0:
        raise VideoError(f"{path}: invalid frame rate {fps}")
    return VideoInfo(num_frames, float(fps))


class DecordReader:
    name = "decord"

    def __init__(self, path: str, shortest_edge: int | None = None):
        import decord

        size = scaled_size(*frame_size(path), shortest_edge) if shortest_edge else None
        height, width = size or (-1, -1)
        try:
            # One decode thread: DataLoader workers already use the cores. The decoder scales frames down to the
            # model's input size itself: less memory, and the processor's own resize becomes a no-op.
            self.reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, width=width, height=height)
        except Exception as err:
            raise VideoError(f"{path}: decord cannot open it ({str(err).splitlines()[0][:120]})") from None
        self.path = path
        self.info = _checked_info(len(self.reader), self.reader.get_avg_fps(), path)
        # decord seeks by its frame timestamps; where they are broken (seen on an h264 AVI: all -3e17) it silently
        # returns the wrong frames, so refuse the file ("auto" then falls back to PyAV, which decodes it right).
        stamps = self.reader.get_frame_timestamp(np.arange(self.info.num_frames))[:, 0]
        if not (np.isfinite(stamps).all() and stamps.min() >= -1e-3 and (np.diff(stamps) > 0).all()):
            raise VideoError(f"{path}: decord's frame index has invalid timestamps, so its seeks are unreliable")

    def read(self, indices: list[int]) -> np.ndarray:
        try:
            return self.reader.get_batch(indices).asnumpy()
        except Exception as err:
            raise VideoError(
                f"{self.path}: decord failed to decode frames ({str(err).splitlines()[0][:120]})"
            ) from None

    def close(self) -> None:
        del self.reader


class PyAVReader:
    """Index the stream by demuxing packets (no decoding), then decode by seeking keyframe to keyframe."""

    name = "pyav"

    def __init__(self, path: str, shortest_edge: int | None = None):
        import av

        self.path, self.shortest_edge = path, shortest_edge
        try:
            self.container = av.open(path, options={"format_whitelist": CONTAINER_DEMUXERS})
            self.stream = self.container.streams.video[0]
        except (av.FFmpegError, IndexError, OSError) as err:
            raise VideoError(f"{path}: PyAV cannot open it as video ({str(err)[:120]})") from None
        self.stream.thread_count = 1
        context = self.stream.codec_context
        self.size = scaled_size(context.height or 0, context.width or 0, shortest_edge)
        self.frame_pts, self.keyframe_pts = self._index()
        rate = self.stream.average_rate or self.stream.guessed_rate
        fps = float(rate) if rate else self._fps_from_pts()
        self.info = _checked_info(len(self.frame_pts), fps, path)

    def _index(self) -> tuple[list[int], list[int]]:
        frame_pts, keyframe_pts = [], []
        try:
            for packet in self.container.demux(self.stream):
                if packet.size == 0:  # the flush packet at the end
                    continue
                pts = packet.pts if packet.pts is not None else packet.dts
                if pts is None:
                    continue
                frame_pts.append(pts)
                if packet.is_keyframe:
                    keyframe_pts.append(pts)
        except Exception as err:
            raise VideoError(f"{self.path}: PyAV cannot read the stream ({str(err)[:120]})") from None
        frame_pts.sort()  # decode order -> presentation order (B-frames)
        keyframe_pts.sort()
        repeats = sum(1 for a, b in itertools.pairwise(frame_pts) if a >= b)
        if repeats:  # zero-duration frames (a zero frame rate): no timestamp points at one frame, seeks would lie
            raise VideoError(
                f"{self.path}: invalid frame timestamps ({repeats} of {len(frame_pts)} frames repeat "
                "the previous one: zero frame duration)"
            )
        return frame_pts, keyframe_pts or frame_pts[:1]

    def _fps_from_pts(self) -> float:
        if len(self.frame_pts) < 2 or self.stream.time_base is None:
            return 0.0
        span = (self.frame_pts[-1] - self.frame_pts[0]) * float(self.stream.time_base)
        return (len(self.frame_pts) - 1) / span if span > 0 else 0.0

    def read(self, indices: list[int]) -> np.ndarray:
        frames: dict[int, np.ndarray] = {}
        decoded = None  # iterator over frames after the last seek
        last_pts: int | None = None
        try:
            for index in sorted(set(indices)):
                target = self.frame_pts[index]
                keyframe = self.keyframe_pts[max(0, bisect.bisect_right(self.keyframe_pts, target) - 1)]
                # Seek only when a keyframe lies between the decoder's position and the target: decoding on is
                # cheaper than re-decoding a GOP from its keyframe.
                if decoded is None or last_pts is None or last_pts >= target or keyframe > last_pts:
                    self.container.seek(keyframe, stream=self.stream, backward=True, any_frame=False)
                    decoded = self.container.decode(self.stream)
                for frame in decoded:
                    last_pts = frame.pts if frame.pts is not None else frame.dts
                    if last_pts is not None and last_pts >= target:
                        frames[index] = self._rgb(frame)
                        break
                else:
                    raise VideoError(f"{self.path}: stream ended before frame {index}")
        except VideoError:
            raise
        except Exception as err:
            raise VideoError(f"{self.path}: PyAV failed to decode frames ({str(err)[:120]})") from None
        return np.stack([frames[i] for i in indices])

    def _rgb(self, frame: Any) -> np.ndarray:
        """RGB conversion and downscaling in one swscale pass (only the frames kept are converted)."""
        if self.size is None:
            return frame.to_ndarray(format="rgb24")
        height, width = self.size
        return frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BICUBIC")

    def close(self) -> None:
        self.container.close()


def open_video(path: str, backend: str = "auto", shortest_edge: int | None = None) -> Any:
    """A reader with `.info` and `.read(indices)`; `auto` tries decord and falls back to PyAV on any failure.
    With `shortest_edge`, frames come back scaled down so their shorter side is that long."""
    _check_file(path)
    if backend == "pyav" or (backend == "auto" and not decord_available()):
        return PyAVReader(path, shortest_edge)
    if backend == "decord":
        return DecordReader(path, shortest_edge)
    try:
        return DecordReader(path, shortest_edge)
    except VideoError as decord_error:
        try:
            return PyAVReader(path, shortest_edge)
        except VideoError as pyav_error:
            raise VideoError(f"{pyav_error} (decord: {str(decord_error).split(': ', 1)[-1]})") from None


def frame_size(path: str) -> tuple[int, int]:
    """(height, width) from the container header (PyAV), without decoding."""
    import av

    try:
        with av.open(path, options={"format_whitelist": CONTAINER_DEMUXERS}) as container:
            context = container.streams.video[0].codec_context
            return int(context.height or 0), int(context.width or 0)
    except (av.FFmpegError, IndexError, OSError):
        return 0, 0


def check_clip(
    path: str,
    info: VideoInfo,
    cfg: SamplingConfig,
    start_s: float | None,
    end_s: float | None,
    max_frame_pixels: int | None = None,
    too_short: str = "repeat",
) -> None:
    """Refuse clips a run cannot use: frames too large to hold, or (when asked) fewer frames than sampled."""
    if max_frame_pixels and info.height * info.width > max_frame_pixels:
        raise VideoError(f"{path}: {info.width}x{info.height} frames exceed the {max_frame_pixels:,}-pixel limit")
    if too_short == "drop":
        first, stop = frame_range(info, start_s, end_s, path)
        wanted = num_sampled_frames(info, cfg, start_s, end_s)
        if stop - first < wanted:
            raise VideoError(f"{path}: too short: {stop - first} frames in the clip, {wanted} to sample")


def probe_video(path: str, backend: str = "auto") -> VideoInfo:
    reader = open_video(path, backend)
    try:
        info = reader.info
    finally:
        reader.close()
    return VideoInfo(info.num_frames, info.fps, *frame_size(path))


def load_clip(
    path: str,
    cfg: SamplingConfig,
    start_s: float | None = None,
    end_s: float | None = None,
    rng: np.random.Generator | None = None,
    decode_timeout_s: float = 120.0,
    shortest_edge: int | None = None,
) -> Clip:
    with time_limit(decode_timeout_s, path):
        reader = open_video(path, cfg.backend, shortest_edge)
        try:
            indices = sample_frame_indices(reader.info, cfg, start_s, end_s, rng, path)
            frames = reader.read(indices)
        finally:
            reader.close()
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise VideoError(f"{path}: decoder returned {frames.dtype} frames of shape {frames.shape}")
    return Clip(frames, indices, timestamps_for(indices, reader.info), reader.info)


def load_image(path: str) -> np.ndarray:
    """An image as uint8 (H, W, C) RGB."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise VideoError(f"{path}: image not found")
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # a writable copy (torch refuses read-only arrays)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise VideoError(f"{path}: cannot read image ({str(err)[:120]})") from None


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise VideoError(f"{path}: image not found")
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise VideoError(f"{path}: cannot read image ({str(err)[:120]})") from None


def time_instruction(info: VideoInfo, timestamps_s: list[float], start_s: float | None, end_s: float | None) -> str:
    """ "The video lasts 9.7 seconds; 8 frames were sampled at 0.0s, 1.4s, ..." (times relative to the clip)."""
    offset = start_s or 0.0
    duration = min(end_s, info.duration_s) - offset if end_s is not None else info.duration_s - offset
    times = ", ".join(f"{max(0.0, t - offset):.1f}s" for t in timestamps_s)
    return f"The video lasts {duration:.1f} seconds; {len(timestamps_s)} frames were sampled at {times}."
