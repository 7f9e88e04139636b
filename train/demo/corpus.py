"""The demo's corpus: short generated clips of coloured segments ("red then blue"), encoded as real MP4, with
captions (base variant), order questions (instruct) and two-turn chats (chat), in the formats users bring.

    videos/train_0000.mp4 ...      held-out clips are different renders (noise, bar) of the same colour pairs
    captions_train.jsonl           {"video", "caption"}                         caption format ("red then blue")
    after_train.jsonl              {"video", "caption"}: the same order told last colour first ("blue after
                                   red"); the base mixes them in, so that sampling from it names either colour first
                                   and a reward on the order question has right answers to score
    questions_train.jsonl          {"video", "question", "answer"}              qa format
    chats_train.json               {"video", "conversations": [{from, value}]} llava format
    preferences_train.jsonl        {"video", "prompt", "chosen", "rejected"}  preference format (DPO): chosen =
                                   the true colour, rejected = the other one (the colours swapped)
    (and the same three for eval)

The sound proof's corpus (`vidtune demo --audio`, families that hear), beside it:

    videos/tone_train_0000.mp4 ... clips in twins with identical pictures (the same frames, encoded alike), one
                                   with a low tone (250-450 Hz), one with a high one (1.8-3 kHz): only the sound
                                   tells them apart; held-out clips have pictures and pitches of their own
    tones_train.jsonl              {"video", "question": TONE_QUESTION, "answer": "low" | "high"}  qa format
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from vidtune.train.demo.clips import write_color_clip, write_tone_clip

DEMO_COLORS = ("red", "green", "blue", "yellow")
FIRST_QUESTION = "Which color comes first?"
LAST_QUESTION = "Which color comes last?"
FOLLOW_UP = "And which color comes last?"
TONE_QUESTION = "Is the tone high or low?"
TONE_WORDS = "tone high low Is"  # whole tokens in the sound proof's tiny vocabulary
TONE_HZ = {"low": (250.0, 450.0), "high": (1800.0, 3000.0)}


def color_pairs() -> list[tuple[str, str]]:
    return list(itertools.permutations(DEMO_COLORS, 2))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_split(root: Path, split: str, num_videos: int, seed: int) -> dict[str, Path]:
    rng = random.Random(seed)
    pairs = color_pairs()
    captions, after, questions, chats, preferences = [], [], [], [], []
    for index in range(num_videos):
        first, last = pairs[index % len(pairs)] if split == "train" else rng.choice(pairs)
        name = f"videos/{split}_{index:04d}.mp4"
        write_color_clip(root / name, [first, last], seconds_per_segment=1.0, fps=8, seed=seed * 100_000 + index)
        captions.append({"video": name, "caption": f"{first} then {last}"})
        after.append({"video": name, "caption": f"{last} after {first}"})
        questions.append({"video": name, "question": FIRST_QUESTION, "answer": first})
        questions.append({"video": name, "question": LAST_QUESTION, "answer": last})
        preferences.append({"video": name, "prompt": FIRST_QUESTION, "chosen": first, "rejected": last})
        preferences.append({"video": name, "prompt": LAST_QUESTION, "chosen": last, "rejected": first})
        chats.append(
            {
                "video": name,
                "conversations": [
                    {"from": "human", "value": f"<video>\n{FIRST_QUESTION}"},
                    {"from": "gpt", "value": first},
                    {"from": "human", "value": FOLLOW_UP},
                    {"from": "gpt", "value": last},
                ],
            }
        )
    files = {
        "captions": root / f"captions_{split}.jsonl",
        "after": root / f"after_{split}.jsonl",
        "questions": root / f"questions_{split}.jsonl",
        "chats": root / f"chats_{split}.json",
        "preferences": root / f"preferences_{split}.jsonl",
    }
    _write_jsonl(files["captions"], captions)
    _write_jsonl(files["after"], after)
    _write_jsonl(files["questions"], questions)
    _write_jsonl(files["preferences"], preferences)
    files["chats"].write_text(json.dumps(chats, indent=1), encoding="utf-8")
    return files


def write_demo_corpus(root: str | Path, num_train: int = 96, num_eval: int = 32, seed: int = 0) -> Path:
    root = Path(root)
    write_split(root, "train", num_train, seed + 1)
    write_split(root, "eval", num_eval, seed + 2)
    return root


def write_tone_split(root: Path, split: str, num_twins: int, seed: int) -> Path:
    """`num_twins` pairs of clips with identical pictures, one low-toned, one high (pitches spread over each range);
    their questions, in order."""
    rng = random.Random(seed)
    pairs = color_pairs()
    rows = []
    for twin in range(num_twins):
        colors = list(rng.choice(pairs))
        for slot, (tone, (low_hz, high_hz)) in enumerate(TONE_HZ.items()):
            # one pitch per equal slice of the range: the edges are covered, not left to chance (a high tone at
            # 1,880 Hz, below every high one a random draw had trained on, was heard as low)
            hz = low_hz + (twin + rng.random()) / num_twins * (high_hz - low_hz)
            name = f"videos/tone_{split}_{2 * twin + slot:04d}.mp4"
            write_tone_clip(root / name, colors, [hz, hz], seconds_per_segment=1.0, seed=seed * 100_000 + twin)
            rows.append({"video": name, "question": TONE_QUESTION, "answer": tone})
    path = root / f"tones_{split}.jsonl"
    _write_jsonl(path, rows)
    return path


def write_tone_corpus(root: str | Path, num_train: int = 32, num_eval: int = 16, seed: int = 0) -> Path:
    root = Path(root)
    write_tone_split(root, "train", num_train // 2, seed + 3)
    write_tone_split(root, "eval", num_eval // 2, seed + 4)
    return root
