"""What still lost work or ignored the user (issue 24, items 1-8), each met for real: an evaluation that fails, a
held-out loss that must not build full-vocabulary logits, a streamed clip that probes but does not decode, a real
full filesystem at the final save, resumes across an epoch boundary and with a changed learning rate, SIGTERM in
a slow evaluation, and fp16's loss scaler calibrating."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_run_overrides
from vidtune.train.training import checkpoint as ckpt
from vidtune.train.training import outputs
from vidtune.train.training.config import load_recipe
from vidtune.train.training.preemption import TrainingStopped
from vidtune.train.training.tracking import read_metrics

pytestmark = pytest.mark.slow


def train(*args: str):
    from vidtune.train.training.loop import train as run

    return run(load_recipe(None, list(args)))


def losses(output: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(output) if "train/loss" in m}


def undecodable_copy(clip: Path, target: Path) -> Path:
    """The clip with every coded frame zeroed: its header still lists them (it probes and measures fine), and
    decoding them fails."""
    data = bytearray(clip.read_bytes())
    box = data.find(b"mdat") - 4
    size = int.from_bytes(data[box : box + 4], "big")
    data[box + 8 : box + size] = bytes(size - 8)
    target.write_bytes(bytes(data))
    return target


@pytest.fixture(scope="module")
def corpus(demo_corpus, tmp_path_factory) -> Path:
    """train.jsonl: 7 demo questions and, third, one on a clip that measures but does not decode; held_out.jsonl:
    2 held-out questions and one on that clip."""
    root = tmp_path_factory.mktemp("undecodable")
    (root / "videos").mkdir()
    for clip in (demo_corpus / "videos").glob("*_000[0-3].mp4"):
        shutil.copy(clip, root / "videos")
    undecodable_copy(demo_corpus / "videos" / "train_0000.mp4", root / "videos" / "undecodable.mp4")
    bad = {"video": "videos/undecodable.mp4", "question": "Which color comes first?", "answer": "red"}
    for split, name, count in (("train", "train.jsonl", 7), ("eval", "held_out.jsonl", 2)):
        rows = [
            json.loads(line)
            for line in (demo_corpus / f"questions_{split}.jsonl").read_text().splitlines()
            if json.loads(line)["video"] < f"videos/{split}_0004"
        ][:count]
        rows.insert(2, bad)
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


# --------------------------------------------------------------------------- 1: evaluation after saving


def test_1_a_failing_evaluation_is_one_line_and_the_trained_model_is_saved(
    tiny_model_dir, demo_corpus, corpus, tmp_path, capsys
):
    """save_every_steps 0 (the final save is everything): the held-out split holds a clip that fails to decode
    under policy=error, so the eval loss fails at step 2 (in the loop) and at step 3 (final). Both are said in
    one line each; training goes on and the model is saved."""
    output = tmp_path / "run"
    train(
        *tiny_run_overrides(tiny_model_dir, demo_corpus, output, "train.max_steps=3", "train.batch_size=2"),
        f"data.eval_sources=[{{path: {corpus / 'held_out.jsonl'}}}]",
        "train.eval_every_steps=2",
        "data.bad_samples.policy=error",
    )
    printed = capsys.readouterr().out.splitlines()
    failed = [line for line in printed if "eval loss after step" in line]
    assert [line.split(" failed")[0] for line in failed] == ["eval loss after step 2", "eval loss after step 3"]
    assert all("DataError" in line and "undecodable.mp4" in line for line in failed)
    assert (output / "adapter_model.safetensors").is_file() and (output / "vidtune.json").is_file()
    assert sorted(losses(output)) == [1, 2, 3]


# ------------------------------------------------------------------- 2: eval loss without full logits


def test_2_the_eval_loss_builds_logits_only_at_label_positions(tiny_model_dir, demo_corpus, tmp_path):
    """The language head sees exactly the label positions (never batch x length rows of the vocabulary), and the
    loss equals the model's own full-logits loss over the held-out split."""
    from vidtune.train.training.held_out import evaluate, to_device
    from vidtune.train.training.loop import setup
    from vidtune.train.training.loss import language_head

    held_out = f"data.eval_sources=[{{path: {demo_corpus / 'questions_eval.jsonl'}, num_samples: 6}}]"
    run = setup(load_recipe(None, [*tiny_run_overrides(tiny_model_dir, demo_corpus, tmp_path / "run"), held_out]))
    try:
        head_rows: list[int] = []
        hook = language_head(run.model).register_forward_hook(
            lambda module, args, out: head_rows.append(out.shape[:-1].numel())
        )
        value = evaluate(run)
        hook.remove()
        loss_sum, label_tokens = 0.0, 0
        with torch.no_grad():
            for batch in run.eval_loader:
                batch.pop("skipped", None)
                batch = to_device(run, batch)
                tokens = int((batch["labels"][:, 1:] != -100).sum())
                loss_sum += float(run.model(**batch).loss) * tokens  # the model's own mean over label tokens
                label_tokens += tokens
        assert sum(head_rows) == label_tokens and label_tokens > 0
        assert value == pytest.approx(loss_sum / label_tokens, rel=1e-5)
    finally:
        run.lock.close()


