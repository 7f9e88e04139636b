"""Model FLOPs of a training step and the GPU's peak, for the loop's TFLOPs and MFU (model FLOPs utilisation).

What is counted (model FLOPs: checkpointing's recomputation is not work the model needs, so it is not counted):
- Matrix multiplies, 2 FLOPs per weight per token in the forward (Kaplan et al. 2020, "Scaling Laws", sec. 2.1).
  In the backward, 2 more per weight per token for the gradient of the activations wherever a gradient flows
  (a part that trains, or lies downstream of one), and 2 more for the weight's own gradient when it trains. So a
  fully trained language model costs the familiar 6N per token; a frozen one under LoRA 4N plus 6 per LoRA weight.
  A part that neither trains nor passes gradients on (a frozen vision tower) costs its forward only, 2N.
- The language head only at the positions that are scored: loss.py computes logits only there (the model's own
  full-logit loss, used under ZeRO-3, computes them everywhere).
- Attention of the language model, PaLM's count (Chowdhery et al. 2022, appendix B: 6N + 12·L·H·Q·T per token):
  4·layers·d_attn FLOPs per (query, key) pair forward (QK^T and attention x V), twice that backward, over the full
  L x L square per sample (no discount for the causal mask, as PaLM and Megatron-LM count, and as
  torch.utils.flop_counter counts scaled_dot_product_attention): 12·layers·d_attn·L² per sample of L tokens.
- The vision tower on the tokens it actually sees (a hook counts them: anyres crops, frames, Qwen's patches), with
  its attention per image or frame for towers that take whole images (CLIP, SigLIP); the windowed attention of
  Qwen's towers is left out (a small undercount).
- The projector on the rows it actually sees (a hook on each of its linear layers), and so the merge layers inside
  a tower (Qwen3-VL's deepstack mergers), which see one row per 4 patches.
- Mixture-of-Experts language models (Qwen3-Omni-MoE): the active experts only (top-k of them per token) and the
  whole router (expert_weights).
- The audio tower of a family that hears (Qwen2.5-Omni, Gemma 4), with the projection of its features, on what it
  actually sees: a hook after each of its linear and convolution layers charges 2 FLOPs per weight per output row
  (or position), 4 when a gradient flows through a frozen layer, 6 for a layer that trains. Its attention products
  are left out: they run within windows of the sound (Qwen2.5-Omni's 100-frame chunks), a small undercount.
Not counted: embeddings (lookups), norms, activations, the loss itself: a few percent at most (a conservative MFU).
Hybrid models (Qwen3.5) get the L² term only for their full-attention layers (`layer_types`); the chunked
recurrence of their Gated DeltaNet layers is not counted either (its cost per token grows with the head width and
the 64-token chunk, not with the sequence; it is 11% of the tiny test model's FLOPs, and has not been measured at a
real size).
Under multi-process ZeRO-3 the blank vision passes that keep ranks in lockstep (distributed.VisionLockstep) are
counted when they run: one blank frame or image, against a step's worth of real ones.

The peak is the GPU's dense bf16 tensor throughput from its vendor's datasheet, looked up by
torch.cuda.get_device_name, or `train.peak_tflops` from the recipe. Without a peak (CPU, an unknown GPU) the loop
logs achieved TFLOPs but no MFU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vidtune.data.families import ModelFamily
from vidtune.train.training.model import numel

# Dense (no sparsity) bf16 tensor-core TFLOPs per GPU, vendor datasheets; the first name found in the device's
# name wins (so the specific variants come before the family name).
PEAK_TFLOPS = {
    "B200": 2250.0,  # NVIDIA HGX B200 datasheet: 4.5 PFLOPS sparse bf16 per GPU
    "H200 NVL": 835.0,  # NVIDIA H200 datasheet: 1,671 sparse (NVL)
    "H200": 989.0,  # NVIDIA H200 datasheet: 1,979 sparse (SXM)
    "H100 NVL": 835.0,  # NVIDIA H100 datasheet: 1,671 sparse
    "H100 PCIe": 756.0,  # NVIDIA H100 datasheet: 1,513 sparse
    "H100": 989.0,  # NVIDIA H100 datasheet: 1,979 sparse (SXM)
    "H800": 989.0,  # as the H100 SXM (NVIDIA H800 datasheet)
    "A100": 312.0,  # NVIDIA A100 datasheet: 312 dense bf16
    "A800": 312.0,  # as the A100
    "L40S": 362.0,  # NVIDIA L40S datasheet: 362.05 dense, 733 sparse
    "L40": 181.0,  # NVIDIA L40 datasheet: 181.05 dense, 362.1 sparse
    "L4": 121.0,  # NVIDIA L4 datasheet: 242 sparse
    "A10": 125.0,  # NVIDIA A10 datasheet: 125 dense, 250 sparse
    "RTX 4090": 165.0,  # NVIDIA Ada architecture whitepaper: 165.2 dense with FP32 accumulate
}


def peak_tflops(override: float | None = None) -> float | None:
    """The recipe's figure when set, else the table's for this GPU; None on a CPU or an unknown GPU."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


