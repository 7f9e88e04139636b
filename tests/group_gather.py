"""A worker for tests/test_sequence_parallel.py's 4-process gloo gather (a module of its own: each spawned process
imports it, and only torch and sequence_split with it)."""

from __future__ import annotations

import torch


def gather_in_second_group(rank: int, init: str, out: str) -> None:
    """One of 4 gloo processes in groups {0, 1} and {2, 3}: gather_shares of rank-specific rows, then backward."""
    import torch.distributed as dist

    from vidtune.train.training.sequence_split import gather_shares

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=4)
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    rows = [2, 1]  # unequal shares: padded to the longest
    local = torch.full((rows[rank % 2], 3), float(rank + 1), requires_grad=True)
    gathered = gather_shares(local, rows, [True, True], rank % 2, groups[rank // 2])
    (gathered * torch.arange(1.0, 10.0).reshape(3, 3)).sum().backward()
    torch.save({"gathered": gathered.detach(), "grad": local.grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
