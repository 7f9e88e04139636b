"""Sound files (audio parts, audio-only rows) through the families that hear: measured as built, the processor's own
audio token counts, labels on the answer only, batched with video rows; refused in one line by the families that do
not hear; named by `vidtune check --decode` when they cannot be decoded; answered by the server (`input_audio`)."""

from __future__ import annotations

import base64
import copy
import json
import shutil

import numpy as np
import pytest
import torch

from tests.hearing import LOW_HZ, sound_question, write_tone_sound, write_undecodable_sound
from vidtune.data.collator import Collator
from vidtune.data.conversation import DataError
from vidtune.data.dataset import DataConfig, Measurer, load_media
from vidtune.data.sources import SourceConfig
from vidtune.data.video import SamplingConfig

HEARING = ["qwen2_5_omni", "gemma4", "qwen3_omni_moe"]
END_OF_TURN = {"qwen2_5_omni": "<|im_end|>", "gemma4": "<turn|>", "qwen3_omni_moe": "<|im_end|>"}


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    """A 1.5 s low tone as WAV and a 1 s high one as MP3 (22.05 kHz: every load resamples)."""
    root = tmp_path_factory.mktemp("sounds")
    return {
        "low": write_tone_sound(root / "low.wav", [LOW_HZ], 1.5),
        "high": write_tone_sound(root / "high.mp3", [2500]),
    }


def sound_example(kit, messages):
    media, _ = load_media(messages, SamplingConfig(4), False, None, sound_rate=kit.builder.sound_rate)
    return kit.builder.build(messages, media)


def measured_tokens(kit, messages, audio_rate: int | None = None) -> int:
    """The measurer's count (no pixels, no sound decoded); `audio_rate`: the row's videos are heard."""
    cfg = DataConfig(sources=[SourceConfig(path="a.jsonl")], sampling=SamplingConfig(4))
    builder = copy.copy(kit.builder)
    builder.audio_rate = audio_rate
    row = {"messages": messages, "source": "a.jsonl", "at": "a.jsonl row 1"}
    measured = Measurer(builder, cfg).measure(row)
    assert measured["problem"] == ""
    return measured["num_tokens"]


@pytest.mark.parametrize("name", HEARING)
def test_a_sound_file_renders_where_it_stands_as_in_the_hub_template(name, family_kits):
    """Prompts with sound files (what inference feeds the model) are the hub template's, placeholder included."""
    from transformers import AutoProcessor

    from vidtune.data.conversation import media_part, message, text_part, to_template_messages

    kit = family_kits(name)
    hub_template = AutoProcessor.from_pretrained(kit.model_dir).chat_template
    prompt = [
        message(
            "user", [text_part("First"), media_part("audio", "a.wav"), text_part("then"), media_part("audio", "b.wav")]
        )
    ]
    render = kit.processor.apply_chat_template
    ours = render(to_template_messages(prompt), chat_template=kit.family.chat_template, add_generation_prompt=True)
    hub = render(to_template_messages(prompt), chat_template=hub_template, add_generation_prompt=True)
    assert ours == hub and ours.count(kit.processor.audio_token) == 2


@pytest.mark.parametrize("name", HEARING)
def test_an_audio_only_row_has_the_processors_audio_tokens_and_learns_only_its_answer(name, family_kits, sounds):
    kit = family_kits(name)
    processor, tokenizer = kit.processor, kit.processor.tokenizer
    messages = sound_question(sounds["low"].resolve(), "low")
    example = sound_example(kit, messages)
    ids = example["input_ids"]
    assert tokenizer.decode(ids[example["labels"] != -100]) == f"low{END_OF_TURN[name]}"
    assert "pixel_values_videos" not in example and "input_features" in example
    # the processor alone, given the same samples behind its own audio placeholder, expands it as much
    samples = load_media(messages, SamplingConfig(4), False, None, sound_rate=16000)[0][0].samples
    assert len(samples) == 24000  # 1.5 s at the feature extractor's 16 kHz
    alone = processor(text=processor.audio_token, audio=[samples], sampling_rate=16000)
    num_audio = int((ids == processor.audio_token_id).sum())
    assert num_audio == int((np.asarray(alone["input_ids"]) == processor.audio_token_id).sum())
    assert num_audio == {"qwen2_5_omni": 37, "gemma4": 38, "qwen3_omni_moe": 20}[name]  # 25 or 13 per second
    assert measured_tokens(kit, messages) == len(ids)  # from the header: nothing decoded


