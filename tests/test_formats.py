"""Corpus row formats -> one conversation type, and one-line errors for bad rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from vidtune.data.conversation import DataError, media_parts
from vidtune.data.formats import RowContext, answer_letter, detect_format, normalise_row


def ctx(**kwargs) -> RowContext:
    return RowContext(at="corpus.json row 7", resolve_media=lambda p: f"/media/{p}", **kwargs)


def texts(messages, role=None) -> list[str]:
    return [p["text"] for m in messages if role in (None, m["role"]) for p in m["content"] if p["type"] == "text"]


def test_llava_image_placeholder_means_the_video_when_the_row_has_one():
    row = {
        "video": "a.mp4",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat happens?"},
            {"from": "gpt", "value": "A cat jumps."},
            {"from": "human", "value": "Then?"},
            {"from": "gpt", "value": "It lands."},
        ],
    }
    messages = normalise_row(row, "llava", ctx())
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"][0] == {
        "type": "video",
        "text": None,
        "path": "/media/a.mp4",
        "start_s": None,
        "end_s": None,
    }
    assert texts(messages) == ["What happens?", "A cat jumps.", "Then?", "It lands."]


def test_llava_missing_placeholder_puts_the_video_first_in_the_first_user_turn():
    row = {
        "video": "a.mp4",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "What happens?"},
            {"from": "gpt", "value": "Nothing."},
        ],
    }
    messages = normalise_row(row, "llava", ctx())
    assert messages[0]["role"] == "system"
    assert [p["type"] for p in messages[1]["content"]] == ["video", "text"]


def test_llava_video_and_image_rows_map_each_tag_to_its_kind():
    row = {
        "video": "a.mp4",
        "image": "b.jpg",
        "conversations": [
            {"from": "human", "value": "<video> and <image>: same scene?"},
            {"from": "gpt", "value": "Yes."},
        ],
    }
    parts = media_parts(normalise_row(row, "llava", ctx()))
    assert [(p["type"], p["path"]) for p in parts] == [("video", "/media/a.mp4"), ("image", "/media/b.jpg")]


def test_llava_clip_bounds_reach_the_video_part():
    row = {
        "video": "a.mp4",
        "start": 2,
        "end": "9.5",
        "conversations": [{"from": "human", "value": "<video>Q"}, {"from": "gpt", "value": "A"}],
    }
    video = media_parts(normalise_row(row, "llava", ctx()))[0]
    assert (video["start_s"], video["end_s"]) == (2.0, 9.5)


def test_openai_messages_with_placeholders_and_media_lists():
    row = {
        "messages": [
            {"role": "user", "content": "<image>Who?"},
            {"role": "assistant", "content": "Kane."},
            {"role": "user", "content": "Doing?<image>"},
            {"role": "assistant", "content": "Celebrating."},
        ],
        "images": ["1.jpg", "2.jpg"],
    }
    messages = normalise_row(row, "openai", ctx())
    assert [p["path"] for p in media_parts(messages)] == ["/media/1.jpg", "/media/2.jpg"]
    assert [p["type"] for p in messages[2]["content"]] == ["text", "image"]  # placeholder position is kept


def test_openai_typed_content_parts():
    row = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
        ]
    }
    messages = normalise_row(row, "openai", ctx())
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert media_parts(messages)[0]["path"] == "/media/v.mp4"


def test_caption_rows_get_the_fixed_prompt_or_a_seeded_choice():
    row = {"video": "a.mp4", "caption": " A cat. ", "start": 1.0, "end": 3.0}
    messages = normalise_row(row, "caption", ctx())
    assert texts(messages) == ["Describe this video.", "A cat."]
    assert media_parts(messages)[0]["start_s"] == 1.0
    prompts = ("Describe.", "Summarise.", "What happens?")
    chosen = {texts(normalise_row(row, "caption", ctx(caption_prompts=prompts, row=i)))[0] for i in range(30)}
    assert chosen == set(prompts)
    again = [texts(normalise_row(row, "caption", ctx(caption_prompts=prompts, row=i)))[0] for i in range(30)]
    assert again == [texts(normalise_row(row, "caption", ctx(caption_prompts=prompts, row=i)))[0] for i in range(30)]


def test_qa_and_multiple_choice_rows():
    qa = normalise_row({"video": "a.mp4", "question": "Color?", "answer": "red"}, "qa", ctx())
    assert texts(qa) == ["Color?", "red"]
    mc = normalise_row(
        {"video": "a.mp4", "question": "Where?", "options": ["Kitchen", "Car"], "answer": 1}, "multiple_choice", ctx()
    )
    assert texts(mc, "user") == [
        "Where?\nA. Kitchen\nB. Car\nAnswer with the option's letter from the given choices directly."
    ]
    assert texts(mc, "assistant") == ["B"]


@pytest.mark.parametrize(("answer", "letter"), [("B", "B"), ("b", "B"), ("B.", "B"), (1, "B"), ("0", "A")])
def test_answer_letter_accepts_letters_and_indices(answer, letter):
    assert answer_letter(answer, ["w", "x", "y", "z"], "x") == letter


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        ({"video": "a.mp4", "conversations": [{"from": "robot", "value": "hi"}]}, "llava", "unknown role 'robot'"),
        (
            {
                "video": "a.mp4",
                "conversations": [{"from": "human", "value": "<video><video>Q"}, {"from": "gpt", "value": "A"}],
            },
            "llava",
            "more <video> placeholders",
        ),
        (
            {
                "images": ["a.jpg", "b.jpg"],
                "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
            },
            "openai",
            "1 <image> placeholder(s) in the text but 2 image(s)",
        ),
        (
            {"video": "a.mp4", "question": "Q", "options": ["x", "y"], "answer": "C"},
            "multiple_choice",
            "points outside the 2 options",
        ),
        ({"video": "a.mp4", "question": "Q"}, "qa", "missing column(s) ['answer']"),
        ({"video": "a.mp4", "conversations": [{"from": "human", "value": "<video>Q"}]}, "llava", "no assistant turn"),
        ({"video": "a.mp4", "caption": "c", "start": 5, "end": 2}, "caption", "is not after start"),
        (
            {
                "audios": ["a.wav"],
                "messages": [
                    {"role": "user", "content": "<audio><audio>What is said?"},
                    {"role": "assistant", "content": "A"},
                ],
            },
            "openai",
            "more <audio> placeholders than audios (1 given",
        ),
        (
            {
                "audios": ["a.wav", "b.wav"],
                "conversations": [{"from": "human", "value": "<audio>Q"}, {"from": "gpt", "value": "A"}],
            },
            "llava",
            "1 <audio> placeholder(s) in the text but 2 audio(s)",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "not base64!"}}]},
                    {"role": "assistant", "content": "A"},
                ]
            },
            "openai",
            "input_audio: `data` is not valid base64",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogg"}}],
                    },
                    {"role": "assistant", "content": "A"},
                ]
            },
            "openai",
            "input_audio: format 'ogg' is not one of wav, mp3, flac",
        ),
        (
            {
                "audios": ["a.wav"],
                "start": 3,
                "end": 1,
                "conversations": [{"from": "human", "value": "<audio>Q"}, {"from": "gpt", "value": "A"}],
            },
            "llava",
            "is not after start",
        ),
    ],
)
def test_bad_rows_raise_one_line_naming_the_row(row, fmt, message):
    with pytest.raises(DataError) as err:
        normalise_row(row, fmt, ctx())
    assert str(err.value).startswith("corpus.json row 7: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_detect_format_from_columns():
    assert detect_format(["video", "conversations"], "x") == "llava"
    assert detect_format(["messages", "videos"], "x") == "openai"
    assert detect_format(["video", "caption"], "x") == "caption"
    assert detect_format(["video", "question", "options", "answer"], "x") == "multiple_choice"
    assert detect_format(["video", "question", "answer"], "x") == "qa"
    with pytest.raises(DataError, match="cannot tell the corpus format"):
        detect_format(["clip", "text"], "x")


@pytest.mark.parametrize(
    ("answer", "options", "index"),
    [
        ("sitting", ["standing", "sitting", "lying"], 1),  # MVBench: the option's own text
        ("Sitting.", ["standing", "sitting", "lying"], 1),  # ... normalised when not exact
        ("4", ["3", "4", "5"], 1),  # a number that is an option's text means that option, not index 4
        ("2", ["cat", "dog", "bird"], 2),  # otherwise a digit string is a 0-based index
        (2, ["3", "4", "5"], 2),  # and a number is always an index (NExT-QA)
        (1.0, ["x", "y"], 1),  # parquet floats of a nullable integer column
        ("(C)", ["x", "y", "z"], 2),
        ("B", ["A. red", "B. blue"], 1),  # Video-MME
        ("B. blue", ["A. red", "B. blue"], 1),
        ("blue", ["A. red", "B. blue"], 1),
        ("A", ["A", "B"], 0),  # an option literally named "A" wins over nothing else
    ],
)
def test_answer_index_reads_letters_indices_and_option_text(answer, options, index):
    from vidtune.data.formats import answer_index

    assert answer_index(answer, options, "x") == index


@pytest.mark.parametrize(
    ("answer", "options", "message"),
    [
        ("red", ["red", "red", "blue"], "answer 'red' matches options A and B; cannot tell which is meant"),
        ("a red car", ["A red car.", "a red car!", "a van"], "answer 'a red car' matches options A and B"),
        ("purple", ["red", "blue"], "answer 'purple' is no option letter, index or option text"),
        (3, ["red", "blue"], "answer 3 points outside the 2 options"),
        (True, ["red", "blue"], "is not an option letter, index or text"),
        (float("nan"), ["red", "blue"], "answer nan is not a 0-based option index"),
    ],
)
def test_answers_that_mean_no_single_option_are_refused_naming_the_row(answer, options, message):
    from vidtune.data.formats import answer_index

    with pytest.raises(DataError) as err:
        answer_index(answer, options, "corpus.json row 7")
    assert str(err.value).startswith("corpus.json row 7: answer ") and message in str(err.value)


def test_lettered_options_are_recognised_only_as_a_whole_list_in_order():
    from vidtune.data.formats import option_texts

    assert option_texts(["A. red", "(B) blue", "C) green", "D: gray"], "x") == ["red", "blue", "green", "gray"]
    assert option_texts(["A cat", "A dog"], "x") == ["A cat", "A dog"]  # articles, not letters
    assert option_texts(["A. Lincoln", "Washington"], "x") == ["A. Lincoln", "Washington"]  # not all lettered
    with pytest.raises(DataError, match=r"options are lettered B, A, not A, B, C\.\.\. in order"):
        option_texts(["B. red", "A. blue"], "x")
    mc = normalise_row(
        {"video": "a.mp4", "question": "Q?", "options": ["A. red", "B. blue"], "answer": "B"}, "multiple_choice", ctx()
    )
    assert texts(mc, "user")[0].split("\n")[1:3] == ["A. red", "B. blue"] and texts(mc, "assistant") == ["B"]


# --------------------------------------------------------------------------------------------------- sound files


def sound_parts(messages) -> list[tuple[str, str | None, float | None, float | None]]:
    return [(p["type"], p["path"], p["start_s"], p["end_s"]) for p in media_parts(messages)]


def test_llama_factory_audios_take_their_placeholders_in_order_across_turns():
    """LLaMA-Factory sharegpt: every `<audio>` takes the next file of `audios`, in the turn and place it stands."""
    row = {
        "audios": ["one.wav", "two.mp3"],
        "conversations": [
            {"from": "human", "value": "<audio>What is said?"},
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "And here: <audio>"},
            {"from": "gpt", "value": "Goodbye."},
        ],
    }
    messages = normalise_row(row, "llava", ctx())
    assert [[p["type"] for p in m["content"]] for m in messages] == [
        ["audio", "text"],
        ["text"],
        ["text", "audio"],
        ["text"],
    ]
    assert sound_parts(messages) == [("audio", "/media/one.wav", None, None), ("audio", "/media/two.mp3", None, None)]
    assert texts(messages, "user") == ["What is said?", "And here:"]


def test_ms_swift_messages_with_audios_videos_and_images_map_each_tag_to_its_kind():
    row = {
        "videos": ["v.mp4"],
        "images": ["i.jpg"],
        "audios": ["s.flac"],
        "messages": [
            {"role": "system", "content": "Listen."},
            {"role": "user", "content": "<video><audio>Does the sound fit the clip, and the <image>?"},
            {"role": "assistant", "content": "Yes."},
        ],
    }
    messages = normalise_row(row, "openai", ctx())
    assert [p["type"] for p in messages[1]["content"]] == ["video", "audio", "text", "image", "text"]
    assert [p["path"] for p in media_parts(messages)] == ["/media/v.mp4", "/media/s.flac", "/media/i.jpg"]


def test_audios_without_placeholders_go_first_in_the_first_user_turn_after_the_videos():
    row = {
        "video": "v.mp4",
        "audios": ["a.wav", "b.wav"],
        "conversations": [{"from": "human", "value": "Same?"}, {"from": "gpt", "value": "No."}],
    }
    messages = normalise_row(row, "llava", ctx())
    assert [(p["type"], p["path"]) for p in messages[0]["content"]] == [
        ("video", "/media/v.mp4"),
        ("audio", "/media/a.wav"),
        ("audio", "/media/b.wav"),
        ("text", None),
    ]


def test_typed_audio_parts_and_audio_urls_resolve_like_videos():
    row = {
        "audios": ["listed.wav"],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "audio", "audio": "inline.mp3"},
                    {"type": "audio"},  # the next entry of the row's `audios`
                    {"type": "audio_url", "audio_url": {"url": "url.flac"}},
                    {"type": "text", "text": "Which is loudest?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "The second."}]},
        ],
    }
    messages = normalise_row(row, "openai", ctx())
    assert [p["path"] for p in media_parts(messages)] == ["/media/inline.mp3", "/media/listed.wav", "/media/url.flac"]


def test_input_audio_bytes_become_one_file_per_content(tmp_path, monkeypatch):
    """OpenAI's input_audio: the base64 bytes stored once in the cache folder, named by their hash, so every
    later stage (measuring, decoding, its caches) reads a path; the same bytes in another row are the same file."""
    import base64

    monkeypatch.setenv("VIDTUNE_CACHE_DIR", str(tmp_path))
    sound = b"RIFF....WAVEfmt " + bytes(range(64))

    def row(data: str) -> dict:
        part = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
        return {"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "A"}]}

    first = media_parts(normalise_row(row(base64.b64encode(sound).decode()), "openai", ctx()))[0]
    again = media_parts(
        normalise_row(row("data:audio/wav;base64," + base64.b64encode(sound).decode()), "openai", ctx())
    )
    assert first["type"] == "audio" and first["path"] == again[0]["path"]
    assert first["path"].startswith(str(tmp_path / "sounds")) and first["path"].endswith(".wav")
    assert Path(first["path"]).read_bytes() == sound
    assert [p.name for p in (tmp_path / "sounds").iterdir()] == [first["path"].rsplit("/", 1)[1]]  # no leftovers


def test_an_audio_only_rows_start_and_end_bound_its_sound_and_a_mixed_rows_bound_its_video():
    def turns(tags: str) -> list[dict]:
        return [{"from": "human", "value": f"{tags}Q"}, {"from": "gpt", "value": "A"}]

    alone = normalise_row({"audio": "a.wav", "start": 1.5, "end": 4, "conversations": turns("<audio>")}, "llava", ctx())
    assert sound_parts(alone) == [("audio", "/media/a.wav", 1.5, 4.0)]
    mixed = {"video": "v.mp4", "audio": "a.wav", "start": 1.5, "end": 4, "conversations": turns("<video><audio>")}
    assert sound_parts(normalise_row(mixed, "llava", ctx())) == [
        ("video", "/media/v.mp4", 1.5, 4.0),
        ("audio", "/media/a.wav", None, None),
    ]
    # an empty `audios` list (LLaMA-Factory's mixed corpora) or a blank `audio` cell is no sound
    empty = {"audios": [], "audio": "", "conversations": turns("")}
    assert media_parts(normalise_row(empty, "llava", ctx())) == []
