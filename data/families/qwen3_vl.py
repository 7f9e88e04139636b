"""Qwen3-VL (Qwen/Qwen3-VL-8B-Instruct): Qwen3 text model with interleaved multimodal RoPE, a ViT with 2x2 merge
and DeepStack features. Everything but time and patch size is Qwen2.5-VL's (see qwen2_5_vl.py): the ChatML prompt
(without a default system prompt), flattened patch rows with `video_grid_thw` / `image_grid_thw`,
`mm_token_type_ids`.

Tokens: one per 32x32 px per 2 frames. The video processor's `longest_edge` is the whole clip's pixel budget, and the
reference per-frame cap (`cap_pixels_per_frame`) bounds each frame; its own size arithmetic is what we count with.

Time: the processor writes `<1.5 seconds>` before each temporal patch (the mean time of its 2 frames), from the video
metadata it is given; without metadata it assumes 24 fps and the text (and its token count) is wrong. We hand it
the frames' real presentation times (see `video_metadata`), and count that text the same way: its tokens are part
of the clip's cost in `max_length`.

Qwen3.5 (`qwen3_5`, qwen3_5.py) takes this same processor and vision path: a subclass.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from transformers.image_utils import SizeDict
from transformers.video_utils import VideoMetadata

from vidtune.data.families import FrameLimits
from vidtune.data.families.qwen2_5_vl import Qwen2_5_VL, QwenTokenCounter, chatml_training_template, video_metadata
from vidtune.data.video import VideoError


def check_frame_count(num_frames: int) -> None:
    # Its video processor refuses a 1-frame clip ("t:1 must be larger than temporal_factor:2"); qwen-vl-utils never
    # samples fewer than 4 frames. A too-short clip is then a bad sample, with this reason.
    if num_frames < 2:
        raise VideoError(
            f"{num_frames} frame sampled: Qwen3-VL needs >= 2 frames per video (raise sampling.num_frames)"
        )


class Qwen3TokenCounter(QwenTokenCounter):
    """Video tokens as the processor writes them: per temporal patch, a timestamp text and the patch's tokens."""

    def __init__(self, processor: Any):
        super().__init__(processor)
        self.text_tokens = lru_cache(maxsize=65536)(self._text_tokens)

    def videos_kwargs(self, num_frames: int) -> dict[str, Any]:
        return {}  # Qwen3VLVideoProcessor's count applies its per-frame cap itself

    def _text_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def video_tokens(
        self, num_frames: int, height: int, width: int, timestamps_s: Sequence[float] | None = None
    ) -> int:
        if timestamps_s is None:
            raise ValueError("Qwen3-VL's video token count depends on the frame timestamps; none were given")
        check_frame_count(num_frames)
        temporal = self.processor.video_processor.temporal_patch_size
        num_patches = -(-num_frames // temporal)
        per_patch = self.video_patches(num_frames, height, width) // num_patches // self.video_merge
        # The processor's own expansion of one placeholder, asked with a stand-in grid (its public per-video hook).
        merge = self.processor.video_processor.merge_size
        grid = torch.tensor([[num_patches, merge, per_patch * merge]])
        metadata = VideoMetadata(**video_metadata(timestamps_s, 0.0))
        expansion = self.processor.replace_video_token({"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
        return self.text_tokens(expansion)


class Qwen3_VL(Qwen2_5_VL):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    model_class = "Qwen3VLForConditionalGeneration"
    # The processor (transformers 5.2x) expands only `<|video_pad|>` into `<0.5 seconds><|vision_start|>...
    # <|vision_end|>` per temporal patch; around the hub template's `<|vision_start|><|video_pad|><|vision_end|>`
    # that nests the frames in a second pair of vision tokens, a prompt the reference code (qwen-vl-utils and the
    # 4.57 processor, which replaced the whole triple) never produced. The bare pad expands to the reference form.
    chat_template = chatml_training_template(None, video_placeholder="<|video_pad|>")
    vision_tower_lora_targets = ("qkv", "proj", "linear_fc1", "linear_fc2")
    time_key = None  # time is in the text
    # train.sequence_parallel: the tower's deepstack features feed several language layers; not split yet
    splits_sequence = False

    def video_processor_kwargs(self, timings: Sequence[tuple[Sequence[float], float] | None]) -> dict[str, Any]:
        for timing in timings:
            check_frame_count(len(timing[0]) if timing else 2)
        return super().video_processor_kwargs(timings)

    def apply_frame_limits(self, processor: Any, limits: FrameLimits) -> None:
        """Qwen3-VL's video processor: `size.longest_edge` is the whole clip's pixel budget (over its frames rounded
        up to an even count) and `max_video_tokens` the per-frame ceiling of its per-frame cap."""
        video = processor.video_processor
        token_px = video.patch_size * video.merge_size
        if limits.min_pixels_per_frame is not None:
            video.size = SizeDict(shortest_edge=limits.min_pixels_per_frame, longest_edge=video.size["longest_edge"])
        if limits.max_tokens_per_video is not None:
            budget_px = limits.max_tokens_per_video * token_px * token_px * video.temporal_patch_size
            video.size = SizeDict(shortest_edge=video.size["shortest_edge"], longest_edge=budget_px)
        if limits.max_pixels_per_frame is not None:
            video.cap_pixels_per_frame = True
            video.max_video_tokens = limits.max_pixels_per_frame // (token_px * token_px)

    def token_counter(self, processor: Any) -> Qwen3TokenCounter:
        return Qwen3TokenCounter(processor)


QWEN3_VL = Qwen3_VL()
