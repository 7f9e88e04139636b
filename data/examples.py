"""Conversation + decoded media -> model-ready example (input_ids, labels, pixels), through the model's processor.

The processor renders the family's chat template, expands each `<video>` / `<image>` into the visual tokens the
family's model fills (frames x tokens-per-frame for LLaVA-NeXT-Video), and marks the assistant tokens (its
`return_assistant_tokens_mask`, which accounts for that expansion). Labels are -100 everywhere else. Nothing is ever
truncated: a sample longer than max_length is dropped before training, with its reason, because cutting inside the
video tokens breaks the forward pass ("Video features and video tokens do not match") and cutting the answer away
silently trains on nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vidtune.data.audio import Audio, silent_span
from vidtune.data.conversation import (
    MEDIA_TYPES,
    DataError,
    Message,
    Part,
    media_parts,
    text_part,
    to_template_messages,
)
from vidtune.data.families import ModelFamily, hearing_families
from vidtune.data.video import Clip

IGNORE_INDEX = -100
LABEL_TURNS = ("all", "last")


@dataclass(frozen=True)
class TokenCount:
    total: int  # input length, media tokens included
    media: int  # video + image + sound tokens
    labels: int  # tokens that carry a label

    def drop_reason(self, max_length: int) -> str | None:
        if self.labels == 0:
            return "no assistant tokens to learn"
        if self.total > max_length:
            return f"{self.total} tokens ({self.media} of them video, image or sound) exceed max_length {max_length}"
        return None


def label_mask(assistant_mask: torch.Tensor, label_turns: str) -> torch.Tensor:
    """Boolean mask of label positions; with "last", only the final contiguous assistant span."""
    mask = assistant_mask.bool()
    if label_turns == "all" or not mask.any():
        return mask
    positions = mask.nonzero().flatten()
    gaps = (positions[1:] - positions[:-1] > 1).nonzero().flatten()
    start = positions[gaps[-1] + 1] if len(gaps) else positions[0]
    last = torch.zeros_like(mask)
    last[start:] = mask[start:]
    return last


def with_time_instructions(messages: list[Message], instructions: dict[int, str]) -> list[Message]:
    """Insert each video's time instruction as a text part right after that video (media index -> text)."""
    out: list[Message] = []
    media_index = 0
    for msg in messages:
        content: list[Part] = []
        for part in msg["content"]:
            content.append(part)
            if part["type"] in MEDIA_TYPES:  # (instructions are keyed by media index: sounds count too)
                if media_index in instructions:
                    content.append(text_part(instructions[media_index]))
                media_index += 1
        out.append({"role": msg["role"], "content": content})
    return out