# -------------------------------------------------------------- 3: streamed samples that fail to decode


def test_3_a_streamed_clip_that_measures_but_fails_to_decode_is_replaced_and_counted(
    tiny_model_dir, demo_corpus, corpus, tmp_path
):
    """The stream meets the undecodable clip (third row): it is replaced by the next row and counted against the
    bad-sample budget, as in a map-style corpus, instead of killing the run (which a relaunch, replaying the stream,
    would meet again at the same row)."""
    output = tmp_path / "run"
    train(
        *tiny_run_overrides(tiny_model_dir, demo_corpus, output, "train.max_steps=2", "train.batch_size=4"),
        f"data.sources=[{{path: {corpus / 'train.jsonl'}}}]",
        "data.streaming=true",
        "data.stream_shuffle_buffer=1",
        "data.bad_samples.max_bad_fraction=0.5",
    )
    logged = [json.loads(line) for line in (output / "bad_samples.jsonl").read_text().splitlines()]
    assert [(entry["step"], "undecodable.mp4" in entry["reason"]) for entry in logged] == [(1, True)]
    assert sorted(losses(output)) == [1, 2] and (output / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ 4: a real full disk at the final save


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs mounted for this test (needs root); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'mount failed'})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave_bytes: int = 0) -> Path:
    """Write until the filesystem is full (a real ENOSPC), then give back `leave_bytes`; the filler file."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(1 << 12))
        except OSError as err:
            assert err.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))
    return filler


def test_4_a_really_full_disk_at_the_final_save_is_retried_and_loses_nothing(
    tiny_model_dir, demo_corpus, small_disk, monkeypatch, capsys
):
    """The filesystem fills up just before the final save (the only save: save_every_steps 0), so safetensors
    meets the full disk first and raises its SafetensorError (not an OSError). The run says so in one line,
    keeps the model in memory, and saves it once space is freed (here: at the retry)."""
    monkeypatch.setattr(ckpt, "RETRY_INTERVAL_S", 0.05)
    output = small_disk / "run"
    real, calls = outputs.save_final, []

    def save_final(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # room for PEFT's README, written first, not for the weights (139 kB): safetensors
            fill(small_disk, leave_bytes=32 << 10)  # meets the full disk
        else:
            (small_disk / "filler").unlink()  # the operator frees space
        return real(*args, **kwargs)

    monkeypatch.setattr(outputs, "save_final", save_final)
    train(*tiny_run_overrides(tiny_model_dir, demo_corpus, output, "train.max_steps=1", "train.save_retry_s=30"))
    captured = capsys.readouterr()
    said = [line for line in captured.out.splitlines() if "no space left on the device" in line]
    assert len(calls) == 2 and len(said) == 1 and f"of {output} (about " in said[0]
    assert "Traceback" not in captured.err and not (small_disk / "filler").exists()
    from safetensors.torch import load_file

    assert load_file(str(output / "adapter_model.safetensors")) and (output / "vidtune.json").is_file()


def test_4_a_really_full_disk_at_a_checkpoint_is_retried_too(
    tiny_model_dir, demo_corpus, small_disk, monkeypatch, capsys
):
    """Room for the checkpoint's adapter, not for its optimizer state: torch.save meets the full disk, and its
    writer says only "unexpected pos" (a RuntimeError). It counts as a full disk all the same: one line, retried
    until space is freed (here after 0.5 s), the checkpoint complete."""
    import vidtune.train.training.loop as loop

    monkeypatch.setattr(ckpt, "RETRY_INTERVAL_S", 0.05)
    real = loop.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        filler = fill(small_disk, leave_bytes=200 << 10)  # the adapter takes 139 kB, AdamW's state twice that
        threading.Timer(0.5, filler.unlink).start()
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", save_checkpoint)
    output = small_disk / "run"
    train(
        *tiny_run_overrides(
            tiny_model_dir,
            demo_corpus,
            output,
            "train.max_steps=1",
            "train.save_every_steps=1",
            "train.save_retry_s=30",
        )
    )
    said = [line for line in capsys.readouterr().out.splitlines() if "no space left on the device" in line]
    assert said and all(f"of {output / 'checkpoints'} (about " in line for line in said)
    assert ckpt.checkpoint_problem(output / "checkpoints" / "step_00000001") is None


# ------------------------------------------- 5, 8: resume across an epoch boundary, with changed settings


def epoch_run(model: Path, corpus: Path, output: Path, *extra: str) -> list[str]:
    """8 samples in batches of 4 (2 steps an epoch), constant lr, dropout on, a checkpoint every 2 steps."""
    return tiny_run_overrides(
        model,
        corpus,
        output,
        f"data.sources=[{{path: {corpus / 'questions_train.jsonl'}, num_samples: 8}}]",
        "train.lr_scheduler=constant",
        "train.save_every_steps=2",
        "finetune.lora.dropout=0.1",
        *extra,
    )


@pytest.fixture(scope="module", params=["padded", "packed"])
def stopped_at_the_epoch_end(request, tiny_model_dir, demo_corpus, tmp_path_factory) -> tuple[list[str], Path, Path]:
    """(overrides, the uninterrupted 3-step run, a run stopped by max_steps=2 at the end of epoch 0)."""
    root = tmp_path_factory.mktemp(f"epochs-{request.param}")
    packing = [f"train.packing={request.param == 'packed'}"]
    whole = root / "whole"
    train(*epoch_run(tiny_model_dir, demo_corpus, whole, "train.max_steps=3", *packing))
    stopped = root / "stopped"
    train(*epoch_run(tiny_model_dir, demo_corpus, stopped, "train.max_steps=2", *packing))
    return packing, whole, stopped


def test_5_a_run_stopped_by_max_steps_and_relaunched_longer_trains_the_uninterrupted_steps(
    stopped_at_the_epoch_end, tiny_model_dir, demo_corpus, tmp_path, capsys
):
    """Relaunched with max_steps=3 from its checkpoint at the end of epoch 0, step 3 (epoch 1's order, which
    Accelerate's loader would replace by epoch 0's from its own pass counter) is the uninterrupted run's."""
    packing, whole, stopped = stopped_at_the_epoch_end
    output = shutil.copytree(stopped, tmp_path / "run")
    train(*epoch_run(tiny_model_dir, demo_corpus, output, "train.max_steps=3", *packing))
    assert "resuming from" in capsys.readouterr().out
    assert losses(output) == losses(whole) and sorted(losses(whole)) == [1, 2, 3]


