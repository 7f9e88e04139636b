"""A hostile battery's "let in" and "bad input" faults (issue 13, items 7-15), each injected on real files: recipes
that lie about types or numbers, YAML bombs and tags, playlists posing as videos, rows that are not UTF-8, too large
or point at NUL paths, corrupt parquet, huge image headers, corpora with nothing usable, crafted pickles."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests.conftest import tiny_run_overrides
from vidtune.data.conversation import DataError
from vidtune.data.dataset import DataConfig, prepare_rows
from vidtune.data.quality import BadSampleConfig
from vidtune.data.sources import SourceConfig
from vidtune.data.video import SamplingConfig, VideoError, load_clip, probe_video
from vidtune.train.cli import main
from vidtune.train.training.config import RecipeError, load_recipe, recipe_to_yaml


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in this process; it must exit 2 with exactly one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    # the inference commands announce a model load on stderr ("loading model PATH ..."): progress, not the error
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("loading model ")]
    err = "\n".join(lines)
    assert len(lines) == 1 and "Traceback" not in err, err
    return err


def base_recipe(tmp_path: Path, tiny_model_dir: Path, demo_corpus: Path, *extra: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        recipe_to_yaml(load_recipe(None, tiny_run_overrides(tiny_model_dir, demo_corpus, tmp_path / "run")))
    )
    return path


# ------------------------------------------------------------------------------------ 7, 8, 11: recipes


def test_7_a_malformed_nested_value_is_refused_before_training(tmp_path, tiny_model_dir, demo_corpus, capsys):
    recipe = base_recipe(tmp_path, tiny_model_dir, demo_corpus)
    recipe.write_text(recipe.read_text().replace("datasets: []", "datasets:\n  - - x"))
    err = cli_error(capsys, "train", str(recipe))
    assert "hub.datasets[0] must be a str" in err
    assert not (tmp_path / "run").exists()  # refused before anything ran


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learning_rate=.inf", "train.learning_rate must be a finite number"),
        ("train.max_grad_norm=.nan", "train.max_grad_norm must be a finite number"),
        ("train.num_epochs=.nan", "train.num_epochs must be a finite number"),
        ("train.seed=-1", "train.seed must be in [0, 2**32)"),
        ("data.num_workers=-3", "data.num_workers must be >= 0"),
        ("train.max_grad_norm=-1", "train.max_grad_norm, weight_decay, num_epochs and save_retry_s must be >= 0"),
        ("train.adam_epsilon=0", "train.adam_epsilon must be > 0, got 0.0"),
    ],
)
def test_8_non_finite_and_out_of_range_numbers_are_one_line_errors(
    tmp_path, tiny_model_dir, demo_corpus, capsys, override, message
):
    recipe = base_recipe(tmp_path, tiny_model_dir, demo_corpus)
    assert message in cli_error(capsys, "train", str(recipe), override)


def test_11_a_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys):
    # Anchors inside a valid key (so no unknown-key check stops it first): 9 x 6^8 = 15 million strings.
    levels = ['&a ["x","x","x","x","x","x","x","x","x"]']
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        levels.append(f"&{level} [*{previous},*{previous},*{previous},*{previous},*{previous},*{previous}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("hub:\n  datasets: [" + ", ".join(levels) + "]\n")
    assert bomb.stat().st_size < 600
    started = time.perf_counter()
    assert "expands to more than 100,000 values" in cli_error(capsys, "train", str(bomb))
    assert time.perf_counter() - started < 20  # the bomb is 15 million strings; refusing it takes under a second
    large = tmp_path / "large.yaml"
    large.write_text("# padding\n" * 120_000)
    assert "recipes are limited to" in cli_error(capsys, "train", str(large))


def test_11_python_tags_are_refused_in_one_line_and_never_run(tmp_path, capsys):
    sentinel = tmp_path / "ran"
    recipe = tmp_path / "tag.yaml"
    recipe.write_text(f'variant: !!python/object/apply:os.system ["touch {sentinel}"]\n')
    assert "invalid YAML" in cli_error(capsys, "train", str(recipe))
    assert "invalid YAML" in cli_error(
        capsys, "train", "demo/base", f"variant=!!python/object/apply:os.system [touch {sentinel}]"
    )
    assert not sentinel.exists()


# ------------------------------------------------------------------------------------------ 9: playlists


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_9_a_playlist_posing_as_a_video_is_never_opened(tmp_path, clips, backend):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = shutil.copy(clips["red_blue"], outside / "secret.mp4")
    root = tmp_path / "media"
    root.mkdir()
    (root / "hls.mp4").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{secret}\n#EXT-X-ENDLIST\n")
    (root / "concat.mp4").write_text(f"ffconcat version 1.0\nfile {secret}\n")
    for name in ("hls.mp4", "concat.mp4"):
        for read in (lambda p: probe_video(p, backend), lambda p: load_clip(p, SamplingConfig(4, backend=backend))):
            with pytest.raises(VideoError, match=r"not a video container|a playlist"):
                read(str(root / name))
    assert load_clip(str(secret), SamplingConfig(4, backend=backend)).frames.shape[0] == 4  # real files still open


# ------------------------------------------------------------------------------------ 12, 13: bad rows


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (its pixel data is never reached)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def qa(video: str, answer: str = "red") -> dict:
    return {"video": video, "question": "Which color comes first?", "answer": answer}


def test_12_13_each_bad_row_takes_down_only_itself(tmp_path, clips, builder):
    root = tmp_path / "corpus"
    root.mkdir()
    shutil.copy(clips["red_blue"], root / "good.mp4")
    lines = [
        b"\xef\xbb\xbf" + json.dumps(qa("good.mp4")).encode(),  # a BOM: read
        json.dumps(qa("good\x00.mp4")).encode(),  # NUL in a path
        json.dumps(qa("good.mp4")).encode().replace(b"red", b"r\xffd"),  # a non-UTF-8 byte
        json.dumps(qa("good.mp4", "red " * 20_000)).encode(),  # 80 kB: over data.max_row_bytes, never tokenised
        json.dumps(qa("good.mp4", "blue")).encode(),
    ]
    corpus = root / "rows.jsonl"
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    cfg = DataConfig(
        sources=[SourceConfig(path=str(corpus))],
        sampling=SamplingConfig(4),
        num_workers=0,
        max_row_bytes=50_000,
        bad_samples=BadSampleConfig(max_bad_fraction=0.9, max_bad_in_a_row=10),
    )
    rows, _, report = prepare_rows(cfg, builder, seed=0)
    reasons = dict(report.bad.bad)
    assert len(rows) == 2, reasons  # the BOM row and the last one
    assert "NUL byte" in reasons[f"{corpus.name} line 2"]
    assert "not UTF-8" in reasons[f"{corpus.name} line 3"]
    assert "exceeds data.max_row_bytes=50,000" in reasons[f"{corpus.name} line 4"]
    assert report.bad.kinds["row too large"] == 1


def test_12_images_are_held_to_the_pixel_limit_and_bombs_are_bad_rows(tmp_path, builder):
    (tmp_path / "huge.png").write_bytes(png_header(20000, 20000))
    (tmp_path / "big.png").write_bytes(png_header(5000, 5000))
    rows = [
        {
            "messages": [{"role": "user", "content": "<image>Color?"}, {"role": "assistant", "content": "red"}],
            "images": [name],
        }
        for name in ("huge.png", "big.png")
    ]
    (tmp_path / "images.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())  # with a BOM
    cfg = DataConfig(
        sources=[SourceConfig(path=str(tmp_path / "images.json"))],
        num_workers=0,
        bad_samples=BadSampleConfig(max_bad_fraction=0.99, max_bad_in_a_row=10),
    )
    with pytest.raises(DataError, match="samples bad"):  # both bad: over budget, but each named, no traceback
        prepare_rows(cfg, builder, seed=0)
    from vidtune.data.dataset import Measurer
    from vidtune.data.sources import iter_conversations

    measured = [Measurer(builder, cfg)(row) for row in iter_conversations(cfg.sources[0], keep_bad=True)]
    assert "cannot read image" in measured[0]["problem"] and "400000000 pixels" in measured[0]["problem"]
    assert "5000x5000 image exceeds the 16,777,216-pixel limit" in measured[1]["problem"]


def test_12_a_corrupt_parquet_is_one_file_level_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"video": ["a.mp4"] * 50, "question": ["q"] * 50, "answer": ["a"] * 50}), path)
    data = bytearray(path.read_bytes())
    data[8:200] = b"\x00" * 192  # the first column chunk overwritten
    path.write_bytes(bytes(data))
    from vidtune.data.sources import load_conversations

    with pytest.raises(DataError, match=r"rows\.parquet: cannot read the file") as err:
        load_conversations([SourceConfig(path=str(path))], keep_bad=True)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------- 14: check


def test_14_check_fails_when_no_row_is_usable(tmp_path, tiny_model_dir, demo_corpus, capsys):
    recipe = base_recipe(tmp_path, tiny_model_dir, demo_corpus)
    with pytest.raises(SystemExit) as exit_info:  # every sample is longer than 16 tokens: none would train
        main(["check", str(recipe), "data.max_length=16", "--out", str(tmp_path / "check.json")])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert " 0 usable" in out and "FAIL: none of the 48 rows is usable" in out and "verdict         OK" not in out


# ------------------------------------------------------------------------------------- 15: crafted pickles


class Payload:
    sentinel: Path

    def __reduce__(self):
        return (os.system, (f"touch {Payload.sentinel}",))


def crafted_model(tiny_model_dir: Path, folder: Path) -> Path:
    import torch

    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"language_model.lm_head.weight": Payload()}, folder / "pytorch_model.bin")
    return folder


def test_15_infer_and_export_refuse_a_crafted_pickle_in_one_line(tmp_path, tiny_model_dir, clips, capsys):
    Payload.sentinel = tmp_path / "payload-ran"
    model = crafted_model(tiny_model_dir, tmp_path / "crafted")
    err = cli_error(capsys, "infer", str(model), "--video", str(clips["red_blue"]), "--prompt", "Which color?")
    assert f"{model / 'pytorch_model.bin'}: refused to load a pickled file" in err
    run = tmp_path / "run"  # a finished LoRA run whose base model is the crafted folder
    run.mkdir()
    (run / "vidtune.json").write_text(json.dumps({"base_model": str(model)}))
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model)}))
    (run / "adapter_model.safetensors").write_bytes(b"")
    err = cli_error(capsys, "export", str(run), "--merge", "--to", str(tmp_path / "export"))
    assert "pytorch_model.bin: refused to load a pickled file" in err
    assert not Payload.sentinel.exists()


# ================================================================ issue 24: hostile input that still got through


def gif_bomb(width: int = 16000, height: int = 16000) -> bytes:
    """A 66-byte GIF: two 1x1 frames on a logical screen of width x height (FFmpeg's decoder allocates the screen)."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = (
        b"\x21\xf9\x04\x00\x0a\x00\x00\x00" + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    )
    return screen + frame + frame + b"\x3b"


