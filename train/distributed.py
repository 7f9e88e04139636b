"""Everything about processes and devices in one place: the Accelerator for a recipe, DeepSpeed settings that
must follow the recipe, the CPU stand-in for GPU launches, and what keeps ZeRO-3 ranks in lockstep."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

from vidtune.train.config import Recipe


def resolve_mixed_precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return name


def launched_without_gpus() -> bool:
    """A multi-process launch (DDP or DeepSpeed config) on a machine without CUDA: tests, laptops."""
    return not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1


def use_cpu_process_group() -> None:
    """Make GPU launch configs form a real CPU process group when there is no CUDA.

    Trap: Accelerate (1.15) launched with a DDP or DeepSpeed config on a machine without CUDA finds no backend,
    and every process silently trains alone (world size 1, no sharding). Answering "gloo / multi-CPU" here gives
    real 2-rank DDP and ZeRO-2/3 (DeepSpeed's CPU accelerator, DS_ACCELERATOR=cpu). Never active with CUDA.
    """
    if not launched_without_gpus() or PartialState._prepare_backend is _cpu_backend:
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    PartialState._prepare_backend = _cpu_backend
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        skip_deepspeed_shm_build()


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (deepspeed_shm_comm) when its process group
    starts: ~50 s and a C++ toolchain on every fresh machine (each CI run). gloo performs the same reductions, so CPU
    runs leave it out; DeepSpeed keeps the probed op table in one dict for exactly this kind of edit."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _cpu_backend(self: Any, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None) -> Any:
    return backend or "gloo", DistributedType.MULTI_CPU


def trains_vision_side(recipe: Recipe) -> bool:
    return recipe.finetune.train_projector or recipe.finetune.vision_tower != "frozen"


def make_accelerator(recipe: Recipe) -> Accelerator:
    use_cpu_process_group()
    t = recipe.train
    accelerator = Accelerator(
        gradient_accumulation_steps=t.grad_accum_steps,
        mixed_precision=resolve_mixed_precision(t.mixed_precision),
        log_with="wandb" if recipe.logging.report_to == "wandb" else None,
        # The scheduler is stepped once per optimizer step, over exactly the steps the run makes (Accelerate would
        # otherwise step it once per process).
        step_scheduler_with_optimizer=False,
        # DDP wants every trainable weight to get a gradient each step; a text-only micro-batch gives the vision
        # side none, so let DDP look for unused weights when any of it trains.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=trains_vision_side(recipe))],
    )
    if is_deepspeed(accelerator):
        load_deepspeed_checkpoints_safely()
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # DeepSpeed clips inside its engine; Accelerate would fill "auto" with 1.0 whatever the recipe says.
        ds_config["gradient_clipping"] = t.max_grad_norm
        # Our DataLoaders take a batch sampler (seeded order, length grouping), so Accelerate cannot read their
        # batch size; DeepSpeed needs it for its bookkeeping.
        ds_config["train_micro_batch_size_per_gpu"] = t.batch_size
        ds_config["train_batch_size"] = t.batch_size * t.grad_accum_steps * accelerator.num_processes
    return accelerator


def load_deepspeed_checkpoints_safely() -> None:
    """DeepSpeed unpickles its checkpoint files with weights_only=False: a crafted file would run code on resume.

    Its files hold tensors, dicts and three small DeepSpeed types (loss scaler, ZeRO stage, fragment offsets);
    loading them with weights_only=True and those types allowlisted keeps resuming working and refuses the rest.
    """
    from accelerate.utils.other import TORCH_SAFE_GLOBALS
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, ZeroStageEnum, fragment_address, *TORCH_SAFE_GLOBALS]
    engine = torch_checkpoint_engine.TorchCheckpointEngine
    if getattr(engine.load, "vidtune_safe", False):
        return

    def load(self: Any, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    load.vidtune_safe = True  # type: ignore[attr-defined]
    engine.load = load


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def save_state_kwargs(accelerator: Accelerator) -> dict[str, Any]:
    # DeepSpeed writes module states itself: keep frozen base weights out of every checkpoint.
    return {"exclude_frozen_parameters": True} if is_deepspeed(accelerator) else {}


class VisionLockstep:
    """Keeps every rank's vision calls in step, so ZeRO-3 never hangs or refuses its trace.

    ZeRO-3 all-gathers a module's weight shards whenever the module runs, and checks that every rank ran the very
    same sequence of submodules. A micro-batch runs the image path (vision tower -> projector) if it holds images,
    then the video path (vision tower -> pooling -> projector) if it holds videos, then the language model; ranks
    whose micro-batches differ (text-only on one, videos on another) would pair all-gathers wrongly and hang.

    Per micro-batch, ranks agree (one tiny all-reduce) on which paths any of them needs; a rank short of one runs
    a blank image or frame through that path at the same point of the forward (hooks on the model), weighted 0 in
    the loss: same modules, same order, no effect on values or gradients. Single-process runs skip all of it.
    """

    def __init__(self, accelerator: Accelerator, processor: Any, model: Any):
        self.accelerator = accelerator
        self.enabled = accelerator.num_processes > 1
        self.pending = {"image": False, "video": False}
        self.term: torch.Tensor | float = 0.0
        if not self.enabled:
            return
        px = processor.video_processor.crop_size["height"]
        blank = np.zeros((px, px, 3), dtype=np.uint8)
        image = processor.image_processor(images=[blank], return_tensors="pt")
        self.blank_image = (image["pixel_values"][0], image["image_sizes"])  # (patches, C, H, W), (1, 2)
        self.blank_video = processor.video_processor(videos=[blank[None]], return_tensors="pt")["pixel_values_videos"]
        self.core = _llava_core(accelerator.unwrap_model(model))
        # The model's forward embeds the tokens, runs the image path, the video path, then the language model.
        # Blank image path: right after the embedding lookup, where the real one starts ...
        self.core.get_input_embeddings().register_forward_hook(self._image_path)
        # ... blank video path: before the language model, ahead of DeepSpeed's hook so the trace records it first.
        self.core.language_model.register_forward_pre_hook(self._video_path, prepend=True)

    def prepare(self, batch: dict[str, torch.Tensor]) -> None:
        """Call before each forward (every rank): decide which blank paths this rank must run."""
        self.term = 0.0
        if not self.enabled:
            return
        local = torch.tensor(
            [float("pixel_values" in batch), float("pixel_values_videos" in batch)], device=self.accelerator.device
        )
        needed = self.accelerator.reduce(local, "max")
        self.pending = {"image": bool(needed[0] > local[0]), "video": bool(needed[1] > local[1])}

    def take_term(self) -> torch.Tensor | float:
        """0 x the blank paths' outputs, to add to the loss (keeps them in the backward graph, contributing 0)."""
        term, self.term = self.term, 0.0
        return term

    def _device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.accelerator.device, dtype=self.core.vision_tower.dtype)

    def _image_path(self, module: Any, args: Any, output: Any) -> None:
        if self.pending["image"]:
            self.pending["image"] = False
            pixels, sizes = self.blank_image
            features = self.core.get_image_features(self._device(pixels), sizes.to(self.accelerator.device))
            self.term = self.term + 0.0 * sum(f.sum() for f in features.pooler_output)

    def _video_path(self, module: Any, args: Any) -> None:
        if self.pending["video"]:
            self.pending["video"] = False
            features = self.core.get_video_features(self._device(self.blank_video))
            self.term = self.term + 0.0 * features.pooler_output.sum()


def _llava_core(model: Any) -> Any:
    """The LlavaNextVideoModel inside a (PEFT-wrapped) ...ForConditionalGeneration."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


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
    return {n: p.detach().cpu().clone() for n, p in params} if accelerator.is_main_process else None
