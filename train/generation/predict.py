"""`vidtune predict`: answer the last user turn of every row of a corpus, batched, into JSONL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vidtune.data.conversation import Message, assistant_texts, media_parts
from vidtune.data.sources import SourceConfig, iter_conversations
from vidtune.train.generation.infer import InferenceModel, generate


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def answer_record(at: str, prompt: list[Message], prediction: str, references: list[str]) -> dict[str, Any]:
    """The fields every predictions.jsonl row has, from `vidtune predict`, `vidtune eval` and the benchmarks alike:
    where the row is, the paths of its media, the question, the prediction and the reference answers (a list:
    a clip's captions are several; empty when the row has none)."""
    question = " ".join(p["text"] or "" for p in prompt[-1]["content"] if p["type"] == "text") if prompt else ""
    media = [part["path"] for part in media_parts(prompt)]
    return {"at": at, "media": media, "question": question, "prediction": prediction, "references": references}


def predict(
    im: InferenceModel, source: SourceConfig, out_path: str, batch_size: int = 8, max_new_tokens: int = 64
) -> int:
    """Answer the last user turn of every row of a corpus; JSONL of answer_record per row.

    Rows ending with an assistant turn use it as the reference and are answered without it."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with out.open("w", encoding="utf-8") as sink:
        for rows in _batched(iter_conversations(source), batch_size):
            prompts = [r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"] for r in rows]
            predictions = generate(im, prompts, max_new_tokens)
            for row, prompt, prediction in zip(rows, prompts, predictions, strict=True):
                answered = row["messages"][-1]["role"] == "assistant"
                references = [assistant_texts(row["messages"])[-1]] if answered else []
                sink.write(json.dumps(answer_record(row["at"], prompt, prediction, references)) + "\n")
                count += 1
    return count
