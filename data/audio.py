"""A clip's sound for exactly the span its sampled frames show: decoded from the same file, mono, resampled to the
rate the family's feature extractor takes. TorchCodec's AudioDecoder first (FFmpeg's resampler), PyAV's
AudioResampler as the fallback; a file without an audio stream gives None (the family then sends silence or no audio
part, as its processor expects).

Times: frame timestamps (data/video) count from the video stream's first frame; audio is cut on the same clock
(the container's), so the span starts at the first sampled frame and ends when the last sampled frame stops
showing (the next frame's time, or the stream's end).

Sound files (a conversation's `audio` parts: WAV, FLAC, MP3, or a video file's sound track) go through the same
decoders, on their audio stream's own clock (0 s = its first sample), whole or from start_s to end_s. Their length
comes from the header (`sound_span`), so a row is measured without decoding, and the decoded samples are fitted to
exactly that length: the measured token count is the built one.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np

from vidtune.data.measure_cache import cache_dir
from vidtune.data.video.base import CONTAINER_DEMUXERS, Clip, VideoError, VideoInfo, is_video_container
from vidtune.data.video.probe import open_container, probe_stream

log = logging.getLogger(__name__)

AUDIO_MODES = ("auto", "on", "off")  # data.audio: auto = when the family hears and the file has sound
# PyAV opens sound files with these demuxers only (as videos with CONTAINER_DEMUXERS: data/video/base.py says why)
SOUND_DEMUXERS = CONTAINER_DEMUXERS + ",wav,mp3,flac"
SOUND_FORMATS = ("wav", "mp3", "flac")  # the `format` of sound bytes given inline (OpenAI's input_audio)


@dataclass
class Audio:
    samples: np.ndarray  # float32 (N,), mono, in [-1, 1]
    sampling_rate: int
    start_s: float  # the span on the frames' clock (first frame = 0)
    end_s: float
    backend: str = ""

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sampling_rate


def span_of(info: VideoInfo, indices: list[int]) -> tuple[float, float]:
    """(start, end) seconds frames `indices` show: the first one's time to when the last one leaves the screen."""
    times = info.times_s
    last = max(indices)
    end = float(times[last + 1]) if last + 1 < len(times) else info.duration_s
    return float(times[min(indices)]), end


def clip_span(clip: Clip) -> tuple[float, float]:
    """(start, end) seconds the clip's sampled frames show."""
    return span_of(clip.info, clip.indices)


@functools.lru_cache(maxsize=1024)
def _stream_facts(path: str) -> tuple[bool, float]:
    """(has an audio stream, the video stream's first presentation time in container seconds)."""
    container = open_container(path)
    try:
        has_audio = bool(container.streams.audio)
    finally:
        container.close()
    index = probe_stream(path)
    return has_audio, index.pts[0] * index.time_base if index.time_base else 0.0


def has_audio_stream(path: str) -> bool:
    return _stream_facts(path)[0]


def load_audio_span(path: str, start_s: float, end_s: float, sampling_rate: int, backend: str = "auto") -> Audio | None:
    """The file's sound from `start_s` to `end_s` (the frames' clock), mono float32 at `sampling_rate`, exactly
    round((end - start) x rate) samples (a stream shorter than the span is padded with silence); None when the file
    has no audio stream. Raises VideoError when the sound cannot be decoded by any backend."""
    if end_s <= start_s:
        raise VideoError(f"{path}: empty audio span {start_s:.3f}-{end_s:.3f}s")
    has_audio, origin_s = _stream_facts(path)
    if not has_audio:
        return None
    return _decode_span(path, origin_s, start_s, end_s, sampling_rate, backend)


