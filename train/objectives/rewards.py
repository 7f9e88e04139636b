"""Verifiable rewards for GRPO, by name (`train.grpo.rewards`): each maps (completion, row) -> a float, where row
holds the reference `answer`, the `question` the prompt asked and where the row is (`at`). Built-in ones score
exactly as `vidtune eval` scores; `module:function` names a user's function of the same shape.

Reasoning recipes (Video-R1, VideoChat-R1) ask for `<think>...</think><answer>...</answer>`: `format` rewards that
shape, and the answer rewards (`exact`, `choice`, `temporal_iou`) score only what the `<answer>` tags hold when a
completion has them, so the thinking never counts as the answer."""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from vidtune.train.evaluation.metrics import exact_match, parse_option
from vidtune.train.evaluation.tasks import OPTION_LINE

Reward = Callable[[str, dict[str, Any]], float]

THINK_ANSWER = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
ANSWER_TAGS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# "from 2.5 to 7 seconds", "2.5 - 7s", "between 2.5 and 7 sec": the first two numbers that form a span.
SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*(?:s|sec|secs|seconds)?\s*(?:-|–|to|and|until)\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def answer_part(completion: str) -> str:
    """What the last `<answer>...</answer>` holds, or the whole completion when it has no such tags."""
    tagged = ANSWER_TAGS.findall(completion)
    return tagged[-1].strip() if tagged else completion


def exact_reward(completion: str, row: dict[str, Any]) -> float:
    """1 when the completion equals the reference answer after normalisation (case, punctuation, articles)."""
    return exact_match(answer_part(completion), [answer_part(row["answer"])])


def format_reward(completion: str, row: dict[str, Any]) -> float:
    """1 when the whole completion is `<think>...</think>` followed by `<answer>...</answer>` (and nothing else)."""
    return float(THINK_ANSWER.fullmatch(completion) is not None)


def parse_span(text: str) -> tuple[float, float] | None:
    """The (start, end) seconds a text names ("from X to Y seconds"), or None when it names no forward span."""
    found = SPAN.search(text)
    if found is None:
        return None
    start, end = float(found.group(1)), float(found.group(2))
    return (start, end) if end > start else None


def temporal_iou_reward(completion: str, row: dict[str, Any]) -> float:
    """Temporal grounding: the intersection over union of the span the completion names with the reference
    answer's span ("from X to Y seconds"); 0 when the completion names no span. A reference without a span is a
    bad row (it raises, which the bad-sample budget counts)."""
    truth = parse_span(answer_part(row["answer"]))
    if truth is None:
        raise ValueError(f"reference answer {row['answer'][:60]!r} names no span (from X to Y seconds)")
    guess = parse_span(answer_part(completion))
    if guess is None:
        return 0.0
    overlap = max(0.0, min(guess[1], truth[1]) - max(guess[0], truth[0]))
    union = max(guess[1], truth[1]) - min(guess[0], truth[0])
    return overlap / union


def choice_reward(completion: str, row: dict[str, Any]) -> float:
    """1 when the completion picks the reference's option: the letter or option text parsed as the
    multiple_choice eval parses it, options read from the question's "A. ..." lines."""
    options = [text for _, text in OPTION_LINE.findall(row["question"])]
    truth = parse_option(answer_part(row["answer"]), options)
    return float(truth is not None and parse_option(answer_part(completion), options) == truth)


REWARDS: dict[str, Reward] = {
    "exact": exact_reward,
    "choice": choice_reward,
    "format": format_reward,
    "temporal_iou": temporal_iou_reward,
}


def resolve(name: str) -> Reward:
    """A built-in reward by name, or a user's function `module:function` (completion, row) -> float."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}: built-in rewards are {', '.join(REWARDS)}, or give module:function")
    module_name, _, attribute = name.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward {name!r} cannot be loaded: {err}") from None
    if not callable(function):
        raise ValueError(f"reward {name!r} is not a function")
    return function


def score(
    completions: Sequence[str], rows: Sequence[dict[str, Any]], names: Sequence[str], weights: Sequence[float]
) -> tuple[list[float], list[str], dict[str, list[float]]]:
    """Weighted reward per completion (NaN where a reward raised or was not finite), the reasons for those, and
    each reward's values (for logging)."""
    totals, problems = [], []
    per_reward: dict[str, list[float]] = {name: [] for name in names}
    functions = {name: resolve(name) for name in names}
    for completion, row in zip(completions, rows, strict=True):
        total = 0.0
        for name, weight in zip(names, weights, strict=True):
            try:
                value = float(functions[name](completion, row))
            except Exception as err:  # a user's reward function may fail on any input: a bad sample, not a crash
                value = math.nan
                problems.append(f"{row.get('at', '?')}: reward {name} raised {type(err).__name__}: {err}")
            else:
                if not math.isfinite(value):
                    problems.append(f"{row.get('at', '?')}: reward {name} returned {value} for {completion[:40]!r}")
                    value = math.nan
            per_reward[name].append(value)
            total += weight * value
        totals.append(total)
    return totals, problems, per_reward
