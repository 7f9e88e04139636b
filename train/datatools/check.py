"""`vidtune check RECIPE`: a preflight before any GPU time.

Reads every row of every source, opens every video and sound file (its frame index and header; `--decode` also
decodes the frames training would sample, the sound of their span for videos the run hears (data.audio), and every
sound file), and reports: unreadable
media and malformed rows by name and reason, the token-length distribution with video (and heard audio) tokens
included, the samples max_length would drop and the answer tokens that loses, and label-token counts. Prints a
table, writes JSON, and fails (exit 1) when the bad samples exceed the recipe's budget (data.bad_samples).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from vidtune.data.conversation import DataError
from vidtune.data.dataset import audio_rate_for, cached_measurer, heard_sources, load_media
from vidtune.data.examples import ExampleBuilder
from vidtune.data.families import family_for
from vidtune.data.quality import BadSampleLog
from vidtune.data.sources import iter_conversations
from vidtune.data.video import Clip
from vidtune.train.training.config import Recipe
from vidtune.train.training.model import load_model_config, load_processor


def distribution(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values)
    return {
        "min": int(array.min()),
        "median": float(np.median(array)),
        "p95": float(np.percentile(array, 95)),
        "max": int(array.max()),
        "mean": float(array.mean()),
    }


def measure_all(
    recipe: Recipe,
    builder: ExampleBuilder,
    bad: BadSampleLog,
    decode: bool,
    backends: dict[str, str] | None = None,
    by_source: dict[str, BadSampleLog] | None = None,
) -> list[dict[str, Any]]:
    """Every readable row with its counts; bad rows and media go to `bad` (all of them, never stopping early) and
    to their source's log in `by_source`; with `decode`, `backends` records the decoder that served each video."""
    data = recipe.data
    rows = (  # every row once: the mix's weights and sample counts do not matter here
        (source.path, row)
        for source in [*data.sources, *data.eval_sources]
        for row in iter_conversations(source, data.caption_prompts, recipe.train.seed, True, data.max_row_bytes)
    )
    # The on-disk measuring cache `train` reads (same key): a check, then a train, measures each row once.
    measurer, measured = cached_measurer(builder, data), []
    heard = heard_sources(data, builder.family) if builder.audio_rate else set()  # sounds decoded with --decode
    for source_path, row in rows:
        logs = [bad] if by_source is None else [bad, by_source.setdefault(source_path, BadSampleLog(bad.cfg))]
        counts, decoded = measurer(row), list[tuple[str, Clip]]()
        problem = counts["problem"]
        if not problem and decode and not counts["drop_reason"]:
            try:
                load_media(
                    row["messages"],
                    data.sampling,
                    False,
                    None,
                    data.bad_samples.decode_timeout_s,
                    builder.frame_px,
                    record=decoded,
                    max_frame_pixels=data.bad_samples.max_frame_pixels,
                    audio_rate=builder.audio_rate if row.get("source") in heard else None,
                    sound_rate=builder.sound_rate,
                )
                if backends is not None:
                    backends.update((path, clip.backend) for path, clip in decoded)
            except DataError as err:
                problem = str(err)
        if problem:
            for log in logs:
                log.add(row["at"], problem)
            continue
        for log in logs:
            log.good()
        measured.append({**row, **counts, "source": source_path})
    return measured


def over_budget(bad: BadSampleLog, by_source: dict[str, BadSampleLog]) -> str | None:
    """The whole corpus's budget, then each source's: a small source that is mostly broken (a wrong media_root, a
    mangled export) must not hide inside a large good one."""
    if bad.over_budget() or len(by_source) < 2:
        return bad.over_budget()
    return next((f"{path}: {log.over_budget()}" for path, log in by_source.items() if log.over_budget()), None)


