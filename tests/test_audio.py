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


# --------------------------------------------------------------------------------------------------- sound files


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".mp3"])
def test_a_sound_file_decodes_whole_at_the_families_rate_with_its_tones_in_place(tmp_path, suffix):
    """A 22.05 kHz file (300 Hz then 2500 Hz, 1 s each), heard at 16 kHz: exactly its header's length, mono, each
    second's tone where it was; both backends alike."""
    from tests.hearing import write_tone_sound
    from vidtune.data.audio import load_sound, sound_span

    path = str(write_tone_sound(tmp_path / f"tones{suffix}", [300, 2500]))
    assert sound_span(path) == pytest.approx((0.0, 2.0), abs=0.06)  # (MP3 frames round its length up a little)
    start_s, end_s = sound_span(path)
    for backend in ("torchcodec", "pyav"):
        audio = load_sound(path, RATE, backend=backend)
        assert audio.backend == backend and audio.sampling_rate == RATE and audio.samples.dtype == np.float32
        assert audio.samples.ndim == 1 and len(audio.samples) == round((end_s - start_s) * RATE)
        assert dominant_hz(audio.samples[1000:7000]) == pytest.approx(300, abs=25)
        assert dominant_hz(audio.samples[RATE + 1000 : RATE + 7000]) == pytest.approx(2500, abs=25)
        assert 0.4 < np.abs(audio.samples[1000:7000]).max() < 0.6  # half amplitude, as written


def test_a_sound_files_span_and_a_videos_sound_track_as_a_sound_file(tmp_path, tone_clip):
    from tests.hearing import write_tone_sound
    from vidtune.data.audio import load_sound

    wav = str(write_tone_sound(tmp_path / "tones.wav", [300, 2500]))
    span = load_sound(wav, RATE, 0.75, 1.5)
    assert (span.start_s, span.end_s, len(span.samples)) == (0.75, 1.5, 12000)
    assert dominant_hz(span.samples[:3200]) == pytest.approx(300, abs=25)
    assert dominant_hz(span.samples[-6400:]) == pytest.approx(2500, abs=25)
    assert len(load_sound(wav, RATE, 1.5, 9.0).samples) == RATE // 2  # an end past the sound stops at its end
    track = load_sound(str(tone_clip), RATE, 2.0, 3.0)  # a video file's sound: its third second, 1500 Hz
    assert len(track.samples) == RATE and dominant_hz(track.samples[800:-800]) == pytest.approx(1500, abs=25)


def test_what_is_no_readable_sound_is_named_in_one_line(tmp_path):
    from tests.hearing import write_tone_sound
    from vidtune.data.audio import load_sound, sound_span
    from vidtune.data.video import VideoError

    notes = tmp_path / "notes.wav"
    notes.write_text("meeting notes, not a sound\n")
    silent = write_color_clip(tmp_path / "silent.mp4", ["red"])
    wav = write_tone_sound(tmp_path / "tones.wav", [300])
    for path, reason in [
        (tmp_path / "gone.wav", "sound file not found"),
        (notes, "not a sound file"),
        (silent, "no audio stream to hear"),
    ]:
        with pytest.raises(VideoError) as err:
            load_sound(str(path), RATE)
        assert str(err.value).startswith(f"{path}: ") and reason in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(VideoError, match=r"tones\.wav: the span 2-3s holds none of its 1\.00s of sound"):
        sound_span(str(wav), 2.0, 3.0)
