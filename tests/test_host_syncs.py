"""A training step never makes the host wait for the accelerator: between logging steps the loop reads nothing back
from the device (no `.item()`, `bool(tensor)`, `.tolist()`, `float(tensor)`, `.cpu()` ...). On a GPU each such read
stalls the host until the device's queue drains, so the next step cannot be queued meanwhile. On the CPU every tensor
is host memory, so the test watches the calls themselves, attributed to the code that made them."""

from __future__ import annotations

import traceback
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import vidtune.train
from tests.conftest import tiny_run_overrides
from vidtune.train.training.config import load_recipe

# Tensor methods that copy a value to the host: each one a synchronisation on an accelerator.
READS_TO_HOST = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
# The code under test: the training package and the Accelerate calls it makes. The model's own forward
# (transformers, peft) and the CPU-side data preparation (data/, DataLoader) are not the loop's doing.
WATCHED = (str(Path(vidtune.train.__file__).parent), "/accelerate/")


def caller(stack: traceback.StackSummary) -> str | None:
    """The innermost frame outside torch and this file, if it is watched code ("file:line function")."""
    for frame in reversed(stack[:-1]):  # [-1] is the wrapper
        if "/torch/utils/data/" in frame.filename:  # the DataLoader's own host work (worker seeds, batches)
            return None
        if "/torch/" in frame.filename or frame.filename == __file__:
            continue
        watched = any(part in frame.filename for part in WATCHED)
        return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" if watched else None
    return None


def watch_reads(monkeypatch: pytest.MonkeyPatch, reads: list[str]) -> None:
    for name in READS_TO_HOST:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, _real=real, **kwargs):
            where = caller(traceback.extract_stack())
            if where is not None:
                reads.append(where)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)


@pytest.mark.slow
def test_no_host_sync_outside_logging_steps(tiny_model_dir, demo_corpus, tmp_path, monkeypatch):
    import vidtune.train.training.loop as loop

    overrides = tiny_run_overrides(
        tiny_model_dir,
        demo_corpus,
        tmp_path / "run",
        "train.max_steps=5",
        "train.batch_size=2",
        "train.grad_accum_steps=2",
        "train.log_every_steps=4",
        "train.max_grad_norm=1.0",
    )
    run = loop.setup(load_recipe(None, overrides))
    reads: list[str] = []
    by_step: dict[str, list[str]] = defaultdict(list)  # "in step N" / "after step N" -> reads there
    real_step = loop.train_step

    def watched_step(run_, window):
        # What the loop did since the previous step belongs to that step's end (logging, checkpoints, stops).
        by_step[f"after step {run_.state.step}"] += reads
        reads.clear()
        result = real_step(run_, window)
        by_step[f"in step {run_.state.step + 1}"] += reads
        reads.clear()
        return result

    monkeypatch.setattr(loop, "train_step", watched_step)
    watch_reads(monkeypatch, reads)
    loop.train_loop(run)
    by_step[f"after step {run.state.step}"] += reads
    monkeypatch.undo()

    assert run.state.step == 5
    read_points = {"after step 4", "after step 5"}  # log_every_steps=4, and the last step
    outside = {phase: where for phase, where in by_step.items() if where and phase not in read_points}
    assert outside == {}, f"host syncs outside logging steps: {outside}"
    assert by_step["after step 4"], "the logging step reads the figures (the watch sees reads)"
