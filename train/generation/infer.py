"""Inference with the same models and data path as training: load a trained folder, generate, answer one prompt.

A trained output folder (LoRA adapter or full model) carries its processor, chat template and `vidtune.json`, so
frames are sampled as in training unless the caller says otherwise (deterministic segment centres, no jitter).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from vidtune.data.collator import Collator
from vidtune.data.conversation import Message, media_part, message, text_part
from vidtune.data.dataset import load_media
from vidtune.data.examples import ExampleBuilder, with_time_instructions
from vidtune.data.families import ModelFamily, family_for
from vidtune.data.video import SamplingConfig
from vidtune.train.training.model import (
    announced_load,
    load_model_config,
    model_class,
    refusing_pickles,
    resolve_dtype,
)
from vidtune.train.training.outputs import read_metadata
from vidtune.train.training.quantization import quantized_load_kwargs


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

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an answer: the family's end-of-turn, and those the model's own generation config ends
        on (Qwen's `<|endoftext|>` beside `<|im_end|>`), as plain `model.generate` stops: without them an answer
        went on past a token where the model card's code stops."""
        own = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        own_ids = [own] if isinstance(own, int) else list(own or [])
        return list(dict.fromkeys([*self.family.stop_token_ids(self.processor.tokenizer), *own_ids]))


def _adapter_base(folder: Path) -> str | None:
    config = folder / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8"))["base_model_name_or_path"]


def sampling_mismatch(sampling: SamplingConfig, trained: dict[str, Any], path: str) -> str | None:
    """A warning when frames are sampled unlike training (a 4-frame adapter asked about 16 frames answers, but
    silently worse)."""
    if not trained.get("num_frames") or (sampling.num_frames, sampling.fps) == (
        trained["num_frames"],
        trained.get("fps"),
    ):
        return None

    def described(num_frames: int, fps: float | None) -> str:
        return f"{num_frames} frames" + (f" at {fps:g} fps" if fps else "")

    return (
        f"warning: sampling {described(sampling.num_frames, sampling.fps)} per video, but {path} was trained on "
        f"{described(trained['num_frames'], trained.get('fps'))}; answers may be worse (leave out --num-frames/--fps "
        "to sample as in training)"
    )


def load_for_inference(
    path: str,
    base: str | None = None,
    dtype: str = "auto",
    num_frames: int | None = None,
    fps: float | None = None,
    device: str | None = None,
    announce: bool = False,
) -> InferenceModel:
    """A trained output folder (adapter or full model) or any supported checkpoint. `announce`: a line on stderr as
    the base starts loading and one when it is loaded (the commands say so; library callers stay silent)."""
    import transformers
    from peft import PeftModel

    folder = Path(path)
    adapter_base = _adapter_base(folder) if folder.is_dir() else None
    base_path = base or adapter_base or path
    family = family_for(load_model_config(base_path).model_type)
    metadata = read_metadata(folder) if folder.is_dir() else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # A QLoRA adapter meets the base quantized as in training (merged exports hold real weights and no settings).
    settings = (metadata or {}).get("quantization") if adapter_base is not None else None
    quantized = quantized_load_kwargs(settings, family.quantization_skip_modules, resolve_dtype(dtype), device)
    with refusing_pickles(base_path, folder), announced_load(base_path, file=sys.stderr, show=announce) as loaded:
        model = loaded["model"] = model_class(family).from_pretrained(
            base_path, dtype=resolve_dtype(dtype), **quantized
        )
        family.prepare_model(model)
        if adapter_base is not None:
            model = PeftModel.from_pretrained(model, str(folder))
    has_processor = folder.is_dir() and (folder / "processor_config.json").is_file()
    processor = transformers.AutoProcessor.from_pretrained(str(folder) if has_processor else base_path)
    trained = (metadata or {}).get("sampling", {})
    sampling = SamplingConfig(
        num_frames=num_frames or trained.get("num_frames") or 8, fps=fps if fps is not None else trained.get("fps")
    )
    if warning := sampling_mismatch(sampling, trained, path):
        print(warning, file=sys.stderr)
    if not quantized:  # (a quantized model was loaded onto its device; bitsandbytes weights refuse .to())
        model.to(device)
    model.eval()
    # a run that heard its videos' sound (data.audio) hears them at inference too
    audio_rate = family.audio_sampling_rate(processor) if (metadata or {}).get("audio") else None
    builder = ExampleBuilder(processor, family, chat_template=processor.chat_template, audio_rate=audio_rate)
    return InferenceModel(model, processor, family, builder, sampling, bool((metadata or {}).get("time_instruction")))