@pytest.mark.parametrize("name", ["qwen2_5_omni", "gemma4"])
def test_audio_only_video_and_heard_video_with_a_sound_file_batch_like_single_samples(name, family_kits, sounds, clips):
    """One batch: an audio-only row, a video row (not heard), and a heard video (a tone clip) with a sound file
    after it. The batch loss is the per-sample losses' sum, the gradient reaches the audio tower and one training
    step moves it; the row with both sounds counts as measured."""
    from tests.hearing import question, write_tone_twins

    kit = family_kits(name)
    both = question(write_tone_twins(sounds["low"].parent / "clips")[LOW_HZ], "no")
    both[0]["content"].insert(1, sound_question(sounds["high"].resolve())[0]["content"][0])
    media, _ = load_media(both, SamplingConfig(4), False, None, audio_rate=16000, sound_rate=16000)
    heard = kit.builder.build(both, media)
    assert len(heard["input_ids"]) == measured_tokens(kit, both, audio_rate=16000)
    alone, seen = (
        sound_example(kit, m) for m in (sound_question(sounds["low"].resolve()), question(clips["red_blue"]))
    )
    examples = [alone, seen, heard]
    assert ["input_features" in ex for ex in examples] == [True, False, True]
    model = copy.deepcopy(kit.model).train()
    collate = Collator(kit.processor.tokenizer.pad_token_id, family=kit.family)
    loss = model(**collate(examples), num_items_in_batch=1).loss
    loss.backward()
    tower = model.model.audio_tower
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())
    single = sum(model(**collate([ex]), num_items_in_batch=1).loss.item() for ex in examples)
    assert loss.item() == pytest.approx(single, rel=1e-4)
    before = copy.deepcopy(tower.state_dict())
    torch.optim.SGD(model.parameters(), lr=1e-2).step()  # one training step moves the audio tower
    assert any(not torch.equal(before[key], value) for key, value in tower.state_dict().items())


def test_a_family_that_does_not_hear_refuses_a_sound_row_in_one_line(family_kits, sounds, tmp_path, capsys):
    """Before any model loads (`vidtune check` reads the processor only), never dropping the sound silently."""
    from vidtune.train.cli import main

    kit = family_kits("llava_next_video")
    refusal = (
        f"llava_next_video does not hear sound, and the row holds a sound file ({sounds['low']}); drop the sound "
        "from the row or train a family that hears (gemma4, qwen2_5_omni, qwen3_omni_moe)"
    )
    with pytest.raises(DataError) as err:
        measured_tokens(kit, sound_question(sounds["low"]))
    assert str(err.value) == f"a.jsonl row 1: {refusal}"
    shutil.copy(sounds["low"], tmp_path / "low.wav")
    turns = [{"from": "human", "value": "<audio>Low?"}, {"from": "gpt", "value": "yes"}]
    (tmp_path / "rows.jsonl").write_text(json.dumps({"audios": ["low.wav"], "conversations": turns}) + "\n")
    recipe = tmp_path / "recipe.yaml"
    data = {"sources": [{"path": str(tmp_path / "rows.jsonl")}], "max_length": 400}
    recipe.write_text(json.dumps({"model": {"name_or_path": str(kit.model_dir)}, "data": data}))
    with pytest.raises(SystemExit) as exit_:
        main(["check", str(recipe), "train.output_dir=o", "--out", str(tmp_path / "report.json")])
    assert exit_.value.code == 2
    printed = capsys.readouterr().err.strip().splitlines()[-1]
    assert printed == "vidtune check: error: rows.jsonl line 1: " + refusal.replace(
        str(sounds["low"]), str(tmp_path / "low.wav")
    )


def test_check_decode_names_a_sound_file_that_cannot_be_decoded(family_kits, sounds, tmp_path):
    from vidtune.train.cli import main

    kit = family_kits("qwen2_5_omni")
    bad = write_undecodable_sound(tmp_path / "bad_sound.mov")
    shutil.copy(sounds["low"], tmp_path / "low.wav")
    turns = [{"from": "human", "value": "<audio>Low?"}, {"from": "gpt", "value": "low"}]
    rows = [{"audios": [name], "conversations": turns} for name in ("low.wav", bad.name)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    data = {"sources": [{"path": str(tmp_path / "rows.jsonl")}], "max_length": 400}
    recipe.write_text(json.dumps({"model": {"name_or_path": str(kit.model_dir)}, "data": data}))
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit):  # 1 bad of 2: over the default budget
        main(["check", str(recipe), "train.output_dir=o", "--out", str(out), "--decode"])
    report = json.loads(out.read_text())
    assert [(item["where"], item["reason"].split(": ", 1)[0]) for item in report["bad"]] == [
        ("rows.jsonl line 2", str(bad))
    ]
    assert "cannot decode its audio" in report["bad"][0]["reason"]


