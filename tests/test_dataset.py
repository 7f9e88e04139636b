"""Prepared datasets: over-long samples dropped with reasons (never truncated), seeded jitter, batch order."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from vidtune.data.collator import Collator
from vidtune.data.conversation import DataError
from vidtune.data.dataset import (
    DataConfig,
    EpochBatchSampler,
    ExampleMaker,
    Measurer,
    SFTDataset,
    StreamingSFTDataset,
    prepare_rows,
)
from vidtune.data.families.llava_next_video import LLAVA_NEXT_VIDEO
from vidtune.data.sources import SourceConfig
from vidtune.data.video import SamplingConfig


def corpus(tmp_path, clips, answers: list[str]):
    path = tmp_path / "qa.jsonl"
    rows = [
        {"video": str(clips["red_blue" if i % 2 else "three"]), "question": "Which color comes first?", "answer": a}
        for i, a in enumerate(answers)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(path, **overrides) -> DataConfig:
    return DataConfig(
        sources=[SourceConfig(path=str(path), media_root="/")], sampling=SamplingConfig(4), num_workers=0, **overrides
    )


def test_over_long_samples_are_dropped_with_their_reason_never_truncated(tmp_path, clips, family_kit):
    builder = family_kit.builder
    long_answer = " ".join(["red then blue"] * 20)
    path = corpus(tmp_path, clips, ["red", long_answer, "green", long_answer])
    measured, _, _ = prepare_rows(config(path), builder, seed=0)
    short, long = sorted(r["num_tokens"] for r in measured)[1:3]
    max_length = short + 4  # the short answers fit, the long ones (40+ more tokens) do not
    assert long > max_length
    rows, _, report = prepare_rows(config(path, max_length=max_length), builder, seed=0)
    assert len(rows) == 2 and report.dropped == 2
    assert report.reasons == {"longer than max_length": 2}
    assert "qa.jsonl line 2:" in report.examples["longer than max_length"][0]
    assert f"exceed max_length {max_length}" in report.summary()
    dataset = SFTDataset(rows, ExampleMaker(builder, config(path, max_length=max_length), seed=0, train=True))
    for index in range(len(dataset)):
        example = dataset[(0, index)]
        assert len(example["input_ids"]) <= max_length
        video_tokens = int((example["input_ids"] == builder.video_token_id).sum())
        if family_kit.name in ("qwen3_vl", "qwen3_5", "gemma4"):
            # its measure also holds each temporal patch's `<t seconds>` text (Gemma 4: each frame's `mm:ss <|image>`
            # ... `<image|>`), which training's jittered frame times may lengthen by a token or two; the video tokens
            # themselves are pinned elsewhere
            assert video_tokens > 0 and abs(len(example["input_ids"]) - rows[index]["num_tokens"]) <= 2
        elif family_kit.name == "internvl":
            # its measure also holds each frame's `Frame{i}: <img>`...`</img>` text around the frame's tokens
            assert len(example["input_ids"]) == rows[index]["num_tokens"]
            assert video_tokens == 4 * family_kit.processor.image_seq_length < rows[index]["num_media_tokens"]
        else:
            assert video_tokens == rows[index]["num_media_tokens"]  # all video tokens present, as measured
        assert (example["labels"] != -100).sum() > 0  # the answer survived
    if family_kit.name == "llava_next_video":
        assert video_tokens == 16  # 4 frames x 4 tokens


def test_nothing_fits_is_an_error(tmp_path, clips, builder):
    path = corpus(tmp_path, clips, ["red"])
    with pytest.raises(DataError, match="no sample fits"):
        prepare_rows(config(path, max_length=20), builder, seed=0)


def test_missing_video_names_file_row_and_problem(tmp_path, builder):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"video": "gone.mp4", "question": "Q", "answer": "A"}) + "\n")
    with pytest.raises(DataError, match=r"qa.jsonl line 1: .*gone.mp4: video not found"):
        prepare_rows(DataConfig(sources=[SourceConfig(path=str(path))]), builder, seed=0)


def test_time_instruction_is_measured_and_built_alike(tmp_path, clips, builder, processor):
    path = corpus(tmp_path, clips, ["red", "blue"])
    cfg = config(path, time_instruction=True)
    rows, _, _ = prepare_rows(cfg, builder, seed=0)
    dataset = SFTDataset(rows, ExampleMaker(builder, cfg, seed=0, train=False))
    example = dataset[(0, 0)]
    assert len(example["input_ids"]) == rows[0]["num_tokens"]
    assert "The video lasts 3.0 seconds; 4 frames were sampled at" in processor.tokenizer.decode(example["input_ids"])


def test_frame_jitter_depends_on_seed_epoch_and_row_only(tmp_path, clips, builder):
    path = corpus(tmp_path, clips, ["red"] * 4)
    cfg = config(path)
    rows, _, _ = prepare_rows(cfg, builder, seed=0)
    first = SFTDataset(rows, ExampleMaker(builder, cfg, seed=0, train=True))
    second = SFTDataset(rows, ExampleMaker(builder, cfg, seed=0, train=True))
    assert torch.equal(first[(1, 2)]["pixel_values_videos"], second[(1, 2)]["pixel_values_videos"])
    epochs = {first[(e, 0)]["pixel_values_videos"].sum().item() for e in range(6)}
    assert len(epochs) > 1  # different frames in different epochs
    evaluation = SFTDataset(rows, ExampleMaker(builder, cfg, seed=0, train=False))
    assert torch.equal(evaluation[(0, 0)]["pixel_values_videos"], evaluation[(5, 0)]["pixel_values_videos"])


def test_batch_order_is_a_function_of_seed_and_epoch():
    lengths = [10, 50, 20, 80, 30, 60, 40, 70] * 4
    sampler = EpochBatchSampler(lengths, batch_size=4, seed=1)
    sampler.set_epoch(3)
    order = list(sampler)
    again = EpochBatchSampler(lengths, batch_size=4, seed=1)
    again.set_epoch(3)
    assert list(again) == order and all(key[0] == 3 for batch in order for key in batch)
    sampler.set_epoch(4)
    assert list(sampler) != order
    rows = sorted(key[1] for batch in order for key in batch)
    assert rows == list(range(len(lengths))) and len(order) == len(sampler) == 8


def test_group_by_length_cuts_padding():
    import random

    lengths = [random.Random(i).choice([40, 60, 300, 320, 1200, 1250]) for i in range(512)]

    def efficiency(sampler) -> float:
        batches = [[lengths[r] for _, r in b] for b in sampler]
        return sum(map(sum, batches)) / sum(max(b) * len(b) for b in batches)

    plain = efficiency(EpochBatchSampler(lengths, 8, seed=0))
    grouped = efficiency(EpochBatchSampler(lengths, 8, seed=0, group_by_length=True))
    assert grouped > 0.95 > plain


def test_streaming_dataset_filters_on_the_fly_and_shards_by_rank(tmp_path, clips, builder):
    path = corpus(tmp_path, clips, ["red", " ".join(["blue"] * 60), "green", "yellow", "red", "blue"])
    cfg = config(path, max_length=48)
    make = ExampleMaker(builder, cfg, seed=0, train=True)
    shards = [list(StreamingSFTDataset(cfg, Measurer(builder, cfg), make, rank, 2, seed=0)) for rank in (0, 1)]
    assert sum(len(s) for s in shards) == 5  # one dropped for length
    loader = torch.utils.data.DataLoader(
        StreamingSFTDataset(cfg, Measurer(builder, cfg), make, 0, 1, seed=0),
        batch_size=2,
        collate_fn=Collator(0, family=LLAVA_NEXT_VIDEO),
    )
    assert sum(b["input_ids"].shape[0] for b in loader) == 5


class RowNames:
    """A stand-in ExampleMaker (picklable into DataLoader workers): which row, in which pass; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def make(self, row, epoch, index):
        self.calls += 1
        return {"at": row["at"], "pass": epoch}


