"""Gemma 4: videos heard with their sound (an audio part after each video), mixed with silent clips, images and text
in one batch; its soft-capped logits in every loss computed from hidden states; the blank paths of its three
encoders in forward order."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.hearing import HIGH_HZ, LOW_HZ, heard_example, question, write_tone_twins
from vidtune.data.collator import Collator
from vidtune.data.conversation import media_part, message, text_part
from vidtune.data.dataset import DataConfig, Measurer, load_media
from vidtune.data.sources import SourceConfig
from vidtune.data.video import SamplingConfig
from vidtune.train.training.loss import ChunkedLoss, language_head, model_loss


@pytest.fixture(scope="module")
def gemma(family_kits):
    return family_kits("gemma4")


@pytest.fixture(scope="module")
def tone_clips(tmp_path_factory):
    return write_tone_twins(tmp_path_factory.mktemp("gemma-tones"))


def test_a_heard_clip_is_followed_by_its_sound_and_counts_as_measured(gemma, tone_clips):
    processor, tokenizer = gemma.processor, gemma.processor.tokenizer
    example = heard_example(gemma, tone_clips[LOW_HZ])
    ids = example["input_ids"]
    text = tokenizer.decode(ids)
    assert "<image|><|audio><|audio|>" in text and "<|audio|><audio|>Which color" in text  # video, its sound, text
    assert tokenizer.decode(ids[example["labels"] != -100]) == "red<turn|>"
    # the measurer's count (no pixels, no sound decoded) is the built length, sound included
    cfg = DataConfig(sources=[SourceConfig(path="a.jsonl")], sampling=SamplingConfig(4))
    builder = copy.copy(gemma.builder)
    builder.audio_rate = 16000
    row = {"messages": question(tone_clips[LOW_HZ]), "source": "a.jsonl", "at": "a.jsonl line 1"}
    assert Measurer(builder, cfg).measure(row)["num_tokens"] == len(ids)
    # 25 tokens per second of the sampled span (0.25 s to 1.875 s), as the processor's own formula says
    media, _ = load_media(question(tone_clips[LOW_HZ]), SamplingConfig(4), False, None, audio_rate=16000)
    sound = media[0].audio
    num_audio = int((ids == processor.audio_token_id).sum())
    assert num_audio == processor._compute_audio_num_tokens(sound.samples, 16000) == round(25 * sound.duration_s)


def test_heard_silent_image_and_text_samples_batch_like_single_samples(gemma, tone_clips, clips, tmp_path):
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(image)
    pictured = [message("user", [media_part("image", str(image)), text_part("What is it?")])]
    pictured.append(message("assistant", [text_part("a picture")]))
    texted = [message("user", [text_part("Say yes.")]), message("assistant", [text_part("Yes")])]
    examples = [heard_example(gemma, tone_clips[LOW_HZ], "blue"), heard_example(gemma, clips["red_blue"])]
    examples.append(heard_example(gemma, tone_clips[HIGH_HZ], "red"))  # a second sound: padded to the longest
    examples += [gemma.builder.build(m, load_media(m, SamplingConfig(4), False, None)[0]) for m in (pictured, texted)]
    assert "input_features" in examples[0] and "input_features" not in examples[1]  # no audio stream: unheard
    model = copy.deepcopy(gemma.model).train()
    collate = Collator(gemma.processor.tokenizer.pad_token_id, family=gemma.family)
    batch = collate(examples)
    assert batch["input_features"].shape[0] == 2 and batch["num_frames_per_video"].tolist() == [4, 4, 4]
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    loss = model(**batch, num_items_in_batch=1).loss
    loss.backward()
    assert model.model.audio_tower.output_proj.weight.grad.abs().sum() > 0
    alone = sum(model(**collate([ex]), num_items_in_batch=1).loss.item() for ex in examples)
    assert loss.item() == pytest.approx(alone, rel=1e-4)


def test_the_sound_reaches_the_model_and_audio_off_leaves_it_out(gemma, tone_clips):
    low, high = (heard_example(gemma, tone_clips[hz]) for hz in (LOW_HZ, HIGH_HZ))
    collate = Collator(gemma.processor.tokenizer.pad_token_id, family=gemma.family)
    with torch.no_grad():
        logits = [gemma.model(**collate([ex])).logits for ex in (low, high)]
    assert not torch.allclose(logits[0], logits[1])  # same pictures, different tone
    unheard = [heard_example(gemma, tone_clips[hz], audio_rate=None) for hz in (LOW_HZ, HIGH_HZ)]
    assert all("input_features" not in ex for ex in unheard)
    assert torch.equal(unheard[0]["pixel_values_videos"], unheard[1]["pixel_values_videos"])


def test_the_tiny_vision_tower_tells_a_red_frame_from_a_blue_one(gemma):
    """The tiny tower's features of two plain colours differ (with transformers' std-0.02 patch embedding they had
    cosine 0.9987: the demo's base stage captioned at chance, and its frozen tower let no training see colours)."""
    from vidtune.train.demo.clips import segment_frames

    features = []
    for color in ("red", "blue"):
        pixels = gemma.processor.image_processor(images=[segment_frames([color], 1, 48, 64, 0)[0]], return_tensors="pt")
        pixels.pop("num_soft_tokens_per_image", None)
        with torch.no_grad():
            out = gemma.model.model.get_image_features(**pixels, return_dict=True).pooler_output
        features.append(torch.cat(list(out)).flatten())
    assert torch.nn.functional.cosine_similarity(*features, dim=0) < 0.95


