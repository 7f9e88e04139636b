"""Processes and devices: the Accelerator for a recipe, DeepSpeed settings that must follow the recipe, what keeps
ZeRO-3 and FSDP ranks in lockstep, and gathering sharded trainable weights. (GPU configs on CPU: cpu_launch.py;
FSDP2 specifics: sharding.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType

from vidtune.data.families import BlankPath, ModelFamily
from vidtune.train.training.checkpoint import load_deepspeed_checkpoints_safely
from vidtune.train.training.config import Recipe, RecipeError
from vidtune.train.training.cpu_launch import use_cpu_process_group, use_fsdp_on_cpu
from vidtune.train.training.sequence_split import data_parallel_size, parallelism_config
from vidtune.train.training.sharding import gathered_state, is_fsdp, same_backward_order


def resolve_mixed_precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return name


def trains_vision_side(recipe: Recipe) -> bool:
    f = recipe.finetune
    return f.train_projector or f.vision_tower != "frozen" or f.audio_tower != "frozen"


def make_accelerator(recipe: Recipe) -> Accelerator:
    use_cpu_process_group()
    t = recipe.train
    accelerator = Accelerator(
        gradient_accumulation_steps=t.grad_accum_steps,
        mixed_precision=resolve_mixed_precision(t.mixed_precision),
        log_with=None if recipe.logging.report_to == "none" else recipe.logging.report_to,
        # Where the TensorBoard tracker writes its events (nothing else of Accelerate's reads it here).
        project_dir=str(Path(t.output_dir) / "tensorboard") if recipe.logging.report_to == "tensorboard" else None,
        # The scheduler is stepped once per optimizer step, over exactly the steps the run makes (Accelerate would
        # otherwise step it once per process).
        step_scheduler_with_optimizer=False,
        # DDP wants every trainable weight to get a gradient each step; a text-only micro-batch gives the vision
        # side none, so let DDP look for unused weights when any of it trains.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=trains_vision_side(recipe))],
        # Batches come from pinned memory on a GPU (build.loader_kwargs): copy them without stalling the host.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        # train.sequence_parallel > 1: DeepSpeed's Ulysses groups (sequence_split.py); None otherwise
        parallelism_config=parallelism_config(recipe),
    )
    use_fsdp_on_cpu(accelerator)  # an FSDP launch config on CPU processes (tests, laptops): see cpu_launch.py
    if t.sequence_parallel > 1 and not is_deepspeed(accelerator):
        raise RecipeError(
            "train.sequence_parallel > 1 runs on DeepSpeed's Ulysses: launch with "
            "launch/accelerate/zero2.yaml or zero3.yaml"
        )
    if is_deepspeed(accelerator):
        load_deepspeed_checkpoints_safely()
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # DeepSpeed clips inside its engine; Accelerate would fill "auto" with 1.0 whatever the recipe says.
        ds_config["gradient_clipping"] = t.max_grad_norm
        # Our DataLoaders take a batch sampler (seeded order, length grouping), so Accelerate cannot read their
        # batch size; DeepSpeed needs it for its bookkeeping.
        # Under sequence parallelism a packed micro-batch is one row (its samples packed), and Ulysses checks each
        # attention input against the micro-batch size it is registered with (in prepare, from this value).
        rows = 1 if t.sequence_parallel > 1 and t.packing else t.batch_size
        ds_config["train_micro_batch_size_per_gpu"] = rows
        data_parallel = data_parallel_size(recipe, accelerator.num_processes)
        ds_config["train_batch_size"] = rows * t.grad_accum_steps * data_parallel
        if zero_stage(accelerator) == 3:
            load_partitioned(accelerator)
    return accelerator


def load_partitioned(accelerator: Accelerator) -> None:
    """Under ZeRO-3, models load inside deepspeed.zero.Init: each rank allocates and keeps only its partition of
    every weight, so no rank ever holds the whole model (8 x 15 GB of host RAM for a 7B on 8 GPUs otherwise).

    transformers does this (from_pretrained, _from_config) while an HfDeepSpeedConfig of a stage-3 config is alive;
    Accelerate keeps one on its DeepSpeed plugin. Accelerate 1.x sets it whatever the launch config's
    zero3_init_flag says, older releases only when it is true (launch/accelerate/zero3*.yaml set it true): make
    sure of it here rather than load 8 full copies unnoticed."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    plugin = accelerator.state.deepspeed_plugin
    if not is_deepspeed_zero3_enabled():
        plugin.zero3_init_flag = True
        plugin.set_deepspeed_weakref()
    if not is_deepspeed_zero3_enabled():
        raise RuntimeError("ZeRO-3: transformers does not see the DeepSpeed config; weights would load unpartitioned")


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def weights_sharded(accelerator: Accelerator) -> bool:
    """Every weight split across ranks (ZeRO-3, FSDP): no rank may read a whole one (the language head) directly."""
    return zero_stage(accelerator) == 3 or is_fsdp(accelerator)