def prompt_example(im: InferenceModel, messages: list[Message]) -> dict[str, torch.Tensor]:
    """One conversation that ends with a user turn, its media decoded and templated as in training (ready to batch).
    Bad media raise DataError here, before any generation; so does a sound file for a model that does not hear."""
    im.builder.refuse_unheard(messages, "the prompt")
    media, instructions = load_media(
        messages,
        im.sampling,
        im.time_instruction,
        rng=None,
        shortest_edge=im.builder.frame_px,
        audio_rate=im.builder.audio_rate,
        sound_rate=im.builder.sound_rate,
    )
    return im.builder.build(with_time_instructions(messages, instructions), media, for_generation=True)


@torch.no_grad()
def generate_tokens(
    im: InferenceModel,
    examples: Sequence[dict[str, torch.Tensor]],
    max_new_tokens: int = 64,
    before: Callable[[dict[str, torch.Tensor]], None] | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """The new tokens (B, new) for prompt examples, batched with left padding; greedy unless `do_sample=True` is
    given. `before` sees each batch first (ZeRO-3 ranks align their vision calls there); extra keywords (a
    `streamer`, temperature, top_p) go to model.generate."""
    batch = Collator(im.processor.tokenizer.pad_token_id, padding_side="left", family=im.family)(examples)
    batch = im.family.visuals_to_device(batch, im.device, im.model.dtype)
    if before is not None:
        before(batch)
    generate_kwargs.setdefault("do_sample", False)
    output = im.model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        pad_token_id=im.processor.tokenizer.pad_token_id,
        eos_token_id=im.stop_ids,
        **generate_kwargs,
    )
    return output[:, batch["input_ids"].shape[1] :]


def decode_answer(im: InferenceModel, token_ids: Sequence[int]) -> str:
    """The answer text of one row of new tokens (special tokens, padding and surrounding spaces removed)."""
    return im.processor.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()


class AnswerText:
    """One answer as it is generated, token by token: `add` returns the text that became settled. Decoding the
    whole answer each step keeps multi-token characters and word spaces right; text is released only as a settled
    prefix (no half character, no trailing space the final answer strips), so the pieces concatenate to
    `decode_answer` of all tokens."""

    def __init__(self, im: InferenceModel):
        self.im, self.tokens, self.sent = im, list[int](), ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = decode_answer(self.im, self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new

    def rest(self) -> str:
        """What is left to release once generation ended (the final answer is decode_answer of all tokens)."""
        text = decode_answer(self.im, self.tokens)
        new = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent = text
        return new


class TextStreamer(BaseStreamer):
    """Streams one answer (batch of 1) to `on_text` as it is generated; stops listening at an end-of-turn token."""

    def __init__(self, im: InferenceModel, on_text: Callable[[str], None]):
        self.answer, self.on_text = AnswerText(im), on_text
        self.stop_ids = set(im.stop_ids)
        self.prompt_seen = self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt ids
            self.prompt_seen = True
            return
        token = int(value.reshape(-1)[-1])
        self.stopped = self.stopped or token in self.stop_ids
        if not self.stopped and (text := self.answer.add(token)):
            self.on_text(text)

    def end(self) -> None:
        if text := self.answer.rest():
            self.on_text(text)


def generate(
    im: InferenceModel,
    conversations: Sequence[list[Message]],
    max_new_tokens: int = 64,
    before: Callable[[dict[str, torch.Tensor]], None] | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy answers to conversations that end with a user turn, batched with left padding."""
    examples = [prompt_example(im, messages) for messages in conversations]
    new_tokens = generate_tokens(im, examples, max_new_tokens, before, **generate_kwargs)
    return [decode_answer(im, row.tolist()) for row in new_tokens]


def video_question(video: str | None, prompt: str, audio: str | None = None) -> list[Message]:
    """A one-turn question about a video, a sound file (models that hear), or both (the video first)."""
    media = [media_part(kind, str(Path(path).resolve())) for kind, path in (("video", video), ("audio", audio)) if path]
    return [message("user", [*media, text_part(prompt)])]


def answer(
    im: InferenceModel, video: str | None, prompt: str, max_new_tokens: int = 64, audio: str | None = None
) -> str:
    return generate(im, [video_question(video, prompt, audio)], max_new_tokens)[0]


def model_family(path: str, base: str | None = None) -> ModelFamily:
    """The family of a trained folder or checkpoint, from its config alone (before anything loads)."""
    folder = Path(path)
    return family_for(
        load_model_config(base or (_adapter_base(folder) if folder.is_dir() else None) or path).model_type
    )
