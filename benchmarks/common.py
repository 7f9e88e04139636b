"""Shared pieces of the benchmarks: a processor shaped like LLaVA-NeXT-Video-7B's, generated clips, the machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def seven_b_processor(workdir: Path):
    """The 7B's video pipeline (336 px frames, 14 px patches, 144 tokens per frame) over the tiny tokenizer: the
    pixel work of the real model; text work is negligible either way."""
    from transformers import LlavaNextImageProcessor, LlavaNextVideoProcessor, LlavaNextVideoVideoProcessor

    from vidtune.train.demo.tiny_model import HUB_STYLE_CHAT_TEMPLATE, build_tokenizer

    size, crop = {"shortest_edge": 336}, {"height": 336, "width": 336}
    return LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(size=size, crop_size=crop),
        image_processor=LlavaNextImageProcessor(size=size, crop_size=crop),
        tokenizer=build_tokenizer(),
        chat_template=HUB_STYLE_CHAT_TEMPLATE,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def generated_clip(
    path: Path, seconds: float, fps: int = 30, height: int = 720, width: int = 1280, gop_seconds: float = 2.0
) -> Path:
    """An H.264 clip with a keyframe every gop_seconds (encoded once, then reused): a colour gradient that slides
    every frame, so the encoder codes real motion."""
    from vidtune.train.demo.clips import PALETTE, write_video

    if path.is_file():
        return path
    colors = np.array(list(PALETTE.values()), dtype=np.float32)
    ramp = np.linspace(0.4, 1.0, width, dtype=np.float32)[None, :, None]

    def frames():
        for index in range(round(seconds * fps)):
            shade = colors[(index // fps) % len(colors)] * np.roll(ramp, index * 7, axis=1)
            yield np.broadcast_to(shade, (height, width, 3)).astype(np.uint8)

    return write_video(path, frames(), fps=fps, gop_frames=round(gop_seconds * fps))
