"""Model setup: load a LLaVA-NeXT-Video checkpoint, choose what trains (LoRA / full, projector, vision tower), and
audit the trainable set before any step runs."""

from __future__ import annotations

import json
import os
import pickle
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from vidtune.data.families import FrameLimits, ModelFamily, family_for
from vidtune.train.training.config import FinetuneConfig, ModelConfig, RecipeError
from vidtune.train.training.quantization import bnb_config, check_quantized

PARTS = ("vision_tower", "projector", "audio_tower", "router", "language_model", "other")


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_model_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:  # a missing folder, an unknown or unreachable hub id
        raise RecipeError(f"cannot load model {name_or_path!r}: {str(err).splitlines()[0]}") from None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@contextmanager
def refusing_pickles(*folders: str | Path) -> Iterator[None]:
    """Loads inside refuse a crafted pickle (torch loads with weights_only) in one line naming the file, not with
    an UnpicklingError traceback that names none."""
    try:
        yield
    except pickle.UnpicklingError as err:
        files = [
            str(p)
            for folder in map(Path, folders)
            if folder.is_dir()
            for p in sorted(folder.iterdir())
            if p.suffix in PICKLE_SUFFIXES
        ]
        lines = str(err).splitlines()
        detail = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise RecipeError(
            f"{', '.join(files) or ', '.join(map(str, folders))}: refused to load a pickled file that holds code "
            f"or unknown objects ({detail.strip()[:160]})"
        ) from None


def model_class(family: ModelFamily) -> Any:
    return getattr(transformers, family.model_class)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_on_disk(name_or_path: str) -> str:
    """'3 weight files, 15.1 GB' for a local model folder; '' when they are not local (a Hub id)."""
    folder = Path(name_or_path)
    files = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES] if folder.is_dir() else []
    if not files:
        return ""
    size = sum(p.stat().st_size for p in files)
    shown = f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
    return f" ({len(files)} weight file{'s' if len(files) > 1 else ''}, {shown})"


@contextmanager
def announced_load(name_or_path: str, file: Any = None, show: bool = True) -> Iterator[dict[str, Any]]:
    """One line as a checkpoint starts loading (its weight files and size), one when it is loaded (its parameter
    count, seconds): the libraries' own "Loading weights" bars are off (quiet.py), and a 7B takes a while. Put the
    loaded model into the yielded dict's "model"."""
    loaded: dict[str, Any] = {}
    if not show:
        yield loaded
        return
    started = time.perf_counter()
    print(f"loading model {name_or_path}{weights_on_disk(name_or_path)} ...", file=file, flush=True)
    yield loaded
    if "model" in loaded:
        count = sum(p.numel() for p in loaded["model"].parameters())
        seconds = time.perf_counter() - started
        print(f"loaded model: {count:,} parameters in {seconds:.1f}s", file=file, flush=True)


def load_model(cfg: ModelConfig, device_map: Any = None, init_device: Any = None) -> tuple[Any, ModelFamily]:
    """The checkpoint by hub id or local path, in the recipe's dtype and attention implementation (or, with
    model.from_config, its architecture with random weights: nothing but config.json is read).

    Under DeepSpeed ZeRO-3 (an HfDeepSpeedConfig alive, see distributed.py) transformers builds either way inside
    deepspeed.zero.Init: each rank allocates only its partition of every weight, and from_pretrained loads the
    checkpoint's tensors straight into those partitions. `init_device`: where from_config draws the random weights
    (a GPU draws a 7B's in a second, a CPU in minutes)."""
    config = load_model_config(cfg.name_or_path, cfg.trust_remote_code)
    family = family_for(config.model_type)
    import_sub_model_classes(config)
    dtype = resolve_dtype(cfg.dtype)
    quantized: dict[str, Any] = {}
    if cfg.quantization.bits:  # bitsandbytes quantizes as the weights load, on the device they are loaded onto
        quantized["quantization_config"] = bnb_config(cfg.quantization, family.quantization_skip_modules, dtype)
        device_map = device_map or {"": init_device or "cpu"}
    if cfg.from_config:
        with torch.device(init_device or "cpu"):
            model = model_class(family)._from_config(
                config, dtype=dtype, attn_implementation=family.attention_implementations(cfg.attn_implementation)
            )
    else:
        main_process = os.environ.get("RANK", "0") == "0"
        with refusing_pickles(cfg.name_or_path), announced_load(cfg.name_or_path, show=main_process) as loaded:
            model = loaded["model"] = model_class(family).from_pretrained(
                cfg.name_or_path,
                dtype=dtype,
                attn_implementation=family.attention_implementations(cfg.attn_implementation),
                trust_remote_code=cfg.trust_remote_code,
                device_map=device_map,
                **quantized,
            )
        keep_used_weight_conversions(model)
    if quantized:
        check_quantized(model, family.language_model_prefix)
    family.prepare_model(model)
    return model, family