def test_8_a_learning_rate_weight_decay_and_epsilon_changed_on_resume_are_the_ones_the_optimizer_uses(
    stopped_at_the_epoch_end, tiny_model_dir, demo_corpus, tmp_path, monkeypatch, capsys
):
    import vidtune.train.training.loop as loop

    packing, _, stopped = stopped_at_the_epoch_end
    if packing != ["train.packing=False"]:
        pytest.skip("one layout is enough: the optimizer's settings do not depend on it")
    output = shutil.copytree(stopped, tmp_path / "run")
    used, real = [], loop.train_step

    def recording_step(run, window):
        used.append([(group["lr"], group["weight_decay"], group["eps"]) for group in run.optimizer.param_groups])
        return real(run, window)

    monkeypatch.setattr(loop, "train_step", recording_step)
    changes = ("train.learning_rate=5e-3", "train.weight_decay=0.1", "train.adam_epsilon=1e-6")
    train(*epoch_run(tiny_model_dir, demo_corpus, output, "train.max_steps=3", *packing, *changes))
    assert "learning rate 0.01 -> 0.005" in (out := capsys.readouterr().out) and "adam_epsilon 1e-08 -> 1e-06" in out
    (groups,) = used  # one step after the resume; the first group holds the decayed weights (norms never are)
    assert [lr for lr, _, _ in groups] == [5e-3] * len(groups) and [eps for *_, eps in groups] == [1e-6] * len(groups)
    assert [wd for _, wd, _ in groups] == [0.1, 0.0][: len(groups)]
    assert [m["train/lr"] for m in read_metrics(output) if m["step"] == 3 and "train/lr" in m] == [5e-3]


