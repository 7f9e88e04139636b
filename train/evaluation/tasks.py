"""Scored answers: `vidtune eval` and the generation-based eval that runs every N steps of training.

Tasks: qa (normalised exact match, token F1), multiple_choice (accuracy from the answered letter, or from the
model's log-likelihood of each option), caption (BLEU-4, ROUGE-L, CIDEr over every reference of a clip), and
recognition (the model names one of the recipe's class descriptions: accuracy and a confusion matrix).
Frames are sampled deterministically (segment centres); generation is greedy and batched with left padding.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vidtune.data.collator import Collator
from vidtune.data.conversation import DataError, Message, assistant_texts, media_parts, message, text_part
from vidtune.data.dataset import load_media
from vidtune.data.examples import IGNORE_INDEX, with_time_instructions
from vidtune.data.sources import SourceConfig, iter_conversations
from vidtune.train.evaluation.metrics import (
    caption_metric_warning,
    caption_scores,
    classify,
    confusion_matrix,
    exact_match,
    normalize_answer,
    parse_option,
    token_f1,
)
from vidtune.train.generation.infer import InferenceModel, generate
from vidtune.train.generation.predict import answer_record
from vidtune.train.training.config import EvalConfig

OPTION_LINE = re.compile(r"^([A-Z])\. (.+)$", re.MULTILINE)


@dataclass
class EvalItem:
    at: str
    prompt: list[Message]  # the conversation up to the answer
    references: list[str]
    options: list[str] = field(default_factory=list)  # multiple choice
    video: str | None = None
    categories: dict[str, str] = field(default_factory=dict)  # benchmarks: task, duration, question type, ...

    @property
    def question(self) -> str:
        last = self.prompt[-1]["content"] if self.prompt else []
        return " ".join(p["text"] or "" for p in last if p["type"] == "text")


# ------------------------------------------------------------------------------------------------------ items


def _item(row: dict[str, Any], task: str, cfg: EvalConfig) -> EvalItem:
    messages = row["messages"]
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{row['at']}: no reference answer (the row does not end with an assistant turn)")
    prompt, reference = messages[:-1], assistant_texts(messages)[-1]
    videos = [p["path"] for p in media_parts(prompt) if p["type"] == "video"]
    item = EvalItem(row["at"], prompt, [reference], video=videos[0] if videos else None)
    if task == "multiple_choice":
        item.options = [text for _, text in OPTION_LINE.findall(item.question)]
        if not item.options:
            raise DataError(f"{row['at']}: not a multiple-choice row (no 'A. ...' option lines)")
    if task == "recognition" and cfg.prompt:
        media = [p for p in prompt[-1]["content"] if p["type"] != "text"]
        question = cfg.prompt.format(classes="; ".join(cfg.classes))
        item.prompt = [*prompt[:-1], message("user", [*media, text_part(question)])]
    return item


def load_items(sources: Sequence[SourceConfig], cfg: EvalConfig, limit: int | None = None) -> list[EvalItem]:
    """Evaluation items; for captioning, one per clip with all of its reference captions."""
    items: list[EvalItem] = []
    by_clip: dict[tuple, EvalItem] = {}
    for source in sources:
        for row in iter_conversations(source):
            item = _item(row, cfg.task, cfg)
            if cfg.task == "caption":
                clip = tuple((p["path"], p["start_s"], p["end_s"]) for p in media_parts(item.prompt))
                if clip in by_clip:
                    by_clip[clip].references += item.references
                    continue
                by_clip[clip] = item
            items.append(item)
            if limit and len(items) >= limit and cfg.task != "caption":
                return items
    return items[:limit] if limit else items


# ---------------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def option_logliks(im: InferenceModel, item: EvalItem, candidates: Sequence[str], before: Any = None) -> list[float]:
    """log p(candidate answer + end of turn | prompt) for each candidate, summed over its tokens."""
    media, instructions = load_media(
        item.prompt,
        im.sampling,
        im.time_instruction,
        rng=None,
        shortest_edge=im.builder.frame_px,
        audio_rate=im.builder.audio_rate,
        sound_rate=im.builder.sound_rate,
    )
    prompt = with_time_instructions(item.prompt, instructions)
    examples = [im.builder.build([*prompt, message("assistant", [text_part(c)])], media) for c in candidates]
    batch = Collator(im.processor.tokenizer.pad_token_id, family=im.family)(examples)
    batch = im.family.visuals_to_device(batch, im.device, im.model.dtype)
    labels = batch.pop("labels")[:, 1:]
    if before is not None:
        before(batch)
    logits = im.model(**batch).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logprobs * (labels != IGNORE_INDEX)).sum(-1).tolist()


def predict(im: InferenceModel, items: Sequence[EvalItem], cfg: EvalConfig, batch_size: int = 8, **kw: Any):
    """Generated answers, batched (left padding)."""
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        answers += generate(im, [i.prompt for i in batch], cfg.max_new_tokens, **kw)
    return answers


def score(
    items: Sequence[EvalItem], predictions: Sequence[str], cfg: EvalConfig, choices: Sequence[int | None] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and one record per item (prediction, reference, correct)."""
    records: list[dict[str, Any]] = [
        answer_record(i.at, i.prompt, p, i.references) for i, p in zip(items, predictions, strict=True)
    ]
    metrics: dict[str, Any] = {"num_samples": len(items)}
    if cfg.task == "qa":
        for record, item in zip(records, items, strict=True):
            record["exact_match"] = exact_match(record["prediction"], item.references)
            record["f1"] = token_f1(record["prediction"], item.references)
        metrics["exact_match"] = sum(r["exact_match"] for r in records) / max(1, len(records))
        metrics["f1"] = sum(r["f1"] for r in records) / max(1, len(records))
    elif cfg.task == "multiple_choice":
        picked = (
            list(choices)
            if choices is not None
            else [parse_option(p, i.options) for p, i in zip(predictions, items, strict=True)]
        )
        for record, item, pick in zip(records, items, picked, strict=True):
            truth = parse_option(item.references[0], item.options)
            record.update({"choice": pick, "answer": truth, "correct": pick is not None and pick == truth})
        metrics["accuracy"] = sum(r["correct"] for r in records) / max(1, len(records))
        metrics["unparsed"] = sum(r["choice"] is None for r in records)
    elif cfg.task == "caption":
        metrics.update(caption_scores(predictions, [i.references for i in items]))
        if warning := caption_metric_warning([i.references for i in items]):
            print(f"warning: {warning}", file=sys.stderr)
    else:
        metrics.update(recognition_metrics(items, predictions, cfg, records))
    return metrics, records


