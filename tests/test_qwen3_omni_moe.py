"""Qwen3-Omni-MoE (thinker): the hub prompt, heard clips counted as the processor counts them, mixed batches, LoRA on
attention and the fused experts with the router frozen, and FLOPs of the active experts only."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.hearing import HIGH_HZ, LOW_HZ, heard_example, question, write_tone_twins
from vidtune.data.collator import Collator
from vidtune.data.conversation import media_part, message, text_part
from vidtune.data.dataset import DataConfig, Measurer, load_media
from vidtune.data.families.qwen2_5_omni import ROPE_KEY
from vidtune.data.families.qwen3_omni_moe import audio_tokens_for
from vidtune.data.sources import SourceConfig
from vidtune.data.video import SamplingConfig
from vidtune.train.training.config import FinetuneConfig, LoraSettings, RecipeError
from vidtune.train.training.model import apply_finetuning, check_experts, load_model_config

EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@pytest.fixture(scope="module")
def moe(family_kits):
    return family_kits("qwen3_omni_moe")


@pytest.fixture(scope="module")
def tone_clips(tmp_path_factory):
    return write_tone_twins(tmp_path_factory.mktemp("moe-tones"))


def lora(dropout: float = 0.0, **settings) -> FinetuneConfig:
    return FinetuneConfig(lora=LoraSettings(dropout=dropout, **settings.pop("lora", {})), **settings)


def test_a_heard_clip_follows_the_hub_prompt_and_counts_as_the_processor(moe, tone_clips):
    processor, tokenizer = moe.processor, moe.processor.tokenizer
    example = heard_example(moe, tone_clips[LOW_HZ])
    ids = example["input_ids"]
    text = tokenizer.decode(ids)
    # ChatML without a default system prompt; the video heard: audio and video tokens inside the vision bracket
    assert text.startswith("<|im_start|>user\n<|vision_start|><|audio_start|><|video_pad|>")
    assert "<|audio_pad|><|audio_end|><|vision_end|>Which color comes first?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\nred<|im_end|>\n")
    assert tokenizer.decode(ids[example["labels"] != -100]) == "red<|im_end|>"
    # the measurer's count (no pixels, no sound decoded) is the built length, sound included
    cfg = DataConfig(sources=[SourceConfig(path="a.jsonl")], sampling=SamplingConfig(4))
    builder = copy.copy(moe.builder)
    builder.audio_rate = 16000
    row = {"messages": question(tone_clips[LOW_HZ]), "source": "a.jsonl", "at": "a.jsonl line 1"}
    assert Measurer(builder, cfg).measure(row)["num_tokens"] == len(ids)
    # the audio encoder's windows: 13 tokens per whole 100 mel frames, the rest through three stride-2 steps
    frames = int(example["feature_attention_mask"].sum())
    assert frames == 162  # the 4 sampled frames' span at 100 mel frames per second
    assert int((ids == processor.audio_token_id).sum()) == audio_tokens_for(frames) == 13 + 8  # 62 -> 31 -> 16 -> 8
    video = int((ids == processor.video_token_id).sum())
    assert video == int(example["video_grid_thw"].prod()) // 4


def test_each_examples_positions_are_the_thinkers_own(moe, tone_clips, clips):
    example = heard_example(moe, tone_clips[HIGH_HZ])
    ids = example["input_ids"][None]
    expected, _ = moe.model.model.get_rope_index(
        ids,
        video_grid_thw=example["video_grid_thw"],
        attention_mask=torch.ones_like(ids),
        use_audio_in_video=True,
        audio_seqlens=example["feature_attention_mask"].sum(-1),
        second_per_grids=example["video_second_per_grid"],
    )
    assert torch.equal(example[ROPE_KEY], expected[:, 0])
    # one clock: the clip's second temporal patch (frames 2-3 of 4 at 2 fps: 1 s later) is 13 positions on
    video = example[ROPE_KEY][0][example["input_ids"] == moe.processor.video_token_id]
    assert sorted(set(video.tolist()))[1] - video.min() == 13
    # frames 0.75 s apart: temporal patches 1.5 s apart, 19.5 positions; the batch keeps the fraction, as the model's
    # own positions do (truncated to integers they gave other logits)
    silent = heard_example(moe, clips["three"], audio_rate=None)
    batch = Collator(moe.processor.tokenizer.pad_token_id, family=moe.family)([silent])
    frames = silent[ROPE_KEY][0][silent["input_ids"] == moe.processor.video_token_id]
    assert sorted(set(frames.tolist()))[1] - frames.min() == 19.5
    assert torch.equal(batch["position_ids"][:, 0], silent[ROPE_KEY])


def test_heard_silent_image_and_text_samples_batch_like_single_samples(moe, tone_clips, clips, tmp_path):
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(image)
    pictured = [message("user", [media_part("image", str(image)), text_part("What is it?")])]
    pictured.append(message("assistant", [text_part("a picture")]))
    texted = [message("user", [text_part("Say yes.")]), message("assistant", [text_part("Yes")])]
    examples = [heard_example(moe, tone_clips[LOW_HZ], "blue"), heard_example(moe, clips["red_blue"])]
    examples += [moe.builder.build(m, load_media(m, SamplingConfig(4), False, None)[0]) for m in (pictured, texted)]
    assert "input_features" in examples[0] and "input_features" not in examples[1]
    model = apply_finetuning(copy.deepcopy(moe.model), moe.family, lora()).train()
    collate = Collator(moe.processor.tokenizer.pad_token_id, family=moe.family)
    batch = collate(examples)
    assert batch["position_ids"].shape == (3, 4, batch["input_ids"].shape[1])
    loss = model(**batch, num_items_in_batch=1).loss
    loss.backward()
    experts = [p for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n]
    assert experts and all(p.grad.abs().sum() > 0 for p in experts)
    with torch.no_grad():
        alone = sum(model(**collate([ex]), num_items_in_batch=1).loss.item() for ex in examples)
    assert loss.item() == pytest.approx(alone, rel=1e-4)


def test_lora_covers_attention_and_the_experts_and_leaves_the_router_frozen(moe):
    base = moe.model
    layers = base.config.text_config.num_hidden_layers
    model = apply_finetuning(copy.deepcopy(base), moe.family, lora())
    config = model.peft_config["default"]
    assert sorted(config.target_parameters) == sorted(
        f"model.language_model.layers.{i}.{w}" for i in range(layers) for w in EXPERT_WEIGHTS
    )
    trainable = [n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith("model.language_model.layers.") and ".lora_" in n for n in trainable)
    wrapped = {n.split(".lora_")[0].split(".", 4)[-1] for n in trainable}  # per layer, without the layer index
    assert wrapped == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.experts",  # gate_up_proj
        "mlp.experts.base_layer",  # down_proj, nested in the same module
    }
    # (a regex there would have wrapped the audio tower's q/k/v_proj too: PEFT 0.21 resolves it to leaf names)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mlp.gate." in n)
    # a LoRA step changes the experts' effective weights, never the router's
    routers = {n: p.detach().clone() for n, p in base.named_parameters() if ".mlp.gate." in n}
    merged = model.merge_and_unload()
    assert all(torch.equal(merged.get_parameter(n), routers[n]) for n in routers)

    # asked for: the router trains (fully, saved with the adapter)
    routed = apply_finetuning(copy.deepcopy(base), moe.family, lora(train_router=True))
    router_params = [n for n, p in routed.named_parameters() if ".mlp.gate." in n and p.requires_grad]
    assert len(router_params) == layers and all("modules_to_save" in n for n in router_params)
    # full fine-tuning trains the language model but not its router, unless asked
    full = apply_finetuning(copy.deepcopy(base), moe.family, FinetuneConfig(mode="full"))
    grads = {n: p.requires_grad for n, p in full.named_parameters() if n.startswith("model.language_model.")}
    assert not any(g for n, g in grads.items() if ".mlp.gate." in n)
    assert all(g for n, g in grads.items() if ".mlp.experts." in n or ".self_attn." in n)
    full = apply_finetuning(copy.deepcopy(base), moe.family, FinetuneConfig(mode="full", train_router=True))
    assert all(p.requires_grad for n, p in full.named_parameters() if ".mlp.gate." in n)


def test_lora_dropout_reaches_the_linear_layers_and_targets_may_name_expert_weights(moe, tiny_model_dir):
    # PEFT's ParamWrapper (LoRA on fused experts) refuses dropout: the recipe's goes to the linear layers only
    model = apply_finetuning(copy.deepcopy(moe.model), moe.family, lora(0.1))
    dropouts = {
        n.split(".lora_dropout")[0].rsplit(".", 1)[-1]: type(m).__name__
        for n, m in model.named_modules()
        if n.endswith("lora_dropout.default")
    }
    assert dropouts == {"q_proj": "Dropout", "k_proj": "Dropout", "v_proj": "Dropout", "o_proj": "Dropout"} | {
        "experts": "Identity",
        "base_layer": "Identity",
    }
    assert model.get_submodule("base_model.model.model.language_model.layers.0.self_attn.q_proj").lora_dropout[
        "default"
    ].p == pytest.approx(0.1)
    check_experts(FinetuneConfig(train_router=True), load_model_config(str(moe.model_dir)))
    with pytest.raises(RecipeError, match=r"finetune\.train_router: llava_next_video has no Mixture-of-Experts router"):
        check_experts(FinetuneConfig(train_router=True), load_model_config(str(tiny_model_dir)))
    # targets may name the expert weights alone, or beside linear layers
    only = apply_finetuning(copy.deepcopy(moe.model), moe.family, lora(lora={"targets": ["mlp.experts.down_proj"]}))
    trainable = {n for n, p in only.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.experts." in n for n in trainable)


def test_flops_count_the_active_experts_and_the_whole_router(moe):
    from vidtune.train.training.flops import flop_counter

    text = moe.model.config.text_config
    per_expert = 3 * text.hidden_size * text.moe_intermediate_size
    router = text.num_experts * text.hidden_size
    attention = sum(
        p.numel()
        for n, p in moe.model.named_parameters()
        if n.startswith("model.language_model.") and ".self_attn." in n and n.endswith("proj.weight")
    )
    active = text.num_hidden_layers * text.num_experts_per_tok * per_expert
    assert text.num_experts_per_tok < text.num_experts  # 2 of 4
    frozen = flop_counter(copy.deepcopy(moe.model).requires_grad_(False), moe.family).language
    assert (frozen.frozen, frozen.trained, frozen.lora) == (attention + active + text.num_hidden_layers * router, 0, 0)
    assert flop_counter(copy.deepcopy(moe.model).requires_grad_(False), moe.family).per_forward == 0
    model = apply_finetuning(copy.deepcopy(moe.model), moe.family, lora())
    counter = flop_counter(model, moe.family)
    # each forward builds every expert's rank-16 delta: 2·r per expert weight, 4·r more backward
    assert counter.per_forward == 6 * 16 * text.num_hidden_layers * text.num_experts * per_expert
    adapted = counter.language
    assert adapted.trained == active  # LoRA on the experts: a token pays a trained weight's cost on its experts
    assert adapted.frozen == attention + text.num_hidden_layers * router
    assert 0 < adapted.lora < attention  # the attention's LoRA factors (rank 16 of 64-wide layers)