def import_sub_model_classes(config: Any) -> None:
    """Imports the modeling modules of the model's parts (its text model, vision tower) before any load.

    transformers imports them lazily, inside from_pretrained; under ZeRO-3 that is inside deepspeed.zero.Init, which
    patches every nn.Module class's __init__ and, on leaving, puts back the __init__ it saw when the class was made.
    A class decorated after its creation (transformers' kernels decorator, use_kernelized_func: Llama's attention)
    then loses its decorated __init__ for good, and the next model built in the process (a full fine-tuning run's
    frozen reference) fails in forward: "'LlamaAttention' object has no attribute '_kernel_funcs'"."""
    for key in getattr(config, "sub_configs", {}) or {}:
        sub_config = getattr(config, key, None)
        if not isinstance(sub_config, transformers.PreTrainedConfig):
            continue
        try:
            transformers.AutoModel._model_mapping[type(sub_config)]  # (the lazy mapping imports the module)
        except (KeyError, ValueError):
            continue  # a part without its own model class (a config of settings only)


def keep_used_weight_conversions(model: Any) -> None:
    """The checkpoint renamings a save reverses: only those the load used, as transformers keeps after a plain load.

    Its ZeRO-3 load (integrations/deepspeed.py, transformers 5.25) keeps every renaming it tried, also the
    PrefixChange that did not match: saving then prefixes the language model again. A full fine-tuning run of
    Qwen2.5-VL under ZeRO-3 wrote `model.model.layers.*`, weights from_pretrained does not find."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [conversion for conversion in conversions if conversion.was_used()]


def build_on_meta(cfg: ModelConfig) -> tuple[Any, ModelFamily]:
    """The architecture without weights (for --dry-run audits and checks of 7B recipes on a laptop)."""
    config = load_model_config(cfg.name_or_path, cfg.trust_remote_code)
    family = family_for(config.model_type)
    with torch.device("meta"):
        model = model_class(family)._from_config(config, dtype=resolve_dtype(cfg.dtype))
    return model, family


def load_processor(
    name_or_path: str, family: ModelFamily, trust_remote_code: bool = False, frame_limits: FrameLimits | None = None
) -> Any:
    processor = transformers.AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    # The recipe's frame-size limits live in the processor, which the outputs save: inference resizes as training.
    family.apply_frame_limits(processor, frame_limits or FrameLimits())
    # The family's training template (generation markers, end-of-turn token) replaces the hub's; it is saved with
    # the outputs so inference renders prompts exactly as training did.
    processor.chat_template = family.chat_template
    # The tokenizer keeps its own padding side (hub LLaVA tokenizers pad left, for batched generation), so the saved
    # processor works for users who batch with it; vidtune's collators pad explicitly on the side each use needs
    # (right for training, left for generation).
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token or processor.tokenizer.eos_token
    return processor


# -------------------------------------------------------------------------------------------------- finetuning


def linear_layers(model: Any, prefix: str) -> dict[str, str]:
    """{module name: leaf name (q_proj, fc1, ...)} of the linear layers under a module-name prefix."""
    return {
        name: name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name.startswith(prefix) and isinstance(module, torch.nn.Linear)
    }


def lora_target_pattern(model: Any, family: ModelFamily, cfg: FinetuneConfig) -> str:
    """A regex PEFT full-matches against module names: the full names of the linear layers whose leaf name is a
    target, only inside the parts the recipe names. Names, not a leaf pattern: Qwen2.5-VL's vision target `proj`
    also names its Conv3d patch embedding (`visual.patch_embed.proj`), which must stay unwrapped."""
    return "|".join(re.escape(name) for name in lora_target_names(model, family, cfg))


def lora_target_names(model: Any, family: ModelFamily, cfg: FinetuneConfig) -> list[str]:
    """The full names of the linear layers LoRA wraps (see lora_target_pattern)."""
    linear_targets = [t for t in cfg.lora.targets if t not in family.language_model_lora_parameters]
    if cfg.lora.targets and not linear_targets:
        return []  # only expert weights (lora_target_parameters)
    scopes = [(family.language_model_prefix, linear_targets or list(family.language_model_lora_targets))]
    if cfg.vision_tower == "lora":
        scopes.append((family.vision_tower_prefix, list(family.vision_tower_lora_targets)))
    if cfg.audio_tower == "lora":
        scopes.append((audio_tower_prefix(family, cfg), list(family.audio_tower_lora_targets)))
    unused = family.unused_module_prefixes(model.config)
    if unused:
        module_names = [name for name, _ in model.named_modules()]
        renamed = [u for u in unused if not any(n.startswith(u) for n in module_names)]
        if renamed:  # a transformers upgrade moved the modules: fail rather than silently wrap them again
            raise RuntimeError(f"{family.name}: no modules named {renamed} in this model; the family needs updating")
    chosen = []
    for prefix, targets in scopes:
        available = linear_layers(model, prefix)
        missing = sorted(set(targets) - set(available.values()))
        if missing:
            raise RecipeError(
                f"finetune.lora.targets {missing} match no linear layer under {prefix.rstrip('.')}; "
                f"available: {', '.join(sorted(set(available.values())))}"
            )
        # Layers whose output the model never reads (e.g. CLIP's last layer, when features come from the one
        # before) would get no gradient: leave them unwrapped.
        chosen += [
            name for name, leaf in available.items() if leaf in targets and not any(name.startswith(u) for u in unused)
        ]
    return chosen


def lora_target_parameters(model: Any, family: ModelFamily, cfg: FinetuneConfig) -> list[str]:
    """Full names of the language model's fused expert weights (3-D parameters, not linear layers) that LoRA adapts
    through PEFT's `target_parameters`: the family's by default; with finetune.lora.targets, those it names."""
    wanted = family.language_model_lora_parameters
    if cfg.lora.targets:
        wanted = tuple(t for t in cfg.lora.targets if t in wanted)
    unused = family.unused_module_prefixes(model.config)
    return [
        name
        for name, _ in model.named_parameters()
        if name.startswith(family.language_model_prefix)
        and any(name.endswith("." + w) for w in wanted)
        and not any(name.startswith(u) for u in unused)
    ]


def check_experts(cfg: FinetuneConfig, config: Any) -> None:
    """finetune.train_router on a model without a Mixture-of-Experts router: refused from the model's config, before
    its weights load."""
    family = family_for(config.model_type)
    if cfg.train_router and not family.router_module:
        raise RecipeError(
            f"finetune.train_router: {family.name} has no Mixture-of-Experts router (set finetune.train_router=false)"
        )


def linear_lora_dropout(model: Any, family: ModelFamily, cfg: FinetuneConfig) -> Any:
    """finetune.lora.dropout on the linear layers LoRA wraps, none on fused experts: PEFT's ParamWrapper (LoRA on a
    3-D expert weight) refuses any dropout, so a family with such weights builds its adapter without and gets the
    recipe's dropout here, on each wrapped linear layer's input (where PEFT would have put it)."""
    if family.language_model_lora_parameters and cfg.lora.dropout:
        for module in model.modules():
            dropouts = getattr(module, "lora_dropout", None)
            if isinstance(dropouts, torch.nn.ModuleDict) and getattr(module, "parameter_name", None) is None:
                for name in dropouts:
                    dropouts[name] = torch.nn.Dropout(p=cfg.lora.dropout)
    return model


def check_lora_size(cfg: FinetuneConfig, config: Any) -> None:
    """A LoRA rank beyond the layers it adapts is a typo (rank=1e8 allocated 25.6 GB before failing): refused
    against the model's config, before its weights load."""
    if cfg.mode != "lora":
        return
    hidden = getattr(getattr(config, "text_config", None) or config, "hidden_size", None)
    if isinstance(hidden, int) and cfg.lora.rank > hidden:
        raise RecipeError(
            f"finetune.lora.rank={cfg.lora.rank:,} exceeds the language model's hidden size {hidden:,}: LoRA ranks "
            "are usually 8-256"
        )


