"""What the tests of the families that hear share: clip twins with identical pictures (red then blue) and a low or
a high tone, and the one-video question built from a clip with its sound decoded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vidtune.data.conversation import media_part, message, text_part
from vidtune.data.dataset import load_media
from vidtune.data.video import SamplingConfig
from vidtune.train.demo.clips import write_tone_clip

LOW_HZ, HIGH_HZ = 300, 2500


def write_tone_twins(root: Path) -> dict[int, Path]:
    """Identical pictures (red then blue), a low or a high tone: {hz: clip}."""
    return {
        hz: write_tone_clip(root / f"tone_{hz}.mp4", ["red", "blue"], [hz, hz], seconds_per_segment=1.0)
        for hz in (LOW_HZ, HIGH_HZ)
    }


def question(path: Any, answer: str = "red") -> list:
    return [
        message("user", [media_part("video", str(path)), text_part("Which color comes first?")]),
        message("assistant", [text_part(answer)]),
    ]


def heard_example(kit: Any, path: Any, answer: str = "red", audio_rate: int | None = 16000) -> dict[str, Any]:
    """The family's example of `question` on `path`, its sound decoded at `audio_rate` (None: pictures only)."""
    messages = question(path, answer)
    media, _ = load_media(messages, SamplingConfig(4), False, None, audio_rate=audio_rate)
    return kit.builder.build(messages, media)
