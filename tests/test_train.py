"""Training on the tiny model: what trains is what the recipe says, runs are reproducible, resume is exact, and the
output folder is a plain PEFT adapter that transformers + peft load without vidtune."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import RUN_FAMILIES, resumable_run, tiny_run_overrides
from tests.faults import cli_command
from vidtune.train.training.config import Recipe, load_recipe
from vidtune.train.training.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(model: Path, corpus: Path, output: Path, *overrides: str) -> Recipe:
    return load_recipe(None, tiny_run_overrides(model, corpus, output, *overrides))


def losses(output: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(output) if "train/loss" in m}


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, demo_corpus, tmp_path_factory):
    """One short LoRA run (module-wide): its output folder, and parameters before/after from the same process."""
    from vidtune.train.training.loop import save_outputs, setup, train_loop

    output = tmp_path_factory.mktemp("lora-run")
    run = setup(tiny_recipe(tiny_model_dir, demo_corpus, output))
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    metrics = train_loop(run)
    save_outputs(run, metrics)
    after = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    return output, before, after


@pytest.mark.slow
def test_lora_trains_the_adapter_and_leaves_the_base_untouched(lora_run):
    _, before, after = lora_run
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and all("language_model" in n for n in lora)
    assert all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in base)


@pytest.mark.slow
def test_output_folder_is_a_peft_adapter_with_processor_recipe_and_metadata(lora_run):
    output, _, _ = lora_run
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "recipe.yaml",
        "vidtune.json",
        "trainable_parameters.json",
        "metrics.jsonl",
    ):
        assert (output / name).is_file(), name
    assert not list(output.glob("model*.safetensors"))  # no copy of the frozen base model
    metadata = json.loads((output / "vidtune.json").read_text())
    assert metadata["sampling"]["num_frames"] == 4 and metadata["steps"] == 6
    assert (
        "</s>" in (output / "chat_template.jinja").read_text()
        or "eos_token" in (output / "chat_template.jinja").read_text()
    )
    assert load_recipe(output / "recipe.yaml").train.max_steps == 6


@pytest.mark.slow
def test_the_logged_learning_rate_is_the_one_each_step_used(lora_run):
    """Read before the scheduler moves on: step 1 logs the peak rate (no warmup), the last step a non-zero one."""
    output, _, _ = lora_run
    rates = {m["step"]: m["train/lr"] for m in read_metrics(output) if "train/lr" in m}
    assert sorted(rates) == list(range(1, 7))
    assert rates[1] == pytest.approx(1e-2) and 0 < rates[6] < rates[5] < rates[1]


@pytest.mark.slow
def test_the_saved_processor_pads_on_the_side_it_came_with(lora_run, tiny_model_dir):
    """Users batch with the saved processor and call generate: it must pad left like the base's (the hub's) does;
    training batches are right-padded by the collator, not by changing the tokenizer."""
    from transformers import AutoProcessor

    output, _, _ = lora_run
    base_side = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer.padding_side
    assert base_side == "left"
    assert AutoProcessor.from_pretrained(output).tokenizer.padding_side == base_side


@pytest.mark.slow
def test_a_finished_run_is_not_trained_again_unless_restarted(tiny_model_dir, demo_corpus, tmp_path, capsys):
    """No intermediate checkpoints (save_every_steps 0): a relaunch must not start over from step 1 and append the
    same steps again; train.resume=restart does start over, once."""
    from vidtune.train.training.loop import train

    output = tmp_path / "run"
    train(tiny_recipe(tiny_model_dir, demo_corpus, output, "train.max_steps=2"))
    finished_at = json.loads((output / "vidtune.json").read_text())["finished_at"]
    capsys.readouterr()
    train(tiny_recipe(tiny_model_dir, demo_corpus, output, "train.max_steps=2"))
    assert "already holds this run, finished after 2 steps" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(output) if "train/loss" in m] == [1, 2]
    assert json.loads((output / "vidtune.json").read_text())["finished_at"] == finished_at
    train(tiny_recipe(tiny_model_dir, demo_corpus, output, "train.max_steps=2", "train.resume=restart"))
    assert [m["step"] for m in read_metrics(output) if "train/loss" in m] == [1, 2]
    assert "already holds" not in capsys.readouterr().out


@pytest.mark.slow
def test_same_seed_gives_identical_losses(tiny_model_dir, demo_corpus, tmp_path):
    from vidtune.train.training.loop import train

    for name in ("a", "b"):
        train(
            tiny_recipe(tiny_model_dir, demo_corpus, tmp_path / name, "train.max_steps=4", "finetune.lora.dropout=0.1")
        )
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 4
    train(
        tiny_recipe(
            tiny_model_dir,
            demo_corpus,
            tmp_path / "c",
            "train.max_steps=4",
            "train.seed=7",
            "finetune.lora.dropout=0.1",
        )
    )
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


def write_recipe(recipe: Recipe, path: Path) -> Path:
    from vidtune.train.training.config import recipe_to_yaml

    path.write_text(recipe_to_yaml(recipe))
    return path


def run_cli(*args: str, env: dict | None = None, fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(*args, fault=fault),
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", RUN_FAMILIES)
def test_a_killed_run_resumes_at_its_checkpoint_with_identical_losses(
    family, family_kits, family_runs, demo_corpus, tmp_path, capsys
):
    """kill -9 mid-epoch and mid-accumulation (step 3 of 4, 2nd micro-batch; checkpoints every 2 steps), relaunch:
    the run continues from step 2 and steps 3-4, across the epoch boundary after step 3 (Accelerate's loader sets
    its sampler's epoch from its own pass counter), log exactly the uninterrupted run's losses (dropout on), for every
    family (Qwen's grids and time tensors, OneVision's newline hook come back with the data position). The
    relaunch runs in this process (a fresh interpreter per family would double the test's cost): it starts from
    the dead process's checkpoint on disk, with this process's RNGs wherever earlier tests left them."""
    from vidtune.train.training.loop import train

    recipe = tiny_recipe(family_kits(family).model_dir, demo_corpus, tmp_path / "cut", *resumable_run(demo_corpus))
    crashed = write_recipe(recipe, tmp_path / "cut.yaml")
    killed = run_cli("train", str(crashed), fault="kill@2.1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").glob("step_*")] == ["step_00000002"]
    capsys.readouterr()
    train(load_recipe(crashed))
    resumed = capsys.readouterr().out
    assert "resuming from" in resumed and "step_00000002" in resumed
    reference = losses(family_runs(family))
    assert losses(tmp_path / "cut") == reference and sorted(reference) == [1, 2, 3, 4]
    train(load_recipe(crashed))  # a finished run has nothing left to do
    rerun = capsys.readouterr().out
    assert "already holds this run, finished after 4 steps" in rerun and "resuming" not in rerun
    assert sorted(losses(tmp_path / "cut")) == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("family", RUN_FAMILIES)
def test_infer_predict_eval_and_chat_commands(family, family_runs, demo_corpus, tmp_path, capsys):
    from vidtune.train.cli import main
    from vidtune.train.generation.chat import chat
    from vidtune.train.generation.infer import load_for_inference

    output = family_runs(family)  # trained on first use: its console output is not the answer
    capsys.readouterr()
    video = str(demo_corpus / "videos" / "eval_0000.mp4")
    main(["infer", str(output), "--video", video, "--prompt", "Which color comes first?", "--max-new-tokens", "4"])
    answer = capsys.readouterr().out.strip()  # a 4-step adapter may well answer nothing; the commands must agree

    data = str(demo_corpus / "questions_eval.jsonl")
    predictions = tmp_path / "predictions.jsonl"
    main(
        [
            "predict",
            str(output),
            "--data",
            data,
            "--out",
            str(predictions),
            "--batch-size",
            "5",
            "--max-new-tokens",
            "4",
        ]
    )
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 16 and rows[0]["question"] == "Which color comes first?"
    assert rows[0]["references"][0] in ("red", "green", "blue", "yellow") and rows[0]["prediction"] == answer
    assert rows[0]["media"] == [str(demo_corpus / "videos" / "eval_0000.mp4")]  # not only "file line N"

    evaluated = tmp_path / "eval"
    command = ["eval", str(output), "--data", data, "--task", "qa", "--out", str(evaluated), "--batch-size", "5"]
    main([*command, "--max-new-tokens", "4"])
    metrics = json.loads((evaluated / "metrics.json").read_text())
    records = [json.loads(line) for line in (evaluated / "predictions.jsonl").read_text().splitlines()]
    assert metrics["num_samples"] == len(records) == 16
    # The same fields (and the same greedy answers) as predict's, the scores beside them.
    assert [{key: r[key] for key in rows[0]} for r in records] == rows
    right = sum(r["prediction"].strip().lower() == r["references"][0].lower() for r in records)
    assert metrics["exact_match"] == pytest.approx(right / 16)

    script = iter(
        [
            "Which color comes first?",
            "/video /no/such.mp4",
            f"/video {video}",
            "And last?",
            "/reset",
            "Which color comes first?",
            "/quit",
        ]
    )
    said: list[str] = []
    chat(load_for_inference(str(output)), video, read=lambda _: next(script), write=said.append, max_new_tokens=4)
    replies = [line for line in said if line.startswith("model> ")]
    assert len(replies) == 3 and replies[0] == replies[2] == f"model> {answer}"  # reset: same first answer again
    assert any("no video at" in line for line in said) and "(conversation reset)" in said


@pytest.mark.slow
def test_a_bf16_model_trains_its_weights_in_fp32(tiny_model_dir, demo_corpus, tmp_path):
    """model.dtype bfloat16 (every 7B recipe): the trainable projector and LoRA weights, and their Adam states, are
    fp32, so an lr-sized step moves every weight (in bf16 most would not move at lr 1e-5); frozen weights stay bf16.
    Without autocast the combination is refused in one line."""
    from accelerate.state import AcceleratorState

    from vidtune.train.training.config import RecipeError
    from vidtune.train.training.loop import setup, train_loop

    # Accelerate keeps one mixed-precision setting per process: this test changes it, twice.
    AcceleratorState._reset_state(reset_partial_state=True)
    overrides = ("model.dtype=bfloat16", "finetune.train_projector=true", "train.max_steps=1")
    run = setup(
        tiny_recipe(
            tiny_model_dir,
            demo_corpus,
            tmp_path / "a",
            *overrides,
            "train.mixed_precision=bf16",
            "train.learning_rate=1e-5",
        )
    )
    trainable = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in run.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    projector = {n: p.detach().clone() for n, p in trainable.items() if "multi_modal_projector" in n}
    assert projector
    train_loop(run)
    moved = [(trainable[n] != before).float().mean().item() for n, before in projector.items()]
    assert min(moved) > 0.99, moved
    states = [t for state in run.optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.ndim]
    assert states and {t.dtype for t in states} == {torch.float32}
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(RecipeError, match="would train without an fp32 copy"):
        setup(tiny_recipe(tiny_model_dir, demo_corpus, tmp_path / "b", *overrides, "train.mixed_precision=no"))
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_a_cli_media_path_outside_its_root_names_the_flag_before_any_model_loads(
    command, clips, tmp_path, monkeypatch, capsys
):
    from vidtune.train import cli

    def never(*args, **kwargs):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr("vidtune.train.generation.infer.load_for_inference", never)
    (tmp_path / "data").mkdir()
    rows = tmp_path / "data" / "rows.jsonl"
    rows.write_text(json.dumps({"video": str(clips["red_blue"]), "question": "Q?", "answer": "red"}) + "\n")
    extra = ["--out", str(tmp_path / "out.jsonl")] if command == "predict" else ["--task", "qa"]
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, str(tmp_path / "no-model"), "--data", str(rows), *extra])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "lies outside the media root" in error and "(set --media-root)" in error
    assert "source's media_root" not in error and error.count("\n") == 1


@pytest.mark.slow
def test_a_streamed_run_with_dataloader_workers_trains_and_counts_its_samples(
    tiny_model_dir, demo_corpus, tmp_path, capsys
):
    from vidtune.train.training.loop import train

    output = tmp_path / "run"
    train(
        tiny_recipe(
            tiny_model_dir, demo_corpus, output, "data.streaming=true", "data.num_workers=2", "train.max_steps=2"
        )
    )
    printed = capsys.readouterr().out
    assert "data: streamed" in printed and "0 samples kept" not in printed
    assert json.loads((output / "vidtune.json").read_text())["num_train_samples"] == 2 * 4
    assert len(losses(output)) == 2


def test_a_finished_run_leaves_no_dataloader_workers_behind(tiny_model_dir, demo_corpus, tmp_path):
    """Persistent workers stop with the run. Left alive (Accelerate keeps a reference to the loader), they were
    terminated at interpreter exit, and torch printed "DataLoader worker ... killed by signal: Terminated" after
    every successful `vidtune demo`."""
    from vidtune.train.training.loop import train

    train(tiny_recipe(tiny_model_dir, demo_corpus, tmp_path / "run", "data.num_workers=2", "train.max_steps=2"))
    assert not multiprocessing.active_children()
