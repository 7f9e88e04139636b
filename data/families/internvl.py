"""InternVL3 / InternVL3.5 in transformers' own format (OpenGVLab/InternVL3_5-8B-HF): InternViT vision tower, pixel
shuffle + MLP projector, a Qwen3 (3.5) or Qwen2.5 (3) text model.

Prompt format (the hub template, as transformers' conversion script writes it): ChatML without a default system
prompt, `<IMG_CONTEXT>\\n` for each image and `<video>\\n` for each video where they appear, text as written:
`<|im_start|>user\\n<video>\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n`. Ours is the same
prompt with each answer and its `<|im_end|>` marked for labels (the newline after it is not: the model stops there).

Visual tokens: to the model every video frame is one image tile. The video processor squashes each frame to the
tile size (448 px), the tower gives 32x32 patches, pixel shuffle 0.5 leaves 16x16 = 256 tokens; the processor writes
`Frame{i}: <img>` + those tokens + `</img>` per frame, lines joined by newlines. An image is tiled (up to
`max_patches` tiles of the best-fitting grid, plus a thumbnail) into `<img>` + 256 x tiles tokens + `</img>`. The
counts below are the processor's own (its per-video expansion hook and the image processor's tile arithmetic).

Batching: the model takes one `pixel_values` (tiles and frames, C, H, W) and fills the `<IMG_CONTEXT>` tokens in
order, so every sample's tiles and frames concatenate in conversation order, across samples too: clips of any frame
count, images and text-only samples share a batch with no extra key. One vision path, so one blank path for ZeRO-3.

The processor (transformers 5.25) stacks a sample's videos into one tensor before merging them with the images:
it needs `return_tensors="pt"` for videos, and a sample's videos must have equal frame counts (`encode`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from vidtune.data.families import BlankPath, ModelFamily
from vidtune.data.families.qwen2_5_vl import chatml_training_template
from vidtune.data.video import VideoError

END_OF_TURN = "<|im_end|>"


class InternVLTokenCounter:
    """Tokens a `<video>` or `<IMG_CONTEXT>` placeholder expands into (the whole expansion: frame labels, `<img>`,
    `</img>` and newlines included), from the processor's own arithmetic."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.frames_tokens = lru_cache(maxsize=1024)(self._frames_tokens)
        self.image_tokens = lru_cache(maxsize=4096)(self._image_tokens)

    def _frames_tokens(self, num_frames: int) -> int:
        # its public per-video hook reads only the frame count of the processed video
        stand_in = {"pixel_values_videos": [torch.empty(num_frames, 0)]}
        expansion = self.processor.replace_video_token(stand_in, 0)
        return len(self.processor.tokenizer(expansion, add_special_tokens=False)["input_ids"])

    def video_tokens(
        self, num_frames: int, height: int, width: int, timestamps_s: Sequence[float] | None = None
    ) -> int:
        return self.frames_tokens(num_frames)

    def _image_tokens(self, height: int, width: int) -> int:
        # the processor's default image kwargs (crop_to_patches=True: tiles + thumbnail) over the image processor's
        images_kwargs = dict(getattr(self.processor, "images_kwargs", {}))
        tiles = self.processor.image_processor.get_number_of_image_patches(height, width, images_kwargs)
        return int(tiles) * self.processor.image_seq_length + 2  # + <img> and </img>


class InternVL(ModelFamily):
    name = "internvl"
    model_types = ("internvl",)
    model_class = "InternVLForConditionalGeneration"
    chat_template = chatml_training_template(None, video_placeholder="<video>\\n", image_placeholder="<IMG_CONTEXT>\\n")
    language_model_prefix = "model.language_model."
    vision_tower_prefix = "model.vision_tower."
    projector_prefix = "model.multi_modal_projector."
    language_model_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    vision_tower_lora_targets = ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")
    quantization_skip_modules = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    visual_keys = ("pixel_values",)
    supports_packing = True  # plain 1-D RoPE positions; tiles and frames fill their tokens in order either way

    def token_counter(self, processor: Any) -> InternVLTokenCounter:
        return InternVLTokenCounter(processor)

    def video_token_id(self, processor: Any) -> int:
        return int(processor.image_token_id)  # frames are image tiles to the model: `<IMG_CONTEXT>` tokens

    def decode_edge_px(self, processor: Any) -> int | None:
        size = processor.video_processor.size  # {"height": 448, "width": 448}: frames are squashed to a square
        return int(min(size.height, size.width))

    def encode(self, processor: Any, conversation: list[dict[str, Any]], **kwargs: Any) -> Any:
        """The processor's own apply_chat_template, with tensors out: InternVLProcessor reads the stacked videos'
        shape to merge them with the images, so a sample's videos go as one tensor (equal frame counts)."""
        frame_counts = [
            len(part["video"]) for msg in conversation for part in msg["content"] if part["type"] == "video"
        ]
        if len(set(frame_counts)) > 1:
            raise VideoError(
                f"videos of {', '.join(map(str, frame_counts))} frames in one sample: InternVL's processor takes a "
                "sample's videos as one tensor (sample them to one frame count, e.g. data.sampling.num_frames)"
            )
        encoded = processor.apply_chat_template(conversation, **{**kwargs, "return_tensors": "pt"})
        for key in ("input_ids", "attention_mask", "assistant_masks"):
            if key in encoded:
                encoded[key] = encoded[key].tolist()
        return encoded

    def example_visuals(self, encoded: dict[str, Any], processor: Any) -> dict[str, torch.Tensor]:
        """pixel_values: the sample's image tiles and video frames (tiles + frames, C, H, W) in conversation order."""
        pixels = encoded.get("pixel_values")
        if pixels is None or len(pixels) == 0:
            return {}
        return {"pixel_values": torch.as_tensor(np.asarray(pixels))}

    def batch_visuals(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels = [ex["pixel_values"] for ex in examples if "pixel_values" in ex]
        return {"pixel_values": torch.cat(pixels)} if pixels else {}

    def blank_paths(self, model: Any, processor: Any, device: torch.device) -> list[BlankPath]:
        """The forward embeds the tokens, runs the vision tower + pixel shuffle + projector on every tile and frame,
        then the language model: one path, run on one blank frame where a rank has none."""
        core = _core(model)
        size = processor.video_processor.size
        blank = np.zeros((size.height, size.width, 3), dtype=np.uint8)
        frame = processor.video_processor(videos=[blank[None]], return_tensors="pt")["pixel_values_videos"][0]

        def run() -> torch.Tensor:
            pixels = frame.to(device, dtype=core.vision_tower.dtype)
            return core.get_image_features(pixels).pooler_output.sum()

        return [BlankPath("pixel_values", core.language_model, before=True, run=run)]

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        return list(dict.fromkeys([end_of_turn, tokenizer.eos_token_id]))


def _core(model: Any) -> Any:
    """The InternVLModel inside a (PEFT-wrapped or bare) InternVLForConditionalGeneration."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


INTERNVL = InternVL()