@dataclass
class PartWeights:
    """The matmul weights of one part of the model: frozen, trained, and LoRA's (all trained)."""

    frozen: int = 0
    trained: int = 0
    lora: int = 0

    @property
    def total(self) -> int:
        return self.frozen + self.trained + self.lora

    def per_token(self, backward: bool) -> int:
        """FLOPs per token: forward 2 per weight; with a gradient flowing, 2 for the activations' gradient, and 2
        for each trained weight's own gradient."""
        if not backward and not (self.trained or self.lora):
            return 2 * self.total
        return 4 * self.total + 2 * (self.trained + self.lora)


def matmul_modules(model: torch.nn.Module, belongs: Callable[[str], bool]):
    """(name, module) of the linear and convolution layers whose name `belongs`; a PEFT model's names are matched
    without its `base_model.model.` wrapper, and modules_to_save's idle original copies are skipped."""
    for name, module in model.named_modules():
        bare = name.removeprefix("base_model.model.")
        if ".original_module" in bare or not belongs(bare):
            continue
        if isinstance(module, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d):
            yield bare, module


def part_weights(model: torch.nn.Module, belongs: Callable[[str], bool]) -> PartWeights:
    part = PartWeights()
    for name, module in matmul_modules(model, belongs):
        count = numel(module.weight)
        if ".lora_" in name and ".experts." in name:
            continue  # LoRA on fused experts: its delta joins their weights (expert_weights counts them trained)
        if ".lora_" in name:
            part.lora += count
        elif module.weight.requires_grad:
            part.trained += count
        else:
            part.frozen += count
    return part


def expert_weights(model: torch.nn.Module, family: ModelFamily, config: Any) -> PartWeights:
    """A Mixture-of-Experts language model's experts and routers (`family.router_module`; none elsewhere), per token.
    Experts stored fused (3-D weights under `.experts.`, every expert's projections stacked) count only their
    active share, `num_experts_per_tok / num_experts` (30B-A3B: 8 of 128): a token runs its top-k experts only.
    LoRA on them (PEFT target_parameters) adds its low-rank delta to the stacked weights once per forward, so a token
    costs what a trained weight costs (the gradient of the whole active weight, then of the factors once a step).
    The router computes every expert's logit for every token: its whole weight counts."""
    part = PartWeights()
    if not family.router_module:
        return part
    share = config.num_experts_per_tok / config.num_experts
    adapted = {
        name.split(".experts.")[0] for name, _ in model.named_parameters() if ".experts." in name and ".lora_" in name
    }
    for name, param in model.named_parameters():
        bare = name.removeprefix("base_model.model.")
        if not bare.startswith(family.language_model_prefix) or ".lora_" in bare or ".original_module." in bare:
            continue
        count = numel(param)
        if ".experts." in bare and len(getattr(param, "ds_shape", param.shape)) == 3:
            count = round(count * share)
            trained = param.requires_grad or name.split(".experts.")[0] in adapted
        elif f".{family.router_module}." in bare and bare.endswith(".weight"):
            trained = param.requires_grad
        else:
            continue
        if trained:
            part.trained += count
        else:
            part.frozen += count
    return part


