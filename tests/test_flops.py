"""The model-FLOP count behind the loop's TFLOPs and MFU (train/training/flops.py): against a hand calculation on
the tiny config, against torch's own FLOP counter on a real forward and backward, and the MFU's peak."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vidtune.data.packing import pack
from vidtune.train.training import flops as F
from vidtune.train.training.config import FinetuneConfig
from vidtune.train.training.model import apply_finetuning, model_class
from vidtune.train.training.tracking import Progress


def lora_model(model_dir, family, train_projector: bool, device: str = "cpu"):
    """The tiny LLaVA-NeXT-Video with LoRA rank 16 on every language-model projection (the recipes' default)."""
    from vidtune.train.training.model import load_model_config

    if device == "meta":
        with torch.device("meta"):
            model = model_class(family)._from_config(load_model_config(str(model_dir)))
    else:  # eager attention: torch's FLOP counter has no formula for CPU's fused sdpa kernel (nor for the grouped
        # matmuls of fused MoE experts: 27,648 FLOPs measured for a layer's experts that run 2.6M)
        eager = {"experts_implementation": "eager"} if family.router_module else {}
        model = model_class(family).from_pretrained(model_dir, attn_implementation="eager", **eager)
    cfg = FinetuneConfig(train_projector=train_projector)
    cfg.lora.dropout = 0.0
    return apply_finetuning(model, family, cfg)


def test_coefficients_match_a_hand_count_of_the_tiny_config(family_kits):
    kit = family_kits("llava_next_video")
    model = lora_model(kit.model_dir, kit.family, train_projector=False, device="meta")
    text, vision = model.config.text_config, model.config.vision_config
    h, i, layers, r = text.hidden_size, text.intermediate_size, text.num_hidden_layers, 16
    assert (h, i, layers, vision.hidden_size, vision.intermediate_size) == (64, 128, 2, 32, 64)  # the tiny sizes
    counter = F.flop_counter(model, kit.family)
    # q k v o (h x h), gate up (h -> i), down (i -> h); LoRA r x (in + out) on each: r x (4 x 2h + 3 x (h + i))
    lora = layers * r * (11 * h + 3 * i)
    assert counter.language == F.PartWeights(frozen=layers * (4 * h * h + 3 * h * i), lora=lora)
    assert counter.head == F.PartWeights(frozen=text.vocab_size * h)
    # CLIP: q k v out (32 x 32), fc1 fc2 (32 <-> 64) per layer, the 8x8x3 -> 32 patch convolution
    assert counter.vision == F.PartWeights(frozen=2 * (4 * 32 * 32 + 2 * 32 * 64) + 3 * 8 * 8 * 32)
    assert counter.projector == F.PartWeights(frozen=32 * 64 + 64 * 64)
    assert counter.attention_per_pair == 12 * layers * h
    assert counter.vision_attention_per_pair == 4 * 2 * 32
    # 100 tokens in two samples of 60 and 40, 10 scored: frozen weights 4 per token (forward and the activations'
    # gradient), LoRA 6, the frozen head 4 at the scored positions, attention 12 L d per pair
    tokens, labels, pairs = torch.tensor(100), torch.tensor(10), torch.tensor(60.0**2 + 40.0**2)
    by_hand = 100 * (4 * 81_920 + 6 * 34_816) + 10 * 4 * text.vocab_size * 64 + 5_200 * 1_536
    assert counter.language_flops(tokens, labels, pairs).item() == by_hand


def test_squared_lengths_of_padded_and_packed_batches():
    def sample(length: int, scored: int) -> dict[str, torch.Tensor]:
        labels = torch.full((length,), -100)
        labels[-scored:] = 7
        return {"input_ids": torch.full((length,), 5), "labels": labels}

    samples = [sample(6, 2), sample(3, 1), sample(4, 1)]
    padded = {
        "attention_mask": torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 4 + [0] * 2]),
    }
    assert F.squared_lengths(padded).item() == 36 + 9 + 16
    packed = pack(samples, max_length=7, pad_token_id=0, family=None)  # rows [6], [4, 3]: the first padded by 1
    assert packed["input_ids"].shape == (2, 7)
    assert F.squared_lengths(packed).item() == 36 + 9 + 16  # the padding segment holds no label: left out


