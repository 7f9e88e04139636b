"""Real-world encodings, each frame showing its own index: for every installed backend and for auto, each returned
frame is the one on screen at its sampled time, its reported pts is within a quarter frame of the truth, rotated
clips come out upright with the displayed aspect, and unreadable files are refused with the right reason."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.video_battery import BatteryClip, build_battery, ffmpeg_available, read_code
from vidtune.data.video import (
    SamplingConfig,
    VideoError,
    available_backends,
    load_clip,
    open_video,
    probe_video,
    time_instruction,
)

pytestmark = pytest.mark.skipif(not ffmpeg_available(), reason="the battery is encoded with the ffmpeg command")
BACKENDS = ["auto", *available_backends()]


@pytest.fixture(scope="module")
def battery(tmp_path_factory: pytest.TempPathFactory) -> list[BatteryClip]:
    return build_battery(tmp_path_factory.mktemp("battery"))


def on_screen(clip: BatteryClip, t: float) -> int:
    """The truth: the last frame whose pts <= t."""
    return int(np.searchsorted(np.asarray(clip.pts_s), t + 1e-6, side="right") - 1)


def check_frames(clip: BatteryClip, result, shortest_edge: int | None = None) -> None:
    truth = np.asarray(clip.pts_s)
    for index, stamp, frame in zip(result.indices, result.timestamps_s, result.frames, strict=True):
        assert read_code(frame) == index, (clip.name, result.backend, index, read_code(frame))
        assert abs(stamp - truth[index]) <= clip.frame_s / 4, (clip.name, result.backend, index, stamp)
    height, width = result.frames.shape[1:3]
    if shortest_edge is None or min(clip.height, clip.width) <= shortest_edge:
        assert (height, width) == (clip.height, clip.width), (clip.name, result.backend)
    else:  # scaled on the displayed shape: the viewer's aspect ratio
        assert min(height, width) == shortest_edge and (height > width) == (clip.height > clip.width)
        assert abs(width / height - clip.width / clip.height) < 0.1, (clip.name, result.backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_readable_clip_gives_the_frames_on_screen_at_the_sampled_times(battery, backend):
    served = {}
    for clip in (c for c in battery if not c.unreadable):
        try:
            result = load_clip(str(clip.path), SamplingConfig(8, backend=backend))
        except VideoError as err:  # a backend may refuse a file it cannot read right, never return it wrong
            assert backend != "auto" and str(err).startswith(str(clip.path)) and "\n" not in str(err)
            continue
        served[clip.name] = result.backend
        check_frames(clip, result)
        info = result.info
        assert np.allclose(probe_video(str(clip.path)).times_s, clip.pts_s, atol=clip.frame_s / 4)
        duration = clip.pts_s[-1] + (clip.pts_s[-1] - clip.pts_s[-2])
        assert abs(info.duration_s - duration) <= clip.frame_s / 4
        centres = (2 * np.arange(8) + 1) * info.duration_s / 16
        assert result.indices == [on_screen(clip, t) for t in centres], clip.name
        jittered = load_clip(str(clip.path), SamplingConfig(8, backend=backend), rng=np.random.default_rng(1))
        check_frames(clip, jittered)
    if backend == "auto":
        assert len(served) == sum(1 for c in battery if not c.unreadable)
    assert served or backend == "decord", "a backend that reads nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_scaled_to_the_model_size_keep_the_displayed_aspect(battery, backend):
    """Widths 24 and 48 at the model size (decord fails some of those reads: auto moves on), rotated clips."""
    names = {"h264_portrait_96x128.mp4": (24, 48), "h264_rotated_90.mp4": (24,), "h264_rotated_270.mp4": (36,)}
    for clip in (c for c in battery if c.name in names):
        for edge in names[clip.name]:
            try:
                result = load_clip(str(clip.path), SamplingConfig(4, backend=backend), shortest_edge=edge)
            except VideoError:
                assert backend != "auto"
                continue
            check_frames(clip, result, edge)


def test_variable_rate_clips_are_sampled_on_time(battery):
    clip = next(c for c in battery if c.name == "h264_vfr_extreme.mp4")  # 20 frames in 0.7 s, then 0.5-0.9 s each
    path = str(clip.path)
    uniform = load_clip(path, SamplingConfig(8))
    assert sum(t < 0.7 for t in uniform.timestamps_s) == 1  # index sampling put 4 of 8 there
    window = load_clip(path, SamplingConfig(4), start_s=5.0, end_s=10.0)
    assert all(4.5 <= t < 10.0 for t in window.timestamps_s)
    assert window.indices == sorted(window.indices) and len(set(window.indices)) == 4
    text = time_instruction(window.info, window.timestamps_s, 5.0, 10.0)
    shown = [float(t[:-1]) for t in text.split("sampled at ")[1].rstrip(".").split(", ")]
    assert np.allclose(shown, [max(0.0, t - 5.0) for t in window.timestamps_s], atol=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreadable_files_are_refused_with_the_right_reason(battery, backend):
    for clip in (c for c in battery if c.unreadable):
        with pytest.raises(VideoError) as err:
            open_video(str(clip.path), backend).read([0])
        message = str(err.value)
        assert message.startswith(f"{clip.path}: ") and clip.unreadable in message and "\n" not in message


def test_vidtune_check_decode_flags_only_the_unreadable_files_and_names_the_backend(
    battery, tiny_model_dir, tmp_path, capsys
):
    import json

    from vidtune.train.cli import main

    corpus = tmp_path / "captions.jsonl"
    corpus.write_text("".join(json.dumps({"video": c.name, "caption": "coded frames"}) + "\n" for c in battery))
    recipe = tmp_path / "recipe.yaml"
    data = {
        "sources": [{"path": str(corpus), "media_root": str(battery[0].path.parent)}],
        "sampling": {"num_frames": 4},
        "bad_samples": {"max_bad_fraction": 0.5},
    }
    recipe.write_text(json.dumps({"model": {"name_or_path": str(tiny_model_dir)}, "data": data}))
    out = tmp_path / "report.json"
    main(["check", str(recipe), "--out", str(out), "--decode", f"train.output_dir={tmp_path / 'run'}"])
    report = json.loads(out.read_text())
    unreadable = {c.name: c.unreadable for c in battery if c.unreadable}
    assert len(report["bad"]) == len(unreadable)
    for name, reason in unreadable.items():
        assert any(name in item["reason"] and reason in item["reason"] for item in report["bad"]), name
    decoded = {Path(path).name: backend for path, backend in report["decoded_by"].items()}
    assert set(decoded) == {c.name for c in battery if not c.unreadable}
    assert decoded["h264_bframes.avi"] == "pyav" and set(decoded.values()) <= set(available_backends())
    assert report["bad_by_kind"] == {"no video stream": 1, "truncated data": 1}
    assert "decoded by" in capsys.readouterr().out


def test_vidtune_frames_prints_json_writes_pngs_and_refuses_in_one_line(battery, tmp_path, capsys):
    import json

    from PIL import Image

    from vidtune.train.cli import main

    clip = next(c for c in battery if c.name == "h264_rotated_270.mp4")
    main(["frames", str(clip.path), "--num-frames", "5", "--json", "--out", str(tmp_path / "out")])
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(clip.path) and report["backend"] in available_backends()
    assert (report["width"], report["height"]) == (clip.width, clip.height)  # as displayed: portrait
    # the turn as ffprobe states it (`rotate=270` metadata: "displaymatrix: rotation of -90.00 degrees")
    ffprobe = ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream_side_data=rotation"]
    stated = subprocess.run([*ffprobe, "-of", "csv=p=0", str(clip.path)], capture_output=True, text=True, check=True)
    assert report["rotation"] == int(stated.stdout.strip()) == -90
    assert abs(report["duration_s"] - 3.0) < 0.01
    assert [f["index"] for f in report["frames"]] == [3, 9, 15, 21, 27]
    assert [f["pts_s"] for f in report["frames"]] == pytest.approx([0.3, 0.9, 1.5, 2.1, 2.7], abs=0.01)
    for position, frame in enumerate(report["frames"]):
        png = np.array(Image.open(tmp_path / "out" / f"frame_{position:02d}.png"))
        assert png.shape[:2] == (clip.height, clip.width) and read_code(png) == frame["index"]
    assert (tmp_path / "out" / "sheet.png").is_file()
    main(["frames", str(clip.path), "--fps", "2", "--start", "1", "--end", "2", "--backend", "pyav"])
    printed = capsys.readouterr().out
    assert "decoded by pyav" in printed and "2 frames: #12@1.20s  #17@1.70s" in printed and "note" not in printed
    assert f"{clip.width}x{clip.height} (rotation -90, turned upright)" in printed
    main(["frames", str(clip.path), "--fps", "4", "--num-frames", "5", "--backend", "pyav"])
    assert "note: --fps 4 over 3.00s would take 12 frames; capped at --num-frames 5" in capsys.readouterr().out
    audio = next(c for c in battery if c.name == "audio_only.m4a")
    with pytest.raises(SystemExit) as exit_info:
        main(["frames", str(audio.path)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"{audio.path}: no video stream (the file holds 1 audio)\n"


def test_auto_moves_on_when_a_backend_opens_a_file_but_cannot_read_it(battery, monkeypatch):
    """decord opens the 16x16 clip, then its get_batch fails: auto reads it with the next backend."""
    from vidtune.data.video import loading

    if "decord" not in available_backends():
        pytest.skip("decord is not installed")
    monkeypatch.setattr(loading, "available_backends", lambda: ["decord", "pyav"])
    clip = next(c for c in battery if c.name == "h264_16x16.mp4")
    with pytest.raises(VideoError, match="decord failed to decode"):
        load_clip(str(clip.path), SamplingConfig(4, backend="decord"))
    result = load_clip(str(clip.path), SamplingConfig(4))
    assert result.backend == "pyav"
    check_frames(clip, result)


def test_vidtune_show_writes_a_page_of_frames_prompt_and_label_span(battery, tiny_model_dir, tmp_path, capsys):
    import json

    from vidtune.train.cli import main

    names = ["h264_rotated_90.mp4", "h264_vfr_extreme.mp4", "audio_only.m4a"]
    corpus = tmp_path / "captions.jsonl"
    corpus.write_text("".join(json.dumps({"video": n, "caption": f"clip {n}"}) + "\n" for n in names))
    data = {"sources": [{"path": str(corpus), "media_root": str(battery[0].path.parent)}], "time_instruction": True}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"name_or_path": str(tiny_model_dir)}, "data": data}))
    main(["show", str(recipe), "--rows", "3", "--out", str(tmp_path / "show"), f"train.output_dir={tmp_path}/run"])
    page = (tmp_path / "show" / "index.html").read_text()
    assert str(tmp_path / "show" / "index.html") in capsys.readouterr().out
    assert page.count("<img ") == 2 and page.count("data:image/png;base64,") == 2
    assert page.count("&lt;video x") == 2 and "8 frames" in page and "decoded by" in page
    assert "<mark>clip h264_rotated_90.mp4&lt;/s&gt;</mark>" in page.replace("<mark> ", "<mark>")
    assert "The video lasts 11.8 seconds" in page  # the real duration of the variable-rate clip
    assert "no video stream" in page
