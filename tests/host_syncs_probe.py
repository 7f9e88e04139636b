"""Where a short training run reads values back from the device to the host, by phase ("in step N", "after step
N"): in this process (`record_reads`), or in every process of a multi-process launch:

    accelerate launch --cpu --num_processes 2 -m tests.host_syncs_probe OUT_DIR key=value ...

which writes OUT_DIR/rank<N>.json. On the CPU every tensor is host memory, so the calls that would copy to the host
on an accelerator are watched themselves, attributed to the code that made them: reads of a value, and results
whose size depends on values (a boolean mask as an index, nonzero), whose size the host must read back."""

from __future__ import annotations

import json
import sys
import traceback
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

import vidtune.train

# Tensor methods that copy a value to the host: each one a synchronisation on an accelerator.
READS_TO_HOST = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
# Calls whose result's size depends on the values (the host reads that size back), seen through a torch function
# mode: setting __getitem__ on the Tensor class, even back again, leaves it a sequence type, so 0-d tensors then
# look like sequences to later code.
SIZED_BY_VALUES = (torch.Tensor.nonzero, torch.nonzero, torch.Tensor.masked_select, torch.masked_select)
# Indexing reads a size back when the index holds a boolean mask (tensor[mask], tensor[mask] = ...).
INDEXING = (torch.Tensor.__getitem__, torch.Tensor.__setitem__)
# The code under test: the training package and the Accelerate calls it makes. The model's own forward
# (transformers, peft) and the CPU-side data preparation (data/, DataLoader) are not the loop's doing.
WATCHED = (str(Path(vidtune.train.__file__).parent), "/accelerate/")
# transformers functions that act on an argument the loss chose: the positions to compute logits at
# (`logits_to_keep`, sliced there by a boolean mask when the loss passes one).
ON_BEHALF_OF_THE_LOSS = ("slice_logits_to_keep",)


def caller(stack: traceback.StackSummary) -> str | None:
    """The innermost frame outside torch and this file, if it is watched code ("file:line function")."""
    for frame in reversed(stack[:-1]):  # [-1] is the wrapper
        if "/torch/utils/data/" in frame.filename:  # the DataLoader's own host work (worker seeds, batches)
            return None
        if "/torch/" in frame.filename or frame.filename == __file__:
            continue
        watched = any(part in frame.filename for part in WATCHED) or frame.name in ON_BEHALF_OF_THE_LOSS
        return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" if watched else None
    return None


def boolean_mask(index: Any) -> bool:
    """Whether an index holds a boolean tensor mask (a 0-d one selects all or nothing: no size to read)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool and p.ndim > 0 for p in parts)


class SizedByValues(TorchFunctionMode):
    """Appends to `reads` the calls of watched code whose result's size depends on values."""

    def __init__(self, reads: list[str]):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if func in SIZED_BY_VALUES or (func in INDEXING and boolean_mask(args[1])):
            where = caller(traceback.extract_stack())
            if where is not None:
                self.reads.append(where)
        return func(*args, **(kwargs or {}))


@contextmanager
def watching(reads: list[str]):
    """Every read to the host made by watched code while inside, appended to `reads`."""
    originals = {name: getattr(torch.Tensor, name) for name in READS_TO_HOST}

    def wrap(real: Any) -> Any:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            where = caller(traceback.extract_stack())
            if where is not None:
                reads.append(where)
            return real(self, *args, **kwargs)

        return wrapper

    for name, real in originals.items():
        setattr(torch.Tensor, name, wrap(real))
    try:
        with SizedByValues(reads):
            yield
    finally:
        for name, real in originals.items():
            setattr(torch.Tensor, name, real)


def record_reads(overrides: list[str]) -> tuple[dict[str, list[str]], Any]:
    """Train the recipe of `overrides`; the reads to the host by phase, and the run."""
    import vidtune.train.training.loop as loop
    from vidtune.train.training.config import load_recipe

    run = loop.setup(load_recipe(None, overrides))
    reads: list[str] = []
    by_step: dict[str, list[str]] = defaultdict(list)
    real_step = loop.train_step

    def watched_step(run_: Any, window: Any) -> Any:
        # What the loop did since the previous step belongs to that step's end (logging, checkpoints, stops).
        by_step[f"after step {run_.state.step}"] += reads
        reads.clear()
        result = real_step(run_, window)
        by_step[f"in step {run_.state.step + 1}"] += reads
        reads.clear()
        return result

    loop.train_step = watched_step
    try:
        with watching(reads):
            loop.train_loop(run)
        by_step[f"after step {run.state.step}"] += reads
    finally:
        loop.train_step = real_step
        if run.lock is not None:
            run.lock.close()
    return dict(by_step), run


def main(argv: list[str]) -> None:
    out, *overrides = argv
    by_step, run = record_reads(overrides)  # (its accelerator sets up the process group: none before it)
    acc = run.accelerator
    report = {"num_processes": acc.num_processes, "steps": run.state.step, "reads": by_step}
    (Path(out) / f"rank{acc.process_index}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
