"""Qwen3.5 (Qwen/Qwen3.5-9B and the rest of the family): Qwen3-VL's vision path and processor with a hybrid text model
(Gated DeltaNet linear-attention layers interleaved 3:1 with gated full attention). Everything visual is Qwen3-VL's
(see qwen3_vl.py): the same processor and video processor classes, `<t seconds>` text per temporal patch from the
real frame times, flattened patch rows with `video_grid_thw`; the vision tower has no DeepStack side outputs.

Prompt format: ChatML without a default system prompt, as Qwen3-VL's, plus think blocks. The hub template writes
`<think>\\n{reasoning}\\n</think>\\n\\n` (empty reasoning when there is none) at the start of every assistant turn after
the last user turn and no think block in earlier turns; its generation prompt opens a think block (`<think>\\n`), or,
with `enable_thinking=False`, writes an empty closed one. Sources, which agree on this:
- the hub template, as vendored from the Qwen3.5-35B-A3B GGUF in github.com/ardanlabs/jinja (jinja_test.go);
- tinker-cookbook's Qwen3.5 renderer (github.com/thinking-machines-lab/tinker-cookbook,
  tinker_cookbook/renderers/qwen3_5.py), written against huggingface.co/Qwen/Qwen3.5-4B tokenizer_config.json;
- LLaMA-Factory's `qwen3_5` template (src/llamafactory/data/template.py: ChatML, `<|im_end|>` stop, a reasoning
  template that adds the empty think block, Qwen3-VL's `<|video_pad|>` plugin).
Training data here carries answers, not reasoning, so our template is the hub's non-thinking form: assistant turns
after the last user turn open with the empty think block (prompt side, unlabelled: at inference the generation
prompt writes it), earlier turns have none, and the generation prompt is `<|im_start|>assistant\\n<think>\\n\\n</think>
\\n\\n` (the hub's with `enable_thinking=False`). Contents are trimmed, as the hub template trims them.
"""

from __future__ import annotations

from vidtune.data.families.qwen3_vl import Qwen3_VL

EMPTY_THINK = "<think>\\n\\n</think>\\n\\n"  # (escaped for the Jinja string literals below)


def qwen3_5_training_template(video_placeholder: str) -> str:
    """The Qwen3.5 prompt (non-thinking) with generation markers around each answer and its <|im_end|>."""
    return (
        "{%- set ns = namespace(last_query=-1) -%}"
        "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- if loop.index0 > ns.last_query -%}{{- '" + EMPTY_THINK + "' -}}{%- endif -%}"
        "{% generation %}"
        "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') | trim -}}"
        "{{- '<|im_end|>' -}}"
        "{% endgeneration %}"
        "{{- '\\n' -}}"
        "{%- else -%}"
        "{%- set rendered = namespace(text='') -%}"
        "{%- for content in message['content'] -%}"
        "{%- if content['type'] == 'image' -%}"
        "{%- set rendered.text = rendered.text + '<|vision_start|><|image_pad|><|vision_end|>' -%}"
        "{%- elif content['type'] == 'video' -%}{%- set rendered.text = rendered.text + '" + video_placeholder + "' -%}"
        "{%- elif content['type'] == 'text' -%}{%- set rendered.text = rendered.text + content['text'] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{{- rendered.text | trim + '<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n" + EMPTY_THINK + "' -}}{%- endif -%}"
    )


class Qwen3_5(Qwen3_VL):
    name = "qwen3_5"
    model_types = ("qwen3_5",)
    model_class = "Qwen3_5ForConditionalGeneration"
    # Position restarts reset attention, not the Gated DeltaNet layers' recurrent state and causal convolution: in a
    # packed row one sample's state flows into the next (transformers' torch path ignores sample boundaries; the
    # flash-linear-attention kernels take cu_seqlens, untested here). tests/test_packing.py shows the leak.
    supports_packing = False
    packing_refusal = "its Gated DeltaNet layers would carry their recurrent state from one packed sample into the next"
    # The bare pad for videos, as Qwen3-VL's (the processor writes the vision start/end tokens per temporal patch).
    chat_template = qwen3_5_training_template(video_placeholder="<|video_pad|>")
    # every linear layer of the text model, as LLaMA-Factory's and ms-swift's all-linear default: attention, MLP and
    # the Gated DeltaNet projections (q/k/v together, the output gate z, the decay a and beta b, the output)
    language_model_lora_targets = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "in_proj_qkv",
        "in_proj_z",
        "in_proj_a",
        "in_proj_b",
        "out_proj",
    )
    # QLoRA leaves the Gated DeltaNet's decay and beta projections (hidden size -> heads: a sliver of the weights) in
    # model.dtype beside the vision tower and lm_head: they set how fast each head's recurrent state forgets.
    quantization_skip_modules = ("model.visual", "lm_head", "in_proj_a", "in_proj_b")


QWEN3_5 = Qwen3_5()
