"""A tiny random Qwen3-VL, written as a normal Hugging Face model folder (what Qwen/Qwen3-VL-8B-Instruct is).

    8B:   ViT 16 px patches, 2x2 merge -> one token per 32x32 px per 2 frames; Qwen3 8B text model (interleaved
          mRoPE), DeepStack features from 3 vision layers; `<1.5 seconds>` text before each temporal patch
    tiny: the same patch and merge sizes, a 2-layer Qwen3 text model, DeepStack from 1 vision layer

Frames stay small through the video processor's pixel limits, applied the reference way (qwen-vl-utils' per-frame
cap: `cap_pixels_per_frame`). The tokenizer is tiny_qwen2_5_vl's (Qwen2 byte-level BPE with the ChatML and vision
specials, as Qwen3-VL's own); the chat template is the hub's shape: no default system prompt.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from vidtune.train.demo.tiny_model import save_tiny_model
from vidtune.train.demo.tiny_qwen2_5_vl import TINY_SIZES, build_qwen_tokenizer, token_ids

# Qwen/Qwen3-VL-8B-Instruct's chat template without its tool-calling branches: an optional system turn first,
# media as <|vision_start|><|image_pad|>/<|video_pad|><|vision_end|> where they appear.
HUB_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}{%- if messages[0].content is string %}"
    "{{- messages[0].content }}{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}"
    "{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}{%- if content.type == 'image' or 'image' in content or "
    "'image_url' in content %}{%- set image_count.value = image_count.value + 1 %}{%- if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif -%}<|vision_start|><|image_pad|><|vision_end|>{%- elif content.type == "
    "'video' or 'video' in content %}{%- set video_count.value = video_count.value + 1 %}{%- if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif -%}<|vision_start|><|video_pad|><|vision_end|>{%- elif 'text' in "
    "content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PATCH_PX = 16
TOKEN_PX = 32  # 16 px patches, 2x2 merge


def tiny_config(tokenizer: Qwen2Tokenizer, text_layers: int | None = None) -> Qwen3VLConfig:
    s = TINY_SIZES
    return Qwen3VLConfig(
        text_config={
            "hidden_size": s["text_hidden"],
            "intermediate_size": s["text_intermediate"],
            "num_hidden_layers": text_layers or s["text_layers"],
            "num_attention_heads": s["text_heads"],
            "num_key_value_heads": s["text_kv_heads"],
            "head_dim": 16,
            "vocab_size": -(-len(tokenizer) // 64) * 64,
            "max_position_embeddings": 4096,
            # 8 rotary pairs split over time / height / width, interleaved as in the 8B (24/20/20 of 64)
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": s["vision_layers"],
            "hidden_size": s["vision_hidden"],
            "intermediate_size": s["vision_intermediate"],
            "num_heads": s["vision_heads"],
            "patch_size": PATCH_PX,
            "out_hidden_size": s["text_hidden"],
            "num_position_embeddings": 64,  # an 8x8 grid of learned positions, interpolated to each frame's grid
            "deepstack_visual_indexes": [0],
        },
        **token_ids(tokenizer),
    )


def tiny_processor(tokenizer: Qwen2Tokenizer) -> Qwen3VLProcessor:
    image_pixels = {"shortest_edge": TOKEN_PX * TOKEN_PX * 4, "longest_edge": TOKEN_PX * TOKEN_PX * 16}
    # For videos `longest_edge` is the whole clip's budget; the per-frame cap keeps a frame within 16 tokens.
    video_pixels = {"shortest_edge": TOKEN_PX * TOKEN_PX * 2, "longest_edge": TOKEN_PX * TOKEN_PX * 128}
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size=image_pixels, patch_size=PATCH_PX, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        video_processor=Qwen3VLVideoProcessor(
            size=video_pixels, do_sample_frames=False, cap_pixels_per_frame=True, max_video_tokens=16
        ),
        tokenizer=tokenizer,
        chat_template=HUB_CHAT_TEMPLATE,
    )


def build(out_dir: str | Path, seed: int = 0, extra_words: str = "", text_layers: int | None = None) -> Path:
    """Write the tiny model folder (config, safetensors weights, tokenizer, processor, chat template); return it."""
    tokenizer = build_qwen_tokenizer(extra_words)
    config = tiny_config(tokenizer, text_layers)
    end_tokens = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return save_tiny_model(
        out_dir, Qwen3VLForConditionalGeneration, config, tiny_processor(tokenizer), seed, eos_token_ids=end_tokens
    )
