"""Model-family specifics, one small file per family: its training chat template and where its parts live.

Adding a family (LLaVA-OneVision, Qwen2.5-VL) means adding a file here and registering it below.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]  # config.model_type values this family covers
    model_class: str  # the transformers class that loads it
    # Training template: the model's own prompt format, with each assistant turn wrapped in {% generation %} and
    # closed by its end-of-turn token, so labels come from the processor's assistant mask and the model learns
    # to stop. Saved with every adapter, so inference renders exactly what training saw.
    chat_template: str
    language_model_prefix: str  # module-name prefixes of the parts the trainable-parameter audit counts
    vision_tower_prefix: str
    projector_prefix: str
    language_model_lora_targets: tuple[str, ...]  # linear-layer names LoRA wraps inside each part
    vision_tower_lora_targets: tuple[str, ...]


def family_for(model_type: str) -> ModelFamily:
    from vidtune.data.families.llava_next_video import LLAVA_NEXT_VIDEO

    for family in (LLAVA_NEXT_VIDEO,):
        if model_type in family.model_types:
            return family
    raise ValueError(f"model type {model_type!r} is not supported yet (supported: llava_next_video)")