def test_mfu_needs_a_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 PCIe")
    assert F.peak_tflops() == 756.0  # the PCIe variant, not the SXM figure its name also contains
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    assert F.peak_tflops() == 989.0
    assert F.peak_tflops(500.0) == 500.0  # the recipe's train.peak_tflops wins
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Some Future GPU")
    assert F.peak_tflops() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert F.peak_tflops() is None  # a CPU: no MFU unless the recipe gives a peak

    step = {"loss": 1.0, "lr": 1e-4, "grad_norm": 1.0, "samples": 2, "tokens": 100, "flops": 4e12}
    without = Progress(processes=2).update(step, 0, 0, 0)
    assert without["train/tflops_per_gpu"] > 0 and "train/mfu" not in without
    with_peak = Progress(processes=2, peak_tflops=1e-3).update(step, 0, 0, 0)
    assert with_peak["train/mfu"] == pytest.approx(with_peak["train/tflops_per_gpu"] / 1e-3)


@pytest.mark.parametrize(
    "asset",
    [
        "llava_next_video_7b_config.json",
        "llava_onevision_qwen2_7b_config.json",
        "qwen2_5_vl_7b_config.json",
        "qwen3_vl_8b_config.json",
        "internvl3_5_8b_config.json",
    ],
)
def test_every_matmul_weight_of_each_7b_is_counted_once(asset, tmp_path):
    """On each family's real 7B/8B architecture (meta device, no weights): the parts' matmul weights together are
    exactly the model's weights that are not embedding tables (lookups) or vectors (norms, biases), so none is
    missed or counted twice; the language model with its head is the 6.5-7.6B a 6N count needs."""
    import json
    from pathlib import Path

    from vidtune.train.training.config import ModelConfig
    from vidtune.train.training.model import build_on_meta

    config = json.loads((Path(__file__).parent / "assets" / asset).read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "_comment"}))
    model, family = build_on_meta(ModelConfig(name_or_path=str(tmp_path)))
    counter = F.flop_counter(model, family)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    # InternViT keeps its class token and position table as bare (1, n, d) parameters: added, not multiplied
    added = {id(p) for name, p in model.named_parameters() if name.endswith(("cls_token", "position_embeddings"))}
    matmul = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in tables | added)
    parts = (counter.language, counter.head, counter.vision, counter.projector)
    assert sum(part.total for part in parts) == matmul
    assert 6.4e9 < counter.language.total + counter.head.total < 7.7e9
    assert counter.vision.total > 3e8 and counter.projector.total > 1e7


