"""Tiny random models, one builder per family (`TINY_MODELS`), and the tiny LLaVA-NeXT-Video's own builder.

Each writes a normal Hugging Face model folder. Used by the tests, the demo and the benchmarks: no model can be
downloaded here, and a user's 7B checkpoint takes the same `from_pretrained(path)` road. The LLaVA-NeXT-Video folder
mirrors llava-hf/LLaVA-NeXT-Video-7B-hf's layout at toy size:

    7B:   CLIP-L/14 @ 336 px -> 24x24 patches -> 2x2 pooled = 144 tokens/frame; vicuna-7b-v1.5 (linear RoPE x2)
    tiny: CLIP 8 px patches @ 32 px -> 4x4 patches -> 2x2 pooled =   4 tokens/frame; 2-layer llama (linear RoPE x2)

A Llama tokenizer (byte-fallback BPE, so any text encodes losslessly, with the demo's and tests' words as whole
tokens), `<video>`/`<image>` added after the base vocabulary, the vocabulary padded to a multiple of 64,
padding_side="left" as on the hub (training must set right padding itself), and a chat template shaped like the
hub's `USER: ... ASSISTANT:` one.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    LlamaTokenizer,
    LlavaNextImageProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
)

from vidtune.train.training.config import RecipeError

# The hub model's own chat template, verbatim in shape: assistant turns end with a space and no </s>.
HUB_STYLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\n' }}{% endfor %}{# Render all video then #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

COLORS = ("red", "green", "blue", "yellow", "white", "black", "purple", "orange", "cyan", "pink")
VOCABULARY = (
    "USER ASSISTANT SYSTEM system user assistant A B C D E F what which who where when why how is are was were "
    "does do did the a an and or of in on at to from with without for by this that these those it its there "
    "video clip frame frames image picture color colour colors first last second third middle then after before "
    "comes come shows show shown seen see describe Describe this video in one sentence answer Answer option "
    "options letter given choices directly yes no Yes No not only between end start beginning begins ends "
    "lasts seconds second sampled were at The It A An What Which Who Where Is Are How Why "
    "camera man woman baby person people car street city rabbit bicycle bicycles cyclist helmet van parked "
    "cooking reading playing living room kitchen beach forest dog bird fish cat animal kind cartoon grey big "
    "small large sun morning talks faces sitting moving suit bow tie expression change changes suddenly "
    + " ".join(COLORS)
)
TINY_SIZES = {
    "text_hidden": 64,
    "text_intermediate": 128,
    "text_layers": 2,
    "text_heads": 4,
    "vision_hidden": 32,
    "vision_intermediate": 64,
    "vision_layers": 2,
    "vision_heads": 2,
    "image_px": 32,
    "patch_px": 8,
}


def build_tokenizer(extra_words: str = "") -> LlamaTokenizer:
    """A real LlamaTokenizer (byte-fallback BPE over the Metaspace pre-tokenizer) with a small trained vocabulary."""
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]  # Llama's byte-fallback tokens follow <unk> <s> </s>
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Split on spaces while learning merges, so tokens never span words (as in Llama's sentencepiece vocabulary).
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()-/▁")
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    words = (VOCABULARY + " " + extra_words).split()
    corpus = [" ".join(words)] * 4 + ["".join(w + ":" for w in words), "\n".join(words)]
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = LlamaTokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        add_bos_token=True,
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<video>", "<image>"]})
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def tiny_config(tokenizer: LlamaTokenizer, text_layers: int | None = None) -> LlavaNextVideoConfig:
    s = TINY_SIZES
    pinpoints = [[s["image_px"] * h, s["image_px"] * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    return LlavaNextVideoConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": s["vision_hidden"],
            "intermediate_size": s["vision_intermediate"],
            "num_hidden_layers": s["vision_layers"],
            "num_attention_heads": s["vision_heads"],
            "image_size": s["image_px"],
            "patch_size": s["patch_px"],
            "projection_dim": s["vision_hidden"],
        },
        text_config={
            "model_type": "llama",
            "hidden_size": s["text_hidden"],
            "intermediate_size": s["text_intermediate"],
            "num_hidden_layers": text_layers or s["text_layers"],
            "num_attention_heads": s["text_heads"],
            "num_key_value_heads": s["text_heads"],
            "vocab_size": -(-len(tokenizer) // 64) * 64,  # padded to a multiple of 64, as the 7B's 32064
            "max_position_embeddings": 4096,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        video_token_index=int(tokenizer.convert_tokens_to_ids("<video>")),  # type: ignore[arg-type]
        image_token_index=int(tokenizer.convert_tokens_to_ids("<image>")),  # type: ignore[arg-type]
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(s["image_px"] // s["patch_px"]) ** 2,
        video_seq_length=(s["image_px"] // s["patch_px"] // 2) ** 2,
    )


def tiny_processor(tokenizer: LlamaTokenizer, config: Any) -> LlavaNextVideoProcessor:
    px = config.vision_config.image_size
    video_processor = LlavaNextVideoVideoProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": px},
        crop_size={"height": px, "width": px},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    return LlavaNextVideoProcessor(
        video_processor=video_processor,
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=HUB_STYLE_CHAT_TEMPLATE,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" feature strategy
    )


def build(out_dir: str | Path, seed: int = 0, extra_words: str = "", text_layers: int | None = None) -> Path:
    """Write the tiny LLaVA-NeXT-Video folder (config, safetensors weights, tokenizer, processor, chat template);
    return it. `text_layers` deepens the language model (default TINY_SIZES["text_layers"])."""
    tokenizer = build_tokenizer(extra_words)
    config = tiny_config(tokenizer, text_layers)
    return save_tiny_model(
        out_dir, LlavaNextVideoForConditionalGeneration, config, tiny_processor(tokenizer, config), seed
    )


def save_tiny_model(
    out_dir: str | Path,
    model_class: Any,
    config: Any,
    processor: Any,
    seed: int,
    eos_token_ids: Any = None,
    initialise: Callable[[Any], None] | None = None,
) -> Path:
    """Every family's tiny folder the same way: random weights from `seed` (then the family's `initialise`, if any),
    the tokenizer's pad token (and the family's end tokens) in the generation config, then the weights and the
    processor saved like a hub model."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    model = model_class(config)
    if initialise is not None:
        initialise(model)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    if eos_token_ids is not None:
        model.generation_config.eos_token_id = eos_token_ids
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# family name (data/families FAMILIES) -> "module:function" writing its tiny model folder, each function
# `build(out_dir, seed=0, extra_words="", text_layers=None) -> Path`; modules are imported on first use.
TINY_MODELS: dict[str, str] = {
    "llava_next_video": "vidtune.train.demo.tiny_model:build",
    "llava_onevision": "vidtune.train.demo.tiny_llava_onevision:build",
    "qwen2_5_vl": "vidtune.train.demo.tiny_qwen2_5_vl:build",
    "qwen3_vl": "vidtune.train.demo.tiny_qwen3_vl:build",
    "qwen3_5": "vidtune.train.demo.tiny_qwen3_5:build",
    "qwen2_5_omni": "vidtune.train.demo.tiny_qwen2_5_omni:build",
    "internvl": "vidtune.train.demo.tiny_internvl:build",
    "gemma4": "vidtune.train.demo.tiny_gemma4:build",
    "qwen3_omni_moe": "vidtune.train.demo.tiny_qwen3_omni_moe:build",
}
DEFAULT_FAMILY = "llava_next_video"


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    extra_words: str = "",
    text_layers: int | None = None,
    family: str = DEFAULT_FAMILY,
) -> Path:
    """Write a tiny random model folder of `family` (a key of TINY_MODELS); return it."""
    if family not in TINY_MODELS:
        raise RecipeError(f"no tiny model for family {family!r} (families: {', '.join(sorted(TINY_MODELS))})")
    module, function = TINY_MODELS[family].split(":")
    build_family = getattr(importlib.import_module(module), function)
    return build_family(out_dir, seed=seed, extra_words=extra_words, text_layers=text_layers)