def run_cli_measured(*argv: str, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """`vidtune ARGV` in its own process: its result and its peak resident memory in GB."""
    script = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=240)\n"
        "sys.stdout.write(done.stdout); sys.stderr.write(done.stderr)\n"
        "print(f'PEAK_KB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr)\n"
        "sys.exit(done.returncode)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, sys.executable, "-m", "vidtune.train.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    peak_kb = int(done.stderr.rsplit("PEAK_KB ", 1)[1])
    done.stderr = done.stderr.rsplit("PEAK_KB ", 1)[0]
    return done, peak_kb / 1e6


def test_a_gif_bomb_is_refused_by_the_pixel_limit_in_frames_and_show_before_decoding(tmp_path, tiny_model_dir):
    """A 66-byte GIF declaring a 16000x16000 screen: `frames` and `show` refuse it by the pixel limit from its header
    (no frame decoded: the probe's rotation check no longer decodes frames that large), in well under a gigabyte."""
    bomb = tmp_path / "bomb.gif"
    bomb.write_bytes(gif_bomb())
    done, peak_gb = run_cli_measured("frames", str(bomb), "--num-frames", "2")
    assert done.returncode == 1 and done.stderr.strip() == (
        f"{bomb}: 16000x16000 frames exceed the 16,777,216-pixel limit"
    ), done.stderr
    assert peak_gb < 2.0, peak_gb  # 1.3 GB measured (1.1 of it importing torch); 3.6 GB on decoding it
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(qa(str(bomb))) + "\n")
    overrides = [o for o in tiny_run_overrides(tiny_model_dir, tmp_path, tmp_path / "run") if "sources" not in o]
    from vidtune.train.datatools.show import run_show

    recipe = load_recipe(None, [*overrides, f"data.sources=[{{path: {rows}}}]"])
    page = run_show(recipe, "recipe.yaml", 1, tmp_path / "show").read_text()
    assert "bad sample: " in page and "16000x16000 frames exceed the 16,777,216-pixel limit" in page


