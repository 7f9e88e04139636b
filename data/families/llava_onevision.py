"""LLaVA-OneVision (llava-hf/llava-onevision-qwen2-7b-ov-hf): SigLIP so400m vision tower, Qwen2-7B language model.

Prompt format (the hub template): `<|im_start|>user <video>\\n{prompt}<|im_end|><|im_start|>assistant\\n{answer}
<|im_end|>` -- media after `user `, each text after a newline, nothing between turns. Ours renders prompts exactly
as the hub's does (media first, the usual case) and differs where training needs it: media stay where their
placeholders were (two media in a row get a newline between them), and an assistant turn in the history opens
like the generation prompt (`assistant\\n`; the hub renders `assistant \\n` there, a prefix generation never sees),
its answer and `<|im_end|>` marked for labels.

Visual tokens: every frame is resized to the processor's square size (384 px: 27x27 SigLIP patches), pooled
bilinearly to ceil(27/2)^2 = 196 tokens, and each video ends with one newline token: frames x 196 + 1. Images are
anyres (a base tile plus up to 9 tiles, unpadded, a newline per row), or one base tile + newline each when a sample
holds several images (`batch_num_images` tells the model which).

Batching: the model runs a (videos, frames, C, H, W) tensor and appends one newline per row, so videos of equal
length stack natively. Videos of different lengths cannot stack: they travel as one (1, sum of frames, C, H, W) row,
and `prepare_model` teaches the loaded model to put each video's newline after its own frames, found from each
video's token run (one vision-tower call either way, so ZeRO-3 ranks stay in lockstep; no extra batch key).
`generate` encodes the pixels before its first forward, so the model's `generate` takes the runs from its input_ids
first: a generation batch may mix clip lengths too.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from vidtune.data.families import BlankPath, ModelFamily, processor_image_tokens

END_OF_TURN = "<|im_end|>"

ONEVISION_TRAINING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '\\n' -}}"
    "{% generation %}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -}}"
    "{{- '<|im_end|>' -}}"
    "{% endgeneration %}"
    "{%- else -%}"
    "{{- ' ' -}}"
    "{%- for content in message['content'] -%}"
    # A newline before every text (as the hub's) and between two media (so two videos never form one token run).
    "{%- if content['type'] == 'text' or (not loop.first and loop.previtem['type'] != 'text') -%}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- if content['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif content['type'] == 'video' -%}{{ '<video>' }}"
    "{%- elif content['type'] == 'text' -%}{{ content['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


class OnevisionTokenCounter:
    """Token costs asked of the processor itself (public call, blank pixels), so they match its expansion exactly."""

    def __init__(self, processor: Any):
        self.processor = processor
        one, two = (self._video_tokens(n) for n in (1, 2))
        self.tokens_per_frame = two - one
        self.tokens_per_video = one - self.tokens_per_frame  # the newline after each video's frames
        self.image_tokens = lru_cache(maxsize=4096)(self._image_tokens)

    def _video_tokens(self, num_frames: int) -> int:
        frames = np.zeros((num_frames, 32, 32, 3), dtype=np.uint8)  # any size: frames are resized to a square
        out = self.processor(text=self.processor.video_token, videos=[frames], return_tensors="pt")
        return int((out["input_ids"] == self.processor.video_token_id).sum())

    def video_tokens(
        self, num_frames: int, height: int, width: int, timestamps_s: Sequence[float] | None = None
    ) -> int:
        return num_frames * self.tokens_per_frame + self.tokens_per_video

    def _image_tokens(self, height: int, width: int) -> int:
        """An image alone in its sample (anyres: the count depends on its size). In a sample with several images
        each costs only a base tile + newline, fewer: counting the anyres cost there overestimates, which may drop
        a sample that would fit but never lets one through that does not."""
        return processor_image_tokens(self.processor, height, width)


class LlavaOnevision(ModelFamily):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"
    chat_template = ONEVISION_TRAINING_TEMPLATE
    language_model_prefix = "model.language_model."
    vision_tower_prefix = "model.vision_tower."
    projector_prefix = "model.multi_modal_projector."
    language_model_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    vision_tower_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    quantization_skip_modules = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    visual_keys = ("pixel_values_videos", "pixel_values", "image_sizes", "batch_num_images")
    supports_packing = True  # plain 1-D RoPE positions; prepare_model finds each video's frames by its token run

    def token_counter(self, processor: Any) -> OnevisionTokenCounter:
        return OnevisionTokenCounter(processor)

    def decode_edge_px(self, processor: Any) -> int | None:
        size = processor.video_processor.size  # {"height": 384, "width": 384}: frames are squashed to a square
        edge = getattr(size, "shortest_edge", None) or min(size.height or 0, size.width or 0)
        return int(edge) if edge else None

    def example_visuals(self, encoded: dict[str, Any], processor: Any) -> dict[str, torch.Tensor]:
        """pixel_values_videos (frames of all clips, C, H, W) with video_num_frames (clips,); pixel_values (tiles of
        all images, C, H, W), image_sizes (images, 2), batch_num_images (1,); media in conversation order."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        visuals = {}
        if encoded.get("pixel_values_videos"):
            videos = [torch.as_tensor(np.asarray(v)) for v in encoded["pixel_values_videos"]]
            visuals["pixel_values_videos"] = torch.cat(videos)
            visuals["video_num_frames"] = torch.tensor([len(v) for v in videos], dtype=torch.long)
        if encoded.get("pixel_values"):
            sizes = [list(s) for s in encoded["image_sizes"]]
            grid, px = processor.image_processor.image_grid_pinpoints, processor.image_processor.size.height
            # The processor pads each image's tiles to the sample's largest count; the model splits a 4-D tensor by
            # each image's own count (anyres alone, one base tile among several), so only those travel.
            alone = len(sizes) == 1
            tiles = [
                torch.as_tensor(np.asarray(p))[: image_size_to_num_patches(size, grid, px) if alone else 1]
                for p, size in zip(encoded["pixel_values"], sizes, strict=True)
            ]
            visuals["pixel_values"] = torch.cat(tiles)
            visuals["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
            visuals["batch_num_images"] = torch.tensor([len(sizes)], dtype=torch.long)
        return visuals

    def batch_visuals(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {}
        videos = [ex for ex in examples if "pixel_values_videos" in ex]
        if videos:
            frames = torch.cat([ex["pixel_values_videos"] for ex in videos])
            num_frames = torch.cat([ex["video_num_frames"] for ex in videos])
            if bool((num_frames == num_frames[0]).all()):  # the model's own layout: one row per video
                batch["pixel_values_videos"] = frames.view(len(num_frames), int(num_frames[0]), *frames.shape[1:])
            else:  # one row of all frames; prepare_model's hook splits it back per video
                batch["pixel_values_videos"] = frames.unsqueeze(0)
        images = [ex for ex in examples if "pixel_values" in ex]
        if images:
            batch["pixel_values"] = torch.cat([ex["pixel_values"] for ex in images])
            batch["image_sizes"] = torch.cat([ex["image_sizes"] for ex in images])
            batch["batch_num_images"] = torch.cat([ex["batch_num_images"] for ex in images])
        return batch

    def prepare_model(self, model: Any) -> None:
        """Let the loaded model take videos of different lengths as one row of frames, in its forward and its
        `generate`: each video's token run in `input_ids` (frames x tokens per frame + its newline) says where its
        frames end."""
        core = _core(model)
        if getattr(core, "_vidtune_video_runs", False):
            return
        pending: dict[str, list[int] | None] = {"runs": None}
        plain_video_features = core.get_video_features

        def find_runs(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
            videos, input_ids = kwargs.get("pixel_values_videos"), kwargs.get("input_ids")
            runs = None
            if videos is not None and input_ids is not None and videos.shape[0] == 1:
                runs = video_token_runs(input_ids, core.config.video_token_id)
            pending["runs"] = runs if runs and len(runs) > 1 else None

        def video_features(pixel_values_videos: torch.Tensor, **kwargs: Any) -> Any:
            """All frames through the tower at once (one call, as on every rank), then each video's frames
            followed by the newline, as separate rows would give."""
            runs, pending["runs"] = pending["runs"], None
            out = plain_video_features(pixel_values_videos, **kwargs)
            features, newline = out.pooler_output[0, :-1], out.pooler_output[0, -1:]
            if runs is None or sum(runs) - len(runs) != features.shape[0]:
                return out  # one video, or a count the model's own check will report
            pieces = [part for video in features.split([n - 1 for n in runs]) for part in (video, newline)]
            out.pooler_output = torch.cat(pieces)[None]
            return out

        top = model.get_base_model() if hasattr(model, "get_base_model") else model
        plain_generate = top.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            """generate() encodes the pixels before any forward, without input_ids: the runs come from its
            input_ids here, for that first encoding."""
            find_runs(core, (), {"input_ids": args[0] if args else kwargs.get("input_ids"), **kwargs})
            try:
                return plain_generate(*args, **kwargs)
            finally:
                pending["runs"] = None

        core.register_forward_pre_hook(find_runs, with_kwargs=True)
        core.get_video_features = video_features
        top.generate = generate
        core._vidtune_video_runs = True

    def unused_module_prefixes(self, config: Any) -> tuple[str, ...]:
        """Features come from hidden state `vision_feature_layer` (-1 for the 7B: the last kept SigLIP layer's
        output, before post_layernorm), so post_layernorm and any later layers run but never reach the loss."""
        num_layers = config.vision_config.num_hidden_layers
        feature_layers = config.vision_feature_layer
        feature_layers = feature_layers if isinstance(feature_layers, list) else [feature_layers]
        layers_read = max(k if k >= 0 else num_layers + 1 + k for k in feature_layers)
        encoder = f"{self.vision_tower_prefix}encoder.layers."
        unused = tuple(f"{encoder}{i}." for i in range(layers_read, num_layers))
        head = (f"{self.vision_tower_prefix}head",) if getattr(config.vision_config, "vision_use_head", False) else ()
        return (*unused, f"{self.vision_tower_prefix}post_layernorm", *head)

    def blank_paths(self, model: Any, processor: Any, device: torch.device) -> list[BlankPath]:
        """The forward embeds the tokens, runs the image path (vision tower -> projector -> anyres packing), the
        video path (vision tower -> projector -> pooling), then the language model."""
        core = _core(model)
        size = processor.video_processor.size
        blank = np.zeros((size.height, size.width, 3), dtype=np.uint8)
        image = processor.image_processor(images=[blank], return_tensors="pt")
        video = processor.video_processor(videos=[blank[None]], return_tensors="pt")["pixel_values_videos"]

        def pixels(tensor: torch.Tensor) -> torch.Tensor:  # the tower's dtype when it runs (after any wrapping)
            return tensor.to(device, dtype=core.vision_tower.dtype)

        def run_image() -> torch.Tensor:  # image["pixel_values"][0]: (tiles, C, H, W); image_sizes: (1, 2)
            features = core.get_image_features(
                pixels(image["pixel_values"][0]),
                image["image_sizes"].to(device),
                batch_num_images=torch.tensor([1], device=device),
            )
            return sum((f.sum() for f in features.pooler_output), torch.zeros((), device=device))

        def run_video() -> torch.Tensor:
            return core.get_video_features(pixels(video)).pooler_output.sum()

        return [
            BlankPath("pixel_values", core.get_input_embeddings(), before=False, run=run_image),
            BlankPath("pixel_values_videos", core.language_model, before=True, run=run_video),
        ]

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        return list(dict.fromkeys([end_of_turn, tokenizer.eos_token_id]))


def video_token_runs(input_ids: torch.Tensor, video_token_id: int) -> list[int]:
    """Lengths of the runs of video tokens in (batch, length) ids, in the order the model fills them."""
    lengths: list[int] = []
    for row in input_ids == video_token_id:
        positions = row.nonzero().flatten()
        if len(positions):
            breaks = ((positions[1:] - positions[:-1]) > 1).nonzero().flatten() + 1
            lengths += [len(run) for run in positions.tensor_split(breaks.tolist())]
    return lengths


def _core(model: Any) -> Any:
    """The LlavaOnevisionModel inside a (PEFT-wrapped or bare) ...ForConditionalGeneration."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


LLAVA_ONEVISION = LlavaOnevision()