def check_audio_tower(cfg: FinetuneConfig, config: Any) -> None:
    """finetune.audio_tower on a family without an audio tower: refused from the model's config, before its weights
    load."""
    if cfg.audio_tower != "frozen":
        audio_tower_prefix(family_for(config.model_type), cfg)


def apply_finetuning(model: Any, family: ModelFamily, cfg: FinetuneConfig, adapter: str | None = None) -> Any:
    """Freeze everything, then unfreeze (or wrap with LoRA) exactly what the recipe asks for."""
    model.requires_grad_(False)
    if cfg.mode == "full":
        _unfreeze(model, family.language_model_prefix)
        model.lm_head.requires_grad_(True)
        if cfg.train_projector:
            _unfreeze(model, family.projector_prefix)
        if cfg.vision_tower == "full":
            _unfreeze(model, family.vision_tower_prefix)
        if cfg.audio_tower == "full":
            _unfreeze(model, audio_tower_prefix(family, cfg))
        if family.router_module and not cfg.train_router:  # the routing the experts were trained with stays
            for name, param in model.named_parameters():
                if name.startswith(family.language_model_prefix) and f".{family.router_module}." in name:
                    param.requires_grad_(False)
        return model
    if adapter:
        # Continue an earlier stage's adapter (instruct -> chat): its targets and rank come with it.
        with refusing_pickles(adapter):
            return linear_lora_dropout(PeftModel.from_pretrained(model, adapter, is_trainable=True), family, cfg)
    modules_to_save = []
    if cfg.train_projector:
        modules_to_save.append(family.projector_prefix.rstrip(".").rsplit(".", 1)[-1])
    if cfg.vision_tower == "full":
        modules_to_save.append(family.vision_tower_prefix.rstrip(".").rsplit(".", 1)[-1])
    if cfg.audio_tower == "full":
        modules_to_save.append(audio_tower_prefix(family, cfg).rstrip(".").rsplit(".", 1)[-1])
    if cfg.train_router and family.router_module:
        modules_to_save.append(family.router_module)
    expert_weights = lora_target_parameters(model, family, cfg)
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=0.0 if family.language_model_lora_parameters else cfg.lora.dropout,  # see linear_lora_dropout
        # MoE families get the names as a list: PEFT 0.21 resolves a regex on a model it converts from transformers
        # v4 MoE names (qwen3_omni_moe) into bare leaf names, which also wrapped the audio tower's q/k/v_proj
        target_modules=lora_target_names(model, family, cfg)
        if family.language_model_lora_parameters
        else lora_target_pattern(model, family, cfg),
        target_parameters=expert_weights or None,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    return linear_lora_dropout(get_peft_model(model, lora), family, cfg)


