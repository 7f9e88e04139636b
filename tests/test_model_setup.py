"""What trains in each fine-tuning mode, and runs whose trainable set contradicts the recipe are refused."""

from __future__ import annotations

import pytest

from vidtune.data.families.llava_next_video import LLAVA_NEXT_VIDEO
from vidtune.train.training.config import FinetuneConfig, LoraSettings, ModelConfig, RecipeError
from vidtune.train.training.model import apply_finetuning, check_audit, format_audit, load_model, trainable_audit

MODES = {
    "lora": FinetuneConfig(),
    "lora+projector": FinetuneConfig(train_projector=True),
    "lora+vision-lora": FinetuneConfig(vision_tower="lora"),
    "lora+vision-full": FinetuneConfig(vision_tower="full"),
    "full": FinetuneConfig(mode="full"),
    "full+projector+vision": FinetuneConfig(mode="full", train_projector=True, vision_tower="full"),
}
# part -> expected state: "none" (frozen), "all" (fully trained), "lora" (frozen + LoRA in it)
EXPECTED = {
    "lora": {"vision_tower": "none", "projector": "none", "language_model": "lora"},
    "lora+projector": {"vision_tower": "none", "projector": "all", "language_model": "lora"},
    "lora+vision-lora": {"vision_tower": "lora", "projector": "none", "language_model": "lora"},
    "lora+vision-full": {"vision_tower": "all", "projector": "none", "language_model": "lora"},
    "full": {"vision_tower": "none", "projector": "none", "language_model": "all"},
    "full+projector+vision": {"vision_tower": "all", "projector": "all", "language_model": "all"},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_audit_matches_each_mode(mode, tiny_model_dir):
    model, family = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    model = apply_finetuning(model, family, MODES[mode])
    audit = trainable_audit(model, family)
    for part, expect in EXPECTED[mode].items():
        counts, lora = audit["parts"][part], audit["lora"].get(part, 0)
        assert counts["total"] > 0
        if expect == "all":
            assert counts["trainable"] == counts["total"] and lora == 0, part
        elif expect == "none":
            assert counts["trainable"] == 0 and lora == 0, part
        else:
            assert counts["trainable"] == 0 and lora > 0, part
    assert audit["parts"]["other"]["trainable"] == 0
    assert "audio_tower" not in format_audit(audit)  # LLaVA does not hear: no empty audio row
    check_audit(audit, MODES[mode])  # consistent with its own recipe
    direct = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert audit["trainable"] == direct


def test_a_trainable_set_that_contradicts_the_recipe_is_refused(tiny_model_dir):
    model, family = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    model = apply_finetuning(model, family, FinetuneConfig())
    model.base_model.model.model.multi_modal_projector.linear_1.weight.requires_grad_(True)  # a stray unfreeze
    with pytest.raises(RecipeError, match="projector should be frozen apart from LoRA"):
        check_audit(trainable_audit(model, family), FinetuneConfig())
    with pytest.raises(RecipeError, match="projector should train fully"):
        check_audit(trainable_audit(model, family), FinetuneConfig(train_projector=True))


def test_lora_targets_are_scoped_to_the_language_model(tiny_model_dir):
    """CLIP's attention also has q_proj/k_proj/v_proj: naming them must not put LoRA in the vision tower."""
    model, family = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    model = apply_finetuning(model, family, FinetuneConfig(lora=LoraSettings(targets=["q_proj", "v_proj"])))
    wrapped = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    assert wrapped and all(".language_model." in n and n.endswith(("q_proj", "v_proj")) for n in wrapped)


def test_unknown_lora_target_lists_the_available_layers(tiny_model_dir):
    model, family = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    with pytest.raises(RecipeError, match=r"\['qkv'\] match no linear layer under model.language_model; available"):
        apply_finetuning(model, family, FinetuneConfig(lora=LoraSettings(targets=["qkv"])))


def test_missing_model_is_a_one_line_error(tmp_path):
    with pytest.raises(RecipeError, match="cannot load model"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "nowhere")))
    assert LLAVA_NEXT_VIDEO.model_types == ("llava_next_video",)


