"""The benchmarks run (quick settings) and print their figures; the figures themselves live in
benchmarks/RESULTS.md, measured with the full settings (never asserted: timing belongs to benchmarks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"\d+\.\d+"


def bench(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "re-run: python benchmarks/" in result.stdout
    return result.stdout


@pytest.mark.slow
def test_data_throughput_benchmark_prints_all_three_paths(tmp_path):
    out = bench("benchmarks/data_throughput.py", "--quick", "--repeats", "1", "--workdir", str(tmp_path))
    assert re.search(rf"generated 2 s 320x240\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x\s+{NUMBER}x", out), out


@pytest.mark.slow
def test_loop_overhead_benchmark_prints_a_ratio():
    out = bench("benchmarks/loop_overhead.py", "--steps", "4", "--batch-size", "2", "--frames", "4")
    assert re.search(rf"ratio\s+{NUMBER}x", out), out


def test_padding_benchmark_shows_grouping_helps():
    out = bench("benchmarks/padding_efficiency.py", "--samples", "4000")
    plain = float(re.search(rf"shuffled batches\s+({NUMBER})", out).group(1))
    grouped = float(re.search(rf"length-grouped batches\s+({NUMBER})", out).group(1))
    assert grouped > plain


@pytest.mark.slow
def test_gpu_benchmark_runs_its_code_path_on_the_tiny_model():
    out = bench("benchmarks/gpu_throughput.py", "--tiny", "--frames", "2", "4", "--steps", "1")
    assert re.search(rf"^\s+4\s+\d+\s+{NUMBER}\s+\d+\s+{NUMBER}\s+n/a", out, re.M), out


@pytest.mark.slow
def test_serve_latency_benchmark_prints_rate_and_latencies():
    out = bench("benchmarks/serve_latency.py", "--clients", "2", "--requests", "1", "--max-tokens", "4")
    assert re.search(rf"^\s+2\s+2\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", out, re.M), out
