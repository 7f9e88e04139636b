"""Export: a Hub-ready folder that plain transformers + peft load, a merged model with the same answers, frame
sampling that follows training, and a push that uploads exactly the allowlisted files (recorded, no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml

from tests.conftest import FAMILY_NAMES, tiny_run_overrides
from vidtune.train.training.config import RecipeError, load_recipe

CANARY_HF = "hf_CANARY_0123456789abcdefghijklmnop"
CANARY_WANDB = "CANARYwandb0123456789abcdef0123456789abcd"
pytestmark = pytest.mark.slow


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records what would be sent."""

    instances: ClassVar[list[RecordingApi]] = []

    def __init__(self, token: str | None = None):
        self.token, self.calls = token, []
        RecordingApi.instances.append(self)

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def create_commit(self, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in kwargs["operations"]}
        self.calls.append(("create_commit", {**kwargs, "operations": sorted(files)}))
        self.uploaded = files


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, demo_corpus, tmp_path_factory):
    """A finished LoRA run (projector trained too), trained with canary secrets in the environment and wandb on."""
    from vidtune.train.training.loop import train

    output = tmp_path_factory.mktemp("export-run") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_TOKEN", CANARY_HF)
        env.setenv("WANDB_API_KEY", CANARY_WANDB)
        env.setenv("WANDB_MODE", "offline")
        overrides = tiny_run_overrides(
            tiny_model_dir,
            demo_corpus,
            output,
            "finetune.train_projector=true",
            "logging.report_to=wandb",
            "hub.license=apache-2.0",
            "hub.datasets=[me/colour-clips]",
        )
        train(load_recipe(None, overrides))
    return output