def test_count_matches_torch_flop_counter_for_every_family(family_kit, clips):
    """torch.utils.flop_counter counts every matmul, convolution and attention product that actually runs. On each
    family's tiny model and a processor-made batch of two clips (its own visual tensors: CLIP/SigLIP frames, Qwen's
    flattened patches and grid), the count is within 2% of what it measures in a forward and backward (measured:
    LLaVA-NeXT-Video +0.3%, OneVision +0.5%, Qwen2.5-VL -0.3%, Qwen3-VL +1.7%: work charged that does not run, see
    below, against Qwen's windowed vision attention left out). A hook that missed the tower's tokens or the
    projector's rows would be off by far more on these tiny models."""
    from vidtune.data.collator import Collator
    from vidtune.data.dataset import load_media
    from vidtune.data.video import SamplingConfig
    from vidtune.train.training.loss import model_loss

    model = lora_model(family_kit.model_dir, family_kit.family, train_projector=True)
    family_kit.family.prepare_model(model)
    video = {"type": "video", "path": str(clips["red_blue"]), "start_s": None, "end_s": None}
    messages = [
        {"role": "user", "content": [video, {"type": "text", "text": "What colours?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red then blue"}]},
    ]
    media, _ = load_media(messages, SamplingConfig(4), False, None, shortest_edge=family_kit.builder.frame_px)
    example = family_kit.builder.build(messages, media)
    batch = Collator(family_kit.processor.tokenizer.pad_token_id, family=family_kit.family)([example, example])
    batch.pop("skipped", None)
    counter = F.flop_counter(model, family_kit.family, head_everywhere=True)
    tokens, label_tokens = batch["attention_mask"].sum(), (batch["labels"][:, 1:] != -100).sum()
    with FlopCounterMode(display=False) as measured:
        model_loss(model, batch).backward()
    assert counter.seen.tower_tokens > 0 and counter.seen.projector_flops > 0
    ours = counter.language_flops(tokens, label_tokens, F.squared_lengths(batch)).item() + counter.media_flops()
    assert counter.seen.take() == (0, 0, 0, 0)  # media_flops took the step's counts
    # Qwen3.5's Gated DeltaNet recurrence (chunked products inside each linear_attn layer) is not counted (flops.py
    # says so): 11% of this tiny model's FLOPs, whose narrow heads run in 64-token chunks. Everything else must agree.
    recurrence = sum(
        flops
        for module, counts in measured.get_flop_counts().items()
        if module.endswith(".linear_attn")
        for op, flops in counts.items()
        if "bmm" in str(op)
    )
    assert (recurrence > 0) == family_kit.family.name.startswith("qwen3_5")
    assert ours == pytest.approx(measured.get_total_flops() - recurrence, rel=0.02)
    if family_kit.name == "llava_next_video":
        # Exactly: the difference is the two terms charged that do not run, the gradient of the projector's first
        # layer's input (the frozen tower's features, which nothing needs) and the class token through the patch
        # convolution (it is no patch).
        frames = batch["pixel_values_videos"].shape[0] * batch["pixel_values_videos"].shape[1]
        first_projector_layer, patch_convolution = 32 * 64, 3 * 8 * 8 * 32
        not_run = 2 * frames * model.config.video_seq_length * first_projector_layer + 2 * frames * patch_convolution
        assert ours - measured.get_total_flops() == not_run


@pytest.mark.parametrize("family", ["qwen2_5_omni", "gemma4", "qwen3_omni_moe"])
def test_count_matches_torch_flop_counter_on_clips_heard_with_their_sound(family, family_kits, tmp_path):
    """The families that hear, on two clips with their sound: the audio side's count equals what torch's counter
    measures in the audio tower and its projection, attention products aside (Gemma 4: plus its lconv1d's
    linear_end, which runs but to which torch's counter charges 0), and the whole step is within 2.5% of torch's
    (measured: Qwen2.5-Omni -2.1%, its windowed audio attention left out; Gemma 4 -0.7%; without the audio hooks
    they were 10% and 5% short)."""
    from tests.hearing import HIGH_HZ, heard_example, write_tone_twins
    from vidtune.data.collator import Collator
    from vidtune.train.training.loss import model_loss

    kit = family_kits(family)
    model = lora_model(kit.model_dir, kit.family, train_projector=True)
    kit.family.prepare_model(model)
    example = heard_example(kit, write_tone_twins(tmp_path)[HIGH_HZ])
    batch = Collator(kit.processor.tokenizer.pad_token_id, family=kit.family)([example, example])
    batch.pop("skipped", None)
    assert "input_features" in batch
    counter = F.flop_counter(model, kit.family, head_everywhere=True)
    tokens, label_tokens = batch["attention_mask"].sum(), (batch["labels"][:, 1:] != -100).sum()
    with FlopCounterMode(display=False) as measured:
        model_loss(model, batch).backward()
    audio = counter.seen.audio_flops
    ours = counter.language_flops(tokens, label_tokens, F.squared_lengths(batch)).item() + counter.media_flops()
    parts = tuple(f".{p.rstrip('.')}" for p in (kit.family.audio_tower_prefix, kit.family.audio_projector_prefix) if p)
    counts = measured.get_flop_counts()
    audio_measured = sum(
        flops
        for module in counts
        if module.endswith(parts)
        for op, flops in counts[module].items()
        if "bmm" not in str(op)
    )
    uncounted_by_torch = 2 * 2 * 41 * 32 * 32 if family == "gemma4" else 0  # linear_end: 2 clips x 41 rows x 32²
    assert audio == audio_measured + uncounted_by_torch > 0
    assert ours == pytest.approx(measured.get_total_flops(), rel=0.025)
