"""A frame cache: each clip decoded once, kept on disk as uint8 frames at the model's input size, and reused across
epochs and runs.

Training jitter and a cache coexist by caching a grid `grid` times finer than the sampling (grid odd): segment i of
the clip owns grid frames; training picks one at random (seeded as usual), evaluation the middle one, which is
exactly the frame uncached sampling would decode (same exact centre time, data/video/sampling.py). A clip's key
covers the file's identity (path, size, modification time), its bounds, the sampling, the grid and the decode size,
so an edited video or a changed recipe never reads stale frames.

Files are written to a temporary name and renamed (atomic), so concurrent DataLoader workers and ranks may fill
the same clip at once and readers only ever see whole files; a damaged file is re-decoded. Least recently used
clips are evicted beyond `max_gb`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from vidtune.data.quality import MAX_FRAME_PIXELS
from vidtune.data.video import Clip, SamplingConfig, VideoInfo, open_video, sample_frame_indices, timestamps_for

FORMAT_VERSION = 1


@dataclass
class FrameCacheConfig:
    dir: str | None = None  # keep decoded frames here and reuse them across epochs and runs (None: no cache)
    max_gb: float = 50.0  # least recently used clips are evicted beyond this size
    grid: int = 3  # cached frames per sampled frame (odd): training jitter picks among them, evaluation the middle


class FrameCache:
    def __init__(
        self,
        cfg: FrameCacheConfig,
        sampling: SamplingConfig,
        shortest_edge: int | None,
        max_frame_pixels: int | None = MAX_FRAME_PIXELS,
    ):
        if not cfg.dir:
            raise ValueError("FrameCache needs data.frame_cache.dir")
        if cfg.grid < 1 or cfg.grid % 2 == 0:
            raise ValueError(
                f"data.frame_cache.grid must be odd (its middle frame is the evaluation frame), got {cfg.grid}"
            )
        self.cfg, self.sampling, self.shortest_edge = cfg, sampling, shortest_edge
        self.max_frame_pixels = max_frame_pixels
        self.root = Path(cfg.dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.writes_since_eviction = 0
        self.hits = self.misses = 0

    def key(self, path: str, start_s: float | None, end_s: float | None) -> str:
        stat = os.stat(path)
        s = self.sampling
        identity = (
            f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{start_s}|{end_s}|{s.num_frames}|"
            f"{s.fps}|{s.backend}|{self.cfg.grid}|{self.shortest_edge}|v{FORMAT_VERSION}"
        )
        return hashlib.sha1(identity.encode()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / key[:2]
        return folder / f"{key}.npy", folder / f"{key}.json"

    def load(
        self,
        path: str,
        start_s: float | None = None,
        end_s: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> Clip:
        """The clip's sampled frames, from the cache (filled on a miss)."""
        frames_path, meta_path = self._paths(self.key(path, start_s, end_s))
        try:
            meta = json.loads(meta_path.read_text())
            grid_frames = np.load(frames_path, mmap_mode="r")
            if grid_frames.shape[0] != len(meta["indices"]):
                raise ValueError("frame count does not match its metadata")
            self.hits += 1
            os.utime(frames_path)  # recently used: evicted last
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            grid_frames, meta = self.fill(path, start_s, end_s, frames_path, meta_path)
            self.misses += 1
        count, k = len(meta["indices"]) // self.cfg.grid, self.cfg.grid
        picks = np.full(count, (k - 1) // 2) if rng is None else rng.integers(0, k, size=count)
        rows = (np.arange(count) * k + picks).tolist()
        # Entries written before timestamps were kept are constant-rate clips' (index / fps: the same times).
        info = VideoInfo(meta["num_frames"], meta["fps"], *meta["size"], end_s=meta.get("duration_s"))
        indices = [meta["indices"][r] for r in rows]
        times = meta.get("timestamps_s") or timestamps_for(meta["indices"], info)
        clip = Clip(np.ascontiguousarray(grid_frames[rows]), indices, [times[r] for r in rows], info, "cache")
        return clip

    def fill(
        self, path: str, start_s: float | None, end_s: float | None, frames_path: Path, meta_path: Path
    ) -> tuple[np.ndarray, dict]:
        """Decode the clip's grid (one open, seek-based) and store it atomically."""
        reader = open_video(path, self.sampling.backend, self.shortest_edge, self.max_frame_pixels)
        try:
            info = reader.info
            indices = sample_frame_indices(info, self.sampling, start_s, end_s, None, path, self.cfg.grid)
            frames = reader.read(indices)
        finally:
            reader.close()
        meta = {
            "indices": indices,
            "num_frames": info.num_frames,
            "fps": info.fps,
            "size": [info.height, info.width],
            "duration_s": info.duration_s,
            "timestamps_s": timestamps_for(indices, info),
            "source": os.path.realpath(path),
        }
        frames_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(frames_path, lambda handle: np.save(handle, frames))
        _write_atomic(meta_path, lambda handle: handle.write(json.dumps(meta).encode()))
        self.writes_since_eviction += 1
        if self.writes_since_eviction >= 32:
            self.evict()
        return frames, meta

    def evict(self) -> int:
        """Delete least recently used clips until the cache is under 90% of max_gb; returns bytes freed."""
        self.writes_since_eviction = 0
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.root.glob("*/*.npy")]
        total, limit, freed = sum(size for _, size, _ in files), self.cfg.max_gb * 1e9, 0
        if total <= limit:
            return 0
        for _, size, path in sorted(files):
            if total - freed <= 0.9 * limit:
                break
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
            freed += size
        return freed

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*/*.npy"))


def _write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write to a temporary file beside `path`, then rename it over `path` (readers never see a partial file)."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
