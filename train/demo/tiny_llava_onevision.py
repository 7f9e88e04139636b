"""A tiny random LLaVA-OneVision, written as a normal Hugging Face model folder (see tiny_model.py for why).

It mirrors llava-hf/llava-onevision-qwen2-7b-ov-hf's layout at toy size, with the real processor classes
(LlavaOnevisionProcessor, LlavaOnevisionImageProcessor, LlavaOnevisionVideoProcessor):

    7B:   SigLIP so400m, 14 px patches @ 384 px -> 27x27 = 729 patches -> pooled to 14x14 = 196 tokens/frame (+1
          newline per video); anyres images up to 9 tiles; Qwen2-7B (28 layers, GQA 28/4 heads)
    tiny: SigLIP,         8 px patches @  24 px ->  3x3  =   9 patches -> pooled to  2x2  =   4 tokens/frame (+1
          newline per video); anyres images on a 24 px grid; 2-layer Qwen2 (GQA 4/2 heads)

(3x3 -> 2x2 pools an odd grid, as 27x27 -> 14x14 does.) A byte-level BPE Qwen2Tokenizer with `<|endoftext|>`,
`<|im_start|>`, `<|im_end|>` (also its eos, as in Qwen2 instruct tokenizers), then `<image>` and `<video>`; the
vocabulary padded to a multiple of 64; the hub's chat template (`<|im_start|>user <video>\\n...<|im_end|>`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Tokenizer,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from vidtune.train.demo.tiny_model import VOCABULARY, save_tiny_model

# llava-hf/llava-onevision-qwen2-7b-ov-hf's chat template, verbatim: images, then videos, then texts (each after a
# newline); `<|im_end|>` closes every turn with nothing after it; the generation prompt is `<|im_start|>assistant\n`.
HUB_STYLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
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
    "image_px": 24,
    "patch_px": 8,
}


def build_tokenizer(extra_words: str = "") -> Qwen2Tokenizer:
    """A real Qwen2Tokenizer (byte-level BPE, Qwen's pre-tokenizer split) with a small trained vocabulary."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = (VOCABULARY + " " + extra_words).split()
    corpus = [" ".join(words)] * 4 + ["".join(w + ":" for w in words), "\n".join(words)]
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges: Any = [tuple(m) for m in model["merges"]]  # pairs: the tokenizers library's own form
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<image>", "<video>"]})
    return tokenizer


def tiny_config(tokenizer: Qwen2Tokenizer, text_layers: int | None = None) -> LlavaOnevisionConfig:
    s = TINY_SIZES
    pinpoints = [[s["image_px"] * h, s["image_px"] * w] for h in range(1, 4) for w in range(1, 4)]
    return LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": s["vision_hidden"],
            "intermediate_size": s["vision_intermediate"],
            "num_hidden_layers": s["vision_layers"],
            "num_attention_heads": s["vision_heads"],
            "image_size": s["image_px"],
            "patch_size": s["patch_px"],
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": s["text_hidden"],
            "intermediate_size": s["text_intermediate"],
            "num_hidden_layers": text_layers or s["text_layers"],
            "num_attention_heads": s["text_heads"],
            "num_key_value_heads": s["text_kv_heads"],
            "vocab_size": -(-len(tokenizer) // 64) * 64,
            "max_position_embeddings": 4096,
            "rope_theta": 1_000_000.0,
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        },
        image_token_index=int(tokenizer.convert_tokens_to_ids("<image>")),  # type: ignore[arg-type]
        video_token_index=int(tokenizer.convert_tokens_to_ids("<video>")),  # type: ignore[arg-type]
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )


def tiny_processor(tokenizer: Qwen2Tokenizer, config: Any) -> LlavaOnevisionProcessor:
    px = config.vision_config.image_size
    size = {"height": px, "width": px}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=config.image_grid_pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=HUB_STYLE_CHAT_TEMPLATE,
        num_image_tokens=(px // config.vision_config.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
    )


def build(out_dir: str | Path, seed: int = 0, extra_words: str = "", text_layers: int | None = None) -> Path:
    """Write the tiny LLaVA-OneVision folder (config, safetensors weights, tokenizer, processor, chat template);
    return it. `text_layers` deepens the language model (default TINY_SIZES["text_layers"])."""
    tokenizer = build_tokenizer(extra_words)
    config = tiny_config(tokenizer, text_layers)
    processor = tiny_processor(tokenizer, config)
    model_class = LlavaOnevisionForConditionalGeneration
    return save_tiny_model(out_dir, model_class, config, processor, seed, eos_token_ids=tokenizer.eos_token_id)
