"""Qwen2.5-VL, Qwen3-VL and Qwen3.5: what is particular to them, on tiny models built with their real processor
classes.

Dynamic resolution (token counts depend on the frame size), flattened patch rows with grids, multimodal RoPE
(`mm_token_type_ids`), and time from the frames' real presentation times: Qwen2.5-VL's `second_per_grid_ts`,
Qwen3-VL's `<t seconds>` text. Qwen3.5 (Qwen3-VL's processor, a hybrid text model): its think-block prompt, LoRA
placement and vision paths (the rest is Qwen3-VL's code, covered by the family-parametrised tests).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vidtune.data.collator import Collator
from vidtune.data.conversation import media_part, message, text_part
from vidtune.data.dataset import DataConfig, Measurer, load_media
from vidtune.data.examples import IGNORE_INDEX, ExampleBuilder
from vidtune.data.families import FrameLimits, family_for
from vidtune.data.video import Clip, SamplingConfig, VideoInfo

FAMILY_NAMES = ("qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="session", params=FAMILY_NAMES)
def qwen(request, family_kits) -> dict[str, Any]:
    """The family's tiny model (shared by the session's tests, conftest's family_kits), as this file uses it."""
    kit = family_kits(request.param)
    return {
        "name": kit.name,
        "folder": kit.model_dir,
        "family": kit.family,
        "processor": kit.processor,
        "builder": kit.builder,
        "model": kit.model,
    }


