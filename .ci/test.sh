#!/usr/bin/env bash
# The test command (README.md): install the system libraries the tests exercise when we can (FFmpeg's shared
# libraries for TorchCodec, Chromium for the web page test; as root with apt), set up a virtual environment, install
# vidtune with its dev tools, then run ruff (lint + format check), mypy (data/ and train/) and pytest. CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! { command -v ffmpeg && command -v chromium; } >/dev/null; then
    # Without them the TorchCodec and browser tests skip (auto decoding falls back to decord/PyAV), nothing fails.
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        ffmpeg chromium >/dev/null) || echo "note: could not install ffmpeg/chromium; their tests will skip"
fi
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# Packaging warnings (setuptools' BuildBackendWarning, e.g. a recipe folder missing from pyproject's packages) fail
# the run: a user's `pip install -e .` prints them too. Not ours: pip's own "WARNING:" lines (root user), and the
# "Editable installation." notice setuptools (84) gives every editable install of a package-dir mapping like ours.
.venv/bin/python -m pip install --quiet -e ".[dev]" 2>&1 | tee .venv/install.log
if grep -E "[A-Za-z]Warning\b" .venv/install.log | grep -v "Warning: Editable installation\.$"; then
    echo "pip install -e . printed the warnings above" >&2
    exit 1
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy data train
.venv/bin/python -m pytest "$@"
