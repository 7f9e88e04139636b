"""What a newcomer hit trying every command (issue 16): each case failed before its fix. Errors are one line that
says what and where, before any model loads; chat commands never reach the model; chat streams."""

from __future__ import annotations

import time

import pytest

from tests.test_hostile_input import cli_error


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a model fails the test: the checks under test must come first."""
    from vidtune.train.generation import infer
    from vidtune.train.training import loop

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(infer, "load_for_inference", loaded)
    monkeypatch.setattr(loop, "train", loaded)


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  learning_rate: 1e-4\n   max_steps: 3\n")  # one space too many
    error = cli_error(capsys, "train", str(recipe))
    assert f"{recipe}: line 3, column 13: invalid YAML: mapping values are not allowed here" in error


def test_an_override_typo_is_blamed_on_the_override_not_the_recipe(capsys):
    error = cli_error(capsys, "train", "demo/base", "train.lerning_rate=1e-3")
    assert "command-line override 'train.lerning_rate=1e-3': unknown key" in error and "base.yaml" not in error


def test_a_missing_local_model_folder_is_no_such_folder_at_once(tmp_path, capsys, monkeypatch, no_model_loads):
    """Before: `infer runs/nope` retried the Hub for 29 s, then blamed the connection."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    video = tmp_path / "clip.mp4"
    started = time.perf_counter()
    for model in ("runs/nope", "./nope", str(tmp_path / "a" / "b")):
        error = cli_error(capsys, "infer", model, "--video", str(video), "--prompt", "q")
        assert f"model {model}: no such folder" in error
    assert time.perf_counter() - started < 20  # the Hub retries took 29 s; the good path is far below on any load


def test_a_folder_that_is_not_a_run_says_so(tmp_path, capsys, no_model_loads):
    (tmp_path / "notes.txt").write_text("not a model")
    error = cli_error(capsys, "chat", str(tmp_path), "--video", "v.mp4")
    assert "not a trained output folder or a model folder" in error


def test_a_missing_or_unreadable_video_is_refused_before_the_model_loads(
    tiny_model_dir, broken_media, capsys, no_model_loads
):
    missing = cli_error(capsys, "chat", str(tiny_model_dir), "--video", "nope.mp4")
    assert "--video nope.mp4: no such file" in missing
    notes = cli_error(capsys, "infer", str(tiny_model_dir), "--video", str(broken_media["notes"]), "--prompt", "q")
    assert notes.startswith("vidtune infer: error: --video") and "notes.mp4" in notes


def test_a_missing_data_file_is_reported_before_the_model_loads(tiny_model_dir, tmp_path, capsys, no_model_loads):
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        f"data.sources=[{{path: {tmp_path / 'nope.jsonl'}}}]",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    error = cli_error(capsys, "train", "demo/instruct", *overrides)
    assert f"data.sources[0].path {tmp_path / 'nope.jsonl'}: annotation file not found" in error
    (tmp_path / "q.jsonl").write_text("")
    overrides[1] = f"data.sources=[{{path: {tmp_path / 'q.jsonl'}, media_root: {tmp_path / 'x'}}}]"
    media = cli_error(capsys, "train", "demo/instruct", *overrides)
    assert "media_root" in media and "no such folder" in media


def test_ctrl_c_and_commands_in_chat_never_reach_the_model(capsys):
    """No model at all: /help and an unknown command must not be sent to it, Ctrl-C must leave quietly."""
    from vidtune.train.generation.chat import CHAT_HELP, chat

    said: list[str] = []
    script = iter(["/help", "/frobnicate", "/quit"])
    chat(None, "clip.mp4", read=lambda _: next(script), write=said.append)  # type: ignore[arg-type]
    assert said == [CHAT_HELP, CHAT_HELP, "(unknown command /frobnicate; /help lists them)"]

    def interrupted(prompt: str) -> str:
        raise KeyboardInterrupt

    chat(None, "clip.mp4", read=interrupted, write=said.append)  # type: ignore[arg-type]  (returns: no traceback)


def test_chat_streams_the_same_reply_it_would_print_whole(tiny_model_dir, clips):
    from vidtune.train.generation.chat import chat
    from vidtune.train.generation.infer import load_for_inference

    im = load_for_inference(str(tiny_model_dir), num_frames=2)
    whole: list[str] = []
    chat(im, str(clips["red_blue"]), read=_script(), write=whole.append, max_new_tokens=6)
    pieces: list[str] = []
    chat(im, str(clips["red_blue"]), read=_script(), write=lambda _: None, max_new_tokens=6, stream=pieces.append)
    reply = whole[-1].removeprefix("model> ")
    assert len(reply) > 3 and "".join(pieces) == f"model> {reply}\n"
    assert len(pieces) > 3  # piece by piece, not whole


def _script():
    lines = iter(["Which color comes first?", "/quit"])
    return lambda _: next(lines)


def test_frames_sampled_unlike_training_are_warned_about():
    from vidtune.data.video import SamplingConfig
    from vidtune.train.generation.infer import sampling_mismatch

    trained = {"num_frames": 4, "fps": None}
    assert sampling_mismatch(SamplingConfig(num_frames=4), trained, "runs/a") is None
    warning = sampling_mismatch(SamplingConfig(num_frames=16), trained, "runs/a")
    assert warning and "sampling 16 frames per video, but runs/a was trained on 4 frames" in warning
    assert sampling_mismatch(SamplingConfig(num_frames=16), {}, "a-base-model") is None  # nothing to compare


