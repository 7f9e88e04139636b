"""Recipes: every shipped recipe parses, validates and dry-runs; typos and illegal combinations are one-line errors;
the 7B recipes fit the real LLaVA-NeXT-Video-7B architecture (built on the meta device, no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vidtune.train.cli import main
from vidtune.train.training.config import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
SEVEN_B = sorted((REPO / "recipes" / "llava_next_video_7b").glob("*.yaml"))
SEVEN_B_CONFIG = json.loads((REPO / "tests" / "assets" / "llava_next_video_7b_config.json").read_text())
ONEVISION_7B = sorted((REPO / "recipes" / "llava_onevision_qwen2_7b").glob("*.yaml"))
INTERNVL_8B = sorted((REPO / "recipes" / "internvl3_5_8b").glob("*.yaml"))


def config_only_folder(folder: Path, asset: str) -> Path:
    """A folder holding only a real model's config.json: enough to build the architecture on the meta device."""
    config = json.loads((REPO / "tests" / "assets" / asset).read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "_comment"}))
    return folder


@pytest.fixture(scope="module")
def seven_b_dir(tmp_path_factory) -> Path:
    return config_only_folder(tmp_path_factory.mktemp("llava-next-video-7b"), "llava_next_video_7b_config.json")


@pytest.fixture(scope="module")
def onevision_7b_dir(tmp_path_factory) -> Path:
    return config_only_folder(tmp_path_factory.mktemp("llava-onevision-7b"), "llava_onevision_qwen2_7b_config.json")


def test_every_recipe_opens_with_its_command():
    assert len(RECIPES) >= 6
    for path in RECIPES:
        lines = path.read_text().splitlines()
        assert lines[0].startswith("# ") and any("vidtune " in line for line in lines[:8] if line.startswith("#")), path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_parses_validates_and_dry_runs(
    path, seven_b_dir, family_kits, tiny_model_dir, capsys, monkeypatch
):
    monkeypatch.setenv("VIDTUNE_DEMO_DIR", str(tiny_model_dir.parent))
    # OneVision's 7B architecture is checked on the meta device below; its dry runs use its tiny model (seconds).
    model = seven_b_dir if path in SEVEN_B else tiny_model_dir
    model = family_kits("llava_onevision").model_dir if path in ONEVISION_7B else model
    # The Qwen recipes' real architectures are checked in test_qwen_families.py; dry runs on their tiny models.
    qwen = {
        "qwen2_5_vl_7b": "qwen2_5_vl",
        "qwen3_vl_8b": "qwen3_vl",
        "qwen2_5_omni_7b": "qwen2_5_omni",
        "internvl3_5_8b": "internvl",
        "gemma4_e4b": "gemma4",
        "qwen3_omni_30b_a3b": "qwen3_omni_moe",
    }.get(path.parent.name)
    model = family_kits(qwen).model_dir if qwen else model
    if (path.parent.name, path.name) == ("demo", "tone.yaml"):  # the sound proof: a family that hears
        model = family_kits("qwen2_5_omni").model_dir
    recipe = load_recipe(path)
    assert recipe.model.name_or_path and recipe.train.output_dir
    main(["train", str(path), f"model.name_or_path={model}", "--dry-run"])
    out = capsys.readouterr().out
    assert "variant: " + recipe.variant in out and "trainable" in out and "language_model" in out


def test_an_override_of_no_is_the_word_not_a_boolean():
    """YAML 1.1 reads `no` as False: `train.mixed_precision=no` must still mean "no" (and `true` a boolean)."""
    base = ["model.name_or_path=m", "data.sources=[{path: rows.jsonl}]", "train.output_dir=out"]
    recipe = load_recipe(None, [*base, "train.mixed_precision=no", "finetune.train_projector=true"])
    assert recipe.train.mixed_precision == "no" and recipe.finetune.train_projector is True


