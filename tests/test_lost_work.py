"""A hostile battery's "lost work" and "silent resume" faults (issue 13, items 1-6, 8, 10, 16), each injected for
real: an export over foreign files, a second run into the same folder, damaged checkpoint bytes, a full disk, a
crash between save and rename, SIGTERM during evaluation, NaN weights, secrets from the environment, and resumes
whose data, base model, seed, order or sampling changed."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_run_overrides
from tests.faults import InjectedCrash, inject
from vidtune.train.training import checkpoint as ckpt
from vidtune.train.training.config import RecipeError, load_recipe, recipe_to_yaml
from vidtune.train.training.health import TrainingError
from vidtune.train.training.preemption import TrainingStopped
from vidtune.train.training.tracking import read_metrics

pytestmark = pytest.mark.slow
CANARY = "hf_canary_7f3a9c1e"


def overrides(model: Path, corpus: Path, output: Path, *extra: str) -> list[str]:
    """4 steps of 2 micro-batches, a checkpoint every 2 (kept: 2)."""
    return tiny_run_overrides(
        model, corpus, output, "train.max_steps=4", "train.batch_size=2", "train.save_every_steps=2", *extra
    )


def train(*args: str):
    from vidtune.train.training.loop import train as run

    return run(load_recipe(None, list(args)))


def step_names(output: Path) -> list[str]:
    return sorted(p.name for p in (output / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def corpus_copy(demo_corpus, tmp_path_factory) -> Path:
    """The demo's questions in a folder of their own (their content can change), videos still in the corpus."""
    folder = tmp_path_factory.mktemp("annotations")
    shutil.copy(demo_corpus / "questions_train.jsonl", folder)
    return folder


def source(corpus_copy: Path, demo_corpus: Path) -> str:
    return f"data.sources=[{{path: {corpus_copy / 'questions_train.jsonl'}, media_root: {demo_corpus}}}]"


