"""A training step never makes the host wait for the accelerator: between logging steps the loop reads nothing back
from the device (no `.item()`, `bool(tensor)`, `.tolist()`, `float(tensor)`, `.cpu()` ...). On a GPU each such read
stalls the host until the device's queue drains, so the next step cannot be queued meanwhile. On the CPU every tensor
is host memory, so the test watches the calls themselves, attributed to the code that made them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_run_overrides
from tests.host_syncs_probe import record_reads

REPO = Path(__file__).resolve().parents[1]
# 5 steps of 2 micro-batches, figures read at step 4 (logging) and 5 (the last): nothing may be read elsewhere.
STEPS = ("train.max_steps=5", "train.batch_size=2", "train.grad_accum_steps=2", "train.log_every_steps=4")
READ_POINTS = {"after step 4", "after step 5"}


def outside_read_points(by_step: dict[str, list[str]]) -> dict[str, list[str]]:
    return {phase: where for phase, where in by_step.items() if where and phase not in READ_POINTS}


@pytest.mark.slow
def test_no_host_sync_outside_logging_steps(tiny_model_dir, demo_corpus, tmp_path):
    overrides = tiny_run_overrides(tiny_model_dir, demo_corpus, tmp_path / "run", *STEPS, "train.max_grad_norm=1.0")
    by_step, run = record_reads(overrides)
    assert run.state.step == 5
    assert outside_read_points(by_step) == {}, "host syncs outside logging steps"
    assert by_step["after step 4"], "the logging step reads the figures (the watch sees reads)"


@pytest.mark.slow
def test_two_processes_packed_and_streamed_sync_only_at_read_points(tiny_model_dir, demo_corpus, tmp_path):
    """Two processes (DDP over gloo), packed micro-batches from a streamed corpus: the ranks agree on a stop request
    and read their figures at the read points only (a per-step agreement was an all-reduce read back every step)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = tiny_run_overrides(
        tiny_model_dir, demo_corpus, tmp_path / "run", *STEPS, "train.packing=true", "data.streaming=true"
    )
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--config_file"),
        str(REPO / "launch" / "accelerate" / "ddp.yaml"),
        *("--num_processes", "2", "--main_process_port", str(port), "-m", "tests.host_syncs_probe"),
        str(tmp_path),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["num_processes"] == 2 and report["steps"] == 5
        assert outside_read_points(report["reads"]) == {}, f"rank {rank}: host syncs outside read points"
        assert report["reads"]["after step 4"], "the logging step reads the figures (the watch sees reads)"
