"""Supervised fine-tuning: the summed next-token loss of the answers, averaged over the step's label tokens."""

from __future__ import annotations

from typing import Any

import torch

from vidtune.train.training.loss import LossFunction


class SFTObjective:
    def __init__(self, loss: LossFunction):
        self.loss = loss  # chunked from hidden states, or the model's own under ZeRO-3 (training/loss.py)

    def __call__(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        return self.loss(model, batch)

    def units(self, batch: dict[str, Any]) -> torch.Tensor:
        return (batch["labels"][:, 1:] != -100).sum()  # labels are shifted inside the loss: position 0 never counts

    def figures(self, accelerator: Any) -> dict[str, torch.Tensor]:
        return {}
