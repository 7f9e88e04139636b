"""Verifiable rewards for GRPO, by name (`train.grpo.rewards`): each maps (completion, row) -> a float, where row
holds the reference `answer`, the `question` the prompt asked and where the row is (`at`). Built-in ones score
exactly as `vidtune eval` scores; `module:function` names a user's function of the same shape."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

from vidtune.train.evaluation.metrics import exact_match, parse_option
from vidtune.train.evaluation.tasks import OPTION_LINE

Reward = Callable[[str, dict[str, Any]], float]


def exact_reward(completion: str, row: dict[str, Any]) -> float:
    """1 when the completion equals the reference answer after normalisation (case, punctuation, articles)."""
    return exact_match(completion, [row["answer"]])


def choice_reward(completion: str, row: dict[str, Any]) -> float:
    """1 when the completion picks the reference's option: the letter or option text parsed as the
    multiple_choice eval parses it, options read from the question's "A. ..." lines."""
    options = [text for _, text in OPTION_LINE.findall(row["question"])]
    truth = parse_option(row["answer"], options)
    return float(truth is not None and parse_option(completion, options) == truth)


REWARDS: dict[str, Reward] = {"exact": exact_reward, "choice": choice_reward}


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