def test_vision_lora_wraps_only_layers_the_model_reads_and_each_gets_a_gradient(tiny_model_dir, builder, clips):
    """Features come from CLIP's second-to-last layer (vision_feature_layer -2): LoRA in the last layer would never
    get a gradient. It is not wrapped (nor counted), and every wrapped vision layer does get one."""
    from vidtune.data.conversation import media_part, message, text_part
    from vidtune.data.video import SamplingConfig, load_clip

    model, family = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    last = model.config.vision_config.num_hidden_layers - 1
    model = apply_finetuning(model, family, FinetuneConfig(vision_tower="lora"))
    vision = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and ".vision_tower." in n]
    assert vision and not [n for n in vision if f".layers.{last}." in n]
    assert {n.split(".layers.")[1].split(".")[0] for n in vision} == {str(i) for i in range(last)}
    frames = load_clip(str(clips["red_blue"]), SamplingConfig(4)).frames
    messages = [
        message("user", [media_part("video", str(clips["red_blue"])), text_part("Colours?")]),
        message("assistant", [text_part("red then blue")]),
    ]
    example = builder.build(messages, {0: frames})
    batch = {k: v.unsqueeze(0) for k, v in example.items() if k != "pixel_values_videos"}
    model(**batch, pixel_values_videos=example["pixel_values_videos"].unsqueeze(0)).loss.backward()
    # (lora_A's gradient is exactly 0 while lora_B is still 0, its initial value; it must exist all the same)
    no_gradient = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or ("lora_B" in n and not p.grad.abs().sum()))
    ]
    assert no_gradient == []


def test_from_config_builds_random_weights_without_reading_any(tiny_model_dir, tiny_model, tmp_path):
    """model.from_config: a folder with config.json (and processor files) but no weights builds the architecture
    with fresh random weights (throughput benchmarks of a 7B need no 15 GB download)."""
    import shutil

    import torch

    folder = tmp_path / "config-only"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    assert not list(folder.glob("*.safetensors"))
    with pytest.raises(OSError):  # the plain path needs the weights
        load_model(ModelConfig(name_or_path=str(folder), dtype="float32"))
    model, family = load_model(ModelConfig(name_or_path=str(folder), dtype="float32", from_config=True))
    assert family is LLAVA_NEXT_VIDEO
    ours, saved = dict(model.named_parameters()), dict(tiny_model.named_parameters())
    assert {n: p.shape for n, p in ours.items()} == {n: p.shape for n, p in saved.items()}
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours[name], saved[name])  # random, not read from the tiny model's file


def test_qwen2_5_vl_vision_lora_leaves_the_conv3d_patch_embedding_and_the_audit_sees_every_wrap(family_kits):
    """Issue 24 item 9: the vision target `proj` also names Qwen2.5-VL's Conv3d patch embedding
    (`visual.patch_embed.proj`); only linear layers are wrapped, and the audit lists every wrapped module by kind, so
    a non-linear wrap (here forced by hand) is refused."""
    from peft import LoraConfig, get_peft_model

    kit = family_kits("qwen2_5_vl")
    model, family = load_model(ModelConfig(name_or_path=str(kit.model_dir)))
    model = apply_finetuning(model, family, FinetuneConfig(vision_tower="lora"))
    audit = trainable_audit(model, family)
    assert set(audit["wrapped"]) == {"Linear"}
    assert any(name.endswith("attn.proj") for name in audit["wrapped"]["Linear"])  # the linear `proj`s still are
    assert not [name for name in audit["wrapped"]["Linear"] if "patch_embed" in name]
    check_audit(audit, FinetuneConfig(vision_tower="lora"))

    model, family = load_model(ModelConfig(name_or_path=str(kit.model_dir)))
    model.requires_grad_(False)
    conv = LoraConfig(r=2, target_modules=r"model\.language_model.*q_proj|model\.visual\.patch_embed\.proj")
    audit = trainable_audit(get_peft_model(model, conv), family)
    assert audit["wrapped"]["Conv3d"] == ["model.visual.patch_embed.proj"]
    with pytest.raises(RecipeError, match=r"LoRA wraps 1 Conv3d module\(s\) \(model.visual.patch_embed.proj"):
        check_audit(audit, FinetuneConfig(vision_tower="lora"))