def test_export_folder_holds_the_allowlisted_files_and_a_model_card(run_dir):
    from vidtune.train.publishing.export import export_folder

    result = export_folder(run_dir, card={"repo_id": "me/colours", "license": "apache-2.0"})
    assert result.files == sorted(
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "processor_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "vidtune.json",
            "README.md",
        ]
    )
    card = (result.folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    run_card = (run_dir / "README.md").read_text()  # the run folder's card is vidtune's, not PEFT's boilerplate
    assert "More Information Needed" not in run_card and f"# {run_dir.name}\n" in run_card
    base = json.loads((run_dir / "vidtune.json").read_text())["base_model"]
    assert "base_model" not in front and base not in card  # a local base folder is never published (issue 16)
    assert front["library_name"] == "peft" and front["pipeline_tag"] == "video-text-to-text"
    assert front["license"] == "apache-2.0"
    assert "PeftModel.from_pretrained" in card and "vidtune infer me/colours" in card
    assert "| frames per clip | 4 |" in card and "learning rate" in card


def test_a_local_base_is_said_so_with_the_hub_id_its_config_records_or_named_by_base_id(run_dir, tmp_path, capsys):
    """The base of these runs is a local folder: the card says so (naming the Hub id the folder's config records,
    if any), export tells the publisher to pass --base-id; with it the card, the code and the export's adapter
    config name the Hub model (the run's own files keep the local path)."""
    from vidtune.train.cli import main
    from vidtune.train.publishing.model_card import model_card

    metadata = json.loads((run_dir / "vidtune.json").read_text())
    local = metadata["base_model"]
    main(["export", str(run_dir), "--to", str(tmp_path / "plain"), "--push", "me/colours", "--dry-run"])
    printed = capsys.readouterr().out
    assert f"note: the base model {local} is a local folder that names no Hub model" in printed
    assert "Export with --base-id ORG/NAME" in printed
    card = (tmp_path / "plain" / "README.md").read_text()
    assert f"`{Path(local).name}`, a local model folder (not named on the Hub)" in card
    assert f'from_pretrained("PATH/TO/{Path(local).name}")  # a local model folder' in card

    # a copy of a Hub model whose config records where it came from (configs saved by transformers 4 do)
    copy = tmp_path / "LLaVA-copy"
    copy.mkdir()
    (copy / "config.json").write_text(json.dumps({"_name_or_path": "llava-hf/LLaVA-NeXT-Video-7B-hf"}))
    card = model_card({**metadata, "base_model": str(copy)}, {})
    assert "`LLaVA-copy`, a local model folder whose config records `llava-hf/LLaVA-NeXT-Video-7B-hf`" in card
    assert "# a local folder; its config records llava-hf/LLaVA-NeXT-Video-7B-hf" in card
    from vidtune.train.publishing.model_card import local_base_note

    assert "export with --base-id llava-hf/LLaVA-NeXT-Video-7B-hf" in local_base_note(str(copy))

    main(["export", str(run_dir), "--to", str(tmp_path / "named"), "--base-id", "llava-hf/LLaVA-NeXT-Video-7B-hf"])
    assert "note:" not in capsys.readouterr().out
    card = (tmp_path / "named" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "llava-hf/LLaVA-NeXT-Video-7B-hf" and front["base_model_relation"] == "adapter"
    assert "for [llava-hf/LLaVA-NeXT-Video-7B-hf](https://huggingface.co/llava-hf/LLaVA-NeXT-Video-7B-hf)" in card
    assert 'from_pretrained("llava-hf/LLaVA-NeXT-Video-7B-hf")\n' in card and local not in card
    adapter = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "llava-hf/LLaVA-NeXT-Video-7B-hf"
    assert json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == local
    with pytest.raises(SystemExit):
        main(["export", str(run_dir), "--to", str(tmp_path / "bad"), "--base-id", "/models/llava"])
    assert "--base-id '/models/llava': give the Hub id of the base model, ORG/NAME" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_the_cards_evaluation_table_shows_the_task_scores_the_run_measured(run_dir):
    from vidtune.train.publishing.model_card import model_card

    metadata = json.loads((run_dir / "vidtune.json").read_text())
    scored = {"eval/loss": 1.25, "eval/qa/num_samples": 8, "eval/qa/exact_match": 0.875, "eval/qa/f1": 0.9}
    table = model_card({**metadata, "metrics": scored}, {}).split("## Evaluation (held-out)\n")[1]
    assert "| qa: exact match (8 samples) | 87.5% |\n| qa: f1 (8 samples) | 90.0% |\n| loss | 1.25 |" in table
    assert "Only the held-out loss" not in table
    table = model_card({**metadata, "metrics": {"eval/loss": 1.25}}, {}).split("## Evaluation (held-out)\n")[1]
    assert "| loss | 1.25 |" in table and "set `eval.every_steps`" in table


def card_code(folder: Path, model_dir: Path, video: Path) -> str:
    """The python block of an export's model card, its placeholders filled in: the local base folder, the clip,
    and six tokens forced (a 4-step adapter might stop at once: the comparison is on real text)."""
    code = (folder / "README.md").read_text().split("```python\n")[1].split("```")[0]
    for placeholder, value in (
        (f'"PATH/TO/{model_dir.name}"', f'"{model_dir}"'),
        ('"clip.mp4"', f'"{video}"'),
        ("max_new_tokens=128", "max_new_tokens=6, min_new_tokens=6"),
    ):
        assert placeholder in code or placeholder.startswith('"PATH'), placeholder
        code = code.replace(placeholder, value)
    return code


class CountingAv:
    """Stands in for the `av` module in the card's code: counts the frames its decoders hand out."""

    def __init__(self):
        import av

        self.av, self.decoded = av, 0

    def open(self, path):
        container, counter = self.av.open(path), self

        class Counted:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                container.close()

            def __getattr__(self, name):
                return getattr(container, name)

            def decode(self, *args):
                for frame in container.decode(*args):
                    counter.decoded += 1
                    yield frame

        return Counted()


@pytest.fixture(scope="module")
def coded_clips(tmp_path_factory) -> list[Path]:
    """Frame-index-coded H.264 with B-frames and a keyframe every 12: 160 frames at 10 fps, 30 at a variable rate
    (ffmpeg's setpts expression is limited in length), 160 stored 48x80 with a display matrix that turns them
    upright (shown 80x48)."""
    import subprocess

    import numpy as np

    from tests.video_battery import X264, _encode, coded_frame, ffmpeg_available

    if not ffmpeg_available():
        pytest.skip("needs the ffmpeg command line to encode the clips")
    folder = tmp_path_factory.mktemp("coded")
    steady, mild = [i / 10 for i in range(160)], [round(0.1 * i + 0.03 * np.sin(i * 1.7), 3) for i in range(30)]
    paths = []
    for name, times, (height, width) in (("steady.mp4", steady, (48, 64)), ("vfr.mp4", mild, (48, 64)),
                                         ("stored.mp4", steady, (48, 80))):  # fmt: skip
        paths.append(folder / name)
        _encode(paths[-1], np.stack([coded_frame(i, height, width) for i in range(len(times))]), times, X264)
    rotated = folder / "rotated_90.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-i", str(paths.pop()), "-c", "copy", "-metadata:s:v:0", "rotate=90",
         str(rotated)],
        check=True, capture_output=True,
    )  # fmt: skip
    return [*paths, rotated]


