"""Throughput paths give the same numbers as the plain ones: the chunked loss (no full logits), uint8 pixels;
the start-up measurements cached on disk. (Packing: test_packing.py.)"""

from __future__ import annotations

import copy
import os
import pickle
import shutil

import torch

from tests.test_collator import mixed_examples
from vidtune.data import dataset
from vidtune.data.collator import Collator
from vidtune.data.conversation import media_part, message, text_part
from vidtune.data.dataset import DataConfig
from vidtune.data.examples import ExampleBuilder
from vidtune.data.families.llava_next_video import LLAVA_NEXT_VIDEO
from vidtune.data.video import SamplingConfig, probe_video
from vidtune.train.training.loss import ChunkedLoss, language_head, model_loss


def loss_and_gradients(model, loss_fn, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_chunked_loss_has_the_models_loss_and_gradients(tiny_model, builder, clips, tmp_path, processor):
    """With the label positions from the host (as training collates) or picked by a mask on the device; per row
    (evaluation) too."""
    model = copy.deepcopy(tiny_model)
    examples = mixed_examples(builder, clips, tmp_path)
    batch = Collator(processor.tokenizer.pad_token_id, family=LLAVA_NEXT_VIDEO)(examples)
    positioned = Collator(processor.tokenizer.pad_token_id, family=LLAVA_NEXT_VIDEO, loss_positions=True)(examples)
    assert len(positioned["label_positions"]) == (batch["labels"][:, 1:] != -100).sum() > 7  # several chunks of 3
    expected_loss, expected_grads = loss_and_gradients(model, model_loss, batch)
    chunked = ChunkedLoss(language_head(model), chunk_tokens=3)
    assert_same_loss_and_gradients(loss_and_gradients(model, model_loss, positioned), expected_loss, expected_grads)
    for collated in (batch, positioned):
        assert_same_loss_and_gradients(loss_and_gradients(model, chunked, collated), expected_loss, expected_grads)
    rows, counts = chunked.per_row(model, batch)
    assert rows.sum().isclose(expected_loss, rtol=1e-5) and counts.sum() == len(positioned["label_positions"])
    for got, expected in zip(chunked.per_row(model, positioned), (rows, counts), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def assert_same_loss_and_gradients(got, expected_loss, expected_grads) -> None:
    loss, grads = got
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    assert grads.keys() == expected_grads.keys() and "lm_head.weight" in grads
    for name, grad in grads.items():
        # fp32 sums in another order: within 1e-5 of the tensor's scale (a key bias, whose true gradient is 0,
        # holds only rounding noise)
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=max(1e-5 * scale, 1e-7), msg=name)


def test_uint8_pixels_normalised_on_the_device_equal_the_processors_and_travel_in_a_quarter(
    builder, clips, tmp_path, processor
):
    raw_builder = ExampleBuilder(processor, LLAVA_NEXT_VIDEO, raw_pixels=True)
    today, raw = mixed_examples(builder, clips, tmp_path), mixed_examples(raw_builder, clips, tmp_path)
    assert raw[0]["pixel_values_videos"].dtype == torch.uint8
    assert raw[0]["pixel_values_videos"].nbytes * 4 == today[0]["pixel_values_videos"].nbytes
    assert len(pickle.dumps(raw[1])) < len(pickle.dumps(today[1])) / 2  # what a worker sends (tiny 32 px frames)
    collate = Collator(processor.tokenizer.pad_token_id, family=LLAVA_NEXT_VIDEO)
    expected, normalised = collate(today), LLAVA_NEXT_VIDEO.normalize_pixels(collate(raw), processor)
    assert expected.keys() == normalised.keys()
    for key, value in expected.items():
        assert value.dtype == normalised[key].dtype, key
        torch.testing.assert_close(normalised[key], value, atol=1e-6, rtol=0, msg=key)


def test_measurements_are_reused_on_a_relaunch_and_redone_for_a_changed_file(builder, clips, tmp_path, monkeypatch):
    monkeypatch.setenv("VIDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    clip = tmp_path / "clip.mp4"
    shutil.copy(clips["red_blue"], clip)
    row = {
        "messages": [
            message("user", [media_part("video", str(clip)), text_part("Which color comes first?")]),
            message("assistant", [text_part("red")]),
        ],
        "at": "corpus.jsonl:1",
    }
    probed = []
    monkeypatch.setattr(dataset, "probe_video", lambda path, backend: probed.append(path) or probe_video(path))
    cfg = DataConfig(sampling=SamplingConfig(4))

    first = dataset.cached_measurer(builder, cfg)(row)
    assert len(probed) == 1 and first["num_media_tokens"] > 0
    assert dataset.cached_measurer(builder, cfg)(row) == first and len(probed) == 1  # a relaunch: read back
    shorter = dataset.cached_measurer(builder, DataConfig(sampling=SamplingConfig(2)))(row)  # other settings
    assert len(probed) == 2 and shorter["num_media_tokens"] == first["num_media_tokens"] // 2
    os.utime(clip, ns=(clip.stat().st_atime_ns, clip.stat().st_mtime_ns + 10**9))  # the file changed
    assert dataset.cached_measurer(builder, cfg)(row) == first and len(probed) == 3
    batched = dataset.cached_measurer(builder, cfg).measure_batch({key: [value] * 2 for key, value in row.items()})
    assert batched == {key: [value] * 2 for key, value in first.items()} and len(probed) == 3  # (datasets' map)
