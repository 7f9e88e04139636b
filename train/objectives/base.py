"""What every objective gives the loop, and the per-sequence log-probabilities the preference and reward
objectives share (computed like the SFT loss: no full-vocabulary logits outside ZeRO-3)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

import torch
from torch.utils.checkpoint import checkpoint

from vidtune.train.training.loss import CHUNK_TOKENS, HeadInputCapture, capped, logit_softcap, shifted_targets


class Objective(Protocol):
    def __call__(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        """The micro-batch's loss, summed over its units."""
        ...

    def units(self, batch: dict[str, Any]) -> torch.Tensor:
        """What the loss is averaged over, counted in this micro-batch (label tokens, pairs, completions)."""
        ...

    def figures(self, accelerator: Any) -> dict[str, torch.Tensor]:
        """The objective's own figures since the last call (device tensors, averaged over ranks), then reset."""
        ...


def chunked_token_logps(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """log p(target) per row of head(hidden) (N, H) -> (N,), one chunk of logits alive at a time (recomputed
    in backward)."""

    def chunk_logps(rows: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        logits = head(rows).float()
        return -torch.nn.functional.cross_entropy(logits, chunk_targets, reduction="none")

    parts = [
        checkpoint(
            chunk_logps,
            hidden[start : start + CHUNK_TOKENS],
            targets[start : start + CHUNK_TOKENS],
            use_reentrant=False,
        )
        for start in range(0, len(targets), CHUNK_TOKENS)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def label_logps(
    model: Any,
    batch: dict[str, Any],
    head: torch.nn.Module | None,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of every label token (N,), its row (N,)), row-major. `head`: the language head whose input is
    captured (no full logits); None under ZeRO-3, where the model's own logits are used."""
    keep, targets = shifted_targets(batch["labels"])
    rows = keep.nonzero()[:, 0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if head is None:
        logits = model(**inputs, use_cache=False).logits
        with autocast():
            return -torch.nn.functional.cross_entropy(logits[keep].float(), targets, reduction="none"), rows
    with HeadInputCapture(head) as capture:
        model(**inputs, logits_to_keep=keep, use_cache=False)
    if capture.hidden is None:
        raise RuntimeError("the model's forward never called its language head (get_output_embeddings())")
    hidden = capture.hidden
    if hidden.shape[:-1] == keep.shape:  # a forward without logits_to_keep (Qwen2.5-Omni's thinker), as in SFT's loss
        hidden = hidden[keep]
    with autocast():
        return chunked_token_logps(capped(head, logit_softcap(model)), hidden, targets), rows


def per_row(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Sum of `values` (N,) per row index (N,) -> (num_rows,)."""
    return torch.zeros(num_rows, device=values.device, dtype=values.dtype).index_add(0, rows, values)


@contextmanager
def adapter_disabled(model: Any) -> Iterator[None]:
    """The reference model: the same weights with the LoRA adapter off (PEFT), no second copy, no gradients."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine
    with torch.no_grad(), inner.disable_adapter():
        yield


class Figures:
    """Sums of an objective's per-step figures on the device, averaged and reset when read."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        values = values.detach().float()
        self.sums[name] = self.sums.get(name, 0) + values.sum()
        self.counts[name] = self.counts.get(name, 0) + torch.full((), values.numel(), device=values.device)

    def read(self, accelerator: Any) -> dict[str, torch.Tensor]:
        out = {}
        for name, total in self.sums.items():
            count = self.counts[name]
            if accelerator is not None and accelerator.num_processes > 1:
                total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
            out[name] = total / count.clamp(min=1)
        self.sums, self.counts = {}, {}
        return out
