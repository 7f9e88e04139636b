"""Batches: padding sides, label padding, and mixed batches (frame counts, images, text-only) through the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidtune.data.collator import Collator
from vidtune.data.conversation import media_part, message, text_part
from vidtune.data.dataset import load_media
from vidtune.data.examples import IGNORE_INDEX
from vidtune.data.families.llava_next_video import LLAVA_NEXT_VIDEO
from vidtune.data.video import SamplingConfig


def example(ids: list[int], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.ones(len(ids), dtype=torch.long),
        "labels": torch.tensor(labels),
    }


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_side_masks_and_labels(side):
    batch = Collator(pad_token_id=0, padding_side=side)([example([5, 6, 7], [-100, 6, 7]), example([8], [8])])
    if side == "right":
        assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
        assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    else:
        assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
        assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]


def test_pad_to_multiple_of():
    batch = Collator(pad_token_id=0, pad_to_multiple_of=8)([example([1, 2, 3], [1, 2, 3])])
    assert batch["input_ids"].shape == (1, 8) and batch["labels"][0, 3:].eq(IGNORE_INDEX).all()


def mixed_examples(builder, clips, tmp_path):
    """Clips of 4 and 6 frames, an image sample, and a text-only sample."""
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(image)
    conversations = [
        (
            [
                message("user", [media_part("video", str(clips["red_blue"])), text_part("Which color comes first?")]),
                message("assistant", [text_part("red")]),
            ],
            SamplingConfig(4),
        ),
        (
            [
                message("user", [media_part("video", str(clips["three"])), text_part("Describe this video.")]),
                message("assistant", [text_part("red then green then blue")]),
            ],
            SamplingConfig(6),
        ),
        (
            [
                message("user", [media_part("image", str(image)), text_part("What is it?")]),
                message("assistant", [text_part("a picture")]),
            ],
            SamplingConfig(4),
        ),
        ([message("user", [text_part("Say yes.")]), message("assistant", [text_part("Yes")])], SamplingConfig(4)),
    ]
    return [builder.build(msgs, load_media(msgs, sampling, False, None)[0]) for msgs, sampling in conversations]


def summed_loss(model, batch) -> torch.Tensor:
    return model(**batch, num_items_in_batch=1).loss  # the model's loss, summed over label tokens


def parameters_under(model, prefix: str) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if name.startswith(prefix)]


def test_mixed_batch_runs_forward_and_backward_and_sums_like_single_samples(family_kit, clips, tmp_path):
    family, model = family_kit.family, family_kit.model
    examples = mixed_examples(family_kit.builder, clips, tmp_path)
    collate = Collator(family_kit.processor.tokenizer.pad_token_id, family=family)
    batch = collate(examples)
    if family_kit.name == "llava_next_video":
        assert batch["pixel_values_videos"].shape[:2] == (1, 10)  # 4 + 6 frames, none padded
        assert batch["pixel_values"].shape[0] == int(examples[2]["pixel_values"].shape[0])
    model.train()
    model.zero_grad()
    total = summed_loss(model, batch)
    total.backward()
    assert all(p.grad is not None for p in parameters_under(model, family.projector_prefix))
    assert sum(p.grad.abs().sum() for p in parameters_under(model, family.vision_tower_prefix) if p.grad is not None)
    with torch.no_grad():
        singles = sum(summed_loss(model, collate([ex])) for ex in examples)
    torch.testing.assert_close(total.detach(), singles, rtol=1e-5, atol=0)
    model.eval()


def test_concatenated_frames_give_the_logits_of_separate_forwards(family_kit, clips, tmp_path):
    """Pins the model internals the collator relies on: video features fill video-token positions in order."""
    model = family_kit.model
    examples = mixed_examples(family_kit.builder, clips, tmp_path)
    examples = examples[:2] + examples[3:]
    collate = Collator(family_kit.processor.tokenizer.pad_token_id, family=family_kit.family)
    with torch.no_grad():
        batch_logits = model(**collate(examples)).logits
        for row, ex in enumerate(examples):
            single = model(**collate([ex])).logits[0]
            torch.testing.assert_close(batch_logits[row, : len(ex["input_ids"])], single, rtol=1e-4, atol=1e-5)


def test_collator_works_in_dataloader_workers(builder, processor, clips, tmp_path):
    examples = mixed_examples(builder, clips, tmp_path)
    loader = torch.utils.data.DataLoader(
        examples,
        batch_size=2,
        num_workers=2,
        collate_fn=Collator(processor.tokenizer.pad_token_id, family=LLAVA_NEXT_VIDEO),
    )
    batches = list(loader)
    assert len(batches) == 2 and batches[1]["input_ids"].shape[0] == 2


def test_batched_generation_answers_each_prompt_as_it_is_answered_alone(family_kit, clips):
    """Clips of 4 and 6 frames and a text-only prompt, left-padded into one generation batch: every answer is the
    one its prompt gets alone (OneVision: each clip's newline after its own frames; Qwen3.5: left padding through
    its recurrent Gated DeltaNet layers)."""
    from vidtune.train.generation.infer import InferenceModel, decode_answer, generate_tokens

    prompts = [
        ([message("user", [media_part("video", str(clips["red_blue"])), text_part("Which color first?")])], 4),
        ([message("user", [media_part("video", str(clips["three"])), text_part("Describe it.")])], 6),
        ([message("user", [text_part("Say yes, and then say a few more words about it.")])], 4),
    ]
    builder = family_kit.builder
    examples = [
        builder.build(msgs, load_media(msgs, SamplingConfig(n), False, None)[0], for_generation=True)
        for msgs, n in prompts
    ]
    im = InferenceModel(family_kit.model, family_kit.processor, family_kit.family, builder, SamplingConfig(4), False)
    together = [decode_answer(im, row.tolist()) for row in generate_tokens(im, examples, max_new_tokens=4)]
    alone = [decode_answer(im, generate_tokens(im, [ex], max_new_tokens=4)[0].tolist()) for ex in examples]
    assert together == alone and any(together)
