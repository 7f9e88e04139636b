"""Building a run's parts from its recipe: the model with its trainable set, the data loaders, the optimizer."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_scheduler

from vidtune.data.collator import Collator
from vidtune.data.dataset import (
    DropReport,
    EpochBatchSampler,
    ExampleMaker,
    Measurer,
    SFTDataset,
    StreamingSFTDataset,
    audio_rate_for,
    default_num_workers,
    prepare_eval_rows,
    prepare_rows,
)
from vidtune.data.examples import ExampleBuilder
from vidtune.data.families import ModelFamily, family_for
from vidtune.data.packing import pack_layout
from vidtune.train.objectives.reference import refuse_unsharded_copy
from vidtune.train.objectives.select import training_examples
from vidtune.train.training.config import Recipe, RecipeError
from vidtune.train.training.distributed import is_deepspeed, zero_stage
from vidtune.train.training.model import (
    apply_finetuning,
    check_audio_tower,
    check_audit,
    check_experts,
    check_lora_size,
    enable_gradient_checkpointing,
    held_parameters,
    load_model,
    load_model_config,
    load_processor,
    trainable_audit,
)
from vidtune.train.training.preemption import WorkerSignals
from vidtune.train.training.sequence_split import data_parallel_size, split_loader_parts
from vidtune.train.training.sharding import is_fsdp


def build_model(recipe: Recipe, accelerator: Accelerator) -> tuple[Any, ModelFamily, Any, dict[str, Any]]:
    refuse_quantized_engine(recipe, accelerator)
    refuse_unsharded_copy(recipe, accelerator)
    model_config = load_model_config(recipe.model.name_or_path, recipe.model.trust_remote_code)
    check_lora_size(recipe.finetune, model_config)
    check_audio_tower(recipe.finetune, model_config)
    check_experts(recipe.finetune, model_config)
    # Random weights (model.from_config) are drawn on the device; ZeRO-3's zero.Init places its partitions itself.
    model, family = load_model(recipe.model, init_device=None if is_deepspeed(accelerator) else accelerator.device)
    m = recipe.model
    if m.from_config:
        accelerator.print(f"model: {m.name_or_path} built from its config.json with random weights (model.from_config)")
    if zero_stage(accelerator) == 3:  # loaded inside deepspeed.zero.Init: each rank holds its partition only
        held, total = held_parameters(model)
        print(f"rank {accelerator.process_index}: parameters held on this rank after loading: {held:,} of {total:,}")
    processor = load_processor(m.name_or_path, family, m.trust_remote_code, m.frame_limits)
    # Seed right before the adapter's random init: loading draws from the RNG differently under DeepSpeed ZeRO-3
    # (and across library versions), and LoRA A must be the same whatever the launch.
    set_seed(recipe.train.seed)
    model = apply_finetuning(model, family, recipe.finetune, recipe.model.adapter)
    keep_trainable_weights_in_fp32(model, accelerator)
    # QLoRA recomputes activations in backward (peft's prepare_model_for_kbit_training does too; quantization.py)
    if recipe.model.gradient_checkpointing or recipe.model.quantization.bits:
        enable_gradient_checkpointing(model)
    audit = trainable_audit(model, family)
    check_audit(audit, recipe.finetune, from_adapter=bool(recipe.model.adapter))
    return model, family, processor, audit


def refuse_quantized_engine(recipe: Recipe, accelerator: Accelerator) -> None:
    """QLoRA runs one quantized copy per process (single GPU or DDP); DeepSpeed partitions and casts weights itself,
    which bitsandbytes' packed 4-bit tensors do not survive. Said before the model loads."""
    bits = recipe.model.quantization.bits
    if bits and is_deepspeed(accelerator):
        raise RecipeError(
            f"model.quantization.bits={bits} under DeepSpeed ZeRO-{zero_stage(accelerator)}: "
            "quantized weights are not sharded by ZeRO; launch with launch/accelerate/ddp.yaml or single_gpu.yaml"
        )
    if bits and is_fsdp(accelerator):  # (Accelerate would leave them out of fully_shard, unsharded on every rank)
        raise RecipeError(
            f"model.quantization.bits={bits} under FSDP: bitsandbytes' packed weights are not sharded; launch with "
            "launch/accelerate/ddp.yaml or single_gpu.yaml"
        )
    optimizer = recipe.train.optimizer
    if optimizer != "adamw" and (is_deepspeed(accelerator) or is_fsdp(accelerator)):
        engine = "DeepSpeed" if is_deepspeed(accelerator) else "FSDP"
        raise RecipeError(
            f"train.optimizer={optimizer} under {engine}: bitsandbytes' 8-bit states are not sharded by it (ZeRO "
            "and FSDP2 already divide AdamW's states by the process count); set train.optimizer=adamw or launch "
            "with launch/accelerate/ddp.yaml or single_gpu.yaml"
        )