@pytest.fixture(scope="session")
def qwen_media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Clips of different frame sizes and lengths, and an image."""
    from PIL import Image

    from vidtune.train.demo.clips import write_color_clip

    root = tmp_path_factory.mktemp("qwen-media")
    image = root / "square.png"
    Image.fromarray(np.full((40, 56, 3), 120, dtype=np.uint8)).save(image)
    return {
        "small": write_color_clip(root / "small.mp4", ["red", "blue"]),  # 64x48, 16 frames
        "wide": write_color_clip(root / "wide.mp4", ["green", "yellow", "red"], height=56, width=112, seed=1),
        "image": image,
    }


def video_chat(path: Path, question: str, answer: str) -> list:
    return [
        message("user", [media_part("video", str(path)), text_part(question)]),
        message("assistant", [text_part(answer)]),
    ]


def image_chat(path: Path) -> list:
    return [
        message("user", [media_part("image", str(path)), text_part("What color is it?")]),
        message("assistant", [text_part("grey")]),
    ]


def text_chat() -> list:
    return [message("user", [text_part("Say red.")]), message("assistant", [text_part("red")])]


def built(qwen: dict[str, Any], messages: list, num_frames: int = 4) -> dict[str, torch.Tensor]:
    media, _ = load_media(messages, SamplingConfig(num_frames), False, None)
    return qwen["builder"].build(messages, media)


@pytest.mark.parametrize(("clip", "num_frames"), [("small", 4), ("wide", 3), ("wide", 6)])
def test_measured_length_and_video_tokens_equal_what_the_processor_builds(qwen, qwen_media, clip, num_frames):
    """Counted from the header alone (size, frame count, timestamps: no pixels) = built by the processor, for odd
    frame counts (the last temporal patch is padded) and frame sizes that are no multiple of the patch."""
    messages = video_chat(qwen_media[clip], "What color comes first?", "red")
    measured = Measurer(qwen["builder"], DataConfig(sampling=SamplingConfig(num_frames), max_length=4096))(
        {"messages": messages, "problem": ""}
    )
    example = built(qwen, messages, num_frames)
    assert measured["drop_reason"] == "" and measured["num_tokens"] == len(example["input_ids"])
    processor = qwen["processor"]
    merge = processor.video_processor.merge_size**2
    (grid,) = example["video_grid_thw"].tolist()
    assert grid[0] == -(-num_frames // 2)  # 2 frames per temporal patch
    assert int((example["input_ids"] == processor.video_token_id).sum()) == grid[0] * grid[1] * grid[2] // merge
    assert len(example["pixel_values_videos"]) == grid[0] * grid[1] * grid[2]
    assert example["mm_token_type_ids"].shape == example["input_ids"].shape
    assert int((example["mm_token_type_ids"] == 2).sum()) == grid[0] * grid[1] * grid[2] // merge


def vfr_clip(qwen_media: dict[str, Path]) -> Clip:
    """Four decoded frames presented at irregular times (as on a phone's variable-frame-rate clip)."""
    media, _ = load_media(video_chat(qwen_media["small"], "Q", "A"), SamplingConfig(4), False, None)
    return Clip(media[0].frames, [0, 1, 2, 3], [0.0, 0.2, 1.0, 2.0], VideoInfo(4, 8.0, 48, 64))


def test_time_information_comes_from_the_frames_real_timestamps(qwen, qwen_media):
    messages = video_chat(qwen_media["small"], "When does it turn blue?", "at one second")
    example = qwen["builder"].build(messages, {0: vfr_clip(qwen_media)})
    text = qwen["processor"].tokenizer.decode(example["input_ids"])
    if qwen["name"] == "qwen2_5_vl":
        # 2 frames per temporal patch x the frames' mean spacing (2.0 s over 3 gaps), not 2 / an assumed fps
        assert example["second_per_grid_ts"].tolist() == pytest.approx([2 * 2.0 / 3], rel=1e-3)
        assert "seconds>" not in text
    else:
        # each temporal patch is stamped with the mean time of its two frames, in the reference form (no nested
        # vision-start tokens around the frames)
        assert "<0.1 seconds><|vision_start|><|video_pad|>" in text and "<1.5 seconds><|vision_start|>" in text
        assert "<|vision_start|><0.1 seconds>" not in text
    # counted from the same times, the text included: the measured length is the built one
    tokens = qwen["builder"].tokens.video_tokens(4, 48, 64, [0.0, 0.2, 1.0, 2.0])
    assert qwen["builder"].count(messages, [tokens]).total == len(example["input_ids"])


def test_a_video_without_timestamps_is_refused_with_a_clear_error(qwen, qwen_media):
    frames = vfr_clip(qwen_media).frames
    with pytest.raises(ValueError, match="timestamps"):
        qwen["builder"].build(video_chat(qwen_media["small"], "Q", "A"), {0: frames})


def test_a_one_frame_clip_is_a_bad_sample_for_qwen3_vl_with_its_reason(qwen, qwen_media):
    messages = video_chat(qwen_media["small"], "What color?", "red")
    measured = Measurer(qwen["builder"], DataConfig(sampling=SamplingConfig(1)))({"messages": messages, "problem": ""})
    if qwen["name"] == "qwen3_vl":  # its processor refuses 1 frame: measured as a bad sample, before any decoding
        assert "Qwen3-VL needs >= 2 frames per video" in measured["problem"]
    else:  # Qwen2.5-VL pads the temporal patch with a copy of the frame
        assert measured["problem"] == "" and measured["num_tokens"] == len(built(qwen, messages, 1)["input_ids"])


def test_labels_cover_exactly_the_assistant_turns_and_their_im_end(qwen, qwen_media):
    tokenizer = qwen["processor"].tokenizer
    messages = [
        message("user", [media_part("video", str(qwen_media["small"])), text_part("What color comes first?")]),
        message("assistant", [text_part("red")]),
        message("user", [text_part("And last?")]),
        message("assistant", [text_part("blue then nothing")]),
    ]
    example = built(qwen, messages)
    labelled = example["labels"] != IGNORE_INDEX
    expected = tokenizer("red<|im_end|>")["input_ids"] + tokenizer("blue then nothing<|im_end|>")["input_ids"]
    assert example["labels"][labelled].tolist() == expected
    # two spans, each right after "<|im_start|>assistant\n"
    positions = labelled.nonzero().flatten().tolist()
    starts = [p for p in positions if not labelled[p - 1]]
    header = tokenizer("<|im_start|>assistant\n")["input_ids"]
    assert len(starts) == 2
    for start in starts:
        assert example["input_ids"][start - len(header) : start].tolist() == header
    assert qwen["family"].stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_an_over_long_sample_is_dropped_with_its_reason(qwen, qwen_media):
    messages = video_chat(qwen_media["wide"], "What color comes first?", "green")
    measured = Measurer(qwen["builder"], DataConfig(sampling=SamplingConfig(6), max_length=40))(
        {"messages": messages, "problem": ""}
    )
    assert "exceed max_length 40" in measured["drop_reason"] and measured["num_media_tokens"] > 0


def summed_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    return model(**batch, num_items_in_batch=1).loss


def test_a_batch_mixing_frame_counts_sizes_an_image_and_text_equals_its_samples(qwen, qwen_media):
    """Patch rows of clips with different frame counts and frame sizes, an image's rows and a text-only sample
    share one batch: its summed token loss is the sum of the samples' own, and backward reaches the vision tower."""
    examples = [
        built(qwen, video_chat(qwen_media["small"], "What color comes first?", "red"), 4),
        built(qwen, video_chat(qwen_media["wide"], "What color comes last?", "red"), 3),
        built(qwen, image_chat(qwen_media["image"])),
        built(qwen, text_chat()),
    ]
    model, family = qwen["model"], qwen["family"]
    collate = Collator(qwen["processor"].tokenizer.pad_token_id, family=family)
    with torch.no_grad():
        singles = [float(summed_loss(model, collate([ex]))) for ex in examples]
    batch = collate(examples)
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    assert len(batch["video_grid_thw"]) == 2 and len(batch["image_grid_thw"]) == 1
    model.zero_grad()
    loss = summed_loss(model, batch)
    assert float(loss) == pytest.approx(sum(singles), rel=1e-5)
    loss.backward()
    grads = [p.grad for p in model.model.visual.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()


def test_the_blank_vision_paths_run_the_vision_tower(qwen):
    """ZeRO-3 lockstep: a rank without images (videos) runs the tower on a blank input; its output reaches the
    tower's weights."""
    model = qwen["model"]
    paths = qwen["family"].blank_paths(model, qwen["processor"], torch.device("cpu"))
    assert [p.batch_key for p in paths] == ["pixel_values", "pixel_values_videos"]
    for path in paths:
        model.zero_grad()
        output = path.run()
        assert output.dim() == 0 and torch.isfinite(output)
        output.backward()
        assert any(p.grad is not None for p in model.model.visual.parameters())
    model.zero_grad()


@pytest.mark.parametrize(
    ("limits", "max_tokens_per_patch", "max_tokens"),
    [({"min_pixels_per_frame": 1, "max_pixels_per_frame": 2}, 2, None), ({"min_pixels_per_frame": 1}, None, 8)],
    ids=["pixels-per-frame", "tokens-per-video"],
)
def test_frame_limits_bound_a_clips_tokens_and_travel_with_the_saved_processor(
    qwen, qwen_media, tmp_path, limits, max_tokens_per_patch, max_tokens
):
    """Limits in units of one token's pixels (28x28 for Qwen2.5-VL, 32x32 for Qwen3-VL): counted = built, within
    the bound, and the processor saved with a run's outputs resizes the same way when loaded back."""
    from vidtune.train.training.model import load_processor

    video = qwen["processor"].video_processor
    token_pixels = (video.patch_size * video.merge_size) ** 2
    frame_limits = FrameLimits(**{k: v * token_pixels for k, v in limits.items()}, max_tokens_per_video=max_tokens)
    processor = load_processor(str(qwen["folder"]), qwen["family"], frame_limits=frame_limits)
    builder = ExampleBuilder(processor, qwen["family"])
    messages = video_chat(qwen_media["wide"], "What color comes first?", "green")
    media, _ = load_media(messages, SamplingConfig(6), False, None)
    example = builder.build(messages, media)
    measured = Measurer(builder, DataConfig(sampling=SamplingConfig(6)))({"messages": messages, "problem": ""})
    assert measured["num_tokens"] == len(example["input_ids"])
    unlimited = built(qwen, messages, 6)
    num_tokens = int((example["input_ids"] == processor.video_token_id).sum())
    assert num_tokens < int((unlimited["input_ids"] == processor.video_token_id).sum())
    if max_tokens_per_patch:
        assert num_tokens <= max_tokens_per_patch * len(example["video_grid_thw"]) * 3
    if max_tokens:
        assert num_tokens <= max_tokens
    processor.save_pretrained(tmp_path)
    reloaded = ExampleBuilder(load_processor(str(tmp_path), qwen["family"]), qwen["family"]).build(messages, media)
    assert torch.equal(reloaded["input_ids"], example["input_ids"])
    assert torch.equal(reloaded["video_grid_thw"], example["video_grid_thw"])


def test_a_fixed_size_family_refuses_frame_limits():
    with pytest.raises(ValueError, match="fixed size"):
        family_for("llava_next_video").apply_frame_limits(None, FrameLimits(max_pixels_per_frame=1000))


REPO = Path(__file__).resolve().parents[1]
REAL_SIZES = {  # checkpoint config (tests/assets) and its hub video processor's settings
    "qwen2_5_vl_7b": ("Qwen2VLVideoProcessor", {"shortest_edge": 3136, "longest_edge": 12845056}, 14),
    "qwen3_vl_8b": ("Qwen3VLVideoProcessor", {"shortest_edge": 4096, "longest_edge": 25165824}, 16),
}
QWEN_RECIPES = sorted(p for name in REAL_SIZES for p in (REPO / "recipes" / name).glob("*.yaml"))


def checkpoint_folder(name: str, folder: Path) -> Path:
    """A folder holding only the checkpoint's config.json: enough to build the architecture on the meta device."""
    config = json.loads((REPO / "tests" / "assets" / f"{name}_config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "_comment"}))
    return folder


@pytest.mark.parametrize("path", QWEN_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_qwen_recipes_token_budget_fits_max_length(path, tmp_path):
    """The most video tokens any common frame size costs under the recipe's frame limits (the hub processor's
    settings, the family's own arithmetic), plus time text and prompt, fit max_length and the model's positions."""
    import types

    import transformers

    from vidtune.train.training.config import load_recipe

    processor_class, size, patch_px = REAL_SIZES[path.parent.name]
    folder = checkpoint_folder(path.parent.name, tmp_path)
    recipe = load_recipe(path, [f"model.name_or_path={folder}"])
    config = transformers.AutoConfig.from_pretrained(folder)
    family = family_for(config.model_type)
    video = getattr(transformers, processor_class)(size=size, patch_size=patch_px, temporal_patch_size=2)
    processor = types.SimpleNamespace(video_processor=video, image_processor=video)
    family.apply_frame_limits(processor, recipe.model.frame_limits)
    counter = family.token_counter(processor)
    num_frames, num_patches = recipe.data.sampling.num_frames, -(-recipe.data.sampling.num_frames // 2)
    sizes = [(1080, 1920), (1920, 1080), (2160, 3840), (480, 640), (240, 320), (480, 854)]
    most = max(counter.video_patches(num_frames, h, w) // 4 for h, w in sizes)
    assert most <= num_patches * recipe.model.frame_limits.max_pixels_per_frame // (patch_px * 2) ** 2
    time_text = num_patches * 8 if family.name == "qwen3_vl" else 0  # "<12.3 seconds>" per temporal patch
    positions = config.get_text_config().max_position_embeddings
    completion = recipe.train.grpo.max_new_tokens if recipe.train.objective == "grpo" else 0  # sampled after the prompt
    assert most + time_text + 256 + completion <= recipe.data.max_length <= positions, (most, recipe.data.max_length)


@pytest.mark.parametrize("name", list(REAL_SIZES))
def test_qwen_recipes_put_lora_in_the_real_language_model(name, tmp_path):
    """On the meta device (no weights): LoRA in every decoder layer of the language model only, the projector
    trained as the base recipe says, the vision tower frozen, the frozen size of the real checkpoint."""
    from vidtune.train.training.config import load_recipe
    from vidtune.train.training.model import apply_finetuning, build_on_meta, check_audit, trainable_audit

    folder = checkpoint_folder(name, tmp_path)
    recipe = load_recipe(REPO / "recipes" / name / "base.yaml", [f"model.name_or_path={folder}"])
    assert recipe.finetune.train_projector
    model, family = build_on_meta(recipe.model)
    model = apply_finetuning(model, family, recipe.finetune)
    wrapped = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    assert len(wrapped) == model.config.get_text_config().num_hidden_layers * 7
    assert all(name.startswith(f"base_model.model.{family.language_model_prefix}") for name in wrapped)
    audit = trainable_audit(model, family)
    check_audit(audit, recipe.finetune)
    assert audit["parts"]["vision_tower"]["trainable"] == 0
    assert audit["parts"]["projector"]["trainable"] == audit["parts"]["projector"]["total"] > 0
    assert 8.2e9 < audit["total"] - audit["trainable"] < 8.8e9  # the frozen 8.3B (Qwen2.5-VL) / 8.8B (Qwen3-VL)


# ---------------------------------------------------------------------------------------------------------- Qwen3.5


def test_qwen3_5_trains_on_the_hub_non_thinking_prompt(family_kits):
    """Whole conversations render as the hub template renders them (an empty think block opens the assistant turn
    after the last user turn, none before), and the generation prompt is the hub's with enable_thinking=False."""
    from transformers import AutoProcessor

    from vidtune.data.conversation import to_template_messages

    kit = family_kits("qwen3_5")
    hub_template = AutoProcessor.from_pretrained(kit.model_dir).chat_template
    chat = to_template_messages(
        [
            message("system", [text_part("Be brief.")]),
            message("user", [media_part("video", "v.mp4"), text_part("Which color comes first? ")]),
            message("assistant", [text_part("red")]),
            message("user", [text_part("And last?")]),
            message("assistant", [text_part(" blue\n")]),
        ]
    )
    render = kit.processor.apply_chat_template

    def hub(messages: list, **kwargs: Any) -> str:  # the bare video pad: see data/families/qwen3_vl.py
        text = render(messages, chat_template=hub_template, **kwargs)
        return text.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")

    ours = render(chat, chat_template=kit.family.chat_template)
    assert ours == hub(chat)
    assert "assistant\nred<|im_end|>" in ours and "assistant\n<think>\n\n</think>\n\nblue<|im_end|>" in ours
    prompt = render(chat[:4], chat_template=kit.family.chat_template, add_generation_prompt=True)
    assert prompt == hub(chat[:4], add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert hub(chat[:4], add_generation_prompt=True).endswith("<|im_start|>assistant\n<think>\n")  # hub default


def test_qwen3_5_lora_covers_attention_mlp_and_gated_deltanet_of_the_text_model_only(family_kits):
    """Default LoRA targets: every linear layer of the hybrid text model (its linear-attention layers' projections
    included), none of the vision tower's."""
    import re

    from vidtune.train.training.config import FinetuneConfig
    from vidtune.train.training.model import lora_target_pattern

    kit = family_kits("qwen3_5")
    pattern = re.compile(lora_target_pattern(kit.model, kit.family, FinetuneConfig()))
    linear = [n for n, m in kit.model.named_modules() if isinstance(m, torch.nn.Linear)]
    wrapped = [n for n in linear if pattern.fullmatch(n)]
    text = kit.model.config.text_config
    assert set(text.layer_types) == {"linear_attention", "full_attention"}
    assert all(n.startswith(kit.family.language_model_prefix) for n in wrapped)
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == set(kit.family.language_model_lora_targets)
    per_kind = {"linear_attention": 5 + 3, "full_attention": 4 + 3}  # its projections + the MLP's three
    assert len(wrapped) == sum(per_kind[kind] for kind in text.layer_types)


def test_qwen3_5_blank_vision_paths_run_its_vision_tower(family_kits):
    """ZeRO-3 lockstep on Qwen3.5's tower (no DeepStack outputs): each blank path reaches the tower's weights."""
    kit = family_kits("qwen3_5")
    model = kit.model
    paths = kit.family.blank_paths(model, kit.processor, torch.device("cpu"))
    assert [p.batch_key for p in paths] == ["pixel_values", "pixel_values_videos"]
    for path in paths:
        model.zero_grad()
        output = path.run()
        assert output.dim() == 0 and torch.isfinite(output)
        output.backward()
        assert any(p.grad is not None for p in model.model.visual.parameters())
    model.zero_grad()
