"""train.packing, for every family: a packed micro-batch (one row, or first-fit rows) gives the padded batch's loss
and gradients, and attention never crosses from one sample to another."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import FAMILY_NAMES
from tests.test_throughput import loss_and_gradients
from tests.test_train import tiny_recipe
from vidtune.data.collator import Collator
from vidtune.data.conversation import media_part, message, text_part
from vidtune.data.dataset import load_media
from vidtune.data.families import family_for
from vidtune.data.packing import FLASH_KEYS, first_fit_decreasing, pack_layout, pop_counts
from vidtune.data.video import SamplingConfig
from vidtune.train.training.flops import squared_lengths
from vidtune.train.training.loss import ChunkedLoss, language_head, model_loss

PACKABLE = [name for name in FAMILY_NAMES if family_for(name).supports_packing]
UNPACKABLE = sorted(set(FAMILY_NAMES) - set(PACKABLE))


@pytest.fixture(scope="module", params=PACKABLE)
def family_kit(request: pytest.FixtureRequest, family_kits):
    """Every family that packs (the others are refused: the last test)."""
    return family_kits(request.param)


@pytest.fixture(scope="module")
def packing_media(clips, tmp_path_factory) -> dict[str, Path]:
    """A 64x48 clip, a 112x56 clip (another frame size: another grid for Qwen), and an image."""
    from PIL import Image

    from vidtune.train.demo.clips import write_color_clip

    root = tmp_path_factory.mktemp("packing-media")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(root / "photo.png")
    wide = write_color_clip(root / "wide.mp4", ["green", "yellow", "red"], height=56, width=112, seed=1)
    return {"small": clips["red_blue"], "wide": wide, "image": root / "photo.png"}


@pytest.fixture(scope="module")
def examples(family_kit, packing_media) -> list[dict[str, torch.Tensor]]:
    """Clips of 4 and 2 frames of two frame sizes, an image sample and a text-only sample (in that order)."""
    return mixed_examples(family_kit, packing_media)


def mixed_examples(kit, media: dict[str, Path]) -> list[dict[str, torch.Tensor]]:
    conversations = [
        ([media_part("video", str(media["small"])), text_part("Which color comes first?")], "red", 4),
        ([media_part("video", str(media["wide"])), text_part("Describe this video.")], "green then yellow", 2),
        ([media_part("image", str(media["image"])), text_part("What is it?")], "a picture", 4),
        ([text_part("Say yes.")], "Yes", 4),
    ]
    examples = []
    for parts, answer, frames in conversations:
        messages = [message("user", parts), message("assistant", [text_part(answer)])]
        examples.append(kit.builder.build(messages, load_media(messages, SamplingConfig(frames), False, None)[0]))
    return examples


def packer(kit, max_length: int | None = None, loss_positions: bool = False) -> Collator:
    pad = kit.processor.tokenizer.pad_token_id
    return Collator(
        pad,
        family=kit.family,
        packing=True,
        pack_max_length=max_length,
        model_config=kit.model.config,
        loss_positions=loss_positions,
    )


def assert_same_loss_and_gradients(got, expected) -> None:
    (loss, grads), (expected_loss, expected_grads) = got, expected
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        # fp32 sums in another order: within 1e-5 of the tensor's scale (a bias whose true gradient is 0 holds only
        # rounding noise)
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=max(1e-5 * scale, 1e-7), msg=name)


def test_packed_batches_give_the_padded_loss_and_gradients(family_kit, examples):
    assert family_kit.family.supports_packing
    model = copy.deepcopy(family_kit.model)
    lengths = [len(ex["input_ids"]) for ex in examples]
    padded = Collator(family_kit.processor.tokenizer.pad_token_id, family=family_kit.family)(examples)
    one_row = packer(family_kit)(examples)
    assert pop_counts(one_row) == (4, sum(lengths)) and one_row["input_ids"].shape == (1, sum(lengths))
    assert "attention_mask" not in one_row
    fill = max(lengths) + min(lengths) + 1  # the longest sample shares its row: boundaries mid-row, padding after
    rows = packer(family_kit, fill)(examples)
    assert pop_counts(rows)[0] == 4 and len(rows["input_ids"]) == len(first_fit_decreasing(lengths, fill)) < 4
    # The FLOP count's attention term finds the same samples in every layout (Qwen: 3-D multimodal positions).
    squares = sum(length**2 for length in lengths)
    assert [squared_lengths(b).item() for b in (padded, one_row, rows)] == [squares] * 3
    loss = ChunkedLoss(language_head(model))
    expected = loss_and_gradients(model, loss, padded)
    for batch, loss_fn in ((one_row, model_loss), (rows, loss)):  # the model's own loss: the ZeRO-3 path
        assert_same_loss_and_gradients(loss_and_gradients(model, loss_fn, batch), expected)
    # As training collates them: label positions from the host, and the flash-attention boundaries (which sdpa/eager
    # take and ignore: the padded batch above has none).
    with_positions = packer(family_kit, fill, loss_positions=True)(examples)
    pop_counts(with_positions)
    assert set(FLASH_KEYS) <= with_positions.keys() and not set(FLASH_KEYS) & padded.keys()
    assert_same_loss_and_gradients(loss_and_gradients(model, loss, with_positions), expected)


@pytest.mark.parametrize("max_length", [None, 60])
def test_packed_batches_carry_the_sample_boundaries_flash_attention_needs(family_kit, examples, max_length):
    """cu_seq_lens_q/k and max_length_q/k (host ints) are where the position ids restart in the flattened rows, as
    transformers would derive them on the device in every layer (prepare_fa_kwargs_from_position_ids)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    batch = packer(family_kit, max_length)(examples)
    positions = batch["position_ids"]
    text_positions = positions[0] if positions.ndim == 3 else positions  # Qwen: the text row of multimodal RoPE
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(text_positions)
    assert max_length is None or len(batch["input_ids"]) > 1  # first-fit rows, padding included
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["cu_seq_lens_q"].tolist() == cu_q.tolist()
    assert batch["cu_seq_lens_k"].tolist() == cu_k.tolist()
    assert isinstance(batch["max_length_q"], int) and batch["max_length_q"] == batch["max_length_k"] == int(max_q)
    assert int(max_k) == int(max_q)


