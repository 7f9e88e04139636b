"""`vidtune cache RECIPE`: decode every clip a recipe trains and evaluates on into its frame cache, ahead of
training (data.frame_cache.dir), with several worker processes."""

from __future__ import annotations

import time
from multiprocessing import get_context
from typing import Any

from vidtune.data.conversation import DataError, media_parts
from vidtune.data.dataset import prepare_rows
from vidtune.data.examples import ExampleBuilder
from vidtune.data.families import family_for
from vidtune.data.frame_cache import FrameCache
from vidtune.train.training.config import Recipe, RecipeError
from vidtune.train.training.model import load_model_config, load_processor

_cache: FrameCache | None = None


def _start_worker(cache: FrameCache) -> None:
    global _cache
    _cache = cache


def _fill(clip: tuple[str, float | None, float | None]) -> str | None:
    assert _cache is not None
    try:
        _cache.load(*clip)
    except (DataError, OSError) as err:
        return f"{clip[0]}: {err}"
    return None


def fill_cache(recipe: Recipe, workers: int = 2) -> dict[str, Any]:
    data = recipe.data
    if not data.frame_cache.dir:
        raise RecipeError("the recipe has no frame cache: set data.frame_cache.dir")
    model = recipe.model
    family = family_for(load_model_config(model.name_or_path, model.trust_remote_code).model_type)
    builder = ExampleBuilder(
        load_processor(model.name_or_path, family, model.trust_remote_code, model.frame_limits),
        family,
        data.label_turns,
    )
    train_rows, eval_rows, _ = prepare_rows(data, builder, recipe.train.seed)
    rows = [*train_rows, *(eval_rows or [])]
    clips = sorted(
        {
            (p["path"], p["start_s"], p["end_s"])
            for r in rows
            for p in media_parts(r["messages"])
            if p["type"] == "video"
        },
        key=str,
    )
    cache = FrameCache(data.frame_cache, data.sampling, builder.frame_px)
    started = time.perf_counter()
    with get_context("fork").Pool(max(1, workers), initializer=_start_worker, initargs=(cache,)) as pool:
        failures = [f for f in pool.imap_unordered(_fill, clips, chunksize=4) if f]
    cache.evict()
    return {
        "clips": len(clips),
        "failed": failures,
        "seconds": time.perf_counter() - started,
        "cache_bytes": cache.size_bytes(),
        "dir": str(cache.root),
    }
