"""A tiny random Qwen3.5, written as a normal Hugging Face model folder (what Qwen/Qwen3.5-9B is).

    9B:   Qwen3-VL's ViT (16 px patches, 2x2 merge, no DeepStack) -> one token per 32x32 px per 2 frames; a hybrid
          text model: 3 Gated DeltaNet (linear attention) layers to 1 gated full-attention layer, interleaved mRoPE on
          a quarter of each head; `<1.5 seconds>` text before each temporal patch
    tiny: the same patch and merge sizes, the same layer pattern on 2 (or 4) text layers, tiny widths

Its processor and video processor are Qwen3-VL's classes (transformers maps `qwen3_5` to them), sized as in
tiny_qwen3_vl; the tokenizer is the Qwen3.5 class (its own pre-tokenizer) with the ChatML and vision specials and
`<think>` / `</think>` as single tokens; the chat template is the hub's shape (see data/families/qwen3_5.py for
where that shape is documented): thinking by default, an empty think block when `enable_thinking=False`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5Tokenizer

from vidtune.train.demo.tiny_model import save_tiny_model
from vidtune.train.demo.tiny_qwen2_5_vl import TINY_SIZES, build_qwen_tokenizer, token_ids
from vidtune.train.demo.tiny_qwen3_vl import PATCH_PX, tiny_processor

# The Qwen3.5 hub template's behaviour without its tool-calling branches: an optional system turn first; contents
# trimmed; media as <|vision_start|><|image_pad|>/<|video_pad|><|vision_end|>; assistant turns after the last user
# turn open with a think block (`<think>\n{reasoning}\n</think>\n\n`, empty when there is none), earlier ones carry
# no think block; the generation prompt opens a think block (`<think>\n`), or an empty closed one when
# enable_thinking is false.
HUB_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}{%- if content is string -%}{{- content -}}{%- else -%}"
    "{%- for item in content -%}{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}{%- elif item.type == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}{%- elif 'text' in item -%}{{- item.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- if messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + render(messages[0].content) | trim + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for message in messages -%}{%- if message.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}{%- set content = render(message.content) | trim -%}"
    "{%- if message.role == 'user' -%}{{- '<|im_start|>user\\n' + content + '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'assistant' -%}{%- set reasoning = '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] | trim -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{%- if loop.index0 > ns.last_query -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n' + content -}}{%- endif -%}{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}{%- endif -%}"
)
THINK_TOKENS = ["<think>", "</think>"]  # single (non-special) tokens, as in the hub vocabulary


def tiny_config(tokenizer: Any, text_layers: int | None = None) -> Qwen3_5Config:
    s = TINY_SIZES
    layers = text_layers or s["text_layers"]
    every = min(4, layers)  # the 9B's 3 linear : 1 full, with at least one full-attention layer
    return Qwen3_5Config(
        text_config={
            "hidden_size": s["text_hidden"],
            "intermediate_size": s["text_intermediate"],
            "num_hidden_layers": layers,
            "layer_types": ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(layers)],
            "num_attention_heads": s["text_heads"],
            "num_key_value_heads": s["text_kv_heads"],
            "head_dim": 32,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "vocab_size": -(-len(tokenizer) // 64) * 64,
            "max_position_embeddings": 4096,
            # a quarter of each 32-dim head rotates: 4 pairs over time / height / width, interleaved (9B: 11/11/10)
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e7,
                "partial_rotary_factor": 0.25,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
            "bos_token_id": None,
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
        },
        **token_ids(tokenizer),
    )


def build(out_dir: str | Path, seed: int = 0, extra_words: str = "", text_layers: int | None = None) -> Path:
    """Write the tiny model folder (config, safetensors weights, tokenizer, processor, chat template); return it."""
    tokenizer = build_qwen_tokenizer(extra_words, tokenizer_class=Qwen3_5Tokenizer)
    tokenizer.add_tokens(THINK_TOKENS)
    config = tiny_config(tokenizer, text_layers)
    processor = tiny_processor(tokenizer)
    processor.chat_template = HUB_CHAT_TEMPLATE
    end_tokens = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return save_tiny_model(out_dir, Qwen3_5ForConditionalGeneration, config, processor, seed, eos_token_ids=end_tokens)
