"""Shared fixtures: a tiny model folder, its processor, generated clips, and the real files in ../shared."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Keep logs quiet and runs offline before any library reads these.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Measurements cached on disk (data/measure_cache.py) stay within this session.
os.environ.setdefault("VIDTUNE_CACHE_DIR", tempfile.mkdtemp(prefix="vidtune-cache-"))

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file in ../shared (real clips and corpora); tests that need it skip when a clone has no shared/ beside it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is beside the checkout in CI)")
    return path


def families_with_tiny_models() -> list[str]:
    """The registry's families (data/families FAMILIES) that have a tiny model (train/demo TINY_MODELS): what the
    core-guarantee tests run on. A family joins by adding both entries."""
    from vidtune.data.families import FAMILIES
    from vidtune.train.demo.tiny_model import TINY_MODELS

    return [name for name in FAMILIES if name in TINY_MODELS]


FAMILY_NAMES = families_with_tiny_models()
# The families whose multi-second training runs (kill/resume, the CLI commands, QLoRA, 2-process ZeRO-3) CI runs.
# qwen3_omni_moe's data path is qwen2_5_omni's, and its own parts (LoRA on fused experts, the router, the FLOPs)
# have their tests in tests/test_qwen3_omni_moe.py; its runs passed (kill/resume 33 s, commands 30 s, QLoRA 32 s
# on 2 loaded cores) and run with VIDTUNE_EVERY_FAMILY=1.
RUN_FAMILIES = [
    name for name in FAMILY_NAMES if name != "qwen3_omni_moe" or os.environ.get("VIDTUNE_EVERY_FAMILY") == "1"
]


@dataclass
class FamilyKit:
    """One family's tiny model as the tests use it, built and loaded once per session."""

    name: str
    family: Any  # its ModelFamily
    model_dir: Path
    processor: Any
    builder: Any  # an ExampleBuilder
    model: Any  # the loaded model, in eval mode (tests that train it put it back)


@pytest.fixture(scope="session")
def family_kits(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], FamilyKit]:
    """`family_kits(name)`: that family's tiny model folder, processor, example builder and model, built on first
    use and shared by the whole session."""
    from vidtune.data.examples import ExampleBuilder
    from vidtune.data.families import family_for
    from vidtune.train.demo.tiny_model import build_tiny_model
    from vidtune.train.training.model import load_processor, model_class

    kits: dict[str, FamilyKit] = {}

    def kit(name: str) -> FamilyKit:
        if name not in kits:
            family = family_for(name)
            model_dir = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{name}"), family=name)
            processor = load_processor(str(model_dir), family)
            model = model_class(family).from_pretrained(model_dir).eval()
            family.prepare_model(model)
            kits[name] = FamilyKit(name, family, model_dir, processor, ExampleBuilder(processor, family), model)
        return kits[name]

    return kit


@pytest.fixture(scope="session", params=FAMILY_NAMES)
def family_kit(request: pytest.FixtureRequest, family_kits: Callable[[str], FamilyKit]) -> FamilyKit:
    """Parametrises a test over every family with a tiny model."""
    return family_kits(request.param)


@pytest.fixture(scope="session")
def tiny_model_dir(family_kits: Callable[[str], FamilyKit]) -> Path:
    return family_kits("llava_next_video").model_dir


@pytest.fixture(scope="session")
def processor(family_kits: Callable[[str], FamilyKit]):
    return family_kits("llava_next_video").processor


@pytest.fixture(scope="session")
def builder(family_kits: Callable[[str], FamilyKit]):
    return family_kits("llava_next_video").builder


