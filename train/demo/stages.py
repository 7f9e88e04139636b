"""`vidtune demo`: the whole product on a laptop CPU, in a few minutes.

1. Generate short clips of two coloured segments, encoded as real MP4, with captions, order questions and chats.
2. Build a tiny random model folder of the chosen family (LLaVA-NeXT-Video by default; the same from_pretrained road
   a 7B checkpoint takes). Nothing here is family-specific: the recipes find the family in the model's config.
3. Train through the packaged recipes, exactly as a user would run them:
   base (full fine-tuning on captions) -> instruct (LoRA on "which color comes first/last?") -> chat (the adapter
   keeps training on two-turn chats).
4. After each stage, score held-out clips; finish with one answer about a held-out video.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from vidtune.data.conversation import Message, assistant_texts, message, text_part
from vidtune.data.families import family_for
from vidtune.data.sources import SourceConfig, iter_conversations
from vidtune.train.demo.corpus import (
    FIRST_QUESTION,
    FOLLOW_UP,
    TONE_QUESTION,
    TONE_WORDS,
    write_demo_corpus,
    write_tone_corpus,
)
from vidtune.train.demo.tiny_model import DEFAULT_FAMILY, build_tiny_model
from vidtune.train.evaluation.metrics import exact_match, normalize_answer
from vidtune.train.evaluation.tasks import evaluate_items, load_items
from vidtune.train.generation.infer import InferenceModel, generate, load_for_inference, video_question
from vidtune.train.training.config import EvalConfig, RecipeError, load_recipe, packaged_recipe
from vidtune.train.training.model import load_model_config
from vidtune.train.training.tracking import LOSS_PLOT, read_metrics

STAGES = ("base", "instruct", "chat")  # the default pipeline
ALL_STAGES = (*STAGES, "dpo", "grpo")  # dpo / grpo: the order question learned from pairs / rewards, after base


QA = EvalConfig(task="qa", max_new_tokens=8)
# "Which color comes first/last?" needs two hops inside the language model (read the question word, then attend to
# the early or the late frames). With 2 layers LoRA sat on the "either colour" plateau for 350 steps in 2 of 4
# seeds; with 4 (still ~0.4M parameters) and captions mixed into the instruct stage, every seed tried escaped it by
# step ~200.
DEMO_TEXT_LAYERS = 4


def exact_match_on(im: InferenceModel, path: Path) -> tuple[float, list[dict]]:
    """Exact match (vidtune eval's qa task) of the model's answers on a held-out file, and the scored records."""
    metrics, records = evaluate_items(im, load_items([SourceConfig(path=str(path))], QA), QA)
    return metrics["exact_match"], records


def right_colour_first(records: list[dict]) -> float:
    """Whether the answer opens with the right colour, whatever follows ("red then blue" answers "first?" right):
    a format-free view of whether the model knows the order (chance is 50%: both colours are in the clip)."""
    hits = [
        (normalize_answer(r["prediction"]).split() or [""])[0] == normalize_answer(r["references"][0]) for r in records
    ]
    return sum(hits) / max(1, len(hits))


def second_turn_accuracy(im: InferenceModel, corpus: Path) -> float:
    """Turn 1 asks for the first colour; the model's own answer stays in the history; turn 2 asks for the last."""
    rows = list(iter_conversations(SourceConfig(path=str(corpus / "chats_eval.json"))))
    first_turns = [r["messages"][:1] for r in rows]
    first_answers = generate(im, first_turns, max_new_tokens=8)
    histories: list[list[Message]] = [
        [*turn, message("assistant", [text_part(reply)]), message("user", [text_part(FOLLOW_UP)])]
        for turn, reply in zip(first_turns, first_answers, strict=True)
    ]
    predictions = generate(im, histories, max_new_tokens=8)
    truths = [assistant_texts(r["messages"])[-1] for r in rows]
    return sum(exact_match(p, [t]) for p, t in zip(predictions, truths, strict=True)) / max(1, len(rows))


def show_one_chat(im: InferenceModel, video: Path, corpus: Path) -> list[str]:
    """Two turns about a held-out clip with the chat model, next to the truth (printed, and returned)."""
    truth = json.loads((corpus / "chats_eval.json").read_text())[0]["conversations"]
    history = video_question(str(video), FIRST_QUESTION)
    lines = [f"== a chat about a held-out clip ({video})"]
    for question, reference in ((FIRST_QUESTION, truth[1]["value"]), (FOLLOW_UP, truth[3]["value"])):
        if history[-1]["role"] == "assistant":
            history.append(message("user", [text_part(question)]))
        reply = generate(im, [history], max_new_tokens=8)[0]
        history.append(message("assistant", [text_part(reply)]))
        lines += [f"  user:  {question}", f"  model: {reply}    (truth: {reference})"]
    print("\n" + "\n".join(lines))
    return lines


def run_stage(name: str, overrides: tuple[str, ...] = ()) -> Path:
    from vidtune.train.training.loop import train
    from vidtune.train.training.outputs import finished_message

    recipe = load_recipe(packaged_recipe(f"demo/{name}"), overrides)
    if finished_message(recipe) is not None:  # a second `vidtune demo`: no stale speeds, no "trained in 0s"
        output = Path(recipe.train.output_dir)
        print(f"== stage {name}: reused the run finished before in {output} (delete that folder to train it again)")
        return output
    started = time.perf_counter()
    output = train(recipe)
    seconds = time.perf_counter() - started
    figures = [m for m in read_metrics(output) if "train/samples_per_s" in m]
    if figures:
        fed = figures[-1]
        print(
            f"== stage {name}: {fed['train/samples_per_s']:.0f} samples/s, the main process waited for batches "
            f"{fed.get('train/data_wait_fraction', 0):.0%} of the time"
        )
    print(f"== stage {name}: trained in {seconds:.0f}s -> {output}")
    return output


def default_workdir(family: str) -> str:
    return "vidtune-demo" if family == DEFAULT_FAMILY else f"vidtune-demo-{family}"


def ensure_tiny_model(
    model_dir: Path, family: str, text_layers: int | None = DEMO_TEXT_LAYERS, extra_words: str = ""
) -> None:
    """Build the family's tiny model once; a folder left by another family's demo is an error, not a silent reuse."""
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir, text_layers=text_layers, family=family, extra_words=extra_words)
        return
    found = load_model_config(str(model_dir)).model_type
    # a family may cover several model types (Qwen2.5-Omni's tiny folder is a qwen2_5_omni_thinker)
    if found != family and found not in family_for(family).model_types:
        raise RecipeError(f"{model_dir} holds a {found} model, not {family}: choose another --workdir")


