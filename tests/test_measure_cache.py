"""The on-disk measuring cache (data/measure_cache.py): shared by `check` and `train`, safe on network file systems
and under writers in several processes at once (issue 24, items 10 and 15)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.conftest import tiny_run_overrides
from vidtune.data import dataset as dataset_module
from vidtune.data.dataset import prepare_rows
from vidtune.data.examples import ExampleBuilder
from vidtune.data.families import family_for
from vidtune.train.cli import main
from vidtune.train.training.config import load_recipe, recipe_to_yaml
from vidtune.train.training.model import load_processor


def test_check_fills_the_measuring_cache_train_reads(tmp_path, tiny_model_dir, demo_corpus, monkeypatch, capsys):
    monkeypatch.setenv("VIDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    recipe = load_recipe(None, tiny_run_overrides(tiny_model_dir, demo_corpus, tmp_path / "run"))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe_to_yaml(recipe))
    main(["check", str(recipe_file), "--out", str(tmp_path / "check.json")])
    assert "48 read" in capsys.readouterr().out
    with sqlite3.connect(tmp_path / "cache" / "measure.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM measured").fetchone()[0] == 48

    measured: list[str] = []  # rows `train` measures itself (what the cache did not answer)
    measure = dataset_module.Measurer.measure
    monkeypatch.setattr(
        dataset_module.Measurer, "measure", lambda self, row: measured.append(row["at"]) or measure(self, row)
    )
    family = family_for("llava_next_video")
    processor = load_processor(str(tiny_model_dir), family, frame_limits=recipe.model.frame_limits)
    builder = ExampleBuilder(processor, family, recipe.data.label_turns, raw_pixels=True)  # as build_loaders does
    rows, _, _ = prepare_rows(recipe.data, builder, recipe.train.seed)
    assert len(rows) == 48 and measured == []


def write_entries(cache_path: str, worker: int, num_entries: int) -> None:
    from vidtune.data.measure_cache import MeasureCache

    cache = MeasureCache("settings", Path(cache_path))
    for start in range(0, num_entries, 10):  # small transactions, interleaved with the other writer's
        batch = [(f"{worker}-{i}", {"worker": worker, "i": i, "pad": "x" * 500}) for i in range(start, start + 10)]
        cache.put_many(batch)
        assert cache.get(f"{worker}-{start}") == batch[0][1]
    assert cache.network_fs == "nfs4"


def test_on_a_network_file_system_the_cache_drops_wal_and_two_writers_do_not_corrupt_it(tmp_path, monkeypatch):
    import multiprocessing

    from vidtune.data import measure_cache
    from vidtune.data.measure_cache import MeasureCache, network_file_system

    shared = tmp_path / "nfs home"
    shared.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        f"server:/home {str(shared).replace(' ', chr(92) + '040')} nfs4 rw,vers=4.2 0 0\n"
        "tmpfs /dev/shm tmpfs rw 0 0\n"
    )
    monkeypatch.setattr(measure_cache, "MOUNTS", mounts)
    assert network_file_system(shared / "cache") == "nfs4" and network_file_system(tmp_path) is None

    path = shared / "cache" / "measure.sqlite"
    cache = MeasureCache("settings", path)
    assert cache.connection.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not WAL
    context = multiprocessing.get_context("fork")  # the children see the patched mount table
    writers = [context.Process(target=write_entries, args=(str(path), worker, 300)) for worker in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    assert [writer.exitcode for writer in writers] == [0, 0]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM measured").fetchone()[0] == 600
    assert not list(path.parent.glob("*-wal")) and not list(path.parent.glob("*-shm"))
    assert cache.get("1-299") == {"worker": 1, "i": 299, "pad": "x" * 500}