@pytest.mark.parametrize("frame_px", [32, None], ids=["scaled", "full-size"])
def test_the_cards_frame_reading_gives_vidtunes_pixels_and_times_decoding_only_the_sampled_frames(
    coded_clips, frame_px
):
    """The card's own `read_frames` (+ `to_model_size` where the family's decoder scales frames) returns exactly
    the uint8 frames and times vidtune trains and answers on, upright, on presentation time (variable frame rate),
    and decodes only from the keyframe before each sampled frame, not the whole clip."""
    import numpy as np

    from vidtune.data.families import family_for
    from vidtune.data.video.base import SamplingConfig
    from vidtune.data.video.loading import load_clip
    from vidtune.train.publishing.model_card import frame_code

    metadata = {"sampling": {"num_frames": 4}, "frame_px": frame_px}
    code, imports = frame_code(metadata, family_for("llava_next_video"))
    definitions = code.split("\nframes, ")[0]  # the functions, not the call on "clip.mp4"
    counting = CountingAv()
    card: dict = {"np": np, "av": counting}
    exec("\n".join(imports) + "\n" + definitions, card)
    for path in coded_clips:
        ours = load_clip(str(path), SamplingConfig(num_frames=4), shortest_edge=frame_px)
        counting.decoded = 0
        frames, times = card["read_frames"](str(path))
        # each of the 4 sampled frames decoded from the keyframe before it (12 frames apart; a seek onto a keyframe
        # itself may land one keyframe early: 49 seen), never all 160 of the steady and the turned clip
        assert counting.decoded <= 60, path.name
        if frame_px:
            frames = card["to_model_size"](frames)
        assert frames.dtype == np.uint8 and frames.shape == ours.frames.shape, path.name
        assert np.array_equal(frames, ours.frames), path.name
        assert times == pytest.approx(ours.timestamps_s, abs=1e-6), path.name


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_model_cards_own_code_on_the_export_generates_what_vidtune_infer_does(
    family, merge, family_kits, family_runs, demo_corpus, capsys
):
    """The export needs no vidtune: the code its model card shows (transformers + peft; transformers alone once
    merged), run as written, prints what `vidtune infer` answers on the same folder. The card reads and samples
    the frames itself; for Qwen it passes their real times as `video_metadata` (else the processor assumes 24 fps
    and the model sees other times than in training)."""
    from vidtune.train.generation.infer import (
        generate,
        generate_tokens,
        load_for_inference,
        prompt_example,
        video_question,
    )
    from vidtune.train.publishing.export import export_folder

    run, model_dir = family_runs(family), family_kits(family).model_dir
    to = run.parent / ("merged" if merge else "adapter")
    folder = export_folder(run, to=to, merge=merge, card={"repo_id": str(to)}).folder
    video = demo_corpus / "videos" / "eval_0002.mp4"
    inference = load_for_inference(str(folder))
    assert inference.sampling.num_frames == 4  # from the export's vidtune.json, not the default of 8
    question = video_question(str(video), "What happens?")
    ours = generate(inference, [question], 6, min_new_tokens=6)[0]
    # Six generated tokens and a non-empty answer (a tiny model may spend some of the six on special tokens, which
    # decoding skips: the answer's length in characters says nothing about the token count).
    assert generate_tokens(inference, [prompt_example(inference, question)], 6, min_new_tokens=6).shape[1] == 6
    assert ours

    code = card_code(folder, model_dir, video)
    assert ("video_metadata=" in code) == (family.startswith("qwen") or family == "gemma4")  # frame times in text
    capsys.readouterr()
    card: dict = {}
    exec(compile(code, str(folder / "README.md"), "exec"), card)
    # The whole answer: the card hands the model the very pixels vidtune does (it once passed full-size frames to
    # the processor, whose own resize gave logits 0.005 off vidtune's; the tiny model's near ties then flipped
    # later tokens in 1 of 3 clean-clone runs), and stops where vidtune stops.
    assert capsys.readouterr().out.strip() == ours
    # The same prompt and time information as vidtune's (a random model may answer alike despite a wrong time):
    # Qwen3-VL's `<t seconds>` text is in input_ids, Qwen2.5-VL's seconds per temporal patch beside them.
    example = prompt_example(inference, question)
    assert card["inputs"]["input_ids"][0].tolist() == example["input_ids"].tolist()
    pixels = "pixel_values_videos" if "pixel_values_videos" in example else "pixel_values"  # InternVL: one key
    assert torch.equal(card["inputs"][pixels].flatten(), example[pixels].flatten())
    if "second_per_grid_ts" in example:
        torch.testing.assert_close(torch.as_tensor(card["inputs"]["second_per_grid_ts"]), example["second_per_grid_ts"])


