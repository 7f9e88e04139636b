#!/usr/bin/env bash
# The test command (README.md): set up a virtual environment, install vidtune with its dev tools, then run
# ruff (lint + format check), mypy (data/ and train/) and pytest. Offline, CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy data train
.venv/bin/python -m pytest "$@"