def logits_by_sample(model, batch: dict, lengths: list[int]) -> list[torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0]
    return list(logits.split(lengths))


def test_attention_never_crosses_samples(family_kit, examples):
    """One row of all samples: changing the first sample's answer changes its own logits, never the later samples'
    (which would see it, were the row one sequence: the control, with positions that do not restart)."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    batch = packer(family_kit)(examples)
    pop_counts(batch)
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    answer = int((examples[0]["labels"] != -100).nonzero()[0])
    changed["input_ids"][0, answer] = family_kit.processor.tokenizer.pad_token_id
    assert int(batch["input_ids"][0, answer]) != family_kit.processor.tokenizer.pad_token_id
    before, after = (logits_by_sample(family_kit.model, b, lengths) for b in (batch, changed))
    assert not torch.allclose(before[0], after[0])
    for sample in range(1, len(examples)):
        torch.testing.assert_close(after[sample], before[sample], rtol=1e-6, atol=1e-6)
    one_sequence = batch["position_ids"].clone()
    text_positions = one_sequence[0] if one_sequence.ndim == 3 else one_sequence  # Qwen: the row masks come from
    text_positions[0] = torch.arange(sum(lengths))
    control = [
        logits_by_sample(family_kit.model, {**b, "position_ids": one_sequence}, lengths) for b in (batch, changed)
    ]
    assert not torch.allclose(control[0][1], control[1][1])


def test_flash_attention_gets_one_row_and_dense_masks_get_rows():
    """transformers' flash-attention finds packed samples only in a one-row batch (`_is_packed_sequence`), so rows
    there would attend across samples; sdpa/eager build a dense mask, so their rows stay within max_length."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    restarts = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    assert _is_packed_sequence(restarts, batch_size=1) and not _is_packed_sequence(restarts.repeat(2, 1), batch_size=2)
    assert pack_layout("flash_attention_2", 512) is None and pack_layout("sdpa", 512) == 512


def test_first_fit_decreasing_fills_rows_longest_first():
    assert first_fit_decreasing([5, 9, 3, 4, 12], capacity=12) == [[4], [1, 2], [0, 3]]


@pytest.mark.parametrize("name", UNPACKABLE)
def test_a_family_that_cannot_pack_is_refused_in_one_line_before_its_model_loads(
    name, family_kits, demo_corpus, tmp_path
):
    from vidtune.train.training.config import RecipeError
    from vidtune.train.training.loop import train

    output = tmp_path / "run"
    with pytest.raises(RecipeError, match=f"train.packing: the {name} family cannot pack: .*; set train.packing=false"):
        train(tiny_recipe(family_kits(name).model_dir, demo_corpus, output, "train.packing=true"))
    assert not (output / "trainable_parameters.json").exists()  # written once the model has loaded
