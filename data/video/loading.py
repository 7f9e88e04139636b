"""One decoder interface over three backends: `open_video` probes the stream once (every frame's pts, rotation)
and hands it to TorchCodec, decord or PyAV. `auto` tries them in that order and moves on when one cannot open a
file, cannot read it, or cannot guarantee the right frames for it (each reason is logged at debug level); the
backend that served a clip is recorded on it. Decoder log noise is silenced: reasons go to the bad-sample report."""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

import numpy as np

from vidtune.data.quality import MAX_FRAME_PIXELS, time_limit
from vidtune.data.video.base import Clip, SamplingConfig, StreamIndex, VideoError, VideoInfo
from vidtune.data.video.decord_backend import DecordReader
from vidtune.data.video.probe import probe_stream
from vidtune.data.video.pyav_backend import PyAVReader
from vidtune.data.video.sampling import frames_in_clip, num_sampled_frames, sample_frame_indices, timestamps_for
from vidtune.data.video.torchcodec_backend import TorchCodecReader, torchcodec_available

log = logging.getLogger(__name__)


class Reader(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def info(self) -> VideoInfo: ...

    def read(self, indices: list[int]) -> np.ndarray: ...

    def close(self) -> None: ...


READERS: dict[str, Any] = {"torchcodec": TorchCodecReader, "decord": DecordReader, "pyav": PyAVReader}


def quiet_decoders() -> None:
    """FFmpeg prints warnings (damaged packets, deprecated pixel formats) to stderr from inside every backend."""
    import av

    av.logging.set_level(None)  # PyAV: no FFmpeg log callback output
    if torchcodec_available():
        from torchcodec._logging import set_log_level

        set_log_level("OFF")


def available_backends() -> list[str]:
    names = ["torchcodec"] if torchcodec_available() else []
    try:
        import decord  # noqa: F401

        names.append("decord")
    except ImportError:
        pass
    return [*names, "pyav"]


class AutoReader:
    """The first backend that opens the file and reads the frames asked for; on a failed read the next one."""

    def __init__(self, path: str, index: StreamIndex, shortest_edge: int | None):
        self.path, self.index, self.shortest_edge, self.info = path, index, shortest_edge, index.info
        self.remaining, self.reasons = available_backends(), list[str]()
        self.reader: Reader | None = None
        self._next()

    @property
    def name(self) -> str:
        return self.reader.name if self.reader else ""

    def _next(self) -> None:
        while self.remaining:
            name = self.remaining.pop(0)
            try:
                self.reader = READERS[name](self.path, self.index, self.shortest_edge)
                return
            except VideoError as err:
                self._refused(name, err)
        raise VideoError(self._summary())

    def _refused(self, name: str, err: VideoError) -> None:
        reason = str(err).removeprefix(f"{self.path}: ")
        log.debug("%s: %s refused: %s", self.path, name, reason)
        self.reasons.append(reason)
        self.reader = None

    def _summary(self) -> str:
        return f"{self.path}: {self.reasons[-1]}" + (
            f" (also: {'; '.join(self.reasons[:-1])})" if self.reasons[1:] else ""
        )

    def read(self, indices: list[int]) -> np.ndarray:
        while True:
            assert self.reader is not None
            try:
                return self.reader.read(indices)
            except VideoError as err:
                name = self.reader.name
                self.reader.close()
                self._refused(name, err)
                self._next()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def open_video(
    path: str, backend: str = "auto", shortest_edge: int | None = None, max_frame_pixels: int | None = MAX_FRAME_PIXELS
) -> Reader:
    """A reader with `.info`, `.name` and `.read(indices)` -> upright uint8 (T, H, W, 3) frames. With
    `shortest_edge`, frames come back scaled down (on the displayed shape) so their shorter side is that long.
    Frames over `max_frame_pixels` are refused from the stream's header, before any decoder opens the file."""
    quiet_decoders()
    index = probe_stream(path)
    check_pixels(path, index.info, max_frame_pixels)
    if backend == "auto":
        return AutoReader(path, index, shortest_edge)
    if backend not in READERS:
        raise VideoError(f"{path}: unknown backend {backend!r} (one of auto, {', '.join(READERS)})")
    return READERS[backend](path, index, shortest_edge)


def probe_video(path: str, backend: str = "auto") -> VideoInfo:
    """Frame count, times and displayed size from the demuxed stream (no decoding past the first frame)."""
    quiet_decoders()
    return probe_stream(path).info


def check_pixels(path: str, info: VideoInfo, max_frame_pixels: int | None) -> None:
    if max_frame_pixels and info.height * info.width > max_frame_pixels:
        raise VideoError(f"{path}: {info.width}x{info.height} frames exceed the {max_frame_pixels:,}-pixel limit")


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
    check_pixels(path, info, max_frame_pixels)
    if too_short == "drop":
        present = frames_in_clip(info, start_s, end_s)
        wanted = num_sampled_frames(info, cfg, start_s, end_s)
        if present < wanted:
            raise VideoError(f"{path}: too short: {present} frames in the clip, {wanted} to sample")


def load_clip(
    path: str,
    cfg: SamplingConfig,
    start_s: float | None = None,
    end_s: float | None = None,
    rng: np.random.Generator | None = None,
    decode_timeout_s: float = 120.0,
    shortest_edge: int | None = None,
    max_frame_pixels: int | None = MAX_FRAME_PIXELS,
) -> Clip:
    with time_limit(decode_timeout_s, path):
        reader = open_video(path, cfg.backend, shortest_edge, max_frame_pixels)
        try:
            indices = sample_frame_indices(reader.info, cfg, start_s, end_s, rng, path)
            frames = reader.read(indices)
            backend = reader.name
        finally:
            reader.close()
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise VideoError(f"{path}: decoder returned {frames.dtype} frames of shape {frames.shape}")
    return Clip(frames, indices, timestamps_for(indices, reader.info), reader.info, backend)


# The image formats vidtune reads; PIL would otherwise try every format it knows (an EPS file reaches Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def load_image(path: str, max_frame_pixels: int | None = MAX_FRAME_PIXELS) -> np.ndarray:
    """An image as uint8 (H, W, C) RGB; refused by its header's size over `max_frame_pixels`, before decoding."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise VideoError(f"{path}: image not found")
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            if max_frame_pixels and image.width * image.height > max_frame_pixels:
                raise VideoError(
                    f"{path}: {image.width}x{image.height} image exceeds the {max_frame_pixels:,}-pixel limit"
                )
            return np.array(image.convert("RGB"))  # a writable copy (torch refuses read-only arrays)
    except UnidentifiedImageError:
        raise VideoError(f"{path}: cannot read image (not one of {', '.join(IMAGE_FORMATS)})") from None
    except (OSError, Image.DecompressionBombError) as err:
        raise VideoError(f"{path}: cannot read image ({str(err)[:120]})") from None


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise VideoError(f"{path}: image not found")
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            return image.height, image.width
    except UnidentifiedImageError:
        raise VideoError(f"{path}: cannot read image (not one of {', '.join(IMAGE_FORMATS)})") from None
    except (OSError, Image.DecompressionBombError) as err:
        raise VideoError(f"{path}: cannot read image ({str(err)[:120]})") from None
