"""What a run leaves behind: adapter-only checkpoints, and the final output folder.

OUTPUT/adapter_config.json, adapter_model.safetensors   (LoRA runs; PEFT format)
       config.json, model*.safetensors                  (full runs)
       processor files + chat_template.jinja            (the family's training template)
       recipe.yaml                                      (the resolved recipe)
       vidtune.json                                     (what inference needs to sample frames as training did)
       trainable_parameters.json                        (the audit)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from vidtune.data.dataset import DropReport
from vidtune.data.sources import source_name
from vidtune.train.training.checkpoint import disk_full
from vidtune.train.training.config import Recipe, RecipeError, recipe_to_dict, recipe_to_yaml
from vidtune.train.training.distributed import is_deepspeed, trainable_state_dict, zero_stage

ADAPTER_SUBDIR = "adapter"
METADATA = "vidtune.json"
LOCK = ".vidtune.lock"  # held (flock) by the `vidtune train` writing into the folder; holds its pid


def lock_output_dir(output_dir: Path) -> Any:
    """Lock the output folder for this run (main process); the open file holds the lock until the process ends.

    Two runs into one folder once deleted each other's files mid-save and published a checkpoint with no adapter.
    flock is released by the kernel however the process dies, so a killed run never leaves a stale lock."""
    import fcntl

    output_dir.mkdir(parents=True, exist_ok=True)
    handle = (output_dir / LOCK).open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RecipeError(
            f"{output_dir} is in use by another vidtune train (pid {holder}); wait for it or use another "
            "train.output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def register_adapter_hooks(accelerator: Any) -> None:
    """Checkpoints of LoRA runs hold the adapter, not a copy of the frozen base model (14 GB for the 7B)."""

    def save_hook(models: list[Any], weights: list[dict], output_dir: str) -> None:
        if not weights:  # DeepSpeed saved its engines itself (frozen weights excluded)
            return
        unwrapped = accelerator.unwrap_model(models[0])
        if isinstance(unwrapped, PeftModel):
            if accelerator.is_main_process:
                unwrapped.save_pretrained(str(Path(output_dir) / ADAPTER_SUBDIR), state_dict=weights[0])
            weights.pop(0)

    def load_hook(models: list[Any], input_dir: str) -> None:
        adapter = Path(input_dir) / ADAPTER_SUBDIR / "adapter_model.safetensors"
        if is_deepspeed(accelerator) or not adapter.is_file():
            return
        unwrapped = accelerator.unwrap_model(models[0])
        set_peft_model_state_dict(unwrapped, load_file(str(adapter)))
        models.pop(0)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_state_kwargs(accelerator: Any) -> dict[str, Any]:
    # Checkpoints exclude frozen weights, so DeepSpeed must not insist on finding every module key.
    return {"load_module_strict": False} if is_deepspeed(accelerator) else {}


def write_audit(output_dir: Path, audit: dict[str, Any]) -> None:
    (output_dir / "trainable_parameters.json").write_text(json.dumps(audit, indent=2) + "\n", encoding="utf-8")


def training_metadata(
    recipe: Recipe,
    frame_px: int | None,
    drops: DropReport,
    accelerator: Any,
    steps: int,
    metrics: dict[str, float],
) -> dict[str, Any]:
    """What `vidtune.json` records: the base model, how frames were sampled, the data and its size, the settings,
    the engine, the steps and the final metrics."""
    from vidtune.data.dataset import heard_sources
    from vidtune.data.families import family_for
    from vidtune.train.training.model import load_model_config
    from vidtune.train.training.quantization import quantization_settings

    r = recipe
    model_type = load_model_config(r.model.name_or_path, r.model.trust_remote_code).model_type
    shown = recipe_to_dict(recipe)["data"]["sources"]  # paths as written: `${oc.env:...}` stays unresolved
    return {
        "base_model": r.model.name_or_path,
        # the family, for the model card's usage code (class, time metadata) and for people
        "model_type": model_type,
        "variant": r.variant,
        "finetune_mode": r.finetune.mode,
        "sampling": {
            "num_frames": r.data.sampling.num_frames,
            "fps": r.data.sampling.fps,
            "strategy": "uniform segments (centre at inference)",
        },
        "frame_px": frame_px,
        # the processor saved beside this file carries them; recorded here for people and the model card
        "frame_limits": dataclasses.asdict(r.model.frame_limits),
        # QLoRA: the base loads quantized the same way for inference and in the model card's code (None: unquantized)
        "quantization": quantization_settings(r.model.quantization),
        "time_instruction": r.data.time_instruction,
        # videos were heard with their sound (data.audio): inference hears them the same way
        "audio": bool(heard_sources(r.data, family_for(model_type))),
        "max_length": r.data.max_length,
        "label_turns": r.data.label_turns,
        "datasets": [
            {"path": text["path"], "format": s.format, "num_samples": drops.kept_by_source.get(source_name(s))}
            for s, text in zip(r.data.sources, shown, strict=True)
        ],
        "hyperparameters": {
            "learning rate": r.train.learning_rate,
            "scheduler": f"{r.train.lr_scheduler}, warmup {r.train.warmup_ratio:g}",
            "batch per device x accumulation": f"{r.train.batch_size} x {r.train.grad_accum_steps}",
            "processes": accelerator.num_processes,
            "epochs / max steps": f"{r.train.num_epochs:g} / {r.train.max_steps}",
            "LoRA rank / alpha / dropout": (
                f"{r.finetune.lora.rank} / {r.finetune.lora.alpha} / {r.finetune.lora.dropout:g}"
                if r.finetune.mode == "lora"
                else None
            ),
            "projector trained": r.finetune.train_projector,
            "vision tower": r.finetune.vision_tower,
            # a family that hears (said when trained: the other families have no audio tower to freeze)
            **({"audio tower": r.finetune.audio_tower} if r.finetune.audio_tower != "frozen" else {}),
            "mixed precision": r.train.mixed_precision,
            "seed": r.train.seed,
        },
        "num_train_samples": drops.kept,
        "distributed": {
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "zero_stage": zero_stage(accelerator),
        },
        "num_dropped_samples": drops.dropped,
        "steps": steps,
        "metrics": metrics,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def save_final(
    accelerator: Any, model: Any, processor: Any, output_dir: str | Path, recipe: Recipe, metadata: dict[str, Any]
) -> None:
    """The model (adapter or full weights), processor, recipe and metadata, written by the main process.

    Every rank takes part in gathering the state dict (ZeRO-3 shards it across ranks)."""
    acc, out = accelerator, Path(output_dir)
    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(model)
    # LoRA: the trainable weights, gathered (PEFT keeps the adapter's keys from them); full runs: every weight
    # (under ZeRO-3 this needs zero3_save_16bit_model).
    lora = isinstance(unwrapped, PeftModel)
    state_dict = trainable_state_dict(acc, model) if lora else acc.get_state_dict(model)
    error: BaseException | None = None
    if acc.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            unwrapped.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
            write_model_card(out, metadata, merged=not lora)  # replaces PEFT's "More Information Needed" README
            processor.save_pretrained(out)
            (out / "recipe.yaml").write_text(recipe_to_yaml(recipe), encoding="utf-8")
            (out / METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        except Exception as err:  # a full disk: raised after the barrier, so the other ranks are not left waiting
            error = disk_full(err, out) or err
    acc.wait_for_everyone()
    if error is not None:
        raise error


def add_final_metrics(out: Path, metrics: dict[str, Any]) -> None:
    """The final evaluation's scores into the saved vidtune.json and model card (evaluation runs after the save)."""
    metadata = read_metadata(out)
    if metadata is None:
        return
    metadata["metrics"] = metrics
    tmp = out / f".{METADATA}.tmp"  # replaced whole: a crash here must not leave the finished run unreadable
    tmp.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / METADATA)
    write_model_card(out, metadata, merged=not (out / "adapter_config.json").is_file())


