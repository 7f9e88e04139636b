"""Decoding behind one interface (TorchCodec, decord, PyAV), sampling by presentation time; frames come out
upright as uint8 (T, H, W, C) with their true timestamps.

base.py              the shared shapes: VideoError, VideoInfo (every frame's pts), StreamIndex, Clip, SamplingConfig
probe.py             demuxed pts, rotation and the reasons a file cannot be read (no stream, codec, truncated)
sampling.py          uniform / jittered / fps-capped sampling on time, clip bounds, time instructions
torchcodec_backend.py TorchCodec reader (first choice): exact seeks, returned pts checked
decord_backend.py    decord reader, refused where it decodes wrong (rotation, AVI without timestamps)
pyav_backend.py      PyAV reader: exact-pts matching, decode-order counting for AVI
loading.py           open_video (auto fallback on open or read), probe_video, load_clip, images
"""

from vidtune.data.video.base import (
    BACKENDS,
    CONTAINER_DEMUXERS,
    Clip,
    SamplingConfig,
    StreamIndex,
    VideoError,
    VideoInfo,
    is_video_container,
    scaled_size,
    validate_sampling,
)
from vidtune.data.video.loading import (
    available_backends,
    check_clip,
    image_size,
    load_clip,
    load_image,
    open_video,
    probe_video,
)
from vidtune.data.video.sampling import (
    clip_bounds,
    frames_in_clip,
    num_sampled_frames,
    sample_frame_indices,
    time_instruction,
    timestamps_for,
)

__all__ = [
    "BACKENDS",
    "CONTAINER_DEMUXERS",
    "Clip",
    "SamplingConfig",
    "StreamIndex",
    "VideoError",
    "VideoInfo",
    "available_backends",
    "check_clip",
    "clip_bounds",
    "frames_in_clip",
    "image_size",
    "is_video_container",
    "load_clip",
    "load_image",
    "num_sampled_frames",
    "open_video",
    "probe_video",
    "sample_frame_indices",
    "scaled_size",
    "time_instruction",
    "timestamps_for",
    "validate_sampling",
]