def test_a_one_file_stream_feeds_every_dataloader_worker_shuffled(tmp_path, clips, builder):
    """One file is one `datasets` shard: split per worker by row, every row comes out exactly once per pass, in a
    seeded shuffled order (the same for the same seed, another for the next pass)."""
    path = corpus(tmp_path, clips, ["red", "green", "blue", "yellow", "red", "green", "blue", "yellow"])
    cfg = config(path, stream_shuffle_buffer=100)

    def one_pass(seed: int, workers: int, repeat: bool = False, batches: int | None = None) -> list[str]:
        stream = StreamingSFTDataset(cfg, Measurer(builder, cfg), RowNames(), 0, 1, seed=seed, repeat=repeat)
        loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=workers, collate_fn=list)
        return [ex["at"] for batch in itertools.islice(loader, batches) for ex in batch]

    file_order = [f"qa.jsonl line {i}" for i in range(1, 9)]
    # Repeating, as training reads it: a worker left without rows would stop the run ("holds no sample").
    with_workers = one_pass(seed=0, workers=2, repeat=True, batches=4)
    assert sorted(with_workers) == sorted(file_order)  # each row once: the two workers share the one file
    in_process = one_pass(seed=0, workers=0)
    assert sorted(in_process) == sorted(file_order) and in_process != file_order  # shuffled
    assert one_pass(seed=0, workers=0) == in_process and one_pass(seed=1, workers=0) != in_process
    two_passes = one_pass(seed=0, workers=0, repeat=True, batches=8)
    assert two_passes[:8] == in_process and sorted(two_passes[8:]) == sorted(file_order)
    assert two_passes[8:] != in_process  # reshuffled for the next pass


def test_a_resumed_stream_continues_where_it_stopped_without_decoding_what_it_skips(tmp_path, clips, builder):
    path = corpus(tmp_path, clips, ["red", "green", "blue", "yellow", "red", "green"])
    cfg = config(path)

    def stream(maker):
        return StreamingSFTDataset(cfg, Measurer(builder, cfg), maker, 0, 1, seed=0, repeat=True, batch_size=2)

    whole = list(itertools.islice(iter(stream(RowNames())), 10))
    maker = RowNames()
    resumed = stream(maker)
    resumed.skip_batches(3)  # 6 samples: one whole pass
    assert list(itertools.islice(iter(resumed), 4)) == whole[6:10]
    assert maker.calls == 4  # the 6 skipped samples were never built (decoded)


def test_workers_default_to_the_cores_this_process_may_use(monkeypatch):
    from vidtune.data import dataset

    monkeypatch.setattr(dataset.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert dataset.default_num_workers(processes_per_node=1) == 15  # one core kept for the main process
    assert dataset.default_num_workers(processes_per_node=8) == 1  # 8 GPUs' processes share the 16 cores
    monkeypatch.setattr(dataset.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert dataset.default_num_workers(processes_per_node=1) == 1  # never decoding in the main process
