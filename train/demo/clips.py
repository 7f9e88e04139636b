"""Generated videos, encoded as real MP4 (H.264 through PyAV), for the demo, the tests and the benchmarks.

A clip is a sequence of solid-colour segments ("red then blue"), with a little noise and a moving bar so the
encoder produces real P/B-frames rather than a trivially compressible stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 50),
    "white": (235, 235, 235),
    "black": (20, 20, 20),
    "purple": (140, 50, 180),
    "orange": (240, 140, 30),
}


def segment_frames(
    colors: Sequence[str], frames_per_segment: int, height: int, width: int, seed: int = 0
) -> np.ndarray:
    """uint8 (T, H, W, 3) frames: one solid colour per segment, plus noise and a bar that moves each frame."""
    rng = np.random.default_rng(seed)
    frames: list[np.ndarray] = []
    for color in colors:
        base = np.array(PALETTE[color], dtype=np.int16)
        for _ in range(frames_per_segment):
            frame = np.broadcast_to(base, (height, width, 3)) + rng.integers(-12, 13, (height, width, 3))
            column = len(frames) * 3 % width
            frame[:, column : column + 2] = 128
            frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: int = 8,
    codec: str = "libx264",
    gop_frames: int | None = None,
    x264_options: dict[str, str] | None = None,
) -> Path:
    """Encode uint8 (H, W, 3) frames (an array or any iterable: long clips stream) to a video file; H and W even.
    x264_options override the defaults (preset ultrafast, one thread), e.g. a slower preset with B-frames."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream: Any = None
        for array in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=fps)
                stream.height, stream.width = array.shape[0], array.shape[1]
                stream.pix_fmt = "yuv420p"
                if gop_frames:
                    stream.codec_context.gop_size = gop_frames
                if codec == "libx264":
                    # One thread and fixed options: identical files on every machine, fast to encode.
                    keyframes = {"keyint": str(gop_frames), "min-keyint": str(gop_frames), "scenecut": "0"}
                    defaults = {"preset": "ultrafast", "threads": "1"}
                    stream.options = defaults | (keyframes if gop_frames else {}) | (x264_options or {})
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_color_clip(
    path: str | Path,
    colors: Sequence[str],
    seconds_per_segment: float = 1.0,
    fps: int = 8,
    height: int = 48,
    width: int = 64,
    seed: int = 0,
    gop_frames: int | None = None,
) -> Path:
    frames = segment_frames(colors, max(1, round(seconds_per_segment * fps)), height, width, seed)
    return write_video(path, frames, fps=fps, gop_frames=gop_frames)


def tone_samples(tones_hz: Sequence[float], seconds_per_tone: float, sampling_rate: int) -> np.ndarray:
    """float32 mono samples: one sine per segment (0 Hz: silence), at half amplitude."""
    per_tone = round(seconds_per_tone * sampling_rate)
    t = np.arange(per_tone) / sampling_rate
    return np.concatenate([0.5 * np.sin(2 * np.pi * hz * t) for hz in tones_hz]).astype(np.float32)


def write_tone_clip(
    path: str | Path,
    colors: Sequence[str],
    tones_hz: Sequence[float],
    seconds_per_segment: float = 1.0,
    fps: int = 8,
    height: int = 48,
    width: int = 64,
    sampling_rate: int = 22050,
    seed: int = 0,
) -> Path:
    """A colour clip (as `write_color_clip`) with a sound track: one sine tone per segment of `tones_hz` (the same
    segment length as the pictures'), AAC in the same MP4, so the n-th second's picture and tone line up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = segment_frames(colors, max(1, round(seconds_per_segment * fps)), height, width, seed)
    sound = tone_samples(tones_hz, seconds_per_segment, sampling_rate)
    with av.open(str(path), mode="w") as container:
        video: Any = container.add_stream("libx264", rate=fps)
        video.height, video.width, video.pix_fmt = height, width, "yuv420p"
        video.options = {"preset": "ultrafast", "threads": "1"}
        audio: Any = container.add_stream("aac", rate=sampling_rate, layout="mono")
        for array in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(video.encode())
        chunk = 1024  # AAC's frame size
        for start in range(0, len(sound), chunk):
            frame = av.AudioFrame.from_ndarray(sound[None, start : start + chunk], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = sampling_rate, start
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return path
