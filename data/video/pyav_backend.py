"""PyAV: decode by seeking keyframe to keyframe and matching each decoded frame's exact pts; on files without
presentation times (AVI with inter frames) by counting frames in output order from the start. Frames come out
upright (display matrix) and scaled by swscale on the stored shape, so the displayed aspect is kept."""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

from vidtune.data.video.base import StreamIndex, VideoError, scaled_size, upright
from vidtune.data.video.probe import open_container


class PyAVReader:
    name = "pyav"

    def __init__(self, path: str, index: StreamIndex, shortest_edge: int | None = None):
        self.path, self.index, self.info = path, index, index.info
        self.container = open_container(path)
        self.stream = self.container.streams.video[0]
        self.stream.thread_count = 1
        shown = scaled_size(self.info.height, self.info.width, shortest_edge)
        # swscale works on the stored picture: scale to the stored shape of the displayed target, then turn it.
        self.size = shown[::-1] if shown and index.rotation in (90, 270) else shown

    def read(self, indices: list[int]) -> np.ndarray:
        try:
            frames = self._by_order(indices) if self.index.order_only else self._by_pts(indices)
        except VideoError:
            raise
        except Exception as err:
            raise VideoError(f"{self.path}: PyAV failed to decode frames ({str(err)[:120]})") from None
        return np.stack([frames[i] for i in indices])

    def _by_pts(self, indices: list[int]) -> dict[int, np.ndarray]:
        frames: dict[int, np.ndarray] = {}
        decoded = None  # iterator over frames after the last seek
        last_pts: int | None = None
        pts, keyframes = self.index.pts, self.index.keyframe_pts
        for index in sorted(set(indices)):
            target = pts[index]
            keyframe = keyframes[max(0, bisect.bisect_right(keyframes, target) - 1)]
            # Seek only when a keyframe lies between the decoder's position and the target: decoding on is
            # cheaper than re-decoding a GOP from its keyframe.
            if decoded is None or last_pts is None or last_pts >= target or keyframe > last_pts:
                self.container.seek(keyframe, stream=self.stream, backward=True, any_frame=False)
                decoded = self.container.decode(self.stream)
            for frame in decoded:
                last_pts = frame.pts if frame.pts is not None else frame.dts
                if last_pts == target:
                    frames[index] = self._rgb(frame)
                    break
                if last_pts is not None and last_pts > target:  # never a guess: the exact frame or an error
                    raise VideoError(f"{self.path}: PyAV's decoder skipped frame {index} (pts {target})")
            else:
                raise VideoError(f"{self.path}: stream ended before frame {index}")
        return frames

    def _by_order(self, indices: list[int]) -> dict[int, np.ndarray]:
        """Decoders emit frames in presentation order: the n-th frame out is frame n."""
        wanted, frames = set(indices), {}
        self.container.seek(0)
        for position, frame in enumerate(self.container.decode(self.stream)):
            if position in wanted:
                frames[position] = self._rgb(frame)
                if len(frames) == len(wanted):
                    return frames
        raise VideoError(f"{self.path}: stream ended before frame {max(wanted - set(frames))}")

    def _rgb(self, frame: Any) -> np.ndarray:
        """RGB conversion and downscaling in one swscale pass (only the frames kept are converted), then upright."""
        if self.size is None:
            array = frame.to_ndarray(format="rgb24")
        else:
            height, width = self.size
            array = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BICUBIC")
        return upright(array, self.index.rotation)

    def close(self) -> None:
        self.container.close()
