"""The README's main command: the whole demo, through the packaged recipes, on CPU."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.slow
def test_demo_reaches_its_accuracy_targets(demo_run):
    root, report = demo_run
    assert report["base: caption exact match"] >= 0.9
    assert 0.3 <= report["base: order question, right colour first (chance 50%)"] <= 0.7  # the base is at chance
    assert report["instruct: order question exact match"] >= 0.95
    assert report["instruct: caption exact match (captions mixed in)"] >= 0.9  # the mixed-in skill is kept
    assert report["chat: second-turn exact match"] >= 0.9
    assert json.loads((root / "demo_report.json").read_text()) == report
    chat = (root / "demo_chat.txt").read_text()
    assert chat.count("  model: ") == 2 and "(truth: " in chat
    for stage in ("base", "instruct", "chat"):
        assert (root / "runs" / stage / "vidtune.json").is_file()


@pytest.mark.slow
def test_demo_model_is_tiny_and_deeper_than_the_test_model(demo_run):
    from safetensors import safe_open

    root, _ = demo_run
    config = json.loads((root / "tiny-model" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 4
    with safe_open(str(root / "tiny-model" / "model.safetensors"), "pt") as weights:
        total = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118
    assert 100_000 < total < 1_000_000


def test_every_tiny_model_loads_like_a_hub_checkpoint(family_kit):
    """Config, weights and the family's real processor classes come back through from_pretrained, as a hub id's do."""
    import transformers
    from safetensors import safe_open
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    config = transformers.AutoConfig.from_pretrained(family_kit.model_dir)
    # (Qwen2.5-Omni's tiny model is its thinker saved alone: model type qwen2_5_omni_thinker, of that family)
    assert config.model_type in family_kit.family.model_types and family_kit.name in family_kit.family.model_types
    processor = transformers.AutoProcessor.from_pretrained(family_kit.model_dir)
    # the class transformers maps the model type to (e.g. LlavaOnevisionProcessor; Qwen3.5 uses Qwen3-VL's), not a
    # generic stand-in
    assert type(processor).__name__ == PROCESSOR_MAPPING_NAMES[family_kit.name]
    assert processor.chat_template  # the hub-style template, saved with the folder
    tokenizer = processor.tokenizer
    assert tokenizer.decode(tokenizer("Which color comes first?")["input_ids"], skip_special_tokens=True).strip() == (
        "Which color comes first?"
    )
    with safe_open(str(family_kit.model_dir / "model.safetensors"), "pt") as weights:
        total = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118
    assert 100_000 < total < 1_000_000


def test_an_unknown_family_or_a_workdir_of_another_family_is_one_line(tiny_model_dir):
    from vidtune.train.demo.stages import ensure_tiny_model
    from vidtune.train.demo.tiny_model import build_tiny_model
    from vidtune.train.training.config import RecipeError

    with pytest.raises(RecipeError, match="no tiny model for family 'qwen9'"):
        build_tiny_model(tiny_model_dir.parent / "never", family="qwen9")
    with pytest.raises(RecipeError, match="holds a llava_next_video model, not llava_onevision"):
        ensure_tiny_model(tiny_model_dir, "llava_onevision")


def test_demo_stages_are_checked_before_anything_runs():
    from vidtune.train.demo.stages import parse_stages
    from vidtune.train.training.config import RecipeError

    assert parse_stages("base,dpo") == ("base", "dpo")
    assert parse_stages("base, instruct, chat, grpo") == ("base", "instruct", "chat", "grpo")
    with pytest.raises(RecipeError, match="the dpo stage starts from base: list base before it"):
        parse_stages("dpo")
    with pytest.raises(RecipeError, match="the chat stage starts from instruct"):
        parse_stages("base,chat")
    with pytest.raises(RecipeError, match="choose from base, instruct, chat, dpo, grpo"):
        parse_stages("base,ppo")


def test_the_demo_base_names_either_colour_first_but_its_likeliest_caption_is_the_order(
    demo_corpus, tmp_path, monkeypatch
):
    """demo/base's caption mix (weights applied), per training clip: "red then blue" is the likeliest caption and
    the first colour the likeliest first word (greedy captions stay right), but a third of the captions start
    with the last colour ("blue after red": GRPO's samples from the base answer "last?" right), and no caption is
    a question."""
    from collections import Counter
    from pathlib import Path

    from vidtune.train.training.config import load_recipe, packaged_recipe

    (tmp_path / "corpus").symlink_to(demo_corpus)
    monkeypatch.setenv("VIDTUNE_DEMO_DIR", str(tmp_path))
    recipe = load_recipe(packaged_recipe("demo/base"), ())
    captions: dict[str, Counter] = {}
    for source in recipe.data.sources:
        for line in Path(source.path).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            assert set(row) == {"video", "caption"}  # captions only
            captions.setdefault(row["video"], Counter())[row["caption"]] += int(source.weight)
    rows = [json.loads(line) for line in (demo_corpus / "captions_train.jsonl").read_text().splitlines()]
    truth = {row["video"]: row["caption"] for row in rows}
    assert set(captions) == set(truth)
    for video, counts in captions.items():
        first, _, last = truth[video].split()
        assert counts.most_common(1)[0][0] == f"{first} then {last}"
        firsts = Counter({word: 0 for word in (first, last)})
        for caption, n in counts.items():
            firsts[caption.split()[0]] += n
        assert firsts == Counter({first: 2, last: 1}), (video, counts)


@pytest.mark.slow
def test_demo_prints_each_stages_scores_when_it_ends_and_the_next_commands(family_runs, tmp_path, monkeypatch, capsys):
    """Each stage's held-out scores and its loss.png as soon as the stage ends (before the next one trains), the
    scores recorded in the run's vidtune.json and model card, and at the end the commands to try on the last run."""
    import shutil

    from vidtune.train.demo import stages

    def fake_stage(name, overrides=()):
        output = tmp_path / "demo" / "runs" / name
        shutil.copytree(family_runs("llava_next_video"), output)
        (output / "loss.png").write_bytes(b"png")
        print(f"TRAINING {name}")
        return output

    def fake_score(stage):
        return lambda output, corpus, report: report.update({f"{stage}: order question exact match": 0.875})

    monkeypatch.setattr(stages, "ensure_tiny_model", lambda model_dir, family: None)
    monkeypatch.setattr(stages, "write_demo_corpus", lambda corpus: None)
    monkeypatch.setattr(stages, "run_stage", fake_stage)
    monkeypatch.setattr(stages, "STAGE_SCORES", {s: fake_score(s) for s in ("base", "instruct")})
    stages.run_demo(tmp_path / "demo", stages=("base", "instruct"))
    printed = capsys.readouterr().out
    base_run = tmp_path / "demo" / "runs" / "base"
    label = "order question exact match"
    summary = f"== stage base: held-out scores\n  {label:<52}  87.5%\n  loss curves: {base_run}/loss.png"
    assert summary + "\n" in printed, printed
    assert printed.index(summary) < printed.index("TRAINING instruct")
    metrics = json.loads((base_run / "vidtune.json").read_text())["metrics"]
    assert metrics["eval/demo/order question exact match"] == 0.875 and "train/loss" in metrics  # kept
    card = (base_run / "README.md").read_text()
    assert "order question exact match" in card.split("## Evaluation (held-out)")[1]
    instruct_run = tmp_path / "demo" / "runs" / "instruct"
    assert printed.rstrip().endswith(
        f"== next, on the demo's instruct run:\n"
        f"  vidtune infer {instruct_run} --video {tmp_path / 'demo' / 'corpus' / 'videos' / 'eval_0000.mp4'} "
        "--prompt 'Which color comes first?'\n"
        f"  vidtune chat {instruct_run} --video {tmp_path / 'demo' / 'corpus' / 'videos' / 'eval_0000.mp4'}\n"
        f"  vidtune serve {instruct_run}\n"
        f"  vidtune export {instruct_run} --to {tmp_path / 'demo' / 'export'}"
    )


def test_the_sound_proofs_clips_differ_only_in_their_sound(tmp_path):
    """Twins share every frame (so pictures cannot answer) and differ in pitch: low 250-450 Hz, high 1.8-3 kHz."""
    import numpy as np

    from vidtune.data.audio import load_audio_span
    from vidtune.data.video import SamplingConfig, load_clip
    from vidtune.train.demo.corpus import TONE_QUESTION, write_tone_split

    rows = [json.loads(line) for line in write_tone_split(tmp_path, "eval", 2, seed=4).read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["low", "high"] * 2 and {r["question"] for r in rows} == {TONE_QUESTION}
    frames = [load_clip(str(tmp_path / r["video"]), SamplingConfig(4)).frames for r in rows]
    assert np.array_equal(frames[0], frames[1]) and np.array_equal(frames[2], frames[3])
    assert not np.array_equal(frames[0], frames[2])  # held-out twins have pictures of their own
    for row in rows:
        sound = load_audio_span(str(tmp_path / row["video"]), 0.2, 1.8, 16000).samples
        pitch_hz = np.argmax(np.abs(np.fft.rfft(sound))) * 16000 / len(sound)
        assert (250 <= pitch_hz <= 450) if row["answer"] == "low" else (1800 <= pitch_hz <= 3000), pitch_hz


def test_the_sound_proof_is_refused_for_a_family_that_cannot_hear_before_anything_runs(tmp_path, family_kits):
    from vidtune.data.families import FAMILIES, family_for
    from vidtune.train.demo import stages
    from vidtune.train.demo.tiny_model import TINY_MODELS
    from vidtune.train.training.config import RecipeError

    with pytest.raises(RecipeError, match=r"--audio: qwen2_5_vl does not hear sound \(families that do: qwen2_5_omni"):
        stages.run_demo(tmp_path / "demo", family="qwen2_5_vl", audio=True)
    assert not (tmp_path / "demo").exists()
    hearing = {name for name in TINY_MODELS if name in FAMILIES and family_for(name).hears}
    assert set(stages.HEARING_FAMILIES) == hearing
    # Qwen2.5-Omni's tiny folder is a qwen2_5_omni_thinker: a second demo in the same folder reuses it
    stages.ensure_tiny_model(family_kits("qwen2_5_omni").model_dir, "qwen2_5_omni")


# each hearing family's settings beyond recipe demo/tone: Gemma 4 collapsed at the recipe's lr 1e-2 (held-out 50%
# heard; 100% at 1e-3 for 300 steps, README), and its ~190-token tone questions take its demo max_length
SOUND_PROOF_SETTINGS = {
    "qwen2_5_omni": (),
    "gemma4": ("train.learning_rate=1.0e-3", "train.max_steps=300", "data.max_length=448"),
}


@pytest.mark.parametrize("family", list(SOUND_PROOF_SETTINGS))
def test_the_sound_proof_reports_the_heard_run_beside_the_same_run_without_sound(family, tmp_path, monkeypatch, capsys):
    """`vidtune demo --audio` alone: demo/tone heard, then with data.audio=off, each scored on the held-out twins
    and recorded in demo_report.json (the real runs: README's figures, benchmarks/omni_tone.py)."""
    from vidtune.train.cli import main
    from vidtune.train.demo import stages

    runs = []
    monkeypatch.setattr(stages, "ensure_tiny_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(stages, "write_tone_corpus", lambda corpus: None)
    monkeypatch.setattr(stages, "run_stage", lambda name, overrides=(): runs.append((name, overrides)) or tmp_path)
    monkeypatch.setattr(stages, "load_for_inference", lambda path: path)
    scores = iter([1.0, 0.5])
    monkeypatch.setattr(stages, "exact_match_on", lambda model, path: (next(scores), []))
    main(["demo", "--family", family, "--audio", "--workdir", str(tmp_path / "demo")])
    runs_dir = tmp_path / "demo" / "runs"
    settings = SOUND_PROOF_SETTINGS[family]
    assert runs == [
        ("tone", (*settings, f"train.output_dir={runs_dir / 'tone'}")),
        ("tone", (*settings, "data.audio=off", f"train.output_dir={runs_dir / 'tone-silent'}")),
    ]
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert report["instruct: tone exact match"] == 1.0
    assert report["instruct (data.audio=off): tone exact match"] == 0.5
    assert not (tmp_path / "demo" / "tiny-model").exists()  # no video stages were asked for


def test_demo_runs_its_three_stages_unless_asked_for_the_sound_proof_alone(monkeypatch):
    from vidtune.train.cli import main
    from vidtune.train.demo import stages

    calls = []
    monkeypatch.setattr(stages, "run_demo", lambda workdir, **kwargs: calls.append(kwargs))
    main(["demo"])
    main(["demo", "--family", "qwen2_5_omni", "--audio"])
    main(["demo", "--family", "qwen2_5_omni", "--audio", "--stages", "base"])
    assert [(c["stages"], c["audio"]) for c in calls] == [
        (("base", "instruct", "chat"), False),
        ((), True),
        (("base",), True),
    ]


def test_every_familys_demo_samples_fit_its_demo_max_length(family_kit, tmp_path, monkeypatch, capsys):
    """The demo's questions and two-turn chats over 4-frame clips fit each family's demo max_length (the packaged
    recipes' with the family's own overrides): none is dropped as too long. Gemma 4's ~300-token questions were, at
    the recipes' 64: `vidtune demo --family gemma4` had nothing to train on."""
    from vidtune.train.cli import main
    from vidtune.train.demo.corpus import write_demo_corpus
    from vidtune.train.demo.stages import family_overrides

    write_demo_corpus(tmp_path / "corpus", num_train=4, num_eval=2)
    monkeypatch.setenv("VIDTUNE_DEMO_DIR", str(tmp_path))
    for stage in ("instruct", "chat"):
        extra = (f"model.name_or_path={family_kit.model_dir}", *family_overrides(family_kit.name))
        main(["check", f"demo/{stage}", *extra, "--out", str(tmp_path / "check.json")])
        report = json.loads((tmp_path / "check.json").read_text())
        assert report["rows"] == report["usable"] > 0, (stage, report["bad_by_kind"], report["dropped_for_length"])
        assert report["tokens"]["max"] <= report["max_length"]
    capsys.readouterr()
