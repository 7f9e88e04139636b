"""LLaVA-NeXT-Video (llava-hf/LLaVA-NeXT-Video-7B-hf): vicuna-7b-v1.5 text model, CLIP-L/14-336 vision tower.

Prompt format (vicuna v1): `{system} USER: <video>\\n{prompt} ASSISTANT: {answer}</s>USER: ...`.
The hub model's own template renders the same prompt, but ends assistant turns with a space instead of `</s>`:
trained on it a model never learns to stop, and its assistant mask swallows the next `USER:` token.
(The 7B-32K variant is Mistral `[INST]`, the 34B is Yi `<|im_start|>`: they would be families of their own.)
"""

from vidtune.data.families import ModelFamily

VICUNA_TRAINING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'video') -%}{{ '<video>\\n' }}{%- endfor -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}"
    "{{- eos_token -}}"
    "{% endgeneration %}"
    "{%- else -%}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ content['text'] + ' ' }}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

LLAVA_NEXT_VIDEO = ModelFamily(
    name="llava_next_video",
    model_types=("llava_next_video",),
    model_class="LlavaNextVideoForConditionalGeneration",
    chat_template=VICUNA_TRAINING_TEMPLATE,
    language_model_prefix="model.language_model.",
    vision_tower_prefix="model.vision_tower.",
    projector_prefix="model.multi_modal_projector.",
    language_model_lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    vision_tower_lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
)
