"""Conversations -> input_ids / labels through the model's processor: text survives, labels cover exactly the
assistant turns and their end-of-turn token, video tokens are all there, counts match the built examples."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tests.conftest import shared_path
from vidtune.data.conversation import (
    assistant_texts,
    media_part,
    media_parts,
    message,
    text_part,
    to_template_messages,
)
from vidtune.data.dataset import load_media
from vidtune.data.examples import IGNORE_INDEX, ExampleBuilder, TokenCount
from vidtune.data.families.llava_next_video import LLAVA_NEXT_VIDEO
from vidtune.data.sources import SourceConfig, iter_conversations, load_conversations
from vidtune.data.video import Clip, SamplingConfig, VideoError, VideoInfo

QWEN3_VL_PROCESSOR = ("qwen3_vl", "qwen3_5")  # families on Qwen3-VL's processor


def tokens_per_frame_from_config(config) -> int:
    patches = config.vision_config.image_size // config.vision_config.patch_size
    return (patches // config.spatial_pool_stride) ** 2


def label_spans(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of labelled positions."""
    spans: list[list[int]] = []
    for position in (labels != IGNORE_INDEX).nonzero().flatten().tolist():
        if spans and spans[-1][-1] == position - 1:
            spans[-1].append(position)
        else:
            spans.append([position])
    return spans


def collapse_media_tokens(text: str) -> str:
    return re.sub(r"(<video>)+", "<video>", re.sub(r"(<image>)+", "<image>", text))


def multi_turn(video_path: str) -> list:
    return [
        message("system", [text_part("You answer briefly.")]),
        message("user", [media_part("video", video_path), text_part("Which color comes first?")]),
        message("assistant", [text_part("red")]),
        message("user", [text_part("And which color comes last?")]),
        message("assistant", [text_part("blue, then nothing")]),
    ]


def end_of_turn(kit) -> str:
    """The text of the family's end-of-turn token (what labels must end each assistant turn with)."""
    tokenizer = kit.processor.tokenizer
    return tokenizer.decode([kit.family.stop_token_ids(tokenizer)[0]])


def test_training_template_renders_the_hub_prompt_and_ends_turns_with_end_of_turn(family_kit):
    """Prompts (what inference feeds the model) are identical under the hub template (saved in the tiny model
    folder, as in the hub's) and ours; assistant turns end with the family's end-of-turn token, which generation
    stops on."""
    from transformers import AutoProcessor

    hub_template = AutoProcessor.from_pretrained(family_kit.model_dir).chat_template
    prompt = [
        message("system", [text_part("Be brief.")]),
        message("user", [media_part("video", "v.mp4"), text_part("What happens?")]),
    ]
    render = family_kit.processor.apply_chat_template
    ours = render(
        to_template_messages(prompt), chat_template=family_kit.family.chat_template, add_generation_prompt=True
    )
    # Qwen3.5 trains without reasoning: its prompt is the hub's non-thinking one (data/families/qwen3_5.py)
    thinking = {"enable_thinking": False} if family_kit.name == "qwen3_5" else {}
    hub = render(to_template_messages(prompt), chat_template=hub_template, add_generation_prompt=True, **thinking)
    if (
        family_kit.name in QWEN3_VL_PROCESSOR
    ):  # a bare pad, on purpose: see data/families/qwen3_vl.py (the expanded prompt
        # is the reference one, where the hub template + transformers 5.2x's processor nest the vision tokens)
        hub = hub.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")
    assert ours == hub
    assert "Be brief." in ours and "What happens?" in ours
    if family_kit.name == "llava_next_video":
        assert ours == "Be brief. USER: <video>\nWhat happens? ASSISTANT:"
    full = [*prompt, message("assistant", [text_part("A dog runs.")])]
    rendered = render(to_template_messages(full), chat_template=family_kit.family.chat_template)
    assert rendered.startswith(ours.rstrip()) and rendered.rstrip().endswith(f"A dog runs.{end_of_turn(family_kit)}")


def test_labels_are_exactly_the_assistant_turns_and_their_end_of_turn(family_kit, clips):
    builder, tokenizer, eot = family_kit.builder, family_kit.processor.tokenizer, end_of_turn(family_kit)
    messages = multi_turn(str(clips["red_blue"]))
    media, _ = load_media(messages, SamplingConfig(4), False, None)
    example = builder.build(messages, media)
    spans = label_spans(example["labels"])
    decoded = [tokenizer.decode(example["input_ids"][s]).strip() for s in spans]
    assert decoded == [f"red{eot}", f"blue, then nothing{eot}"]
    # Every labelled token is the input token itself (no shift here: the model shifts inside its loss).
    labelled = example["labels"] != IGNORE_INDEX
    assert torch.equal(example["labels"][labelled], example["input_ids"][labelled])
    last_only = ExampleBuilder(family_kit.processor, family_kit.family, label_turns="last").build(messages, media)
    spans = label_spans(last_only["labels"])
    assert [tokenizer.decode(last_only["input_ids"][s]).strip() for s in spans] == [f"blue, then nothing{eot}"]


