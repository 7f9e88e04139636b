"""`vidtune eval --benchmark mvbench|videomme|nextqa`: public benchmarks in their published layouts, asked and
scored their own way, with accuracy overall and by task / category.

Each preset fixes what lmms-eval's task of the same name fixes (prompt text, answer parsing, 16 new tokens, greedy)
and reads the files as the benchmark ships them:

- mvbench: `json/<task>.json` lists of {video, question, candidates, answer (the option's text), start?, end?};
  videos under the task's own folder of `video/` (star/Charades_segment, clevrer/video_validation, ...). Accuracy
  by task (the file's name).
- videomme: the `videomme/test-*.parquet` rows {videoID, duration, domain, sub_category, task_type, question,
  options ["A. ...", ...], answer "B"}; videos `data/{videoID}.mp4`. Accuracy by duration, domain and task type.
- nextqa: the multiple-choice CSVs {video, question, answer (0-based), type, a0..a4}; videos `{video}.mp4`.
  Accuracy by question type (CW, CH, TN, TC, DC, DL, DO) and group (causal, temporal, descriptive).

Where vidtune differs from lmms-eval, and why, is in the README ("Benchmarks").
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vidtune.data.conversation import DataError, media_part, message, text_part
from vidtune.data.formats import OPTION_LETTERS, RowContext, answer_index, clip_bounds, option_texts, row_options
from vidtune.data.quality import BadSampleConfig, BadSampleLog
from vidtune.data.sources import (
    FILE_LOADERS,
    SourceConfig,
    iter_raw_rows,
    make_media_resolver,
    media_root_for,
    row_fields,
    source_name,
)
from vidtune.train.evaluation.tasks import EvalItem
from vidtune.train.generation.predict import answer_record

# MVBench keeps each task's videos in the folder of the dataset it came from (its own evaluation code's table).
MVBENCH_FOLDERS = {
    "object_interaction": "star/Charades_segment",
    "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment",
    "action_localization": "sta/sta_video_segment",
    "moving_count": "clevrer/video_validation",
    "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos",
    "object_shuffle": "perception/videos",
    "egocentric_navigation": "vlnqa",
    "moving_direction": "clevrer/video_validation",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "scene_transition": "scene_qa/video",
    "state_change": "perception/videos",
    "moving_attribute": "clevrer/video_validation",
    "action_antonym": "ssv2_video_mp4",
    "unexpected_action": "FunQA_test/test",
    "counterfactual_inference": "clevrer/video_validation",
    "object_existence": "clevrer/video_validation",
    "action_count": "perception/videos",
}
NEXTQA_GROUPS = {"C": "causal", "T": "temporal", "D": "descriptive"}


# ------------------------------------------------------------------------------------------------- prompts


def mvbench_prompt(question: str, options: Sequence[str]) -> str:
    lines = "".join(f"({OPTION_LETTERS[i]}) {option}\n" for i, option in enumerate(options))
    return f"Question:{question}\nOption:\n{lines}Answer with the option's letter from the given choices directly."


def videomme_prompt(question: str, options: Sequence[str]) -> str:
    letters = [OPTION_LETTERS[i] for i in range(len(options))]
    choices = "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options, strict=True))
    return (
        "Select the best answer to the following multiple-choice question based on the video. Respond with only "
        f"the letter ({', '.join(letters[:-1])}, or {letters[-1]}) of the correct option.\n"
        f"{question}\n{choices}\nThe best answer is:"
    )


def nextqa_prompt(question: str, options: Sequence[str]) -> str:
    return "\n".join([question.strip(), *(f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(options))])


# ------------------------------------------------------------------------------------------- answer parsing
# Each follows its lmms-eval task's parser, quirks included, so scores compare; None = no option named (wrong).


def _letter_index(letter: str, options: Sequence[str]) -> int | None:
    index = OPTION_LETTERS.find(letter.upper())
    return index if 0 <= index < len(options) else None


def parse_mvbench(prediction: str, options: Sequence[str]) -> int | None:
    """ "B. text" -> B; else the first standalone option letter once punctuation is gone, in any case (so an
    article "a" reads as A, as in lmms-eval's mcq_acc)."""
    letters = OPTION_LETTERS[: len(options)]
    lead = re.match(rf"^([{letters}])\.\s*(.+)$", prediction.strip(), re.IGNORECASE | re.DOTALL)
    if lead:
        return _letter_index(lead.group(1), options)
    text = re.sub(r"[^\w\s]", " ", prediction)
    found = re.search(rf"\b([{letters}])\b", text, re.IGNORECASE)
    return _letter_index(found.group(1), options) if found else None


VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer")


def parse_videomme(prediction: str, options: Sequence[str]) -> int | None:
    """The first capital option letter anywhere once answer prefixes are gone; a long answer without one is none."""
    text = prediction.strip()
    for prefix in VIDEOMME_PREFIXES:
        text = text.replace(prefix, "")
    letters = OPTION_LETTERS[: len(options)]
    found = re.search(f"[{letters}]", text)
    return _letter_index(found.group(0), options) if found else None


def parse_nextqa(prediction: str, options: Sequence[str]) -> int | None:
    """MMMU's parser: "(B)", then "B " , then "B.", then (answers over 5 words) an option's text; several -> the
    last one. lmms-eval guesses at random when none is found; here that answer is wrong (reproducible)."""
    response = f" {prediction.strip(',.!?;:' + chr(39))} "
    letters = OPTION_LETTERS[: len(options)]
    for pattern in ("({})", "{} ", "{}."):
        hits = [(response.rfind(pattern.format(c)), i) for i, c in enumerate(letters) if pattern.format(c) in response]
        if hits:
            return max(hits)[1]
    if len(response.split()) > 5:
        lowered = response.lower()
        hits = [(lowered.rfind(o.lower()), i) for i, o in enumerate(options) if o and o.lower() in lowered]
        if hits:
            return max(hits)[1]
    return None


# ---------------------------------------------------------------------------------------------- categories


def mvbench_categories(row: dict[str, Any], stem: str) -> dict[str, str]:
    return {"task": stem}


def videomme_categories(row: dict[str, Any], stem: str) -> dict[str, str]:
    return {key: str(row[key]) for key in ("duration", "domain", "task_type") if row.get(key) is not None}


def nextqa_categories(row: dict[str, Any], stem: str) -> dict[str, str]:
    if row.get("type") is None:
        return {}
    kind = "TN" if row["type"] == "TP" else str(row["type"])  # lmms-eval folds TP into TN
    return {"type": kind, "group": NEXTQA_GROUPS.get(kind[:1], kind)}


@dataclass(frozen=True)
class Benchmark:
    name: str
    num_frames: int  # frames per video unless --num-frames says otherwise
    prompt: Callable[[str, Sequence[str]], str]
    parse: Callable[[str, Sequence[str]], int | None]
    categories: Callable[[dict[str, Any], str], dict[str, str]]
    media_template: str | None = None  # how a row names its video file, when not by a `video` path
    max_new_tokens: int = 16
    folders: dict[str, str] = field(default_factory=dict)  # task (file stem) -> its videos' folder under media_root


BENCHMARKS = {
    "mvbench": Benchmark("mvbench", 16, mvbench_prompt, parse_mvbench, mvbench_categories, folders=MVBENCH_FOLDERS),
    "videomme": Benchmark("videomme", 32, videomme_prompt, parse_videomme, videomme_categories, "{videoID}.mp4"),
    "nextqa": Benchmark("nextqa", 32, nextqa_prompt, parse_nextqa, nextqa_categories, "{video}.mp4"),
}


# ---------------------------------------------------------------------------------------------------- items


def benchmark_sources(
    bench: Benchmark, data: str, media_root: str | None, media_template: str | None = None
) -> list[SourceConfig]:
    """One source per annotation file (`data` is a file, or a folder of them: MVBench's json/ holds one per task)."""
    path = Path(data)
    files = sorted(p for p in path.iterdir() if p.suffix in FILE_LOADERS) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{data}: no annotation files ({', '.join(FILE_LOADERS)}) in the folder")
    sources = []
    for file in files:
        root = Path(media_root) if media_root else file.parent
        folder = bench.folders.get(file.stem)
        if folder and (root / folder).is_dir():
            root = root / folder
        sources.append(
            SourceConfig(path=str(file), media_root=str(root), media_template=media_template or bench.media_template)
        )
    return sources


def benchmark_item(bench: Benchmark, row: dict[str, Any], source: SourceConfig, at: str) -> EvalItem:
    """The benchmark's own question for one row; a row the benchmark cannot mean one way raises DataError."""
    ctx = RowContext(at, make_media_resolver(media_root_for(source), at))
    missing = [key for key in ("video", "question", "answer") if row.get(key) is None]
    if missing:
        raise DataError(f"{at}: missing column(s) {missing}; the row has {sorted(row)}")
    options = row_options(row, ctx)
    texts = option_texts(options, at)
    truth = answer_index(row["answer"], options, at)
    video = ctx.resolve_media(str(row["video"]))
    if Path(video).is_dir():  # MVBench's episodic_reasoning ships TVQA frames (3 fps JPEGs), not a video file
        raise DataError(f"{at}: {video} is a folder of frames; vidtune reads video files (encode the frames first)")
    if not Path(video).is_file():
        raise DataError(f"{at}: video not found: {video}")
    prompt = [
        message(
            "user",
            [media_part("video", video, *clip_bounds(row, ctx)), text_part(bench.prompt(str(row["question"]), texts))],
        )
    ]
    categories = bench.categories(row, Path(source.path).stem)
    return EvalItem(at, prompt, [OPTION_LETTERS[truth]], options=texts, video=video, categories=categories)


def load_benchmark(bench: Benchmark, sources: Sequence[SourceConfig]) -> tuple[list[EvalItem], BadSampleLog]:
    """Items of every source; bad rows (ambiguous answers, missing videos, ...) are skipped with their reason and
    counted against the bad-sample budget, so a wrong media root fails loudly instead of scoring a subset."""
    bad = BadSampleLog(BadSampleConfig())  # the training default: at most 5% of the rows bad
    items = []
    for source in sources:
        for at, _, raw in iter_raw_rows(source):
            try:
                items.append(benchmark_item(bench, row_fields(raw, source, at), source, at))
                bad.good()
            except DataError as err:
                bad.add(at, str(err).removeprefix(f"{at}: "))
    bad.check(f"{bench.name} ({', '.join(source_name(s) for s in sources)})")
    if not items:
        raise DataError(f"{bench.name}: no rows to score")
    return items, bad


# -------------------------------------------------------------------------------------------------- scoring


def score_benchmark(
    bench: Benchmark, items: Sequence[EvalItem], predictions: Sequence[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy overall and by each category the benchmark has; one record per item."""
    records = []
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for item, prediction in zip(items, predictions, strict=True):
        choice = bench.parse(prediction, item.options)
        truth = OPTION_LETTERS.index(item.references[0])
        correct = choice == truth
        records.append(
            {
                **answer_record(item.at, item.prompt, prediction, item.references),
                "choice": choice,
                "answer": truth,
                "correct": correct,
                **item.categories,
            }
        )
        for key, value in item.categories.items():
            groups[key][value].append(correct)
    metrics: dict[str, Any] = {
        "benchmark": bench.name,
        "num_samples": len(records),
        "accuracy": sum(r["correct"] for r in records) / max(1, len(records)),
        "unparsed": sum(r["choice"] is None for r in records),
    }
    for key, values in groups.items():
        metrics[f"by_{key}"] = {
            value: {"num_samples": len(hits), "accuracy": sum(hits) / len(hits)}
            for value, hits in sorted(values.items())
        }
    return metrics, records


def accuracy_table(metrics: dict[str, Any]) -> str:
    """The accuracy table printed by `vidtune eval --benchmark`: overall, then one block per category kind."""
    lines = [
        f"{'':<10} {'':<34} {'n':>6} {'accuracy':>9}",
        f"{'all':<10} {'':<34} {metrics['num_samples']:>6} {metrics['accuracy']:>9.1%}",
    ]
    for key, by_value in metrics.items():
        if key.startswith("by_"):
            for value, result in by_value.items():
                lines.append(f"{key[3:]:<10} {value[:34]:<34} {result['num_samples']:>6} {result['accuracy']:>9.1%}")
    return "\n".join(lines)
