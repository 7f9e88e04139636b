"""Checkpoints that hold everything to resume, written so that a crash mid-save never leaves one auto-resume picks.

    OUTPUT/checkpoints/step_00000100/
        adapter/ (LoRA runs) or model.safetensors (full runs), optimizer.bin, scheduler.bin,
        random_states_<rank>.pkl, trainer_state.json (step, epoch, data position, fingerprint), recipe.yaml,
        manifest.json (every file with its size and sha256, written last)

Accelerate's save_state writes into `.tmp-step_...`; every file and folder is synced to disk, the manifest written,
and only then the folder renamed. Old checkpoints are renamed to `.del-...` and deleted only after the new one
verifies (hashes included); a full disk is retried, never answered by deleting. Resume verifies hashes and falls
back to the newest checkpoint that verifies and loads. Resuming is refused when the run changed in a way that
changes the math (its fingerprint), and nothing in a checkpoint is unpickled beyond tensors and an allowlist of
plain types (DeepSpeed's own loader included).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from vidtune.data.conversation import media_parts
from vidtune.data.measure_cache import file_identity
from vidtune.train.training.config import Recipe, RecipeError
from vidtune.train.training.health import TrainingError

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
RECIPE = "recipe.yaml"
PREFIX = "step_"
DELETING = ".del-"  # a checkpoint being deleted: renamed first, so a kill mid-delete never leaves a half one
RETRY_INTERVAL_S = 5.0  # between save attempts on a full disk


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


# ------------------------------------------------------------------------------------------------- integrity


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path, sync: bool = False) -> str:
    """sha256 of a file; with `sync`, its data is forced to disk first (a rename of unsynced files survives a power
    loss as zero-filled files of the right size)."""
    with path.open("rb") as f:
        if sync:
            os.fsync(f.fileno())
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path) -> None:
    """Every file with its size and sha256, all synced to disk (files, then folders, then the manifest)."""
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_digest(p, sync=True)} for p in paths
    }
    for sub in sorted({p.parent for p in paths}, key=lambda d: len(d.parts), reverse=True):
        _fsync_dir(sub)
    with (folder / MANIFEST).open("w", encoding="utf-8") as f:
        f.write(json.dumps({"files": files}, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def missing_parts(names: set[str]) -> list[str]:
    """What a checkpoint must hold to resume, checked against its manifest's list (a concurrent run once deleted
    the adapter and optimizer from a folder whose manifest then verified)."""
    missing = [name for name in (TRAINER_STATE, RECIPE, "random_states_0.pkl") if name not in names]
    if not any(n.endswith(".safetensors") or n.startswith("pytorch_model") for n in names):
        missing.append("model or adapter weights")
    # (optimizer_0/: FSDP's sharded optimizer state, one torch.distributed.checkpoint file per rank)
    if not any(n == "optimizer.bin" or "optim_states" in n or n.startswith("optimizer_0/") for n in names):
        missing.append("optimizer state")
    return missing


def checkpoint_problem(folder: Path, hashes: bool = True) -> str | None:
    """Why a checkpoint cannot be trusted (None when it verifies): no manifest, a required file missing, or a file
    whose size or sha256 differs from its manifest (`hashes=False`: sizes only, for listings)."""
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError
    except FileNotFoundError:
        return "no manifest (the save never finished)"
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest is unreadable"
    if missing := missing_parts(set(files)):
        return f"it lacks {', '.join(missing)}"
    for name, entry in files.items():
        path = folder / name
        size, digest = (entry, None) if isinstance(entry, int) else (entry.get("bytes"), entry.get("sha256"))
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, the manifest says {size:,}"
        if hashes and digest != file_digest(path):
            return f"{name} does not match its sha256 (damaged on disk)"
    return None


def verify(folder: Path, hashes: bool = True) -> bool:
    return checkpoint_problem(folder, hashes) is None


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every checkpoint folder (complete or not), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def complete_checkpoints(output_dir: str | Path, hashes: bool = False) -> list[Path]:
    return [p for p in step_folders(output_dir) if verify(p, hashes)]


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


def load_checkpoint(accelerator: Any, checkpoint: Path, load_kwargs: dict[str, Any]) -> str | None:
    """Load a verified checkpoint into the prepared objects; None, or why it did not load. A file that holds code
    is refused outright (RecipeError), never skipped."""
    import pickle

    try:
        check_rng_states(checkpoint, accelerator.process_index)
        accelerator.load_state(str(checkpoint), **load_kwargs)
    except pickle.UnpicklingError as err:
        raise RecipeError(
            f"{checkpoint}: refused to load a file that holds code or unknown objects "
            f"({str(err).splitlines()[0][:160]})"
        ) from None
    except Exception as err:  # damaged inside although its hashes match (a manifest written over it)
        return f"it does not load ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir, hashes=True)
    return found[-1] if found else None


def clean_leftovers(output_dir: str | Path, say: Any = print) -> None:
    """At start (main process): finish what a killed process left. A `.tmp-` save whose manifest verifies was
    complete and only missed its rename: publish it. Other `.tmp-` folders never completed: delete them. `.del-`
    folders are rotations killed mid-delete: finish deleting them. Step folders that do not verify are kept (resume
    names them as it skips them)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name.startswith(DELETING):
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.name.startswith(".tmp-"):
            final = root / folder.name.removeprefix(".tmp-")
            if not final.exists() and verify(folder):
                publish(folder, final)
                say(f"published {final.name}: its save was complete but not yet renamed")
            else:
                shutil.rmtree(folder, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """The rename that makes a checkpoint visible, made durable (the parent folder synced)."""
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def delete_checkpoint(folder: Path) -> None:
    """Rename, then delete: a process killed mid-delete leaves a `.del-` folder (cleaned at start), never a
    half-deleted step folder that looks like a checkpoint."""
    doomed = folder.with_name(DELETING + folder.name)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ saving


def save_checkpoint(
    accelerator: Any,
    output_dir: str | Path,
    step: int,
    keep_last: int,
    extra_files: dict[str, str],
    retry_s: float = 0.0,
    needed_bytes: int = 0,
    **save_kwargs: Any,
) -> Path:
    """Save the accelerator state for `step`; every rank calls this. Saving a step that is already saved (the stop
    path right after a periodic save) does nothing: re-saving it meant deleting a complete checkpoint first."""
    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    if final.is_dir() and verify(final, hashes=False):
        return final
    tmp = root / f".tmp-{final.name}"

    def attempt() -> None:
        # A full disk on one rank must not skip a barrier the others wait at: each phase's error is held until
        # every rank has passed the barrier, then raised (retry_when_disk_full agrees on it across ranks).
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        error = _disk_full_error(lambda: accelerator.save_state(str(tmp), safe_serialization=True, **save_kwargs), root)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and error is None:
            error = _disk_full_error(lambda: _finish(tmp, extra_files), root)
        if error is not None:
            raise error

    needed = needed_bytes or max((folder_bytes(p) for p in complete_checkpoints(output_dir)[-1:]), default=0)
    retry_when_disk_full(accelerator, attempt, root, needed, retry_s, cleanup=lambda: shutil.rmtree(tmp, True))
    if accelerator.is_main_process:
        if final.exists():  # a leftover that does not verify: out of the way before the rename
            delete_checkpoint(final)
        publish(tmp, final)
        if verify(final):  # old checkpoints go only once the new one verifies, hashes included
            for old in complete_checkpoints(output_dir)[:-keep_last]:
                if old != final:
                    delete_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


def _finish(tmp: Path, extra_files: dict[str, str]) -> None:
    for name, text in extra_files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    write_manifest(tmp)


def _disk_full_error(action: Any, folder: Path) -> OSError | None:
    try:
        action()
    except Exception as err:
        full = disk_full(err, folder)
        if full is None:
            raise
        return full
    return None


TORCH_WRITER_FAILED = ("inline_container.cc", "PytorchStreamWriter")  # torch.save's writer: says nothing of why
NEARLY_FULL_BYTES = 64 << 20


def disk_full(err: BaseException, folder: Path) -> OSError | None:
    """A full disk as OSError(ENOSPC), whichever library met it, else None. Python's own writes raise OSError;
    safetensors raises SafetensorError ("... No space left on device (os error 28)"), which is not one; torch.save
    raises a RuntimeError from its zip writer ("unexpected pos ...") that names no cause, so there a device left
    nearly full (its partial file fills it) is taken as the cause."""
    if isinstance(err, OSError):
        return err if err.errno == errno.ENOSPC else None
    text = str(err)
    if "os error 28" in text or os.strerror(errno.ENOSPC) in text:
        return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({type(err).__name__})")
    if isinstance(err, RuntimeError) and any(marker in text for marker in TORCH_WRITER_FAILED):
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
        if shutil.disk_usage(existing).free < NEARLY_FULL_BYTES:
            return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (torch.save)")
    return None


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def retry_when_disk_full(
    accelerator: Any, action: Any, folder: Path, needed_bytes: int, retry_s: float, cleanup: Any = None
) -> None:
    """Run `action` (on every rank); when any rank meets a full disk, say so in one line (the folder, the space
    needed), keep the trained state in memory and retry every RETRY_INTERVAL_S for up to `retry_s` seconds, so an
    operator can free space. Nothing older is deleted to make room."""
    deadline = time.monotonic() + retry_s
    while True:
        error = _disk_full_error(action, folder)
        if not _any_rank(accelerator, error is not None):
            return
        if cleanup is not None and accelerator.is_main_process:
            cleanup()  # our own partial files: the space they took is needed for the retry
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
        need = f"about {needed_bytes / 1e6:,.0f} MB needed, " if needed_bytes else ""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TrainingError(
                f"no space left on the device of {folder} ({need}{free / 1e6:,.0f} MB free); gave up after "
                f"train.save_retry_s={retry_s:g}s; the trained state of this process is lost"
            )
        accelerator.print(
            f"no space left on the device of {folder} ({need}{free / 1e6:,.0f} MB free): free space; the trained "
            f"state is kept and the save retried for {left:.0f}s more"
        )
        time.sleep(min(RETRY_INTERVAL_S, left))


def _any_rank(accelerator: Any, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    agreed = accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), "max")
    return bool(agreed.item())


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


