"""GPU launch configs on machines without CUDA (tests, laptops): the only place vidtune patches libraries' private
APIs to run, active only when CUDA is absent and a launcher set LOCAL_RANK.

Each patch first asserts that what it replaces still exists, so a library upgrade that moves it fails loudly here
instead of silently training each process alone.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType


class LibraryChanged(RuntimeError):
    """A private API this module patches is gone: the CPU stand-in needs updating for the installed version."""


def launched_without_gpus() -> bool:
    """A multi-process launch (DDP or DeepSpeed config) on a machine without CUDA: tests, laptops."""
    return not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1


def require(owner: Any, attribute: str, where: str) -> None:
    present = attribute in owner if isinstance(owner, dict) else hasattr(owner, attribute)
    if not present:
        raise LibraryChanged(f"{where} has no {attribute!r} any more; vidtune's CPU launch patch needs updating")


def use_cpu_process_group() -> None:
    """Make GPU launch configs form a real CPU process group when there is no CUDA.

    Trap: Accelerate (1.15) launched with a DDP or DeepSpeed config on a machine without CUDA finds no backend,
    and every process silently trains alone (world size 1, no sharding). Answering "gloo / multi-CPU" here gives
    real 2-rank DDP and ZeRO-2/3 (DeepSpeed's CPU accelerator, DS_ACCELERATOR=cpu). Never active with CUDA.
    """
    if not launched_without_gpus() or getattr(PartialState, "_prepare_backend", None) is _cpu_backend:
        return
    require(PartialState, "_prepare_backend", "accelerate.state.PartialState")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    PartialState._prepare_backend = _cpu_backend
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        skip_deepspeed_shm_build()


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (deepspeed_shm_comm) when its process group
    starts: ~50 s and a C++ toolchain on every fresh machine (each CI run). gloo performs the same reductions, so CPU
    runs leave it out; DeepSpeed keeps the probed op table in one dict for exactly this kind of edit."""
    import deepspeed.ops

    require(deepspeed.ops, "__compatible_ops__", "deepspeed.ops")
    require(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", "deepspeed.ops.__compatible_ops__")
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _cpu_backend(self: Any, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None) -> Any:
    return backend or "gloo", DistributedType.MULTI_CPU
