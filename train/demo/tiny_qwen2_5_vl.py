"""A tiny random Qwen2.5-VL, written as a normal Hugging Face model folder (what Qwen/Qwen2.5-VL-7B-Instruct is).

    7B:   ViT 14 px patches, 2x2 merge -> one token per 28x28 px per 2 frames; Qwen2 7B text model (mRoPE)
    tiny: ViT 14 px patches, 2x2 merge -> one token per 28x28 px per 2 frames; 2-layer Qwen2 text model (mRoPE)

The patch and merge sizes are the real ones, so token counts follow the real model's arithmetic; frames are kept
small by the video processor's pixel limits (28x28x4 to 28x28x16 pixels per frame: 4 to 16 tokens per 2 frames).
A Qwen2 tokenizer (byte-level BPE, so any text encodes losslessly, with the demo's and tests' words as whole
tokens) carrying the family's special tokens, and the hub model's chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from vidtune.train.demo.tiny_model import VOCABULARY, save_tiny_model

# Qwen/Qwen2.5-VL-7B-Instruct's chat template, verbatim: a default system prompt, <|im_start|>/<|im_end|> turns,
# each image or video as <|vision_start|><|image_pad|>/<|video_pad|><|vision_end|> where it appears.
HUB_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] =="
    " 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# The Qwen2 vocabulary's specials, in its order (ids follow the base vocabulary, as 151643... do on the hub).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
TINY_SIZES = {
    "text_hidden": 64,
    "text_intermediate": 128,
    "text_layers": 2,
    "text_heads": 4,
    "text_kv_heads": 2,
    "vision_hidden": 32,
    "vision_intermediate": 64,
    "vision_layers": 2,
    "vision_heads": 2,
    "min_pixels": 28 * 28 * 4,
    "max_pixels": 28 * 28 * 16,
}


def build_qwen_tokenizer(
    extra_words: str = "", tokenizer_class: Any = Qwen2Tokenizer, named_tokens: dict[str, str] | None = None
) -> Any:
    """A real Qwen2Tokenizer (byte-level BPE, Qwen2's pre-tokenizer; or another Qwen tokenizer class of the same
    shape) with a small trained vocabulary; the instruct models' eos is <|im_end|> and pad is <|endoftext|>, as on
    the hub. `named_tokens`: a family's own special tokens by attribute name (InternVL's `context_image_token`...),
    added after the Qwen specials."""
    probe = tokenizer_class()  # its pre-tokenizer (split regex + byte level), so merges match how it encodes
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = probe.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    words = (VOCABULARY + " " + extra_words).split()
    corpus = [" ".join(words)] * 4 + ["".join(w + ":" for w in words), "\n".join(words), "0123456789.<> seconds"]
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(pair) for pair in model["merges"]]
    # merges as pairs (the tokenizers library's own form; the annotation says strings)
    named = named_tokens or {}
    tokenizer = tokenizer_class(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", **named)
    tokenizer.add_special_tokens({"additional_special_tokens": [*SPECIAL_TOKENS, *named.values()]})
    return tokenizer


def token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, Any]:
    """The config's ids of the family's special tokens."""
    tokens = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in tokens.items()}


def text_and_vision_configs(tokenizer: Qwen2Tokenizer, text_layers: int | None = None) -> dict[str, Any]:
    """The tiny Qwen2-text + Qwen2.5 ViT sizes, shared with the Qwen2.5-Omni thinker (the same two towers)."""
    s = TINY_SIZES
    return {
        "text_config": {
            "hidden_size": s["text_hidden"],
            "intermediate_size": s["text_intermediate"],
            "num_hidden_layers": text_layers or s["text_layers"],
            "num_attention_heads": s["text_heads"],
            "num_key_value_heads": s["text_kv_heads"],
            "vocab_size": -(-len(tokenizer) // 64) * 64,
            "max_position_embeddings": 4096,
            # head_dim 16: mRoPE's temporal / height / width sections split its 8 rotary pairs (7B: 16/24/24 of 64)
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "vision_config": {
            "depth": s["vision_layers"],
            "hidden_size": s["vision_hidden"],
            "intermediate_size": s["vision_intermediate"],
            "num_heads": s["vision_heads"],
            "out_hidden_size": s["text_hidden"],
            "fullatt_block_indexes": [s["vision_layers"] - 1],
            "window_size": 56,
        },
    }


def tiny_config(tokenizer: Qwen2Tokenizer, text_layers: int | None = None) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(**text_and_vision_configs(tokenizer, text_layers), **token_ids(tokenizer))


def tiny_processor(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLProcessor:
    pixels = {"shortest_edge": TINY_SIZES["min_pixels"], "longest_edge": TINY_SIZES["max_pixels"]}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels),
        video_processor=Qwen2VLVideoProcessor(
            size=pixels, temporal_patch_size=2, do_sample_frames=False, cap_pixels_per_frame=False
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
        out_dir, Qwen2_5_VLForConditionalGeneration, config, tiny_processor(tokenizer), seed, eos_token_ids=end_tokens
    )