def test_the_server_answers_input_audio_as_infer_does_and_a_model_that_does_not_hear_says_400(
    family_kits, sounds, tmp_path
):
    """In process (FastAPI's test client): a base64 WAV as `input_audio` gets the answer and prompt length that
    `vidtune infer`'s road gives for the same file; a family that does not hear refuses the part with a 400."""
    from starlette.testclient import TestClient

    from vidtune.data.examples import ExampleBuilder
    from vidtune.train.generation.infer import InferenceModel, generate, prompt_example
    from vidtune.train.serving.app import ServeSettings, create_app
    from vidtune.train.serving.media import MediaPolicy

    settings = ServeSettings("tiny", MediaPolicy(None, False, 1 << 20), default_max_tokens=6, log_requests=False)
    wav = base64.b64encode(sounds["low"].read_bytes()).decode()
    content = [{"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}, {"type": "text", "text": "Low?"}]
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0}

    def served(name: str) -> tuple[InferenceModel, TestClient]:
        kit = family_kits(name)
        builder = ExampleBuilder(kit.processor, kit.family)
        im = InferenceModel(kit.model, kit.processor, kit.family, builder, SamplingConfig(4), False)
        return im, TestClient(create_app(im, settings))

    im, client = served("qwen2_5_omni")
    prompt = sound_question(sounds["low"].resolve())[:1]
    prompt[0]["content"][1]["text"] = "Low?"
    with client:
        answered = client.post("/v1/chat/completions", json=body)
        broken = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "%%%"}}]}]})  # fmt: skip
    assert answered.status_code == 200, answered.text
    assert answered.json()["usage"]["prompt_tokens"] == len(prompt_example(im, prompt)["input_ids"])
    assert answered.json()["choices"][0]["message"]["content"] == generate(im, [prompt], max_new_tokens=6)[0]
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "bad_audio"
    _, client = served("llava_next_video")
    with client:
        refused = client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("audio_not_supported", "messages.0.content.0")
    assert error["message"] == (
        "messages.0.content.0: this model (llava_next_video) does not hear sound; send text, images or videos"
    )


def test_infer_asks_about_a_sound_file_and_refuses_one_for_a_model_that_does_not_hear(family_kits, sounds, capsys):
    """`vidtune infer --audio`: the prompt carries the sound (the answer is `generate`'s on the same question); a
    model that does not hear is refused from its config, before it loads."""
    from vidtune.train.cli import main
    from vidtune.train.generation.infer import generate, load_for_inference, video_question

    kit = family_kits("qwen2_5_omni")
    main(["infer", str(kit.model_dir), "--audio", str(sounds["low"]), "--prompt", "Low?", "--max-new-tokens", "3"])
    im = load_for_inference(str(kit.model_dir))
    expected = generate(im, [video_question(None, "Low?", str(sounds["low"]))], max_new_tokens=3)[0]
    assert capsys.readouterr().out.strip().splitlines()[-1] == expected.strip()
    llava = str(family_kits("llava_next_video").model_dir)
    with pytest.raises(SystemExit):
        main(["infer", llava, "--audio", str(sounds["low"]), "--prompt", "Low?"])
    refusal = f"--audio {sounds['low']}: llava_next_video does not hear sound (ask about a video instead)"
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"vidtune infer: error: {refusal}"


def test_show_plays_a_rows_sound_file(family_kits, sounds, tmp_path):
    import wave

    from vidtune.train.datatools.show import run_show
    from vidtune.train.training.config import load_recipe

    shutil.copy(sounds["low"], tmp_path / "low.wav")
    turns = [{"from": "human", "value": "<audio>Low?"}, {"from": "gpt", "value": "yes"}]
    (tmp_path / "rows.jsonl").write_text(json.dumps({"audios": ["low.wav"], "conversations": turns}) + "\n")
    overrides = [f"model.name_or_path={family_kits('gemma4').model_dir}", "train.output_dir=o"]
    recipe = load_recipe(None, [*overrides, f"data.sources=[{{path: {tmp_path / 'rows.jsonl'}}}]"])
    page = run_show(recipe, "recipe", 1, tmp_path / "show").read_text()
    assert "<audio controls src='row0_sound0.wav'>" in page and "&lt;audio x38&gt;" in page
    with wave.open(str(tmp_path / "show" / "row0_sound0.wav")) as played:
        assert (played.getframerate(), played.getnframes()) == (16000, 24000)