def expert_lora_flops(model: torch.nn.Module) -> int:
    """LoRA on fused experts (PEFT's ParamWrapper) builds each expert's low-rank delta B·A (out x r times r x in) in
    every forward, for all experts, used or not: 2·r FLOPs per expert weight forward and 4·r backward (the factors'
    gradients), whatever the number of tokens (3% of a 30B-A3B step of 8k tokens at rank 16)."""
    total = 0
    for module in model.modules():
        factors = getattr(module, "lora_A", None)
        name = getattr(module, "parameter_name", None)
        if name is None or not isinstance(factors, torch.nn.ModuleDict) or "default" not in factors:
            continue
        base: Any = module.get_base_layer()  # type: ignore[operator]  # a PEFT layer's method
        experts = getattr(base, "num_experts", 1)
        down: Any = factors["default"]  # LoRA's A: an nn.Linear of (rank x experts) outputs
        rank = down.out_features // experts
        total += 6 * rank * numel(getattr(base, name))
    return total


def merging(family: ModelFamily) -> Callable[[str], bool]:
    """The layers that see merged visual rows rather than the tower's tokens: the projector, and merge layers
    inside the tower (Qwen3-VL's deepstack mergers, each taking 4 patches per row): hooks count their rows."""
    return lambda name: (
        name.startswith(family.projector_prefix) or (name.startswith(family.vision_tower_prefix) and "merger" in name)
    )


def tower(family: ModelFamily) -> Callable[[str], bool]:
    merge = merging(family)
    return lambda name: name.startswith(family.vision_tower_prefix) and not merge(name)


def audio_tower(family: ModelFamily) -> Callable[[str], bool]:
    """The audio tower's layers and the projection of its features (Gemma 4's lies outside the tower)."""
    prefixes = tuple(p for p in (family.audio_tower_prefix, family.audio_projector_prefix) if p)
    return lambda name: bool(prefixes) and name.startswith(prefixes)


@dataclass
class VisionTokens:
    """Counts what the vision side processes during the forward passes of one step (hooks; shapes only, no
    device sync): the tower's tokens and its attention pairs, the projector's FLOPs."""

    tower_tokens: int = 0
    tower_pairs: int = 0  # sum over images/frames of tokens² (towers that take whole images)
    projector_flops: int = 0
    audio_flops: int = 0  # the audio tower's linear and convolution layers (families that hear)

    def take(self) -> tuple[int, int, int, int]:
        figures = (self.tower_tokens, self.tower_pairs, self.projector_flops, self.audio_flops)
        self.tower_tokens = self.tower_pairs = self.projector_flops = self.audio_flops = 0
        return figures


