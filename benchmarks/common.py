"""Shared pieces of the benchmarks: interleaved timing with spreads, the shared clips, generated clips, a processor
shaped like LLaVA-NeXT-Video-7B's, the machine.

Timing: methods compared against each other run interleaved, A B C A B C ... over rounds, so a slow spell of a
shared machine (other jobs, thermal, the page cache) hits every method alike instead of whichever ran during it;
each method reports min / median / max over its rounds, and ratios are taken per round (A and B of the same round
saw the same machine), then summarised the same way.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_CANDIDATES = (REPO / "shared", REPO.parent / "shared")  # in the checkout, or beside it (CI's layout)


# ------------------------------------------------------------------------------------------------------ timing


@dataclass(frozen=True)
class Spread:
    """min / median / max of one figure over rounds."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        values = list(values)
        return cls(min(values), statistics.median(values), max(values))

    def format(self, digits: int = 2, suffix: str = "") -> str:
        return f"{self.min:.{digits}f}/{self.median:.{digits}f}/{self.max:.{digits}f}{suffix}"


def interleaved(
    methods: Mapping[str, Callable[[], object]], rounds: int, warmup_rounds: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each method, called A B C A B C ... for `rounds` rounds after `warmup_rounds` untimed
    ones (imports, codec set-up, first-touch allocations and the page cache are paid there, by every method)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    for _ in range(warmup_rounds):
        for method in methods.values():
            method()
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, method in methods.items():
            started = time.perf_counter()
            method()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def rates(seconds: list[float], work: float = 1.0) -> Spread:
    """Work per second (samples/s, frames/s) of each round: the slowest round gives the minimum."""
    return Spread.of(work / s for s in seconds)


def speedup(seconds: Mapping[str, list[float]], method: str, baseline: str) -> Spread:
    """How many times faster `method` ran than `baseline`, round by round (paired: same round, same machine)."""
    return Spread.of(base / own for base, own in zip(seconds[baseline], seconds[method], strict=True))


# ------------------------------------------------------------------------------------------------ shared clips


def add_shared_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shared",
        help="the folder holding the shared material (videos/...); default: shared/ in the checkout or beside it",
    )


def shared_clips(names: Iterable[str], shared: str | None) -> dict[str, Path]:
    """The shared clips (videos/NAME) that exist; each one missing is said, on stdout beside the figures and on
    stderr, with the places looked in: never skipped silently (a run without them has fewer rows, not other ones)."""
    folders = [Path(shared)] if shared else list(SHARED_CANDIDATES)
    found: dict[str, Path] = {}
    for name in names:
        path = next((f / "videos" / name for f in folders if (f / "videos" / name).is_file()), None)
        if path is None:
            looked = ", ".join(str(f / "videos") for f in folders)
            message = f"MISSING shared clip {name}: not in {looked}; pass --shared DIR to measure it"
            print(message, flush=True)
            print(message, file=sys.stderr)
        else:
            found[name] = path
    return found


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


# How the generated clips are encoded. "ultrafast" (no B-frames, no CABAC) is the cheapest H.264 to decode;
# "camera" is what ffmpeg/x264 give by default and most published video looks like: preset medium, 3 B-frames
# between references (fixed: x264 would pick P-frames for this synthetic motion)
# (pyramid), CABAC, so decoding a frame costs more and decode order differs from presentation order.
ENCODINGS = {
    "ultrafast": {"preset": "ultrafast"},
    "camera": {"preset": "medium", "x264-params": "bframes=3:b-adapt=0"},
}


def generated_clip(
    path: Path,
    seconds: float,
    fps: int = 30,
    height: int = 720,
    width: int = 1280,
    gop_seconds: float = 2.0,
    encoding: str = "ultrafast",
) -> Path:
    """An H.264 clip with a keyframe every gop_seconds (encoded once, then reused): a colour gradient that slides
    every frame, so the encoder codes real motion. `encoding` names one of ENCODINGS."""
    from vidtune.train.demo.clips import PALETTE, write_video

    if path.is_file():
        return path
    colors = np.array(list(PALETTE.values()), dtype=np.float32)
    ramp = np.linspace(0.4, 1.0, width, dtype=np.float32)[None, :, None]

    def frames():
        for index in range(round(seconds * fps)):
            shade = colors[(index // fps) % len(colors)] * np.roll(ramp, index * 7, axis=1)
            yield np.broadcast_to(shade, (height, width, 3)).astype(np.uint8)

    return write_video(path, frames(), fps=fps, gop_frames=round(gop_seconds * fps), x264_options=ENCODINGS[encoding])
