"""QLoRA (`model.quantization.bits=4`): every family trains on its 4-bit nf4 language model on CPU, tracks the fp32
LoRA run, trains only LoRA, never quantizes the vision tower, projector or lm_head, resumes exactly, and exports an
adapter whose model card loads the base quantized (plain transformers + peft + bitsandbytes) and generates what
`vidtune infer` generates. Bad settings are one line before any model loads."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import RUN_FAMILIES, resumable_run, tiny_run_overrides
from tests.test_export import card_code
from tests.test_train import losses, run_cli, write_recipe
from vidtune.train.training.config import RecipeError, load_recipe

QLORA = ("model.quantization.bits=4",)
# Measured: the tiny families' 4-bit nf4 losses differ from the fp32 LoRA run's by at most 0.84% per step
# (LLaVA-OneVision; 0.19-0.40% for the others) over 4 steps at lr 1e-2 with dropout on.
LOSS_RTOL = 0.02
# The tiny Gemma 4's training is not bit-reproducible across processes (measured 2026-12-08: its fp32 LoRA run's
# step-3 loss ranged 6.547-6.701 over three fresh processes, 2.3%, and step 1 differs by 0.04% even without
# dropout; weights, buffers and corpus are identical): the 4-bit run cannot track it within 2%. Open in issue 28.
FAMILY_LOSS_RTOL = {"gemma4": 0.05}


@pytest.fixture(scope="session")
def qlora_runs(family_kits, demo_corpus, tmp_path_factory) -> Callable[[str], Path]:
    """`qlora_runs(name)`: that family's resumable run with a 4-bit base (the fp32 twin is conftest's family_runs)."""
    from vidtune.train.training.loop import train

    runs: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in runs:
            output = tmp_path_factory.mktemp(f"qlora-{name}") / "run"
            run_settings = (*resumable_run(demo_corpus), *QLORA)
            overrides = tiny_run_overrides(family_kits(name).model_dir, demo_corpus, output, *run_settings)
            train(load_recipe(None, overrides))
            runs[name] = output
        return runs[name]

    return run


def recipe_with(tmp_path: Path, *overrides: str):
    base = [f"model.name_or_path={tmp_path}", f"train.output_dir={tmp_path}/out", "data.sources=[{path: qa.jsonl}]"]
    return load_recipe(None, [*base, *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model.quantization.bits=3",), "model.quantization.bits=3 is not one of 0 (off), 4 (QLoRA), 8"),
        (("model.quantization.bits=4", "model.quantization.quant_type=int4"), "quant_type='int4' is not one of"),
        (("model.quantization.bits=4", "finetune.mode=full"), "full fine-tuning cannot update them"),
    ],
)
def test_bad_quantization_settings_are_one_line_before_any_model_loads(tmp_path, overrides, message):
    with pytest.raises(RecipeError) as err:
        recipe_with(tmp_path, *overrides)  # the folder holds no model: nothing is loaded to find this
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_bitsandbytes_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    import vidtune.train.training.quantization as quantization

    monkeypatch.setattr(quantization, "bitsandbytes_installed", lambda: False)
    with pytest.raises(RecipeError, match=r"needs bitsandbytes: pip install 'vidtune\[qlora\]'"):
        recipe_with(tmp_path, "model.quantization.bits=4")
    with pytest.raises(
        RecipeError, match=r"train.optimizer=adamw_8bit needs bitsandbytes: pip install 'vidtune\[qlora"
    ):
        recipe_with(tmp_path, "train.optimizer=adamw_8bit")
    assert recipe_with(tmp_path).model.quantization.bits == 0  # unquantized recipes never ask for it


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_keep_adamws_groups_and_settings(tmp_path, optimizer):
    """bitsandbytes' AdamW8bit with the same weight-decay split, lr and betas as torch's AdamW; paged without CUDA
    is the plain 8-bit one (bitsandbytes would fall back to it with a warning at every new state)."""
    import warnings

    import bitsandbytes as bnb

    from vidtune.train.training.build import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128))
    recipe = recipe_with(tmp_path, f"train.optimizer={optimizer}", "train.weight_decay=0.1", "train.learning_rate=3e-4")
    optimizer_, _ = build_optimizer(recipe, model, total_steps=10)
    assert type(optimizer_) is bnb.optim.AdamW8bit
    decay, no_decay = optimizer_.param_groups
    assert decay["params"] == [model[0].weight] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 and g["initial_lr"] == 3e-4 for g in (decay, no_decay))
    model(torch.randn(2, 64)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer_.step()
    assert optimizer_.state[model[0].weight]["state1"].dtype == torch.uint8  # 8192 values: 8-bit moments


def test_deepspeed_with_a_quantized_model_is_refused_before_it_loads(tmp_path):
    from accelerate.utils import DistributedType

    from vidtune.train.training.build import refuse_quantized_engine

    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}})
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin)
    )
    with pytest.raises(RecipeError, match=r"bits=4 under DeepSpeed ZeRO-3: .* launch/accelerate/ddp\.yaml"):
        refuse_quantized_engine(recipe_with(tmp_path, "model.quantization.bits=4"), accelerator)
    with pytest.raises(
        RecipeError, match=r"train.optimizer=paged_adamw_8bit under DeepSpeed: .* train.optimizer=adamw"
    ):
        refuse_quantized_engine(recipe_with(tmp_path, "train.optimizer=paged_adamw_8bit"), accelerator)


@pytest.mark.slow
@pytest.mark.parametrize("family", RUN_FAMILIES)
def test_a_4bit_run_of_every_family_tracks_fp32_lora_and_trains_only_lora(family, qlora_runs, family_runs):
    """Same data, seed and dropout masks as the fp32 LoRA run: each step's loss within LOSS_RTOL (the nf4 rounding
    of the base is all that differs); the audit the run wrote shows LoRA on the language model and nothing else
    training; loading the run as `vidtune infer` does quantizes exactly the language model's linear layers."""
    import bitsandbytes as bnb

    from vidtune.data.families import family_for
    from vidtune.train.generation.infer import load_for_inference
    from vidtune.train.training.model import FUSED_WEIGHTS
    from vidtune.train.training.quantization import quantized_module_names

    output, reference = qlora_runs(family), family_runs(family)
    quantized, full = losses(output), losses(reference)
    assert sorted(quantized) == sorted(full) == [1, 2, 3, 4]
    for step, loss in full.items():
        assert quantized[step] == pytest.approx(loss, rel=FAMILY_LOSS_RTOL.get(family, LOSS_RTOL)), step
    assert quantized != full  # the base really was quantized

    audit = json.loads((output / "trainable_parameters.json").read_text())
    assert all(counts["trainable"] == 0 for counts in audit["parts"].values())
    assert set(audit["lora"]) == {"language_model"} and audit["trainable"] == audit["lora"]["language_model"]
    # LoRA on 4-bit linear layers (and on MoE experts' fused weights, which bitsandbytes leaves unquantized)
    assert audit["wrapped"]["Linear4bit"] and set(audit["wrapped"]) <= {"Linear4bit", "Linear", FUSED_WEIGHTS}
    # the audit counts the 4-bit weights at their real size (bitsandbytes packs two per byte)
    assert audit["total"] == json.loads((reference / "trainable_parameters.json").read_text())["total"]
    assert json.loads((output / "vidtune.json").read_text())["quantization"]["quant_type"] == "nf4"

    fam = family_for(family)
    model = load_for_inference(str(output)).model

    def core(name: str) -> str:
        return name.removeprefix("base_model.model.").removesuffix(".base_layer")

    language_model_linear = {
        core(n)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in n and core(n).startswith(fam.language_model_prefix)
    }
    kept = {n for n in language_model_linear if n.endswith(fam.quantization_skip_modules)}  # Qwen3.5's decay gates
    assert {core(n) for n in quantized_module_names(model)} == language_model_linear - kept
    outside = [m for n, m in model.named_modules() if n.removeprefix("base_model.model.").startswith("model.visual")]
    outside += [m for n, m in model.named_modules() if fam.vision_tower_prefix in n or fam.projector_prefix in n]
    assert outside and not any(isinstance(m, bnb.nn.Linear4bit) for m in outside)
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)