def sequence_parallel_report(tokens: list[int], size: int, gpu_tokens: int | None) -> dict[str, Any]:
    """Tokens each GPU holds at train.sequence_parallel `size` (a sample's tokens / size, rounded up), and with
    `gpu_tokens` (the most tokens of one sample a GPU trains, from --dry-run or a measured run): how many samples need
    sequence parallelism, the smallest degree that fits every one, and how many still exceed it at `size`."""
    report: dict[str, Any] = {"size": size, "tokens_per_gpu": distribution([-(-t // size) for t in tokens])}
    if gpu_tokens:
        report["gpu_tokens"] = gpu_tokens
        report["samples_needing_it"] = sum(t > gpu_tokens for t in tokens)
        report["degree_for_all"] = max((-(-t // gpu_tokens) for t in tokens), default=1)
        report["samples_over_at_size"] = sum(-(-t // size) > gpu_tokens for t in tokens)
    return report


def objective_report(recipe: Recipe, measured: list[dict[str, Any]]) -> dict[str, Any]:
    """What a dpo or grpo recipe needs of its training rows: DPO, pairs (a rejected answer beside the chosen one);
    GRPO, its rewards (resolved as training resolves them) and prompts short enough to leave room for
    max_new_tokens within max_length (a prompt counts its tokens without the reference answer's)."""
    objective = recipe.train.objective
    training = {source.path for source in recipe.data.sources}
    rows = [m for m in measured if m["source"] in training]
    if objective == "dpo":
        missing = [m["at"] for m in rows if not m.get("rejected")]
        return {"objective": "dpo", "pairs": len(rows) - len(missing), "rows_without_rejected": missing}
    if objective == "grpo":
        from vidtune.train.objectives.rewards import REWARDS, resolve

        settings = recipe.train.grpo
        prompts = [(m["at"], m["num_tokens"] - m["num_label_tokens"]) for m in rows]
        room = recipe.data.max_length - settings.max_new_tokens
        return {
            "objective": "grpo",
            "rewards": {
                name: "built-in" if name in REWARDS else f"{resolve(name).__module__}.{resolve(name).__qualname__}"
                for name in settings.rewards
            },
            "prompts": len(prompts),
            "prompt_tokens": distribution([tokens for _, tokens in prompts]),
            "max_new_tokens": settings.max_new_tokens,
            "prompts_without_room": [{"where": at, "tokens": tokens} for at, tokens in prompts if tokens > room],
            "max_length_for_all": max((t for _, t in prompts), default=0) + settings.max_new_tokens,
        }
    return {"objective": objective}


def objective_problem(report: dict[str, Any]) -> str | None:
    """Training would refuse a dpo corpus whose rows are not all pairs: the check fails on it too."""
    missing = report.get("rows_without_rejected")
    if missing:
        return f"{len(missing)} training rows have no rejected answer (train.objective=dpo needs pairs), {missing[0]}"
    return None


def build_report(
    recipe: Recipe,
    measured: list[dict[str, Any]],
    bad: BadSampleLog,
    backends: dict[str, str] | None = None,
    by_source: dict[str, BadSampleLog] | None = None,
    gpu_tokens: int | None = None,
) -> dict[str, Any]:
    too_long = [m for m in measured if "exceed max_length" in m["drop_reason"]]
    no_labels = [m for m in measured if m["drop_reason"] and m not in too_long]
    all_labels = sum(m["num_label_tokens"] for m in measured)
    lost = sum(m["num_label_tokens"] for m in too_long)
    usable = len(measured) - len(too_long) - len(no_labels)
    # A budget is a fraction of the rows read; a corpus with nothing to train on fails whatever the fractions say.
    by_source = by_source or {}
    objective = objective_report(recipe, measured)
    over = (
        over_budget(bad, by_source)
        or (None if usable else f"none of the {bad.total:,} rows is usable")
        or objective_problem(objective)
    )
    return {
        "sources": [s.path for s in [*recipe.data.sources, *recipe.data.eval_sources]],
        "rows": bad.total,
        "usable": usable,
        "bad": [{"where": where, "reason": reason} for where, reason in bad.bad],
        "bad_by_kind": dict(bad.kinds),
        "bad_by_source": {path: {"rows": log.total, "bad": len(log.bad)} for path, log in by_source.items()},
        "tokens": distribution([m["num_tokens"] for m in measured]),
        "video_image_tokens": distribution([m["num_media_tokens"] for m in measured]),
        "label_tokens": {"total": all_labels, **distribution([m["num_label_tokens"] for m in measured])},
        "max_length": recipe.data.max_length,
        "sequence_parallel": sequence_parallel_report(
            [m["num_tokens"] for m in measured if m not in too_long and m not in no_labels],
            recipe.train.sequence_parallel,
            gpu_tokens,
        ),
        "dropped_for_length": [{"where": m["at"], "tokens": m["num_tokens"]} for m in too_long],
        "answer_tokens_lost_to_length": lost,
        "answer_tokens_lost_fraction": lost / all_labels if all_labels else 0.0,
        "dropped_without_labels": [m["at"] for m in no_labels],
        "decoded_by": backends or {},  # --decode: video path -> the backend that served it
        "objective": objective,
        "budget": {
            "max_bad_fraction": recipe.data.bad_samples.max_bad_fraction,
            "max_bad_in_a_row": recipe.data.bad_samples.max_bad_in_a_row,
            "exceeded": over,
        },
    }


def format_report(report: dict[str, Any], source: str) -> str:
    def dist(d: dict[str, float]) -> str:
        return "  ".join(f"{k} {v:,.0f}" for k, v in d.items() if k != "mean") if d else "-"

    lines = [
        f"vidtune check: {source}",
        f"  rows            {report['rows']:,} read, {report['usable']:,} usable, {len(report['bad']):,} bad, "
        f"{len(report['dropped_for_length']):,} too long for max_length {report['max_length']:,}",
    ]
    if report["bad"]:
        kinds = ", ".join(f"{n} {kind}" for kind, n in report["bad_by_kind"].items())
        lines.append(f"  bad samples     {kinds}")
        if len(report["bad_by_source"]) > 1:
            lines += [
                f"    {path}: {n['bad']:,} of {n['rows']:,} rows bad"
                for path, n in report["bad_by_source"].items()
                if n["bad"]
            ]
        lines += [f"    {item['where']}: {item['reason']}" for item in report["bad"]]
    lines += [
        f"  tokens/sample   {dist(report['tokens'])}   (video, image and sound tokens included)",
        f"  video/image     {dist(report['video_image_tokens'])}",
        f"  answer tokens   total {report['label_tokens'].get('total', 0):,}   "
        f"{dist({k: v for k, v in report['label_tokens'].items() if k != 'total'})}",
    ]
    lines += format_sequence_parallel(report["sequence_parallel"])
    if report["dropped_for_length"]:
        lines.append(
            f"  length drops    {len(report['dropped_for_length'])} samples lose "
            f"{report['answer_tokens_lost_to_length']:,} answer tokens "
            f"({report['answer_tokens_lost_fraction']:.1%} of all); raise data.max_length or sample fewer "
            "frames to keep them"
        )
    lines += format_objective(report.get("objective", {}), report["max_length"])
    if report.get("decoded_by"):
        counts = Counter(report["decoded_by"].values())
        lines.append("  decoded by      " + ", ".join(f"{name} {n:,} videos" for name, n in counts.most_common()))
    exceeded = report["budget"]["exceeded"]
    lines.append(f"  verdict         {'FAIL: ' + exceeded if exceeded else 'OK: within the bad-sample budget'}")
    return "\n".join(lines)


def format_objective(report: dict[str, Any], max_length: int) -> list[str]:
    if report.get("objective") == "dpo":
        missing = len(report["rows_without_rejected"])
        return [f"  dpo pairs       {report['pairs']:,} (chosen + rejected), {missing:,} training rows without a pair"]
    if report.get("objective") != "grpo":
        return []
    rewards = ", ".join(f"{name} ({where})" for name, where in report["rewards"].items())
    dist = "  ".join(f"{k} {v:,.0f}" for k, v in report["prompt_tokens"].items() if k != "mean") or "-"
    lines = [f"  grpo rewards    {rewards}", f"  grpo prompts    {report['prompts']:,}: tokens {dist}"]
    short = report["prompts_without_room"]
    if short:
        lines.append(
            f"  no room         {len(short):,} prompts leave fewer than max_new_tokens={report['max_new_tokens']} "
            f"tokens within max_length {max_length:,} (first: {short[0]['where']}); "
            f"data.max_length={report['max_length_for_all']} fits every prompt and its completion"
        )
    return lines


def format_sequence_parallel(report: dict[str, Any]) -> list[str]:
    dist = "  ".join(f"{k} {v:,.0f}" for k, v in report["tokens_per_gpu"].items() if k != "mean") or "-"
    lines = [f"  tokens/GPU      {dist}   (train.sequence_parallel={report['size']})"]
    if "gpu_tokens" in report:
        lines.append(
            f"  need SP         {report['samples_needing_it']:,} samples exceed --gpu-tokens {report['gpu_tokens']:,}; "
            f"train.sequence_parallel={report['degree_for_all']} fits every one "
            f"({report['samples_over_at_size']:,} still exceed it at {report['size']})"
        )
    return lines


def run_check(
    recipe: Recipe, source: str, out: str | Path, decode: bool = False, gpu_tokens: int | None = None
) -> tuple[dict[str, Any], bool]:
    """The report (also printed and written to `out`) and whether the corpus is within its budget."""
    model = recipe.model
    family = family_for(load_model_config(model.name_or_path, model.trust_remote_code).model_type)
    processor = load_processor(model.name_or_path, family, model.trust_remote_code, model.frame_limits)
    # heard videos count their sound's tokens, as training does
    audio_rate = audio_rate_for(recipe.data, family, processor)
    builder = ExampleBuilder(processor, family, recipe.data.label_turns, audio_rate=audio_rate)
    # Collect every problem: the budget decides the verdict, not the first bad file.
    bad = BadSampleLog(dataclasses.replace(recipe.data.bad_samples, policy="skip"))
    backends: dict[str, str] = {}
    by_source: dict[str, BadSampleLog] = {}
    measured = measure_all(recipe, builder, bad, decode, backends, by_source)
    report = build_report(recipe, measured, bad, backends, by_source, gpu_tokens)
    print(format_report(report, source))
    Path(out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"  report          {out}")
    return report, report["budget"]["exceeded"] is None
