"""Qwen2.5-Omni (thinker): videos heard with their sound, mixed with silent clips, images and text in one batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.hearing import HIGH_HZ, LOW_HZ, heard_example, question, write_tone_twins, write_undecodable_sound
from vidtune.data.collator import Collator
from vidtune.data.conversation import DataError, media_part, message, text_part
from vidtune.data.dataset import DataConfig, Measurer, audio_rate_for, heard_sources, load_media
from vidtune.data.families.qwen2_5_omni import ROPE_KEY
from vidtune.data.sources import SourceConfig
from vidtune.data.video import SamplingConfig
from vidtune.train.training.config import FinetuneConfig, RecipeError, load_recipe
from vidtune.train.training.model import (
    apply_finetuning,
    check_audio_tower,
    check_audit,
    format_audit,
    load_model_config,
    trainable_audit,
)


@pytest.fixture(scope="module")
def omni(family_kits):
    return family_kits("qwen2_5_omni")


@pytest.fixture(scope="module")
def tone_clips(tmp_path_factory):
    return write_tone_twins(tmp_path_factory.mktemp("omni-tones"))


def test_a_heard_clip_interleaves_its_sound_and_counts_as_measured(omni, tone_clips):
    processor, tokenizer = omni.processor, omni.processor.tokenizer
    example = heard_example(omni, tone_clips[LOW_HZ])
    ids = example["input_ids"]
    text = tokenizer.decode(ids)
    assert "<|vision_bos|><|audio_bos|><|VIDEO|>" in text and "<|AUDIO|><|audio_eos|><|vision_eos|>" in text
    assert tokenizer.decode(ids[example["labels"] != -100]) == "red<|im_end|>"
    # the measurer's count (no pixels, no sound decoded) is the built length, sound included
    cfg = DataConfig(sources=[SourceConfig(path="a.jsonl")], sampling=SamplingConfig(4))
    builder = copy.copy(omni.builder)
    builder.audio_rate = 16000
    row = {"messages": question(tone_clips[LOW_HZ]), "source": "a.jsonl", "at": "a.jsonl line 1"}
    assert Measurer(builder, cfg).measure(row)["num_tokens"] == len(ids)
    num_audio = int((ids == processor.audio_token_id).sum())
    assert num_audio == example["feature_attention_mask"].sum().item() // 4 + 1 > 40  # 25 per second of span


def test_each_examples_positions_are_the_thinkers_own(omni, tone_clips):
    example = heard_example(omni, tone_clips[HIGH_HZ])
    ids = example["input_ids"][None]
    expected, _ = omni.model.model.get_rope_index(
        ids,
        video_grid_thw=example["video_grid_thw"],
        attention_mask=torch.ones_like(ids),
        use_audio_in_video=True,
        audio_seqlens=example["feature_attention_mask"].sum(-1),
        second_per_grids=example["video_second_per_grid"],
    )
    assert torch.equal(example[ROPE_KEY], expected[:, 0])
    # audio and video share one clock: the second half of the clip's tokens start 25 positions (1 s) later
    video = example[ROPE_KEY][0][example["input_ids"] == omni.processor.video_token_id]
    assert sorted(set(video.tolist()))[1] - video.min() == 25


def test_heard_silent_image_and_text_samples_batch_like_single_samples(omni, tone_clips, clips, tmp_path):
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(image)
    silent = question(clips["red_blue"], "red")  # no audio stream: no audio part
    pictured = [message("user", [media_part("image", str(image)), text_part("What is it?")])]
    pictured.append(message("assistant", [text_part("a picture")]))
    texted = [message("user", [text_part("Say yes.")]), message("assistant", [text_part("Yes")])]
    examples = [heard_example(omni, tone_clips[LOW_HZ], "blue"), heard_example(omni, clips["red_blue"])]
    examples += [omni.builder.build(m, load_media(m, SamplingConfig(4), False, None)[0]) for m in (pictured, texted)]
    assert "input_features" in examples[0] and "input_features" not in examples[1]
    assert len(examples[1]["input_ids"]) == len(
        omni.builder.build(silent, load_media(silent, SamplingConfig(4), False, None)[0])["input_ids"]
    )
    model = copy.deepcopy(omni.model).train()
    collate = Collator(omni.processor.tokenizer.pad_token_id, family=omni.family)
    batch = collate(examples)
    assert batch["position_ids"].shape == (3, 4, batch["input_ids"].shape[1])
    loss = model(**batch, num_items_in_batch=1).loss
    loss.backward()
    assert model.model.audio_tower.conv1.weight.grad.abs().sum() > 0
    alone = sum(model(**collate([ex]), num_items_in_batch=1).loss.item() for ex in examples)
    assert loss.item() == pytest.approx(alone, rel=1e-4)


def test_the_sound_reaches_the_model_and_audio_off_leaves_it_out(omni, tone_clips):
    low, high = (heard_example(omni, tone_clips[hz]) for hz in (LOW_HZ, HIGH_HZ))
    collate = Collator(omni.processor.tokenizer.pad_token_id, family=omni.family)
    with torch.no_grad():
        logits = [omni.model(**collate([ex])).logits for ex in (low, high)]
    assert not torch.allclose(logits[0], logits[1])  # same pictures, different tone
    unheard = [heard_example(omni, tone_clips[hz], audio_rate=None) for hz in (LOW_HZ, HIGH_HZ)]
    assert all("input_features" not in ex for ex in unheard)
    assert torch.equal(unheard[0]["pixel_values_videos"], unheard[1]["pixel_values_videos"])
    with torch.no_grad():  # data.audio=off: the same pictures give the same logits, whatever the tone
        unheard_logits = [omni.model(**collate([ex])).logits for ex in unheard]
    assert torch.equal(unheard_logits[0], unheard_logits[1])


def test_audio_modes_are_checked_per_source(omni, family_kits):
    sources = [SourceConfig(path="a.jsonl"), SourceConfig(path="b.jsonl", audio="off")]
    assert heard_sources(DataConfig(sources=sources), omni.family) == {"a.jsonl"}
    assert audio_rate_for(DataConfig(sources=sources, audio="off"), omni.family, omni.processor) is None
    assert audio_rate_for(DataConfig(sources=sources), omni.family, omni.processor) == 16000
    vl = family_kits("qwen2_5_vl").family
    assert heard_sources(DataConfig(sources=sources), vl) == set()  # auto: a family that cannot hear sees only
    with pytest.raises(DataError, match=r"a\.jsonl: audio=on, but qwen2_5_vl does not hear sound"):
        heard_sources(DataConfig(sources=sources, audio="on"), vl)
    with pytest.raises(DataError, match="must be one of auto, on, off, got 'loud'"):
        audio_rate_for(DataConfig(sources=sources, audio="loud"), omni.family, omni.processor)


def test_the_blank_audio_path_runs_the_audio_tower(omni):
    model = copy.deepcopy(omni.model)
    paths = omni.family.blank_paths(model, omni.processor, torch.device("cpu"))
    assert [p.batch_key for p in paths] == ["input_features", "pixel_values", "pixel_values_videos"]
    paths[0].run().backward()
    assert model.model.audio_tower.conv1.weight.grad.abs().sum() > 0


def test_the_tiny_audio_tower_tells_a_low_tone_from_a_high_one(omni):
    """The tiny tower's features of two tones differ (with transformers' std-0.02 convolutions they had cosine
    0.9999: the sound drowned under the position embeddings, and no training could hear it)."""
    from vidtune.train.demo.clips import tone_samples

    extractor, core = omni.processor.feature_extractor, omni.model.model
    features = []
    for hz in (LOW_HZ, HIGH_HZ):
        mel = extractor(tone_samples([hz, hz], 1.0, 16000), sampling_rate=16000, return_attention_mask=True)
        frames = int(np.asarray(mel["attention_mask"]).sum())
        mels = torch.as_tensor(np.asarray(mel["input_features"]))[..., :frames]
        with torch.no_grad():
            out = core.get_audio_features(mels, torch.ones(1, frames, dtype=torch.long), return_dict=True)
        features.append(out.last_hidden_state.flatten())
    assert torch.nn.functional.cosine_similarity(*features, dim=0) < 0.95


AUDIO_TOWER_MODES = {
    "frozen": (FinetuneConfig(mode="full"), "none"),
    "full": (FinetuneConfig(mode="full", audio_tower="full"), "all"),
    "lora": (FinetuneConfig(audio_tower="lora"), "lora"),
    "lora+full": (FinetuneConfig(audio_tower="full"), "all"),
}


@pytest.mark.parametrize("mode", list(AUDIO_TOWER_MODES))
def test_finetune_audio_tower_trains_it_and_the_audit_names_it(omni, tone_clips, mode):
    cfg, expect = AUDIO_TOWER_MODES[mode]
    model = apply_finetuning(copy.deepcopy(omni.model), omni.family, cfg)
    audit = trainable_audit(model, omni.family)
    tower, lora = audit["parts"]["audio_tower"], audit["lora"].get("audio_tower", 0)
    assert tower["total"] == sum(p.numel() for p in omni.model.model.audio_tower.parameters())
    assert audit["parts"]["other"]["total"] == 0  # the audio tower is no longer counted as "other"
    assert f"{'audio_tower':<16}{tower['trainable']:>14,}{tower['total']:>14,}" in format_audit(audit)
    assert (tower["trainable"], lora > 0) == {"none": (0, False), "all": (tower["total"], False), "lora": (0, True)}[
        expect
    ]
    check_audit(audit, cfg)
    if expect != "none":  # a heard batch reaches what trains there
        collate = Collator(omni.processor.tokenizer.pad_token_id, family=omni.family)
        model.train()
        model(**collate([heard_example(omni, tone_clips[HIGH_HZ])]), num_items_in_batch=1).loss.backward()
        # (LoRA's A gets none on its first step: B starts at zero)
        trained = [
            p
            for n, p in model.named_parameters()
            if "audio_tower." in n and ".layers." in n and p.requires_grad and "lora_A" not in n
        ]
        assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_audio_tower_on_a_family_that_does_not_hear_is_refused_before_loading(tiny_model_dir):
    config = load_model_config(str(tiny_model_dir))
    with pytest.raises(RecipeError, match=r"finetune\.audio_tower=full: llava_next_video has no audio tower"):
        check_audio_tower(FinetuneConfig(audio_tower="full"), config)
    check_audio_tower(FinetuneConfig(), config)  # frozen: nothing to check
    with pytest.raises(RecipeError, match=r"audio_tower=lora needs finetune\.mode=lora"):
        load_recipe(
            None, ["model.name_or_path=m", "train.output_dir=o", "finetune.mode=full", "finetune.audio_tower=lora"]
        )


def test_check_decode_names_a_file_whose_sound_cannot_be_decoded(omni, tone_clips, tmp_path, capsys):
    import json
    import shutil

    from vidtune.train.cli import main

    bad, good = write_undecodable_sound(tmp_path / "bad_sound.mov"), tmp_path / "tone.mp4"
    shutil.copy(tone_clips[LOW_HZ], good)
    rows = [{"video": p.name, "question": "Is the tone high or low?", "answer": "low"} for p in (good, bad)]
    (tmp_path / "heard.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "seen.jsonl").write_text(json.dumps(rows[1]) + "\n")  # the same file, not heard: its pictures are fine
    recipe = tmp_path / "recipe.yaml"
    sources = [{"path": str(tmp_path / "heard.jsonl")}, {"path": str(tmp_path / "seen.jsonl"), "audio": "off"}]
    data = {"sources": sources, "sampling": {"num_frames": 2}, "max_length": 400}
    recipe.write_text(json.dumps({"model": {"name_or_path": str(omni.model_dir)}, "data": data}))
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit):  # 1 bad of 3: over the default budget
        main(["check", str(recipe), "train.output_dir=o", "--out", str(out), "--decode"])
    report = json.loads(out.read_text())
    assert [(item["where"], item["reason"].split(":", 1)[0]) for item in report["bad"]] == [
        ("heard.jsonl line 2", str(bad))
    ]
    assert "cannot decode its audio" in report["bad"][0]["reason"]
    printed = [line for line in capsys.readouterr().out.splitlines() if str(bad) in line]
    assert len(printed) == 1 and "cannot decode its audio" in printed[0]
    # the heard clip's tokens count its sound (25 per second of span), as training counts them
    assert report["tokens"]["max"] >= 25 + report["tokens"]["min"]


def test_show_plays_a_heard_videos_sound_beside_its_contact_sheet(omni, tone_clips, tmp_path):
    import json
    import shutil
    import wave

    from vidtune.train.datatools.show import run_show
    from vidtune.train.training.config import load_recipe

    shutil.copy(tone_clips[HIGH_HZ], tmp_path / "tone.mp4")
    row = {"video": "tone.mp4", "question": "Is the tone high or low?", "answer": "high"}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    overrides = [f"model.name_or_path={omni.model_dir}", "train.output_dir=o", "data.sampling.num_frames=2"]
    heard = load_recipe(None, [*overrides, f"data.sources=[{{path: {tmp_path / 'rows.jsonl'}}}]"])
    page = run_show(heard, "recipe", 1, tmp_path / "show").read_text()
    assert "<audio controls src='row0_video0.wav'>" in page and "&lt;audio x" in page
    with wave.open(str(tmp_path / "show" / "row0_video0.wav")) as wav:
        samples = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32)
        pitch_hz = np.argmax(np.abs(np.fft.rfft(samples))) * wav.getframerate() / len(samples)
    assert abs(pitch_hz - HIGH_HZ) < 20
    unheard = load_recipe(None, [*overrides, f"data.sources=[{{path: {tmp_path / 'rows.jsonl'}, audio: 'off'}}]"])
    page = run_show(unheard, "recipe", 1, tmp_path / "show-seen").read_text()
    assert "<audio" not in page and not list((tmp_path / "show-seen").glob("*.wav"))
