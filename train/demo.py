"""`vidtune demo`: the whole product on a laptop CPU, in a few minutes.

1. Generate short clips of two coloured segments, encoded as real MP4, with captions, order questions and chats.
2. Build a tiny random LLaVA-NeXT-Video folder (the same from_pretrained road a 7B checkpoint takes).
3. Train through the packaged recipes, exactly as a user would run them:
   base (full fine-tuning on captions) -> instruct (LoRA on "which color comes first/last?") -> chat (the adapter
   keeps training on two-turn chats).
4. After each stage, score held-out clips; finish with one answer about a held-out video.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from vidtune.data.conversation import Message, assistant_texts, message, text_part
from vidtune.data.sources import SourceConfig, iter_conversations
from vidtune.train.config import load_recipe, packaged_recipe
from vidtune.train.demo_corpus import FIRST_QUESTION, FOLLOW_UP, write_demo_corpus
from vidtune.train.infer import InferenceModel, generate, load_for_inference, video_question
from vidtune.train.tiny_model import build_tiny_model

STAGES = ("base", "instruct", "chat")


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def _rows(path: Path) -> list[dict[str, Any]]:
    return list(iter_conversations(SourceConfig(path=str(path))))


def _accuracy(predictions: list[str], references: list[str]) -> float:
    hits = sum(normalise(p) == normalise(r) for p, r in zip(predictions, references, strict=True))
    return hits / max(1, len(references))


def _first_word_accuracy(predictions: list[str], references: list[str]) -> float:
    """Whether the answer opens with the right colour, whatever follows ("red then blue" answers "first?" right):
    a format-free view of whether the model knows the order (chance is 50%: both colours are in the clip)."""
    hits = sum((normalise(p).split() or [""])[0] == normalise(r) for p, r in zip(predictions, references, strict=True))
    return hits / max(1, len(references))


def caption_accuracy(im: InferenceModel, corpus: Path) -> float:
    rows = _rows(corpus / "captions_eval.jsonl")
    predictions = generate(im, [r["messages"][:-1] for r in rows], max_new_tokens=8)
    return _accuracy(predictions, [assistant_texts(r["messages"])[-1] for r in rows])


def question_accuracy(im: InferenceModel, corpus: Path) -> tuple[float, float]:
    """(exact match, opens with the right colour) on the held-out first/last questions."""
    rows = _rows(corpus / "questions_eval.jsonl")
    predictions = generate(im, [r["messages"][:-1] for r in rows], max_new_tokens=8)
    references = [assistant_texts(r["messages"])[-1] for r in rows]
    return _accuracy(predictions, references), _first_word_accuracy(predictions, references)


def second_turn_accuracy(im: InferenceModel, corpus: Path) -> float:
    """Turn 1 asks for the first colour; the model's own answer stays in the history; turn 2 asks for the last."""
    rows = _rows(corpus / "chats_eval.json")
    first_turns = [r["messages"][:1] for r in rows]
    first_answers = generate(im, first_turns, max_new_tokens=8)
    histories: list[list[Message]] = [
        [*turn, message("assistant", [text_part(reply)]), message("user", [text_part(FOLLOW_UP)])]
        for turn, reply in zip(first_turns, first_answers, strict=True)
    ]
    predictions = generate(im, histories, max_new_tokens=8)
    return _accuracy(predictions, [assistant_texts(r["messages"])[-1] for r in rows])


def show_one_chat(im: InferenceModel, video: Path, corpus: Path) -> None:
    """Two turns about a held-out clip with the chat model, next to the truth."""
    truth = json.loads((corpus / "chats_eval.json").read_text())[0]["conversations"]
    history = video_question(str(video), FIRST_QUESTION)
    print(f"\n== a chat about a held-out clip ({video})")
    for question, reference in ((FIRST_QUESTION, truth[1]["value"]), (FOLLOW_UP, truth[3]["value"])):
        if history[-1]["role"] == "assistant":
            history.append(message("user", [text_part(question)]))
        reply = generate(im, [history], max_new_tokens=8)[0]
        history.append(message("assistant", [text_part(reply)]))
        print(f"  user:  {question}\n  model: {reply}    (truth: {reference})")


def run_stage(name: str) -> Path:
    from vidtune.train.loop import train

    started = time.perf_counter()
    output = train(load_recipe(packaged_recipe(f"demo/{name}")))
    print(f"== stage {name}: trained in {time.perf_counter() - started:.0f}s -> {output}")
    return output


def run_demo(workdir: str | Path = "vidtune-demo") -> dict[str, float]:
    root = Path(workdir).resolve()
    os.environ["VIDTUNE_DEMO_DIR"] = str(root)  # the packaged demo recipes resolve their paths under it
    corpus, model_dir = root / "corpus", root / "tiny-model"
    if not (corpus / "chats_eval.json").is_file():
        write_demo_corpus(corpus)
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir)
    print(f"== demo in {root}: corpus {corpus}, tiny model {model_dir}")
    report: dict[str, float] = {}

    base = load_for_inference(str(run_stage("base")))
    report["base: caption exact match"] = caption_accuracy(base, corpus)
    exact, first_word = question_accuracy(base, corpus)
    report["base: order question exact match (before instruct)"] = exact
    report["base: order question, right colour first (chance 50%)"] = first_word
    instruct = load_for_inference(str(run_stage("instruct")))
    exact, first_word = question_accuracy(instruct, corpus)
    report["instruct: order question exact match"] = exact
    report["instruct: order question, right colour first"] = first_word
    chat = load_for_inference(str(run_stage("chat")))
    report["chat: second-turn exact match"] = second_turn_accuracy(chat, corpus)

    print("\n== held-out accuracy")
    for key, value in report.items():
        print(f"  {key:<56} {100 * value:5.1f}%")
    show_one_chat(chat, corpus / "videos" / "eval_0000.mp4", corpus)
    (root / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
