"""Bad input, injected: every broken file and malformed row is dropped with its reason within the budget, the
budget stops a run that is mostly broken, decodes that hang are bounded, files that break during training are
replaced and counted, and `vidtune check` reports every bad file by name and reason."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import shared_path
from tests.faults import inject
from vidtune.data.conversation import DataError
from vidtune.data.dataset import DataConfig, ExampleMaker, SFTDataset, prepare_rows
from vidtune.data.quality import BadSampleConfig, BadSampleLog, DecodeTimeout
from vidtune.data.sources import SourceConfig
from vidtune.data.video import SamplingConfig, load_clip

EXPECTED = {  # file -> the category its reason falls in
    "missing.mp4": "missing file",
    "empty.mp4": "empty file",
    "truncated.mp4": "unreadable",
    "notes.mp4": "unreadable",
    "short.mp4": "too short",
    "huge.mp4": "resolution too large",
    "zerofps.mp4": "invalid frame rate",
}
LIMITS = {"too_short": "drop", "max_frame_pixels": 1280 * 720}


def config(corpus, **quality) -> DataConfig:
    return DataConfig(
        sources=[SourceConfig(path=str(corpus))],
        sampling=SamplingConfig(4),
        num_workers=0,
        bad_samples=BadSampleConfig(**{**LIMITS, **quality}),
    )


def test_every_broken_file_and_malformed_row_is_dropped_with_its_reason(broken_media, builder):
    rows, _, report = prepare_rows(config(broken_media["corpus"], max_bad_fraction=0.9), builder, seed=0)
    assert len(rows) == 4 and all("good" in r["at"] or "line" in r["at"] for r in rows)
    reasons = {where: reason for where, reason in report.bad.bad}
    from vidtune.data.quality import kind_of

    for name, kind in EXPECTED.items():
        matches = [(where, reason) for where, reason in report.bad.bad if name in reason]
        assert len(matches) == 1, (name, reasons)
        where, reason = matches[0]
        assert where.startswith("broken.jsonl line ") and kind_of(reason) == kind, (name, reason)
    assert any("invalid JSON" in r for r in reasons.values()) and any("missing column" in r for r in reasons.values())
    assert report.bad.kinds["malformed row"] == 2 and len(report.bad.bad) == 9
    assert "9 of 13 samples bad" in report.summary()


def test_policy_error_stops_at_the_first_bad_sample(broken_media, builder):
    with pytest.raises(DataError, match=r"broken\.jsonl line 3: invalid JSON"):
        prepare_rows(config(broken_media["corpus"], policy="error"), builder, seed=0)


@pytest.mark.parametrize(
    ("quality", "message"),
    [
        ({"max_bad_fraction": 0.5}, r"69\.2% bad \(max_bad_fraction=0\.5\)"),
        ({"max_bad_fraction": 0.9, "max_bad_in_a_row": 4}, r"\d+ bad samples in a row \(max_bad_in_a_row=4\)"),
    ],
)
def test_a_corpus_over_its_budget_fails_in_one_line(broken_media, builder, quality, message):
    with pytest.raises(DataError, match=message) as err:
        prepare_rows(config(broken_media["corpus"], **quality), builder, seed=0)
    assert "\n" not in str(err.value) and "e.g. broken.jsonl line" in str(err.value)


def test_too_short_clips_repeat_frames_by_default(broken_media, builder):
    cfg = config(broken_media["corpus"], max_bad_fraction=0.9, too_short="repeat")
    rows, _, report = prepare_rows(cfg, builder, seed=0)
    assert any("short.mp4" in r["messages"][0]["content"][0]["path"] for r in rows)
    example = SFTDataset(rows, ExampleMaker(builder, cfg, 0, train=True))[(0, len(rows) - 1)]
    assert example["pixel_values_videos"].shape[0] == 4  # 2 decoded frames, repeated to the 4 asked for
    assert not any("short.mp4" in reason for _, reason in report.bad.bad)


def test_a_hanging_decode_is_bounded(broken_media, builder, monkeypatch):
    inject(monkeypatch, f"hang@{broken_media['good'].name}")
    started = time.perf_counter()
    with pytest.raises(DecodeTimeout, match="decode timed out after 1s"):
        load_clip(str(broken_media["good"]), SamplingConfig(4), decode_timeout_s=1.0)
    assert time.perf_counter() - started < 30  # the hang lasts 10^6 s; the bound holds on a loaded machine


def test_a_sample_that_breaks_during_training_is_replaced_and_counted(broken_media, builder, monkeypatch, tmp_path):
    """A file fine when measured but hanging (or gone) at training time: the next row takes its place, the
    batch stays full, and the reason travels with the example for the loop's budget."""
    cfg = config(broken_media["corpus"], max_bad_fraction=0.9, decode_timeout_s=1.0)
    rows, _, _ = prepare_rows(cfg, builder, seed=0)
    dataset = SFTDataset(rows, ExampleMaker(builder, cfg, 0, train=True))
    hanging = rows[0]["messages"][0]["content"][0]["path"]
    inject(monkeypatch, f"hang@{hanging}")
    example = dataset[(0, 0)]
    assert len(example["skipped"]) == 1 and "timed out" in example["skipped"][0]
    assert example["skipped"][0].startswith(rows[0]["at"])
    assert dataset[(0, 1)]["skipped"] == []