def audio_tower_prefix(family: ModelFamily, cfg: FinetuneConfig) -> str:
    """The audio encoder's module prefix, for a recipe that trains it; a family without one refuses in one line."""
    if not family.audio_tower_prefix:
        raise RecipeError(
            f"finetune.audio_tower={cfg.audio_tower}: {family.name} has no audio tower "
            "(set finetune.audio_tower=frozen)"
        )
    return family.audio_tower_prefix


def _unfreeze(model: Any, prefix: str) -> None:
    for name, param in model.named_parameters():
        if name.startswith(prefix):
            param.requires_grad_(True)


def enable_gradient_checkpointing(model: Any) -> None:
    # Non-reentrant checkpointing works with frozen inputs (LoRA), so no enable_input_require_grads hack.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


# ------------------------------------------------------------------------------------------------------- audit


def part_of(name: str, family: ModelFamily) -> str:
    name = name.removeprefix("base_model.model.")
    name = re.sub(r"\.(modules_to_save\.default|original_module)\.", ".", name)
    if family.router_module and name.startswith(family.language_model_prefix) and f".{family.router_module}." in name:
        return "router"  # a Mixture-of-Experts language model's routers: frozen unless finetune.train_router
    for part, prefix in (  # the projector first: Qwen's merger sits inside its vision tower's module
        ("projector", family.projector_prefix),
        ("vision_tower", family.vision_tower_prefix),
        ("audio_tower", family.audio_tower_prefix),
        ("language_model", family.language_model_prefix),
    ):
        if prefix and name.startswith(prefix):
            return part
    return "language_model" if name.startswith("lm_head") else "other"


