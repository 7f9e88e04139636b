"""Frames decoded at the model's input size, and the frame cache: exactly the uncached frames for evaluation,
seeded jitter on a finer grid for training, never stale, atomic under concurrent writers, evicted beyond its cap."""

from __future__ import annotations

import json
import os
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_path
from vidtune.data.frame_cache import FrameCache, FrameCacheConfig
from vidtune.data.video import SamplingConfig, load_clip

CLIPS = ["videos/bikes.mp4", "videos/bigbuckbunny_720p.mp4", "corpora/llamafactory_demo/mllm_demo_data/2.avi"]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_decoders_scale_frames_to_the_model_input_size(backend):
    path = str(shared_path("videos", "bigbuckbunny_720p.mp4"))
    small = load_clip(path, SamplingConfig(4, backend=backend), shortest_edge=336)
    assert small.frames.shape == (4, 336, 597, 3) and small.frames.dtype == np.uint8
    full = load_clip(path, SamplingConfig(4, backend=backend))
    assert full.indices == small.indices and full.frames.shape[1:] == (720, 1280, 3)
    other = load_clip(path, SamplingConfig(4, backend="pyav" if backend == "decord" else "decord"), shortest_edge=336)
    assert np.abs(other.frames.astype(int) - small.frames.astype(int)).mean() < 3  # both scale with swscale
    tiny = load_clip(str(shared_path("videos", "carphone.mp4")), SamplingConfig(2, backend=backend), shortest_edge=336)
    assert tiny.frames.shape[1:] == (144, 176, 3)  # never upscaled


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("sampling", [SamplingConfig(8), SamplingConfig(16, fps=2.0), SamplingConfig(3)])
def test_cached_evaluation_frames_are_exactly_the_uncached_ones(clip, sampling, tmp_path):
    path = str(shared_path(*clip.split("/")))
    for bounds in [(None, None), (1.0, 3.0)]:
        uncached = load_clip(path, sampling, *bounds, shortest_edge=64)
        cache = FrameCache(FrameCacheConfig(dir=str(tmp_path / "cache")), sampling, shortest_edge=64)
        miss, hit = cache.load(path, *bounds), cache.load(path, *bounds)
        assert (cache.misses, cache.hits) == (1, 1)
        for cached in (miss, hit):
            assert cached.indices == uncached.indices and cached.timestamps_s == uncached.timestamps_s
            assert np.array_equal(cached.frames, uncached.frames)


