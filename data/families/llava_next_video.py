"""LLaVA-NeXT-Video (llava-hf/LLaVA-NeXT-Video-7B-hf): vicuna-7b-v1.5 text model, CLIP-L/14-336 vision tower.

Prompt format (vicuna v1): `{system} USER: <video>\\n{prompt} ASSISTANT: {answer}</s>USER: ...`.
The hub model's own template renders the same prompt, but ends assistant turns with a space instead of `</s>`:
trained on it a model never learns to stop, and its assistant mask swallows the next `USER:` token. It also moves
every image and video of a turn ahead of its text; ours keeps each where its placeholder was.
(The 7B-32K variant is Mistral `[INST]`, the 34B is Yi `<|im_start|>`: they would be families of their own.)

Visual tensors: every frame is resized and cropped to the processor's crop size, so a clip costs frames x a fixed
number of tokens (144 for the 7B). The model fills `<video>` token positions with pooled frame features in order,
so all videos of a batch travel as one (1, sum of frames, C, H, W) tensor: clips with different frame counts mix
freely, and a text-only sample adds no frames. Images travel the same way: every image's anyres patches stacked
into one (sum of patches, C, H, W) tensor, which the model splits back per image from `image_sizes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch

from vidtune.data.families import BlankPath, ModelFamily, VisionShare, even_ranges, processor_image_tokens

VICUNA_TRAINING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}"
    "{{- eos_token -}}"
    "{% endgeneration %}"
    "{%- else -%}"
    # In order: media go where their placeholders were ("First clip: <video> Second clip: <video> Which ...").
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif content['type'] == 'video' -%}{{ '<video>\\n' }}"
    "{%- elif content['type'] == 'text' -%}{{ content['text'] + ' ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


class LlavaTokenCounter:
    """Token costs asked of the processor itself (public call, blank pixels), so they match its expansion exactly."""

    def __init__(self, processor: Any):
        self.processor = processor
        frame = np.zeros((1, 64, 64, 3), dtype=np.uint8)  # any size: frames are resized to the crop size
        out = processor(text=processor.video_token, videos=[frame], return_tensors="pt")
        self.tokens_per_frame = int((out["input_ids"] == processor.video_token_id).sum())
        self.image_tokens = lru_cache(maxsize=4096)(self._image_tokens)

    def video_tokens(
        self, num_frames: int, height: int, width: int, timestamps_s: Sequence[float] | None = None
    ) -> int:
        return num_frames * self.tokens_per_frame

    def _image_tokens(self, height: int, width: int) -> int:
        # anyres: the count depends on the image's size (grid pinpoint, unpadding), so ask once per size.
        return processor_image_tokens(self.processor, height, width)


class LlavaNextVideo(ModelFamily):
    name = "llava_next_video"
    model_types = ("llava_next_video",)
    model_class = "LlavaNextVideoForConditionalGeneration"
    chat_template = VICUNA_TRAINING_TEMPLATE
    language_model_prefix = "model.language_model."
    vision_tower_prefix = "model.vision_tower."
    projector_prefix = "model.multi_modal_projector."
    language_model_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    vision_tower_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    quantization_skip_modules = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    visual_keys = ("pixel_values_videos", "pixel_values", "image_sizes")
    # Video frames are resized and cropped to one size, so they can stay uint8 until the device. (Images keep the
    # processor's float pixels: anyres pads patches after normalising.)
    raw_pixel_processors: ClassVar[dict[str, str]] = {"pixel_values_videos": "video_processor"}
    supports_packing = True  # plain 1-D RoPE positions
    splits_sequence = True  # frames are independent in the tower (video_shares)

    def token_counter(self, processor: Any) -> LlavaTokenCounter:
        return LlavaTokenCounter(processor)

    def decode_edge_px(self, processor: Any) -> int | None:
        size = processor.video_processor.size
        edge = getattr(size, "shortest_edge", None)
        if edge is None and getattr(size, "height", None):
            edge = min(size.height, size.width)
        return int(edge) if edge else None

    def example_visuals(self, encoded: dict[str, Any], processor: Any) -> dict[str, torch.Tensor]:
        """pixel_values_videos (frames of all clips, C, H, W); pixel_values (patches of all images, C, H, W) and
        image_sizes (images, 2), media concatenated in conversation order, the order the model fills them.

        The image processor pads every image's anyres patches to the largest count among the sample's images; the
        model trims that padding only from a 5-D per-image tensor, so patches are trimmed here before they are
        concatenated (else two images of different shapes fail: "split_with_sizes ... got [4, 5]")."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        visuals = {}
        if encoded.get("pixel_values_videos"):
            visuals["pixel_values_videos"] = torch.cat([torch.as_tensor(v) for v in encoded["pixel_values_videos"]])
        if encoded.get("pixel_values"):
            grid = processor.image_processor.image_grid_pinpoints
            px = processor.image_processor.crop_size["height"]
            sizes = [list(s) for s in encoded["image_sizes"]]
            patches = [
                torch.as_tensor(p)[: image_size_to_num_patches(size, grid, px)]
                for p, size in zip(encoded["pixel_values"], sizes, strict=True)
            ]
            visuals["pixel_values"] = torch.cat(patches)
            visuals["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
        return visuals

    def raw_pixel_kwargs(self) -> dict[str, Any]:
        return {"videos_kwargs": {"do_rescale": False, "do_normalize": False}}

    def batch_visuals(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {}
        videos = [ex["pixel_values_videos"] for ex in examples if "pixel_values_videos" in ex]
        if videos:
            batch["pixel_values_videos"] = torch.cat(videos).unsqueeze(0)  # (1, sum of frames, C, H, W)
        if any("pixel_values" in ex for ex in examples):
            batch["pixel_values"] = torch.cat([ex["pixel_values"] for ex in examples if "pixel_values" in ex])
            batch["image_sizes"] = torch.cat([ex["image_sizes"] for ex in examples if "image_sizes" in ex])
        return batch

    def video_shares(self, batch: dict[str, Any], parts: int) -> list[VisionShare]:
        """Whole frames: each frame's features (CLIP, 2x2 pooling, projector) depend on that frame alone."""
        frames = batch["pixel_values_videos"]  # (1, sum of frames, C, H, W)
        shares = []
        for start, end in even_ranges(frames.shape[1], parts):
            real = end > start
            chunk = frames[:, start:end] if real else frames[:, :1]
            shares.append(VisionShare({"pixel_values_videos": chunk}, chunk.shape[1], real))
        return shares

    def unused_module_prefixes(self, config: Any) -> tuple[str, ...]:
        """Image features come from hidden state `vision_feature_layer` (-2 for the 7B: the output of CLIP's
        second-to-last layer), so the layers after it run but never reach the loss."""
        num_layers = config.vision_config.num_hidden_layers
        feature_layers = config.vision_feature_layer
        feature_layers = feature_layers if isinstance(feature_layers, list) else [feature_layers]
        # hidden_states[k] is the output after k layers (hidden_states[0]: the embeddings)
        layers_read = max(k if k >= 0 else num_layers + 1 + k for k in feature_layers)
        encoder = f"{self.vision_tower_prefix}encoder.layers."
        unused = tuple(f"{encoder}{i}." for i in range(layers_read, num_layers))
        return (*unused, f"{self.vision_tower_prefix}post_layernorm") if unused else ()

    def blank_paths(self, model: Any, processor: Any, device: torch.device) -> list[BlankPath]:
        """The forward embeds the tokens, runs the image path (vision tower -> projector), the video path (vision
        tower -> pooling -> projector), then the language model."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        core = base.model  # the LlavaNextVideoModel inside ...ForConditionalGeneration
        px = processor.video_processor.crop_size["height"]
        blank = np.zeros((px, px, 3), dtype=np.uint8)
        image = processor.image_processor(images=[blank], return_tensors="pt")
        video = processor.video_processor(videos=[blank[None]], return_tensors="pt")["pixel_values_videos"]

        def pixels(tensor: torch.Tensor) -> torch.Tensor:  # the tower's dtype when it runs (after any wrapping)
            return tensor.to(device, dtype=core.vision_tower.dtype)

        def run_image() -> torch.Tensor:  # image["pixel_values"][0]: (patches, C, H, W); image_sizes: (1, 2)
            features = core.get_image_features(pixels(image["pixel_values"][0]), image["image_sizes"].to(device))
            return sum((f.sum() for f in features.pooler_output), torch.zeros((), device=device))

        def run_video() -> torch.Tensor:
            return core.get_video_features(pixels(video)).pooler_output.sum()

        return [
            # blank image path: right after the embedding lookup, where the real one starts ...
            BlankPath("pixel_values", core.get_input_embeddings(), before=False, run=run_image),
            # ... blank video path: before the language model (ahead of DeepSpeed's own hook, so its trace records it
            # first).
            BlankPath("pixel_values_videos", core.language_model, before=True, run=run_video),
        ]


LLAVA_NEXT_VIDEO = LlavaNextVideo()
