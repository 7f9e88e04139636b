"""What a user sees on the console: a live progress bar on a terminal, plain step lines elsewhere."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from types import SimpleNamespace

import httpx
import pytest

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


@pytest.fixture(scope="module")
def terminal_run(tiny_model_dir, demo_corpus, tmp_path_factory) -> SimpleNamespace:
    """`vidtune train` of 4 steps as a user starts it in a terminal (stdout piped, as into a log file)."""
    root = tmp_path_factory.mktemp("console")
    recipe = root / "r.yaml"
    overrides = tiny_run_overrides(tiny_model_dir, demo_corpus, root / "run", "train.max_steps=4")
    recipe.write_text(recipe_to_yaml(load_recipe(None, [*overrides, "train.log_every_steps=2"])))
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "VIDTUNE_LOG")}
    shown, stdout, code = run_on_a_terminal([sys.executable, "-m", "vidtune.train.cli", "train", str(recipe)], env)
    assert code == 0, shown[-3000:]
    return SimpleNamespace(shown=shown, stdout=stdout, output=root / "run", root=root, env=env)


def test_a_run_on_a_terminal_shows_step_total_and_eta_from_the_first_step(terminal_run):
    shown, stdout = terminal_run.shown, terminal_run.stdout
    # The bar as redrawn after the first optimizer step: 1/4, elapsed<ETA, the rate in samples/s.
    first = re.search(r"training: +25%\|[^\r\n]*\| 1/4 \[\d\d:\d\d<\d\d:\d\d, [^\]]*samples/s", shown)
    assert first, shown[-3000:]
    assert re.search(r"\| 4/4 \[", shown)
    # The pipe (a log file, SLURM, CI) has no bar, only the plain lines naming the step budget.
    assert re.findall(r"^step (\d+/\d+): train/loss=", stdout, re.MULTILINE) == ["2/4", "4/4"], stdout
    assert "samples/s" not in stdout and "\r" not in stdout
    # the model load says what it reads and what it loaded, in place of transformers' "Loading weights" bar
    assert re.search(
        r"^loading model \S+ \(1 weight file, [\d.]+ MB\) \.\.\.\nloaded model: [\d,]+ parameters", stdout, re.M
    )
    assert "Loading weights" not in shown


def test_the_inference_commands_announce_the_model_load_on_stderr(tiny_model_dir, demo_corpus, capsys):
    """stdout keeps only the answer (scripts read it); the load line and its count go to stderr."""
    from vidtune.train.cli import main

    video = str(demo_corpus / "videos" / "eval_0001.mp4")
    main(["infer", str(tiny_model_dir), "--video", video, "--prompt", "Which color?", "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert "loading model" not in out
    size = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors")) / 1e6
    assert f"loading model {tiny_model_dir} (1 weight file, {size:.1f} MB) ...\nloaded model: " in err
    assert re.search(r"^loaded model: [\d,]+ parameters in [\d.]+s$", err, re.M)


NOISE = re.compile(r"warn|traceback", re.IGNORECASE)  # FutureWarning, UserWarning, DeepSpeed's [WARNING], ...


def test_the_happy_path_of_every_command_is_quiet(terminal_run, demo_corpus):
    """train (above, on a terminal), then infer, chat, predict, eval and serve (one request) at once on its output:
    no warning and no traceback in what they print."""
    run, root, env = str(terminal_run.output), terminal_run.root, terminal_run.env
    assert not NOISE.search(terminal_run.shown), terminal_run.shown[-3000:]
    video = str(demo_corpus / "videos" / "eval_0001.mp4")
    questions = str(demo_corpus / "questions_eval.jsonl")
    cli = [sys.executable, "-m", "vidtune.train.cli"]
    commands = {
        "infer": [*cli, "infer", run, "--video", video, "--prompt", "Which color comes first?"],
        "chat": [*cli, "chat", run, "--video", video],
        "predict": [*cli, "predict", run, "--data", questions, "--out", str(root / "predictions.jsonl")],
        "eval": [*cli, "eval", run, "--data", questions, "--task", "qa", "--out", str(root / "eval")],
        "serve": [*cli, "serve", run, "--port", "0", "--media-root", str(demo_corpus)],
    }
    logs = {name: (root / f"{name}.out", root / f"{name}.err") for name in commands}
    processes = {}
    for name, command in commands.items():
        with logs[name][0].open("w") as out, logs[name][1].open("w") as err:
            stdin = subprocess.PIPE if name == "chat" else subprocess.DEVNULL
            processes[name] = subprocess.Popen(command, stdin=stdin, stdout=out, stderr=err, env=env, text=True)
    processes["chat"].communicate("Which color comes first?\n/quit\n", timeout=300)
    served = processes["serve"]
    deadline = time.monotonic() + 300
    while not (announced := re.search(r" on (http://\S+) ", logs["serve"][0].read_text())):
        assert served.poll() is None and time.monotonic() < deadline, logs["serve"][1].read_text()
        time.sleep(0.5)
    content = [{"type": "video_url", "video_url": {"url": "videos/eval_0001.mp4"}}, {"type": "text", "text": "Hi"}]
    body = {"model": "run", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    assert httpx.post(f"{announced[1]}/v1/chat/completions", json=body, timeout=300).status_code == 200
    served.send_signal(signal.SIGINT)
    for name, process in processes.items():
        assert process.wait(timeout=300) == 0, (name, logs[name][1].read_text()[-3000:])
    printed = {name: logs[name][1].read_text() for name in commands}
    assert {name: text for name, text in printed.items() if NOISE.search(text)} == {}


def test_no_bar_when_the_output_is_not_a_terminal(capsys, monkeypatch):
    from vidtune.train.training.progress import TrainingBar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    bar = TrainingBar(SimpleNamespace(is_local_main_process=True), total_steps=3, done_steps=0, samples_per_step=4)
    for _ in range(3):
        bar.step()
    bar.close()
    assert bar.bar.disable and capsys.readouterr() == ("", "")


def test_quiet_hides_library_warnings_and_verbose_keeps_them(monkeypatch):
    import dataclasses
    import warnings

    from vidtune.train import cli, quiet

    calls = []
    monkeypatch.setattr(cli, "quiet_libraries", lambda loads_models: calls.append(loads_models))
    monkeypatch.setitem(cli.COMMANDS, "env", dataclasses.replace(cli.COMMANDS["env"], run=lambda args: None))
    cli.main(["env"])
    cli.main(["env", "--verbose"])
    monkeypatch.setenv("VIDTUNE_LOG", "debug")
    cli.main(["env"])
    assert calls == [False]  # only the first: --verbose and VIDTUNE_LOG=debug leave the libraries as they are
    monkeypatch.setattr(os, "environ", dict(os.environ))  # what quiet sets for launched ranks stays in this test
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.quiet_libraries(loads_models=False)
        warnings.warn_explicit("old", FutureWarning, "transformers/modeling_utils.py", 1, module="transformers")
        warnings.warn_explicit("ours", UserWarning, "vidtune/x.py", 1, module="vidtune.x")
    assert [str(w.message) for w in caught] == ["ours"]


def test_help_names_every_family_and_demo_offers_each(capsys):
    from tests.conftest import FAMILY_NAMES
    from vidtune.train import cli

    assert tuple(FAMILY_NAMES) == cli.TINY_FAMILIES  # the registry's families with a tiny model, in its order
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert all(name in printed for name in FAMILY_NAMES), printed
    for command in ("demo", "tiny-model"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "{" + ",".join(FAMILY_NAMES) + "}" in capsys.readouterr().out


@pytest.mark.slow
def test_a_second_demo_reuses_its_finished_stages_and_says_so(demo_run, capsys, monkeypatch):
    """Before: "trained in 0s" beside the speeds of the first launch, and train's advice to change the recipe."""
    from vidtune.train.demo.stages import run_stage

    root, _ = demo_run
    monkeypatch.setenv("VIDTUNE_DEMO_DIR", str(root))
    capsys.readouterr()
    output = run_stage("chat")
    assert output == root / "runs" / "chat"
    assert capsys.readouterr().out == (
        f"== stage chat: reused the run finished before in {output} (delete that folder to train it again)\n"
    )