def test_images_are_read_only_in_the_documented_formats_and_held_to_the_pixel_limit(tmp_path):
    from PIL import Image

    from vidtune.data.video import VideoError, image_size, load_image

    eps = tmp_path / "photo.png"  # an EPS named like a PNG: PIL would hand it to Ghostscript
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    for read in (load_image, image_size):
        with pytest.raises(VideoError, match=r"cannot read image \(not one of PNG, JPEG, WEBP, GIF, BMP\)"):
            read(str(eps))
    Image.new("RGB", (300, 200), "red").save(tmp_path / "ok.webp")
    assert load_image(str(tmp_path / "ok.webp")).shape == (200, 300, 3)
    with pytest.raises(VideoError, match="300x200 image exceeds the 50,000-pixel limit"):
        load_image(str(tmp_path / "ok.webp"), max_frame_pixels=50_000)


def test_a_recipe_with_a_duplicate_key_or_nested_20000_deep_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("train:\n  learning_rate: 0.1\n  seed: 3\n  learning_rate: 0.2\n")
    err = cli_error(capsys, "train", str(recipe))
    assert "line 4, column 3: invalid YAML: duplicate key 'learning_rate' (first given on line 2)" in err
    err = cli_error(capsys, "train", "demo/base", "hub.datasets=[{a: 1, a: 2}]")
    assert "duplicate key 'a'" in err
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert "the YAML nests too deeply (a recipe nests at most 32 levels)" in cli_error(capsys, "train", str(deep))
    deep.write_text("hub:\n  datasets: " + "[" * 40 + "]" * 40 + "\n")  # readable, but no recipe nests so deep
    assert "the recipe nests deeper than 32 levels" in cli_error(capsys, "train", str(deep))