def test_vidtune_ends_an_answer_where_the_models_own_generation_config_does(family_kits, demo_corpus):
    """Plain `model.generate` (the card's code) stops at every eos id of the model's generation config (Qwen's
    `<|endoftext|>` beside `<|im_end|>`); vidtune stops there too, not only at the family's end-of-turn."""
    from vidtune.train.generation.infer import generate_tokens, load_for_inference, prompt_example, video_question

    inference = load_for_inference(str(family_kits("llava_next_video").model_dir))
    example = prompt_example(inference, video_question(str(demo_corpus / "videos" / "eval_0002.mp4"), "What?"))
    first = int(generate_tokens(inference, [example], 4, min_new_tokens=4)[0, 0])
    assert first not in inference.family.stop_token_ids(inference.processor.tokenizer)
    inference.model.generation_config.eos_token_id = [inference.processor.tokenizer.eos_token_id, first]
    assert generate_tokens(inference, [example], 4)[0].tolist() == [first]


def test_merged_model_loads_alone_and_gives_the_same_greedy_tokens(run_dir, demo_corpus):
    from transformers import LlavaNextVideoForConditionalGeneration

    from vidtune.train.generation.infer import generate, load_for_inference, video_question
    from vidtune.train.publishing.export import export_folder

    result = export_folder(run_dir, to=run_dir.parent / "merged", merge=True)
    assert "adapter_config.json" not in result.files and "model.safetensors" in result.files
    merged = LlavaNextVideoForConditionalGeneration.from_pretrained(result.folder)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert merged.dtype == torch.float32  # the tiny base's dtype
    prompts = [
        video_question(str(demo_corpus / "videos" / f"eval_{i:04d}.mp4"), q)
        for i in range(3)
        for q in ("Which color comes first?", "Which color comes last?")
    ]
    assert generate(load_for_inference(str(result.folder)), prompts, 6) == generate(
        load_for_inference(str(run_dir)), prompts, 6
    )
    card = yaml.safe_load((result.folder / "README.md").read_text().split("---\n")[1])
    assert card["library_name"] == "transformers"