def processor_video_tokens(processor, frames: np.ndarray, video_token_id: int) -> int:
    """What the processor itself expands one `<video>` to for these frames, asked directly (no template, no
    vidtune code in between): the tokens the model fills with video features (InternVL: its image tokens)."""
    out = processor(text=processor.video_token, videos=[frames], return_tensors="pt", do_sample_frames=False)
    return int((out["input_ids"] == video_token_id).sum())


def test_video_tokens_equal_what_the_processor_computes_for_the_sampled_frames(family_kit, clips):
    builder, processor = family_kit.builder, family_kit.processor
    fewest = 2 if family_kit.name in QWEN3_VL_PROCESSOR else 1  # its processor refuses 1 frame (test_qwen_families.py)
    for num_frames in (fewest, 4, 7, 16):
        messages = multi_turn(str(clips["three"]))
        media, _ = load_media(messages, SamplingConfig(num_frames), False, None)
        example = builder.build(messages, media)
        clip = media[0]  # a decoded Clip: frames and their timestamps
        in_ids = int((example["input_ids"] == builder.video_token_id).sum())
        assert in_ids == processor_video_tokens(processor, clip.frames, builder.video_token_id) > 0
        # counted before decoding (frame size, count and times: Qwen3-VL writes the times into the prompt)
        counted = builder.tokens.video_tokens(num_frames, *clip.frames.shape[1:3], clip.timestamps_s)
        assert len(example["input_ids"]) == builder.count(messages, [counted]).total
    if family_kit.name == "llava_next_video":  # 32 px / 8 px patches = 4x4, pooled 2x2 = 4 per frame
        assert builder.tokens.tokens_per_frame == tokens_per_frame_from_config(family_kit.model.config) == 4


def test_two_videos_of_different_lengths_in_one_sample(family_kit):
    builder, processor = family_kit.builder, family_kit.processor
    messages = [
        message("user", [media_part("video", "a"), media_part("video", "b"), text_part("Same?")]),
        message("assistant", [text_part("No.")]),
    ]
    clips = {i: decoded_clip(np.zeros((n, 40, 40, 3), np.uint8)) for i, n in enumerate((3, 5))}
    if family_kit.name == "internvl":  # its processor stacks a sample's videos (data/families/internvl.py)
        with pytest.raises(VideoError, match="videos of 3, 5 frames in one sample"):
            builder.build(messages, clips)
        clips = {i: decoded_clip(np.zeros((4, 40, 40, 3), np.uint8)) for i in range(2)}
    example = builder.build(messages, clips)
    expected = sum(processor_video_tokens(processor, c.frames, builder.video_token_id) for c in clips.values())
    assert int((example["input_ids"] == builder.video_token_id).sum()) == expected
    counted = [builder.tokens.video_tokens(len(c.frames), 40, 40, c.timestamps_s) for c in clips.values()]
    assert len(example["input_ids"]) == builder.count(messages, counted).total
    from vidtune.data.collator import Collator

    with torch.no_grad():  # each video's features land on its own tokens (OneVision: a newline after each)
        loss = family_kit.model(**Collator(0, family=family_kit.family)([example])).loss
    assert torch.isfinite(loss)


def decoded_clip(frames: np.ndarray, fps: float = 2.0) -> Clip:
    """Frames as a decoder returns them: with their presentation times."""
    num_frames, height, width = frames.shape[:3]
    return Clip(
        frames, list(range(num_frames)), [i / fps for i in range(num_frames)], VideoInfo(num_frames, fps, height, width)
    )


def shared_rows():
    corpora = shared_path("corpora")
    videos = str(corpora.parent / "videos")
    return load_conversations(
        [
            SourceConfig(path=str(corpora / "llamafactory_demo/mllm_video_demo.json")),
            SourceConfig(path=str(corpora / "llamafactory_demo/mllm_demo.json")),
            SourceConfig(path=str(corpora / "llava_video_style.json"), media_root=videos),
            SourceConfig(path=str(corpora / "captions.jsonl"), media_root=videos),
            SourceConfig(path=str(corpora / "multiple_choice.jsonl"), media_root=videos),
        ]
    )