def numel(param: torch.Tensor) -> int:
    """A weight's full element count, also when ZeRO-3 has partitioned it (numel() is then 0 on every rank) or
    bitsandbytes packed it (two 4-bit values per byte; its quant_state keeps the real shape)."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:
        return int(torch.Size(quant_state.shape).numel())
    return int(getattr(param, "ds_numel", param.numel()))


def held_numel(param: torch.Tensor) -> int:
    """The elements of a weight this rank holds: its ZeRO-3 partition, or all of it."""
    return int(param.ds_tensor.numel()) if hasattr(param, "ds_tensor") else param.numel()


def held_parameters(model: Any) -> tuple[int, int]:
    """(parameters this rank holds, parameters of the model)."""
    params = list(model.parameters())
    return sum(held_numel(p) for p in params), sum(numel(p) for p in params)


def trainable_audit(model: Any, family: ModelFamily) -> dict[str, Any]:
    """Parameter counts per part: {part: {trainable, total}}, LoRA counted apart, per part it sits in."""
    parts: dict[str, dict[str, int]] = {p: {"trainable": 0, "total": 0} for p in PARTS}
    lora: dict[str, int] = defaultdict(int)
    for name, param in model.named_parameters():
        part, count = part_of(name, family), numel(param)
        if "lora_" in name:
            lora[part] += count if param.requires_grad else 0
            continue
        if ".original_module." not in name:
            parts[part]["total"] += count  # a modules_to_save copy counts once, as its trainable twin
        if param.requires_grad:
            parts[part]["trainable"] += count
    trainable = sum(p["trainable"] for p in parts.values()) + sum(lora.values())
    total = sum(p["total"] for p in parts.values()) + sum(lora.values())
    wrapped = wrapped_modules(model)
    return {"parts": parts, "lora": dict(lora), "wrapped": wrapped, "trainable": trainable, "total": total}


# torch's linear layer, and bitsandbytes' quantized ones (QLoRA's language model: quantization.py)
LINEAR_KINDS = ("Linear", "Linear4bit", "Linear8bitLt")
FUSED_WEIGHTS = "fused expert weights"  # LoRA through target_parameters (ModelFamily.language_model_lora_parameters)


def wrapped_modules(model: Any) -> dict[str, list[str]]:
    """{layer type: [module names]} of every module LoRA wraps, whatever its kind (Linear, Conv3d, Embedding)."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    wrapped: dict[str, list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):  # LoRA on a module's weight (fused experts), named by that weight
            if not isinstance(module.base_layer, ParamWrapper):  # (the innermost of a module's nested wrappers)
                wrapped[FUSED_WEIGHTS].append(name.removeprefix("base_model.model."))
        elif isinstance(module, LoraLayer):
            wrapped[type(module.get_base_layer()).__name__].append(name.removeprefix("base_model.model."))
    return dict(wrapped)


