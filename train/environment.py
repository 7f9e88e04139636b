"""`vidtune env`: what a bug report needs, in one screen: library versions, CUDA and GPUs, FFmpeg, and which video
decoders actually decode here (each one tried on a clip generated on the spot, not just imported)."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

LIBRARIES = ("vidtune", "torch", "torchvision", "transformers", "peft", "accelerate", "deepspeed", "datasets")
DECODER_PACKAGES = {"torchcodec": "torchcodec", "decord": "decord", "pyav": "av"}


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def ffmpeg_version() -> str:
    if shutil.which("ffmpeg") is None:
        return "no ffmpeg on PATH"
    first = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    return first[0] if first else "unknown"


def _torchcodec(path: str) -> tuple[int, ...]:
    from torchcodec.decoders import VideoDecoder

    return tuple(VideoDecoder(path).get_frame_at(0).data.shape)


def _decord(path: str) -> tuple[int, ...]:
    import decord

    return tuple(decord.VideoReader(path)[0].shape)


def _pyav(path: str) -> tuple[int, ...]:
    import av

    with av.open(path) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24").shape


DECODERS: dict[str, Callable[[str], tuple[int, ...]]] = {"torchcodec": _torchcodec, "decord": _decord, "pyav": _pyav}


def decoder_report(path: str) -> dict[str, str]:
    """Each decoder on a real H.264 MP4: `works (frame H x W x C)` or why not, in a line."""
    report = {}
    for name, decode in DECODERS.items():
        try:
            shape = decode(path)
            report[name] = f"works ({version(DECODER_PACKAGES[name])}, first frame {shape})"
        except Exception as err:  # an import error, missing FFmpeg libraries, a refused file: all are answers here
            report[name] = f"fails: {type(err).__name__}: {' '.join(str(err).split())[:120]}"
    return report


def environment_lines() -> list[str]:
    import torch

    lines = [f"python        {sys.version.split()[0]} ({platform.platform()})"]
    lines += [f"{name:<13} {version(name)}" for name in LIBRARIES]
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"cuda          {torch.version.cuda}; {len(gpus)} GPU(s): {', '.join(gpus)}")
    else:
        lines.append(f"cuda          not available (torch built for CUDA {torch.version.cuda or 'none'})")
    lines.append(f"ffmpeg        {ffmpeg_version()}")
    from vidtune.train.demo.clips import write_color_clip

    with tempfile.TemporaryDirectory() as folder:
        clip = write_color_clip(Path(folder) / "probe.mp4", ["red", "blue"])
        lines += [f"decoder       {name}: {status}" for name, status in decoder_report(str(clip)).items()]
    return lines
