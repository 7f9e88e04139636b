"""The memory plan of `vidtune train RECIPE --dry-run`: per-GPU bytes of weights, gradients, optimizer states and
activations, by arithmetic over the model (built on the meta device, LoRA applied), the recipe and the launch
(processes, ZeRO stage or FSDP2). No weights are read and nothing is allocated.

- weights: every parameter at its dtype; trainable ones in fp32 (build.keep_trainable_weights_in_fp32; under
  DeepSpeed the dtype they were built in: fp32 LoRA, model.dtype in full fine-tuning); QLoRA's 4-bit layers as
  bitsandbytes stores them (two values per byte, one absmax per 64-value block: a byte with double quantization,
  whose second-level fp32 absmax per 256 blocks is counted too; the 16- and 256-entry codebooks are not), 8-bit
  ones as one byte per value plus an fp32 scale per output row. ZeRO-3 and FSDP2 divide them by the process count
  (FSDP2 pads each weight's first dimension to a multiple of it: a few rows more on the first ranks; ZeRO-3 pads
  each weight to a multiple of it and keeps every weight of <= 100k values whole on each rank once it has run).
- gradients: one fp32 value per trainable weight (divided by the process count under ZeRO-2, ZeRO-3 and FSDP2;
  ZeRO-3 keeps them in bf16 under bf16 mixed precision).
- optimizer states: AdamW's two fp32 moments per trainable weight (+ DeepSpeed's fp32 master weights, fp32 weights
  included), divided by the process count under any ZeRO stage and FSDP2 (whose trainable weights are themselves
  the fp32 masters). ZeRO-3's parts were checked against the tensors DeepSpeed holds (zero3_parameter_bytes).
  `train.optimizer: adamw_8bit | paged_adamw_8bit` (bitsandbytes): two uint8 moments per value, an fp32 absmax per
  256-value block of each, and two 256-entry fp32 codebooks per weight; weights under 4096 values keep fp32 moments.
- activations: what autograd keeps for backward for the longest sample the data allows (`batch_size` x
  `max_length` tokens, visual tokens included): per decoder layer and token, the RMSNorms' fp32 inputs and scales,
  the inputs each trainable linear saves (LoRA: its input and its rank-r A output; full: the linears' inputs and the
  norms' outputs), attention's q, k, v, output and log-sum-exp, the MLP's gate, up, activation and product, and
  LoRA dropout's outputs and masks. With gradient checkpointing only each layer's input is kept, and backward
  recomputes one layer at a time (`recompute`). The chunked loss keeps the label positions' hidden states; the
  model's own loss (ZeRO-3, FSDP2: the head is sharded) keeps fp32 logits and their log-softmax. The vision tower
  keeps activations only when it or the projector trains (the same per-layer arithmetic over its patches). The
  formula follows transformers' Llama-style decoder layers (LLaVA, OneVision, Qwen2.5-VL, Qwen3-VL); Qwen3.5's
  Gated DeltaNet layers keep more than it counts (about 2.5x on the tiny model).
- audio (families that hear; its own row): what the audio tower keeps for backward when it or its projection trains
  and the run hears sound, for a longest sample that is sound alone (`batch_size` x `max_length` audio tokens), by
  each family's arithmetic over its audio config (`ModelFamily.audio_activations`: the subsampling convolutions
  under finetune.audio_tower=full, the encoder layers, what follows them, LoRA's own tensors; Qwen's layers keep
  only their inputs under gradient checkpointing, Gemma 4's are not checkpointed; under checkpointing transformers
  makes Qwen's first audio convolution's output require grad, so even a frozen Qwen tower keeps its activations
  from there on). Per audio token, measured on
  the tiny models: Qwen2.5-Omni ~10 KB, Gemma 4 ~210 KB (its first subsampling convolution's output, kept three
  times), Qwen3-Omni ~31 KB. Sources all `audio: off` plan none: the plan reads no rows, so sound files named in
  rows of such a run are not counted. The tower's weights are among the weights above.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

GB = 1024**3
PARTS = ("weights", "gradients", "optimizer", "activations")


@dataclass
class MemoryPlan:
    """Bytes per GPU, by part; `recompute` is the extra one layer needs in backward under gradient checkpointing."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    recompute: int
    processes: int
    zero_stage: int
    fsdp: bool = False
    audio: int = 0  # the audio tower's activations (families that hear)
    hears: bool = False  # the model has an audio tower: the table shows its row

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.audio + self.recompute

    def table(self) -> str:
        sharding = "FSDP2" if self.fsdp else f"ZeRO-{self.zero_stage}" if self.zero_stage else "no sharding"
        lines = [f"memory (per GPU, GB; {self.processes} process(es), {sharding}; estimate, excl. CUDA context)"]
        for part in PARTS:
            lines.append(f"  {part:<14}{getattr(self, part) / GB:>10.4g}")
        if self.hears:
            lines.append(f"  {'audio':<14}{self.audio / GB:>10.4g}  (the audio tower's activations)")
        if self.recompute:
            lines.append(f"  {'recompute':<14}{self.recompute / GB:>10.4g}  (one layer, in backward)")
        lines.append(f"  {'total':<14}{self.total / GB:>10.4g}")
        return "\n".join(lines)


