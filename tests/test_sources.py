"""Corpus files -> normalised conversations: every file kind, column maps, mixing, and confined media paths."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from tests.conftest import shared_path
from vidtune.data.conversation import DataError, media_parts
from vidtune.data.sources import SourceConfig, iter_conversations, load_conversations, stream_conversations

QA_ROWS = [{"clip": f"v{i}.mp4", "question": f"Q{i}?", "answer": f"A{i}"} for i in range(4)]


def write(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    else:
        dataset = datasets.Dataset.from_list(rows)
        dataset.to_csv(path, index=False) if name.endswith(".csv") else dataset.to_parquet(path)
    return path


@pytest.mark.parametrize("name", ["qa.json", "qa.jsonl", "qa.csv", "qa.parquet"])
def test_every_file_kind_with_a_column_map(tmp_path, name):
    path = write(tmp_path, name, QA_ROWS)
    rows = list(iter_conversations(SourceConfig(path=str(path), columns={"video": "clip"})))
    assert [r["row"] for r in rows] == [0, 1, 2, 3]
    assert media_parts(rows[2]["messages"])[0]["path"] == str(tmp_path / "v2.mp4")
    assert rows[2]["messages"][1]["content"][0]["text"] == "A2"


def test_a_hugging_face_dataset_folder(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    datasets.Dataset.from_list(QA_ROWS).to_parquet(folder / "train.parquet")
    rows = list(iter_conversations(SourceConfig(path=str(folder), media_root=str(tmp_path), columns={"video": "clip"})))
    assert len(rows) == 4 and rows[0]["source"] == str(folder)


def test_csv_lists_stored_as_json_text(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text('video,question,options,answer\na.mp4,Where?,"[""Car"", ""Sea""]",1\n')
    rows = list(iter_conversations(SourceConfig(path=str(path))))
    assert rows[0]["messages"][1]["content"][0]["text"] == "B"


def test_an_audio_only_csv_row_with_its_audios_as_json_text_resolves_under_the_media_root(tmp_path):
    import csv

    path = tmp_path / "sounds.csv"
    messages = [{"role": "user", "content": "<audio>Who?"}, {"role": "assistant", "content": "Ann"}]
    with path.open("w", newline="") as f:  # lists stored as JSON text, as CSV exports write them
        csv.writer(f).writerows([["audios", "messages"], [json.dumps(["calls/1.wav"]), json.dumps(messages)]])
    rows = list(iter_conversations(SourceConfig(path=str(path))))
    assert [(p["type"], p["path"]) for p in media_parts(rows[0]["messages"])] == [
        ("audio", str(tmp_path / "calls" / "1.wav"))
    ]


def test_unknown_column_in_the_map_names_file_row_and_columns(tmp_path):
    path = write(tmp_path, "qa.jsonl", QA_ROWS)
    with pytest.raises(DataError, match=r"qa.jsonl line 1: column map names column\(s\) \['path'\]"):
        list(iter_conversations(SourceConfig(path=str(path), columns={"video": "path"})))


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(QA_ROWS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: invalid JSON"):
        list(iter_conversations(SourceConfig(path=str(path), columns={"video": "clip"})))


@pytest.mark.parametrize("raw", ["../secret.mp4", "/etc/passwd", "http://example.com/v.mp4"])
def test_media_paths_stay_inside_the_media_root(tmp_path, raw):
    path = write(tmp_path, "qa.jsonl", [{"video": raw, "question": "Q", "answer": "A"}])
    with pytest.raises(DataError, match=r"qa\.jsonl line 1: media"):
        list(iter_conversations(SourceConfig(path=str(path))))


def test_weights_and_sample_counts_mix_sources(tmp_path):
    a = write(tmp_path, "a.jsonl", QA_ROWS)
    b = write(tmp_path, "b.jsonl", QA_ROWS[:2])
    mixed = load_conversations(
        [
            SourceConfig(path=str(a), columns={"video": "clip"}, weight=0.5),
            SourceConfig(path=str(b), columns={"video": "clip"}, num_samples=5),
        ],
        seed=3,
    )
    sources = mixed["source"]
    assert sources.count("a.jsonl") == 2 and sources.count("b.jsonl") == 5
    b_rows = [r for r, s in zip(mixed["row"], sources, strict=True) if s == "b.jsonl"]
    assert sorted(set(b_rows)) == [0, 1]  # every row used before any repeats: 0,1 twice each plus one more
    again = load_conversations(
        [
            SourceConfig(path=str(a), columns={"video": "clip"}, weight=0.5),
            SourceConfig(path=str(b), columns={"video": "clip"}, num_samples=5),
        ],
        seed=3,
    )
    assert again["row"] == mixed["row"]


def test_streaming_yields_the_same_rows(tmp_path):
    a = write(tmp_path, "a.jsonl", QA_ROWS)
    streamed = list(stream_conversations([SourceConfig(path=str(a), columns={"video": "clip"})]))
    assert [r["row"] for r in streamed] == [0, 1, 2, 3]
    assert (
        streamed[1]["messages"]
        == load_conversations([SourceConfig(path=str(a), columns={"video": "clip"})])[1]["messages"]
    )


def test_shared_corpora_load_as_they_are():
    corpora = shared_path("corpora")
    videos = corpora.parent / "videos"
    sources = [
        SourceConfig(path=str(corpora / "llamafactory_demo/mllm_video_demo.json")),
        SourceConfig(path=str(corpora / "llamafactory_demo/mllm_demo.json")),
        SourceConfig(path=str(corpora / "llava_video_style.json"), media_root=str(videos)),
        SourceConfig(path=str(corpora / "captions.jsonl"), media_root=str(videos)),
        SourceConfig(path=str(corpora / "multiple_choice.jsonl"), media_root=str(videos)),
    ]
    rows = load_conversations(sources)
    for row in rows:
        for part in media_parts(row["messages"]):
            assert Path(part["path"]).is_file(), (row["at"], part["path"])
    by_source = {s: sum(1 for x in rows["source"] if x == s) for s in set(rows["source"])}
    assert by_source["mllm_video_demo.json"] == 3 and by_source["multiple_choice.jsonl"] == 3
    bunny = next(r for r in rows if r["source"] == "captions.jsonl" and r["row"] == 1)
    assert media_parts(bunny["messages"])[0]["end_s"] == 4.0


def test_a_field_from_several_columns_and_a_media_path_from_an_id(tmp_path):
    rows = [{"vid": 7, "question": "Q?", "a0": "x", "a1": "y", "a2": "z", "answer": 2}]
    path = write(tmp_path, "nextqa.jsonl", rows)
    source = SourceConfig(path=str(path), columns={"options": ["a0", "a1", "a2"]}, media_template="clips/{vid}.mp4")
    row = next(iter_conversations(source))
    assert media_parts(row["messages"])[0]["path"] == str(tmp_path / "clips" / "7.mp4")
    assert row["messages"][1]["content"][0]["text"] == "C"
    with pytest.raises(DataError, match=r"nextqa\.jsonl line 1: media_template 'v_\{video_id\}\.mp4' names column "):
        next(iter_conversations(SourceConfig(path=str(path), media_template="v_{video_id}.mp4")))
    with pytest.raises(DataError, match=r"nextqa\.jsonl line 1: media path '\.\./7\.mp4' lies outside the media root"):
        next(iter_conversations(SourceConfig(path=str(path), media_template="../{vid}.mp4")))
    with pytest.raises(DataError, match=r"columns\.options must be a column name or a list of them"):
        next(iter_conversations(SourceConfig(path=str(path), columns={"options": []})))