def keep_trainable_weights_in_fp32(model: Any, accelerator: Accelerator) -> None:
    """Trainable weights (and so their Adam states) in fp32 when the model is loaded in bf16/fp16.

    Plain AdamW on bf16 weights loses updates: an lr-sized step is below bf16's resolution for most weights (12% /
    70% / 84% of them unchanged at lr 1e-4 / 2e-5 / 1e-5). Under autocast the fp32 trainable weights meet the bf16
    frozen ones without dtype errors; DeepSpeed keeps fp32 master weights itself. Without either, refuse.
    """
    low = [p for p in model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    if not low or is_deepspeed(accelerator):
        return
    if accelerator.mixed_precision == "no":
        raise RecipeError(
            f"{sum(p.numel() for p in low):,} trainable weights are {low[0].dtype} and train.mixed_precision is "
            "off: they would train without an fp32 copy and lose most updates. Set train.mixed_precision=bf16 "
            "(trainable weights then train in fp32 under autocast) or model.dtype=float32"
        )
    for param in low:
        param.data = param.data.float()


def shut_down_workers(*loaders: Any) -> None:
    """Stop the loaders' persistent worker processes now. Left alive, they outlive the run until the loader is
    collected; at interpreter exit multiprocessing then terminates them, and torch's SIGCHLD handler reports the
    kill as a "DataLoader worker ... killed by signal: Terminated" traceback after a run that succeeded.
    (Accelerate's wrappers hold the DataLoader, and its live iterator, as base_dataloader.)"""
    for loader in loaders:
        base = getattr(loader, "base_dataloader", loader)
        iterator = getattr(base, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            base._iterator = None


def refuse_unpackable_family(recipe: Recipe) -> None:
    """train.packing or train.sequence_parallel on a family that cannot do it: one line before the model loads (the
    config alone names the family)."""
    if not recipe.train.packing and recipe.train.sequence_parallel == 1:
        return
    family = family_for(load_model_config(recipe.model.name_or_path, recipe.model.trust_remote_code).model_type)
    if recipe.train.sequence_parallel > 1 and not family.splits_sequence:
        raise RecipeError(
            f"train.sequence_parallel: the {family.name} family does not split its sequence yet "
            "(LLaVA-NeXT-Video and Qwen2.5-VL do); set train.sequence_parallel=1"
        )
    if recipe.train.packing and not family.supports_packing:
        raise RecipeError(
            f"train.packing: the {family.name} family cannot pack: {family.packing_refusal}; set train.packing=false"
        )


def loader_kwargs(recipe: Recipe, collate: Collator, processes_per_node: int) -> dict[str, Any]:
    workers = recipe.data.num_workers
    if workers is None:
        workers = default_num_workers(processes_per_node)
    return {
        "collate_fn": collate,
        "num_workers": workers,
        "persistent_workers": workers > 0,
        # Batches ready ahead per worker: a slow sample (a long clip, a cold file) is absorbed by the queue instead
        # of stalling the step that needs it.
        "prefetch_factor": 4 if workers > 0 else None,
        "pin_memory": torch.cuda.is_available(),
        "worker_init_fn": WorkerSignals(),
        # Every new iterator draws a worker seed from its generator; without one of its own it draws from the
        # global RNG, so a resumed run (which creates its iterator after restoring RNG states) would get different
        # dropout masks than the uninterrupted run.
        "generator": torch.Generator().manual_seed(recipe.train.seed),
    }


def build_loaders(recipe: Recipe, processor: Any, family: ModelFamily, accelerator: Accelerator):
    """Train loader (map-style with a seeded batch sampler, or a per-rank stream), eval loader, sampler, drops."""
    data, train_cfg = recipe.data, recipe.train
    # Pixels leave the workers uint8 (1/4 of the bytes); the loop normalises them on the device.
    audio_rate = audio_rate_for(data, family, processor)  # videos heard with their sound (data.audio)
    builder = ExampleBuilder(processor, family, data.label_turns, raw_pixels=True, audio_rate=audio_rate)
    sft = recipe.train.objective == "sft"  # the SFT loss takes its label positions from the batch (loss.py)
    collate = Collator(processor.tokenizer.pad_token_id, padding_side="right", family=family, loss_positions=sft)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    kwargs = loader_kwargs(recipe, collate, local_world)
    if train_cfg.packing:  # training batches only: evaluation scores per padded sample
        pack = Collator(
            collate.pad_token_id,
            family=family,
            packing=True,
            # under sequence parallelism the group splits one sequence: one row whatever the attention
            pack_max_length=None
            if train_cfg.sequence_parallel > 1
            else pack_layout(recipe.model.attn_implementation, data.max_length),
            model_config=load_model_config(recipe.model.name_or_path, recipe.model.trust_remote_code),
            loss_positions=sft,
        )
        train_kwargs = loader_kwargs(recipe, pack, local_world)
    else:
        train_kwargs = kwargs
    # Rank 0 measures first (data/measure_cache.py: parallel processes, kept on disk); the others read its results.
    with accelerator.main_process_first():
        if data.streaming:
            train_rows, eval_rows, drops = None, prepare_eval_rows(data, builder, train_cfg.seed), DropReport()
        else:
            train_rows, eval_rows, drops = prepare_rows(data, builder, train_cfg.seed)
    maker, train_collate = training_examples(recipe, builder, data, train_kwargs["collate_fn"], train_rows)
    train_kwargs = {**train_kwargs, "collate_fn": train_collate}
    sampler = None
    if train_rows is None:
        stream = StreamingSFTDataset(
            data,
            Measurer(builder, data),
            maker,
            accelerator.process_index,
            accelerator.num_processes,
            train_cfg.seed,
            repeat=True,
            batch_size=train_cfg.batch_size,
        )
        train_loader = torch.utils.data.DataLoader(stream, batch_size=train_cfg.batch_size, **train_kwargs)
    else:
        train_set = SFTDataset(train_rows, maker)
        sampler = EpochBatchSampler(
            train_set.lengths, train_cfg.batch_size, train_cfg.seed, group_by_length=train_cfg.group_by_length
        )
        # train.sequence_parallel: a group's ranks read the same batches, counted once (sequence_split.py)
        batches, collate_once = split_loader_parts(
            recipe, accelerator.process_index, sampler, train_kwargs["collate_fn"]
        )
        train_kwargs = {**train_kwargs, "collate_fn": collate_once}
        train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, **train_kwargs)
    eval_loader = None
    if eval_rows is not None:
        eval_set = SFTDataset(eval_rows, ExampleMaker(builder, data, train_cfg.seed, train=False))
        eval_sampler = EpochBatchSampler(eval_set.lengths, train_cfg.batch_size, train_cfg.seed, shuffle=False)
        eval_loader = torch.utils.data.DataLoader(eval_set, batch_sampler=eval_sampler, **kwargs)
    return train_loader, eval_loader, sampler, drops


def build_optimizer(recipe: Recipe, model: Any, total_steps: int, fused: bool = False):
    """AdamW (fused: one kernel per step, and a non-finite step's update can be dropped on the device through its
    found_inf flag; DeepSpeed brings its own step) or bitsandbytes' 8-bit AdamW (`train.optimizer`; no found_inf:
    the loop skips a non-finite step on the host, so its states stay untouched), and the lr schedule."""
    t = recipe.train
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    optimizer: torch.optim.Optimizer
    if t.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, eps=t.adam_epsilon, fused=fused or None)
    else:
        optimizer = eight_bit_adamw(groups, t.learning_rate, t.adam_epsilon, paged=t.optimizer == "paged_adamw_8bit")
    name = "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=round(t.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    return optimizer, scheduler


def eight_bit_adamw(groups: list[dict[str, Any]], lr: float, eps: float, paged: bool) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit / PagedAdamW8bit with torch AdamW's betas and the recipe's eps. Weights under 4096 values
    (min_8bit_size) keep fp32 states, as bitsandbytes decides (memory_plan.py counts the same). Paging needs CUDA's
    unified memory: without CUDA the plain 8-bit AdamW runs, which is what bitsandbytes falls back to anyway (it
    would say so in a warning at every new state)."""
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if paged and torch.cuda.is_available() else bnb.optim.AdamW8bit
    return cls(groups, lr=lr, betas=(0.9, 0.999), eps=eps)


def steps_per_epoch(recipe: Recipe, sampler: EpochBatchSampler | None, accelerator: Accelerator) -> int:
    if sampler is None:
        raise ValueError("a streamed corpus has no known length: set train.max_steps")
    micro_per_epoch = math.ceil(len(sampler) / data_parallel_size(recipe, accelerator.num_processes))
    return max(1, math.ceil(micro_per_epoch / recipe.train.grad_accum_steps))