def fingerprint(recipe: Recipe, world_size: int, train_rows: Any, template: str = "") -> dict[str, Any]:
    """What a checkpoint's optimizer state and data position only make sense with: the same rows in the same
    order with the same content, the same base weights, sampling and template, the same layout. A resume that
    changed any of these would train on silently as a different run."""
    if train_rows is not None:
        identity = json.dumps([list(train_rows["source"]), list(train_rows["row"])]).encode()
        data = f"{len(train_rows)} rows, sha1 {hashlib.sha1(identity).hexdigest()[:12]}"
    else:
        data = "stream of " + ", ".join(s.path for s in recipe.data.sources)
    f, lora, d, t = recipe.finetune, recipe.finetune.lora, recipe.data, recipe.train
    return {
        "world size": world_size,
        "dataset": data,
        "data content": ", ".join(content_hash(s.path) for s in d.sources),
        "media": media_identity(train_rows),
        "base model": model_identity(recipe.model.name_or_path),
        "seed": t.seed,
        "order": f"group_by_length {t.group_by_length}",
        "sampling": f"{d.sampling.num_frames} frames, fps {d.sampling.fps}, max_length {d.max_length}, "
        f"time instruction {d.time_instruction}, label turns {d.label_turns}",
        "template": hashlib.sha256(template.encode()).hexdigest()[:12],
        "adapter": f"{f.mode}, rank {lora.rank}, alpha {lora.alpha}, targets {sorted(lora.targets) or 'default'}, "
        f"projector {f.train_projector}, vision tower {f.vision_tower}, continued from {recipe.model.adapter}"
        # said only when trained: a run from before the knob existed keeps its fingerprint (and resumes)
        + (f", audio tower {f.audio_tower}" if f.audio_tower != "frozen" else ""),
        "batch": f"{recipe.train.batch_size} per device x {recipe.train.grad_accum_steps} accumulation",
    }


