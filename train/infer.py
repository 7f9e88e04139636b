"""Inference with the same models and data path as training: one answer, a chat about a video, batch prediction.

A trained output folder (LoRA adapter or full model) carries its processor, chat template and `vidtune.json`, so
frames are sampled as in training unless the caller says otherwise (deterministic segment centres, no jitter).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vidtune.data.collator import Collator
from vidtune.data.conversation import Message, assistant_texts, media_part, message, text_part
from vidtune.data.dataset import load_media
from vidtune.data.examples import ExampleBuilder, with_time_instructions
from vidtune.data.families import ModelFamily, family_for
from vidtune.data.sources import SourceConfig, iter_conversations
from vidtune.data.video import SamplingConfig
from vidtune.train.model import load_model_config, model_class, resolve_dtype
from vidtune.train.outputs import read_metadata


@dataclass
class InferenceModel:
    model: Any
    processor: Any
    family: ModelFamily
    builder: ExampleBuilder
    sampling: SamplingConfig
    time_instruction: bool

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _adapter_base(folder: Path) -> str | None:
    config = folder / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8"))["base_model_name_or_path"]


def load_for_inference(
    path: str,
    base: str | None = None,
    dtype: str = "auto",
    num_frames: int | None = None,
    fps: float | None = None,
    device: str | None = None,
) -> InferenceModel:
    """A trained output folder (adapter or full model) or any LLaVA-NeXT-Video checkpoint."""
    import transformers
    from peft import PeftModel

    folder = Path(path)
    adapter_base = _adapter_base(folder) if folder.is_dir() else None
    base_path = base or adapter_base or path
    family = family_for(load_model_config(base_path).model_type)
    model = model_class(family).from_pretrained(base_path, dtype=resolve_dtype(dtype))
    if adapter_base is not None:
        model = PeftModel.from_pretrained(model, str(folder))
    has_processor = folder.is_dir() and (folder / "processor_config.json").is_file()
    processor = transformers.AutoProcessor.from_pretrained(str(folder) if has_processor else base_path)
    metadata = read_metadata(folder) if folder.is_dir() else None
    trained = (metadata or {}).get("sampling", {})
    sampling = SamplingConfig(
        num_frames=num_frames or trained.get("num_frames") or 8, fps=fps if fps is not None else trained.get("fps")
    )
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    builder = ExampleBuilder(processor, processor.chat_template or family.chat_template)
    return InferenceModel(model, processor, family, builder, sampling, bool((metadata or {}).get("time_instruction")))


@torch.no_grad()
def generate(
    im: InferenceModel,
    conversations: Sequence[list[Message]],
    max_new_tokens: int = 64,
    before: Callable[[dict[str, torch.Tensor]], None] | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy answers to conversations that end with a user turn, batched with left padding. `before` sees each
    batch first (ZeRO-3 ranks align their vision calls there); extra keywords go to model.generate."""
    examples = []
    for messages in conversations:
        media, instructions = load_media(
            messages, im.sampling, im.time_instruction, rng=None, shortest_edge=im.builder.frame_px
        )
        examples.append(im.builder.build(with_time_instructions(messages, instructions), media, for_generation=True))
    batch = Collator(im.processor.tokenizer.pad_token_id, padding_side="left")(examples)
    batch = {k: v.to(im.device) for k, v in batch.items()}
    if "pixel_values_videos" in batch:
        batch["pixel_values_videos"] = batch["pixel_values_videos"].to(im.model.dtype)
    if before is not None:
        before(batch)
    output = im.model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=im.processor.tokenizer.pad_token_id,
        **generate_kwargs,
    )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in im.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def video_question(video: str, prompt: str) -> list[Message]:
    return [message("user", [media_part("video", str(Path(video).resolve())), text_part(prompt)])]


def answer(im: InferenceModel, video: str, prompt: str, max_new_tokens: int = 64) -> str:
    return generate(im, [video_question(video, prompt)], max_new_tokens)[0]


# ---------------------------------------------------------------------------------------------------------- chat

CHAT_HELP = "commands: /video PATH (talk about another video), /reset (forget the conversation), /quit"


def chat(
    im: InferenceModel,
    video: str,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
    max_new_tokens: int = 128,
) -> None:
    """A multi-turn conversation about a video in the terminal."""
    write(CHAT_HELP)
    history: list[Message] = []
    current = str(Path(video).resolve())
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history = []
            write("(conversation reset)")
            continue
        if line.startswith("/video"):
            candidate = line[len("/video") :].strip()
            if not Path(candidate).is_file():
                write(f"(no video at {candidate!r})")
                continue
            current, history = str(Path(candidate).resolve()), []
            write(f"(now talking about {candidate})")
            continue
        parts = [text_part(line)] if history else [media_part("video", current), text_part(line)]
        history.append(message("user", parts))
        reply = generate(im, [history], max_new_tokens)[0]
        history.append(message("assistant", [text_part(reply)]))
        write(f"model> {reply}")


# ------------------------------------------------------------------------------------------------------- predict


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict(
    im: InferenceModel, source: SourceConfig, out_path: str, batch_size: int = 8, max_new_tokens: int = 64
) -> int:
    """Answer the last user turn of every row of a corpus; JSONL of prompt, prediction and reference per row.

    Rows ending with an assistant turn use it as the reference and are answered without it."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with out.open("w", encoding="utf-8") as sink:
        for rows in _batched(iter_conversations(source), batch_size):
            prompts = [r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"] for r in rows]
            predictions = generate(im, prompts, max_new_tokens)
            for row, prompt, prediction in zip(rows, prompts, predictions, strict=True):
                reference = assistant_texts(row["messages"])[-1] if row["messages"][-1]["role"] == "assistant" else None
                question = " ".join(p["text"] or "" for p in prompt[-1]["content"] if p["type"] == "text")
                record = {"at": row["at"], "question": question, "prediction": prediction, "reference": reference}
                sink.write(json.dumps(record) + "\n")
                count += 1
    return count
