"""`vidtune frames VIDEO`: the frames evaluation sampling picks from one video, as a user can check them: which
backend decoded it, its duration and displayed size, each frame's index (presentation order) and time; `--out`
writes the frames as PNGs and a contact sheet with their times."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from vidtune.data.video import Clip, SamplingConfig, load_clip, validate_sampling


def sample_video(
    path: str,
    num_frames: int = 8,
    fps: float | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    backend: str = "auto",
    shortest_edge: int | None = None,
) -> Clip:
    """Deterministic (evaluation) sampling: the frame on screen at each segment's centre."""
    sampling = SamplingConfig(num_frames, fps, backend)
    validate_sampling(sampling)
    return load_clip(path, sampling, start_s, end_s, None, shortest_edge=shortest_edge)


def describe(path: str, clip: Clip) -> dict[str, Any]:
    """`rotation`: the display matrix's turn as ffprobe states it ("rotation of -90.00 degrees": -90); width and
    height are as displayed, frames come out upright."""
    from vidtune.data.video.base import ffprobe_rotation
    from vidtune.data.video.probe import probe_stream

    return {
        "path": path,
        "backend": clip.backend,
        "duration_s": round(clip.info.duration_s, 6),
        "width": clip.info.width,
        "height": clip.info.height,
        "rotation": ffprobe_rotation(probe_stream(path).rotation),  # probed once per file version, cached
        "frames": [
            {"index": index, "pts_s": round(t, 6)} for index, t in zip(clip.indices, clip.timestamps_s, strict=True)
        ],
    }


def capped_note(clip: Clip, fps: float | None, num_frames: int, start_s: float | None, end_s: float | None) -> str:
    """When --fps over the clip asks for more frames than --num-frames allows: say so (sampling takes at most
    --num-frames, spread over the clip, so the rate is lower than asked)."""
    if fps is None:
        return ""
    span_s = (clip.info.duration_s if end_s is None else end_s) - (start_s or 0.0)
    asked = math.floor(span_s * fps + 1e-6)
    if asked <= num_frames:
        return ""
    return (
        f"  note: --fps {fps:g} over {span_s:.2f}s would take {asked} frames; capped at --num-frames {num_frames}, "
        f"so {num_frames / span_s:.2g} frames/s (raise --num-frames for more)"
    )


def contact_sheet(frames: np.ndarray, labels: list[str], columns: int = 4, cell_px: int = 240) -> Any:
    """A PIL image: frames in rows of `columns`, each scaled to fit `cell_px` (aspect kept) above its label."""
    from PIL import Image, ImageDraw

    label_px = 16
    rows = max(1, -(-len(frames) // columns))
    sheet = Image.new("RGB", (columns * cell_px, rows * (cell_px + label_px)), "white")
    draw = ImageDraw.Draw(sheet)
    for position, (frame, label) in enumerate(zip(frames, labels, strict=True)):
        image = Image.fromarray(frame)
        image.thumbnail((cell_px, cell_px)) if max(image.size) > cell_px else None
        if max(image.size) < cell_px // 2:  # tiny frames: enlarge so a person can see them
            scale = (cell_px * 3 // 4) // max(image.size)
            image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        left, top = (position % columns) * cell_px, (position // columns) * (cell_px + label_px)
        sheet.paste(image, (left + (cell_px - image.width) // 2, top + (cell_px - image.height) // 2))
        draw.text((left + 4, top + cell_px + 2), label, fill="black")
    return sheet


def write_frames(clip: Clip, out: str | Path) -> list[Path]:
    """frame_00.png, ... in sampling order, and sheet.png; returns the paths written."""
    from PIL import Image

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for position, frame in enumerate(clip.frames):
        path = folder / f"frame_{position:02d}.png"
        Image.fromarray(frame).save(path)
        written.append(path)
    labels = [f"#{i}  {t:.2f}s" for i, t in zip(clip.indices, clip.timestamps_s, strict=True)]
    contact_sheet(clip.frames, labels).save(folder / "sheet.png")
    return [*written, folder / "sheet.png"]


AUDIO_RATE = 16000  # what the families that hear take (Qwen2.5-Omni's feature extractor)


def describe_audio(path: str, clip: Clip, out: str | Path | None, rate: int = AUDIO_RATE) -> dict[str, Any]:
    """The sound of the sampled span (data/audio.py), as a family that hears gets it; with `out`, audio.wav."""
    from vidtune.data.audio import clip_span, load_clip_audio

    start_s, end_s = clip_span(clip)
    audio = load_clip_audio(path, clip, rate)
    report: dict[str, Any] = {"start_s": round(start_s, 6), "end_s": round(end_s, 6), "sampling_rate": rate}
    if audio is None:
        return {**report, "stream": False}
    report.update(stream=True, backend=audio.backend, num_samples=len(audio.samples))
    if out is not None:
        report["wav"] = str(write_wav(audio.samples, rate, Path(out) / "audio.wav"))
    return report


def write_wav(samples: np.ndarray, rate: int, path: Path) -> Path:
    """16-bit PCM mono WAV (the standard library's writer)."""
    import wave

    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes())
    return path


def format_text(report: dict[str, Any]) -> str:
    frames = "  ".join(f"#{f['index']}@{f['pts_s']:.2f}s" for f in report["frames"])
    rotation = f" (rotation {report['rotation']}, turned upright)" if report.get("rotation") else ""
    text = (
        f"{report['path']}: {report['width']}x{report['height']}{rotation}, {report['duration_s']:.2f}s, "
        f"decoded by {report['backend']}\n  {len(report['frames'])} frames: {frames}"
    )
    audio = report.get("audio")
    if audio is not None:
        span = f"{audio['start_s']:.2f}-{audio['end_s']:.2f}s"
        text += (
            f"\n  audio {span}: "
            + (f"{audio['num_samples']} samples at {audio['sampling_rate']} Hz, decoded by {audio['backend']}"
               if audio["stream"] else "no audio stream")
            + (f", written to {audio['wav']}" if audio.get("wav") else "")
        )  # fmt: skip
    return text


def print_report(report: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(report) if as_json else format_text(report))
