"""A tiny random Gemma 4 (video, images and sound), written as a normal Hugging Face model folder with the real
processor classes (Gemma4Processor, Gemma4ImageProcessor, Gemma4VideoProcessor, Gemma4AudioFeatureExtractor):

    E4B:  vision encoder, 16 px patches, frames resized (aspect kept) to at most 70 x 3x3 patches, 3x3 pooled -> up to
          70 tokens per frame (images: 280); conformer audio encoder on 128 mel bins at 16 kHz (100 frames/s, two
          stride-2 convolutions -> 25 tokens/s); Gemma 4 text model with per-layer embeddings (PLE), sliding and
          global attention layers, vision tokens attending bidirectionally
    tiny: the same processors' arithmetic with 2 px patches pooled 2x2 (a 32 px frame is 16x16 patches -> 64 tokens,
          the fewest the processors allow: max_soft_tokens >= 70); 1-layer vision and audio encoders, a 2-layer text
          model (one sliding, one global layer) with PLE

The tokenizer is a GemmaTokenizer (byte-fallback BPE, `<pad>` `<eos>` `<bos>` `<unk>` `<mask>` first, as on the
hub) with Gemma 4's turn and media specials: `<|turn>` / `<turn|>` around every turn, `<|image>` `<|image|>`
`<image|>`, `<|audio>` `<|audio|>` `<audio|>`, `<|video|>`. Its named media tokens (image_token, boi_token,
boa_token...) are what the processor reads: transformers 5.25's Gemma4Processor.validate_inputs refuses every call
("Audio inputs were provided") when the tokenizer lacks boa/eoa tokens, audio or not. The chat template is the
hub's message format (`<bos><|turn>user\\n...<turn|>\\n<|turn>model\\n`), without its tool and thinking branches.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Gemma4AudioFeatureExtractor,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4ImageProcessor,
    Gemma4Processor,
    Gemma4VideoProcessor,
    GemmaTokenizer,
)

from vidtune.train.demo.tiny_model import VOCABULARY, save_tiny_model

# The hub template's message loop (google/gemma-4-E4B-it): each turn `<|turn>{role}\n`, text trimmed, one marker
# per media item, `<turn|>\n`; the assistant's role is `model`; the generation prompt `<|turn>model\n`.
HUB_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] | trim -}}"
    "{%- elif item['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif item['type'] == 'audio' -%}{{- '<|audio|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|video|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}"
)
# Gemma 4's named specials (the tokenizer's extra_special_tokens on the hub; the processor reads them by name)
MEDIA_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
}
TURN_TOKENS = ["<|turn>", "<turn|>"]
VIDEO_TOKEN = "<|video|>"
TINY_SIZES = {
    "text_hidden": 64,
    "text_intermediate": 128,
    "text_layers": 2,
    "text_heads": 4,
    "text_kv_heads": 2,
    "head_dim": 16,
    "per_layer_hidden": 8,
    "vision_hidden": 32,
    "vision_intermediate": 64,
    "vision_layers": 1,
    "vision_heads": 2,
    "patch_px": 2,
    "pooling": 2,
    "soft_tokens": 70,  # the smallest budget the processors take
    "audio_hidden": 32,
    "audio_layers": 1,
    "audio_heads": 2,
}


def build_gemma_tokenizer(extra_words: str = "") -> GemmaTokenizer:
    """A real GemmaTokenizer with a small trained vocabulary and Gemma 4's specials, saved and loaded back with its
    media tokens named (the hub tokenizer_config's `extra_special_tokens`)."""
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")  # GemmaTokenizer's own normalizer
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # merges stay inside words
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *byte_tokens],
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()-/▁\n"),
        show_progress=False,
    )
    words = (VOCABULARY + " " + extra_words).split()
    # newlines stay tokens of their own (no merge spans `model\n` + the answer's first word, as on the hub)
    corpus = [" ".join(words)] * 4 + [" ".join(w + ":" for w in words), " 00:01 00:02 00:03 "]
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges: Any = [tuple(m) for m in model["merges"]]  # pairs (the tokenizers library's form; annotated strings)
    tokenizer = GemmaTokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [*TURN_TOKENS, *MEDIA_TOKENS.values(), VIDEO_TOKEN]},
        replace_extra_special_tokens=False,
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return GemmaTokenizer.from_pretrained(folder, extra_special_tokens=MEDIA_TOKENS, add_bos_token=True)


