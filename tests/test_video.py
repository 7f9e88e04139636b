"""Frame sampling on real encoded video: decord and PyAV agree, sampling rules hold, bad files fail in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_path
from vidtune.data.video import (
    SamplingConfig,
    VideoError,
    VideoInfo,
    load_clip,
    open_video,
    probe_video,
    sample_frame_indices,
    time_instruction,
)

SHARED_CLIPS = [
    "videos/bikes.mp4",
    "videos/carphone.mp4",
    "videos/bigbuckbunny_720p.mp4",
    "corpora/llamafactory_demo/mllm_demo_data/1.mp4",
    "corpora/llamafactory_demo/mllm_demo_data/2.avi",
    "corpora/llamafactory_demo/mllm_demo_data/3.mp4",
    "corpora/llamafactory_demo/mllm_demo_data/4.mp4",
]
CONFIGS = [SamplingConfig(8), SamplingConfig(32), SamplingConfig(16, fps=1.0), SamplingConfig(4, fps=2.0)]


@pytest.mark.parametrize("clip", SHARED_CLIPS)
def test_decord_and_pyav_find_the_same_frames_and_pick_the_same_indices(clip):
    path = str(shared_path(*clip.split("/")))
    pyav = probe_video(path, "pyav")
    try:
        decord = probe_video(path, "decord")
    except VideoError as err:  # decord refuses files whose frame index it cannot seek by (the AVI)
        assert "invalid timestamps" in str(err)
        decord = None
    for cfg in CONFIGS:
        for bounds in [(None, None), (1.0, 3.5)]:
            indices = sample_frame_indices(pyav, cfg, *bounds, path=path)
            if decord is not None:
                assert decord == pyav
                assert sample_frame_indices(decord, cfg, *bounds, path=path) == indices


@pytest.mark.parametrize("clip", ["videos/bikes.mp4", "corpora/llamafactory_demo/mllm_demo_data/3.mp4"])
def test_decord_and_pyav_decode_identical_pixels(clip):
    path = str(shared_path(*clip.split("/")))
    cfg = SamplingConfig(6)
    a = load_clip(path, SamplingConfig(cfg.num_frames, backend="decord")).frames
    b = load_clip(path, SamplingConfig(cfg.num_frames, backend="pyav")).frames
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0


def test_auto_backend_reads_the_avi_right():
    """decord returns wrong frames for this AVI (its timestamps are broken); auto must use PyAV, which is right."""
    import av

    path = str(shared_path("corpora", "llamafactory_demo", "mllm_demo_data", "2.avi"))
    assert open_video(path, "auto").name == "pyav"
    with av.open(path) as container:
        every_frame = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    clip = load_clip(path, SamplingConfig(5))
    for index, frame in zip(clip.indices, clip.frames, strict=True):
        assert np.array_equal(frame, every_frame[index])


def test_frames_are_uint8_thwc_with_timestamps(clips):
    clip = load_clip(str(clips["red_blue"]), SamplingConfig(4))
    assert clip.frames.shape == (4, 48, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.info == VideoInfo(16, 8.0)
    assert clip.indices == [2, 6, 10, 14]  # segment centres
    assert clip.timestamps_s == [0.25, 0.75, 1.25, 1.75]
    red, blue = clip.frames[0].mean((0, 1)), clip.frames[-1].mean((0, 1))
    assert red[0] > 150 > red[2] and blue[2] > 150 > blue[0]


def test_jitter_is_seeded_and_stays_inside_segments():
    info = VideoInfo(100, 10.0)
    cfg = SamplingConfig(4)
    runs = [sample_frame_indices(info, cfg, rng=np.random.default_rng(seed)) for seed in range(20)]
    assert runs[3] == sample_frame_indices(info, cfg, rng=np.random.default_rng(3))
    assert len({tuple(r) for r in runs}) > 10
    for run in runs:
        assert all(25 * k <= i < 25 * (k + 1) for k, i in enumerate(run))
    assert sample_frame_indices(info, cfg) == [12, 37, 62, 87]


def test_fps_sampling_is_capped_and_clip_bounds_are_honoured():
    info = VideoInfo(300, 30.0)  # 10 s
    assert len(sample_frame_indices(info, SamplingConfig(32, fps=1.0))) == 10
    assert len(sample_frame_indices(info, SamplingConfig(8, fps=2.0))) == 8
    indices = sample_frame_indices(info, SamplingConfig(4), start_s=2.0, end_s=4.0)
    assert all(60 <= i < 120 for i in indices)
    with pytest.raises(VideoError, match="holds no frames"):
        sample_frame_indices(info, SamplingConfig(4), start_s=12.0)


def test_a_clip_shorter_than_the_frame_count_repeats_frames():
    indices = sample_frame_indices(VideoInfo(3, 30.0), SamplingConfig(8))
    assert len(indices) == 8 and set(indices) == {0, 1, 2} and indices == sorted(indices)


def test_time_instruction_text():
    text = time_instruction(VideoInfo(97, 10.0), [0.0, 1.4, 2.9], None, None)
    assert text == "The video lasts 9.7 seconds; 3 frames were sampled at 0.0s, 1.4s, 2.9s."
    assert "lasts 2.0 seconds" in time_instruction(VideoInfo(97, 10.0), [2.5], 2.0, 4.0)


@pytest.mark.parametrize("backend", ["auto", "pyav", "decord"])
def test_unreadable_files_fail_in_one_line_naming_the_file(tmp_path: Path, backend):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    for path, reason in [(tmp_path / "missing.mp4", "video not found"), (empty, "empty file"), (text, "cannot")]:
        with pytest.raises(VideoError) as err:
            load_clip(str(path), SamplingConfig(4, backend=backend))
        assert str(err.value).startswith(str(path)) and reason in str(err.value) and "\n" not in str(err.value)