# Families whose tiny model's demo samples are longer than the demo recipes' max_length (64-160 tokens): Gemma 4's
# processors give each frame at least ~64 tokens (max_soft_tokens >= 70), plus its `mm:ss <|image>...<image|>` text,
# so its 4-frame questions are ~300 tokens and its two-turn chats longer.
DEMO_MAX_LENGTH = {"gemma4": 448}


def family_overrides(family: str) -> tuple[str, ...]:
    """What every demo stage of `family` needs beyond the packaged demo recipes (before the user's overrides)."""
    return (f"data.max_length={DEMO_MAX_LENGTH[family]}",) if family in DEMO_MAX_LENGTH else ()


def parse_stages(text: str) -> tuple[str, ...]:
    """`base,dpo` -> the stages, each after the one it starts from (instruct, dpo, grpo: base; chat: instruct)."""
    stages = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in stages if name not in ALL_STAGES]
    if unknown or not stages:
        raise RecipeError(f"--stages {text!r}: choose from {', '.join(ALL_STAGES)} (comma-separated)")
    for name in stages:
        needed = "instruct" if name == "chat" else "base" if name != "base" else None
        if needed and needed not in stages[: stages.index(name)]:
            raise RecipeError(f"--stages {text!r}: the {name} stage starts from {needed}: list {needed} before it")
    return stages