def test_every_shared_corpus_row_decodes_back_to_its_conversation(builder, processor):
    from vidtune.data.conversation import to_template_messages

    for row in shared_rows():
        messages = row["messages"]
        media, _ = load_media(messages, SamplingConfig(4), False, None)
        example = builder.build(messages, media)
        assert example["input_ids"][0] == processor.tokenizer.bos_token_id
        decoded = collapse_media_tokens(processor.tokenizer.decode(example["input_ids"][1:]))
        rendered = processor.apply_chat_template(
            to_template_messages(messages), chat_template=LLAVA_NEXT_VIDEO.chat_template
        )
        assert decoded == rendered, row["at"]
        spans = label_spans(example["labels"])
        answers = [processor.tokenizer.decode(example["input_ids"][s]).strip() for s in spans]
        assert answers == [f"{a}</s>" for a in assistant_texts(messages)], row["at"]
        assert decoded.count("<video>") + decoded.count("<image>") == len(media_parts(messages))


def test_counting_without_pixels_matches_the_built_length(builder):
    from vidtune.data.dataset import DataConfig, Measurer

    measure = Measurer(builder, DataConfig(sampling=SamplingConfig(4)))
    for row in shared_rows():
        media, _ = load_media(row["messages"], SamplingConfig(4), False, None)
        example = builder.build(row["messages"], media)
        assert measure(row)["num_tokens"] == len(example["input_ids"]), row["at"]
        assert measure(row)["num_label_tokens"] == int((example["labels"] != IGNORE_INDEX).sum())


@pytest.mark.parametrize(
    ("count", "reason"),
    [
        (TokenCount(100, 64, 3), "100 tokens (64 of them video, image or sound)"),
        (TokenCount(10, 0, 0), "no assistant tokens"),
    ],
)
def test_drop_reasons(count, reason):
    assert reason in count.drop_reason(max_length=50)
    assert TokenCount(40, 16, 2).drop_reason(max_length=50) is None


def test_media_stay_where_their_placeholders_are(builder, processor, clips, tmp_path):
    """Two clips introduced in the text: each `<video>` is rendered where the row put it, not moved ahead of the
    text (which would read "<video> <video> First clip: Second clip: ...")."""
    import json

    (tmp_path / "rows.json").write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": "First clip: <video> Second clip: <video> Which has three colours?",
                        },
                        {"role": "assistant", "content": "the second"},
                    ],
                    "videos": [str(clips["red_blue"]), str(clips["three"])],
                }
            ]
        )
    )
    source = SourceConfig(path=str(tmp_path / "rows.json"), media_root=str(clips["red_blue"].parent))
    messages = next(iter_conversations(source))["messages"]
    rendered = processor.apply_chat_template(
        to_template_messages(messages), chat_template=LLAVA_NEXT_VIDEO.chat_template
    )
    assert (
        rendered
        == "USER: First clip: <video>\nSecond clip: <video>\nWhich has three colours? ASSISTANT: the second</s>"
    )
    media, _ = load_media(messages, SamplingConfig(4), False, rng=None)
    example = builder.build(messages, media)
    text = processor.tokenizer.decode(example["input_ids"])
    assert re.sub(r"(<video>)+", "<video>", text).count("First clip: <video>") == 1
    assert text.index("First clip") < text.index("<video>") < text.index("Second clip") < text.rindex("<video>")


def test_images_of_different_shapes_in_one_row_train(family_kit, tmp_path):
    """LLaVA-NeXT-Video's processor pads every image's anyres patches to the largest count of the row; only each
    image's own patches may reach the model, or the forward fails (split_with_sizes ... got [4, 5]). OneVision
    gives each image of a multi-image row one base tile (fewer tokens than the image alone would cost)."""
    from PIL import Image

    from vidtune.data.collator import Collator

    builder, processor = family_kit.builder, family_kit.processor
    paths = []
    for name, (height, width) in {"wide": (40, 120), "square": (48, 48)}.items():
        Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    messages = [
        message("user", [media_part("image", paths[0]), media_part("image", paths[1]), text_part("Same colour?")]),
        message("assistant", [text_part("yes")]),
    ]
    media, _ = load_media(messages, SamplingConfig(4), False, rng=None)
    example = builder.build(messages, media)
    asked = processor(text=processor.image_token * 2, images=[[media[0], media[1]]], return_tensors="pt")
    in_ids = int((example["input_ids"] == processor.image_token_id).sum())
    assert in_ids == int((asked["input_ids"] == processor.image_token_id).sum())  # the processor's own count
    counted = [builder.tokens.image_tokens(*media[i].shape[:2]) for i in range(2)]
    assert in_ids <= sum(counted)  # measuring never under-counts (OneVision: over-counts multi-image rows)
    if family_kit.name == "llava_next_video":
        assert in_ids == sum(counted)
    batch = Collator(processor.tokenizer.pad_token_id, family=family_kit.family)([example])
    with torch.no_grad():
        loss = family_kit.model(**batch).loss
    assert torch.isfinite(loss)
