"""Group relative policy optimisation: G completions sampled per prompt by the policy itself, scored by verifiable
rewards, normalised within their group, and reinforced token by token with ratio clipping and an optional KL to
the reference (the starting model: under LoRA the same model with its adapter disabled, under full fine-tuning a
frozen copy, reference.py; beta 0 skips it, as Dr. GRPO does).

Per completion i of a group with rewards r:   A_i = (r_i - mean(r)) / (std(r) + 1e-4)
Per completion token t:   ratio = exp(logp - logp_old),
    loss_t = -min(ratio A_i, clip(ratio, 1 - eps, 1 + eps) A_i) + beta (exp(ref - logp) - (ref - logp) - 1)
Per completion: the mean over its tokens; the loop averages over the step's completions (TRL's loss_type grpo).
One update per rollout batch (TRL's default num_iterations=1): logp_old is logp detached, so the ratio is 1 and
clipping is inert in value; the clipped form is kept so that its gradient and statistics are those of GRPO.

A completion whose reward raised or was not finite is a bad sample (data.bad_samples' budget, with its reason):
it gets no advantage and no loss, and its group is normalised over the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from vidtune.data.examples import IGNORE_INDEX
from vidtune.data.quality import BadSampleConfig, BadSampleLog
from vidtune.data.rollouts import TEXT_KEYS
from vidtune.train.objectives.base import Figures, label_logps
from vidtune.train.objectives.reference import AdapterOff
from vidtune.train.objectives.rewards import score
from vidtune.train.objectives.settings import GRPOSettings


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) rewards, consecutive groups of `group_size`, NaN = no reward -> (N,) advantages (0 where NaN)."""
    grouped = rewards.view(-1, group_size)
    valid = ~grouped.isnan()
    count = valid.sum(1, keepdim=True).clamp(min=1)
    filled = grouped.nan_to_num(0.0)
    mean = filled.sum(1, keepdim=True) / count
    variance = ((filled - mean) ** 2 * valid).sum(1, keepdim=True) / (count - 1).clamp(min=1)  # unbiased, as TRL
    advantages = (filled - mean) / (variance.sqrt() + 1e-4)
    return torch.where(valid, advantages, 0.0).view(-1)


def grpo_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    epsilon: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss, KL and whether clipping bound, all (N,) over the completion tokens (advantages per token)."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = torch.zeros_like(logps)
    if reference_logps is not None and beta:
        delta = reference_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    bound = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    return loss, kl.detach(), bound


def completion_mask(completions: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """(N, C) bool: the tokens up to and including the first stop token (generation pads after it)."""
    is_stop = torch.isin(completions, torch.tensor(stop_ids, device=completions.device))
    return (is_stop.long().cumsum(1) - is_stop.long()) == 0


class GRPOObjective:
    def __init__(
        self,
        settings: GRPOSettings,
        head: torch.nn.Module | None,
        autocast: Callable[[], AbstractContextManager[Any]],
        rollout: Callable[[Any, dict[str, Any]], tuple[torch.Tensor, list[str]]],
        stop_ids: list[int],
        token_keys: tuple[str, ...],
        bad_samples: BadSampleConfig,
        reference: Any = None,
    ):
        self.stop_ids = stop_ids
        self.settings, self.head, self.autocast, self.rollout = settings, head, autocast, rollout
        self.token_keys = token_keys  # per-token tensors (Qwen's mm_token_type_ids) that grow with the completion
        self.bad = BadSampleLog(bad_samples)
        self.tracked = Figures()
        self.weights = settings.reward_weights or [1.0] * len(settings.rewards)
        self.reference = reference or AdapterOff(head)  # the start: LoRA's adapter off, or a frozen copy (full)

    def units(self, batch: dict[str, Any]) -> torch.Tensor:
        return torch.full((), len(batch["input_ids"]))  # completions

    def __call__(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        texts = {key: batch.pop(key) for key in TEXT_KEYS}
        completions, decoded = self.rollout(model, batch)  # (N, C) token ids, their texts
        rows = [dict(zip(TEXT_KEYS, values, strict=True)) for values in zip(*texts.values(), strict=True)]
        rewards = self.rewards(decoded, rows, completions.device)
        advantages = group_advantages(rewards, self.settings.num_generations)
        full = self.with_completions(batch, completions)
        logps, row_of = label_logps(model, full, self.head, self.autocast)
        reference = None
        if self.settings.beta:
            with self.reference(model, full) as (start, head):
                reference, _ = label_logps(start, full, head, self.autocast)
        token_advantages = advantages[row_of]
        loss, kl, bound = grpo_token_loss(
            logps, logps.detach(), reference, token_advantages, self.settings.epsilon, self.settings.beta
        )
        counts = torch.zeros(len(completions), device=loss.device).index_add(0, row_of, torch.ones_like(loss))
        per_completion = torch.zeros_like(counts).index_add(0, row_of, loss) / counts.clamp(min=1)
        valid = ~rewards.isnan()
        self.tracked.add("train/reward", rewards[valid])
        self.tracked.add("train/reward_std", rewards.view(-1, self.settings.num_generations).nan_to_num(0).std(1))
        self.tracked.add("train/completion_tokens", counts)
        self.tracked.add("train/kl", kl)
        self.tracked.add("train/clip_fraction", bound.float())
        return (per_completion * valid).sum()

    def rewards(self, decoded: list[str], rows: list[dict[str, Any]], device: torch.device) -> torch.Tensor:
        """Weighted rewards (N,) on the device; failures counted against the bad-sample budget (one line each)."""
        s = self.settings
        totals, problems, per_reward = score(decoded, rows, s.rewards, self.weights)
        for problem in problems:
            self.bad.add(problem.split(": ", 1)[0], problem.split(": ", 1)[-1])
        for _ in range(len(decoded) - len(problems)):
            self.bad.good()
        self.bad.check("grpo rewards")
        for name, values in per_reward.items():
            finite = [v for v in values if not math.isnan(v)]  # every rank adds every name (figures reduce them)
            self.tracked.add(f"train/rewards/{name}", torch.tensor(finite, device=device, dtype=torch.float32))
        return torch.tensor(totals, device=device, dtype=torch.float32)

    def with_completions(self, batch: dict[str, Any], completions: torch.Tensor) -> dict[str, Any]:
        """Prompt (left-padded) + completion rows, labels on the completion tokens up to the stop token."""
        mask = completion_mask(completions, self.stop_ids)
        full = dict(batch)
        full["input_ids"] = torch.cat([batch["input_ids"], completions], 1)
        full["attention_mask"] = torch.cat([batch["attention_mask"], mask.to(batch["attention_mask"].dtype)], 1)
        prompt_labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)  # (the batch's own are all ignored)
        full["labels"] = torch.cat([prompt_labels, torch.where(mask, completions, IGNORE_INDEX)], 1)
        for key in self.token_keys:
            if key in batch:
                full[key] = torch.cat([batch[key], torch.zeros_like(completions, dtype=batch[key].dtype)], 1)
        return full

    def figures(self, accelerator: Any) -> dict[str, torch.Tensor]:
        return self.tracked.read(accelerator)
