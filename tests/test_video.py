"""Frame sampling on real encoded video: backends agree, constant-rate clips keep the frames index sampling picked,
sampling rules hold, bad files fail in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_path
from vidtune.data.video import (
    SamplingConfig,
    VideoError,
    VideoInfo,
    available_backends,
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


def index_sampling(path: str, cfg: SamplingConfig, start_s, end_s, grid: int = 1) -> list[int]:
    """Sampling as it was before it moved onto presentation time: segment centres in frame indices, bounds as
    round(seconds x average fps) (the frames every existing frame cache and the demo were built from)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        num_frames = sum(1 for packet in container.demux(stream) if packet.size)
        fps = float(stream.average_rate)
    first = 0 if start_s is None else min(num_frames, round(start_s * fps))
    stop = num_frames if end_s is None else min(num_frames, round(end_s * fps))
    count = cfg.num_frames if cfg.fps is None else max(1, min(cfg.num_frames, int((stop - first) / fps * cfg.fps)))
    count *= grid
    positions = first + ((2 * np.arange(count) + 1) * (stop - first)) / (2 * count)
    return np.clip(np.floor(positions).astype(int), first, stop - 1).tolist()


def test_constant_rate_clips_sample_the_frames_index_sampling_picked(clips):
    """Time-based sampling keeps every cache and the demo valid: on the shared clips (MP4 and AVI) and the demo's
    generated clips, uncached and cached (grid 3) sampling choose exactly the indices index-based sampling chose."""
    paths = [str(shared_path(*clip.split("/"))) for clip in SHARED_CLIPS] + [str(p) for p in clips.values()]
    for path in paths:
        info = probe_video(path)
        for cfg in CONFIGS:
            for bounds in [(None, None), (1.0, 3.5), (0.5, None)]:
                if bounds[0] is not None and bounds[0] * 2 >= info.duration_s:
                    continue
                for grid in (1, 3):
                    chosen = sample_frame_indices(info, cfg, *bounds, path=path, grid=grid)
                    assert chosen == index_sampling(path, cfg, *bounds, grid), (path, cfg, bounds, grid)


@pytest.mark.parametrize("clip", ["videos/bikes.mp4", "corpora/llamafactory_demo/mllm_demo_data/3.mp4"])
def test_every_backend_decodes_the_same_pixels(clip):
    path = str(shared_path(*clip.split("/")))
    clips = [load_clip(path, SamplingConfig(6, backend=backend)) for backend in available_backends()]
    assert len(clips) >= 2
    for other in clips[1:]:
        assert other.indices == clips[0].indices and other.timestamps_s == clips[0].timestamps_s
        a, b = clips[0].frames, other.frames
        assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0, other.backend


def test_auto_backend_reads_the_avi_right():
    """This AVI has no presentation times (decord and TorchCodec would return wrong frames): auto uses PyAV."""
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
    assert (clip.info.num_frames, clip.info.fps, clip.info.duration_s) == (16, 8.0, 2.0)
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


@pytest.mark.parametrize("backend", ["auto", "torchcodec", "pyav", "decord"])
def test_unreadable_files_fail_in_one_line_naming_the_file(tmp_path: Path, backend):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    for path, reason in [(tmp_path / "missing.mp4", "video not found"), (empty, "empty file"), (text, "cannot")]:
        with pytest.raises(VideoError) as err:
            load_clip(str(path), SamplingConfig(4, backend=backend))
        assert str(err.value).startswith(str(path)) and reason in str(err.value) and "\n" not in str(err.value)