@pytest.fixture(scope="module")
def finished(tiny_model_dir, demo_corpus, corpus_copy, tmp_path_factory) -> Path:
    """A finished run from a recipe file that reads a token from the environment (wandb offline on), with
    checkpoints at steps 2 and 4."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VIDTUNE_CANARY", CANARY)
    root = tmp_path_factory.mktemp("finished")
    base = overrides(tiny_model_dir, demo_corpus, root / "run", source(corpus_copy, demo_corpus))
    recipe = root / "recipe.yaml"
    text = recipe_to_yaml(load_recipe(None, base))
    text = text.replace("license: other", "license: ${oc.env:VIDTUNE_CANARY}").replace(
        "report_to: none", "report_to: wandb"
    )
    recipe.write_text(text.replace("datasets: []", "datasets:\n  - ${oc.env:VIDTUNE_CANARY}"))
    from vidtune.train.training.loop import train as run

    loaded = load_recipe(recipe)
    assert loaded.hub.license == CANARY  # the run itself sees the value
    run(loaded)
    mp.undo()
    return root / "run"


# --------------------------------------------------------------------------------- 10: secrets stay out


def test_10_environment_values_never_reach_saved_or_logged_files(finished, tmp_path, monkeypatch, capsys):
    from vidtune.train.cli import main

    monkeypatch.setenv("VIDTUNE_CANARY", CANARY)
    main(["export", str(finished), "--to", str(tmp_path / "export")])
    assert (finished / "wandb").is_dir() and (finished / "checkpoints" / "step_00000004" / "recipe.yaml").is_file()
    files = [p for folder in (finished, tmp_path / "export") for p in folder.rglob("*") if p.is_file()]
    leaks = [str(p) for p in files if CANARY.encode() in p.read_bytes()]
    assert not leaks
    assert "${oc.env:VIDTUNE_CANARY}" in (finished / "recipe.yaml").read_text()


# ------------------------------------------------------------------------------------ 1: export deletes


def test_1_export_never_deletes_what_vidtune_did_not_write(finished, tmp_path, capsys):
    from vidtune.train.cli import main

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    for target in (foreign, finished.parent, finished):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(finished), "--to", str(target)])
        assert exit_info.value.code == 2
        assert "Traceback" not in capsys.readouterr().err
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"
    assert (finished / "adapter_model.safetensors").is_file() and (finished / "vidtune.json").is_file()
    again = tmp_path / "export"
    main(["export", str(finished), "--to", str(again)])
    main(["export", str(finished), "--to", str(again)])  # an earlier export is replaced
    (again / "notes.txt").write_text("mine")  # a user's file beside an earlier export: no longer only ours
    with pytest.raises(SystemExit):
        main(["export", str(finished), "--to", str(again)])
    assert (again / "notes.txt").read_text() == "mine" and (again / "README.md").is_file()


# --------------------------------------------------------------------------- 2: two runs in one folder


def test_2_a_second_run_into_a_locked_folder_refuses_naming_the_holder(tiny_model_dir, demo_corpus, tmp_path, capsys):
    from vidtune.train.cli import main

    output = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from pathlib import Path; from vidtune.train.training.outputs import lock_output_dir; "
            f"lock = lock_output_dir(Path({str(output)!r})); print('locked', flush=True); input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        recipe = tmp_path / "r.yaml"
        recipe.write_text(recipe_to_yaml(load_recipe(None, overrides(tiny_model_dir, demo_corpus, output))))
        with pytest.raises(SystemExit) as exit_info:
            main(["train", str(recipe)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert f"in use by another vidtune train (pid {holder.pid})" in err and len(err.splitlines()) == 1
    finally:
        holder.communicate("\n", timeout=30)
    assert not (output / "checkpoints").exists()


def test_2_a_manifest_must_list_every_file_a_checkpoint_needs(finished, tmp_path):
    damaged = shutil.copytree(finished / "checkpoints" / "step_00000004", tmp_path / "step_00000004")
    shutil.rmtree(damaged / "adapter")
    (damaged / "optimizer.bin").unlink()
    (damaged / "manifest.json").unlink()
    ckpt.write_manifest(damaged)  # what the racing run left: a manifest that matches what is there
    assert ckpt.checkpoint_problem(damaged) == "it lacks model or adapter weights, optimizer state"


# ------------------------------------------------------------------------------------ 3: integrity


def test_3_damaged_bytes_are_skipped_and_resume_falls_back_to_the_newest_intact(
    finished, tiny_model_dir, demo_corpus, corpus_copy, tmp_path, capsys
):
    output = shutil.copytree(finished, tmp_path / "run")
    newest = output / "checkpoints" / "step_00000004"
    weights = newest / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # same size, different weights: what a bad disk or an unsynced rename leaves
    weights.write_bytes(bytes(data))
    (newest / "random_states_0.pkl").write_bytes(bytes((newest / "random_states_0.pkl").stat().st_size))
    train(*overrides(tiny_model_dir, demo_corpus, output, source(corpus_copy, demo_corpus), "train.max_steps=6"))
    out = capsys.readouterr().out
    assert f"skipping {newest}: adapter/adapter_model.safetensors does not match its sha256" in out
    assert "resuming from" in out and "step_00000002" in out
    assert [m["step"] for m in read_metrics(output) if "train/loss" in m] == [1, 2, 3, 4, 5, 6]


def test_3_every_file_and_folder_is_synced_before_the_manifest(finished, tmp_path, monkeypatch):
    import os

    folder = shutil.copytree(finished / "checkpoints" / "step_00000002", tmp_path / "copy")
    (folder / "manifest.json").unlink()
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    ckpt.write_manifest(folder)
    files = [str(p) for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"]
    assert set(files) <= set(synced) and str(folder / "adapter") in synced and synced[-1] == str(folder)
    entry = json.loads((folder / "manifest.json").read_text())["files"]["optimizer.bin"]
    assert len(entry["sha256"]) == 64


# ------------------------------------------------------------------------------------- 4: disk full


def test_4_a_full_disk_at_the_final_save_is_retried_and_loses_nothing(
    tiny_model_dir, demo_corpus, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(ckpt, "RETRY_INTERVAL_S", 0.05)
    inject(monkeypatch, "enospc@final.2")  # the default: no periodic checkpoint, the final save is everything
    output = tmp_path / "run"
    train(*tiny_run_overrides(tiny_model_dir, demo_corpus, output, "train.max_steps=2", "train.save_retry_s=30"))
    out = capsys.readouterr().out
    assert out.count(f"no space left on the device of {output} (about ") == 2 and "MB needed" in out
    assert (output / "adapter_model.safetensors").is_file() and (output / "vidtune.json").is_file()


def test_4_a_disk_that_stays_full_fails_in_one_line_and_keeps_older_checkpoints(
    tiny_model_dir, demo_corpus, tmp_path, monkeypatch
):
    monkeypatch.setattr(ckpt, "RETRY_INTERVAL_S", 0.05)
    inject(monkeypatch, "enospc@step.4")  # the disk fills up after the checkpoint of step 2
    output = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"gave up after train\.save_retry_s=0\.2s") as err:
        train(
            *overrides(tiny_model_dir, demo_corpus, output, "train.keep_last_checkpoints=1", "train.save_retry_s=0.2")
        )
    assert "\n" not in str(err.value)
    assert step_names(output) == ["step_00000002"]  # the older checkpoint stays; the partial one is gone
    assert ckpt.checkpoint_problem(output / "checkpoints" / "step_00000002") is None


# ----------------------------------------------------------------------------- 5: keep_last=1 rotation


def test_5_the_stop_path_never_resaves_a_saved_step(tiny_model_dir, demo_corpus, tmp_path, monkeypatch):
    inject(monkeypatch, "term@1.0")  # arrives in step 2, which is also a periodic save
    manifests = []
    real = ckpt.write_manifest
    monkeypatch.setattr(ckpt, "write_manifest", lambda folder: manifests.append(folder.name) or real(folder))
    output = tmp_path / "run"
    with pytest.raises(TrainingStopped):
        train(*overrides(tiny_model_dir, demo_corpus, output, "train.keep_last_checkpoints=1"))
    assert manifests == [".tmp-step_00000002"] and step_names(output) == ["step_00000002"]


def test_5_a_crash_between_save_and_rename_is_published_and_half_deletes_are_finished(
    tiny_model_dir, demo_corpus, tmp_path, monkeypatch, capsys
):
    output = tmp_path / "run"
    args = overrides(tiny_model_dir, demo_corpus, output, "train.keep_last_checkpoints=1")
    with monkeypatch.context() as patched:
        inject(patched, "crashpublish@4")
        with pytest.raises(InjectedCrash):
            train(*args)
    assert step_names(output) == [".tmp-step_00000004", "step_00000002"]
    half = output / "checkpoints" / ".del-step_00000002"  # a rotation killed mid-delete
    shutil.copytree(output / "checkpoints" / "step_00000002", half)
    (half / "optimizer.bin").unlink()
    train(*args, "train.max_steps=6")
    out = capsys.readouterr().out
    assert "published step_00000004" in out and "resuming from" in out and "step_00000004" in out
    assert step_names(output) == ["step_00000006"]
    assert [m["step"] for m in read_metrics(output) if "train/loss" in m] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------------- 6: SIGTERM in eval


@pytest.mark.parametrize(
    ("fault", "evaluation", "logged"),
    [
        ("termeval@2", "train.eval_every_steps=2", "eval/loss"),
        ("termgen@2", "eval.every_steps=2", "eval/qa/"),
    ],
)
def test_6_sigterm_during_evaluation_stops_between_eval_batches(
    tiny_model_dir, demo_corpus, tmp_path, monkeypatch, fault, evaluation, logged
):
    inject(monkeypatch, fault)
    output = tmp_path / "run"
    held_out = f"[{{path: {demo_corpus / 'questions_eval.jsonl'}}}]"
    with pytest.raises(TrainingStopped) as stopped:
        train(
            *overrides(tiny_model_dir, demo_corpus, output, "train.save_every_steps=0", "eval.max_samples=4"),
            f"data.eval_sources={held_out}",
            evaluation,
        )
    assert stopped.value.signum == signal.SIGTERM and stopped.value.step == 2
    assert not any(logged in key for m in read_metrics(output) for key in m)  # abandoned, not finished
    assert step_names(output) == ["step_00000002"]


# ----------------------------------------------------------------------------------- 8: NaN weights


def test_8_non_finite_weights_are_never_saved(tiny_model_dir, demo_corpus, tmp_path, monkeypatch):
    inject(monkeypatch, "nanweights@4")
    output = tmp_path / "run"
    with pytest.raises(TrainingError, match="NaN or infinite values after step 4; nothing was saved"):
        train(*overrides(tiny_model_dir, demo_corpus, output))
    assert step_names(output) == ["step_00000002"]
    assert not (output / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------- 16: resume fingerprint


def test_16_resume_refuses_changes_to_the_math_and_prints_deliberate_ones(
    finished, tiny_model_dir, demo_corpus, corpus_copy, tmp_path, capsys
):
    output = shutil.copytree(finished, tmp_path / "run")
    changed_corpus = tmp_path / "changed"  # same file name, same rows, different answers
    changed_corpus.mkdir()
    text = (corpus_copy / "questions_train.jsonl").read_text()
    (changed_corpus / "questions_train.jsonl").write_text(text.replace('"red"', '"crimson"'))
    other_model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = bytearray((other_model / "model.safetensors").read_bytes())
    weights[-8:] = bytes(8)
    (other_model / "model.safetensors").write_bytes(bytes(weights))
    base = overrides(tiny_model_dir, demo_corpus, output, source(corpus_copy, demo_corpus), "train.max_steps=6")
    changes = {
        "data content": source(changed_corpus, demo_corpus),
        "base model": f"model.name_or_path={other_model}",
        "seed": "train.seed=7",
        "order": "train.group_by_length=false",
        "sampling": "data.sampling.num_frames=2",
    }
    for key, change in changes.items():
        with pytest.raises(RecipeError, match=f"cannot resume .*step_00000004: .*{key}: "):
            train(*base, change)
    train(*base, "train.learning_rate=5e-3")
    assert "changed: learning rate 0.01 -> 0.005, max_steps 4 -> 6" in capsys.readouterr().out
    train(*base, "train.max_steps=7", "train.seed=7", "train.resume=force")  # forced: allowed, and said
    assert "forced despite: seed: 42 -> 7" in capsys.readouterr().out