def element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def quantized_bytes(numel: int, out_features: int, bits: int, double_quant: bool) -> int:
    """Bytes bitsandbytes stores for one quantized weight of `numel` values (see the module docstring)."""
    if bits == 8:
        return numel + 4 * out_features
    blocks = math.ceil(numel / 64)
    if double_quant:
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256)
    return math.ceil(numel / 2) + 4 * blocks


def quantized_weight_names(model: Any, language_model_prefix: str, skip_modules: tuple[str, ...]) -> dict[str, int]:
    """{parameter name: out_features} of the weights QLoRA quantizes: the language model's linear layers that the
    family does not skip, matched as transformers matches `llm_int8_skip_modules`."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    found = {}
    for name, module in model.named_modules():
        bare = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        if "lora_" in name or not bare.startswith(language_model_prefix):
            continue
        if isinstance(module, torch.nn.Linear) and should_convert_module(bare, list(skip_modules)):
            found[f"{name}.weight"] = module.out_features
    return found


EIGHT_BIT_MIN_SIZE, EIGHT_BIT_BLOCK, CODEBOOK = 4096, 256, 256  # bitsandbytes' 8-bit optimizers


def adam_state_bytes(numel: int, eight_bit: bool) -> int:
    """Bytes of Adam's two moments for one weight of `numel` values (see the module docstring)."""
    if not eight_bit or numel < EIGHT_BIT_MIN_SIZE:
        return numel * 8
    return 2 * (numel + math.ceil(numel / EIGHT_BIT_BLOCK) * 4 + CODEBOOK * 4)


# DeepSpeed's stage3_param_persistence_threshold default (launch/accelerate/zero3*.yaml keep it): under ZeRO-3 a
# weight of at most this many values stays gathered whole on every rank once it has run, beside its partition.
ZERO3_PERSISTENCE_THRESHOLD = 100_000


def parameter_bytes(
    model: Any, family: Any, recipe: Any, deepspeed: bool, processes: int, zero_stage: int, mixed_precision: str = "no"
) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) bytes per GPU. Under DeepSpeed trainable weights keep the dtype they
    were built in: the model's for full fine-tuning, fp32 for LoRA (peft upcasts adapters of bf16 models)."""
    from vidtune.train.training.model import resolve_dtype

    q = recipe.model.quantization
    dtype_bytes = element_bytes(resolve_dtype(recipe.model.dtype))
    quantized = (
        quantized_weight_names(model, family.language_model_prefix, family.quantization_skip_modules) if q.bits else {}
    )
    shard = max(1, processes)
    if deepspeed and zero_stage == 3:
        return zero3_parameter_bytes(model, shard, dtype_bytes, 2 if mixed_precision in ("bf16", "fp16") else 4)
    weights = trainable = 0
    for name, param in model.named_parameters():
        numel = param.numel()
        if param.requires_grad:
            trainable += numel
            weights += numel * (element_bytes(param.dtype) if deepspeed else 4)
        elif name in quantized:
            weights += quantized_bytes(numel, quantized[name], q.bits, q.double_quant)
        else:
            weights += numel * dtype_bytes
    # DeepSpeed's ZeRO-1/2 optimizer always clones its partition into fp32 masters (stage_1_and_2.py), fp32 or not
    master = trainable * 4 if deepspeed else 0
    eight_bit = recipe.train.optimizer != "adamw"
    states = sum(adam_state_bytes(p.numel(), eight_bit) for p in model.parameters() if p.requires_grad)
    gradients, optimizer = trainable * 4, states + master
    return (
        weights // (shard if zero_stage == 3 else 1),
        gradients // (shard if zero_stage >= 2 else 1),
        optimizer // (shard if zero_stage >= 1 else 1),
    )