def media_identity(train_rows: Any) -> str:
    """The rows' media files by path, size and mtime (as the measuring cache keys them): a video replaced in place
    under the same name is a different run."""
    if train_rows is None:
        return "streamed (not fingerprinted)"
    paths = sorted({part["path"] or "" for messages in train_rows["messages"] for part in media_parts(messages)})
    digest = hashlib.sha1(json.dumps([file_identity(path) for path in paths]).encode()).hexdigest()[:12]
    return f"{len(paths)} files by size and mtime, sha1 {digest}"


def run_settings(recipe: Recipe) -> dict[str, Any]:
    """What users change on purpose when they resume (a lower learning rate, more steps): allowed, and printed."""
    t = recipe.train
    return {
        "learning rate": t.learning_rate,
        "max_steps": t.max_steps,
        "num_epochs": t.num_epochs,
        "scheduler": t.lr_scheduler,
        "warmup_ratio": t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
    }


def changed_settings(saved: dict[str, Any], recipe: Recipe) -> list[str]:
    return [
        f"{key} {saved.get(key)} -> {value}" for key, value in run_settings(recipe).items() if saved.get(key) != value
    ]


def state_bytes(trainable: list[Any]) -> int:
    """About what a checkpoint takes: the trainable weights and AdamW's two moments per weight (a weight ZeRO-3 has
    partitioned away reads numel() 0 on this rank; its full size is ds_numel)."""
    return 3 * sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in trainable)


