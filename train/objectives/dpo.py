"""Direct preference optimisation on (chosen, rejected) pairs (data/preference.py: chosen rows first in a batch).

Per pair, with log-probs summed over each answer's tokens and the reference being the same model with its LoRA
adapter disabled (no second copy in memory):

    sigmoid       loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))                   (DPO)
    sigmoid_norm  the same on log-ratios divided by each answer's token count (length-normalised)
    ipo           loss = ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2         (IPO, as TRL)

plus, with sft_weight > 0, that weight times the chosen answer's token-mean NLL (RPO). The loop averages the
summed loss over the pairs of the whole step. Logged: rewards (beta x log-ratio) of chosen and rejected, their
margin, and how often the chosen one wins.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F

from vidtune.data.preference import pair_count
from vidtune.train.objectives.base import Figures, label_logps, per_row
from vidtune.train.objectives.reference import AdapterOff
from vidtune.train.objectives.settings import DPOSettings


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    settings: DPOSettings,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss (P,) and the chosen and rejected rewards (P,), from summed log-probs (P,) each; the token
    counts (P,) are needed by the length-normalised losses."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    beta = settings.beta
    if settings.loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(f"dpo loss_type={settings.loss_type} needs the answers' token counts")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        loss = (delta - 1 / (2 * beta)) ** 2 if settings.loss_type == "ipo" else -F.logsigmoid(beta * delta)
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def answer_logps(
    model: Any, batch: dict[str, Any], head: torch.nn.Module | None, autocast: Callable[[], AbstractContextManager[Any]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's answer tokens and each row's answer token count, read through `head` (None:
    the model's own logits, under ZeRO-3)."""
    logps, rows = label_logps(model, batch, head, autocast)
    num_rows = len(batch["input_ids"])
    return per_row(logps, rows, num_rows), per_row(torch.ones_like(logps), rows, num_rows)


class DPOObjective:
    def __init__(
        self,
        settings: DPOSettings,
        head: torch.nn.Module | None,
        autocast: Callable[[], AbstractContextManager[Any]],
        reference: Any = None,
    ):
        self.settings, self.head, self.autocast = settings, head, autocast
        self.reference = reference or AdapterOff(head)  # the start: LoRA's adapter off, or a frozen copy (full)
        self.tracked = Figures()

    def units(self, batch: dict[str, Any]) -> torch.Tensor:
        return pair_count(batch)

    def sequence_logps(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs of each row's answer tokens (2P,) and each row's answer token count (2P,)."""
        return answer_logps(model, batch, self.head, self.autocast)

    def __call__(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        policy, tokens = self.sequence_logps(model, batch)
        with self.reference(model, batch) as (start, head):
            reference, _ = answer_logps(start, batch, head, self.autocast)
        policy_chosen, policy_rejected = policy.chunk(2)
        reference_chosen, reference_rejected = reference.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        loss, chosen_reward, rejected_reward = dpo_loss(
            policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.settings, chosen_tokens,
            rejected_tokens,
        )  # fmt: skip
        if self.settings.sft_weight:
            loss = loss - self.settings.sft_weight * policy_chosen / chosen_tokens.clamp(min=1)
        self.tracked.add("train/rewards/chosen", chosen_reward)
        self.tracked.add("train/rewards/rejected", rejected_reward)
        self.tracked.add("train/rewards/margin", chosen_reward - rejected_reward)
        self.tracked.add("train/rewards/accuracy", (chosen_reward > rejected_reward).float())
        return loss.sum()

    def figures(self, accelerator: Any) -> dict[str, torch.Tensor]:
        return self.tracked.read(accelerator)
