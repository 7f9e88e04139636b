"""What the tests of the families that hear share: clip twins with identical pictures (red then blue) and a low or
a high tone, sound files of tones (WAV, FLAC, MP3), and the one-video question built from a clip with its sound
decoded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vidtune.data.conversation import media_part, message, text_part
from vidtune.data.dataset import load_media
from vidtune.data.video import SamplingConfig
from vidtune.train.demo.clips import tone_samples, write_tone_clip

LOW_HZ, HIGH_HZ = 300, 2500


def write_tone_twins(root: Path) -> dict[int, Path]:
    """Identical pictures (red then blue), a low or a high tone: {hz: clip}."""
    return {
        hz: write_tone_clip(root / f"tone_{hz}.mp4", ["red", "blue"], [hz, hz], seconds_per_segment=1.0)
        for hz in (LOW_HZ, HIGH_HZ)
    }


SOUND_CODECS = {".wav": ("pcm_s16le", "s16"), ".flac": ("flac", "s16"), ".mp3": ("libmp3lame", "fltp")}


def write_tone_sound(path: Path, tones_hz: list[float], seconds_per_tone: float = 1.0, rate: int = 22050) -> Path:
    """A mono sound file of one sine per segment (its codec by the file's suffix: WAV, FLAC or MP3), sampled at
    `rate` (not the 16 kHz the families hear at, so every load resamples)."""
    import av
    import numpy as np

    codec, layout = SOUND_CODECS[path.suffix]
    samples = tone_samples(tones_hz, seconds_per_tone, rate)
    data = (samples * 32767).astype(np.int16) if layout == "s16" else samples
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream: Any = container.add_stream(codec, rate=rate, layout="mono")
        for start in range(0, len(data), 1152):
            frame = av.AudioFrame.from_ndarray(data[None, start : start + 1152], format=layout, layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def sound_question(path: Any, answer: str = "low") -> list:
    """An audio-only conversation: a sound file and a question about it."""
    return [
        message("user", [media_part("audio", str(path)), text_part("Is the tone high or low?")]),
        message("assistant", [text_part(answer)]),
    ]


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


def write_undecodable_sound(path):
    """A MOV whose pictures decode and whose sound track cannot: its PCM track's sample entry tagged 'zzzz' (no
    decoder knows it)."""
    import av
    import numpy as np

    from vidtune.train.demo.clips import segment_frames

    sound = (tone_samples([LOW_HZ, LOW_HZ], 1.0, 16000) * 32767).astype(np.int16)
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=8)
        video.height, video.width, video.pix_fmt = 48, 64, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=16000, layout="mono")
        for frame in segment_frames(["red", "blue"], 8, 48, 64):
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        for start in range(0, len(sound), 1024):
            chunk = av.AudioFrame.from_ndarray(sound[None, start : start + 1024], format="s16", layout="mono")
            chunk.sample_rate, chunk.pts = 16000, start
            container.mux(audio.encode(chunk))
        container.mux(audio.encode())
    data = path.read_bytes()
    assert data.count(b"sowt") == 1
    path.write_bytes(data.replace(b"sowt", b"zzzz"))
    return path