@pytest.mark.slow
def test_a_killed_4bit_run_resumes_with_identical_losses(family_kits, qlora_runs, demo_corpus, tmp_path, capsys):
    """kill -9 at step 3's second micro-batch, relaunch: steps 3-4 log the uninterrupted QLoRA run's very losses
    (the base is quantized again, deterministically, as it loads; the checkpoint holds the adapter and its states)."""
    from vidtune.train.training.loop import train

    model_dir = family_kits("llava_next_video").model_dir
    settings = (*resumable_run(demo_corpus), *QLORA)
    recipe = load_recipe(None, tiny_run_overrides(model_dir, demo_corpus, tmp_path / "cut", *settings))
    crashed = write_recipe(recipe, tmp_path / "cut.yaml")
    killed = run_cli("train", str(crashed), fault="kill@2.1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    capsys.readouterr()
    train(load_recipe(crashed))
    assert "step_00000002" in capsys.readouterr().out
    assert losses(tmp_path / "cut") == losses(qlora_runs("llava_next_video"))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava_next_video", "qwen2_5_vl"])
def test_the_exported_qlora_adapters_card_loads_the_base_4bit_and_generates_what_vidtune_infer_does(
    family, family_kits, qlora_runs, demo_corpus, capsys
):
    from vidtune.train.generation.infer import generate, load_for_inference, video_question
    from vidtune.train.publishing.export import export_folder

    run = qlora_runs(family)
    folder = export_folder(run, to=run.parent / "export", card={"repo_id": str(run.parent / "export")}).folder
    inference = load_for_inference(str(folder))
    video = demo_corpus / "videos" / "eval_0002.mp4"
    ours = generate(inference, [video_question(str(video), "What happens?")], 6, min_new_tokens=6)[0]
    code = card_code(folder, family_kits(family).model_dir, video)
    assert "BitsAndBytesConfig(" in code and 'bnb_4bit_quant_type="nf4"' in code
    capsys.readouterr()
    exec(compile(code, str(folder / "README.md"), "exec"), {})
    assert capsys.readouterr().out.strip() == ours


@pytest.mark.slow
def test_merge_folds_a_qlora_adapter_into_the_real_weights_not_the_4bit_ones(family_kits, qlora_runs):
    """`vidtune export --merge` of a QLoRA run: each merged weight is the base checkpoint's own weight + the LoRA
    delta, in the base's dtype (no 4-bit rounding baked in)."""
    from safetensors.torch import load_file

    from vidtune.train.publishing.export import export_folder

    run = qlora_runs("llava_next_video")
    folder = export_folder(run, to=run.parent / "merged", merge=True).folder

    def weights(model_dir: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in model_dir.glob("*.safetensors") for k, v in load_file(f).items()}

    def language_model_q_proj(state: dict[str, torch.Tensor], suffix: str = "weight") -> torch.Tensor:
        (key,) = [k for k in state if "language_model" in k and k.endswith(f"layers.0.self_attn.q_proj.{suffix}")]
        return state[key]

    merged, base = weights(folder), weights(family_kits("llava_next_video").model_dir)
    adapter = load_file(run / "adapter_model.safetensors")
    config = json.loads((run / "adapter_config.json").read_text())
    delta = language_model_q_proj(adapter, "lora_B.weight") @ language_model_q_proj(adapter, "lora_A.weight")
    expected = language_model_q_proj(base) + config["lora_alpha"] / config["r"] * delta
    assert language_model_q_proj(merged).dtype == language_model_q_proj(base).dtype == torch.float32
    torch.testing.assert_close(language_model_q_proj(merged), expected, rtol=0, atol=1e-6)
    assert not torch.equal(language_model_q_proj(merged), language_model_q_proj(base))


def test_8bit_quantizes_only_the_language_model_and_trains_lora(tiny_model_dir):
    from vidtune.train.training.config import FinetuneConfig, ModelConfig
    from vidtune.train.training.model import apply_finetuning, load_model
    from vidtune.train.training.quantization import QuantizationConfig, quantized_module_names

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", quantization=QuantizationConfig(bits=8))
    model, family = load_model(cfg)  # check_quantized inside: nothing outside the language model
    names = quantized_module_names(model)
    assert names and all(n.startswith(family.language_model_prefix) for n in names)
    model = apply_finetuning(model, family, FinetuneConfig())
    ids = torch.randint(5, 50, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