def answer_replaced(messages: list[Message], answer: str) -> list[Message]:
    """The conversation with its last assistant turn's text replaced by `answer` (a preference pair's rejected)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [*messages[:last], {"role": "assistant", "content": [text_part(answer)]}, *messages[last + 1 :]]


class ExampleBuilder:
    """Counts and builds examples for one processor, through its model family (template, token costs, tensors)."""

    def __init__(
        self,
        processor: Any,
        family: ModelFamily,
        label_turns: str = "all",
        chat_template: str | None = None,
        raw_pixels: bool = False,
        audio_rate: int | None = None,
    ):
        """`chat_template` overrides the family's training template (a trained run's saved one, for inference).
        `raw_pixels`: the family's raw pixels stay uint8 (the training loop normalises them on the device).
        `audio_rate`: videos are heard (data.audio, a family that hears): their sound decoded at this rate. Sound
        files (audio parts) are always heard by a family that hears, at its feature extractor's rate
        (`sound_rate`): they are a row's content, not a track beside its pictures."""
        if label_turns not in LABEL_TURNS:
            raise DataError(f"label_turns must be one of {', '.join(LABEL_TURNS)}, got {label_turns!r}")
        self.processor, self.tokenizer, self.family = processor, processor.tokenizer, family
        self.chat_template, self.label_turns = chat_template or family.chat_template, label_turns
        self.video_token_id = family.video_token_id(processor)
        self.image_token_id = processor.image_token_id
        self.tokens = family.token_counter(processor)
        self.frame_px = family.decode_edge_px(processor)
        self.raw_pixels = raw_pixels
        self.audio_rate = audio_rate
        self.sound_rate = family.audio_sampling_rate(processor) if family.hears else None

    def refuse_unheard(self, messages: list[Message], at: str) -> None:
        """A row with a sound file, for a family that does not hear: refused in one line (never trained on with the
        sound silently left out), before anything is decoded."""
        if self.family.hears:
            return
        sound = next((part["path"] for part in media_parts(messages) if part["type"] == "audio"), None)
        if sound is not None:
            raise DataError(
                f"{at}: {self.family.name} does not hear sound, and the row holds a sound file ({sound}); drop the "
                f"sound from the row or train a family that hears ({', '.join(hearing_families())})"
            )

    def count(self, messages: list[Message], media_tokens: list[int]) -> TokenCount:
        """Token counts without decoding any pixels: the template is tokenized with one placeholder per media
        item, which the processor would expand to `media_tokens[i]` tokens (the placeholders are special tokens,
        so expansion never changes how the surrounding text tokenizes)."""
        encoded = self.tokenizer.apply_chat_template(
            to_template_messages(messages),
            chat_template=self.chat_template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        num_placeholders = len(media_parts(messages))
        labels = int(label_mask(torch.tensor(encoded["assistant_masks"]), self.label_turns).sum())
        media = sum(media_tokens)
        # The processor tokenizes with the tokenizer's specials (BOS); a tokenizer's chat template never does,
        # unless the template writes the BOS itself (Gemma's): then the processor adds none.
        ids = encoded["input_ids"]
        starts_with_bos = self.tokenizer.bos_token_id is not None and ids[:1] == [self.tokenizer.bos_token_id]
        specials = 0 if starts_with_bos else self.tokenizer.num_special_tokens_to_add(pair=False)
        return TokenCount(len(encoded["input_ids"]) + specials - num_placeholders + media, media, labels)

    def build(
        self, messages: list[Message], media: dict[int, np.ndarray | Clip | Audio], for_generation: bool = False
    ) -> dict[str, torch.Tensor]:
        """One example: input_ids, attention_mask, labels (L,), plus the family's visual tensors for its media (a
        sound file's: its decoded `Audio`).

        With for_generation, `messages` end with a user turn and the prompt ends with the assistant header; no labels.
        Python lists come back from the processor (return_tensors=None) because it cannot stack videos of different
        lengths; the family turns them into tensors in conversation order, the order the model fills placeholders.
        A video given as a decoded `Clip` brings its frames' real timestamps, which the family hands the processor
        (time-aware models); bare frames (T, H, W, C) carry none.
        """
        pixels = {
            i: m.frames if isinstance(m, Clip) else m.samples if isinstance(m, Audio) else m for i, m in media.items()
        }
        timings = [
            (m.timestamps_s, m.info.duration_s) if isinstance(m, Clip) else None
            for _, m in sorted(media.items())
            if isinstance(m, Clip) or (isinstance(m, np.ndarray) and m.ndim == 4)
        ]
        processor_kwargs = {
            "do_sample_frames": False,  # frames were sampled by data/video/
            **self.family.video_processor_kwargs(timings),
            **(self.family.raw_pixel_kwargs() if self.raw_pixels else {}),
        }
        # a family that hears gets each video's sound (data/audio.py) when a clip carries it; the sample's other
        # videos are heard as silence (the processor takes one sound per video of a heard sample). Sound files
        # travel in their audio parts.
        clips = [m for _, m in sorted(media.items()) if isinstance(m, Clip)]
        heard_videos = any(clip.audio is not None for clip in clips)
        if heard_videos or any(isinstance(m, Audio) for m in media.values()):
            self.refuse_unheard(messages, "a prompt")
            rate = next((clip.audio.sampling_rate for clip in clips if clip.audio is not None), 0)
            encoded = self.family.encode_with_audio(
                self.processor,
                to_template_messages(messages, pixels),
                self.chat_template,
                {"return_tensors": None, **processor_kwargs},
                for_generation,
                [(clip.audio or silent_span(clip, rate)).samples for clip in clips] if heard_videos else [],
            )
        else:
            encoded = self.family.encode(
                self.processor,
                to_template_messages(messages, pixels),
                chat_template=self.chat_template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=not for_generation,
                add_generation_prompt=for_generation,
                return_tensors=None,
                processor_kwargs=processor_kwargs,
            )
        input_ids = torch.tensor(encoded["input_ids"][0], dtype=torch.long)
        example = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if not for_generation:
            learn = label_mask(torch.tensor(encoded["assistant_masks"][0]), self.label_turns)
            example["labels"] = torch.where(learn, input_ids, IGNORE_INDEX)
        example.update(self.family.example_visuals(encoded, self.processor))
        return example
