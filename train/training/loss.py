"""The training loss without full-vocabulary logits: summed token cross-entropy from the final hidden states.

A model's own loss materialises logits for every position (5,120 x 32,064 per 7B sample at 32 frames), upcasts
them to fp32, keeps the log-softmax for backward, and Accelerate's mixed-precision wrapper copies them to fp32 once
more. Here the language head's input is taken by a pre-hook (which hands the head an empty slice instead), the
label positions are picked from it, and the cross-entropy runs over them in chunks, each under activation
checkpointing: at most one chunk's logits live at a time, in forward and in backward. Value and gradients are the
model's own (summed over label tokens).

The label positions and their targets come with the batch, computed on the host by the collator (data/collator.py
`label_positions`): picking them on the device with a boolean mask (`next_labels[keep]`, or a boolean
`logits_to_keep`) needs their count on the host, a device-to-host copy that stalls every micro-batch.

With Liger installed and the model on a GPU, its fused linear cross-entropy does the same in one Triton kernel.
Under ZeRO-3 the head's weight is a partition outside its module's forward, so the model's own loss is used there.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from vidtune.data.collator import LABEL_POSITIONS, LABEL_TARGETS

IGNORE_INDEX = -100
LossFunction = Callable[[Any, dict[str, Any]], torch.Tensor]  # (model, micro-batch) -> summed token loss
CHUNK_TOKENS = 1024  # label positions per chunk: 1,024 x 32,064 fp32 logits = 131 MB


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) labels -> the positions whose next token is a label (B, T) bool, and those labels (N,), row-major:
    position t predicts label t + 1, the shift transformers' causal-LM loss makes."""
    next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = next_labels != IGNORE_INDEX
    return keep, next_labels[keep]


NOT_MODEL_INPUTS = ("labels", LABEL_POSITIONS, LABEL_TARGETS)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch less the labels and the loss's own keys."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def chunked_cross_entropy(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """Summed cross-entropy of head(hidden) (N, H) -> (N, V) against targets (N,), one chunk of rows at a time;
    backward recomputes each chunk's logits instead of keeping them."""

    def chunk_loss(rows: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        logits = head(rows).float()  # fp32 softmax, as transformers' loss does
        return torch.nn.functional.cross_entropy(logits, chunk_targets, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_tokens):
        rows, chunk_targets = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        total = total + checkpoint(chunk_loss, rows, chunk_targets, use_reentrant=False)
    return total


def logit_softcap(model: Any) -> float | None:
    """The model's final-logit soft cap (Gemma 4: logits = cap x tanh(logits / cap) after the head), None without."""
    config: Any = getattr(getattr(model, "module", model), "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "final_logit_softcapping", None)


def capped(head: Callable[[torch.Tensor], torch.Tensor], cap: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The head's logits as the model's forward makes them (soft-capped in fp32 when the model caps them): every
    loss computed from hidden states goes through this, or it scores other logits than the model's own."""
    if cap is None:
        return head
    return lambda rows: torch.tanh(head(rows).float() / cap) * cap


def liger_cross_entropy() -> Callable[..., torch.Tensor] | None:
    """Liger's fused linear cross-entropy (summed), or None when it is not installed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum", ignore_index=IGNORE_INDEX)


class HeadInputCapture:
    """A forward pre-hook on the language head: keeps the head's input and hands the head an empty slice of it,
    so the model's forward computes no logits at all."""

    def __init__(self, head: torch.nn.Module):
        self.head = head
        self.hidden: torch.Tensor | None = None

    def __enter__(self) -> HeadInputCapture:
        self.handle = self.head.register_forward_pre_hook(self.capture)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()

    def capture(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        self.hidden = args[0]
        return (args[0][:0], *args[1:])


class ChunkedLoss:
    """The summed token loss of a micro-batch, computed from hidden states (see the module docstring)."""

    def __init__(
        self,
        head: torch.nn.Module,
        autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
        chunk_tokens: int = CHUNK_TOKENS,
    ):
        self.head = head
        self.autocast = autocast  # the mixed-precision context the model's own forward runs in
        self.chunk_tokens = chunk_tokens
        self.liger = liger_cross_entropy() if isinstance(head, torch.nn.Linear) and head.bias is None else None

    def label_hidden(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The language head's input at the label positions (N, H), their targets (N,) and each one's row (N,).
        Without the collator's positions, a boolean mask picks them (a device-to-host copy on an accelerator)."""
        if LABEL_POSITIONS in batch:
            positions, targets = batch[LABEL_POSITIONS], batch[LABEL_TARGETS]
            keep: int | torch.Tensor = 0  # every position reaches the hook (which hands the head none of them)
        else:
            keep, targets = shifted_targets(batch["labels"])
            positions = keep.flatten().nonzero().flatten()
        with HeadInputCapture(self.head) as capture:
            model(**model_inputs(batch), logits_to_keep=keep, use_cache=False)
        if capture.hidden is None:
            raise RuntimeError("the model's forward never called its language head (get_output_embeddings())")
        hidden = capture.hidden
        if isinstance(keep, torch.Tensor) and hidden.shape[:-1] == keep.shape:  # a forward without logits_to_keep
            hidden = hidden[keep]  # (Qwen2.5-Omni's thinker): the head saw every position
        if LABEL_POSITIONS in batch:
            hidden = hidden.flatten(0, -2).index_select(0, positions)
        return hidden, targets, torch.div(positions, batch["labels"].shape[1], rounding_mode="floor")

    @torch.no_grad()
    def per_row(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: the summed token loss and the label count of each row (B,), one chunk of logits at a time."""
        hidden, targets, rows = self.label_hidden(model, batch)
        logits = capped(self.head, logit_softcap(model))
        with self.autocast():
            losses = [
                torch.nn.functional.cross_entropy(
                    logits(hidden[s : s + self.chunk_tokens]).float(),
                    targets[s : s + self.chunk_tokens],
                    reduction="none",
                )
                for s in range(0, len(targets), self.chunk_tokens)
            ]
        per_token = torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)
        labels = batch["labels"]
        summed = torch.zeros(len(labels), device=per_token.device).index_add_(0, rows, per_token)
        return summed, (labels[:, 1:] != IGNORE_INDEX).sum(1)

    def __call__(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        hidden, targets, _ = self.label_hidden(model, batch)
        cap = logit_softcap(model)
        with self.autocast():
            if self.liger is not None and hidden.is_cuda and cap is None:
                return self.liger(self.head.weight, hidden, targets).float()
            return chunked_cross_entropy(capped(self.head, cap), hidden, targets, self.chunk_tokens)


def model_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The model's own summed token loss (full logits): the reference, and the path under ZeRO-3."""
    inputs = {**model_inputs(batch), "labels": batch["labels"]}
    return model(**inputs, num_items_in_batch=1, use_cache=False).loss  # a cache hides packing from the masks


def training_loss(model: Any, autocast: Callable[[], AbstractContextManager[Any]], zero3: bool) -> LossFunction:
    """The loss the loop uses: chunked (or Liger's) from hidden states, the model's own under ZeRO-3."""
    return model_loss if zero3 else ChunkedLoss(language_head(model), autocast)


def language_head(model: Any) -> torch.nn.Module:
    """The output projection of a (PEFT-wrapped, Accelerate-prepared) model."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine
    return inner.get_output_embeddings()
