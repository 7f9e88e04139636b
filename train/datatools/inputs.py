"""Inputs checked before any model loads (a 7B takes minutes to load; a typo should take a second): local model
paths, recipe annotation files and media roots, videos and sound files named on the command line, the output folder.

Each failure is a DataError: one line saying what and where.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vidtune.data.conversation import DataError

ANNOTATION_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def check_model_path(path: str, what: str = "model") -> None:
    """A local-looking path that does not exist is "no such folder" at once, not a Hub lookup that retries for half
    a minute: it starts with . / ~, has more than one folder level, or its first folder exists here (`runs/nope`)."""
    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise DataError(
            f"{what} {path}: not a trained output folder or a model folder (no config.json or adapter_config.json;"
            " a run that has not finished keeps its checkpoints inside)"
        )
    if not path or folder.exists():
        return
    parts = Path(path).parts
    looks_local = path.startswith((".", "/", "~")) or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())
    if looks_local:
        raise DataError(f"{what} {path}: no such folder (give a trained output folder, a model folder or a Hub id)")


def check_video(path: str, flag: str = "--video") -> None:
    """The file exists and opens as a video (its header and index, no frames decoded)."""
    from vidtune.data.video import probe_video

    if not Path(path).is_file():
        raise DataError(f"{flag} {path}: no such file")
    try:
        probe_video(path)
    except DataError as err:
        raise DataError(f"{flag} {err}") from None


def check_sound(path: str, flag: str = "--audio") -> None:
    """The file exists and its header gives an audio stream and its length (nothing decoded)."""
    from vidtune.data.audio import sound_span

    if not Path(path).is_file():
        raise DataError(f"{flag} {path}: no such file")
    try:
        sound_span(path)
    except DataError as err:
        raise DataError(f"{flag} {err}") from None


def check_sources(sources: list[Any], key: str) -> None:
    """Every annotation file exists (a path with a file suffix; other names are Hugging Face datasets) and every
    media_root is a folder."""
    for index, source in enumerate(sources):
        where = f"{key}[{index}]"
        if Path(source.path).suffix.lower() in ANNOTATION_SUFFIXES and not Path(source.path).is_file():
            raise DataError(f"{where}.path {source.path}: annotation file not found")
        if source.media_root and not Path(source.media_root).expanduser().is_dir():
            raise DataError(f"{where}.media_root {source.media_root}: no such folder")


def check_output_dir(path: str) -> None:
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"train.output_dir {path}: is a file, not a folder")
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise DataError(f"train.output_dir {path}: {existing} is a file, not a folder")


def check_recipe_inputs(recipe: Any) -> None:
    """What a training run reads and writes, before the model loads."""
    check_model_path(recipe.model.name_or_path, "model.name_or_path")
    if recipe.model.adapter:
        check_model_path(recipe.model.adapter, "model.adapter")
    check_sources(recipe.data.sources, "data.sources")
    check_sources(recipe.data.eval_sources, "data.eval_sources")
    check_sources(recipe.eval.sources, "eval.sources")
    check_output_dir(recipe.train.output_dir)