@dataclass
class FlopCounter:
    """Per-family FLOP coefficients of a built model (see the module docstring), and hooks counting the vision
    side's tokens. `step_flops` turns a micro-batch into FLOPs, on the batch's device (no host read)."""

    language: PartWeights
    head: PartWeights
    vision: PartWeights
    projector: PartWeights
    audio: PartWeights  # the audio tower and its projection (empty for a family that does not hear)
    attention_per_pair: int  # 12 · layers · d_attn (forward and backward)
    vision_attention_per_pair: int  # 4 · layers · d_attn per pass (forward; x2 more when a gradient flows)
    patch_size: int
    class_token: bool  # the tower adds one class token per image (CLIP)
    head_everywhere: bool = False  # the model's own loss computes logits at every position (ZeRO-3)
    # FLOPs each forward (micro-batch) costs whatever its tokens: LoRA's deltas on fused experts (expert_lora_flops)
    per_forward: int = 0
    seen: VisionTokens = field(default_factory=VisionTokens)

    @property
    def vision_backward(self) -> bool:
        return bool(self.vision.trained or self.vision.lora)

    @property
    def projector_backward(self) -> bool:
        return self.vision_backward or bool(self.projector.trained or self.projector.lora)

    def attach(self, model: torch.nn.Module, family: ModelFamily) -> FlopCounter:
        """Hooks on the vision tower (its input's tokens) and on each projector layer (its rows)."""
        tower = find_module(model, family.vision_tower_prefix)
        if tower is not None:
            tower.register_forward_pre_hook(self._tower_input, with_kwargs=True)
        per_row = 2 if not self.projector_backward else 6 if self.projector.trained or self.projector.lora else 4
        for _, module in matmul_modules(model, merging(family)):
            module.register_forward_pre_hook(lambda m, args, k=per_row: self._projector_rows(m, args, k))
        audio_backward = bool(self.audio.trained or self.audio.lora)  # its input (sound features) needs no gradient
        for _, module in matmul_modules(model, audio_tower(family)):
            per_output = 6 if module.weight.requires_grad else 4 if audio_backward else 2
            module.register_forward_hook(lambda m, args, out, k=per_output: self._audio_outputs(m, out, k))
        return self

    def _audio_outputs(self, module: Any, output: Any, per_output: int) -> None:
        """A linear layer's output rows, or a convolution's output positions, each cost its weights once."""
        if not isinstance(output, torch.Tensor):
            return
        channels = output.shape[-1] if isinstance(module, torch.nn.Linear) else output.shape[1]
        self.seen.audio_flops += per_output * (output.numel() // channels) * numel(module.weight)

    def _tower_input(self, module: Any, args: tuple, kwargs: dict) -> None:
        pixels = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))
        if not isinstance(pixels, torch.Tensor):
            return
        if pixels.dim() >= 4:  # whole images (N, C, H, W): patches per image, plus a class token
            images = pixels.shape[0] if pixels.dim() == 4 else pixels.shape[:-3].numel()
            per_image = (pixels.shape[-2] // self.patch_size) * (pixels.shape[-1] // self.patch_size)
            per_image += int(self.class_token)
            self.seen.tower_tokens += images * per_image
            self.seen.tower_pairs += images * per_image**2
        elif pixels.dim() == 3:  # patch rows per image (Gemma 4: images, patches padded to one count, pixels)
            self.seen.tower_tokens += pixels.shape[0] * pixels.shape[1]
            self.seen.tower_pairs += pixels.shape[0] * pixels.shape[1] ** 2
        else:  # flattened patches (Qwen): one row per patch
            self.seen.tower_tokens += pixels.shape[0]

    def _projector_rows(self, module: Any, args: tuple, per_row: int) -> None:
        hidden = args[0]
        rows = hidden.numel() // hidden.shape[-1] if hidden.dim() > 1 else 1
        self.seen.projector_flops += per_row * rows * numel(module.weight)

    def language_flops(
        self, tokens: torch.Tensor, label_tokens: torch.Tensor, pairs: torch.Tensor, forwards: int = 1
    ) -> torch.Tensor:
        """The language model's FLOPs for `tokens` real tokens, `label_tokens` scored ones, `pairs` = sum of L², over
        `forwards` micro-batches."""
        head_tokens = tokens if self.head_everywhere else label_tokens
        return (
            tokens.double() * self.language.per_token(backward=True)
            + head_tokens.double() * self.head.per_token(backward=True)
            + pairs.double() * self.attention_per_pair
            + forwards * self.per_forward
        )

    def media_flops(self) -> float:
        """The vision and audio side's FLOPs over the forwards since the last call (then forgotten)."""
        tokens, pairs, projector, audio = self.seen.take()
        passes = 3 if self.vision_backward else 1
        return (
            tokens * self.vision.per_token(self.vision_backward)
            + pairs * self.vision_attention_per_pair * passes
            + projector
            + audio
        )


def find_module(model: torch.nn.Module, prefix: str) -> torch.nn.Module | None:
    target = prefix.rstrip(".")
    for name, module in model.named_modules():
        if name.removeprefix("base_model.model.") == target:
            return module
    return None


def text_config(config: Any) -> Any:
    return getattr(config, "text_config", config)


def vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", None)


def attention_width(config: Any) -> int:
    """Query heads x head dimension (the width of QK^T and of attention x V)."""
    heads = config.num_attention_heads if hasattr(config, "num_attention_heads") else config.num_heads
    hidden = config.hidden_size if hasattr(config, "hidden_size") else config.embed_dim
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return heads * head_dim


SOFTMAX_KINDS = ("full_attention", "sliding_attention")


def softmax_attention_layers(config: Any) -> int:
    """Layers with softmax attention over the sequence. Hybrid models (Qwen3.5: Gated DeltaNet layers 3:1 with
    full attention) name each layer's kind in `layer_types`; their linear-attention layers cost no L² term. Sliding
    layers (Gemma 4) are charged the whole L², which they cost up to their window (512 tokens)."""
    kinds = getattr(config, "layer_types", None)
    if not kinds:
        return config.num_hidden_layers
    return sum(kind in SOFTMAX_KINDS for kind in kinds)


def summed_attention_width(config: Any) -> int:
    """Sum over the softmax-attention layers of each one's attention width: layers that differ in head size
    (Gemma 4's global layers: per_layer_config) each with their own."""
    per_layer, kinds = getattr(config, "per_layer_config", None), getattr(config, "layer_types", None)
    if not per_layer or not kinds:
        return softmax_attention_layers(config) * attention_width(config)
    heads = config.num_attention_heads
    return sum(
        heads * (getattr(per_layer[i], "head_dim", None) or attention_width(config) // heads)
        for i, kind in enumerate(kinds)
        if kind in SOFTMAX_KINDS
    )


def flop_counter(model: Any, family: ModelFamily, head_everywhere: bool = False) -> FlopCounter:
    """The FLOP coefficients of a built (possibly PEFT-wrapped, possibly ZeRO-3-partitioned) model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    text, vision = text_config(config), vision_config(config)
    head_module = inner.get_output_embeddings()
    head = PartWeights()
    if head_module.weight.requires_grad:
        head.trained = numel(head_module.weight)
    else:
        head.frozen = numel(head_module.weight)
    tower_layers = getattr(vision, "num_hidden_layers", 0) or getattr(vision, "depth", 0)
    tower_type = getattr(vision, "model_type", "")
    # towers that attend over each image's (frame's) patches as one sequence; Gemma 4's takes them as padded
    # patch rows (images, patches, patch pixels)
    whole_images = tower_type in ("clip_vision_model", "siglip_vision_model", "internvl_vision", "gemma4_vision")
    patch_size = getattr(vision, "patch_size", 1) if vision is not None else 1
    patch_size = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size  # InternViT: (14, 14)
    language = part_weights(model, lambda name: name.startswith(family.language_model_prefix))
    experts = expert_weights(model, family, text)
    language.frozen, language.trained = language.frozen + experts.frozen, language.trained + experts.trained
    return FlopCounter(
        language=language,
        head=head,
        vision=part_weights(model, tower(family)),
        projector=part_weights(model, merging(family)),
        audio=part_weights(model, audio_tower(family)),
        attention_per_pair=12 * summed_attention_width(text),
        vision_attention_per_pair=4 * tower_layers * attention_width(vision) if vision and whole_images else 0,
        patch_size=patch_size,
        class_token=tower_type in ("clip_vision_model", "internvl_vision"),
        head_everywhere=head_everywhere,
        per_forward=expert_lora_flops(model),
    ).attach(model, family)


def squared_lengths(batch: dict[str, Any]) -> torch.Tensor:
    """Sum over the micro-batch's samples of their token count squared, on the batch's device (no host read).

    A padded batch: one sample per row, its length from the attention mask. A packed batch (position ids
    restarting per sample, no mask): a sample per restart; the padding segment that ends a short row holds no
    label, and neither do the samples' prompts alone, so segments without any label token are left out."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(-1).double().square().sum()
    positions = batch["position_ids"]
    if positions.dim() == 3:  # multimodal RoPE (3 or 4, rows, width): every row restarts at 0 per sample
        positions = positions[0]
    starts = positions == 0
    segment = starts.flatten().cumsum(0) - 1  # a sample's segment id, counted across rows
    labelled = (batch["labels"] != -100).flatten().double()
    lengths = torch.zeros(segment.numel(), dtype=torch.float64, device=segment.device)
    lengths.scatter_add_(0, segment, torch.ones_like(labelled))
    labels = torch.zeros_like(lengths).scatter_add_(0, segment, labelled)
    return (lengths.square() * (labels > 0)).sum()