def zero3_parameter_bytes(model: Any, processes: int, dtype_bytes: int, grad_bytes: int) -> tuple[int, int, int]:
    """DeepSpeed ZeRO-3 (deepspeed/runtime/zero/stage3.py, partition_parameters.py), per rank, as measured on a
    2-process CPU launch (benchmarks/training_memory.py): each weight padded to a multiple of the processes and
    split (`ds_tensor`), plus the whole of every weight under the persistence threshold (kept gathered after use);
    the gradient partitions in DeepSpeed's gradient accumulation dtype (bf16 under bf16 mixed precision); an fp32
    master partition of the trainable weights even when they are fp32 (its reuse of fp32 weights compares a
    torch.device with a string and never matches) and AdamW's two fp32 moments on it."""
    weights = gradients = optimizer = 0
    for param in model.parameters():
        numel = param.numel()
        part = -(-numel // processes)
        element = element_bytes(param.dtype) if param.requires_grad else dtype_bytes
        weights += (part + (numel if numel <= ZERO3_PERSISTENCE_THRESHOLD else 0)) * element
        if param.requires_grad:
            gradients += part * grad_bytes
            optimizer += part * (4 + adam_state_bytes(1, eight_bit=False))
    return weights, gradients, optimizer


def config_value(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` the config sets. A value that differs between layers (transformers' per-layer configs:
    Gemma 4's global layers have wider heads) is its largest, the layer that keeps the most for backward."""
    for name in names:
        try:
            value = getattr(config, name, None)
        except RuntimeError:  # AmbiguousGlobalPerLayerAttributeError: read it per layer
            layers = config.per_layer_config
            value = max(getattr(layers[i], name) for i in range(config.num_hidden_layers))
        if value is not None:
            return value
    return default


def layer_elements(config: Any, lora_per_layer: tuple[int, int], full: bool, act_bytes: int) -> tuple[int, int]:
    """(bytes in model precision, bytes in fp32) one decoder layer keeps per token for backward (module docstring);
    `lora_per_layer`: (sum of LoRA ranks, dropout elements) of one layer's LoRA-wrapped linears."""
    hidden = config_value(config, "hidden_size", "embed_dim")
    intermediate = config_value(config, "intermediate_size", default=4 * hidden)
    heads = config_value(config, "num_attention_heads", "num_heads")
    head_dim = config_value(config, "head_dim", default=hidden // heads)
    kv = config_value(config, "num_key_value_heads", default=heads) * head_dim
    ranks, dropout = lora_per_layer
    norms_fp32 = 2 * (hidden + 1)  # each RMSNorm's fp32 input and its 1/rms
    attention = 2 * heads * head_dim + 2 * kv + heads * head_dim  # q, out, k, v, o_proj's input
    model_precision = 2 * hidden + attention + 4 * intermediate + ranks + (2 * hidden if full else 0)
    # LoRA dropout keeps its output and a one-byte mask per element; attention its fp32 log-sum-exp per head
    return model_precision * act_bytes + dropout * (act_bytes + 1), norms_fp32 * 4 + heads * 4


def lora_shape(model: Any, prefix: str, num_layers: int, dropout: float) -> tuple[int, int]:
    """(sum of ranks, sum of dropout elements) per layer of the LoRA-wrapped linears under `prefix`."""
    ranks = inputs = 0
    for name, module in model.named_modules():
        if name.removeprefix("base_model.model.").startswith(prefix) and name.endswith("lora_A.default"):
            ranks += module.out_features
            inputs += module.in_features
    return ranks // max(1, num_layers), (inputs // max(1, num_layers)) if dropout > 0 else 0


def activation_element_bytes(recipe: Any, mixed_precision: str) -> int:
    """Bytes of one activation value: 2 under a 16-bit model dtype or mixed precision, else 4."""
    from vidtune.train.training.model import resolve_dtype

    low = resolve_dtype(recipe.model.dtype) != torch.float32 or mixed_precision in ("bf16", "fp16")
    return 2 if low else 4


def activation_bytes(model: Any, family: Any, recipe: Any, zero_stage: int, mixed_precision: str) -> tuple[int, int]:
    """(bytes kept for backward, extra bytes one layer's recompute needs) for the longest micro-batch."""
    text = getattr(model.config, "text_config", model.config)
    # train.sequence_parallel: each GPU of a group keeps its slice of the sequence (Ulysses' attention holds the
    # whole sequence for 1/N of the heads: the same bytes) and encodes its share of the frames
    tokens = -(-recipe.train.batch_size * recipe.data.max_length // recipe.train.sequence_parallel)
    act_bytes = activation_element_bytes(recipe, mixed_precision)
    layers = text.num_hidden_layers
    full = recipe.finetune.mode == "full"
    lora = (0, 0) if full else lora_shape(model, family.language_model_prefix, layers, recipe.finetune.lora.dropout)
    per_token = sum(layer_elements(text, lora, full, act_bytes))
    hidden = text.hidden_size
    # the final norm (fp32 input and scale) and the head's input at label positions (chunked loss), or fp32 logits
    # and their log-softmax when the model computes its own loss (ZeRO-3)
    head = (hidden + 1) * 4 + hidden * act_bytes + (8 * text.vocab_size if zero_stage == 3 else 0)
    if recipe.model.gradient_checkpointing or recipe.model.quantization.bits:
        kept, recompute = tokens * (layers * hidden * act_bytes + head), tokens * per_token
    else:
        kept, recompute = tokens * (layers * per_token + head), 0
    if recipe.finetune.train_projector or recipe.finetune.vision_tower != "frozen":
        kept += vision_activation_bytes(model, recipe, act_bytes)
    return kept, recompute


def vision_activation_bytes(model: Any, recipe: Any, act_bytes: int) -> int:
    """The vision tower's share when the vision side trains: its patches (frames x patches per frame, or the visual
    tokens' patches for dynamic-resolution towers) through every vision layer."""
    vision = getattr(model.config, "vision_config", None)
    if vision is None:
        return 0
    if getattr(vision, "image_size", None) and getattr(vision, "patch_size", None):
        # InternViT gives (h, w) pairs
        sizes = (vision.image_size, vision.patch_size)
        image_px, patch_px = (v[0] if isinstance(v, list | tuple) else v for v in sizes)
        patches = recipe.data.sampling.num_frames * (image_px // patch_px) ** 2
    else:  # Qwen: one token per spatial_merge_size**2 patches, at most max_length tokens
        patches = recipe.data.max_length * getattr(vision, "spatial_merge_size", 2) ** 2
    layers = config_value(vision, "num_hidden_layers", "depth", default=0)
    per_patch = sum(layer_elements(vision, (0, 0), recipe.finetune.vision_tower == "full", act_bytes))
    return -(-recipe.train.batch_size * patches // recipe.train.sequence_parallel) * layers * per_patch


def audio_trains(model: Any, family: Any) -> tuple[bool, bool, bool]:
    """(the audio tower trains at all (LoRA included), its own weights train (full), its projection outside the
    tower trains), read from the model as finetuning left it."""
    tower = full = projector = False
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        bare = re.sub(r"\.(modules_to_save\.default|original_module)\.", ".", name.removeprefix("base_model.model."))
        if family.audio_tower_prefix and bare.startswith(family.audio_tower_prefix):
            tower, full = True, full or "lora_" not in bare
        projector |= bool(family.audio_projector_prefix) and bare.startswith(family.audio_projector_prefix)
    return tower, full, projector


def audio_activation_bytes(model: Any, family: Any, recipe: Any, act_bytes: int) -> tuple[int, int]:
    """(bytes the audio tower keeps for backward, bytes one of its layers' recompute needs) for the longest
    micro-batch (module docstring); 0 for a model that does not hear, a run that hears no sound, a frozen tower."""
    from vidtune.data.dataset import heard_sources

    audio_config = getattr(model.config, "audio_config", None)
    if not family.hears or audio_config is None or not heard_sources(recipe.data, family):
        return 0, 0
    tower, full, projector = audio_trains(model, family)
    shape = family.audio_activations(audio_config)
    tokens = recipe.train.batch_size * recipe.data.max_length  # a longest sample of sound alone
    kept = shape.projector * act_bytes if projector else 0
    checkpointing = bool(recipe.model.gradient_checkpointing or recipe.model.quantization.bits)
    hooked = checkpointing and shape.hooked_input  # the first convolution's output requires grad, frozen or not
    if not (tower or hooked):
        return tokens * kept, 0
    frames = shape.frames_per_token
    layer = shape.layer - (0 if full else shape.layer_linear_inputs)
    lora = 0.0
    if tower and not full:
        ranks, dropout = lora_shape(model, family.audio_tower_prefix, 1, recipe.finetune.lora.dropout)
        lora = frames * (ranks * act_bytes + dropout * (act_bytes + 1))  # every wrapped linear, once per frame
    one_layer = frames * (layer * act_bytes + shape.layer_fp32 * 4) + lora / shape.num_layers
    checkpointed = shape.checkpointed and checkpointing
    layers = shape.num_layers * (frames * shape.hidden * act_bytes if checkpointed else one_layer)
    after = (shape.after - (0 if full else shape.after_linear_inputs)) * act_bytes + shape.after_fp32 * 4
    front_elements = shape.front if full else shape.front - shape.first_input if hooked else 0
    front = front_elements * act_bytes + (shape.front_fp32 * 4 if front_elements else 0)
    kept += layers + after + front
    return math.ceil(tokens * kept), math.ceil(tokens * one_layer) if checkpointed else 0


def plan_memory(
    model: Any,
    family: Any,
    recipe: Any,
    processes: int = 1,
    zero_stage: int = 0,
    deepspeed: bool = False,
    mixed_precision: str = "no",
    fsdp: bool = False,
) -> MemoryPlan:
    """The plan for a model built on the meta device with the recipe's finetuning applied (model.build_on_meta +
    apply_finetuning). `fsdp`: FSDP2 (launch/accelerate/fsdp2.yaml) shards as ZeRO-3 does, without DeepSpeed's
    model-dtype trainable weights."""
    stage = 3 if fsdp else zero_stage
    weights, gradients, optimizer = parameter_bytes(
        model, family, recipe, deepspeed and not fsdp, processes, stage, mixed_precision
    )
    activations, recompute = activation_bytes(model, family, recipe, stage, mixed_precision)
    # the audio tower's backward runs after the language model's: its layer's recompute is the larger of the two
    audio, audio_recompute = audio_activation_bytes(
        model, family, recipe, activation_element_bytes(recipe, mixed_precision)
    )
    weights += frozen_copy_bytes(model, recipe, processes, stage if deepspeed or fsdp else 0)
    return MemoryPlan(
        weights,
        gradients,
        optimizer,
        activations,
        max(recompute, audio_recompute),
        processes,
        zero_stage,
        fsdp,
        audio=audio,
        hears=bool(family.hears and getattr(model.config, "audio_config", None) is not None),
    )


def frozen_copy_bytes(model: Any, recipe: Any, processes: int, zero_stage: int) -> int:
    """DPO, and GRPO with a KL, under full fine-tuning keep a frozen copy of the starting model as their reference
    (train/objectives/reference.py): its weights in the model's dtype, partitioned as the policy's under ZeRO-3."""
    from vidtune.train.objectives.reference import needs_frozen_copy
    from vidtune.train.training.model import resolve_dtype

    if not needs_frozen_copy(recipe):
        return 0
    dtype_bytes = element_bytes(resolve_dtype(recipe.model.dtype))
    sizes = [p.numel() for p in model.parameters()]
    if zero_stage != 3:
        return sum(sizes) * dtype_bytes
    # each weight's padded partition, and whole the small ones ZeRO-3 keeps gathered (zero3_parameter_bytes)
    shards = max(1, processes)
    return sum(-(-n // shards) + (n if n <= ZERO3_PERSISTENCE_THRESHOLD else 0) for n in sizes) * dtype_bytes


def parse_gpu_memory(text: str) -> int:
    """`--gpu-memory 24GB` (also 24, 24G, 24GiB, 80gb) as bytes; GB as the plan prints them (2**30 bytes)."""
    number = text.strip().lower().removesuffix("ib").removesuffix("b").removesuffix("g")
    try:
        gigabytes = float(number)
    except ValueError:
        raise ValueError(f"--gpu-memory {text!r}: give a size in GB such as 24GB") from None
    if not 0 < gigabytes < 1e6:
        raise ValueError(f"--gpu-memory {text!r}: give a positive size in GB such as 24GB")
    return int(gigabytes * GB)


@dataclass
class Launch:
    """How the run is launched, as far as the plan cares (`--num-processes`, `--zero-stage`, `--fsdp`)."""

    processes: int = 1
    zero_stage: int = 0
    fsdp: bool = False

    def flags(self) -> str:
        engine = "--fsdp" if self.fsdp else f"--zero-stage {self.zero_stage}"
        return f"--num-processes {self.processes} {engine}"


def recipe_knobs(recipe: Any, launch: Launch) -> list[tuple[str, Any]]:
    """The recipe changes that lower the plan without changing what is trained, each as (override to type,
    the changed recipe copy), in the order a user would reach for them: cheapest in speed and quality first."""
    import copy

    sharded = launch.fsdp or launch.zero_stage > 0
    knobs: list[tuple[str, Any]] = []

    def knob(**changes: Any) -> None:  # keys are recipe paths with "__" for "."
        changed = copy.deepcopy(recipe)
        for path, value in changes.items():
            *parents, leaf = path.split("__")
            section = changed
            for parent in parents:
                section = getattr(section, parent)
            setattr(section, leaf, value)
        knobs.append((" ".join(f"{k.replace('__', '.')}={str(v).lower()}" for k, v in changes.items()), changed))

    if not recipe.model.gradient_checkpointing and not recipe.model.quantization.bits:
        knob(model__gradient_checkpointing=True)
    if recipe.train.optimizer == "adamw" and not sharded:  # 8-bit states are refused under DeepSpeed / FSDP
        knob(train__optimizer="adamw_8bit")
    if recipe.train.batch_size > 1:
        knob(train__batch_size=1, train__grad_accum_steps=recipe.train.batch_size * recipe.train.grad_accum_steps)
    if recipe.finetune.mode != "full" and not recipe.model.quantization.bits and not sharded:
        knob(model__quantization__bits=4)
    frames, length = recipe.data.sampling.num_frames, recipe.data.max_length
    if frames > 1:
        knob(data__sampling__num_frames=frames // 2, data__max_length=length // 2)
    return knobs


def fit_advice(recipe: Any, launch: Launch, budget: int, plan_for: Any) -> str:
    """Whether the plan fits `budget` bytes per GPU and, when it does not, what would: each recipe change alone,
    the cheapest ones together, and more GPUs under ZeRO-3. `plan_for(recipe, launch)` gives a MemoryPlan."""
    total = plan_for(recipe, launch).total
    lines = [f"fits {budget / GB:.4g} GB per GPU: {'yes' if total <= budget else 'no'} (plan {total / GB:.4g} GB)"]
    if total <= budget:
        return "\n".join(lines)
    lines.append("  what lowers it (each alone; plan per GPU):")
    knobs = recipe_knobs(recipe, launch)
    one_fits = False
    for override, changed in knobs:
        alone = plan_for(changed, launch).total
        one_fits |= alone <= budget
        lines.append(f"    {override:<58}{alone / GB:>8.4g} GB{'  fits' if alone <= budget else ''}")
    together: list[str] = []
    combined = recipe
    for override, _ in [] if one_fits else knobs:  # none fits alone: add them cheapest first until it fits
        combined = dict(recipe_knobs(combined, launch)).get(override, combined)
        together.append(override)
        reached = plan_for(combined, launch).total
        if reached <= budget:
            lines.append(f"  together: {' '.join(together)}  -> {reached / GB:.4g} GB  fits")
            break
    if not (launch.fsdp or launch.zero_stage == 3):
        for processes in (2, 4, 8):
            more = Launch(processes=processes, zero_stage=3)
            sharded = plan_for(recipe, more).total
            if sharded <= budget:
                lines.append(f"  or {more.flags()} (launch/accelerate/zero3.yaml): {sharded / GB:.4g} GB  fits")
                break
    return "\n".join(lines)