def content_hash(path: str) -> str:
    """sha256 of an annotation file's bytes (a folder: its files' names and sizes; a Hub name: the name)."""
    source = Path(path)
    digest = hashlib.sha256()
    if source.is_file():
        digest.update(file_digest(source).encode())
    elif source.is_dir():
        for p in sorted(source.rglob("*")):
            if p.is_file():
                digest.update(f"{p.relative_to(source)}:{p.stat().st_size};".encode())
    else:
        digest.update(path.encode())
    return f"{source.name} sha256 {digest.hexdigest()[:12]}"


def model_identity(name_or_path: str) -> str:
    """A local base model by its config and weights (each weight file's size and its first and last MiB: cheap
    for a 14 GB model, and different weights differ there); a Hub id by its name."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return name_or_path
    digest = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.name == "config.json" or p.suffix in (".safetensors", ".bin"):
            size = p.stat().st_size
            with p.open("rb") as f:
                head = f.read(1 << 20)
                f.seek(max(0, size - (1 << 20)))
                digest.update(f"{p.name}:{size}:".encode() + head + f.read())
    return f"{folder.name} sha256 {digest.hexdigest()[:12]}"


def check_resume(saved: dict[str, Any], current: dict[str, Any], checkpoint: str, force: bool) -> list[str]:
    """Refuse to resume a checkpoint whose run differed (a flag forces it); return what changed."""
    changed = [  # (a key an older checkpoint lacks is not a change)
        f"{key}: {saved.get(key)} -> {value}" for key, value in current.items() if key in saved and saved[key] != value
    ]
    if changed and not force:
        raise RecipeError(
            f"cannot resume {checkpoint}: {'; '.join(changed)}. Use a new train.output_dir, or "
            "train.resume=force to continue anyway"
        )
    return changed
