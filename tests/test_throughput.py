"""Throughput paths give the same numbers as the plain ones: the chunked loss (no full logits)."""

from __future__ import annotations

import copy

import torch

from tests.test_collator import mixed_examples
from vidtune.data.collator import Collator
from vidtune.data.families.llava_next_video import LLAVA_NEXT_VIDEO
from vidtune.train.training.loss import ChunkedLoss, language_head, model_loss


def loss_and_gradients(model, loss_fn, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_chunked_loss_has_the_models_loss_and_gradients(tiny_model, builder, clips, tmp_path, processor):
    model = copy.deepcopy(tiny_model)
    batch = Collator(processor.tokenizer.pad_token_id, family=LLAVA_NEXT_VIDEO)(
        mixed_examples(builder, clips, tmp_path)
    )
    assert (batch["labels"] != -100).sum() > 7  # several chunks of 3 label tokens below
    expected_loss, expected_grads = loss_and_gradients(model, model_loss, batch)
    chunked = ChunkedLoss(language_head(model), chunk_tokens=3)
    loss, grads = loss_and_gradients(model, chunked, batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    assert grads.keys() == expected_grads.keys() and "lm_head.weight" in grads
    for name, grad in grads.items():
        # fp32 sums in another order: within 1e-5 of the tensor's scale (a key bias, whose true gradient is 0,
        # holds only rounding noise)
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=max(1e-5 * scale, 1e-7), msg=name)
