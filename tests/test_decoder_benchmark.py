"""The decoder benchmark runs (quick settings) and prints a row per backend; its figures live in
benchmarks/RESULTS.md, measured with the full settings (never asserted: timing belongs to benchmarks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vidtune.data.video import available_backends

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_decoder_benchmark_prints_every_installed_backend_side_by_side(tmp_path):
    command = [sys.executable, "benchmarks/decoder_backends.py", "--quick", "--rounds", "1", "--frames", "4"]
    result = subprocess.run(
        [*command, "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert result.returncode == 0, result.stderr[-3000:]
    number = r"\d+\.\d+"
    for backend in available_backends():
        row = rf"^\s+{backend}\s+{number}/{number}/{number} ms\s+x pyav {number}/{number}/{number}x$"
        assert re.search(row, result.stdout, re.M), result.stdout
    assert "re-run: python benchmarks/decoder_backends.py" in result.stdout
