"""Qwen2.5-VL (Qwen/Qwen2.5-VL-7B-Instruct): Qwen2 text model with multimodal RoPE, a windowed ViT with 2x2 merge.

Prompt format (ChatML): `<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
<|vision_start|><|video_pad|><|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n`.
The hub template has no generation markers; ours is the same prompt with each answer and its `<|im_end|>` marked.

Visual tensors: dynamic resolution. Each frame is resized to multiples of 28 px within the video processor's
min/max pixels, and two consecutive frames form one temporal patch, so a clip costs
ceil(frames / 2) x (H / 28) x (W / 28) tokens: the count depends on the frame size, which the token counter takes
from the video's header. The processor flattens every clip into (patches, 3 x 2 x 14 x 14) rows with its
`video_grid_thw` (t, h, w), so clips of any frame count and size concatenate row-wise into one batch tensor, their
grids stacked in the same order (images alike: `pixel_values`, `image_grid_thw`). `mm_token_type_ids` (per token:
text 0, image 1, video 2) lets the model place multimodal RoPE positions; it is padded with the text.

Packing: the 3-D multimodal RoPE positions of each sample are the model's own (`get_rope_index`, run on the sample
alone in the collator, so no pass over the batch is left for the device), preceded by a row of plain text positions
0..L-1: transformers' packed format (4, batch, length), whose first row tells the masks (and flash-attention
varlen) where each sample starts.

Time: Qwen2.5-VL spaces the temporal RoPE positions of a clip by `second_per_grid_ts` = seconds per temporal patch.
It comes from the frames' real presentation times (2 x their mean spacing), handed to the processor as video metadata
(`video_metadata`), never from an assumed frame rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from types import MethodType
from typing import Any

import numpy as np
import torch
from transformers.image_utils import SizeDict

from vidtune.data.families import BlankPath, FrameLimits, ModelFamily, VisionShare, even_ranges

# Milliseconds as the metadata's "frame rate": frame `indices` are then presentation times in ms, which both Qwen
# processors turn back into seconds (index / fps) for their time information.
TICKS_PER_S = 1000.0


def chatml_training_template(
    default_system: str | None,
    video_placeholder: str = "<|vision_start|><|video_pad|><|vision_end|>",
    image_placeholder: str = "<|vision_start|><|image_pad|><|vision_end|>",
    audio_placeholder: str = "",
) -> str:
    """The Qwen ChatML prompt with generation markers: each assistant answer and its <|im_end|> carry labels (the
    newline after it does not: the model stops at <|im_end|>). Media stay where their placeholders were (sound
    files: families that hear give theirs; the others refuse them before rendering)."""
    system = (
        "{%- if messages[0]['role'] != 'system' -%}"
        "{{- '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' -}}"
        "{%- endif -%}"
        if default_system
        else ""
    )
    return (
        system + "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{% generation %}"
        "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -}}"
        "{{- '<|im_end|>' -}}"
        "{% endgeneration %}"
        "{{- '\\n' -}}"
        "{%- else -%}"
        "{%- for content in message['content'] -%}"
        "{%- if content['type'] == 'image' -%}{{- '" + image_placeholder + "' -}}"
        "{%- elif content['type'] == 'video' -%}{{- '" + video_placeholder + "' -}}"
        "{%- elif content['type'] == 'audio' -%}{{- '" + audio_placeholder + "' -}}"
        "{%- elif content['type'] == 'text' -%}{{- content['text'] -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def video_metadata(timestamps_s: Sequence[float], duration_s: float) -> dict[str, Any]:
    """The processor's video metadata for frames presented at `timestamps_s` (seconds), in millisecond ticks:
    index / fps gives back each frame's time (Qwen3-VL's timestamp text), and the sampled rate
    len(indices) / total_num_frames x fps gives 1 / the frames' mean spacing (Qwen2.5-VL's second_per_grid_ts)."""
    num_gaps = len(timestamps_s) - 1
    # one frame stands for the whole clip
    spacing_s = (timestamps_s[-1] - timestamps_s[0]) / num_gaps if num_gaps else duration_s
    spacing_s = max(spacing_s, 1 / TICKS_PER_S)
    return {
        "fps": TICKS_PER_S,
        "frames_indices": [round(t * TICKS_PER_S) for t in timestamps_s],
        "total_num_frames": max(1, round(len(timestamps_s) * spacing_s * TICKS_PER_S)),
    }


def set_pixel_bounds(video_processor: Any, limits: FrameLimits) -> None:
    """Per-frame min/max pixels into the processor's `size` (shortest_edge / longest_edge hold pixel counts)."""
    size = video_processor.size
    video_processor.size = SizeDict(
        shortest_edge=limits.min_pixels_per_frame or size["shortest_edge"],
        longest_edge=limits.max_pixels_per_frame or size["longest_edge"],
    )


