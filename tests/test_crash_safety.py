"""Faults around checkpoints, signals, non-finite losses and untrusted files, each injected for real: a crash in the
middle of a save, SIGTERM/SIGINT on a real subprocess, a NaN loss, a crafted pickle whose payload must not run."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_run_overrides
from tests.faults import cli_command, inject
from vidtune.train.training.config import RecipeError, load_recipe, recipe_to_yaml
from vidtune.train.training.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def recipe_overrides(model: Path, corpus: Path, output: Path, *extra: str) -> list[str]:
    """Two micro-batches per step (so faults can land mid-accumulation), checkpoints every 2 of 8 steps, dropout on
    (so RNG restoration shows)."""
    return tiny_run_overrides(
        model,
        corpus,
        output,
        "train.max_steps=8",
        "train.batch_size=2",
        "train.grad_accum_steps=2",
        "train.save_every_steps=2",
        "finetune.lora.dropout=0.1",
        *extra,
    )


def write_recipe(tmp_path: Path, name: str, overrides: list[str]) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(recipe_to_yaml(load_recipe(None, overrides)))
    return path


def run_cli(recipe: Path, env: dict | None = None, fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command("train", str(recipe), fault=fault),
        start_new_session=True,  # its own process group: a process-group signal stays inside it
        cwd=REPO,
        text=True,
        capture_output=True,
        env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
        timeout=600,
    )


def losses(output: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(output) if "train/loss" in m}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, demo_corpus, tmp_path_factory) -> Path:
    from vidtune.train.training.loop import train

    output = tmp_path_factory.mktemp("whole") / "run"
    train(load_recipe(None, recipe_overrides(tiny_model_dir, demo_corpus, output)))
    return output


def test_a_crash_in_the_middle_of_a_save_leaves_no_checkpoint_resume_would_pick(
    uninterrupted, tiny_model_dir, demo_corpus, tmp_path
):
    output = tmp_path / "run"
    recipe = write_recipe(tmp_path, "r", recipe_overrides(tiny_model_dir, demo_corpus, output))
    crashed = run_cli(recipe, fault="killsave@4")
    assert crashed.returncode == -signal.SIGKILL
    root = output / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step_00000004", "step_00000002"]  # half-written
    resumed = run_cli(recipe)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "step_00000002" in resumed.stdout
    assert not (root / ".tmp-step_00000004").exists()
    assert losses(output) == losses(uninterrupted)


def test_a_checkpoint_that_does_not_verify_is_kept_but_not_resumed(
    uninterrupted, tiny_model_dir, demo_corpus, tmp_path
):
    from vidtune.train.training.loop import train

    output = tmp_path / "run"
    overrides = recipe_overrides(tiny_model_dir, demo_corpus, output, "train.keep_last_checkpoints=5")
    train(load_recipe(None, [*overrides, "train.max_steps=4"]))  # checkpoints at steps 2 and 4 (schedule of 4)
    damaged = output / "checkpoints" / "step_00000004" / "optimizer.bin"
    damaged.write_bytes(damaged.read_bytes()[:100])  # a disk that filled up, a partial copy
    from vidtune.train.training.checkpoint import latest_checkpoint

    assert latest_checkpoint(output).name == "step_00000002"
    assert damaged.exists()  # finished work is never deleted because it looks wrong


@pytest.mark.parametrize(("signum", "fault"), [(signal.SIGTERM, "term@3.1"), (signal.SIGINT, "int@3.1")])
def test_a_signal_saves_a_checkpoint_and_the_relaunch_resumes_exactly(
    uninterrupted, tiny_model_dir, demo_corpus, tmp_path, signum, fault
):
    """The signal lands mid-accumulation in step 4; the step finishes, a checkpoint is written, the run exits with
    128+signal, and the relaunch continues to the same losses as the uninterrupted run."""
    output = tmp_path / "run"
    recipe = write_recipe(tmp_path, "r", recipe_overrides(tiny_model_dir, demo_corpus, output))
    stopped = run_cli(recipe, fault=fault)
    assert stopped.returncode == 128 + signum, stopped.stderr[-2000:]
    assert f"stopped by {signal.Signals(signum).name} after step 4" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert (output / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    resumed = run_cli(recipe)
    assert resumed.returncode == 0 and "step_00000004" in resumed.stdout
    assert losses(output) == losses(uninterrupted)


def test_sigterm_to_the_whole_process_group_with_dataloader_workers_saves_and_resumes(
    uninterrupted, tiny_model_dir, demo_corpus, tmp_path
):
    """As SLURM, `timeout` and Kubernetes send it: SIGTERM to the run's process group, DataLoader workers included,
    mid-accumulation in step 4. The run checkpoints step 4 and exits 143; the relaunch ends with the uninterrupted
    run's losses."""
    output = tmp_path / "run"
    recipe = write_recipe(tmp_path, "r", recipe_overrides(tiny_model_dir, demo_corpus, output, "data.num_workers=1"))
    stopped = run_cli(recipe, fault="pgterm@3.1")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "stopped by SIGTERM after step 4" in stopped.stderr and "Traceback" not in stopped.stderr
    assert (output / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    resumed = run_cli(recipe)
    assert resumed.returncode == 0 and "step_00000004" in resumed.stdout, resumed.stderr[-2000:]
    assert losses(output) == losses(uninterrupted)


def test_an_external_sigterm_on_a_running_subprocess(tiny_model_dir, demo_corpus, tmp_path):
    """As a scheduler would: SIGTERM from outside while the run trains; it checkpoints, exits 143, and resumes."""
    output = tmp_path / "run"
    recipe = write_recipe(
        tmp_path,
        "r",
        recipe_overrides(tiny_model_dir, demo_corpus, output, "train.max_steps=400", "train.save_every_steps=0"),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "vidtune.train.cli", "train", str(recipe)],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"},
    )
    for line in process.stdout:
        if line.startswith("step 2/"):
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-2000:]
    saved = sorted((output / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and int(saved[0].name[5:]) >= 2
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    assert state["state"]["step"] == int(saved[0].name[5:])


def optimizer_state(run) -> dict:
    """Every value of the optimizer's state (moments, step counts, 8-bit codebooks and absmax), copied."""
    return {
        (index, key): value.detach().clone() if torch.is_tensor(value) else value
        for index, state in enumerate(run.optimizer.optimizer.state.values())
        for key, value in state.items()
    }


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def train_recording_steps(model, corpus, tmp_path, max_steps: int, monkeypatch, *extra: str) -> tuple:
    """A short run, recording per window whether the trainable weights and the optimizer's state stayed. Returns
    the run, its final metrics and the records."""
    import vidtune.train.training.loop as loop

    overrides = recipe_overrides(model, corpus, tmp_path / "run", f"train.max_steps={max_steps}", *extra)
    run = loop.setup(load_recipe(None, [*overrides, "train.save_every_steps=0"]))

    unchanged = []
    real_step = loop.train_step

    def recording_step(run_, window):
        before = {n: p.detach().clone() for n, p in run_.model.named_parameters() if p.requires_grad}
        state = optimizer_state(run_)
        result = real_step(run_, window)
        weights = all(torch.equal(before[n], p) for n, p in run_.model.named_parameters() if p.requires_grad)
        unchanged.append(weights and same_state(state, optimizer_state(run_)))
        return result

    monkeypatch.setattr(loop, "train_step", recording_step)
    return run, loop.train_loop(run), unchanged


def adam_steps(run) -> set[int]:
    """AdamW's own step counts (the bias correction): a dropped update must not advance them."""
    return {int(state["step"]) for state in run.optimizer.optimizer.state.values()}


def test_a_non_finite_loss_drops_its_update(tiny_model_dir, demo_corpus, tmp_path, monkeypatch):
    """The update is dropped on the device (no host sync): weights and Adam's moments stay, the step counts."""
    inject(monkeypatch, "nan@2")
    run, metrics, unchanged = train_recording_steps(tiny_model_dir, demo_corpus, tmp_path, 4, monkeypatch)
    assert unchanged == [False, False, True, False]  # the third step's loss was NaN: its update was dropped
    assert run.state.step == 4 and adam_steps(run) == {3} and metrics["train/nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_an_8bit_optimizer_skips_a_non_finite_step_exactly(tiny_model_dir, demo_corpus, tmp_path, monkeypatch):
    """bitsandbytes' 8-bit AdamW has no found_inf: the host skips the step, and its 8-bit moments, absmax and step
    count stay bit-exact, and the run still makes its max_steps updates (full fine-tuning: the tiny model's
    weights of >= 4096 values get 8-bit states). (paged_adamw_8bit is this same optimizer without CUDA.)"""
    inject(monkeypatch, "nan@2")
    extra = ("finetune.mode=full", "train.optimizer=adamw_8bit")
    run, metrics, unchanged = train_recording_steps(tiny_model_dir, demo_corpus, tmp_path, 4, monkeypatch, *extra)
    # the third window's loss was NaN: nothing changed; a step skipped on the host is no step, so a fifth runs
    assert unchanged == [False, False, True, False, False]
    states = run.optimizer.optimizer.state.values()
    assert {s["step"] for s in states} == {4} and any(s["state1"].dtype == torch.uint8 for s in states)
    assert run.state.step == 4 and metrics["train/nonfinite_steps"] == 1


def test_an_8bit_optimizer_resumes_with_identical_losses(tiny_model_dir, demo_corpus, tmp_path, monkeypatch):
    """A SIGTERM in step 1 saves its checkpoint (8-bit moments, absmax, codebooks); the relaunch logs steps 2 and 3
    exactly as the uninterrupted run does (step 3's loss follows step 2's update from the restored states)."""
    from vidtune.train.training.loop import train
    from vidtune.train.training.preemption import TrainingStopped

    extra = ("finetune.mode=full", "train.optimizer=adamw_8bit", "train.max_steps=3", "train.save_every_steps=1")
    train(load_recipe(None, recipe_overrides(tiny_model_dir, demo_corpus, tmp_path / "whole", *extra)))
    recipe = load_recipe(None, recipe_overrides(tiny_model_dir, demo_corpus, tmp_path / "cut", *extra))
    inject(monkeypatch, "term@0.1")
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after step 1"):
        train(recipe)
    monkeypatch.undo()
    assert sorted(losses(tmp_path / "cut")) == [1]
    train(recipe)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole") and sorted(losses(tmp_path / "whole")) == [1, 2, 3]


def test_a_non_finite_gradient_with_a_finite_loss_drops_its_update(tiny_model_dir, demo_corpus, tmp_path, monkeypatch):
    """The loss is finite, one gradient is not (an overflow in backward): the update is dropped and counted."""
    inject(monkeypatch, "infgrad@1")
    run, metrics, unchanged = train_recording_steps(tiny_model_dir, demo_corpus, tmp_path, 3, monkeypatch)
    assert unchanged == [False, True, False]
    assert run.state.step == 3 and adam_steps(run) == {2} and metrics["train/nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_non_finite_losses_in_a_row_stop_the_run(tiny_model_dir, demo_corpus, tmp_path, monkeypatch):
    from vidtune.train.training.health import TrainingError
    from vidtune.train.training.loop import train

    inject(monkeypatch, "nan@1.9")  # steps 2, 3, 4, ... are NaN
    with pytest.raises(TrainingError, match="NaN or infinite 3 times in a row at step 4"):
        train(
            load_recipe(
                None, recipe_overrides(tiny_model_dir, demo_corpus, tmp_path / "run", "train.max_nonfinite_steps=3")
            )
        )


@pytest.mark.parametrize("change", ["data", "targets"])
def test_resuming_a_changed_run_is_refused_unless_forced(tiny_model_dir, demo_corpus, tmp_path, change):
    from vidtune.train.training.loop import train

    output = tmp_path / "run"
    train(load_recipe(None, recipe_overrides(tiny_model_dir, demo_corpus, output, "train.max_steps=2")))
    changed = {
        "data": f"data.sources=[{{path: {demo_corpus / 'questions_train.jsonl'}, num_samples: 40}}]",
        "targets": "finetune.lora.targets=[q_proj, v_proj]",
    }[change]
    overrides = recipe_overrides(tiny_model_dir, demo_corpus, output, "train.max_steps=4", changed)
    with pytest.raises(
        RecipeError, match=f"cannot resume .*step_00000002: {'dataset' if change == 'data' else 'adapter'}"
    ):
        train(load_recipe(None, overrides))
    if change == "data":  # the flag forces it (a new adapter layout could not load, so only data is forced here)
        train(load_recipe(None, [*overrides, "train.resume=force"]))
        assert max(losses(output)) == 4


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Payload.sentinel}",))


@pytest.mark.parametrize("victim", ["optimizer.bin", "random_states_0.pkl", "scheduler.bin"])
def test_a_crafted_pickle_in_a_checkpoint_does_not_run(tiny_model_dir, demo_corpus, tmp_path, victim):
    from vidtune.train.training.checkpoint import write_manifest
    from vidtune.train.training.loop import train

    output = tmp_path / "run"
    train(load_recipe(None, recipe_overrides(tiny_model_dir, demo_corpus, output, "train.max_steps=2")))
    checkpoint = output / "checkpoints" / "step_00000002"
    Payload.sentinel = tmp_path / "payload-ran"
    torch.save({"state": Payload()}, checkpoint / victim)  # as an attacker would, manifest updated to match
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint)
    with pytest.raises(RecipeError, match="refused to load a file that holds code"):
        train(load_recipe(None, recipe_overrides(tiny_model_dir, demo_corpus, output, "train.max_steps=4")))
    assert not Payload.sentinel.exists()


def test_deepspeed_checkpoint_files_load_with_weights_only(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from vidtune.train.training.distributed import load_deepspeed_checkpoints_safely

    load_deepspeed_checkpoints_safely()
    engine = TorchCheckpointEngine.__new__(TorchCheckpointEngine)
    legit = tmp_path / "optim_states.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.weights, "w": torch.ones(2)}, legit)
    assert engine.load(str(legit))["zero_stage"] == ZeroStageEnum.weights
    Payload.sentinel = tmp_path / "payload-ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({"optimizer_state_dict": Payload()}, crafted)
    with pytest.raises(pickle.UnpicklingError):
        engine.load(str(crafted))
    assert not Payload.sentinel.exists()


def test_no_unsafe_loading_in_the_code():
    """Every torch.load asks for weights_only=True; YAML is read with safe_load; remote code only when asked."""
    sources = [p for folder in ("data", "train") for p in (REPO / folder).rglob("*.py")]
    text = {p: p.read_text() for p in sources}
    for path, code in text.items():
        for line in code.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (path, line)
            recipe_loader = "yaml.load(text, Loader=RecipeLoader)" in line  # a SafeLoader subclass: checked below
            # The server's decoder child hands its frames back pickled in the request's private temporary folder
            # (serving/decode.py): our own process's output, never a user's file.
            own_child = path.name == "decode.py" and "pickle.loads(result.read_bytes())" in line
            assert ("yaml.load(" not in line or recipe_loader) and ("pickle.load" not in line or own_child), (
                path,
                line,
            )
            assert "trust_remote_code=True" not in line, (path, line)
    assert any("torch.load(" in code for code in text.values())  # the scan does look at real loads
    from vidtune.train.training.config import RecipeLoader

    assert issubclass(RecipeLoader, yaml.SafeLoader)  # recipes: safe tags only (plus duplicate-key and depth checks)
