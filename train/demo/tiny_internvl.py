"""A tiny random InternVL3.5, written as a normal Hugging Face model folder (what OpenGVLab/InternVL3_5-8B-HF is),
with the real processor classes (InternVLProcessor, GotOcr2ImageProcessor, InternVLVideoProcessor):

    8B:   InternViT-300M, 14 px patches @ 448 px -> 32x32 patches -> pixel shuffle 0.5 -> 16x16 = 256 tokens per
          image tile or video frame; images tiled into up to 12 tiles + a thumbnail; Qwen3-8B text model
    tiny: InternViT,       8 px patches @  32 px ->  4x4  patches -> pixel shuffle 0.5 ->  2x2  =   4 tokens per
          image tile or video frame; images tiled into up to 6 tiles + a thumbnail; 2-layer Qwen3 (GQA 4/2 heads)

Every frame of a video is one 448 px (tiny: 32 px) image to the model: the processor writes `Frame{i}: <img>` +
the frame's context tokens + `</img>` per frame, lines joined by newlines. The tokenizer is tiny_qwen2_5_vl's
(Qwen2 byte-level BPE with the ChatML specials, as Qwen3's) plus InternVL's named specials (`<img>`, `</img>`,
`<IMG_CONTEXT>`, `<video>`); the chat template is the hub's (transformers' InternVL conversion script: ChatML, no
default system prompt, `<IMG_CONTEXT>\\n` per image and `<video>\\n` per video where they appear). Both pixel
processors normalise with ImageNet's mean and std, as the original InternVL does for images and frames alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    Qwen2Tokenizer,
)

from vidtune.train.demo.tiny_model import save_tiny_model
from vidtune.train.demo.tiny_qwen2_5_vl import build_qwen_tokenizer

# transformers' InternVL conversion script's chat template (models/internvl/convert_internvl_weights_to_hf.py),
# verbatim in shape.
HUB_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == "
    "'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
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
    "image_px": 32,
    "patch_px": 8,
    "max_tiles": 6,
}


def tiny_config(tokenizer: Qwen2Tokenizer, text_layers: int | None = None) -> InternVLConfig:
    s = TINY_SIZES
    patches = s["image_px"] // s["patch_px"]
    return InternVLConfig(
        vision_config={
            "hidden_size": s["vision_hidden"],
            "intermediate_size": s["vision_intermediate"],
            "num_hidden_layers": s["vision_layers"],
            "num_attention_heads": s["vision_heads"],
            "image_size": s["image_px"],
            "patch_size": s["patch_px"],
        },
        text_config={
            "model_type": "qwen3",
            "hidden_size": s["text_hidden"],
            "intermediate_size": s["text_intermediate"],
            "num_hidden_layers": text_layers or s["text_layers"],
            "num_attention_heads": s["text_heads"],
            "num_key_value_heads": s["text_kv_heads"],
            "head_dim": 16,
            "vocab_size": -(-len(tokenizer) // 64) * 64,
            "max_position_embeddings": 4096,
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        },
        image_token_id=int(tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")),  # type: ignore[arg-type]
        image_seq_length=(patches // 2) ** 2,  # pixel shuffle 0.5 halves each side
        tie_word_embeddings=False,  # as Qwen3-8B's
    )


def tiny_processor(tokenizer: Qwen2Tokenizer, config: Any) -> InternVLProcessor:
    px = TINY_SIZES["image_px"]
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size={"height": px, "width": px},
            max_patches=TINY_SIZES["max_tiles"],
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        ),
        video_processor=InternVLVideoProcessor(
            size={"height": px, "width": px}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
        ),
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
        chat_template=HUB_CHAT_TEMPLATE,
    )


def build(out_dir: str | Path, seed: int = 0, extra_words: str = "", text_layers: int | None = None) -> Path:
    """Write the tiny model folder (config, safetensors weights, tokenizer, processor, chat template); return it."""
    # "Frame" whole, as in Qwen's vocabulary: the processor writes `Frame{i}: ` before every frame
    tokenizer = build_qwen_tokenizer(f"{extra_words} Frame", named_tokens=NAMED_TOKENS)
    config = tiny_config(tokenizer, text_layers)
    end_tokens = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    processor = tiny_processor(tokenizer, config)
    return save_tiny_model(out_dir, InternVLForConditionalGeneration, config, processor, seed, eos_token_ids=end_tokens)