def save_state_kwargs(accelerator: Accelerator) -> dict[str, Any]:
    # DeepSpeed writes module states itself: keep frozen base weights out of every checkpoint.
    return {"exclude_frozen_parameters": True} if is_deepspeed(accelerator) else {}


class VisionLockstep:
    """Keeps every rank's vision calls in step, so ZeRO-3 and FSDP never hang or refuse their trace.

    ZeRO-3 all-gathers a module's weight shards whenever the module runs, and checks that every rank ran the very
    same sequence of submodules; FSDP2 all-gathers each shard unit (a vision block, a decoder layer) as it runs and
    reduce-scatters its gradients in backward, collectives every rank must enter together. A micro-batch runs each
    vision path of the model (LLaVA-NeXT-Video: image, then video) only if it holds that input, then the language
    model; ranks whose micro-batches differ (text-only on one, videos on another) would pair all-gathers wrongly
    and hang.

    Per micro-batch, ranks agree (one tiny all-reduce) on which paths any of them needs; a rank short of one runs
    the family's blank input through that path at the same point of the forward (hooks on the model), weighted 0 in
    the loss: same modules, same order, no effect on values or gradients. Single-process runs skip all of it, and so
    does DDP: it runs no collective inside the forward, and its find_unused_parameters covers a rank whose batch
    skips a path. (Blank paths would even break DDP: a weight reached only by a blank path is marked unused when the
    forward ends, then gets its 0 gradient in backward: "marked as ready twice".)
    """

    def __init__(self, accelerator: Accelerator, family: ModelFamily, processor: Any, model: Any):
        self.accelerator = accelerator
        self.enabled = accelerator.num_processes > 1 and (is_deepspeed(accelerator) or is_fsdp(accelerator))
        self.paths: list[BlankPath] = []
        self.pending: list[bool] = []
        self.term: torch.Tensor | float = 0.0
        if not self.enabled:
            return
        if is_fsdp(accelerator):  # (the backward half of the same problem: sharding.py)
            same_backward_order(accelerator.unwrap_model(model))
        self.paths = family.blank_paths(accelerator.unwrap_model(model), processor, accelerator.device)
        self.pending = [False] * len(self.paths)
        for index, path in enumerate(self.paths):
            if path.before:
                path.module.register_forward_pre_hook(lambda *_, i=index: self._run(i), prepend=True)
            else:
                path.module.register_forward_hook(lambda *_, i=index: self._run(i))
        for index, path in enumerate(self.paths):  # after the primaries: a shared module runs these first
            if path.fallback is not None:
                path.fallback.register_forward_pre_hook(lambda *_, i=index: self._run(i), prepend=True)

    def prepare(self, batch: dict[str, torch.Tensor]) -> None:
        """Call before each forward (every rank): decide which blank paths this rank must run."""
        self.term = 0.0
        if not self.enabled:
            return
        local = torch.tensor([float(p.batch_key in batch) for p in self.paths], device=self.accelerator.device)
        needed = self.accelerator.reduce(local, "max")
        self.pending = (needed > local).tolist()

    def take_term(self) -> torch.Tensor | float:
        """0 x the blank paths' outputs, to add to the loss (keeps them in the backward graph, contributing 0)."""
        term, self.term = self.term, 0.0
        return term

    def _run(self, index: int) -> None:
        if self.pending[index]:
            self.pending[index] = False
            self.term = self.term + 0.0 * self.paths[index].run()


def trainable_state_dict(accelerator: Accelerator, model: Any) -> dict[str, torch.Tensor] | None:
    """The trainable weights (LoRA, modules_to_save) as full tensors on the main process, None elsewhere.

    Under ZeRO-3 every rank holds only a shard of each weight: saving without gathering writes empty tensors
    (the "adapter saved empty" bug). Gathering only the trainable weights keeps the frozen 7B off rank 0's RAM.
    Every rank must call this.
    """
    unwrapped = accelerator.unwrap_model(model)
    params = [(name, param) for name, param in unwrapped.named_parameters() if param.requires_grad]
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            state = {n: p.detach().cpu().clone() for n, p in params} if accelerator.is_main_process else None
        return state
    if is_fsdp(accelerator):  # each DTensor gathered in turn
        return gathered_state(accelerator, params)
    return {n: p.detach().cpu().clone() for n, p in params} if accelerator.is_main_process else None
