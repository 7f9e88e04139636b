"""A tiny random Qwen2.5-Omni thinker, written as a normal Hugging Face model folder (the text-out part of
Qwen/Qwen2.5-Omni-7B: no talker, no token2wav).

    7B:   ViT 14 px patches, 2x2 merge -> one token per 28x28 px per 2 frames; Whisper-style audio encoder on 128 mel
          bins at 16 kHz (100 frames/s, two stride-2 steps -> 25 tokens/s); Qwen2 7B text model (mRoPE)
    tiny: the same patch, merge, mel and stride arithmetic; 2-layer audio and vision encoders, 2-layer text model

Token counts follow the real model's arithmetic. The feature extractor pads every sound to `chunk_length` seconds
(the hub's 300 s); the tiny one pads to 30 s, and the family trims the padding before batching anyway. The tokenizer
is a Qwen2 tokenizer with the Omni specials (<|AUDIO|>, <|IMAGE|>, <|VIDEO|>, <|audio_bos|>/<|audio_eos|>,
<|vision_bos|>/<|vision_eos|>) and the hub model's chat template.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    WhisperFeatureExtractor,
)

from vidtune.train.demo.tiny_model import save_tiny_model
from vidtune.train.demo.tiny_qwen2_5_vl import TINY_SIZES, build_qwen_tokenizer, text_and_vision_configs

# Qwen/Qwen2.5-Omni-7B's chat template (its ChatML with a default system prompt), audio as
# <|audio_bos|><|AUDIO|><|audio_eos|>, images and videos as <|vision_bos|><|IMAGE|>/<|VIDEO|><|vision_eos|>.
HUB_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>{% elif content['type'] == "
    "'audio' or 'audio' in content or 'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The Omni tokenizer's named specials (the processor reads them as tokenizer attributes)
OMNI_TOKENS = {
    "audio_token": "<|AUDIO|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}
TINY_AUDIO = {"mel_bins": 128, "layers": 2, "heads": 2, "width": 32, "ffn": 64, "chunk_length_s": 30}


def build_omni_tokenizer(extra_words: str = "") -> Qwen2Tokenizer:
    """The Qwen2 tokenizer with the Omni specials added as tokens, then named (saved and loaded back with them as
    its `extra_special_tokens`, the hub tokenizer_config's form, so the processor finds `tokenizer.audio_token`)."""
    tokenizer = build_qwen_tokenizer(extra_words)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": list(OMNI_TOKENS.values())}, replace_extra_special_tokens=False
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return Qwen2Tokenizer.from_pretrained(folder, extra_special_tokens=OMNI_TOKENS)


def tiny_config(tokenizer: Any, text_layers: int | None = None) -> Qwen2_5OmniThinkerConfig:
    s, a = TINY_SIZES, TINY_AUDIO
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in OMNI_TOKENS.items()}
    return Qwen2_5OmniThinkerConfig(
        **text_and_vision_configs(tokenizer, text_layers),
        audio_config={
            "num_mel_bins": a["mel_bins"],
            "encoder_layers": a["layers"],
            "encoder_attention_heads": a["heads"],
            "encoder_ffn_dim": a["ffn"],
            "d_model": a["width"],
            "output_dim": s["text_hidden"],
        },
        audio_token_index=ids["audio_token"],
        image_token_index=ids["image_token"],
        video_token_index=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        # not declared by the thinker's config class, read by its get_rope_index (the hub config carries them)
        **{"vision_start_token_id": ids["vision_bos_token"], "vision_end_token_id": ids["vision_eos_token"]},
        user_token_id=tokenizer.convert_tokens_to_ids("user"),
    )


def tiny_processor(tokenizer: Any) -> Qwen2_5OmniProcessor:
    pixels = {"shortest_edge": TINY_SIZES["min_pixels"], "longest_edge": TINY_SIZES["max_pixels"]}
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels),
        video_processor=Qwen2VLVideoProcessor(
            size=pixels, temporal_patch_size=2, do_sample_frames=False, cap_pixels_per_frame=False
        ),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=TINY_AUDIO["mel_bins"], chunk_length=TINY_AUDIO["chunk_length_s"], return_attention_mask=True
        ),
        tokenizer=tokenizer,
        chat_template=HUB_CHAT_TEMPLATE,
    )


def scale_audio_convs(model: Any) -> None:
    """He-initialise the audio tower's two input convolutions (std sqrt(2 / fan-in)): transformers draws them at
    std 0.02, which for the tiny 32-wide tower gives conv outputs of std ~0.02 under sinusoidal position embeddings
    of std ~0.7, so after the tower's LayerNorms a 300 Hz and a 2,500 Hz tone came out with cosine 0.9999 (the
    sound drowned by the positions; a trained Whisper encoder's convolutions are not small). He-initialised, the
    two tones' features have cosine ~0.79 and the sound is learnable (benchmarks/omni_tone.py)."""
    tower = model.model.audio_tower
    for conv in (tower.conv1, tower.conv2):
        fan_in = conv.in_channels * conv.kernel_size[0]
        torch.nn.init.normal_(conv.weight, std=(2 / fan_in) ** 0.5)


def build(out_dir: str | Path, seed: int = 0, extra_words: str = "", text_layers: int | None = None) -> Path:
    """Write the tiny thinker folder (config, safetensors weights, tokenizer, processor, chat template); return it."""
    tokenizer = build_omni_tokenizer(extra_words)
    config = tiny_config(tokenizer, text_layers)
    end_tokens = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return save_tiny_model(
        out_dir,
        Qwen2_5OmniThinkerForConditionalGeneration,
        config,
        tiny_processor(tokenizer),
        seed,
        eos_token_ids=end_tokens,
        initialise=scale_audio_convs,
    )