def write_model_card(out: Path, metadata: dict[str, Any], merged: bool) -> None:
    from vidtune.train.publishing.model_card import model_card

    (out / "README.md").write_text(model_card(metadata, {}, merged=merged, name=out.resolve().name), encoding="utf-8")


def read_metadata(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / METADATA
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def finished_message(recipe: Recipe) -> str | None:
    """A message when the recipe's output folder already holds this run, finished (its final save is there and
    its step budget is the recipe's); None when there is training left to do."""
    out = Path(recipe.train.output_dir)
    metadata, saved_recipe = read_metadata(out), out / "recipe.yaml"
    if metadata is None or not saved_recipe.is_file():
        return None
    # Read as saved, not resolved: its `${oc.env:...}` values need not be set any more.
    saved = (yaml.safe_load(saved_recipe.read_text(encoding="utf-8")) or {}).get("train", {})
    if (saved.get("max_steps"), saved.get("num_epochs")) != (recipe.train.max_steps, recipe.train.num_epochs):
        return None  # a longer (or shorter) schedule: continue from the latest checkpoint
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    last = f"; last checkpoint {checkpoints[-1]}" if checkpoints else ""
    return (
        f"{out} already holds this run, finished after {metadata.get('steps')} steps{last}: nothing to train. "
        "Use a new train.output_dir, or train.resume=restart to train it again from step 1"
    )
