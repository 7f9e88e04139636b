"""Public datasets and benchmarks in their published layouts (field names, nesting, id-based paths), written small
over generated clips: each loads, its prompts and labels mean what the dataset means, inconsistent rows are bad
rows with a reason, a tiny model trains on all of them, and `vidtune eval --benchmark` scores each benchmark with
accuracy by category computed here by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml

from vidtune.data.conversation import assistant_texts, media_parts
from vidtune.data.sources import SourceConfig, iter_conversations
from vidtune.train.demo.clips import write_color_clip

COLORS = ["red", "green", "blue", "yellow"]
MVBENCH_INSTRUCTION = "Answer with the option's letter from the given choices directly."
NEXTQA_TYPES = ["CW", "CH", "TN", "TP", "TC", "DC", "DL", "DO"]


def first_color_options(k: int) -> tuple[list[str], str, int]:
    """Four colour options rotated by k; the clip k starts with COLORS[k % 4]. -> options, answer text, index."""
    options = [COLORS[(k + 2 + i) % 4] for i in range(4)]
    return options, COLORS[k % 4], options.index(COLORS[k % 4])


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    """Each dataset as it ships (small): annotation files under their published names, videos named by id."""
    root = tmp_path_factory.mktemp("published")
    clips = [root / "clips" / f"{k}.mp4" for k in range(4)]
    for k, path in enumerate(clips):  # clip k: COLORS[k] for 1 s, then COLORS[k+1] for 1 s (8 fps)
        write_color_clip(path, [COLORS[k], COLORS[(k + 1) % 4]], seed=k)

    def place(path: Path, k: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(clips[k % 4].read_bytes())

    # MVBench: json/<task>.json, answer = the option's text; videos in each task's source-dataset folder.
    sequence = []
    for k in range(10):
        options, answer, _ = first_color_options(k)
        sequence.append(
            {
                "video": f"{k % 4}.mp4",
                "question": "Which color comes first?",
                "candidates": options,
                "answer": answer,
                "start": 0.0,
                "end": 2.0,
            }
        )
        place(root / "mvbench/video/star/Charades_segment" / f"{k % 4}.mp4", k)
    sequence.insert(3, {"video": "0.mp4", "question": "Which?", "candidates": ["red", "red", "blue"], "answer": "red"})
    write_json(root / "mvbench/json/action_sequence.json", sequence)
    counting = [
        {
            "video": f"{k % 4}.mp4",
            "question": "How many colors are shown?",
            "candidates": ["1", "2", "3"],
            "answer": "2",
        }
        for k in range(10)
    ]
    write_json(root / "mvbench/json/action_count.json", counting)
    for k in range(4):
        place(root / "mvbench/video/perception/videos" / f"{k}.mp4", k)

    # Video-MME: one parquet, options already lettered, answer a letter, video = data/{videoID}.mp4.
    videomme = []
    for k in range(8):
        options, _, index = first_color_options(k)
        video_id = f"yt{k:02d}"
        videomme.append(
            {
                "video_id": f"{k // 2 + 1:03d}",
                "duration": ["short", "medium"][k % 2],
                "domain": "Knowledge",
                "sub_category": "Humanity & History",
                "url": f"https://youtu.be/{video_id}",
                "videoID": video_id,
                "question_id": f"{k // 2 + 1:03d}-{k % 2 + 1}",
                "task_type": ["Temporal Perception", "Attribute Perception"][k // 4],
                "question": "Which color comes first?",
                "options": [f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)],
                "answer": "ABCD"[index],
            }
        )
        place(root / "videomme/data" / f"{video_id}.mp4", k)
    (root / "videomme/videomme").mkdir(parents=True)
    datasets.Dataset.from_list(videomme).to_parquet(root / "videomme/videomme/test-00000-of-00001.parquet")

    # NExT-QA: CSV with options in columns a0..a4, answer a 0-based index, video named by its numeric id.
    nextqa = []
    for k in range(8):
        options, _, index = first_color_options(k)
        video = 4010069380 + k
        nextqa.append(
            {
                "video": video,
                "frame_count": 16,
                "width": 64,
                "height": 48,
                "question": "which color comes first",
                "answer": index,
                "qid": k,
                "type": NEXTQA_TYPES[k],
                **{f"a{i}": o for i, o in enumerate([*options, "none of them"])},
            }
        )
        place(root / "nextqa/NExTVideo" / f"{video}.mp4", k)
    datasets.Dataset.from_list(nextqa).to_csv(root / "nextqa/val.csv", index=False)

    # MSR-VTT: one object, `videos` + `sentences`; clips stored as {video_id}.mp4; a validate clip in the same file.
    msrvtt = {"info": {"year": 2016}, "videos": [], "sentences": []}
    for k in range(3):
        msrvtt["videos"].append(
            {
                "category": 9,
                "url": "https://www.youtube.com/watch?v=x",
                "video_id": f"video{k}",
                "start time": 137.72,
                "end time": 149.44,
                "split": ["train", "train", "validate"][k],
                "id": k,
            }
        )
        for n in range(3):
            caption = f"{COLORS[k]} then {COLORS[k + 1]}" + ("" if n == 0 else f", take {n}")
            msrvtt["sentences"].append({"caption": caption, "video_id": f"video{k}", "sen_id": 3 * k + n})
        place(root / "msrvtt/TrainValVideo" / f"video{k}.mp4", k)
    write_json(root / "msrvtt/train_val_videodatainfo.json", msrvtt)

    # ActivityNet Captions: {id: {duration, timestamps, sentences}}; the second segment's end overshoots duration, as
    # published ends often do; the second video's last segment lies past its end.
    anet = {
        "v_QOlSCBRmfWY": {
            "duration": 2.0,
            "timestamps": [[0.0, 1.0], [1.0, 2.05]],
            "sentences": ["A red screen.", " Then a green one."],
        },
        "v_ehGHCYKzyZ8": {
            "duration": 2.0,
            "timestamps": [[0.0, 1.0], [3.0, 4.0]],
            "sentences": ["A blue screen.", "Something after the end."],
        },
    }
    write_json(root / "activitynet/train.json", anet)
    place(root / "activitynet/videos/v_QOlSCBRmfWY.mp4", 0)  # red then green
    place(root / "activitynet/videos/v_ehGHCYKzyZ8.mp4", 2)  # blue then yellow

    # ActivityNet-QA (merged question/answer rows) and MSVD-QA: video files named from an id column.
    anetqa = [
        {
            "question_id": f"v_clip{k}_0",
            "video_name": f"clip{k}",
            "question": "what color comes first",
            "answer": COLORS[k],
            "type": 3,
        }
        for k in range(4)
    ]
    anetqa.append(
        {"question_id": "v_gone_0", "video_name": "gone", "question": "what color", "answer": "red", "type": 3}
    )
    write_json(root / "activitynetqa/activitynetqa_test.json", anetqa)
    msvdqa = [
        {"answer": COLORS[k], "id": k, "question": "what color comes first?", "video_id": k + 1} for k in range(4)
    ]
    write_json(root / "msvdqa/test_qa.json", msvdqa)
    for k in range(4):
        place(root / "activitynetqa/videos" / f"v_clip{k}.mp4", k)
        place(root / "msvdqa/videos" / f"vid{k + 1}.mp4", k)
    # Instruction corpora in LLaVA / VideoChatGPT layouts: LLaVA-Video-178K (`<image>` stands for the video),
    # ShareGPT4Video's SFT mix, VideoChatGPT's VideoInstruct-100K (q / a / video_id, ActivityNet videos).
    llava_video = [
        {
            "id": f"academic_{k}",
            "data_source": "0_30_s_academic_v0_1",
            "video": f"Charades/{k}.mp4",
            "conversations": [
                {"from": "human", "value": "<image>\nWhich color comes first?"},
                {"from": "gpt", "value": COLORS[k]},
            ],
        }
        for k in range(4)
    ]
    write_json(root / "llava_video/0_30_s_academic_v0_1/0_30_s_academic_mc_v0_1_qa_processed.json", llava_video)
    sharegpt4video = [
        {
            "id": f"mixkit-{k}",
            "video": f"mixkit/{k}.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nDescribe the video."},
                {"from": "gpt", "value": f"{COLORS[k]}, then {COLORS[(k + 1) % 4]}."},
            ],
        }
        for k in range(4)
    ]
    write_json(root / "sharegpt4video/sharegpt4video_mix181k_vqa-153k_share-cap-28k.json", sharegpt4video)
    videochatgpt = [{"q": "Which color comes first?", "a": COLORS[k], "video_id": f"v_clip{k}"} for k in range(4)]
    write_json(root / "videochatgpt/VideoInstruct100K.json", videochatgpt)
    for k in range(4):
        place(root / "llava_video/0_30_s_academic_v0_1/Charades" / f"{k}.mp4", k)
        place(root / "sharegpt4video/videos/mixkit" / f"{k}.mp4", k)
        place(root / "videochatgpt/videos" / f"v_clip{k}.mp4", k)
    return {"root": root}


def sources(root: Path) -> dict[str, SourceConfig]:
    """How the README says to load each one."""
    return {
        "mvbench": SourceConfig(
            path=str(root / "mvbench/json/action_sequence.json"),
            media_root=str(root / "mvbench/video/star/Charades_segment"),
        ),
        "mvbench_count": SourceConfig(
            path=str(root / "mvbench/json/action_count.json"), media_root=str(root / "mvbench/video/perception/videos")
        ),
        "videomme": SourceConfig(
            path=str(root / "videomme/videomme/test-00000-of-00001.parquet"),
            media_root=str(root / "videomme/data"),
            media_template="{videoID}.mp4",
        ),
        "nextqa": SourceConfig(
            path=str(root / "nextqa/val.csv"),
            media_root=str(root / "nextqa/NExTVideo"),
            media_template="{video}.mp4",
            columns={"options": ["a0", "a1", "a2", "a3", "a4"]},
        ),
        "msrvtt": SourceConfig(
            path=str(root / "msrvtt/train_val_videodatainfo.json"), media_root=str(root / "msrvtt/TrainValVideo")
        ),
        "activitynet": SourceConfig(
            path=str(root / "activitynet/train.json"), media_root=str(root / "activitynet/videos")
        ),
        "activitynetqa": SourceConfig(
            path=str(root / "activitynetqa/activitynetqa_test.json"),
            media_root=str(root / "activitynetqa/videos"),
            media_template="v_{video_name}.mp4",
        ),
        "llava_video": SourceConfig(
            path=str(root / "llava_video/0_30_s_academic_v0_1/0_30_s_academic_mc_v0_1_qa_processed.json")
        ),
        "sharegpt4video": SourceConfig(
            path=str(root / "sharegpt4video/sharegpt4video_mix181k_vqa-153k_share-cap-28k.json"),
            media_root=str(root / "sharegpt4video/videos"),
        ),
        "videochatgpt": SourceConfig(
            path=str(root / "videochatgpt/VideoInstruct100K.json"),
            media_root=str(root / "videochatgpt/videos"),
            columns={"question": "q", "answer": "a"},
            media_template="{video_id}.mp4",
        ),
        "msvdqa": SourceConfig(
            path=str(root / "msvdqa/test_qa.json"),
            media_root=str(root / "msvdqa/videos"),
            media_template="vid{video_id}.mp4",
        ),
    }


def rows_of(source: SourceConfig) -> tuple[list[dict], dict[str, str]]:
    """Good rows, and bad ones as {where: reason}."""
    rows = list(iter_conversations(source, keep_bad=True))
    return [r for r in rows if not r["problem"]], {r["at"]: r["problem"] for r in rows if r["problem"]}


def user_text(row: dict) -> str:
    return "".join(p["text"] or "" for p in row["messages"][0]["content"] if p["type"] == "text")


# ------------------------------------------------------------------------------------------ loading, meaning


def test_mvbench_text_answers_letter_the_right_option(published):
    good, bad = rows_of(sources(published["root"])["mvbench"])
    assert len(good) == 10
    for k, row in enumerate(good):
        options, answer, index = first_color_options(k)
        lines = user_text(row).split("\n")
        assert lines[1:5] == [f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)]
        assert assistant_texts(row["messages"]) == ["ABCD"[index]] and lines["ABCD".index("ABCD"[index]) + 1].endswith(
            answer
        )
        video = media_parts(row["messages"])[0]
        assert (video["start_s"], video["end_s"]) == (0.0, 2.0) and Path(video["path"]).is_file()
    assert list(bad.values()) == ["answer 'red' matches options A and B; cannot tell which is meant"]
    assert list(bad) == ["action_sequence.json row 3"]
    # Counting options are numbers: the answer "2" is the option "2" (B), not the 0-based index 2 (C).
    counts, _ = rows_of(sources(published["root"])["mvbench_count"])
    assert {assistant_texts(r["messages"])[0] for r in counts} == {"B"}


def test_videomme_lettered_options_are_lettered_once(published):
    good, bad = rows_of(sources(published["root"])["videomme"])
    assert len(good) == 8 and not bad
    for k, row in enumerate(good):
        options, _, index = first_color_options(k)
        text = user_text(row)
        assert "A. A." not in text and text.split("\n")[1:5] == [f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)]
        assert assistant_texts(row["messages"]) == ["ABCD"[index]]
        assert Path(media_parts(row["messages"])[0]["path"]).name == f"yt{k:02d}.mp4"


def test_nextqa_options_from_columns_and_ids_as_paths(published):
    explicit, bad = rows_of(sources(published["root"])["nextqa"])
    assert len(explicit) == 8 and not bad
    for k, row in enumerate(explicit):
        options, _, index = first_color_options(k)
        assert user_text(row).split("\n")[1:6] == [
            f"{'ABCDE'[i]}. {o}" for i, o in enumerate([*options, "none of them"])
        ]
        assert assistant_texts(row["messages"]) == ["ABCD"[index]]
        assert Path(media_parts(row["messages"])[0]["path"]).name == f"{4010069380 + k}.mp4"
    # Without the column map the a0..a4 columns are recognised as the options all the same.
    auto = SourceConfig(**{**sources(published["root"])["nextqa"].__dict__, "columns": {}})
    assert [r["messages"] for r in rows_of(auto)[0]] == [r["messages"] for r in explicit]


def test_msrvtt_one_row_per_caption_or_per_clip(published):
    source = sources(published["root"])["msrvtt"]
    per_caption, bad = rows_of(source)
    assert not bad and len(per_caption) == 6  # the train split: 2 clips x 3 captions
    assert [Path(media_parts(r["messages"])[0]["path"]).name for r in per_caption] == ["video0.mp4"] * 3 + [
        "video1.mp4"
    ] * 3
    assert assistant_texts(per_caption[4]["messages"]) == ["green then blue, take 1"]
    validate, _ = rows_of(SourceConfig(**{**source.__dict__, "split": "validate"}))
    assert [assistant_texts(r["messages"])[0] for r in validate] == [
        "blue then yellow",
        "blue then yellow, take 1",
        "blue then yellow, take 2",
    ]
    per_clip, _ = rows_of(SourceConfig(**{**source.__dict__, "one_caption_per_clip": True}))
    assert len(per_clip) == 2
    for row, k in zip(per_clip, range(2), strict=True):
        assert assistant_texts(row["messages"])[0].startswith(f"{COLORS[k]} then {COLORS[k + 1]}")
    assert rows_of(SourceConfig(**{**source.__dict__, "one_caption_per_clip": True}))[0] == per_clip  # seeded


def test_activitynet_dense_captions_each_train_on_their_own_segment(published):
    from vidtune.data.video import SamplingConfig, load_clip
    from vidtune.train.demo.clips import PALETTE

    good, bad = rows_of(sources(published["root"])["activitynet"])
    assert bad == {"train.json video v_ehGHCYKzyZ8 segment 1": "segment [3, 4]s lies outside the video (duration 2s)"}
    assert [assistant_texts(r["messages"])[0] for r in good] == ["A red screen.", "Then a green one.", "A blue screen."]
    for row, color in zip(good, ["red", "green", "blue"], strict=True):
        video = media_parts(row["messages"])[0]
        frames = load_clip(video["path"], SamplingConfig(4), video["start_s"], video["end_s"]).frames
        mean = frames.reshape(-1, 3).mean(0)
        nearest = min(PALETTE, key=lambda name: sum((mean - PALETTE[name]) ** 2))
        assert nearest == color, (row["at"], mean)
    assert media_parts(good[1]["messages"])[0]["end_s"] == 2.0  # the overshooting end, cut at the duration


def test_activitynet_qa_and_msvd_qa_by_path_template(published):
    for name, files in [
        ("activitynetqa", [f"v_clip{k}.mp4" for k in range(4)]),
        ("msvdqa", [f"vid{k}.mp4" for k in range(1, 5)]),
    ]:
        good, _ = rows_of(sources(published["root"])[name])
        assert [Path(media_parts(r["messages"])[0]["path"]).name for r in good[:4]] == files
        assert [assistant_texts(r["messages"])[0] for r in good[:4]] == COLORS


def test_instruction_corpora_llava_video_sharegpt4video_videochatgpt(published):
    chosen = sources(published["root"])
    for name, folder in [("llava_video", "Charades"), ("sharegpt4video", "mixkit"), ("videochatgpt", "videos")]:
        good, bad = rows_of(chosen[name])
        assert len(good) == 4 and not bad
        for k, row in enumerate(good):
            assert [p["type"] for p in row["messages"][0]["content"]] == ["video", "text"]  # the video, once
            path = Path(media_parts(row["messages"])[0]["path"])
            assert path.is_file() and path.parent.name == folder
            assert assistant_texts(row["messages"])[0].startswith(COLORS[k])


def test_inconsistent_rows_are_bad_samples_with_reasons_within_the_budget(published, builder):
    """Ambiguous answer text, an id with no file and a segment outside the video: each dropped with its reason and
    counted against data.bad_samples; a tighter budget stops the run naming them."""
    from vidtune.data.conversation import DataError
    from vidtune.data.dataset import DataConfig, prepare_rows
    from vidtune.data.quality import BadSampleConfig
    from vidtune.data.video import SamplingConfig

    chosen = sources(published["root"])
    mix = [chosen["mvbench"], chosen["activitynet"], chosen["activitynetqa"]]
    cfg = DataConfig(sources=mix, sampling=SamplingConfig(4), num_workers=0)
    cfg.bad_samples = BadSampleConfig(max_bad_fraction=0.2)
    rows, _, report = prepare_rows(cfg, builder, seed=0)
    reasons = dict(report.bad.bad)
    assert reasons["action_sequence.json row 3"].startswith("answer 'red' matches options A and B")
    assert "lies outside the video" in reasons["train.json video v_ehGHCYKzyZ8 segment 1"]
    assert "v_gone.mp4: video not found" in reasons["activitynetqa_test.json row 4"]
    assert len(report.bad.bad) == 3 and report.bad.total == len(rows) + 3 == 10 + 3 + 4 + 3
    cfg.bad_samples = BadSampleConfig(max_bad_fraction=0.1)
    with pytest.raises(DataError, match=r"15\.0% bad \(max_bad_fraction=0\.1\).*action_sequence\.json row 3"):
        prepare_rows(cfg, builder, seed=0)


# --------------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_a_tiny_model_trains_on_every_dataset(published, tiny_model_dir, tmp_path):
    from vidtune.train.training.config import load_recipe
    from vidtune.train.training.loop import save_outputs, setup, train_loop
    from vidtune.train.training.tracking import read_metrics

    chosen = sources(published["root"])
    recipe_sources = []
    for source in chosen.values():
        fields = {k: v for k, v in source.__dict__.items() if v not in (None, {}, False, "auto", "train", 1.0)}
        recipe_sources.append({**fields, "num_samples": 2})
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {
            "sources": recipe_sources,
            "sampling": {"num_frames": 4},
            "max_length": 160,
            "num_workers": 0,
            "bad_samples": {"max_bad_fraction": 0.5},
        },
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "batch_size": 8,
            "learning_rate": 1e-3,
            "warmup_ratio": 0,
            "log_every_steps": 1,
        },
        "logging": {"report_to": "none"},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = setup(load_recipe(tmp_path / "recipe.yaml"))
    kept = run.drops.kept_by_source
    assert set(kept) == {Path(s.path).name for s in chosen.values()} and run.drops.dropped == 0
    save_outputs(run, train_loop(run))
    losses = [m["train/loss"] for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    assert len(losses) == 2 and all(0 < loss < 100 for loss in losses)


# ------------------------------------------------------------------------------------------------- benchmarks


def benchmark_args(model: Path, name: str, data: Path, media: Path, out: Path, *extra: str) -> list[str]:
    """`vidtune eval MODEL --benchmark NAME --data DATA --media-root MEDIA --out OUT [extra]`."""
    return [str(model), "--benchmark", name, "--data", str(data), "--media-root", str(media), "--out", str(out), *extra]


def run_benchmark(args: list[str], capsys) -> tuple[dict, list[dict], str]:
    from vidtune.train.cli import main

    main(["eval", *args])
    out = Path(args[args.index("--out") + 1])
    metrics = json.loads((out / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return metrics, records, capsys.readouterr().out


@pytest.fixture
def scripted(monkeypatch):
    """Generation replaced by answers given in order; the prompts it was asked are kept."""
    from vidtune.train.evaluation import tasks

    state: dict[str, Any] = {"answers": [], "prompts": []}

    def generate(im, conversations, max_new_tokens, **kwargs):
        state["prompts"] += [
            "".join(p["text"] or "" for p in c[-1]["content"] if p["type"] == "text") for c in conversations
        ]
        return [state["answers"].pop(0) for _ in conversations]

    monkeypatch.setattr(tasks, "generate", generate)
    return state


@pytest.mark.slow
def test_mvbench_scored_by_task_with_hand_computed_accuracy(published, tiny_model_dir, tmp_path, scripted, capsys):
    root = published["root"]
    # action_count (10 rows, truth B): B, (B), "b", "B. 2", then 6 wrong. action_sequence (10 rows, its bad row
    # skipped): the right letter for rows 0-6 in several spellings, then wrong letters.
    count_answers = ["B", "(B)", "b", "B. 2", "A", "C", "C. 3", "(A)", "", "I cannot tell"]
    truth = ["ABCD"[first_color_options(k)[2]] for k in range(10)]
    wrong = ["ABCD"[(first_color_options(k)[2] + 1) % 4] for k in range(10)]
    spellings = ["{}", "({})", "{}. it", "The answer is {}", "{}", "{}", "{}"]
    sequence_answers = [s.format(t) for s, t in zip(spellings, truth, strict=False)] + wrong[7:]
    scripted["answers"] = count_answers + sequence_answers
    args = benchmark_args(tiny_model_dir, "mvbench", root / "mvbench/json", root / "mvbench/video", tmp_path / "out")
    metrics, records, printed = run_benchmark(args, capsys)
    assert metrics["by_task"] == {
        "action_count": {"num_samples": 10, "accuracy": 4 / 10},
        "action_sequence": {"num_samples": 10, "accuracy": 7 / 10},
    }
    assert metrics["accuracy"] == 11 / 20 and metrics["num_frames"] == 16 and metrics["bad_rows"] == 1
    assert "action_sequence.json row 3: answer 'red' matches options A and B" in metrics["bad_row_reasons"][0]
    assert sum(r["correct"] for r in records) == 11 and "action_sequence" in printed and "55.0%" in printed
    options, _, _ = first_color_options(0)
    assert scripted["prompts"][10] == (
        "Question:Which color comes first?\nOption:\n"
        + "".join(f"({'ABCD'[i]}) {o}\n" for i, o in enumerate(options))
        + MVBENCH_INSTRUCTION
    )


@pytest.mark.slow
def test_videomme_and_nextqa_scored_by_category_with_hand_computed_accuracy(
    published, tiny_model_dir, tmp_path, scripted, capsys
):
    root = published["root"]
    truth = ["ABCD"[first_color_options(k)[2]] for k in range(8)]
    wrong = ["ABCD"[(first_color_options(k)[2] + 1) % 4] for k in range(8)]
    # Video-MME: rows 0-3 Temporal (short, medium, short, medium), 4-7 Attribute. Right: 0, 1, 2, 4 (and 6 is a
    # long answer naming no letter in capitals -> wrong).
    scripted["answers"] = [
        truth[0],
        f"The best answer is {truth[1]}",
        f"{truth[2]}.",
        wrong[3],
        truth[4],
        wrong[5],
        "it is the red one that comes first in this video clip as shown",
        wrong[7],
    ]
    args = benchmark_args(
        tiny_model_dir, "videomme", root / "videomme/videomme", root / "videomme/data", tmp_path / "mme"
    )
    metrics, _, _ = run_benchmark(args, capsys)
    assert metrics["accuracy"] == 4 / 8 and metrics["num_frames"] == 32
    assert metrics["by_task_type"] == {
        "Attribute Perception": {"num_samples": 4, "accuracy": 1 / 4},
        "Temporal Perception": {"num_samples": 4, "accuracy": 3 / 4},
    }
    assert metrics["by_duration"] == {
        "medium": {"num_samples": 4, "accuracy": 1 / 4},
        "short": {"num_samples": 4, "accuracy": 3 / 4},
    }
    prompt = scripted["prompts"][0]
    assert prompt.startswith("Select the best answer") and prompt.endswith("The best answer is:")
    assert "A. A." not in prompt and f"\nA. {first_color_options(0)[0][0]}\n" in prompt

    # NExT-QA: types CW CH TN TP(->TN) TC DC DL DO. Right: 0 "(X)", 2 "X.", 3 long answer with the option's text,
    # 5 "X is right"; wrong: 1, 4, 6, 7 ("E" = "none of them" is option E, wrong).
    first = [first_color_options(k)[1] for k in range(8)]
    scripted["answers"] = [
        f"({truth[0]})",
        wrong[1],
        f"{truth[2]}.",
        f"I think that the first color is {first[3]}",
        wrong[4],
        f"{truth[5]} is right",
        "E",
        "no idea",
    ]
    nextqa = root / "nextqa/val.csv", root / "nextqa/NExTVideo"
    args = benchmark_args(tiny_model_dir, "nextqa", *nextqa, tmp_path / "nqa", "--media-template", "{video}.mp4")
    metrics, _, printed = run_benchmark(args, capsys)
    assert metrics["accuracy"] == 4 / 8
    assert metrics["by_group"] == {
        "causal": {"num_samples": 2, "accuracy": 1 / 2},
        "descriptive": {"num_samples": 3, "accuracy": 1 / 3},
        "temporal": {"num_samples": 3, "accuracy": 2 / 3},
    }
    assert metrics["by_type"]["TN"] == {"num_samples": 2, "accuracy": 1.0}
    assert "descriptive" in printed


BENCHMARK_FILES = {  # benchmark -> its annotation file or folder, and its videos
    "mvbench": ("mvbench/json", "mvbench/video"),
    "videomme": ("videomme/videomme", "videomme/data"),
    "nextqa": ("nextqa/val.csv", "nextqa/NExTVideo"),
}


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", sorted(BENCHMARK_FILES))
def test_vidtune_eval_benchmark_with_the_tiny_model_matches_a_recomputation(
    published, tiny_model_dir, tmp_path, capsys, benchmark
):
    from vidtune.train.evaluation.benchmarks import BENCHMARKS

    root = published["root"]
    data, media = BENCHMARK_FILES[benchmark]
    args = benchmark_args(tiny_model_dir, benchmark, root / data, root / media, tmp_path / "out", "--num-frames", "4")
    metrics, records, _ = run_benchmark(args, capsys)
    assert metrics["num_samples"] == len(records) == {"mvbench": 20, "videomme": 8, "nextqa": 8}[benchmark]
    assert metrics["num_frames"] == 4
    parse = BENCHMARKS[benchmark].parse
    by_hand = [parse(r["prediction"], ["x"] * (3 if "count" in r["at"] else 5)) == r["answer"] for r in records]
    assert metrics["accuracy"] == sum(by_hand) / len(records)


def test_a_benchmark_with_a_wrong_media_root_fails_naming_rows_instead_of_scoring_a_subset(published, tmp_path):
    from vidtune.data.conversation import DataError
    from vidtune.train.evaluation.benchmarks import BENCHMARKS, benchmark_sources, load_benchmark

    bench, root = BENCHMARKS["videomme"], published["root"]
    items, bad = load_benchmark(
        bench, benchmark_sources(bench, str(root / "videomme/videomme"), str(root / "videomme/data"))
    )
    assert len(items) == 8 and not bad.bad
    with pytest.raises(DataError, match=r"videomme \(test-00000-of-00001\.parquet\): 100\.0% bad .*video not found"):
        load_benchmark(bench, benchmark_sources(bench, str(root / "videomme/videomme"), str(tmp_path)))


def test_every_dataset_tokenises_to_its_meaning(published, builder, processor):
    """Through the model's processor: the labels decode to the dataset's answer (the right letter, the segment's
    caption) and its end of turn, and no option letter is doubled in the prompt."""
    import re

    from vidtune.data.dataset import load_media
    from vidtune.data.examples import IGNORE_INDEX
    from vidtune.data.video import SamplingConfig

    for name, source in sources(published["root"]).items():
        row = rows_of(source)[0][1]
        media, _ = load_media(row["messages"], SamplingConfig(4), False, None)
        example = builder.build(row["messages"], media)
        labelled = example["input_ids"][example["labels"] != IGNORE_INDEX]
        assert processor.tokenizer.decode(labelled).strip() == f"{assistant_texts(row['messages'])[0]}</s>", name
        prompt = processor.tokenizer.decode(example["input_ids"][example["labels"] == IGNORE_INDEX])
        assert not re.search(r"\b([A-Z])[.)] \(?\1[.)]", prompt), (name, prompt)
