"""What a user sees on the console: a live progress bar on a terminal, plain step lines elsewhere."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from types import SimpleNamespace

from tests.conftest import REPO, tiny_run_overrides
from vidtune.train.training.config import load_recipe, recipe_to_yaml


def run_on_a_terminal(command: list[str], env: dict[str, str], timeout_s: float = 300) -> tuple[str, str, int]:
    """COMMAND with its stderr on a pseudo-terminal (120 columns, as a user's shell) and its stdout on a pipe:
    (what the terminal showed, stdout, exit code)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's last writer has gone
            break
        if not chunk:
            break
        shown += chunk
    stdout, _ = process.communicate(timeout=timeout_s)
    os.close(leader)
    return shown.decode(errors="replace"), stdout, process.returncode


def test_a_run_on_a_terminal_shows_step_total_and_eta_from_the_first_step(tiny_model_dir, demo_corpus, tmp_path):
    recipe = tmp_path / "r.yaml"
    overrides = tiny_run_overrides(tiny_model_dir, demo_corpus, tmp_path / "run", "train.max_steps=4")
    recipe.write_text(recipe_to_yaml(load_recipe(None, [*overrides, "train.log_every_steps=2"])))
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    shown, stdout, code = run_on_a_terminal([sys.executable, "-m", "vidtune.train.cli", "train", str(recipe)], env)
    assert code == 0, shown[-3000:]
    # The bar as redrawn after the first optimizer step: 1/4, elapsed<ETA, the rate in samples/s.
    first = re.search(r"training: +25%\|[^\r\n]*\| 1/4 \[\d\d:\d\d<\d\d:\d\d, [^\]]*samples/s", shown)
    assert first, shown[-3000:]
    assert re.search(r"\| 4/4 \[", shown)
    # The pipe (a log file, SLURM, CI) has no bar, only the plain lines naming the step budget.
    assert re.findall(r"^step (\d+/\d+): train/loss=", stdout, re.MULTILINE) == ["2/4", "4/4"], stdout
    assert "samples/s" not in stdout and "\r" not in stdout


def test_no_bar_when_the_output_is_not_a_terminal(capsys, monkeypatch):
    from vidtune.train.training.progress import TrainingBar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    bar = TrainingBar(SimpleNamespace(is_local_main_process=True), total_steps=3, done_steps=0, samples_per_step=4)
    for _ in range(3):
        bar.step()
    bar.close()
    assert bar.bar.disable and capsys.readouterr() == ("", "")