@pytest.mark.parametrize(
    ("override", "key"),
    [("logging.run_name=${oc.env:HF_TOKEN}", "logging.run_name"), ("train.output_dir=OUT/${oc.env:HF_TOKEN}", "")],
)
def test_a_secret_from_the_environment_may_not_name_a_run_or_its_folder(
    tmp_path, tiny_model_dir, demo_corpus, capsys, monkeypatch, override, key
):
    monkeypatch.setenv("HF_TOKEN", "hf_SecretValue123456")
    recipe = base_recipe(tmp_path, tiny_model_dir, demo_corpus)
    err = cli_error(capsys, "train", str(recipe), override.replace("OUT", str(tmp_path)))
    assert f"{key or 'train.output_dir'} holds the value of $HF_TOKEN, a secret" in err
    assert "hf_SecretValue123456" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # no run folder, under either name
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))  # an ordinary variable still builds paths
    load_recipe(str(recipe), ["train.output_dir=${oc.env:SCRATCH}/run"])


def test_an_absurd_lora_rank_is_refused_against_the_model_before_it_loads(
    tmp_path, tiny_model_dir, demo_corpus, capsys
):
    recipe = base_recipe(tmp_path, tiny_model_dir, demo_corpus)
    started = time.perf_counter()
    err = cli_error(capsys, "train", str(recipe), "finetune.lora.rank=100000000")
    assert "finetune.lora.rank=100,000,000 exceeds the language model's hidden size" in err
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "run" / "trainable_parameters.json").exists()  # no model was set up