def test_training_time_failures_are_budgeted_across_a_window():
    from vidtune.train.training.health import BadSampleMonitor

    class Single:
        num_processes, device, is_main_process = 1, "cpu", True

    monitor = BadSampleMonitor(BadSampleConfig(window=20, max_bad_fraction=0.2))
    for _ in range(10):
        monitor.record(Single(), [], 4)  # 40 good samples
    monitor.record(Single(), ["a.jsonl line 3: x.mp4: video not found"], 3)
    assert monitor.total_bad == 1
    with pytest.raises(DataError, match=r"of the last \d+ samples failed to load \(missing file\)"):
        for _ in range(5):
            monitor.record(Single(), ["a.jsonl line 9: y.mp4: video not found"] * 2, 2)


def test_vidtune_check_reports_every_bad_file_by_name_and_reason(broken_media, tiny_model_dir, tmp_path, capsys):
    from vidtune.train.cli import main

    corpora = shared_path("corpora")
    videos = corpora.parent / "videos"
    sources = [
        {"path": str(corpora / "llamafactory_demo/mllm_video_demo.json")},
        {"path": str(corpora / "llamafactory_demo/mllm_demo.json")},
        {"path": str(corpora / "llava_video_style.json"), "media_root": str(videos)},
        {"path": str(corpora / "captions.jsonl"), "media_root": str(videos)},
        {"path": str(corpora / "multiple_choice.jsonl"), "media_root": str(videos)},
        {"path": str(broken_media["corpus"])},
    ]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model": {"name_or_path": str(tiny_model_dir)},
                "train": {"output_dir": str(tmp_path / "out")},
                "data": {
                    "sources": sources,
                    "sampling": {"num_frames": 4},
                    "max_length": 300,
                    "bad_samples": {"too_short": "drop", "max_frame_pixels": 1280 * 720},
                },
            }
        )
    )
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(recipe), "--out", str(out), "--decode"])
    assert exit_info.value.code == 1  # 9 bad of 31 rows: over the default 5% budget
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    for name in EXPECTED:
        assert sum(name in item["reason"] for item in report["bad"]) == 1, name
        assert any(name in line and "broken.jsonl line" in line for line in printed.splitlines()), name
    assert report["rows"] == 31 and len(report["bad"]) == 9
    assert report["dropped_for_length"] and report["answer_tokens_lost_to_length"] > 0  # mllm_demo row 5
    assert report["video_image_tokens"]["max"] >= 32 and report["tokens"]["max"] > 300
    assert "FAIL" in printed and "length drops" in printed


def test_bad_sample_log_counts_runs():
    log = BadSampleLog(BadSampleConfig(max_bad_in_a_row=3))
    for outcome in "gbbgbbbg":
        log.good() if outcome == "g" else log.add("x row 1", "video not found")
    assert log.longest_run == 3 and log.total == 8 and "in a row" in (log.over_budget() or "")