def _decode_span(path: str, origin_s: float, start_s: float, end_s: float, sampling_rate: int, backend: str) -> Audio:
    """The audio stream's sound from `start_s` to `end_s` after `origin_s` (container seconds), by the first backend
    that reads it, fitted to exactly round((end - start) x rate) samples (silence pads a short stream)."""
    num_samples = round((end_s - start_s) * sampling_rate)
    readers = {"torchcodec": _torchcodec_span, "pyav": _pyav_span}
    names = list(readers) if backend == "auto" else [backend]
    reasons = []
    for name in names:
        if name not in readers:
            raise VideoError(f"{path}: unknown audio backend {name!r} (one of auto, {', '.join(readers)})")
        try:
            samples = readers[name](path, origin_s + start_s, origin_s + end_s, sampling_rate)
        except Exception as err:  # a decoder's own error types; the next backend may read it
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
            log.debug("%s: %s cannot decode the audio: %s", path, name, reason)
            reasons.append(f"{name}: {reason}")
            continue
        fitted = np.zeros(num_samples, dtype=np.float32)
        fitted[: min(num_samples, len(samples))] = samples[:num_samples]
        return Audio(fitted, sampling_rate, start_s, end_s, name)
    raise VideoError(f"{path}: cannot decode its audio ({'; '.join(reasons)})")


# ------------------------------------------------------------------------------------------------- sound files


def is_sound_file(head: bytes) -> bool:
    """WAV, FLAC or MP3 by their first bytes, or a video container (whose sound track is heard: M4A, Ogg, WebM)."""
    return (
        (head.startswith(b"RIFF") and head[8:12] == b"WAVE")
        or head.startswith((b"fLaC", b"ID3"))
        or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)  # an MPEG audio frame's sync word
        or is_video_container(head)
    )


def check_sound_file(path: str) -> None:
    """Refuses what is no sound file by its first bytes, before any decoder opens it (FFmpeg would follow a
    playlist's links, whatever the file's name)."""
    if not os.path.isfile(path):
        raise VideoError(f"{path}: sound file not found" if not os.path.exists(path) else f"{path}: not a file")
    with open(path, "rb") as f:
        head = f.read(192)
    if not head:
        raise VideoError(f"{path}: empty file (0 bytes)")
    if not is_sound_file(head):
        raise VideoError(f"{path}: cannot open it: not a sound file (WAV, FLAC, MP3, or a video container with sound)")


@functools.lru_cache(maxsize=4096)
def _sound_facts(real_path: str, size: int, mtime_ns: int, path: str) -> tuple[float, float]:
    """(the audio stream's first presentation time, its duration), in seconds, from the header (nothing decoded)."""
    container = open_container(path, SOUND_DEMUXERS, "sound")
    try:
        if not container.streams.audio:
            raise VideoError(f"{path}: no audio stream to hear")
        stream = container.streams.audio[0]
        time_base = float(stream.time_base or 0)
        origin_s = float(stream.start_time or 0) * time_base
        if stream.duration and time_base:
            duration_s = float(stream.duration) * time_base
        else:  # (some containers give only their own duration, in microseconds)
            duration_s = float(container.duration or 0) / 1e6
    finally:
        container.close()
    if duration_s <= 0:
        raise VideoError(f"{path}: its header gives the sound no duration")
    return origin_s, duration_s


def sound_facts(path: str) -> tuple[float, float]:
    """(origin, duration) seconds of a sound file's audio stream, kept per file version."""
    check_sound_file(path)
    stat = os.stat(path)
    return _sound_facts(os.path.realpath(path), stat.st_size, stat.st_mtime_ns, path)


def sound_span(path: str, start_s: float | None = None, end_s: float | None = None) -> tuple[float, float]:
    """(start, end) seconds of a sound file that a part asks for, on its own clock: the whole sound without bounds;
    an end past the sound's end stops there. Raises VideoError for a file that is no readable sound."""
    _, duration_s = sound_facts(path)
    start = start_s or 0.0
    end = duration_s if end_s is None else min(end_s, duration_s)
    if end <= start:
        asked = f"{start:g}-{end_s:g}s" if end_s is not None else f"from {start:g}s on"
        raise VideoError(f"{path}: the span {asked} holds none of its {duration_s:.2f}s of sound")
    return start, end