def test_train_refuses_a_crafted_pickle_as_model_or_adapter_in_one_line(tmp_path, tiny_model_dir, demo_corpus, capsys):
    import torch

    Payload.sentinel = tmp_path / "payload-ran"
    model = crafted_model(tiny_model_dir, tmp_path / "crafted")
    recipe = base_recipe(tmp_path, tiny_model_dir, demo_corpus)
    err = cli_error(capsys, "train", str(recipe), f"model.name_or_path={model}")
    assert f"{model / 'pytorch_model.bin'}: refused to load a pickled file" in err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tiny_model_dir)}))
    torch.save({"weight": Payload()}, adapter / "adapter_model.bin")
    err = cli_error(capsys, "train", str(recipe), f"model.adapter={adapter}", "train.output_dir=" + str(tmp_path / "b"))
    assert f"{adapter / 'adapter_model.bin'}: refused to load a pickled file" in err
    assert not Payload.sentinel.exists()


def test_a_deeply_nested_json_row_is_one_bad_row(tmp_path, clips, builder):
    shutil.copy(clips["red_blue"], tmp_path / "good.mp4")
    corpus = tmp_path / "rows.jsonl"
    corpus.write_text("\n".join([json.dumps(qa("good.mp4")), "[" * 200_000, json.dumps(qa("good.mp4", "blue"))]))
    cfg = DataConfig(
        sources=[SourceConfig(path=str(corpus))],
        sampling=SamplingConfig(4),
        num_workers=0,
        bad_samples=BadSampleConfig(max_bad_fraction=0.5, max_bad_in_a_row=10),
    )
    rows, _, report = prepare_rows(cfg, builder, seed=0)
    assert len(rows) == 2 and dict(report.bad.bad) == {"rows.jsonl line 2": "invalid JSON (nested too deeply)"}
    as_list = tmp_path / "rows.json"
    as_list.write_text("[" * 200_000)
    from vidtune.data.sources import load_conversations

    with pytest.raises(DataError, match=r"rows\.json: invalid JSON \(nested too deeply\)"):
        load_conversations([SourceConfig(path=str(as_list))], keep_bad=True)


def test_a_video_replaced_in_place_is_not_resumed_silently(tmp_path, tiny_model_dir, demo_corpus):
    """The resume fingerprint covers each media file's size and mtime, as the measuring cache does."""
    from vidtune.train.training.loop import train

    corpus = tmp_path / "corpus"
    shutil.copytree(demo_corpus / "videos", corpus / "videos")
    shutil.copy(demo_corpus / "questions_train.jsonl", corpus)
    run = tmp_path / "run"
    args = tiny_run_overrides(tiny_model_dir, corpus, run, "train.max_steps=2", "train.save_every_steps=2")
    train(load_recipe(None, args))
    first = json.loads((corpus / "questions_train.jsonl").read_text().splitlines()[0])["video"]
    replaced = corpus / first
    other = next(p for p in sorted((corpus / "videos").iterdir()) if p != replaced)
    shutil.copy(other, replaced)  # same name, another clip's content
    os.utime(replaced, ns=(time.time_ns(), time.time_ns()))
    with pytest.raises(RecipeError, match=r"cannot resume .*step_00000002: media: \d+ files by size and mtime"):
        train(load_recipe(None, [*args, "train.max_steps=3"]))
