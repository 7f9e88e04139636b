"""The objectives' recipe settings (`train.objective`, `train.dpo.*`, `train.grpo.*`), validated in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

OBJECTIVES = ("sft", "dpo", "grpo")
DPO_LOSSES = ("sigmoid", "ipo", "sigmoid_norm")
REWARDS = ("choice", "exact")


@dataclass
class DPOSettings:
    beta: float = 0.1  # strength of the pull back to the reference (the model with its adapter disabled)
    # sigmoid: DPO | ipo: IPO (per-token mean log-ratios, squared) | sigmoid_norm: DPO on per-token mean log-ratios
    loss_type: str = "sigmoid"
    # weight of the chosen answers' token-mean NLL added to the loss (RPO; TRL's rpo_alpha); 0 = plain DPO
    sft_weight: float = 0.0


@dataclass
class GRPOSettings:
    num_generations: int = 8  # completions sampled per prompt (the group whose rewards are normalised)
    max_new_tokens: int = 16  # longest completion
    temperature: float = 1.0  # sampling temperature of the rollouts
    # sample among the top_k most likely tokens only (0 = all, TRL's top_k): with a high temperature, explores the
    # few plausible answers without drawing junk from the whole vocabulary
    top_k: int = 0
    beta: float = 0.0  # weight of the KL to the reference (adapter disabled); 0 = none (Dr. GRPO)
    epsilon: float = 0.2  # ratio clipping: the update keeps ratio within [1 - epsilon, 1 + epsilon]
    # choice | exact | format | temporal_iou | module:function (completion, row) -> float; summed with reward_weights
    rewards: list[str] = field(default_factory=lambda: ["exact"])
    reward_weights: list[float] = field(default_factory=list)  # empty = 1 each
    # decode each prompt's clip once for its whole group (off: once per completion, as peers do; the benchmark
    # compares the two)
    decode_once: bool = True


def validate_objective(objective: str, dpo: DPOSettings, grpo: GRPOSettings) -> str | None:
    """A one-line problem with the objective's settings, or None."""
    if objective not in OBJECTIVES:
        return f"train.objective={objective!r} is not one of {', '.join(OBJECTIVES)}"
    if dpo.beta <= 0 or dpo.loss_type not in DPO_LOSSES or dpo.sft_weight < 0:
        return f"train.dpo needs beta > 0, sft_weight >= 0 and loss_type one of {', '.join(DPO_LOSSES)}"
    if grpo.num_generations < 2 or grpo.max_new_tokens < 1 or grpo.temperature <= 0 or grpo.top_k < 0:
        return "train.grpo needs num_generations >= 2 (a group), max_new_tokens >= 1, temperature > 0, top_k >= 0"
    if grpo.beta < 0 or grpo.epsilon <= 0:
        return "train.grpo needs beta >= 0 and epsilon > 0"
    if not grpo.rewards:
        return f"train.grpo.rewards is empty; built-in rewards: {', '.join(REWARDS)}, or module:function"
    if objective == "grpo":
        from vidtune.train.objectives.rewards import resolve

        for name in grpo.rewards:
            try:
                resolve(name)  # said now, before any model loads
            except ValueError as err:
                return f"train.grpo.rewards: {err}"
    if grpo.reward_weights and len(grpo.reward_weights) != len(grpo.rewards):
        return "train.grpo.reward_weights needs one weight per reward (or none)"
    return None