def tiny_config(tokenizer: Any, text_layers: int | None = None) -> Gemma4Config:
    s = TINY_SIZES
    layers = text_layers or s["text_layers"]
    vocab_size = -(-len(tokenizer) // 64) * 64
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in MEDIA_TOKENS.items()}
    return Gemma4Config(
        text_config={
            "hidden_size": s["text_hidden"],
            "intermediate_size": s["text_intermediate"],
            "num_hidden_layers": layers,
            "num_attention_heads": s["text_heads"],
            "num_key_value_heads": s["text_kv_heads"],
            "head_dim": s["head_dim"],
            "global_head_dim": s["head_dim"] * 2,  # global layers' wider heads, as the real model's 512 over 256
            "layer_types": ["sliding_attention"] * (layers - 1) + ["full_attention"],
            "sliding_window": 512,
            "vocab_size": vocab_size,
            "vocab_size_per_layer_input": vocab_size,
            "hidden_size_per_layer_input": s["per_layer_hidden"],
            "max_position_embeddings": 4096,
            "use_bidirectional_attention": "vision",
            "final_logit_softcapping": 30.0,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.convert_tokens_to_ids("<turn|>"),
            "bos_token_id": tokenizer.bos_token_id,
        },
        vision_config={
            "hidden_size": s["vision_hidden"],
            "intermediate_size": s["vision_intermediate"],
            "num_hidden_layers": s["vision_layers"],
            "num_attention_heads": s["vision_heads"],
            "num_key_value_heads": s["vision_heads"],
            "head_dim": s["vision_hidden"] // s["vision_heads"],
            "patch_size": s["patch_px"],
            "pooling_kernel_size": s["pooling"],
            "position_embedding_size": 256,
        },
        audio_config={
            "hidden_size": s["audio_hidden"],
            "num_hidden_layers": s["audio_layers"],
            "num_attention_heads": s["audio_heads"],
            "subsampling_conv_channels": [128, 4],  # the first must equal the 128 mel bins (its projection's width)
            "output_proj_dims": s["audio_hidden"],
        },
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        image_token_id=ids["image_token"],
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        boa_token_id=ids["boa_token"],
        eoa_token_index=ids["eoa_token"],
        audio_token_id=ids["audio_token"],
    )


def tiny_processor(tokenizer: Any) -> Gemma4Processor:
    s = TINY_SIZES
    patch, pooling, budget = s["patch_px"], s["pooling"], s["soft_tokens"]
    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(patch_size=patch, pooling_kernel_size=pooling, max_soft_tokens=budget),
        video_processor=Gemma4VideoProcessor(
            patch_size=patch, pooling_kernel_size=pooling, max_soft_tokens=budget, do_sample_frames=False
        ),
        tokenizer=tokenizer,
        chat_template=HUB_CHAT_TEMPLATE,
        image_seq_length=s["soft_tokens"],
    )


def scale_patch_embedding(model: Any) -> None:
    """He-initialise the vision tower's patch embedding (std sqrt(2 / fan-in)): transformers draws it at std 0.02,
    which for the tiny tower's 12-value patches (2x2 px, RGB) gives embeddings that the rest of the tower washes out:
    a red and a blue frame's features had cosine 0.9987, the demo's base stage captioned at chance (12.5%, 1 in 12)
    and no training of the frozen tower's projector could see colours. He-initialised, cosine ~0.7. A trained
    tower's patch embedding is not small."""
    proj = model.model.vision_tower.patch_embedder.input_proj
    torch.nn.init.normal_(proj.weight, std=(2 / proj.in_features) ** 0.5)


def build(out_dir: str | Path, seed: int = 0, extra_words: str = "", text_layers: int | None = None) -> Path:
    """Write the tiny Gemma 4 folder (config, safetensors weights, tokenizer, processor, chat template); return it."""
    tokenizer = build_gemma_tokenizer(extra_words)
    config = tiny_config(tokenizer, text_layers)
    end_tokens = [tokenizer.convert_tokens_to_ids("<turn|>"), tokenizer.eos_token_id]
    return save_tiny_model(
        out_dir,
        Gemma4ForConditionalGeneration,
        config,
        tiny_processor(tokenizer),
        seed,
        eos_token_ids=end_tokens,
        initialise=scale_patch_embedding,
    )