@pytest.mark.slow
def test_files_that_break_during_training_are_named_and_a_run_over_budget_does_not_succeed(
    tiny_model_dir, demo_corpus, tmp_path, monkeypatch
):
    """3 of 24 clips (12.5% of the samples) vanish after measuring, in a run far shorter than the budget's window:
    each is named in bad_samples.jsonl, the model is still saved, and the run ends in a one-line error, not 0."""
    import shutil

    from tests.conftest import tiny_run_overrides
    from vidtune.train.training import loop
    from vidtune.train.training.config import load_recipe

    corpus = tmp_path / "corpus"
    shutil.copytree(demo_corpus, corpus)
    vanished = [corpus / "videos" / f"train_{i:04d}.mp4" for i in (1, 5, 9)]
    real_setup = loop.setup

    def setup_then_lose_files(recipe):
        run = real_setup(recipe)  # measured: every file was fine
        for path in vanished:
            path.unlink()
        return run

    monkeypatch.setattr(loop, "setup", setup_then_lose_files)
    output = tmp_path / "run"
    recipe = load_recipe(
        None, tiny_run_overrides(tiny_model_dir, corpus, output, "train.num_epochs=1", "train.max_steps=0")
    )
    with pytest.raises(DataError, match=r"failed to load during training") as err:
        loop.train(recipe)
    assert "\n" not in str(err.value) and "bad_samples.jsonl" in str(err.value)
    logged = [json.loads(line) for line in (output / "bad_samples.jsonl").read_text().splitlines()]
    assert str(err.value).startswith(f"{len(logged)} of ") and len(logged) >= 6  # each failed attempt, named
    assert {r["kind"] for r in logged} == {"missing file"}
    assert all(sum(p.name in r["reason"] for p in vanished) == 1 for r in logged)  # each names its file
    assert all(any(p.name in r["reason"] for r in logged) for p in vanished)
    assert (output / "vidtune.json").is_file()  # the trained model is not lost


def test_a_corpus_whose_format_cannot_be_told_is_one_error_said_once(tmp_path, builder):
    rows = [{"clip": f"c{i}.mp4", "text": "hello"} for i in range(5)]
    (tmp_path / "odd.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match="cannot tell the corpus format") as err:
        prepare_rows(config(tmp_path / "odd.jsonl", max_bad_fraction=0.9), builder, seed=0)
    assert str(err.value).count("cannot tell") == 1 and "\n" not in str(err.value)


def test_paths_outside_the_media_root_and_broken_timestamps_have_kinds_of_their_own():
    from vidtune.data.quality import kind_of

    assert kind_of("rows.jsonl row 2: media path '../x.mp4' lies outside the media root /data") == (
        "path outside media_root"
    )
    assert kind_of("a.avi: decord's frame index has invalid timestamps, so its seeks are unreliable") == (
        "broken timestamps"
    )


def test_the_readme_states_the_too_short_default():
    from vidtune.data.quality import BadSampleConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"too_short: {BadSampleConfig().too_short}`, the default" in readme
    assert "shorter than the frames asked for" not in readme  # the old claim that they are dropped


def test_vidtune_check_applies_the_budget_to_each_source(broken_media, tiny_model_dir, tmp_path, capsys):
    """9 of 31 rows bad is within a 50% budget overall, but 9 of the broken source's 13 is not: check fails naming
    that source (a mostly broken source must not hide inside good ones)."""
    from vidtune.train.cli import main

    corpora = shared_path("corpora")
    videos = corpora.parent / "videos"
    sources = [
        {"path": str(corpora / "llamafactory_demo/mllm_video_demo.json")},
        {"path": str(corpora / "llamafactory_demo/mllm_demo.json")},
        {"path": str(corpora / "llava_video_style.json"), "media_root": str(videos)},
        {"path": str(corpora / "captions.jsonl"), "media_root": str(videos)},
        {"path": str(corpora / "multiple_choice.jsonl"), "media_root": str(videos)},
        {"path": str(broken_media["corpus"])},
    ]
    budget = {**LIMITS, "max_bad_fraction": 0.5, "max_bad_in_a_row": 100}
    recipe = tmp_path / "recipe.yaml"
    data = {"sources": sources, "sampling": {"num_frames": 4}, "max_length": 300, "bad_samples": budget}
    recipe.write_text(
        json.dumps({"model": {"name_or_path": str(tiny_model_dir)}, "train": {"output_dir": "o"}, "data": data})
    )
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(recipe), "--out", str(out)])
    assert exit_info.value.code == 1
    report = json.loads(out.read_text())
    assert report["rows"] == 31 and len(report["bad"]) == 9  # 29% overall: within the corpus-wide 50%
    broken = str(broken_media["corpus"])
    assert report["bad_by_source"][broken] == {"rows": 13, "bad": 9}
    assert report["budget"]["exceeded"] == f"{broken}: 69.2% bad (max_bad_fraction=0.5)"
    assert f"FAIL: {broken}: 69.2% bad" in capsys.readouterr().out

    sources.pop()  # without the broken source every source is within its budget
    recipe.write_text(
        json.dumps({"model": {"name_or_path": str(tiny_model_dir)}, "train": {"output_dir": "o"}, "data": data})
    )
    main(["check", str(recipe), "--out", str(out)])
    assert json.loads(out.read_text())["budget"]["exceeded"] is None
