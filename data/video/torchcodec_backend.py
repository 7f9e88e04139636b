"""TorchCodec (PyTorch's decoder over the system's FFmpeg libraries): exact seeks over a scan of the whole file
(`seek_mode="exact"`: "approximate" returns wrong frames on variable-rate clips), frames upright (it applies the
display matrix), each returned frame's pts checked against the probe's. Frames are decoded at full size and
resized with torchvision's antialiased resize (faster than TorchCodec's own Resize transform, measured)."""

from __future__ import annotations

import functools

import numpy as np

from vidtune.data.video.base import StreamIndex, VideoError, check_returned, scaled_size


@functools.cache
def torchcodec_available() -> bool:
    """Importable and its FFmpeg libraries load (it needs the system's FFmpeg 4-9)."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception:  # ImportError, or RuntimeError when no FFmpeg library loads
        return False
    return True


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:120]


class TorchCodecReader:
    name = "torchcodec"

    def __init__(self, path: str, index: StreamIndex, shortest_edge: int | None = None):
        if not torchcodec_available():
            raise VideoError(f"{path}: torchcodec cannot load (not installed, or no FFmpeg 4-9 libraries found)")
        from torchcodec.decoders import VideoDecoder

        self.path, self.index, self.info = path, index, index.info
        if index.order_only:  # seen: frame i-2 for most indices of an H.264 AVI with B-frames
            raise VideoError(f"{path}: torchcodec cannot guarantee frames in {index.container} without timestamps")
        try:
            self.decoder = VideoDecoder(path, seek_mode="exact", dimension_order="NCHW", num_ffmpeg_threads=1)
        except Exception as err:
            raise VideoError(f"{path}: torchcodec cannot open it ({_first_line(err)})") from None
        if len(self.decoder) != self.info.num_frames:
            raise VideoError(
                f"{path}: torchcodec finds {len(self.decoder)} frames, the stream has {self.info.num_frames}"
            )
        self.begin_s = float(self.decoder.metadata.begin_stream_seconds or 0.0)
        self.size = scaled_size(self.info.height, self.info.width, shortest_edge)

    def read(self, indices: list[int]) -> np.ndarray:
        try:
            batch = self.decoder.get_frames_at(indices)
        except Exception as err:
            raise VideoError(f"{self.path}: torchcodec failed to decode frames ({_first_line(err)})") from None
        check_returned(self.path, self.name, self.index, indices, [float(t) - self.begin_s for t in batch.pts_seconds])
        frames = batch.data  # uint8 (T, C, H, W)
        if tuple(frames.shape[2:]) != (self.info.height, self.info.width):
            raise VideoError(
                f"{self.path}: torchcodec returned {frames.shape[3]}x{frames.shape[2]} frames, the video shows "
                f"{self.info.width}x{self.info.height}"
            )
        if self.size is not None:
            from torchvision.transforms.v2.functional import resize

            frames = resize(frames, list(self.size), antialias=True)
        return frames.permute(0, 2, 3, 1).contiguous().numpy()

    def close(self) -> None:
        del self.decoder
