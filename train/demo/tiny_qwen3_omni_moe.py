"""A tiny random Qwen3-Omni-MoE thinker, written as a normal Hugging Face model folder (the text-out part of
Qwen/Qwen3-Omni-30B-A3B-Instruct: no talker, no code2wav).

    30B-A3B: ViT 16 px patches, 2x2 merge (one token per 32x32 px per 2 frames) with DeepStack features; audio
             encoder on 128 mel bins at 16 kHz (100 frames/s; three stride-2 convolutions per 100-frame window ->
             13 tokens per window); a 48-layer MoE text model, 128 experts, 8 active per token
    tiny:    the same patch, merge, mel and window arithmetic; 2-layer audio and vision encoders, a 2-layer MoE text
             model with 4 experts, 2 active per token

Token counts follow the real model's arithmetic. The tokenizer is a Qwen2 tokenizer with the Qwen3-Omni specials
(<|audio_pad|>, <|image_pad|>, <|video_pad|>, <|audio_start|>/<|audio_end|>, <|vision_start|>/<|vision_end|>) and
the hub model's chat template shape (ChatML, no default system prompt).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import (
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3OmniMoeProcessor,
    Qwen3OmniMoeThinkerConfig,
    Qwen3OmniMoeThinkerForConditionalGeneration,
    WhisperFeatureExtractor,
)

from vidtune.train.demo.tiny_model import save_tiny_model
from vidtune.train.demo.tiny_qwen2_5_vl import TINY_SIZES, build_qwen_tokenizer

# Qwen/Qwen3-Omni-30B-A3B-Instruct's chat template without its tool-calling branches: ChatML without a default
# system prompt; audio as <|audio_start|><|audio_pad|><|audio_end|>, images and videos as
# <|vision_start|><|image_pad|>/<|video_pad|><|vision_end|>.
HUB_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}{%- if message.content is string %}"
    "{{- message.content }}{%- else %}{%- for content in message.content %}{%- if content.type == 'image' or "
    "'image' in content or 'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>{%- elif "
    "content.type == 'audio' or 'audio' in content or 'audio_url' in content %}<|audio_start|><|audio_pad|>"
    "<|audio_end|>{%- elif content.type == 'video' or 'video' in content %}<|vision_start|><|video_pad|>"
    "<|vision_end|>{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The Qwen3-Omni tokenizer's named specials (the processor reads them as tokenizer attributes)
OMNI_TOKENS = {
    "audio_token": "<|audio_pad|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}
PATCH_PX = 16
TOKEN_PX = 32  # 16 px patches, 2x2 merge
TINY_MOE = {"experts": 4, "active": 2, "expert_intermediate": 32}
TINY_AUDIO = {"mel_bins": 128, "layers": 2, "heads": 2, "width": 32, "ffn": 64, "downsample": 8, "chunk_length_s": 30}


def tiny_config(tokenizer: Any, text_layers: int | None = None) -> Qwen3OmniMoeThinkerConfig:
    s, a, m = TINY_SIZES, TINY_AUDIO, TINY_MOE
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in OMNI_TOKENS.items()}
    return Qwen3OmniMoeThinkerConfig(
        text_config={
            "hidden_size": s["text_hidden"],
            "intermediate_size": s["text_intermediate"],
            "num_hidden_layers": text_layers or s["text_layers"],
            "num_attention_heads": s["text_heads"],
            "num_key_value_heads": s["text_kv_heads"],
            "head_dim": 16,
            "num_experts": m["experts"],
            "num_experts_per_tok": m["active"],
            "moe_intermediate_size": m["expert_intermediate"],
            "vocab_size": -(-len(tokenizer) // 64) * 64,
            "max_position_embeddings": 4096,
            # 8 rotary pairs split over time / height / width, interleaved as in the 30B (24/20/20 of 64)
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
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
        audio_config={
            "num_mel_bins": a["mel_bins"],
            "encoder_layers": a["layers"],
            "encoder_attention_heads": a["heads"],
            "encoder_ffn_dim": a["ffn"],
            "d_model": a["width"],
            "downsample_hidden_size": a["downsample"],
            "output_dim": s["text_hidden"],
        },
        audio_token_id=ids["audio_token"],
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        position_id_per_seconds=13,  # the hub config's (and the processor's): one position per audio token
        # not declared by the thinker's config class, read by its get_rope_index (the hub config carries them)
        **{
            "audio_end_token_id": ids["audio_eos_token"],
            "vision_start_token_id": ids["vision_bos_token"],
            "vision_end_token_id": ids["vision_eos_token"],
        },
        user_token_id=tokenizer.convert_tokens_to_ids("user"),
    )


def tiny_processor(tokenizer: Any) -> Qwen3OmniMoeProcessor:
    pixels = {"shortest_edge": TOKEN_PX * TOKEN_PX * 4, "longest_edge": TOKEN_PX * TOKEN_PX * 16}
    return Qwen3OmniMoeProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, patch_size=PATCH_PX),
        video_processor=Qwen2VLVideoProcessor(
            size=pixels, patch_size=PATCH_PX, temporal_patch_size=2, do_sample_frames=False, cap_pixels_per_frame=False
        ),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=TINY_AUDIO["mel_bins"], chunk_length=TINY_AUDIO["chunk_length_s"], return_attention_mask=True
        ),
        tokenizer=tokenizer,
        chat_template=HUB_CHAT_TEMPLATE,
    )


def build(out_dir: str | Path, seed: int = 0, extra_words: str = "", text_layers: int | None = None) -> Path:
    """Write the tiny thinker folder (config, safetensors weights, tokenizer, processor, chat template); return it."""
    tokenizer = build_qwen_tokenizer(extra_words, named_tokens=OMNI_TOKENS)
    config = tiny_config(tokenizer, text_layers)
    end_tokens = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return save_tiny_model(
        out_dir,
        Qwen3OmniMoeThinkerForConditionalGeneration,
        config,
        tiny_processor(tokenizer),
        seed,
        eos_token_ids=end_tokens,
    )
