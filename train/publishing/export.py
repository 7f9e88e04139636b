"""`vidtune export`: a finished run -> the folder the Hugging Face Hub expects, optionally merged and pushed.

    EXPORT/adapter_config.json, adapter_model.safetensors   (or config.json + model*.safetensors when merged/full)
           processor_config.json, tokenizer*, chat_template.jinja
           vidtune.json   training metadata; `vidtune infer` reads it to sample frames as in training
           README.md      model card (YAML front matter, usage with transformers + peft and with vidtune)

Only files on an allowlist are ever copied or uploaded: never tokens, .env files, logs, optimizer states or wandb
folders, whatever else lies in the run folder.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidtune.train.publishing.model_card import is_hub_id
from vidtune.train.training.config import Recipe, RecipeError, recipe_to_dict
from vidtune.train.training.outputs import METADATA, read_metadata

ALLOWED_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    METADATA,
    "README.md",
)


def allowed(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in ALLOWED_FILES)


@dataclass
class ExportResult:
    folder: Path
    files: list[str]  # what the folder holds and a push uploads, in upload order
    pushed_to: str | None = None
    note: str | None = None  # for the publisher: the base is a local folder the card cannot link (see --base-id)


def check_run(run_dir: Path) -> dict[str, Any]:
    metadata = read_metadata(run_dir)
    if metadata is None:
        raise RecipeError(f"{run_dir}: not a finished vidtune run (no {METADATA}); train it to the end first")
    if not ((run_dir / "adapter_model.safetensors").is_file() or (run_dir / "config.json").is_file()):
        raise RecipeError(f"{run_dir}: holds neither an adapter nor model weights")
    return metadata


def copy_allowed(run_dir: Path, out: Path) -> None:
    for path in sorted(run_dir.iterdir()):
        if path.is_file() and allowed(path.name) and path.name != "README.md":
            shutil.copy2(path, out / path.name)


def merge_adapter(run_dir: Path, out: Path, metadata: dict[str, Any]) -> None:
    """The adapter folded into the base weights: a plain model that from_pretrained loads without peft."""
    from peft import PeftModel
    from transformers import AutoProcessor

    from vidtune.data.families import family_for
    from vidtune.train.training.model import load_model_config, model_class, refusing_pickles

    base = metadata["base_model"]
    family = family_for(load_model_config(base).model_type)
    with refusing_pickles(base, run_dir):
        # the base's own dtype (bf16 for the 7B), never quantized: a QLoRA adapter folds into the real weights
        model = model_class(family).from_pretrained(base, dtype="auto")
        merged = PeftModel.from_pretrained(model, str(run_dir)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    AutoProcessor.from_pretrained(str(run_dir)).save_pretrained(out)
    (out / METADATA).write_text(json.dumps({**metadata, "merged": True}, indent=2) + "\n", encoding="utf-8")


def export_folder(
    run_dir: str | Path, to: str | Path | None = None, merge: bool = False, card: dict[str, Any] | None = None
) -> ExportResult:
    """Write the Hub folder for a finished run (default: RUN_DIR/export) and return it with its file list."""
    run = Path(run_dir)
    metadata = check_run(run)
    base_id = (card or {}).get("base_id")
    if base_id is not None and not (is_hub_id(base_id) and base_id.count("/") == 1):
        raise RecipeError(f"--base-id {base_id!r}: give the Hub id of the base model, ORG/NAME")
    is_adapter = (run / "adapter_config.json").is_file()
    if merge and not is_adapter:
        raise RecipeError(f"{run}: --merge needs a LoRA run; this one already holds full weights")
    out = Path(to) if to else run / "export"
    prepare_export_folder(out, run)
    if merge:
        merge_adapter(run, out, metadata)
    else:
        copy_allowed(run, out)
    from vidtune.train.publishing.model_card import local_base_note, model_card

    if base_id:
        name_hub_base(out, base_id)
    card_metadata = read_metadata(out) or metadata
    (out / "README.md").write_text(
        model_card(card_metadata, card or {}, merged=merge or not is_adapter, name=run.resolve().name), encoding="utf-8"
    )
    files = sorted(p.name for p in out.iterdir() if p.is_file() and allowed(p.name))
    return ExportResult(out, files, note=None if base_id else local_base_note(metadata["base_model"]))


def name_hub_base(out: Path, base_id: str) -> None:
    """The export names the Hub base instead of the local folder it was trained from: in adapter_config.json (PEFT
    and `vidtune infer` load the base from it) and in vidtune.json (the card)."""
    for name, key in (("adapter_config.json", "base_model_name_or_path"), (METADATA, "base_model")):
        path = out / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            data[key] = base_id
            path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def prepare_export_folder(out: Path, run: Path) -> None:
    """An empty folder to export into. vidtune deletes only an earlier export of its own (a folder holding nothing
    but export files, vidtune.json among them): never a folder the user pointed --to by mistake, and never the
    run being exported."""
    target, source = out.resolve(), run.resolve()
    if target == source or source.is_relative_to(target):
        raise RecipeError(f"--to {out} holds the run {run} itself; export to a new folder")
    if target.exists() and not target.is_dir():
        raise RecipeError(f"--to {out} is a file; export to a new folder")
    entries = sorted(target.iterdir()) if target.is_dir() else []
    earlier_export = (target / METADATA).is_file() and all(p.is_file() and allowed(p.name) for p in entries)
    if entries and not earlier_export:
        raise RecipeError(
            f"--to {out} is not empty and is not an earlier vidtune export; vidtune deletes nothing it did not "
            "write: export to a new or empty folder"
        )
    for path in entries:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise RecipeError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again "
            "(`vidtune export RUN_DIR --push REPO_ID`)"
        )
    return token


def push(
    result: ExportResult,
    repo_id: str,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
) -> str:
    """Upload exactly `result.files` (one commit); the repo and branch are created when missing."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if api is None:
        api = HfApi(token=hub_token())
    url = api.create_repo(repo_id=repo_id, private=private, repo_type="model", exist_ok=True)
    if revision:
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(result.folder / name)) for name in result.files
    ]
    api.create_commit(
        repo_id=repo_id,
        operations=operations,
        revision=revision,
        repo_type="model",
        commit_message=commit_message or f"Upload {result.folder.name} with vidtune",
    )
    result.pushed_to = str(url)
    return str(url)


def push_finished_run(recipe: Recipe) -> str:
    """The recipe asked for it (hub.repo_id): export the finished run and push it; returns the URL. A failed push
    keeps the run and says how to retry."""
    hub, output = recipe.hub, recipe.train.output_dir
    try:
        result = export_folder(output, card=recipe_to_dict(recipe)["hub"])  # env values stay `${oc.env:...}`
        if result.note:
            print(result.note, file=sys.stderr)
        return push(result, hub.repo_id or "", private=hub.private, revision=hub.revision)
    except Exception as err:
        raise RecipeError(
            f"training finished and is saved in {output}, but the push to {hub.repo_id} failed "
            f"({str(err).splitlines()[0]}); retry with `vidtune export {output} --push {hub.repo_id}`"
        ) from None