def load_sound(
    path: str, sampling_rate: int, start_s: float | None = None, end_s: float | None = None, backend: str = "auto"
) -> Audio:
    """A sound file's audio (whole, or from `start_s` to `end_s`), mono float32 at `sampling_rate`, exactly
    round((end - start) x rate) samples for the span `sound_span` gives. Raises VideoError naming the file."""
    start, end = sound_span(path, start_s, end_s)
    origin_s, _ = sound_facts(path)
    return _decode_span(path, origin_s, start, end, sampling_rate, backend)


def silent_span(clip: Clip, sampling_rate: int) -> Audio:
    """Silence for the span of a clip whose file has no sound (heard beside a clip that has: the family's
    processor takes one sound per video of a heard sample)."""
    start_s, end_s = clip_span(clip)
    samples = np.zeros(round((end_s - start_s) * sampling_rate), np.float32)
    return Audio(samples, sampling_rate, start_s, end_s, "silence")


def load_clip_audio(path: str, clip: Clip, sampling_rate: int, backend: str = "auto") -> Audio | None:
    """The sound of the span the clip's sampled frames show (None: the file is silent, it has no audio stream)."""
    start_s, end_s = clip_span(clip)
    return load_audio_span(path, start_s, end_s, sampling_rate, backend)


def _torchcodec_span(path: str, start_s: float, end_s: float, sampling_rate: int) -> np.ndarray:
    from torchcodec.decoders import AudioDecoder

    decoder = AudioDecoder(path, sample_rate=sampling_rate, num_channels=1)
    begin = float(decoder.metadata.begin_stream_seconds or 0.0)
    # before the audio stream begins there is silence: ask from its start and pad in front
    played = decoder.get_samples_played_in_range(max(start_s, begin), end_s)
    samples = played.data.mean(0).numpy().astype(np.float32)
    lead = round((float(played.pts_seconds) - start_s) * sampling_rate)
    return np.concatenate([np.zeros(max(lead, 0), np.float32), samples[max(-lead, 0) :]])


def _pyav_span(path: str, start_s: float, end_s: float, sampling_rate: int) -> np.ndarray:
    import av

    container = open_container(path, SOUND_DEMUXERS, "sound")  # (the file's first bytes were checked)
    try:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
        if stream.time_base:
            container.seek(int(start_s / stream.time_base), stream=stream, backward=True, any_frame=False)
        chunks: list[np.ndarray] = []
        first_s: float | None = None
        for frame in container.decode(stream):
            if first_s is None:
                first_s = float(frame.time) if frame.time is not None else 0.0
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
            if frame.time is not None and frame.time > end_s:
                break
        for out in resampler.resample(None):  # flush
            chunks.append(out.to_ndarray().reshape(-1))
    finally:
        container.close()
    if first_s is None:
        raise VideoError(f"{path}: the audio stream holds no samples")
    decoded = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    offset = round((start_s - first_s) * sampling_rate)
    if offset < 0:  # the stream starts after the span does: silence in front
        return np.concatenate([np.zeros(-offset, np.float32), decoded])
    return decoded[offset:]


def sound_bytes(data: str, fmt: str) -> bytes:
    """The sound bytes of OpenAI's `input_audio` ({"data": base64, "format": "wav"}); ValueError says what is wrong."""
    if fmt not in SOUND_FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(SOUND_FORMATS)}")
    if data.startswith("data:"):  # (a data: URL where the bare base64 belongs)
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("`data` is not valid base64") from None


def store_sound(data: str, fmt: str) -> str:
    """Inline sound bytes of a corpus row, as a file every later stage reads like any sound file: in the cache folder,
    named by their hash, so the same bytes are one file whichever process or run normalises the row first (written
    once, atomically), and measuring caches key on it like on any path."""
    content = sound_bytes(data, fmt)
    folder = cache_dir() / "sounds"
    path = folder / f"{hashlib.sha256(content).hexdigest()}.{fmt}"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"{path.name}.{os.getpid()}.partial"
        partial.write_bytes(content)
        os.replace(partial, path)
    return str(path)