def run_demo(
    workdir: str | Path | None = None,
    family: str = DEFAULT_FAMILY,
    overrides: tuple[str, ...] = (),
    stages: tuple[str, ...] = STAGES,
    audio: bool = False,
) -> dict[str, float]:
    """The stages (recipes demo/<stage>, each with `overrides`; base, instruct, chat by default) and their
    held-out accuracy, written to demo_report.json; `audio`: then the sound proof (run_sound_proof)."""
    if audio and not family_for(family).hears:
        raise RecipeError(f"--audio: {family} does not hear sound (families that do: {', '.join(HEARING_FAMILIES)})")
    root = Path(workdir or default_workdir(family)).resolve()
    os.environ["VIDTUNE_DEMO_DIR"] = str(root)  # the packaged demo recipes resolve their paths under it
    overrides = (*family_overrides(family), *overrides)
    corpus, model_dir = root / "corpus", root / "tiny-model"
    report: dict[str, float] = {}
    if stages:
        ensure_tiny_model(model_dir, family)
        if not (corpus / "after_eval.jsonl").is_file():  # the corpus' newest file: an older demo's is rewritten
            write_demo_corpus(corpus)
        print(f"== demo in {root}: corpus {corpus}, tiny {family} model {model_dir}")
    for stage in stages:
        started = time.perf_counter()
        output = run_stage(stage, overrides)
        scored = dict(report)
        STAGE_SCORES[stage](output, corpus, report)
        stage_scores = {k: v for k, v in report.items() if k not in scored}
        print(stage_summary(stage, stage_scores, output))
        record_scores(output, stage_scores)
        report[f"{stage}: stage seconds (training and scoring)"] = round(time.perf_counter() - started, 1)
    if audio:
        run_sound_proof(root, family, overrides, report)

    print("\n== held-out accuracy")
    for key, value in report.items():
        shown = f"{value:7.1f}s" if "seconds" in key else f"{100 * value:5.1f}%"
        print(f"  {key:<56} {shown}")
    if "chat" in stages:
        chat = load_for_inference(str(root / "runs" / "chat"))
        transcript = show_one_chat(chat, corpus / "videos" / "eval_0000.mp4", corpus)
        (root / "demo_chat.txt").write_text("\n".join(transcript) + "\n", encoding="utf-8")
    root.mkdir(parents=True, exist_ok=True)
    (root / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if stages:
        print(next_steps(root, stages))
    return report


# the families with a tiny model that hear (a test keeps this in step)
HEARING_FAMILIES = ("qwen2_5_omni", "gemma4", "qwen3_omni_moe")
SOUND_RUNS = {  # report label -> (run folder, overrides): the same recipe heard, then on pictures alone
    "instruct": ("tone", ()),
    "instruct (data.audio=off)": ("tone-silent", ("data.audio=off",)),
}


# What a family's sound proof needs beyond recipe demo/tone (before the user's overrides). Gemma 4 at the recipe's
# learning rate 1e-2 collapsed to one answer for every clip (its logits no longer moved with sound or pictures:
# held-out 50%, heard or not); at 1e-3 for 300 steps it heard the tone (held-out 100%, eval loss 0.03).
TONE_OVERRIDES = {"gemma4": ("train.learning_rate=1.0e-3", "train.max_steps=300")}


def run_sound_proof(root: Path, family: str, overrides: tuple[str, ...], report: dict[str, float]) -> None:
    """The sound proof, "Is the tone high or low?", on clip twins with identical pictures (recipe demo/tone):
    trained hearing the sound, then again with data.audio=off; both scored on held-out twins (chance: 50%)."""
    overrides = (*TONE_OVERRIDES.get(family, ()), *overrides)
    corpus, model_dir = root / "corpus", root / "tiny-model-sound"
    ensure_tiny_model(model_dir, family, text_layers=None, extra_words=TONE_WORDS)
    if not (corpus / "tones_eval.jsonl").is_file():
        write_tone_corpus(corpus)
    print(f"== sound proof in {root}: {TONE_QUESTION!r}, tiny {family} model {model_dir}")
    for label, (folder, extra) in SOUND_RUNS.items():
        started = time.perf_counter()
        output = run_stage("tone", (*overrides, *extra, f"train.output_dir={root / 'runs' / folder}"))
        exact, _ = exact_match_on(load_for_inference(str(output)), corpus / "tones_eval.jsonl")
        scores = {f"{label}: tone exact match": exact}
        print(stage_summary(label, scores, output))
        record_scores(output, scores)
        report.update(scores)
        report[f"{label}: tone seconds (training and scoring)"] = round(time.perf_counter() - started, 1)


def stage_summary(stage: str, scores: dict[str, float], output: Path) -> str:
    """What a stage learned, printed when it ends (held-out accuracy), and where its loss curves are."""
    lines = [f"== stage {stage}: held-out scores"]
    lines += [f"  {key.split(': ', 1)[-1]:<52} {100 * value:5.1f}%" for key, value in scores.items()]
    if (output / LOSS_PLOT).is_file():
        lines.append(f"  loss curves: {output / LOSS_PLOT}")
    return "\n".join(lines)


def record_scores(output: Path, scores: dict[str, float]) -> None:
    """The demo's held-out scores into the run's vidtune.json and model card (`eval/demo/...`), beside what the
    run measured itself: an export of the demo's runs shows them."""
    from vidtune.train.training.outputs import add_final_metrics, read_metadata

    metadata = read_metadata(output)
    if metadata is None:
        return
    named = {"eval/demo/" + key.split(": ", 1)[-1]: value for key, value in scores.items()}
    add_final_metrics(output, {**(metadata.get("metrics") or {}), **named})


def next_steps(root: Path, stages: tuple[str, ...]) -> str:
    """The commands to try next on the last run the demo trained (the chat run by default)."""
    run = root / "runs" / stages[-1]
    clip = root / "corpus" / "videos" / "eval_0000.mp4"
    return (
        f"\n== next, on the demo's {stages[-1]} run:\n"
        f"  vidtune infer {run} --video {clip} --prompt 'Which color comes first?'\n"
        f"  vidtune chat {run} --video {clip}\n"
        f"  vidtune serve {run}\n"
        f"  vidtune export {run} --to {root / 'export'}"
    )


def score_base(output: Path, corpus: Path, report: dict[str, float]) -> None:
    base = load_for_inference(str(output))
    report["base: caption exact match"], _ = exact_match_on(base, corpus / "captions_eval.jsonl")
    exact, records = exact_match_on(base, corpus / "questions_eval.jsonl")
    report["base: order question exact match (before instruct)"] = exact
    report["base: order question, right colour first (chance 50%)"] = right_colour_first(records)


def score_order_question(stage: str) -> Callable[[Path, Path, dict[str, float]], None]:
    """instruct (SFT), dpo (pairs) and grpo (rewards) all end with the order question, scored alike."""

    def score(output: Path, corpus: Path, report: dict[str, float]) -> None:
        model = load_for_inference(str(output))
        exact, records = exact_match_on(model, corpus / "questions_eval.jsonl")
        report[f"{stage}: order question exact match"] = exact
        report[f"{stage}: order question, right colour first"] = right_colour_first(records)
        if stage == "instruct":
            kept, _ = exact_match_on(model, corpus / "captions_eval.jsonl")
            report["instruct: caption exact match (captions mixed in)"] = kept

    return score


def score_chat(output: Path, corpus: Path, report: dict[str, float]) -> None:
    report["chat: second-turn exact match"] = second_turn_accuracy(load_for_inference(str(output)), corpus)


STAGE_SCORES: dict[str, Callable[[Path, Path, dict[str, float]], None]] = {
    "base": score_base,
    "instruct": score_order_question("instruct"),
    "chat": score_chat,
    "dpo": score_order_question("dpo"),
    "grpo": score_order_question("grpo"),
}
