"""A clip's sound for exactly its sampled span (data/audio.py), checked on a generated clip with known tone times."""

from __future__ import annotations

import numpy as np
import pytest

from vidtune.data.audio import clip_span, has_audio_stream, load_audio_span, load_clip_audio
from vidtune.data.video import SamplingConfig, load_clip
from vidtune.train.demo.clips import write_color_clip, write_tone_clip

TONES_HZ = [300, 800, 1500, 2500]  # one per second, with the pictures red, green, blue, yellow
RATE = 16000


@pytest.fixture(scope="module")
def tone_clip(tmp_path_factory):
    return write_tone_clip(tmp_path_factory.mktemp("tone") / "tones.mp4", ["red", "green", "blue", "yellow"], TONES_HZ)


def dominant_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / RATE)[spectrum.argmax()])


@pytest.mark.parametrize("backend", ["torchcodec", "pyav"])
def test_the_sampled_span_decodes_to_the_tones_played_then(tone_clip, backend):
    # frames sampled from 1.0-3.0 s (8 fps): the span is the first sampled frame to the end of the last one
    clip = load_clip(str(tone_clip), SamplingConfig(num_frames=4), start_s=1.0, end_s=3.0)
    start_s, end_s = clip_span(clip)
    assert clip.timestamps_s[0] == pytest.approx(start_s) and 1.0 <= start_s < 1.5 and 2.5 < end_s <= 3.0
    audio = load_clip_audio(str(tone_clip), clip, RATE, backend)
    assert audio is not None and audio.backend == backend
    assert len(audio.samples) == round((end_s - start_s) * RATE) and audio.samples.dtype == np.float32
    # every 50 ms window's dominant frequency is the tone of the second it lies in (windows across a change skipped)
    window = RATE // 20
    checked = 0
    for begin in range(0, len(audio.samples) - window + 1, window):
        t0, t1 = start_s + begin / RATE, start_s + (begin + window) / RATE
        if int(t0 + 0.01) != int(t1 - 0.01):
            continue
        assert dominant_hz(audio.samples[begin : begin + window]) == pytest.approx(TONES_HZ[int(t0 + 0.01)], abs=25)
        checked += 1
    assert checked >= 15


def test_a_span_across_a_change_switches_tone_at_the_right_time(tone_clip):
    audio = load_audio_span(str(tone_clip), 0.5, 2.5, RATE)
    assert audio is not None
    window = RATE // 100  # 10 ms
    hz = [dominant_hz(audio.samples[i : i + 4 * window]) for i in range(0, len(audio.samples) - 4 * window, window)]
    first_800 = next(i for i, f in enumerate(hz) if abs(f - 800) < 100)
    first_1500 = next(i for i, f in enumerate(hz) if abs(f - 1500) < 100)
    # window i covers 40 ms from 0.5 + i x 10 ms: the new tone dominates once the change passes its middle, and
    # the tones change at 1.0 s and 2.0 s of the file
    assert abs(0.5 + first_800 * 0.01 + 0.02 - 1.0) <= 0.02
    assert abs(0.5 + first_1500 * 0.01 + 0.02 - 2.0) <= 0.02


def test_a_clip_without_sound_gives_none(tmp_path):
    silent = write_color_clip(tmp_path / "silent.mp4", ["red", "blue"])
    assert not has_audio_stream(str(silent))
    clip = load_clip(str(silent), SamplingConfig(num_frames=4))
    assert load_clip_audio(str(silent), clip, RATE) is None


def test_frames_audio_reports_the_span_and_writes_it_as_wav(tone_clip, tmp_path, capsys):
    import wave

    from vidtune.train.cli import main

    main(
        ["frames", str(tone_clip), "--num-frames", "4", "--start", "1", "--end", "3", "--audio", "--out", str(tmp_path)]
    )
    printed = capsys.readouterr().out
    assert "audio 1.25-2.88s: 26000 samples at 16000 Hz, decoded by torchcodec" in printed, printed
    with wave.open(str(tmp_path / "audio.wav"), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getnframes()) == (16000, 1, 26000)
        samples = np.frombuffer(wav.readframes(26000), "<i2").astype(np.float32) / 32767
    # frames at 1.25-2.75 s (8 fps): the span ends at 2.875 s, in the third second's tone
    assert dominant_hz(samples[:8000]) == pytest.approx(800, abs=25)
    assert dominant_hz(samples[-8000:]) == pytest.approx(1500, abs=25)