def recognition_metrics(
    items: Sequence[EvalItem], predictions: Sequence[str], cfg: EvalConfig, records: list[dict[str, Any]]
) -> dict[str, Any]:
    classes = list(cfg.classes) or sorted({normalize_answer(i.references[0]) for i in items})
    truth = [classify(i.references[0], classes) for i in items]
    if any(t is None for t in truth):
        missing = sorted({i.references[0] for i, t in zip(items, truth, strict=True) if t is None})
        raise DataError(f"reference labels {missing[:5]} are not among the classes {classes[:10]}")
    picked = [classify(p, classes) for p in predictions]
    for record, t, p in zip(records, truth, picked, strict=True):
        record.update(
            {
                "class": classes[t] if t is not None else None,
                "predicted_class": classes[p] if p is not None else None,
                "correct": p == t,
            }
        )
    return {
        "accuracy": sum(r["correct"] for r in records) / max(1, len(records)),
        "classes": classes,
        "confusion_matrix": confusion_matrix([t for t in truth if t is not None], picked, len(classes)),
    }


def evaluate_items(
    im: InferenceModel, items: Sequence[EvalItem], cfg: EvalConfig, batch_size: int = 8, before: Any = None, **kw: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if cfg.task == "multiple_choice" and cfg.mc_scoring == "loglik":
        choices = []
        for item in items:
            logliks = option_logliks(im, item, [chr(ord("A") + k) for k in range(len(item.options))], before)
            choices.append(max(range(len(logliks)), key=logliks.__getitem__))
        predictions = [chr(ord("A") + c) for c in choices]
        return score(items, predictions, cfg, choices)
    return score(items, predict(im, items, cfg, batch_size, before=before, **kw), cfg)


# ----------------------------------------------------------------------------------------------------- output


def save_confusion_png(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = metrics["classes"]
    matrix = metrics["confusion_matrix"]
    figure, axes = plt.subplots(figsize=(2 + 0.6 * len(classes), 1.5 + 0.5 * len(classes)))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(classes) + 1), [*classes, "(none)"], rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for row, counts in enumerate(matrix):
        for column, count in enumerate(counts):
            axes.text(column, row, str(count), ha="center", va="center")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_outputs(out: str | Path, metrics: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    with (folder / "predictions.jsonl").open("w", encoding="utf-8") as sink:
        for record in records:
            sink.write(json.dumps(record) + "\n")
    if "confusion_matrix" in metrics:
        save_confusion_png(metrics, folder / "confusion.png")
    return folder


# -------------------------------------------------------------------------------------------------- in training


def training_items(recipe: Any) -> list[EvalItem]:
    """The held-out rows scored during training (eval.sources, else data.eval_sources), at most max_samples."""
    cfg = recipe.eval
    return load_items(cfg.sources or recipe.data.eval_sources, cfg, limit=cfg.max_samples) if cfg.every_steps else []


def in_training_eval(
    accelerator: Any,
    im: InferenceModel,
    items: Sequence[EvalItem],
    cfg: EvalConfig,
    batch_size: int,
    step: int,
    wandb_table: bool = False,
    before: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> dict[str, Any]:
    """Score generated answers with the model being trained: rows split across ranks (ZeRO-3 generation keeps every
    rank stepping until all finish), results gathered on the main process, which logs them. {} elsewhere.
    Every rank calls this; `before` sees each batch first (ZeRO-3 ranks align their vision calls there)."""
    from accelerate.utils import gather_object

    from vidtune.train.training.distributed import weights_sharded

    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = -(-len(items) // world)
    indices = list(range(rank, len(items), world))
    indices += [indices[-1] if indices else 0] * (per_rank - len(indices))  # equal shares: same forward count
    im.model.eval()
    # (ZeRO-3, FSDP: every generation step gathers weights, so ranks whose answers end early keep stepping)
    kwargs = {"synced_gpus": True} if weights_sharded(accelerator) else {}
    shard = [items[i] for i in indices]
    _, records = evaluate_items(im, shard, cfg, batch_size, before=before, **kwargs)
    im.model.train()
    answered = {index: record["prediction"] for index, record in zip(indices, records, strict=True)}
    merged = {k: v for part in gather_object([answered]) for k, v in part.items()}
    if not accelerator.is_main_process:
        return {}
    metrics, records = score(items, [merged[i] for i in range(len(items))], cfg)
    log_samples(items, records, cfg.table_rows)
    if wandb_table:
        accelerator.log({"eval/samples": samples_table(items, records, cfg.table_rows)}, step=step)
    return {f"eval/{cfg.task}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}


def log_samples(items: Sequence[EvalItem], records: Sequence[dict[str, Any]], rows: int) -> None:
    """A few samples on the console: question, prediction, reference."""
    from tqdm.auto import tqdm

    for item, record in list(zip(items, records, strict=True))[: min(rows, 3)]:
        tqdm.write(
            f"  eval sample {item.at}: {item.question[:60]!r} -> {record['prediction']!r} "
            f"(reference {record['references'][0]!r})"
        )


def samples_table(items: Sequence[EvalItem], records: Sequence[dict[str, Any]], rows: int) -> Any:
    """A wandb table of the first `rows` samples: middle frame, question, prediction, reference."""
    import wandb

    from vidtune.data.video import SamplingConfig, load_clip

    data = []
    for item, record in list(zip(items, records, strict=True))[:rows]:
        frame = load_clip(item.video, SamplingConfig(1)).frames[0] if item.video else None
        data.append(
            [
                wandb.Image(frame) if frame is not None else None,
                item.question,
                record["prediction"],
                " | ".join(record["references"]),
            ]
        )
    return wandb.Table(columns=["frame", "question", "prediction", "reference"], data=data)