def format_audit(audit: dict[str, Any]) -> str:
    lines = [f"{'part':<16}{'trainable':>14}{'total':>14}"]
    for part, counts in audit["parts"].items():
        if part in ("audio_tower", "router") and not counts["total"]:
            continue  # a family that does not hear, a model without experts
        lines.append(f"{part:<16}{counts['trainable']:>14,}{counts['total']:>14,}")
    for part, count in audit["lora"].items():
        lines.append(f"{'lora (' + part + ')':<16}{count:>14,}{count:>14,}")
    share = 100 * audit["trainable"] / max(1, audit["total"])
    lines.append(f"{'all':<16}{audit['trainable']:>14,}{audit['total']:>14,}  ({share:.2f}% trainable)")
    return "\n".join(lines)


def expected_trainable(cfg: FinetuneConfig, from_adapter: bool = False) -> dict[str, str]:
    """What each part must be under the recipe: none | all | lora."""
    expect = {
        "vision_tower": {"frozen": "none", "lora": "lora", "full": "all"}[cfg.vision_tower],
        "projector": "all" if cfg.train_projector else "none",
        "audio_tower": {"frozen": "none", "lora": "lora", "full": "all"}[cfg.audio_tower],
        "router": "all" if cfg.train_router else "none",
        "language_model": "all" if cfg.mode == "full" else "lora",
        "other": "none",
    }
    if from_adapter:  # a continued adapter brings its own targets; only the absence of other training is checked
        expect = {part: "lora_or_none" if e == "lora" else e for part, e in expect.items()}
    return expect


def check_audit(audit: dict[str, Any], cfg: FinetuneConfig, from_adapter: bool = False) -> None:
    """Refuse a run whose trainable set contradicts its recipe (a frozen part training, LoRA matching nothing)."""
    problems = []
    for part, expect in expected_trainable(cfg, from_adapter).items():
        counts, lora = audit["parts"][part], audit["lora"].get(part, 0)
        full = counts["trainable"] == counts["total"] and counts["total"] > 0
        if expect == "all" and not full:
            problems.append(f"{part} should train fully but {counts['trainable']:,}/{counts['total']:,} params do")
        if expect in ("none", "lora", "lora_or_none") and counts["trainable"]:
            problems.append(f"{part} should be frozen apart from LoRA but {counts['trainable']:,} params train")
        if expect == "lora" and lora == 0:
            problems.append(f"{part} should carry LoRA but no LoRA weights sit there")
        if expect in ("none", "all") and lora:
            problems.append(f"{part} carries {lora:,} LoRA params the recipe did not ask for")
    allowed = (*LINEAR_KINDS, FUSED_WEIGHTS)
    not_linear = {kind: names for kind, names in audit.get("wrapped", {}).items() if kind not in allowed}
    if not_linear and not from_adapter:  # finetune.lora.targets name linear layers only
        problems += [
            f"LoRA wraps {len(names)} {kind} module(s) ({names[0]}, ...)" for kind, names in not_linear.items()
        ]
    if audit["trainable"] == 0:
        problems.append("nothing is trainable")
    if problems:
        raise RecipeError("trainable parameters contradict the recipe: " + "; ".join(problems))


def save_audit(audit: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(audit, indent=2) + "\n", encoding="utf-8")
