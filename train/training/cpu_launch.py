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


def launched_with_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def use_fsdp_on_cpu(accelerator: Any) -> None:
    """Give a CPU process group (gloo) the FSDP engine its launch config asked for.

    Trap: Accelerate (1.16) turns its FSDP plugin on only for GPU-like distributed types (MULTI_GPU, MULTI_XPU, ...):
    on MULTI_CPU it drops the plugin, and `prepare` silently wraps the model in DDP (every rank holds the whole
    model). FSDP2's `fully_shard` itself runs on gloo, so here the shared state gets what AcceleratorState would have
    set on a GPU machine: distributed type FSDP and the plugin built from the same launch config (FSDP_* variables).
    From then on Accelerate's own FSDP2 code runs unchanged (prepare -> fsdp2_prepare_model -> fully_shard,
    save_state/load_state -> torch.distributed.checkpoint). Never active with CUDA."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin

    if (
        not (launched_without_gpus() and launched_with_fsdp())
        or accelerator.distributed_type != DistributedType.MULTI_CPU
    ):
        return
    require(AcceleratorState._shared_state, "distributed_type", "accelerate.state.AcceleratorState")
    require(PartialState._shared_state, "distributed_type", "accelerate.state.PartialState")
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