def test_overrides_and_options_mix_in_any_order(tiny_model_dir, capsys):
    from vidtune.train.cli import parse_args

    args = parse_args(["check", "r.yaml", "--decode", "data.max_length=99", "--out", "x.json", "train.seed=3"])
    assert (args.recipe, args.overrides, args.decode, args.out) == (
        "r.yaml",
        ["data.max_length=99", "train.seed=3"],
        True,
        "x.json",
    )
    main(["train", "demo/instruct", "--dry-run", f"model.name_or_path={tiny_model_dir}", "train.learning_rate=0.0123"])
    assert "learning_rate: 0.0123" in capsys.readouterr().out


@pytest.mark.parametrize("path", SEVEN_B, ids=lambda p: p.stem)
def test_7b_recipes_fit_the_real_architecture(path, seven_b_dir):
    """Token budget for the recipe's frames (144 tokens per frame at 336 px), and LoRA exactly where it says."""
    from vidtune.train.training.model import apply_finetuning, build_on_meta, check_audit, trainable_audit

    recipe = load_recipe(path, [f"model.name_or_path={seven_b_dir}"])
    model, family = build_on_meta(recipe.model)
    vision, text = model.config.vision_config, model.config.text_config
    tokens_per_frame = (vision.image_size // vision.patch_size // model.config.spatial_pool_stride) ** 2
    assert tokens_per_frame == 144
    video_tokens = recipe.data.sampling.num_frames * tokens_per_frame
    positions = text.max_position_embeddings * text.rope_parameters["factor"]
    completion = recipe.train.grpo.max_new_tokens if recipe.train.objective == "grpo" else 0  # sampled after the prompt
    assert video_tokens + 256 + completion <= recipe.data.max_length <= positions, (
        video_tokens,
        recipe.data.max_length,
    )

    model = apply_finetuning(model, family, recipe.finetune)
    wrapped = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    assert len(wrapped) == text.num_hidden_layers * 7  # q k v o gate up down in every decoder layer
    assert all(".language_model.layers." in name for name in wrapped)
    audit = trainable_audit(model, family)
    check_audit(audit, recipe.finetune)
    assert audit["parts"]["vision_tower"]["trainable"] == 0
    assert audit["parts"]["projector"]["trainable"] == (
        audit["parts"]["projector"]["total"] if recipe.finetune.train_projector else 0
    )
    assert 6.9e9 < audit["total"] - audit["trainable"] < 7.3e9  # the frozen 7B


@pytest.mark.parametrize("path", ONEVISION_7B, ids=lambda p: p.stem)
def test_onevision_7b_recipes_fit_the_real_architecture(path, onevision_7b_dir):
    """Token budget for the recipe's frames (196 tokens per frame at 384 px, + 1 newline per video), and LoRA
    exactly where it says."""
    import math

    from vidtune.train.training.model import apply_finetuning, build_on_meta, check_audit, trainable_audit

    recipe = load_recipe(path, [f"model.name_or_path={onevision_7b_dir}"])
    model, family = build_on_meta(recipe.model)
    vision, text = model.config.vision_config, model.config.text_config
    tokens_per_frame = math.ceil(vision.image_size // vision.patch_size / 2) ** 2  # 27x27 patches pooled to 14x14
    assert tokens_per_frame == 196
    video_tokens = recipe.data.sampling.num_frames * tokens_per_frame + 1
    assert video_tokens + 256 <= recipe.data.max_length <= text.max_position_embeddings, video_tokens

    model = apply_finetuning(model, family, recipe.finetune)
    wrapped = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    assert len(wrapped) == text.num_hidden_layers * 7  # q k v o gate up down in every decoder layer
    assert all(".language_model.layers." in name for name in wrapped)
    audit = trainable_audit(model, family)
    check_audit(audit, recipe.finetune)
    assert audit["parts"]["vision_tower"]["trainable"] == 0
    assert audit["parts"]["projector"]["trainable"] == (
        audit["parts"]["projector"]["total"] if recipe.finetune.train_projector else 0
    )
    assert 7.9e9 < audit["total"] - audit["trainable"] < 8.2e9  # the frozen 8.0B (Qwen2-7B + SigLIP so400m)


def test_internvl_8b_recipes_fit_the_real_architecture(tmp_path, family_kits):
    """Each recipe's token budget for its frames (256 tokens per 448 px frame + its `Frame{i}: <img>`...`</img>`
    text), and LoRA on the Qwen3-8B text model's attention and MLP only (checked once, on the base recipe, which also
    trains the projector: one 8.5B build on the meta device)."""
    from vidtune.train.training.model import apply_finetuning, build_on_meta, check_audit, trainable_audit

    folder = config_only_folder(tmp_path, "internvl3_5_8b_config.json")
    assert [p.stem for p in INTERNVL_8B] == ["base", "chat", "instruct"]
    recipes = [load_recipe(path, [f"model.name_or_path={folder}"]) for path in INTERNVL_8B]
    model, family = build_on_meta(recipes[0].model)
    vision, text = model.config.vision_config, model.config.text_config
    tokens_per_frame = int((vision.image_size[0] // vision.patch_size[0] * model.config.downsample_ratio) ** 2)
    assert tokens_per_frame == model.config.image_seq_length == 256
    kit = family_kits("internvl")  # the frame labels and <img> </img> as the processor writes them
    for recipe in recipes:
        num_frames = recipe.data.sampling.num_frames
        labels = kit.builder.tokens.video_tokens(num_frames, 448, 448) - num_frames * kit.processor.image_seq_length
        video_tokens = num_frames * tokens_per_frame + labels
        assert video_tokens + 256 <= recipe.data.max_length <= text.max_position_embeddings, video_tokens

    assert recipes[0].finetune.train_projector
    model = apply_finetuning(model, family, recipes[0].finetune)
    wrapped = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    assert len(wrapped) == text.num_hidden_layers * 7  # q k v o gate up down in every decoder layer
    assert all(".language_model.layers." in name for name in wrapped)
    audit = trainable_audit(model, family)
    check_audit(audit, recipes[0].finetune)
    assert audit["parts"]["vision_tower"]["trainable"] == 0
    assert audit["parts"]["projector"]["trainable"] == audit["parts"]["projector"]["total"] > 0
    assert 8.3e9 < audit["total"] - audit["trainable"] < 8.8e9  # the frozen 8.5B (Qwen3-8B + InternViT-300M)


def test_gemma4_e4b_recipe_fits_the_real_architecture(tmp_path, family_kits):
    """The recipe's token budget for its frames (at most 70 tokens per frame + its `mm:ss <|image>`...`<image|>`
    text, and 60 s of sound), and LoRA on the text model's attention and MLP only: the KV-shared layers have no key
    and value projections (one 7.9B build on the meta device; the config's unchecked values: its _comment)."""
    from vidtune.train.training.model import apply_finetuning, build_on_meta, check_audit, trainable_audit

    folder = config_only_folder(tmp_path, "gemma4_e4b_config.json")
    recipe = load_recipe(REPO / "recipes" / "gemma4_e4b" / "instruct.yaml", [f"model.name_or_path={folder}"])
    model, family = build_on_meta(recipe.model)
    text = model.config.text_config
    tokens = family_kits("gemma4").builder.tokens  # the frame times' text as the processor writes it
    num_frames = recipe.data.sampling.num_frames
    times = [i * 60 / num_frames for i in range(num_frames)]  # a 60 s clip
    per_frame_text = tokens.video_tokens(num_frames, 32, 32, times) - num_frames * 64  # tiny: 64 tokens per frame
    video_tokens = num_frames * 70 + per_frame_text
    assert video_tokens + tokens.video_audio_tokens(60.0) + 128 <= recipe.data.max_length, video_tokens

    model = apply_finetuning(model, family, recipe.finetune)
    wrapped = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    shared = text.num_kv_shared_layers
    assert len(wrapped) == text.num_hidden_layers * 5 + (text.num_hidden_layers - shared) * 2
    assert all(".language_model.layers." in name for name in wrapped)
    audit = trainable_audit(model, family)
    check_audit(audit, recipe.finetune)
    assert audit["parts"]["vision_tower"]["trainable"] == 0
    assert 7.8e9 < audit["total"] - audit["trainable"] < 8.1e9  # the frozen 7.9B (E4B with its per-layer tables)


VALID = {"model": {"name_or_path": "m"}, "train": {"output_dir": "out"}, "data": {"sources": [{"path": "a.jsonl"}]}}


def merged(base: dict, fragment: dict) -> dict:
    out = dict(base)
    for key, value in fragment.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and key in base else value
    return out


@pytest.mark.parametrize(
    ("fragment", "overrides", "message"),
    [
        ({"train": {"lerning_rate": 1e-4}}, [], "unknown key 'train.lerning_rate'; did you mean 'learning_rate'?"),
        ({"data": {"sources": [{"pth": "a.json"}]}}, [], "unknown key 'data.sources[0].pth'; did you mean 'path'?"),
        ({}, ["data.sampling.nframes=8"], "unknown key 'data.sampling.nframes'; did you mean 'num_frames'?"),
        ({}, ["finetune.mode=lorra"], "finetune.mode='lorra' is not one of lora, full; did you mean 'lora'?"),
        ({}, ["train.batch_size=big"], "could not be converted to Integer"),
        ({}, ["finetune.mode=full", "finetune.vision_tower=lora"], "finetune.vision_tower=lora needs"),
        ({}, ["data.sampling.num_frames=0"], "num_frames must be >= 1"),
        ({"train": {"output_dir": ""}}, [], "train.output_dir is empty"),
        # the reference of a continued adapter would be the bare base (disable_adapter switches it off too)
        ({"model": {"adapter": "runs/instruct"}}, ["train.objective=dpo"], "merge it first"),
        ({"model": {"adapter": "runs/instruct"}}, ["train.objective=grpo", "train.grpo.beta=0.1"], "merge it first"),
    ],
)
def test_recipe_errors_are_one_line(tmp_path, fragment, overrides, message):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(merged(VALID, fragment)))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
    # A bad command-line item is named as such, not blamed on the recipe file (issue 16).
    override_error = message.startswith("unknown key 'data.sampling") or "converted" in message
    blamed = f"command-line override {overrides[0]!r}: " if override_error else f"{path}: "
    assert str(err.value).startswith(blamed)


def test_cli_reports_recipe_errors_in_one_line_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: m}\ntrain: {output_dir: out, max_stepz: 3}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'max_steps'?" in err


def test_overrides_and_packaged_recipe_names(monkeypatch, tmp_path):
    from vidtune.train.training.config import resolve_recipe_path

    monkeypatch.setenv("VIDTUNE_DEMO_DIR", str(tmp_path))
    path = resolve_recipe_path("demo/instruct")
    recipe = load_recipe(path, ["train.learning_rate=5e-4", "data.sources.0.weight=2", "data.caption_prompts=[a, b]"])
    assert recipe.train.learning_rate == 5e-4 and recipe.data.sources[0].weight == 2.0
    assert recipe.data.caption_prompts == ["a", "b"]
    assert recipe.train.output_dir == f"{tmp_path}/runs/instruct"
    with pytest.raises(RecipeError, match="no recipe 'demo/nope'"):
        resolve_recipe_path("demo/nope")


def test_grpo_without_kl_may_continue_an_adapter(tmp_path):
    """beta 0 uses no reference, so a continued adapter is fine there (dpo and grpo with beta > 0 are refused,
    test_recipe_errors_are_one_line)."""
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(merged(VALID, {"model": {"adapter": "runs/instruct"}})))
    assert load_recipe(path, ["train.objective=grpo"]).model.adapter == "runs/instruct"
