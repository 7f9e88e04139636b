"""FSDP2 (torch's `fully_shard`, through Accelerate's FSDP plugin): what the rest of the run needs to know of it.

Accelerate does the sharding itself (launch/accelerate/fsdp2.yaml: one `fully_shard` unit per decoder layer and per
vision block, from the model's `_no_split_modules`; rank-0 loading; sharded checkpoints through
torch.distributed.checkpoint). After `prepare`, every weight is a DTensor holding this rank's shard: reading whole
values (the trainable weights for the final adapter, a gradient norm for the logs) goes through DTensor's own
collectives here, which every rank must call in the same order. (GPU configs on CPU: cpu_launch.py.)
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import DistributedType


def is_fsdp(accelerator: Any) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def local(tensor: Any) -> Any:
    """This rank's part of a DTensor (a plain tensor as it is): for checks that each rank makes on its own shard."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor: Any) -> Any:
    """The full value of a DTensor on every rank (an all-gather, or the reduction of a partial sum); every rank
    calls it. A plain tensor (or float) as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gathered_state(accelerator: Any, named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """Full CPU copies of sharded weights on the main process (None elsewhere), one weight at a time, so no rank
    holds more than one whole weight beyond its shards. Every rank calls it."""
    state = {}
    for name, param in named:
        full = whole(param.detach())
        if accelerator.is_main_process:
            state[name] = full.cpu().clone()
        del full
    return state if accelerator.is_main_process else None


def same_backward_order(model: Any) -> None:
    """Make every rank reduce-scatter its shard units' gradients in the same order.

    FSDP2 reduce-scatters a unit's gradients when autograd reaches the unit's inputs; a unit whose inputs need no
    gradient is left to a callback at the end of backward, which takes the units in another order. Under LoRA the
    first decoder layer's input needs a gradient only when a micro-batch holds visual tokens (the trained
    projector's output is scattered into the frozen embeddings), so a text-only micro-batch beside a visual one
    paired different units' reduce-scatters (gloo: "Received data size doesn't match expected size"). The input
    embeddings' output requiring a gradient on every rank (transformers' enable_input_require_grads) keeps one
    order; it adds one unused embedding-sized gradient and changes no value."""
    model.enable_input_require_grads()