@pytest.fixture(scope="session")
def tiny_model(family_kits: Callable[[str], FamilyKit]):
    return family_kits("llava_next_video").model


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real MP4 clips encoded with PyAV: two segments at 8 fps (16 frames) and three segments (24 frames)."""
    from vidtune.train.demo.clips import write_color_clip

    root = tmp_path_factory.mktemp("clips")
    return {
        "red_blue": write_color_clip(root / "red_blue.mp4", ["red", "blue"]),
        "green_yellow": write_color_clip(root / "green_yellow.mp4", ["green", "yellow"], seed=1),
        "three": write_color_clip(root / "three.mp4", ["red", "green", "blue"], seed=2),
    }


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vidtune.train.demo.corpus import write_demo_corpus

    return write_demo_corpus(tmp_path_factory.mktemp("demo-corpus"), num_train=24, num_eval=8)


@pytest.fixture(scope="session")
def mixed_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """openai-style rows mixing clips of 1-3 seconds (2, 4 or 6 frames at 2 fps; 64x48 px, the 3-second ones
    112x56), images of different sizes and text-only chats."""
    import json

    import numpy as np
    from PIL import Image

    from vidtune.train.demo.clips import write_color_clip

    root = tmp_path_factory.mktemp("mixed")
    colors = ["red", "green", "blue", "yellow"]
    rows = []
    for i in range(24):
        kind = ("video", "video", "image", "text")[i % 4]
        segments = [colors[(i + k) % 4] for k in range(1 + i % 3)]
        answer = " then ".join(segments)
        if kind == "video":
            size = {"height": 56, "width": 112} if len(segments) == 3 else {}  # sizes differ too (Qwen: tokens)
            write_color_clip(root / f"clip{i}.mp4", segments, seed=i, **size)
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": "<video>Describe this video."},
                        {"role": "assistant", "content": answer},
                    ],
                    "videos": [f"clip{i}.mp4"],
                }
            )
        elif kind == "image":
            pixels = np.full((40 + 8 * (i % 3), 56, 3), 60 * (i % 4), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"image{i}.png")
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": "<image>What color is it?"},
                        {"role": "assistant", "content": colors[i % 4]},
                    ],
                    "images": [f"image{i}.png"],
                }
            )
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Say {colors[i % 4]}."},
                        {"role": "assistant", "content": colors[i % 4]},
                    ]
                }
            )
    (root / "mixed.json").write_text(json.dumps(rows))
    return root / "mixed.json"


@pytest.fixture(scope="session")
def broken_media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file per fault, generated here: missing, 0-byte, truncated, not a video, too short, zero frame duration,
    too large, plus a corpus (broken.jsonl) naming them next to good rows and malformed ones."""
    import json
    import struct

    from vidtune.train.demo.clips import write_color_clip

    root = tmp_path_factory.mktemp("broken")
    good = [write_color_clip(root / f"good{i}.mp4", ["red", "blue"], seed=i) for i in range(4)]
    (root / "empty.mp4").write_bytes(b"")
    whole = good[0].read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) * 2 // 5])
    (root / "notes.mp4").write_text("these are meeting notes, not a video\n" * 40)
    write_color_clip(root / "short.mp4", ["red"], seconds_per_segment=0.25)  # 2 frames
    write_color_clip(root / "huge.mp4", ["red"], seconds_per_segment=0.25, height=736, width=1296)
    zero = bytearray(whole)  # every sample duration 0 in the MP4's time-to-sample table: a zero frame rate
    stts = zero.find(b"stts")
    for entry in range(struct.unpack(">I", zero[stts + 8 : stts + 12])[0]):
        struct.pack_into(">I", zero, stts + 16 + 8 * entry, 0)
    (root / "zerofps.mp4").write_bytes(bytes(zero))
    files = {
        name: root / f"{name}.mp4" for name in ("missing", "empty", "truncated", "notes", "short", "huge", "zerofps")
    }
    rows = [{"video": f"good{i}.mp4", "question": "Which color comes first?", "answer": "red"} for i in range(4)]
    rows += [{"video": path.name, "question": "Which color comes first?", "answer": "red"} for path in files.values()]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, '{"video": "good1.mp4", "question": "unterminated')  # not JSON
    lines.insert(5, json.dumps({"video": "good2.mp4", "question": "Q"}))  # no answer
    (root / "broken.jsonl").write_text("\n".join(lines) + "\n")
    return {**files, "corpus": root / "broken.jsonl", "good": good[0]}


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """The README's main command, once per session: the demo's folder (corpus, runs) and its accuracy report."""
    from vidtune.train.demo.stages import run_demo

    root = tmp_path_factory.mktemp("demo") / "demo"
    return root, run_demo(root)


# Tiny models whose 4-frame questions need more than 64 tokens: Gemma 4's processors give every frame at least ~64
# tokens (max_soft_tokens >= 70), plus its `mm:ss <|image>`...`<image|>` text.
TINY_MAX_LENGTH = {"gemma4": 320}


def tiny_run_overrides(model: Path, corpus: Path, output: Path, *extra: str) -> list[str]:
    """A short LoRA run of the tiny model on the demo's questions: what training tests start from (later
    `key=value` items win)."""
    import json

    model_type = json.loads((Path(model) / "config.json").read_text()).get("model_type", "")
    return [
        f"model.name_or_path={model}",
        f"data.sources=[{{path: {corpus / 'questions_train.jsonl'}}}]",
        "data.sampling.num_frames=4",
        f"data.max_length={TINY_MAX_LENGTH.get(model_type, 64)}",
        "data.num_workers=0",
        f"train.output_dir={output}",
        "train.max_steps=6",
        "train.batch_size=4",
        "train.learning_rate=1e-2",
        "train.warmup_ratio=0",
        "train.log_every_steps=1",
        "finetune.lora.dropout=0",
        "logging.report_to=none",
        *extra,
    ]


# A short LoRA run that checkpoints mid-way, with dropout on and gradient accumulation: 4 steps of 2 micro-batches
# of 2 samples, a checkpoint every 2 steps (what the kill -9 / resume test cuts and relaunches), over 12 samples:
# 3 steps an epoch, so a resume from step 2 finishes epoch 0 and crosses into epoch 1 (its own order).
RESUMABLE_RUN = (
    "train.max_steps=4",
    "train.save_every_steps=2",
    "train.grad_accum_steps=2",
    "train.batch_size=2",
    "finetune.lora.dropout=0.1",
    "data.num_workers=1",
)


def resumable_run(corpus: Path) -> tuple[str, ...]:
    """RESUMABLE_RUN on 12 of the demo's questions (3 optimizer steps an epoch)."""
    return (*RESUMABLE_RUN, f"data.sources=[{{path: {corpus / 'questions_train.jsonl'}, num_samples: 12}}]")


@pytest.fixture(scope="session")
def family_runs(
    family_kits: Callable[[str], FamilyKit], demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """`family_runs(name)`: the output folder of that family's finished RESUMABLE_RUN on the demo questions, trained
    once per session (in this process) on first use. The uninterrupted reference of the kill/resume test, and the
    adapter the inference, command and export tests use."""
    from vidtune.train.training.config import load_recipe
    from vidtune.train.training.loop import train

    runs: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in runs:
            output = tmp_path_factory.mktemp(f"run-{name}") / "run"
            overrides = tiny_run_overrides(
                family_kits(name).model_dir, demo_corpus, output, *resumable_run(demo_corpus)
            )
            train(load_recipe(None, overrides))
            runs[name] = output
        return runs[name]

    return run
