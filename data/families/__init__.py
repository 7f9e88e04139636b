"""Model families: everything model-specific, one module per family, behind the one interface below.

data/ and train/ never look inside a model or its processor directly; they ask its family:
- its training chat template (generation markers, end-of-turn token) and generation stop tokens;
- how the processor encodes one sample (`encode`: its own apply_chat_template for most families);
- what a clip or an image costs in tokens (`token_counter`), so `max_length` counts visual tokens before decoding;
- the frame size decoders should scale to (`decode_edge_px`);
- how one sample's visual tensors come out of the processor (`example_visuals`), how several samples' form a batch
  (`batch_visuals`) and how they reach the device (`visuals_to_device`);
- which pixels may leave the processor uint8 (`raw_pixel_processors`, `raw_pixel_kwargs`), to be normalised on the
  device by the processor's own rescale and normalisation (`normalize_pixels`): 1/4 of float32's bytes per sample;
- the vision paths of its forward, with a blank input for each, that keep ZeRO-3 ranks in lockstep (`blank_paths`);
- for a family that hears, what its audio tower keeps for backward per audio token (`audio_activations`), which the
  memory plan counts;
- anything the loaded model needs to take those batches (`prepare_model`);
- one sample's position ids as it would have them alone (`packed_position_ids`), which packing concatenates, and
  whether its batches may be packed at all (`supports_packing`);
- module prefixes of its parts (for LoRA scoping and the trainable-parameter audit), default LoRA targets, the
  layers its forward never reads (`unused_module_prefixes`), which must not train, and the modules QLoRA leaves
  unquantized (`quantization_skip_modules`).

Adding a family: a module here with a `ModelFamily` subclass, a line in `FAMILIES`, a tiny-model config
(train/demo/tiny_model.py) and recipes.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

# model_type (config.json) -> "module:attribute" of the family instance; modules are imported on first use.
FAMILIES = {
    "llava_next_video": "vidtune.data.families.llava_next_video:LLAVA_NEXT_VIDEO",
    "llava_onevision": "vidtune.data.families.llava_onevision:LLAVA_ONEVISION",
    "qwen2_5_vl": "vidtune.data.families.qwen2_5_vl:QWEN2_5_VL",
    "qwen3_vl": "vidtune.data.families.qwen3_vl:QWEN3_VL",
    "qwen3_5": "vidtune.data.families.qwen3_5:QWEN3_5",
    "qwen2_5_omni": "vidtune.data.families.qwen2_5_omni:QWEN2_5_OMNI",
    "qwen2_5_omni_thinker": "vidtune.data.families.qwen2_5_omni:QWEN2_5_OMNI",  # the thinker saved alone
    "internvl": "vidtune.data.families.internvl:INTERNVL",
    "gemma4": "vidtune.data.families.gemma4:GEMMA4",
    "qwen3_omni_moe": "vidtune.data.families.qwen3_omni_moe:QWEN3_OMNI_MOE",
    "qwen3_omni_moe_thinker": "vidtune.data.families.qwen3_omni_moe:QWEN3_OMNI_MOE",  # the thinker saved alone
}


class TokenCounter(Protocol):
    """Visual token costs without decoding pixels (built once per processor; implementations may cache)."""

    def video_tokens(
        self, num_frames: int, height: int, width: int, timestamps_s: Sequence[float] | None = None
    ) -> int:
        """Tokens a clip's placeholder expands into; `timestamps_s` (the sampled frames' times) for families that
        write time into the prompt (Qwen3-VL's `<1.5 seconds>` per temporal patch)."""
        ...

    def image_tokens(self, height: int, width: int) -> int: ...


class HearingTokenCounter(TokenCounter, Protocol):
    """The token counter of a family that hears: a sound file's tokens (its placeholder expanded) and what a heard
    video's sound adds to the video's, both from the sound's length in seconds."""

    def audio_tokens(self, duration_s: float) -> int: ...

    def video_audio_tokens(self, duration_s: float) -> int: ...


@dataclass
class BlankPath:
    """One vision path of the model's forward (image or video), as ZeRO-3 lockstep needs to know it.

    A rank whose micro-batch lacks `batch_key` runs `run()` (the path on a blank input, returning the sum of its
    outputs) at the point of the forward where the real path would run: inside a hook on `module`, before its
    forward (`before=True`, a pre-hook) or right after it. `fallback`: a second point, before that module's forward,
    for a path whose `module` may not run at all in a forward (the blank then runs at whichever comes first)."""

    batch_key: str
    module: torch.nn.Module
    before: bool
    run: Callable[[], torch.Tensor]
    fallback: torch.nn.Module | None = None


@dataclass
class VisionShare:
    """One rank's part of a micro-batch's video frames under train.sequence_parallel
    (train/training/sequence_split.py): the keyword arguments of the model's `get_video_features` for it, its size
    in a unit its feature rows are proportional to (frames, patches), and whether its features are kept (a rank
    with no frames left encodes a stand-in share, so every rank runs the tower alike)."""

    inputs: dict[str, torch.Tensor]
    weight: int
    real: bool = True


def even_ranges(count: int, parts: int) -> list[tuple[int, int]]:
    """`count` units in `parts` contiguous ranges of ceil(count / parts) (the last ones shorter or empty)."""
    per = -(-count // parts)
    return [(min(i * per, count), min((i + 1) * per, count)) for i in range(parts)]


@dataclass
class AudioActivations:
    """What an audio tower keeps for backward, per audio token of the language model's input (or per encoder frame),
    by the arithmetic of its modules over its config (each family's module lists the tensors). Counts are elements
    in the model's precision unless named `_fp32` (norm statistics, attention internals computed in fp32).

    `front`: the subsampling convolutions, per token: kept only when their weights train (finetune.audio_tower=full;
    LoRA leaves them frozen with an input that needs no gradient). `layer`: one encoder layer, per encoder frame, of
    which `layer_linear_inputs` are the inputs of its linear layers (a frozen base linear under LoRA keeps none; LoRA
    keeps its own, counted from the wrapped layers). `after`: what follows the layers, per token (pooling, norm,
    projections), `after_linear_inputs` likewise. `checkpointed`: the layers are recomputed under
    model.gradient_checkpointing (each then keeps only its `hidden`-wide input). `projector`: what a projection
    outside the tower (Gemma 4's embed_audio) keeps per token when it trains. `first_input`: the part of `front`
    that is the first convolution's input, and `hooked_input`: the tower's `get_input_embeddings` is that
    convolution, whose output transformers makes require grad under gradient checkpointing (enable_input_require_grads
    hooks every sub-model's input embeddings): the tower then keeps the rest even when frozen."""

    front: int
    front_fp32: int
    first_input: int
    hooked_input: bool
    layer: int
    layer_fp32: int
    layer_linear_inputs: int
    num_layers: int
    frames_per_token: float
    hidden: int
    after: int
    after_fp32: int
    after_linear_inputs: int
    checkpointed: bool
    projector: int = 0


@dataclass
class FrameLimits:
    """How large the processor may make each video frame, for families with dynamic resolution (Qwen); None keeps
    the checkpoint's own setting. Applied to the processor, which is saved with the run's outputs, so inference and
    exported models resize (and count tokens) exactly as training did."""

    min_pixels_per_frame: int | None = None  # frames smaller than this are upscaled to it
    max_pixels_per_frame: int | None = None  # frames larger than this are downscaled to it
    # A clip's visual-token budget: frames shrink (down to min_pixels_per_frame) so that the whole clip fits, so a
    # long clip costs about what a short one does (qwen-vl-utils' total-pixel cap).
    max_tokens_per_video: int | None = None

    def is_set(self) -> bool:
        return any(
            v is not None for v in (self.min_pixels_per_frame, self.max_pixels_per_frame, self.max_tokens_per_video)
        )


class ModelFamily(ABC):
    """One family of models (one or more `config.model_type`s), stateless so collators pickle into workers."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values this family covers
    model_class: str  # the transformers class that loads it
    # Training template: the model's own prompt format, with each assistant turn wrapped in {% generation %} and
    # closed by its end-of-turn token, so labels come from the processor's assistant mask and the model learns
    # to stop. Saved with every adapter, so inference renders exactly what training saw.
    chat_template: str
    language_model_prefix: str  # module-name prefixes of the parts the trainable-parameter audit counts
    vision_tower_prefix: str
    projector_prefix: str
    language_model_lora_targets: tuple[str, ...]  # linear-layer names LoRA wraps inside each part
    vision_tower_lora_targets: tuple[str, ...]
    # a family that hears: its audio encoder's module-name prefix (finetune.audio_tower trains it; the audit counts
    # it as audio_tower) and the linear-layer names LoRA wraps there; "" for a family without one
    audio_tower_prefix: str = ""
    audio_tower_lora_targets: tuple[str, ...] = ()
    # Mixture-of-Experts text models whose experts are fused 3-D parameters (not linear layers): their names (from
    # a decoder layer, e.g. "mlp.experts.gate_up_proj"), which LoRA adapts through PEFT's `target_parameters`, and
    # the router's module name ("mlp.gate"), which stays frozen unless finetune.train_router asks for it
    language_model_lora_parameters: tuple[str, ...] = ()
    router_module: str = ""
    # the sound features' projection to the text width where it lies outside the audio tower (Gemma 4's
    # embed_audio): the FLOP count charges it to the audio side
    audio_projector_prefix: str = ""
    # model.quantization (QLoRA): module names transformers' BitsAndBytesConfig leaves unquantized (prefixes from the
    # model's root, or layer-name suffixes): the vision tower, the projector and lm_head, whose precision the visual
    # features and every logit depend on and whose weights are a small share of the model
    quantization_skip_modules: tuple[str, ...]
    visual_keys: tuple[str, ...]  # the batch keys that carry visual inputs
    token_keys: tuple[str, ...] = ()  # per-token tensors of an example (L,), padded by the collator like input_ids
    # Batch keys whose pixels can travel uint8 (resized and cropped, not yet rescaled or normalised) -> the
    # processor attribute that normalises them; empty: they travel as the processor makes them.
    raw_pixel_processors: ClassVar[dict[str, str]] = {}
    # train.packing (data/packing.py): the family's position ids (`packed_position_ids`) and visual batching hold
    # when samples share a row; a new family opts in once a packed batch gives its padded loss (tests/test_packing.py)
    supports_packing: bool = False
    # what a refused train.packing says (one line, with the fix)
    packing_refusal: str = "its packed batches are not tested yet"
    # whether the model hears sound: a video's sound track (data.audio, data/audio.py) and sound files (`audio`
    # parts). Such a family also defines `audio_sampling_rate(processor)` and `encode_with_audio(...)`, and its token
    # counter is a HearingTokenCounter; the others refuse a row with a sound file (ExampleBuilder.refuse_unheard)
    hears: bool = False
    # train.sequence_parallel: `video_shares` splits its frames and a split run gives the 1-process losses
    # (tests/test_sequence_parallel.py)
    splits_sequence: bool = False

    @abstractmethod
    def token_counter(self, processor: Any) -> TokenCounter: ...

    @abstractmethod
    def decode_edge_px(self, processor: Any) -> int | None:
        """The shorter side the processor resizes frames to (decoders scale to it directly), None to keep it."""

    @abstractmethod
    def example_visuals(self, encoded: dict[str, Any], processor: Any) -> dict[str, torch.Tensor]:
        """One sample's visual tensors from the processor's output (return_tensors=None: lists per media item)."""

    @abstractmethod
    def batch_visuals(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The visual tensors of several samples as the model takes them in one batch (samples may have none)."""

    @abstractmethod
    def blank_paths(self, model: Any, processor: Any, device: torch.device) -> list[BlankPath]:
        """The vision paths of `model`'s forward (a PEFT-wrapped or bare model of this family)."""

    def apply_frame_limits(self, processor: Any, limits: FrameLimits) -> None:
        """Set the processor's frame-size limits (families whose frames all resize to one fixed size have none)."""
        if limits.is_set():
            raise ValueError(
                f"model.frame_limits: {self.name} resizes every frame to one fixed size; leave the limits unset"
            )

    def encode(self, processor: Any, conversation: list[dict[str, Any]], **kwargs: Any) -> Any:
        """One sample through the processor: its `apply_chat_template` (tokenize=True, return_dict=True, and the
        rest of `kwargs` as ExampleBuilder passes them), the output lists per media item (return_tensors=None)."""
        return processor.apply_chat_template(conversation, **kwargs)

    def video_token_id(self, processor: Any) -> int:
        """The token id the model fills with video features (what `input_ids` hold where a clip's frames go)."""
        return int(processor.video_token_id)

    def video_processor_kwargs(self, timings: Sequence[tuple[Sequence[float], float] | None]) -> dict[str, Any]:
        """Keyword arguments for the processor call, from each video's (frame timestamps in seconds, clip duration in
        seconds), in conversation order (None where only frames were given): how the family's time information
        reaches the processor. Families without time information take none."""
        return {}

    def visuals_to_device(self, batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Every tensor onto the device; floating-point pixels in the model's dtype."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for key in self.visual_keys:
            if key in moved and moved[key].is_floating_point():
                moved[key] = moved[key].to(dtype)
        return moved

    def finish_batch(self, batch: dict[str, Any], examples: Sequence[dict[str, Any]], padding_side: str) -> None:
        """Last touches on a padded batch, which `batch_visuals` cannot make (they need the padded width and side);
        most families need none."""
        return None

    def attention_implementations(self, requested: str) -> str | dict[str, str]:
        """What from_pretrained is given for model.attn_implementation: the one asked for, or per sub-model where
        a part supports fewer (transformers' dict form, keyed by sub-config)."""
        return requested

    def prepare_model(self, model: Any) -> None:
        """Adapt a freshly loaded model (bare or PEFT-wrapped) to the batches `batch_visuals` builds, where the
        model's own forward cannot take them as they are; most families need nothing."""
        return None

    def packed_position_ids(self, example: dict[str, Any], model_config: Any) -> torch.Tensor:
        """One sample's position ids as the model gives them to it alone in a batch, (L,) or (rows, L), which
        packing concatenates so they restart per sample. Plain RoPE: 0..L-1 (`model_config` unused)."""
        return torch.arange(len(example["input_ids"]))

    def raw_pixel_kwargs(self) -> dict[str, Any]:
        """Processor kwargs that keep the pixels of `raw_pixel_processors` uint8 (a fresh dict: the processor
        writes into it)."""
        return {}

    def normalize_pixels(self, batch: dict[str, Any], processor: Any) -> dict[str, Any]:
        """uint8 pixels of `raw_pixel_processors` rescaled and normalised where they are (the device), by the
        processor's own fused rescale + normalisation: the float32 inputs the processor would have made."""
        for key, attribute in self.raw_pixel_processors.items():
            pixels = batch.get(key)
            if pixels is None or pixels.dtype != torch.uint8:
                continue
            pixel_processor = getattr(processor, attribute)
            batch[key] = pixel_processor.rescale_and_normalize(
                pixels,
                pixel_processor.do_rescale,
                pixel_processor.rescale_factor,
                pixel_processor.do_normalize,
                tuple(pixel_processor.image_mean),  # hashable: the processor caches the fused constants
                tuple(pixel_processor.image_std),
            )
        return batch

    def unused_module_prefixes(self, config: Any) -> tuple[str, ...]:
        """Module-name prefixes of layers the forward computes but never reads (no gradient ever reaches them):
        LoRA never wraps them."""
        return ()

    def video_shares(self, batch: dict[str, Any], parts: int) -> list[VisionShare]:
        """The micro-batch's video frames in `parts` shares, in feature order: share i is what rank i of a
        sequence-parallel group encodes (`splits_sequence` families)."""
        raise NotImplementedError(f"the {self.name} family does not split its frames across ranks")

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Token ids that end an assistant turn in generation (the training template's end-of-turn)."""
        return [tokenizer.eos_token_id]

    def audio_sampling_rate(self, processor: Any) -> int:
        """The rate the processor takes sound at (families that hear)."""
        raise ValueError(f"{self.name} does not hear sound (data.audio must be auto or off for it)")

    def audio_activations(self, audio_config: Any) -> AudioActivations:
        """What the audio tower keeps for backward (families that hear; the memory plan's audio row)."""
        raise ValueError(f"{self.name} does not hear sound: it has no audio tower to plan")

    def encode_with_audio(
        self,
        processor: Any,
        conversation: list[dict[str, Any]],
        chat_template: str,
        processor_kwargs: dict[str, Any],
        for_generation: bool,
        audios: Sequence[Any],
    ) -> dict[str, Any]:
        """The processor's encoding (as apply_chat_template's, with assistant_masks) of a conversation that is heard:
        `audios[i]` is the i-th video's sound at `audio_sampling_rate` (empty: its videos are not heard), and its
        audio parts carry their sound files' samples at that rate."""
        raise ValueError(f"{self.name} does not hear sound (data.audio must be auto or off for it)")


def processor_image_tokens(processor: Any, height: int, width: int) -> int:
    """How many image tokens the processor expands one image of this size into (anyres families: the count depends
    on the size, so ask the processor itself with a blank image rather than redoing its arithmetic)."""
    import numpy as np

    blank = np.zeros((height, width, 3), dtype=np.uint8)
    out = processor(text=processor.image_token, images=[blank], return_tensors="pt")
    return int((out["input_ids"] == processor.image_token_id).sum())


def family_for(model_type: str) -> ModelFamily:
    if model_type not in FAMILIES:
        raise ValueError(f"model type {model_type!r} is not supported yet (supported: {', '.join(sorted(FAMILIES))})")
    module, attribute = FAMILIES[model_type].split(":")
    return getattr(importlib.import_module(module), attribute)


def hearing_families() -> list[str]:
    """The registered families that hear sound (what a refusal of a sound file suggests instead)."""
    return sorted({family_for(model_type).name for model_type in FAMILIES if family_for(model_type).hears})