def test_losses_from_hidden_states_score_the_soft_capped_logits(gemma, clips):
    """Gemma caps its logits (cap x tanh(logits / cap)) after the head: the chunked loss, which computes logits from
    the head's input, must cap them as the model's own loss does. Logits scaled up 50x and a cap of 2 make the
    difference large (the control: the model's loss with and without it)."""
    model = copy.deepcopy(gemma.model)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    batch = Collator(gemma.processor.tokenizer.pad_token_id, family=gemma.family)(
        [heard_example(gemma, clips["red_blue"], audio_rate=None)]
    )
    batch.pop("skipped", None)
    text_config = model.config.get_text_config()
    text_config.final_logit_softcapping = None
    uncapped = model_loss(model, batch).item()
    text_config.final_logit_softcapping = 2.0
    capped = model_loss(model, batch).item()
    assert abs(capped - uncapped) > 1.0
    assert ChunkedLoss(language_head(model))(model, batch).item() == pytest.approx(capped, rel=1e-5)


def test_blank_paths_run_each_encoder_in_forward_order(gemma):
    model = copy.deepcopy(gemma.model)
    paths = gemma.family.blank_paths(model, gemma.processor, torch.device("cpu"))
    assert [p.batch_key for p in paths] == ["pixel_values", "pixel_values_videos", "input_features"]
    core = model.model
    # the image path right after the per-layer embeddings; the video path before the audio tower, or before the
    # language model when no sound runs; the audio path before the language model
    assert paths[0].module is core.language_model.embed_tokens_per_layer and not paths[0].before
    assert paths[1].module is core.audio_tower and paths[1].fallback is core.language_model
    assert paths[2].module is core.language_model and paths[2].before
    for path in paths:
        path.run().backward()
    assert core.audio_tower.output_proj.weight.grad.abs().sum() > 0
    assert core.vision_tower.patch_embedder.input_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("heard", "other_hears"), [(True, True), (False, True), (False, False)], ids=["sound", "blank sound", "no sound"]
)
def test_a_rank_short_of_video_runs_its_blank_between_the_image_and_audio_paths(gemma, heard, other_hears):
    """ZeRO-3 lockstep (train/training/distributed.py) with the other rank holding image, video (and sound): this
    rank, without video, runs the vision tower on its image, then the blank video, then the audio tower (its real
    sound, or the blank) — the other rank's order. No module runs between Gemma 4's video and audio paths, so the
    video blank sits before the audio tower, or before the language model when no sound runs at all (its fallback:
    without it, the last case never runs the video blank and ZeRO-3 would hang)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from PIL import Image

    from vidtune.train.training.distributed import VisionLockstep

    model = copy.deepcopy(gemma.model)
    accelerator = SimpleNamespace(
        num_processes=2,
        distributed_type=DistributedType.DEEPSPEED,
        device=torch.device("cpu"),
        unwrap_model=lambda m: m,
        reduce=lambda local, op: torch.tensor([1.0, 1.0, float(other_hears or heard)]),  # the paths any rank needs
    )
    lockstep = VisionLockstep(accelerator, gemma.family, gemma.processor, model)
    calls: list[str] = []
    core = model.model
    core.vision_tower.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(f"vision x{kwargs['pixel_values'].shape[0]}"), with_kwargs=True
    )
    core.audio_tower.register_forward_pre_hook(lambda *_: calls.append("audio"))
    core.language_model.register_forward_pre_hook(lambda *_: calls.append("language"))
    image = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    content = [media_part("image", image), text_part("What is it?")]
    if heard:  # its sound as an audio part, as a heard video's would be, without the video
        content.insert(1, {"type": "audio", "audio": np.zeros(16000, np.float32)})
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": [text_part("red")]}]
    encoded = gemma.family.encode(
        gemma.processor,
        messages,
        chat_template=gemma.family.chat_template,
        tokenize=True,
        return_dict=True,
        return_tensors=None,
        processor_kwargs={"sampling_rate": 16000},
    )
    ids = torch.tensor(encoded["input_ids"])
    batch = {"input_ids": ids, **gemma.family.example_visuals(encoded, gemma.processor)}
    batch["mm_token_type_ids"] = batch["mm_token_type_ids"][None]
    lockstep.prepare(batch)
    assert lockstep.pending == [False, True, other_hears and not heard]
    with torch.no_grad():
        model(**batch)
    sound = ["audio"] if other_hears or heard else []
    assert calls == ["vision x1", "vision x1", *sound, "language"]  # image, blank video, sound, then text
    assert lockstep.pending == [False, False, False] and torch.is_tensor(lockstep.take_term())


def test_finetune_audio_tower_lora_wraps_the_conformer_and_a_heard_batch_trains_it(gemma, tone_clips):
    """finetune.audio_tower=lora: LoRA on the conformer's linears (inside its clippable linears, its relative keys,
    the subsampling and output projections), the audit names the audio tower, and a heard batch reaches them."""
    from vidtune.train.training.config import FinetuneConfig
    from vidtune.train.training.model import apply_finetuning, check_audit, format_audit, trainable_audit

    cfg = FinetuneConfig(audio_tower="lora")
    model = apply_finetuning(copy.deepcopy(gemma.model), gemma.family, cfg)
    audit = trainable_audit(model, gemma.family)
    tower = audit["parts"]["audio_tower"]
    assert tower["total"] == sum(p.numel() for p in gemma.model.model.audio_tower.parameters())
    assert audit["lora"].get("audio_tower", 0) > 0 and "audio_tower" in format_audit(audit)
    check_audit(audit, cfg)
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and ".audio_tower." in n]
    assert any(n.endswith("self_attn.q_proj.linear") for n in wrapped) and any("output_proj" in n for n in wrapped)
    model.train()
    collate = Collator(gemma.processor.tokenizer.pad_token_id, family=gemma.family)
    model(**collate([heard_example(gemma, tone_clips[HIGH_HZ])]), num_items_in_batch=1).loss.backward()
    trained = [p for n, p in model.named_parameters() if ".audio_tower." in n and "lora_B" in n]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_a_run_whose_samples_were_built_in_its_own_process_still_hears_once_saved_and_loaded(
    gemma, tone_clips, tmp_path
):
    """With data.num_workers=0 the run's processor builds the samples itself, and each call leaves its tokenizer's
    backend padding on; the run saves it, and the tokenizer loads back with max_length and pad_to_multiple_of None,
    which the processor merged into the audio kwargs: scoring the run (vidtune eval, the demo) raised in the feature
    extractor's `pad` on every heard prompt. The loaded processor hears the prompt as the fresh one does."""
    import transformers

    from vidtune.data.examples import ExampleBuilder
    from vidtune.train.training.model import load_processor

    processor = load_processor(str(gemma.model_dir), gemma.family)
    heard_example(
        type(gemma)(**{**vars(gemma), "builder": ExampleBuilder(processor, gemma.family)}), tone_clips[LOW_HZ]
    )
    processor.save_pretrained(tmp_path)  # as the run's outputs save it
    loaded = transformers.AutoProcessor.from_pretrained(tmp_path)  # as load_for_inference loads it
    assert loaded.tokenizer.init_kwargs.get("pad_to_multiple_of", 0) is None  # the state that broke it
    messages = question(tone_clips[LOW_HZ])[:1]
    media, _ = load_media(messages, SamplingConfig(4), False, None, audio_rate=16000)
    prompts = [
        ExampleBuilder(p, gemma.family, chat_template=p.chat_template, audio_rate=16000).build(
            messages, media, for_generation=True
        )
        for p in (loaded, processor)
    ]
    assert torch.equal(prompts[0]["input_ids"], prompts[1]["input_ids"])
    assert torch.equal(prompts[0]["input_features"], prompts[1]["input_features"])
    assert prompts[0]["input_features"].shape[1] > 0