# -------------------------------------------------------------- 6: SIGTERM in a slow evaluation


def test_6_sigterm_in_a_slow_evaluation_stops_within_the_batch_after_the_weights_are_saved(
    tiny_model_dir, demo_corpus, tmp_path, monkeypatch
):
    """Each held-out sample takes 2 s to decode; SIGTERM arrives 0.2 s into the first. The run stops in that
    decode (not after the batch and Accelerate's look-ahead batch) and the step's checkpoint was already written
    when evaluation began."""
    from vidtune.data.dataset import ExampleMaker

    output = tmp_path / "run"
    decodes: list[tuple[float, bool]] = []
    real = ExampleMaker.make

    def slow_make(self, row, epoch, index):
        if not self.train:  # a held-out sample
            decodes.append((time.monotonic(), (output / "checkpoints" / "step_00000002" / "manifest.json").exists()))
            if len(decodes) == 1:
                threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
            time.sleep(2.0)
        return real(self, row, epoch, index)

    monkeypatch.setattr(ExampleMaker, "make", slow_make)
    with pytest.raises(TrainingStopped) as stopped:
        train(
            *tiny_run_overrides(tiny_model_dir, demo_corpus, output, "train.max_steps=4", "train.batch_size=2"),
            f"data.eval_sources=[{{path: {demo_corpus / 'questions_eval.jsonl'}}}]",
            "train.eval_every_steps=2",
            "train.save_every_steps=2",
        )
    assert stopped.value.signum == signal.SIGTERM and stopped.value.step == 2
    assert [saved for _, saved in decodes] == [True]  # one decode begun, the checkpoint written before it
    assert time.monotonic() - decodes[0][0] < 2.0, "the stop waited for the slow decode"
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step_00000002"]


# ------------------------------------------------------------------- 7: fp16's loss scaler calibrating


def test_7_fp16_loss_scale_calibration_is_not_counted_as_non_finite_steps(tiny_model_dir, demo_corpus, tmp_path):
    """A GradScaler starting at 2^22 on a model whose gradients overflow above a scale of 2^16: 6 steps in a row
    overflow while it calibrates (max_nonfinite_steps is 5); the fused optimizer drops each of their updates on the
    device (found_inf) and the scaler halves its scale; none counts as non-finite, and training goes on. (CPU runs
    have no fp16 scaler: torch's GradScaler is put in as Accelerate puts it in on a GPU.)"""
    from accelerate.optimizer import AcceleratedOptimizer

    import vidtune.train.training.loop as loop

    recipe = load_recipe(
        None,
        tiny_run_overrides(
            tiny_model_dir,
            demo_corpus,
            tmp_path / "run",
            "train.max_steps=7",
            "train.max_nonfinite_steps=5",
            "train.batch_size=1",
        ),
    )
    run = loop.setup(recipe)
    try:
        acc, scaler = run.accelerator, torch.amp.GradScaler("cpu", init_scale=2.0**22)
        acc.scaler, acc.native_amp = scaler, True
        run.optimizer = AcceleratedOptimizer(run.optimizer.optimizer, device_placement=False, scaler=scaler)
        acc._optimizers[:] = [run.optimizer]
        run.scheduler.optimizers = [run.optimizer]
        real, scales = loop.micro_step, []

        def overflowing(run_, index, batch, scale, last):
            summed = real(run_, index, batch, scale, last)
            if last:
                scales.append(scaler.get_scale())
                if scaler.get_scale() > 2.0**16:  # too high a scale: the scaled gradients overflow
                    run_.trainable[0].grad.view(-1)[0] = float("inf")
            return summed

        loop.micro_step, original = overflowing, loop.micro_step
        try:
            metrics = loop.train_loop(run)
        finally:
            loop.micro_step = original
        assert scales == [2.0 ** (22 - k) for k in range(7)]  # 6 overflows, then an update
        assert run.state.step == 7 and metrics["train/nonfinite_steps"] == 0
        assert {int(s["step"]) for s in run.optimizer.optimizer.state.values()} == {1}  # Adam's own count
    finally:
        run.lock.close()