def test_push_uploads_exactly_the_export_with_repo_privacy_and_revision(run_dir, monkeypatch):
    import huggingface_hub

    from vidtune.train.cli import main

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", CANARY_HF)
    RecordingApi.instances.clear()
    main(
        [
            "export",
            str(run_dir),
            "--to",
            str(run_dir.parent / "pushed"),
            "--push",
            "me/colours",
            "--private",
            "--revision",
            "v1",
            "--message",
            "first adapter",
        ]
    )
    api = RecordingApi.instances[-1]
    assert api.token == CANARY_HF  # used to authenticate, never written anywhere (see the canary test)
    names = [name for name, _ in api.calls]
    assert names == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][1] == {"repo_id": "me/colours", "private": True, "repo_type": "model", "exist_ok": True}
    assert api.calls[1][1]["branch"] == "v1"
    commit = api.calls[2][1]
    assert commit["revision"] == "v1" and commit["commit_message"] == "first adapter"
    assert commit["operations"] == sorted(p.name for p in (run_dir.parent / "pushed").iterdir())
    assert not any(name.startswith(("checkpoints", "wandb", ".env", "metrics")) for name in commit["operations"])
    for content in api.uploaded.values():
        assert CANARY_HF.encode() not in content and CANARY_WANDB.encode() not in content


def test_dry_run_uploads_nothing_and_a_missing_token_is_one_line(run_dir, monkeypatch, capsys, tmp_path):
    import huggingface_hub

    from vidtune.train.cli import main

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.instances.clear()
    dry = ["--push", "me/colours", "--private", "--revision", "v2", "--dry-run"]
    main(["export", str(run_dir), "--to", str(tmp_path / "dry"), *dry])
    out = capsys.readouterr().out
    assert RecordingApi.instances == [] and "nothing was uploaded" in out
    assert "to me/colours (private, revision v2)" in out  # what would happen, echoed whole (issue 16)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run_dir), "--push", "me/colours"])
    assert exit_info.value.code == 2
    assert "no Hugging Face token" in capsys.readouterr().err


def test_no_secret_reaches_any_exported_or_saved_file(run_dir):
    """Canary HF_TOKEN / WANDB_API_KEY set during training and export appear in no file of the run (outputs,
    checkpoints, saved recipe, metrics, wandb offline files) nor of any export."""
    scanned = 0
    for path in run_dir.parent.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert CANARY_HF.encode() not in content, path
            assert CANARY_WANDB.encode() not in content, path
            scanned += 1
    assert scanned > 20 and list(run_dir.glob("wandb/offline-run-*"))


def test_train_refuses_to_start_without_a_token_when_asked_to_push(tiny_model_dir, demo_corpus, tmp_path, monkeypatch):
    from vidtune.train.training.loop import train

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
    recipe = load_recipe(
        None,
        [
            f"model.name_or_path={tiny_model_dir}",
            f"train.output_dir={tmp_path / 'out'}",
            f"data.sources=[{{path: {demo_corpus / 'questions_train.jsonl'}}}]",
            "hub.repo_id=me/colours",
            "logging.report_to=none",
        ],
    )
    with pytest.raises(RecipeError, match="no Hugging Face token"):
        train(recipe)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_train_pushes_at_the_end_when_the_recipe_asks(tiny_model_dir, demo_corpus, tmp_path, monkeypatch):
    import huggingface_hub

    from vidtune.train.training.loop import train

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", CANARY_HF)
    RecordingApi.instances.clear()
    train(
        load_recipe(
            None,
            [
                f"model.name_or_path={tiny_model_dir}",
                f"train.output_dir={tmp_path / 'out'}",
                f"data.sources=[{{path: {demo_corpus / 'questions_train.jsonl'}}}]",
                "data.num_workers=0",
                "data.sampling.num_frames=4",
                "train.max_steps=2",
                "hub.repo_id=me/colours",
                "hub.private=false",
                "logging.report_to=none",
            ],
        )
    )
    calls = RecordingApi.instances[-1].calls
    assert calls[0] == (
        "create_repo",
        {"repo_id": "me/colours", "private": False, "repo_type": "model", "exist_ok": True},
    )
    assert "adapter_model.safetensors" in calls[-1][1]["operations"]
