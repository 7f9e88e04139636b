"""Frame sampling on presentation time, for every strategy.

A clip [start, end) is split into equal time segments, one frame per segment: evaluation (no rng) takes the frame
on screen at each segment's centre, training (rng given) the frame on screen at a seeded random time inside each
segment. "The frame on screen at t" is the last frame whose pts <= t. Clip bounds snap to the nearest frame
boundary, so on a constant-rate clip the chosen frames are the ones index-based sampling picked (segment centres
in frames, floored); on a variable-rate clip they follow time. With `fps`, the count is the clip's length times
that rate, capped at num_frames. A clip shorter than the frame count repeats frames (the count, hence the
video-token count, never changes).
"""

from __future__ import annotations

import math

import numpy as np

from vidtune.data.video.base import SamplingConfig, VideoError, VideoInfo

# Times are sums and products of floats: a sample time equal to a frame's pts may come out a few ulps early.
EPSILON_S = 1e-6


def clip_bounds(info: VideoInfo, start_s: float | None, end_s: float | None, path: str = "") -> tuple[float, float]:
    """The clip's [start, end) in seconds, each snapped to the nearest frame boundary."""
    boundaries = np.append(info.times_s, info.duration_s)

    def snap(t: float) -> float:
        # The position in frames (fractional inside the frame on screen), rounded as round(t x fps) did on a
        # constant-rate clip (half to even; the float noise of summed times is rounded off first).
        frame = int(np.clip(np.searchsorted(boundaries, t, side="right") - 1, 0, len(boundaries) - 2))
        position = frame + (t - boundaries[frame]) / (boundaries[frame + 1] - boundaries[frame])
        return float(boundaries[min(max(round(round(position, 6)), 0), len(boundaries) - 1)])

    start = 0.0 if start_s is None else snap(min(start_s, info.duration_s))
    end = info.duration_s if end_s is None else snap(min(end_s, info.duration_s))
    if end <= start + EPSILON_S:
        raise VideoError(
            f"{path}: clip {start_s}s-{end_s}s holds no frames (the video has {info.num_frames} frames, "
            f"{info.duration_s:.2f}s)"
        )
    return start, end


def frames_in_clip(info: VideoInfo, start_s: float | None, end_s: float | None) -> int:
    start, end = clip_bounds(info, start_s, end_s)
    times = info.times_s
    return int(np.searchsorted(times, end - EPSILON_S) - np.searchsorted(times, start - EPSILON_S))


def num_sampled_frames(info: VideoInfo, cfg: SamplingConfig, start_s: float | None, end_s: float | None) -> int:
    start, end = clip_bounds(info, start_s, end_s)
    if cfg.fps is None:
        return cfg.num_frames
    return max(1, min(cfg.num_frames, math.floor((end - start) * cfg.fps + EPSILON_S)))


def segment_times(start: float, end: float, count: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """One time per equal segment of [start, end): the centre, or a seeded random time inside it.

    Centres are start + (2i+1)(end-start)/(2 count): the centre of segment i on a grid k times finer (k odd) is the
    very same time, so a frame cache keeping the finer grid returns the frames uncached sampling would."""
    span = end - start
    if rng is None:
        return start + ((2 * np.arange(count) + 1) * span) / (2 * count)
    edges = start + np.arange(count + 1) * span / count
    return rng.uniform(edges[:-1], edges[1:])


def frames_on_screen(info: VideoInfo, times: np.ndarray, start: float, end: float) -> list[int]:
    """Index (presentation order) of the frame on screen at each time, kept inside the clip's frames."""
    frame_times = info.times_s
    first = int(np.searchsorted(frame_times, start - EPSILON_S))
    last = max(first, int(np.searchsorted(frame_times, end - EPSILON_S)) - 1)
    on_screen = np.searchsorted(frame_times, np.asarray(times) + EPSILON_S, side="right") - 1
    return np.clip(on_screen, first, last).astype(int).tolist()


def sample_frame_indices(
    info: VideoInfo,
    cfg: SamplingConfig,
    start_s: float | None = None,
    end_s: float | None = None,
    rng: np.random.Generator | None = None,
    path: str = "",
    grid: int = 1,
) -> list[int]:
    """The frames to decode; with `grid` > 1, `grid` candidates per sampled frame (the frame cache's finer grid)."""
    start, end = clip_bounds(info, start_s, end_s, path)
    count = num_sampled_frames(info, cfg, start_s, end_s) * grid
    return frames_on_screen(info, segment_times(start, end, count, rng), start, end)


def timestamps_for(indices: list[int], info: VideoInfo) -> list[float]:
    """Each frame's presentation time (first frame = 0 s)."""
    times = info.times_s
    return [float(times[i]) for i in indices]


def time_instruction(info: VideoInfo, timestamps_s: list[float], start_s: float | None, end_s: float | None) -> str:
    """ "The video lasts 9.7 seconds; 8 frames were sampled at 0.0s, 1.4s, ..." (times relative to the clip)."""
    offset = start_s or 0.0
    duration = min(end_s, info.duration_s) - offset if end_s is not None else info.duration_s - offset
    times = ", ".join(f"{max(0.0, t - offset):.1f}s" for t in timestamps_s)
    return f"The video lasts {duration:.1f} seconds; {len(timestamps_s)} frames were sampled at {times}."
