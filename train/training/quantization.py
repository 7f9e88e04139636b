"""QLoRA: the language model's linear layers loaded 4-bit (or 8-bit) by bitsandbytes through transformers'
`BitsAndBytesConfig`, LoRA trained on top in fp32.

What peft's `prepare_model_for_kbit_training` does, and what vidtune does instead for video models:
- it freezes every weight: `apply_finetuning` does (only LoRA and what the recipe unfreezes train; the audit checks);
- it casts every weight that is not 4-bit to fp32, the vision tower, projector, embeddings and lm_head included
  (1.2 GB more for the 7B: its 0.3B CLIP tower, projector and two 32064x4096 matrices): vidtune keeps the frozen
  weights in `model.dtype` under autocast, as its bf16 LoRA runs do, and the trainable ones in fp32 (build.py);
- it turns gradient checkpointing on (with the input-grad hook that reentrant checkpointing needs): vidtune turns
  non-reentrant checkpointing on for every quantized run, which needs no hook.
The vision tower, the projector and lm_head are never quantized: each family names them (`quantization_skip_modules`)
and `check_quantized` refuses a model where a quantized layer sits outside the language model.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class QuantizationConfig:
    """`model.quantization`: load the language model's linear layers quantized (QLoRA); bits 0 = off."""

    bits: int = 0  # 0 (off) | 4 (QLoRA: 4-bit NormalFloat by default) | 8 (LLM.int8)
    quant_type: str = "nf4"  # 4-bit: nf4 (the QLoRA paper's NormalFloat) | fp4
    double_quant: bool = True  # 4-bit: quantize the quantization constants too (~0.4 bits per weight saved)
    compute_dtype: str = "auto"  # dtype the 4-bit matmuls run in: auto = model.dtype | bfloat16 | float16 | float32


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def quantization_problem(q: QuantizationConfig, finetune_mode: str, from_config: bool) -> str | None:
    """What is wrong with a recipe's quantization settings, in one line (None: nothing), from the recipe alone."""
    if q.bits not in (0, 4, 8):
        return f"model.quantization.bits={q.bits} is not one of 0 (off), 4 (QLoRA), 8"
    if q.quant_type not in QUANT_TYPES:
        return f"model.quantization.quant_type={q.quant_type!r} is not one of {', '.join(QUANT_TYPES)}"
    if q.compute_dtype not in COMPUTE_DTYPES:
        return f"model.quantization.compute_dtype={q.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}"
    if not q.bits:
        return None
    if finetune_mode != "lora":
        return (
            f"model.quantization.bits={q.bits} trains LoRA on frozen quantized weights; full fine-tuning cannot update "
            "them: set finetune.mode=lora or model.quantization.bits=0"
        )
    if from_config:
        return "model.quantization quantizes a checkpoint's weights as they load: it needs model.from_config=false"
    if not bitsandbytes_installed():
        return (
            f"model.quantization.bits={q.bits} needs bitsandbytes: pip install 'vidtune[qlora]' "
            "(or set model.quantization.bits=0)"
        )
    return None


# bitsandbytes, once imported (peft imports it whenever it is installed) on a CPU with AVX-512 bf16, tries to fetch
# an optimised 4-bit kernel from the Hub through `kernels` and falls back to its own code; offline the attempt logs
# two warnings about a kernel nobody asked for, in every run. The fallback is what runs here either way. (This
# module is imported with the recipe, before peft.)
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def bnb_config(q: QuantizationConfig, skip_modules: tuple[str, ...], model_dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for the recipe's settings, leaving the family's `skip_modules` unquantized."""
    from transformers import BitsAndBytesConfig

    compute = model_dtype if q.compute_dtype == "auto" else getattr(torch, q.compute_dtype)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=list(skip_modules),
    )


def quantized_module_names(model: Any) -> list[str]:
    """Names of the bitsandbytes layers in a model (bare or PEFT-wrapped)."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def check_quantized(model: Any, language_model_prefix: str) -> None:
    """The language model's linear layers quantized, nothing else (a family whose skip list misses a renamed vision
    module would otherwise quantize its tower unnoticed)."""
    names = quantized_module_names(model)
    outside = [n for n in names if not n.removeprefix("base_model.model.").startswith(language_model_prefix)]
    if outside or not names:
        raise RuntimeError(
            f"quantization reached {outside[:3]} outside the language model" if outside else "no layer was quantized"
        )


def quantization_settings(q: QuantizationConfig) -> dict[str, Any] | None:
    """What vidtune.json records, so inference and the model card load the base quantized as training did."""
    if not q.bits:
        return None
    if q.bits == 8:
        return {"bits": 8}
    return {"bits": 4, "quant_type": q.quant_type, "double_quant": q.double_quant, "compute_dtype": q.compute_dtype}


def quantized_load_kwargs(
    settings: dict[str, Any] | None, skip_modules: tuple[str, ...], dtype: torch.dtype, device: str
) -> dict[str, Any]:
    """from_pretrained keywords that load a base quantized as a run recorded it in vidtune.json (none: as it is)."""
    if not settings:
        return {}
    return {
        "quantization_config": bnb_config(QuantizationConfig(**settings), skip_modules, dtype),
        "device_map": {"": device},
    }
