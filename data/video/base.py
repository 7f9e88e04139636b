"""What every backend shares: the error, the probed stream (every frame's presentation time), the decoded clip,
the sampling settings, sizes as displayed, and the check that a file is a video container at all."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from vidtune.data.conversation import DataError

BACKENDS = ("auto", "torchcodec", "decord", "pyav")


class VideoError(DataError):
    """A video that cannot be read; the message names the file and the reason."""


@dataclass
class SamplingConfig:
    """How frames are picked from a clip (on presentation time)."""

    num_frames: int = 8  # uniform sampling: exactly this many frames; with `fps`: the most frames kept
    fps: float | None = None  # sample at this rate (frames per second of video), capped at num_frames
    backend: str = "auto"  # auto (TorchCodec, else decord, else PyAV) | torchcodec | decord | pyav


def validate_sampling(cfg: SamplingConfig) -> None:
    if cfg.num_frames < 1:
        raise DataError(f"sampling.num_frames must be >= 1, got {cfg.num_frames}")
    if cfg.fps is not None and cfg.fps <= 0:
        raise DataError(f"sampling.fps must be > 0, got {cfg.fps}")
    if cfg.backend not in BACKENDS:
        raise DataError(f"sampling.backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")


@dataclass(frozen=True)
class VideoInfo:
    """A video stream as a viewer sees it. `pts_s` holds every frame's presentation time in presentation order,
    the first frame at 0 s; empty means constant rate (frame i at i / fps)."""

    num_frames: int
    fps: float  # average rate: frames / duration
    height: int = 0  # as displayed (rotation applied; 0 when unknown)
    width: int = 0
    pts_s: tuple[float, ...] = ()
    end_s: float | None = None  # when the last frame stops showing (None: num_frames / fps)

    @property
    def duration_s(self) -> float:
        return self.end_s if self.end_s is not None else self.num_frames / self.fps

    @property
    def times_s(self) -> np.ndarray:
        return np.asarray(self.pts_s, dtype=np.float64) if self.pts_s else np.arange(self.num_frames) / self.fps

    @property
    def frame_s(self) -> float:
        """A typical frame's duration (the median gap), for tolerances."""
        times = self.times_s
        return float(np.median(np.diff(times))) if len(times) > 1 else self.duration_s


@dataclass(frozen=True)
class StreamIndex:
    """What probing found, in the units backends seek by: every frame's pts (stream time base, presentation
    order), the keyframes', and what must be true for a backend to be trusted on the file."""

    info: VideoInfo
    pts: tuple[int, ...]
    keyframe_pts: tuple[int, ...]
    time_base: float
    rotation: int  # clockwise degrees the stored picture is turned for display: 0, 90, 180, 270
    codec: str
    container: str
    stored_size: tuple[int, int] = (0, 0)  # (height, width) as coded, before rotation
    order_only: bool = False  # no presentation timestamps (AVI with inter frames): only decode order tells frames


@dataclass
class Clip:
    frames: np.ndarray  # uint8 (T, H, W, C), upright
    indices: list[int]  # positions in presentation order
    timestamps_s: list[float]  # each frame's presentation time (first frame = 0)
    info: VideoInfo
    backend: str = ""
    audio: Any = None  # data/audio.Audio: the sound of the sampled span, when the model family hears it


def scaled_size(height: int, width: int, shortest_edge: int | None) -> tuple[int, int] | None:
    """(height, width) with the shorter side brought down to `shortest_edge` (aspect kept, never upscaled);
    None when no resize is needed."""
    if not shortest_edge or not height or not width or min(height, width) <= shortest_edge:
        return None
    scale = shortest_edge / min(height, width)
    return max(shortest_edge, round(height * scale)), max(shortest_edge, round(width * scale))


def ffprobe_rotation(clockwise: int) -> int:
    """A clockwise display turn as ffprobe and FFmpeg's display matrix state it: counter-clockwise degrees in
    [-180, 180) (a stream shown turned 90 degrees clockwise is "rotation of -90.00 degrees")."""
    return (180 - clockwise) % 360 - 180


def upright(frame: np.ndarray, rotation: int) -> np.ndarray:
    """Turn a stored (H, W, C) picture clockwise by `rotation` degrees, as players do for its display matrix."""
    return np.ascontiguousarray(np.rot90(frame, k=-(rotation // 90) % 4)) if rotation else frame


def check_returned(path: str, backend: str, index: StreamIndex, indices: list[int], pts_s: list[float]) -> None:
    """Refuse frames whose presentation time is not the one asked for (more than a quarter frame off)."""
    expected = index.info.times_s[indices]
    tolerance = index.info.frame_s / 4
    wrong = [i for i, (want, got) in enumerate(zip(expected, pts_s, strict=True)) if abs(want - got) > tolerance]
    if wrong:
        first = wrong[0]
        raise VideoError(
            f"{path}: {backend} returned the wrong frames ({len(wrong)} of {len(indices)}; frame {indices[first]} "
            f"should show at {expected[first]:.3f}s, it returned {pts_s[first]:.3f}s)"
        )


# FFmpeg picks a demuxer from the file's content, whatever its name: an HLS playlist or a concat list saved as
# `.mp4` inside media_root makes it read files (or URLs) the playlist names, outside the media root. Only files
# whose first bytes are a real video container are opened, in every backend; PyAV is also held to these demuxers.
CONTAINER_DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,ogg,asf,gif"
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot", b"styp", b"moof")


def is_video_container(head: bytes) -> bool:
    """MP4/MOV/3GP, Matroska/WebM, AVI, MPEG-TS, MPEG-PS, FLV, Ogg, ASF or GIF, by their first bytes."""
    return (
        head[4:8] in _ISO_BOXES
        or head.startswith((b"\x1a\x45\xdf\xa3", b"FLV", b"OggS", b"\x00\x00\x01\xba", b"\x30\x26\xb2\x75"))
        or head.startswith((b"GIF87a", b"GIF89a"))
        or (head.startswith(b"RIFF") and head[8:12] == b"AVI ")
        or (len(head) > 188 and head[0] == 0x47 and head[188] == 0x47)  # TS packets: a sync byte every 188
    )


def check_file(path: str) -> None:
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
            "MPEG-TS/PS, FLV, Ogg, ASF and GIF files are opened)"
        )