def test_every_cli_option_has_help_text():
    import argparse

    from vidtune.train.cli import COMMANDS

    for name, command in COMMANDS.items():
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        missing = [a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._HelpAction)]
        assert not missing, f"vidtune {name}: options without help: {missing}"


def card_metadata(base: str) -> dict:
    return {
        "base_model": base,
        "variant": "instruct",
        "finetune_mode": "lora",
        "sampling": {"num_frames": 4, "fps": None},
        "datasets": [
            {"path": "/home/me/private/clips/questions_train.jsonl", "num_samples": 40},
            {"path": "lmms-lab/VideoChatGPT", "num_samples": 10},
        ],
        "hyperparameters": {
            "batch per device x accumulation": "4 x 1",
            "processes": 1,
            "epochs / max steps": "1 / 190",
        },
        "num_train_samples": 40,
        "steps": 190,
        "metrics": {"train/lr": 0.0, "train/tokens_per_s": 812.5, "train/loss": 0.01, "eval/loss": 0.02},
    }


def test_the_model_card_publishes_no_local_path_and_tells_the_truth():
    import yaml

    from vidtune.train.publishing.model_card import model_card

    card = model_card(card_metadata("/tmp/tiny-model"), {}, name="my-run")
    front = yaml.safe_load(card.split("---\n")[1])
    assert "# my-run\n" in card and "PATH_OR_REPO_ID" not in card
    assert "An instruct LoRA adapter" in card
    assert "/tmp/tiny-model" not in card and "huggingface.co//" not in card and "base_model" not in front
    assert "/home/me" not in card and "`questions_train.jsonl` (40 samples)" in card and "lmms-lab/VideoChatGPT" in card
    assert "| epochs | 19 |" in card and "1 / 190" not in card  # true epochs, not the configured 1
    assert "| loss | 0.02 |" in card and "tokens_per_s" not in card and "train/lr" not in card  # held-out loss
    assert front["library_name"] == "peft" and front["pipeline_tag"] == "video-text-to-text"

    hub = model_card(card_metadata("llava-hf/LLaVA-NeXT-Video-7B-hf"), {"repo_id": "me/colours"}, name="my-run")
    front = yaml.safe_load(hub.split("---\n")[1])
    assert front["base_model"] == "llava-hf/LLaVA-NeXT-Video-7B-hf" and front["base_model_relation"] == "adapter"
    assert "# colours\n" in hub and "(https://huggingface.co/llava-hf/LLaVA-NeXT-Video-7B-hf)" in hub


@pytest.mark.slow
def test_a_run_folder_gets_a_loss_plot_each_metric_once_tensorboard_events_and_a_closing_hint(
    tiny_model_dir, demo_corpus, tmp_path, capsys
):
    from tests.conftest import tiny_run_overrides
    from vidtune.train.cli import main
    from vidtune.train.training.tracking import read_metrics

    output = tmp_path / "run"
    extra = (
        f"data.eval_sources=[{{path: {demo_corpus / 'questions_eval.jsonl'}}}]",
        "train.max_steps=2",
        "train.eval_every_steps=2",  # the last step is evaluated in the loop: the final evaluation must not repeat it
        "train.save_every_steps=1",
        "logging.report_to=tensorboard",
    )
    main(["train", "demo/instruct", *tiny_run_overrides(tiny_model_dir, demo_corpus, output, *extra)])
    out = capsys.readouterr().out
    assert [m["step"] for m in read_metrics(output) if "eval/loss" in m] == [2]
    assert (output / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"next: vidtune infer {output} --video" in out and f"vidtune serve {output}" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_dir,) = {p.parent for p in (output / "tensorboard").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(events_dir)).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/loss")] == [2]


def test_tensorboard_without_its_package_is_one_line_before_anything_loads(monkeypatch):
    import importlib.util

    from vidtune.train.training.config import RecipeError, load_recipe

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("tensorboard") else real_find_spec(name)
    )
    with pytest.raises(RecipeError, match=r"logging.report_to: tensorboard needs the tensorboard package") as err:
        load_recipe(None, ["logging.report_to=tensorboard"])
    assert "\n" not in str(err.value)


def test_version_and_env_say_what_a_bug_report_needs(capsys):
    from vidtune.train.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("vidtune ")
    main(["env"])
    out = capsys.readouterr().out
    for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "cuda", "ffmpeg"):
        assert f"\n{name} " in out
    assert "decoder       pyav: works" in out  # tried on a real clip, not just imported


def test_caption_metrics_warn_when_references_are_too_short_for_bleu4():
    from vidtune.train.evaluation.metrics import caption_metric_warning, caption_scores

    short = [["red then blue"], ["green then yellow"]]
    perfect = caption_scores(["red then blue", "green then yellow"], short)
    assert perfect["bleu4"] < 0.1 and perfect["rouge_l"] == 1.0  # the misleading pair the warning explains
    warning = caption_metric_warning(short)
    assert warning and "median of 3 words" in warning and "BLEU-4" in warning
    assert caption_metric_warning([["a man slices a red onion on a board"]]) is None