def test_training_jitter_picks_seeded_frames_of_the_grid(tmp_path):
    path = str(shared_path("videos", "bikes.mp4"))
    cache = FrameCache(FrameCacheConfig(dir=str(tmp_path), grid=5), SamplingConfig(8), shortest_edge=64)
    draws = [cache.load(path, rng=np.random.default_rng([0, epoch, 3])).indices for epoch in range(8)]
    assert draws[2] == cache.load(path, rng=np.random.default_rng([0, 2, 3])).indices  # seeded
    assert len({tuple(d) for d in draws}) > 1  # differs across epochs
    grid = json.loads(next(tmp_path.glob("*/*.json")).read_text())["indices"]
    for indices in draws:
        assert [grid.index(i) // 5 for i in indices] == list(range(8))  # one frame from each segment's 5
    assert cache.misses == 1


def test_an_edited_video_is_decoded_again_and_a_damaged_entry_repaired(clips, tmp_path):
    import shutil

    from vidtune.train.demo.clips import write_color_clip

    video = tmp_path / "clip.mp4"
    shutil.copy(clips["red_blue"], video)
    cache = FrameCache(FrameCacheConfig(dir=str(tmp_path / "cache")), SamplingConfig(4), shortest_edge=None)
    red_first = cache.load(str(video)).frames[0].mean((0, 1))
    time.sleep(0.01)
    write_color_clip(video, ["green", "blue"])  # same name, new content
    green_first = cache.load(str(video)).frames[0].mean((0, 1))
    assert red_first[0] > 150 and green_first[1] > 150 and cache.misses == 2
    entry = cache._paths(cache.key(str(video), None, None))[0]
    entry.write_bytes(entry.read_bytes()[:100])  # a full disk, a killed writer
    assert cache.load(str(video)).frames.shape == (4, 48, 64, 3) and cache.misses == 3


def _fill_once(args: tuple[str, str]) -> tuple[int, ...]:
    root, video = args
    return FrameCache(FrameCacheConfig(dir=root), SamplingConfig(6), None).load(video).frames.shape


def test_concurrent_writers_leave_whole_files(clips, tmp_path):
    with get_context("fork").Pool(4) as pool:
        shapes = pool.map(_fill_once, [(str(tmp_path), str(clips["three"]))] * 8)
    assert set(shapes) == {(6, 48, 64, 3)}
    assert len(list(tmp_path.glob("*/*.npy"))) == 1 and not list(tmp_path.glob("*/.*"))  # no leftovers
    cache = FrameCache(FrameCacheConfig(dir=str(tmp_path)), SamplingConfig(6), None)
    cache.load(str(clips["three"]))
    assert cache.hits == 1


def test_least_recently_used_clips_are_evicted_beyond_the_cap(clips, tmp_path):
    cache = FrameCache(FrameCacheConfig(dir=str(tmp_path), max_gb=1e-9), SamplingConfig(4), None)
    for name in ("red_blue", "green_yellow", "three"):
        cache.load(str(clips[name]))
        time.sleep(0.01)
    one = next(tmp_path.glob("*/*.npy")).stat().st_size
    cache.cfg.max_gb = 2.5 * one / 1e9  # room for two clips
    os.utime(cache._paths(cache.key(str(clips["red_blue"]), None, None))[0])  # the oldest, used just now
    freed = cache.evict()
    left = {json.loads(p.read_text())["source"] for p in tmp_path.glob("*/*.json")}
    assert freed == one and left == {str(Path(clips["red_blue"]).resolve()), str(Path(clips["three"]).resolve())}


@pytest.mark.slow
def test_vidtune_cache_fills_what_training_then_reads(tiny_model_dir, demo_corpus, tmp_path, builder):
    from vidtune.data.dataset import DataConfig, ExampleMaker, SFTDataset, prepare_rows
    from vidtune.data.sources import SourceConfig
    from vidtune.train.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model": {"name_or_path": str(tiny_model_dir)},
                "train": {"output_dir": str(tmp_path / "out")},
                "data": {
                    "sources": [{"path": str(demo_corpus / "questions_train.jsonl")}],
                    "sampling": {"num_frames": 4},
                    "frame_cache": {"dir": str(tmp_path / "cache")},
                },
            }
        )
    )
    main(["cache", str(recipe), "--workers", "2"])
    assert len(list((tmp_path / "cache").glob("*/*.npy"))) == 24  # one per clip, though each has two questions
    sources = [SourceConfig(path=str(demo_corpus / "questions_train.jsonl"))]
    cached = DataConfig(sources=sources, sampling=SamplingConfig(4), num_workers=0)
    cached.frame_cache.dir = str(tmp_path / "cache")
    plain = DataConfig(sources=sources, sampling=SamplingConfig(4), num_workers=0)
    rows, _, _ = prepare_rows(plain, builder, seed=0)
    with_cache = SFTDataset(rows, ExampleMaker(builder, cached, 0, train=False))
    without = SFTDataset(rows, ExampleMaker(builder, plain, 0, train=False))
    for index in (0, 7, 30):
        a, b = with_cache[(0, index)], without[(0, index)]
        assert np.array_equal(a["pixel_values_videos"].numpy(), b["pixel_values_videos"].numpy())
    assert with_cache.maker.cache.hits == 3 and with_cache.maker.cache.misses == 0
