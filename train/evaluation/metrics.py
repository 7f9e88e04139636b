"""Scoring answers: pure functions, no model. Odd outputs (empty, unparseable, a letter outside the options) score
as wrong, never raise."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Best token-overlap F1 over the references (SQuAD's definition)."""
    best = 0.0
    predicted = normalize_answer(prediction).split()
    for reference in references:
        truth = normalize_answer(reference).split()
        common = sum((Counter(predicted) & Counter(truth)).values())
        if not predicted or not truth or common == 0:
            best = max(best, float(predicted == truth))
            continue
        precision, recall = common / len(predicted), common / len(truth)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def parse_option(prediction: str, options: Sequence[str]) -> int | None:
    """The option a free-form answer picks: an option's exact text, else a leading letter ("B", "(B)", "B. Cars",
    "Answer: B"); None when it names none of them (a letter outside the options included)."""
    normalized = normalize_answer(prediction)
    hits = [i for i, option in enumerate(options) if normalize_answer(option) == normalized]
    if len(hits) == 1:
        return hits[0]
    text = prediction.strip()
    match = re.match(
        r"^(?:(?:the\s+)?(?:answer|option)\s*(?:is)?\s*[:\-]?\s*)?\(?([A-Za-z])\)?(?:[.:)\s]|$)", text, re.IGNORECASE
    )
    if match and (len(text) == 1 or match.group(1).isupper()):
        index = ord(match.group(1).upper()) - ord("A")
        return index if 0 <= index < len(options) else None
    return None


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4, ROUGE-L and CIDEr-D with the COCO caption evaluation code (pycocoevalcap), on lower-cased,
    punctuation-free text (its PTB tokenizer needs Java)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    def tokens(text: str) -> str:
        return " ".join("".join(ch if ch not in string.punctuation else " " for ch in text.lower()).split()) or "_"

    results = {i: [tokens(p)] for i, p in enumerate(predictions)}
    truths = {i: [tokens(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(truths, results, verbose=0)
    rouge, _ = Rouge().compute_score(truths, results)
    cider, _ = Cider().compute_score(truths, results)
    return {"bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider": float(cider)}


BLEU_ORDER = 4


def caption_metric_warning(references: Sequence[Sequence[str]]) -> str | None:
    """A warning when references are too short for BLEU-4 to mean anything: with fewer than 4 words it has no
    4-grams to match, so even perfect captions score near 0 (while ROUGE-L says 1.0)."""
    lengths = sorted(len(ref.split()) for refs in references for ref in refs)
    if not lengths or lengths[len(lengths) // 2] >= BLEU_ORDER:
        return None
    return (
        f"caption references have a median of {lengths[len(lengths) // 2]} words: BLEU-4 needs {BLEU_ORDER}-word "
        "n-grams and is near 0 even for perfect captions here; read ROUGE-L, CIDEr or exact match instead"
    )


def classify(prediction: str, classes: Sequence[str]) -> int | None:
    """The class a recognition answer names: the class whose text equals it, else the only class it contains."""
    normalized = normalize_answer(prediction)
    names = [normalize_answer(c) for c in classes]
    if normalized in names:
        return names.index(normalized)
    contained = [i for i, name in enumerate(names) if name and re.search(rf"\b{re.escape(name)}\b", normalized)]
    return contained[0] if len(contained) == 1 else None


def confusion_matrix(truth: Sequence[int], predicted: Sequence[int | None], num_classes: int) -> list[list[int]]:
    """Rows: true class; columns: predicted class, plus a last column for answers that name no class."""
    matrix = [[0] * (num_classes + 1) for _ in range(num_classes)]
    for t, p in zip(truth, predicted, strict=True):
        matrix[t][num_classes if p is None else p] += 1
    return matrix