class QwenTokenCounter:
    """Visual token costs from the processors' own size arithmetic (public `get_num_of_video_patches` /
    `get_number_of_image_patches`): frames and images are resized by min/max pixels, then merged 2x2 (and 2 frames
    per temporal patch)."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.video_merge = processor.video_processor.merge_size**2
        self.image_merge = processor.image_processor.merge_size**2
        self.image_tokens = lru_cache(maxsize=4096)(self._image_tokens)
        self.video_patches = lru_cache(maxsize=4096)(self._video_patches)

    def _video_patches(self, num_frames: int, height: int, width: int) -> int:
        video = self.processor.video_processor
        return int(video.get_num_of_video_patches(num_frames, height, width, self.videos_kwargs(num_frames)))

    def videos_kwargs(self, num_frames: int) -> dict[str, Any]:
        """Qwen2VLVideoProcessor's count ignores its own per-frame cap (transformers 5.24: `resize` applies it,
        `get_num_of_video_patches` does not), so the capped per-frame maximum is handed to it, computed as `resize`
        does."""
        video = self.processor.video_processor
        if not video.cap_pixels_per_frame:
            return {}
        factor = video.patch_size * video.merge_size
        total_pixels = int(video.max_video_tokens * factor * factor * 0.9)
        share = total_pixels * video.temporal_patch_size // num_frames
        max_pixels = max(min(video.size["longest_edge"], share), int(video.size["shortest_edge"] * 1.05))
        return {"size": {"shortest_edge": video.size["shortest_edge"], "longest_edge": max_pixels}}

    def video_tokens(
        self, num_frames: int, height: int, width: int, timestamps_s: Sequence[float] | None = None
    ) -> int:
        return self.video_patches(num_frames, height, width) // self.video_merge

    def _image_tokens(self, height: int, width: int) -> int:
        return int(self.processor.image_processor.get_number_of_image_patches(height, width, {})) // self.image_merge


class RopeIndex:
    """The model's own multimodal RoPE position code (`get_rope_index`) with its config, without its weights: it
    reads nothing of the model but `config` and `get_vision_position_ids`, so the collator runs it in the workers."""

    def __init__(self, model_class: str, config: Any):
        import transformers

        inner = getattr(transformers, model_class.replace("ForConditionalGeneration", "Model"))
        self.config = config
        self.get_rope_index = MethodType(inner.get_rope_index, self)
        self.get_vision_position_ids = MethodType(inner.get_vision_position_ids, self)


def flat_visuals(encoded: dict[str, Any], pixels: str, grid: str) -> dict[str, torch.Tensor]:
    """One kind of media of a sample: its patch rows (all items concatenated) and grids (items, 3)."""
    if encoded.get(pixels) is None or len(encoded[pixels]) == 0:
        return {}
    return {
        pixels: torch.as_tensor(np.asarray(encoded[pixels])),
        grid: torch.as_tensor(np.asarray(encoded[grid]), dtype=torch.long).reshape(-1, 3),
    }


class Qwen2_5_VL(ModelFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"
    chat_template = chatml_training_template("You are a helpful assistant.")
    language_model_prefix = "model.language_model."
    vision_tower_prefix = "model.visual."
    projector_prefix = "model.visual.merger."  # inside the tower's module: the audit counts it as the projector
    language_model_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    vision_tower_lora_targets = ("qkv", "proj", "gate_proj", "up_proj", "down_proj")
    quantization_skip_modules = ("model.visual", "lm_head")  # the merger (projector) sits inside model.visual
    # Cast to the model's dtype when floating; second_per_grid_ts stays float32 (its RoPE positions must not round).
    visual_keys = ("pixel_values_videos", "video_grid_thw", "pixel_values", "image_grid_thw")
    token_keys = ("mm_token_type_ids",)
    time_key: str | None = "second_per_grid_ts"  # per-video time tensor the processor returns, batched with grids
    supports_packing = True  # per-sample multimodal RoPE positions (packed_position_ids)
    splits_sequence = True  # whole temporal patches: the tower attends within one at a time (video_shares)

    def video_shares(self, batch: dict[str, Any], parts: int) -> list[VisionShare]:
        """Whole temporal patches (2 frames each): the tower's window and full attention stay inside one (its
        cu_seqlens restart per temporal patch) and its rotary positions are per row and column, so a sub-grid
        (k, h, w) of a clip encodes to exactly its rows of the whole clip's features."""
        pixels, grids = batch["pixel_values_videos"], batch["video_grid_thw"].tolist()
        units = [(video, h * w) for video, (t, h, w) in enumerate(grids) for _ in range(t)]  # (clip, patches)
        offsets = [0]
        for _, patches in units:
            offsets.append(offsets[-1] + patches)
        shares = []
        for start, end in even_ranges(len(units), parts):
            real = end > start
            start, end = (start, end) if real else (0, 1)
            sub_grids: list[list[int]] = []  # consecutive temporal patches of one clip form one sub-grid
            for video, _ in units[start:end]:
                if sub_grids and sub_grids[-1][3] == video:
                    sub_grids[-1][0] += 1
                else:
                    sub_grids.append([1, grids[video][1], grids[video][2], video])
            inputs = {
                "pixel_values_videos": pixels[offsets[start] : offsets[end]],
                "video_grid_thw": torch.tensor([g[:3] for g in sub_grids], device=batch["video_grid_thw"].device),
            }
            shares.append(VisionShare(inputs, offsets[end] - offsets[start], real))
        return shares

    def token_counter(self, processor: Any) -> QwenTokenCounter:
        return QwenTokenCounter(processor)

    def decode_edge_px(self, processor: Any) -> int | None:
        # The resize depends on both sides and the frame count (min/max pixels); a decoder scaling to a fixed
        # shorter side would change the size the token count was measured on. Frames keep their size.
        return None

    def apply_frame_limits(self, processor: Any, limits: FrameLimits) -> None:
        """Qwen2.5-VL's video processor: `size` bounds each frame; with `cap_pixels_per_frame` each frame also gets
        at most an even share of `max_video_tokens` (of which it spends 90%)."""
        video = processor.video_processor
        set_pixel_bounds(video, limits)
        if limits.max_tokens_per_video is not None:
            video.cap_pixels_per_frame = True
            video.max_video_tokens = math.ceil(limits.max_tokens_per_video / 0.9)

    def video_processor_kwargs(self, timings: Sequence[tuple[Sequence[float], float] | None]) -> dict[str, Any]:
        """Each video's real frame times as the processor's metadata (it would otherwise assume 24 fps)."""
        if any(t is None for t in timings):
            raise ValueError(f"{self.name} needs each video's frame timestamps (pass the decoded Clip, not frames)")
        return {"video_metadata": [video_metadata(*t) for t in timings if t is not None]} if timings else {}

    def example_visuals(self, encoded: dict[str, Any], processor: Any) -> dict[str, torch.Tensor]:
        visuals = {
            **flat_visuals(encoded, "pixel_values_videos", "video_grid_thw"),
            **flat_visuals(encoded, "pixel_values", "image_grid_thw"),
        }
        if "pixel_values_videos" in visuals and self.time_key:
            visuals[self.time_key] = torch.tensor(encoded[self.time_key], dtype=torch.float32).reshape(-1)
        visuals["mm_token_type_ids"] = torch.as_tensor(np.asarray(encoded["mm_token_type_ids"][0]), dtype=torch.long)
        return visuals

    def batch_visuals(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Patch rows and grids concatenated in sample order: the model splits rows by grid and fills the
        placeholders of the batch in that order (mm_token_type_ids is padded by the collator, with the text)."""
        keys = ["pixel_values_videos", "video_grid_thw", "pixel_values", "image_grid_thw"]
        keys += [self.time_key] if self.time_key else []
        batch = {}
        for key in keys:
            parts = [ex[key] for ex in examples if key in ex]
            if parts:
                batch[key] = torch.cat(parts)
        return batch

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        return [int(tokenizer.convert_tokens_to_ids("<|im_end|>"))]

    def packed_position_ids(self, example: dict[str, Any], model_config: Any) -> torch.Tensor:
        """(4, L): text positions 0..L-1, then the (temporal, height, width) positions the model computes for the
        sample alone (its `get_rope_index`, as in an unpacked forward)."""
        input_ids = example["input_ids"][None]
        visuals: dict[str, torch.Tensor] = {k: example[k] for k in ("image_grid_thw", "video_grid_thw") if k in example}
        if self.time_key and self.time_key in example:
            visuals[self.time_key] = example[self.time_key]
        rope, _ = RopeIndex(self.model_class, model_config).get_rope_index(
            input_ids, example["mm_token_type_ids"][None], **visuals
        )
        return torch.cat([torch.arange(input_ids.shape[1])[None], rope[:, 0]])

    def blank_paths(self, model: Any, processor: Any, device: torch.device) -> list[BlankPath]:
        """The forward embeds the tokens, runs the image path, then the video path (both through the one vision
        tower, `model.visual`), then the language model."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        core = base.model
        side = processor.image_processor.patch_size * processor.image_processor.merge_size
        blank = np.zeros((side, side, 3), dtype=np.uint8)
        image = processor.image_processor(images=[blank], return_tensors="pt")
        frames = np.zeros((processor.video_processor.temporal_patch_size, side, side, 3), dtype=np.uint8)
        video = processor.video_processor(videos=[frames], do_sample_frames=False, return_tensors="pt")

        def summed(output: Any) -> torch.Tensor:
            total = sum((f.sum() for f in output.pooler_output), torch.zeros((), device=device))
            for level in getattr(output, "deepstack_features", None) or []:  # Qwen3-VL's side outputs
                total = total + sum((f.sum() for f in level), torch.zeros((), device=device))
            return total

        def run_image() -> torch.Tensor:
            pixels = image["pixel_values"].to(device, dtype=core.visual.dtype)
            return summed(core.get_image_features(pixels, image["image_grid_thw"].to(device), return_dict=True))

        def run_video() -> torch.Tensor:
            pixels = video["pixel_values_videos"].to(device, dtype=core.visual.dtype)
            return summed(core.get_video_features(pixels, video["video_grid_thw"].to(device), return_dict=True))

        return [
            BlankPath("pixel_values", core.get_input_embeddings(), before=False, run=run_image),
            BlankPath("pixel_values_videos", core.language_model, before=True, run=run_video),
        ]


QWEN2_5_VL = Qwen2_5_VL()
