"""decord: fast batched seeks, trusted only where it is right. It is refused for files it decodes wrong: rotated
ones (it turns them but scales on the unrotated shape and adds a fourth channel), files without presentation
times (AVI with inter frames), and any file whose frame index disagrees with the probe's."""

from __future__ import annotations

import re

import numpy as np

from vidtune.data.video.base import StreamIndex, VideoError, check_returned, ffprobe_rotation, scaled_size


def _reason(err: Exception) -> str:
    """decord's C++ message without its '[hh:mm:ss] /path/file.cc:123: ' prefix, one line."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", first)[:120]


def _quiet() -> None:
    import decord

    decord.logging.set_level(decord.logging.QUIET)


class DecordReader:
    name = "decord"

    def __init__(self, path: str, index: StreamIndex, shortest_edge: int | None = None):
        import decord

        _quiet()
        self.path, self.index, self.info = path, index, index.info
        if index.rotation:
            raise VideoError(
                f"{path}: decord cannot read rotated video right (rotation {ffprobe_rotation(index.rotation)}, as "
                "ffprobe states the display matrix)"
            )
        if index.order_only:
            raise VideoError(f"{path}: decord cannot guarantee frames in {index.container} without timestamps")
        height, width = scaled_size(self.info.height, self.info.width, shortest_edge) or (-1, -1)
        try:
            # One decode thread: DataLoader workers already use the cores. The decoder scales frames down to the
            # model's input size itself: less memory, and the processor's own resize becomes a no-op.
            self.reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, width=width, height=height)
        except Exception as err:
            raise VideoError(f"{path}: decord cannot open it ({_reason(err)})") from None
        if len(self.reader) != self.info.num_frames:
            raise VideoError(f"{path}: decord finds {len(self.reader)} frames, the stream has {self.info.num_frames}")

    def read(self, indices: list[int]) -> np.ndarray:
        try:
            frames = self.reader.get_batch(indices).asnumpy()
            stamps = self.reader.get_frame_timestamp(indices)[:, 0]
        except Exception as err:
            raise VideoError(f"{self.path}: decord failed to decode frames ({_reason(err)})") from None
        first = float(self.reader.get_frame_timestamp(0)[0])
        check_returned(self.path, self.name, self.index, indices, [float(s) - first for s in stamps])
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise VideoError(f"{self.path}: decord returned frames of shape {frames.shape}")
        return frames

    def close(self) -> None:
        del self.reader
