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


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import common
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return common


def test_methods_run_interleaved_and_ratios_pair_rounds(common, monkeypatch):
    calls = []
    clock = iter(range(100))
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    seconds = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2)
    assert calls == ["a", "b"] * 3  # one warm-up round, then A B A B
    assert seconds == {"a": [1, 1], "b": [1, 1]}
    paired = common.speedup({"fast": [1.0, 4.0], "slow": [2.0, 4.0]}, "fast", "slow")
    assert (paired.min, paired.median, paired.max) == (1.0, 1.5, 2.0)  # per round, not median over median
    assert common.rates([0.5, 2.0], work=4).format(1, " /s") == "2.0/5.0/8.0 /s"


def test_a_missing_shared_clip_is_said(common, tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "here.mp4").write_bytes(b"")
    found = common.shared_clips(["here.mp4", "gone.mp4"], str(tmp_path))
    assert found == {"here.mp4": tmp_path / "videos" / "here.mp4"}
    out, err = capsys.readouterr()
    assert f"MISSING shared clip gone.mp4: not in {tmp_path / 'videos'}" in out and "gone.mp4" in err


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
def test_data_throughput_benchmark_prints_both_baselines_with_spreads(tmp_path):
    out = bench(
        "benchmarks/data_throughput.py", "--quick", "--rounds", "1", "--warmup-rounds", "0", "--workdir", str(tmp_path)
    )
    spread = rf"{NUMBER}/{NUMBER}/{NUMBER}"
    for way in ("seed", "decode-all", "vidtune", "cached"):  # samples/s, then x seed and x decode-all
        assert re.search(rf"^\s+{way}\s+{spread}\s+{spread}x\s+{spread}x$", out, re.M), out
    assert re.search(r"^\s+cache fill\s+\d+/\d+/\d+ ms per clip$", out, re.M), out


@pytest.mark.slow
def test_loop_overhead_benchmark_prints_a_ratio():
    out = bench("benchmarks/loop_overhead.py", "--steps", "4", "--batch-size", "2", "--frames", "4")
    assert re.search(rf"ratio\s+{NUMBER}x", out), out


def test_padding_benchmark_shows_grouping_helps():
    out = bench("benchmarks/padding_efficiency.py", "--samples", "4000")
    plain = float(re.search(rf"shuffled batches\s+({NUMBER})", out).group(1))
    grouped = float(re.search(rf"length-grouped batches\s+({NUMBER})", out).group(1))
    assert grouped > plain
    # train.packing's padding-free row (flash-attention varlen), printed beside grouping's: the issue's >= 0.99
    packed = float(re.search(rf"^\s+packed, one row\s+({NUMBER})", out, re.M).group(1))
    assert packed >= 0.99 > grouped
    assert re.search(rf"^\s+packed grouped, rows of 8192\s+{NUMBER}", out, re.M), out


@pytest.mark.slow
def test_packing_benchmark_prints_tokens_per_second_and_ratios():
    out = bench(
        "benchmarks/packing_throughput.py",
        "--samples",
        "8",
        "--batch-size",
        "4",
        "--rounds",
        "1",
        "--warmup-rounds",
        "0",
    )
    for method in ("grouped, padded", "packed, rows of 1024", "packed, one row"):  # tokens/s, x grouped, real/padded
        assert re.search(rf"^\s+{method}\s+\d+/\d+/\d+\s+{NUMBER}/{NUMBER}/{NUMBER}x\s+{NUMBER}$", out, re.M), out


@pytest.mark.slow
def test_gpu_benchmark_runs_vidtune_train_on_the_tiny_architecture(tiny_model_dir):
    """The benchmark's whole path (a `vidtune train` run of a from_config recipe, packed, its metrics read back) on
    the tiny architecture; --peak-tflops stands in for the GPU table, so MFU is printed too."""
    out = bench(
        "benchmarks/gpu_throughput.py",
        *("--tiny", "--model-dir", str(tiny_model_dir), "--frames", "2", "--packing", "on", "--peak-tflops", "0.001"),
        *("--steps", "2", "--warmup", "1", "--clips", "4", "--workers", "0", "--max-length", "512"),
    )
    row = re.search(r"^\s+2\s+on\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)%\s+(\S+)$", out, re.M)
    assert row, out
    tokens_per_s, samples_per_s, tflops, mfu, peak_gb = map(float, row.groups())
    assert min(tokens_per_s, samples_per_s, tflops, mfu, peak_gb) > 0, out
    assert mfu == pytest.approx(100 * tflops / 0.001, rel=0.05)  # MFU against the given peak (both rounded)


@pytest.mark.slow
def test_serve_latency_benchmark_prints_rate_and_latencies():
    out = bench("benchmarks/serve_latency.py", "--clients", "2", "--requests", "1", "--max-tokens", "4")
    assert re.search(rf"^\s+2\s+2\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", out, re.M), out
