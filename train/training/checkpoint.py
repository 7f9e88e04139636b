"""Checkpoints that hold everything to resume, written so that a crash mid-save never leaves one auto-resume picks.

    OUTPUT/checkpoints/step_00000100/
        adapter/ (LoRA runs) or model.safetensors (full runs), optimizer.bin, scheduler.bin,
        random_states_<rank>.pkl, trainer_state.json (step, epoch, data position, fingerprint), recipe.yaml,
        manifest.json (every file and its size, written last)

Accelerate's save_state writes into `.tmp-step_...`; the folder is renamed only after the manifest is written, and
old checkpoints are deleted only after the new one verifies. Resuming is refused when the run changed (its
fingerprint: data, world size, batch layout, adapter), and nothing in a checkpoint is unpickled beyond tensors and
an allowlist of plain types (DeepSpeed's own loader included).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from vidtune.train.training.config import Recipe, RecipeError

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
PREFIX = "step_"


class TrainingState:
    """Counters saved with every checkpoint, as JSON (trainer_state.json): Accelerate would pickle a custom
    object and unpickle it without weights_only, so a crafted checkpoint could run code on resume."""

    def __init__(self) -> None:
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches this rank consumed in the current epoch (all of them, streamed)
        self.samples = 0  # samples trained on, all ranks

    def state_dict(self) -> dict[str, int]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "samples": self.samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        self.samples = state.get("samples", 0)  # absent from checkpoints written before it was counted


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")


def verify(folder: Path) -> bool:
    """A checkpoint is complete when its manifest exists and every listed file has its recorded size."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and verify(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def check_rng_states(folder: Path, process_index: int) -> None:
    """Accelerate loads RNG states inside a try/except that swallows every error: a damaged or crafted file would
    resume silently without them (and the resumed run would no longer match). Load it here first, safely."""
    import pickle

    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    path = folder / f"random_states_{process_index}.pkl"
    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, FileNotFoundError) as err:
        raise pickle.UnpicklingError(f"{path.name}: {str(err).splitlines()[0][:160]}") from None


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Leftovers of saves that never finished (a crash mid-save), or checkpoints whose files no longer verify."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p.name.startswith(".tmp-") or not verify(p)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(
    accelerator: Any, output_dir: str | Path, step: int, keep_last: int, extra_files: dict[str, str], **save_kwargs: Any
) -> Path:
    """Save the accelerator state for `step`; every rank calls this."""
    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True, **save_kwargs)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, text in extra_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if verify(final):
            for old in complete_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_deepspeed_checkpoints_safely() -> None:
    """DeepSpeed unpickles its checkpoint files with weights_only=False: a crafted file would run code on resume.

    Its files hold tensors, dicts and three small DeepSpeed types (loss scaler, ZeRO stage, fragment offsets);
    loading them with weights_only=True and those types allowlisted keeps resuming working and refuses the rest.
    """
    from accelerate.utils.other import TORCH_SAFE_GLOBALS
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, ZeroStageEnum, fragment_address, *TORCH_SAFE_GLOBALS]
    engine = torch_checkpoint_engine.TorchCheckpointEngine
    if getattr(engine.load, "vidtune_safe", False):
        return

    def load(self: Any, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    load.vidtune_safe = True  # type: ignore[attr-defined]
    engine.load = load


# ---------------------------------------------------------------------------------------------------- resuming


def fingerprint(recipe: Recipe, world_size: int, train_rows: Any) -> dict[str, Any]:
    """What a checkpoint's optimizer state and data position only make sense with."""
    if train_rows is not None:
        identity = json.dumps([list(train_rows["source"]), list(train_rows["row"])]).encode()
        data = f"{len(train_rows)} rows, sha1 {hashlib.sha1(identity).hexdigest()[:12]}"
    else:
        data = "stream of " + ", ".join(s.path for s in recipe.data.sources)
    f, lora = recipe.finetune, recipe.finetune.lora
    return {
        "world size": world_size,
        "dataset": data,
        "adapter": f"{f.mode}, rank {lora.rank}, alpha {lora.alpha}, targets {sorted(lora.targets) or 'default'}, "
        f"projector {f.train_projector}, vision tower {f.vision_tower}, continued from {recipe.model.adapter}",
        "batch": f"{recipe.train.batch_size} per device x {recipe.train.grad_accum_steps} accumulation",
    }


def check_resume(saved: dict[str, Any], current: dict[str, Any], checkpoint: str, force: bool) -> list[str]:
    """Refuse to resume a checkpoint whose run differed (a flag forces it); return what changed."""
    changed = [f"{key}: {saved.get(key)} -> {value}" for key, value in current.items() if saved.get(key) != value]
    if changed and not force:
        raise RecipeError(
            f"cannot resume {checkpoint}: {'; '.join(changed)}. Use a new train.output_dir, or "
            "train.resume=force to continue anyway"
        )
    return changed
