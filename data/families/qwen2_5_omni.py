"""Qwen2.5-Omni, the thinker (Qwen/Qwen2.5-Omni-7B without its talker: text out): Qwen2.5-VL's vision tower and
multimodal RoPE, a Whisper-style audio tower (128 mel bins at 16 kHz, 25 tokens per second), a Qwen2 text model.

Prompt format: Qwen2.5-VL's ChatML with the Omni placeholders, `<|vision_bos|><|VIDEO|><|vision_eos|>` and
`<|vision_bos|><|IMAGE|><|vision_eos|>`. A video heard with its sound (transformers' `load_audio_from_video`,
formerly `use_audio_in_video`) becomes `<|vision_bos|><|audio_bos|>` + video and audio tokens interleaved in
2-second chunks + `<|audio_eos|><|vision_eos|>`: the chunks and the model's temporal RoPE positions come from the
frames' real spacing (`video_second_per_grid`, 25 positions per second) and the sound's own clock (25 tokens per
second from the first sampled frame), so both streams share one time axis.

Sound files (audio parts): `<|audio_bos|><|AUDIO|><|audio_eos|>` where they stand, `<|AUDIO|>` expanded to 25
tokens per second, their positions plain text ones; in a sample whose videos are heard, the processor is told which
of its sounds are a video's and which are files (`audio_from_video_indices`, None for a file), in conversation order.

Sound: the clip's audio for exactly the sampled span (data/audio.py). The model takes one `use_audio_in_video` flag
per forward (transformers 5.25 `get_rope_index`), so in a batch either every video carries sound or none does: a
silent file heard by this family gets silence of its span (the processor expects an audio part per video), and
`data.audio` is one mode over the video sources (train/training/config.py checks it).

Visual tensors: Qwen2.5-VL's (patch rows + grids, concatenated per batch); audio: `input_features` (audios, mels,
frames) padded by the feature extractor to its chunk length (the hub's 300 s): the padding is cut to the longest
sound of the sample (and of the batch), `feature_attention_mask` marks the real frames, which the model selects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import MethodType, SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch.nn.functional import pad

from vidtune.data.conversation import DataError
from vidtune.data.families import AudioActivations, BlankPath, FrameLimits
from vidtune.data.families.qwen2_5_vl import Qwen2_5_VL, QwenTokenCounter, chatml_training_template, flat_visuals

AUDIO_KEYS = ("input_features", "feature_attention_mask")
AUDIO_IN_VIDEO = "use_audio_in_video"  # the forward's flag, in a batch whose videos carry their sound
ROPE_KEY = "rope_position_ids"  # an example's own (3, L) multimodal positions (not a model input)


def audio_tokens_for(num_frames: int) -> int:
    """Audio tokens for `num_frames` mel frames: the tower's two stride-2 steps (the processor's own formula)."""
    after_conv = (num_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


class OmniTokenCounter(QwenTokenCounter):
    """Qwen2.5-VL's visual costs, plus the sound's: one mel frame per hop of samples, capped at the feature
    extractor's chunk, then the audio tower's strides; a video heard with its sound adds <|audio_bos|>/<|audio_eos|>."""

    def audio_tokens(self, duration_s: float) -> int:
        extractor = self.processor.feature_extractor
        num_samples = round(duration_s * extractor.sampling_rate)
        return audio_tokens_for(min(math.ceil(num_samples / extractor.hop_length), extractor.nb_max_frames))

    def video_audio_tokens(self, duration_s: float) -> int:
        return self.audio_tokens(duration_s) + 2


class RopeIndex:
    """The Omni thinker's own multimodal RoPE code (`get_rope_index`) with its settings, without its weights: from
    the model's config, or from the processor, which holds the same token ids and time constants (so each example
    gets its positions where it is built, in the DataLoader workers)."""

    get_rope_index: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    def __init__(self, config: Any, spatial_merge_size: int):
        from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as omni

        base = omni.Qwen2_5OmniPreTrainedModelForConditionalGeneration
        self.config, self.spatial_merge_size = config, spatial_merge_size
        for name in ("get_rope_index", "get_llm_pos_ids_for_vision", "get_chunked_index"):
            setattr(self, name, MethodType(getattr(base, name), self))

    @classmethod
    def of_model(cls, config: Any) -> RopeIndex:
        thinker = getattr(config, "thinker_config", config)  # the full Omni checkpoint's config holds the thinker's
        return cls(thinker, thinker.vision_config.spatial_merge_size)

    @classmethod
    def of_processor(cls, processor: Any) -> RopeIndex:
        ids = processor.tokenizer.convert_tokens_to_ids
        settings = SimpleNamespace(
            image_token_id=processor.image_token_id,
            video_token_id=processor.video_token_id,
            audio_token_id=processor.audio_token_id,
            vision_start_token_id=ids(processor.vision_bos_token),
            audio_start_token_id=ids(processor.audio_bos_token),
            position_id_per_seconds=processor.position_id_per_seconds,
            seconds_per_chunk=processor.seconds_per_chunk,
        )
        return cls(settings, processor.video_processor.merge_size)

    def positions(self, example: dict[str, Any], time_key: str) -> torch.Tensor:
        """(3, L): the sample's (temporal, height, width) positions as the thinker computes them for it alone."""
        input_ids = example["input_ids"][None]
        mask = example.get("feature_attention_mask")
        rope, _ = self.get_rope_index(
            input_ids,
            image_grid_thw=example.get("image_grid_thw"),
            video_grid_thw=example.get("video_grid_thw"),
            attention_mask=torch.ones_like(input_ids),
            use_audio_in_video=AUDIO_IN_VIDEO in example,
            audio_seqlens=mask.sum(-1) if mask is not None else None,
            second_per_grids=example.get(time_key),
        )
        return rope[:, 0]


class Qwen2_5_Omni(Qwen2_5_VL):
    name = "qwen2_5_omni"
    model_types = ("qwen2_5_omni_thinker", "qwen2_5_omni")
    model_class = "Qwen2_5OmniThinkerForConditionalGeneration"
    chat_template = chatml_training_template(
        "You are a helpful assistant.",
        video_placeholder="<|vision_bos|><|VIDEO|><|vision_eos|>",
        image_placeholder="<|vision_bos|><|IMAGE|><|vision_eos|>",
        audio_placeholder="<|audio_bos|><|AUDIO|><|audio_eos|>",
    )
    language_model_prefix = "model.language_model."
    vision_tower_prefix = "model.visual."
    projector_prefix = "model.visual.merger."
    audio_tower_prefix = "model.audio_tower."  # Whisper-style encoder, its `proj` to the text width included
    audio_tower_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "proj")
    quantization_skip_modules = ("model.visual", "model.audio_tower", "lm_head")
    # floating ones in the model's dtype; video_second_per_grid stays float32 (its positions must not round)
    visual_keys = ("pixel_values_videos", "video_grid_thw", "pixel_values", "image_grid_thw", *AUDIO_KEYS)
    token_keys = ()
    time_key = "video_second_per_grid"
    hears = True
    supports_packing = True  # per-sample positions from the thinker's get_rope_index (packed_position_ids)
    rope_index: type[RopeIndex] = RopeIndex  # the thinker's position code (Qwen3-Omni-MoE: its own)

    def token_counter(self, processor: Any) -> OmniTokenCounter:
        return OmniTokenCounter(processor)

    def audio_sampling_rate(self, processor: Any) -> int:
        return int(processor.feature_extractor.sampling_rate)

    def video_processor_kwargs(self, timings: Sequence[tuple[Sequence[float], float] | None]) -> dict[str, Any]:
        """The sampled frame rate as the processor's `fps`: it spaces temporal patches (and the sound's chunks) by
        temporal_patch_size / fps seconds. One rate per call: a sample's videos must share it."""
        if any(t is None for t in timings):
            raise ValueError(f"{self.name} needs each video's frame timestamps (pass the decoded Clip, not frames)")
        rates = []
        for times, duration_s in (t for t in timings if t is not None):
            spacing_s = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else duration_s
            rates.append(1.0 / max(spacing_s, 1e-3))
        if not rates:
            return {}
        if max(rates) > min(rates) * 1.01:
            raise DataError(
                f"{self.name} takes one frame rate per sample; its videos were sampled at "
                f"{', '.join(f'{r:.2f}' for r in rates)} fps (set sampling.fps so they share one)"
            )
        return {"fps": rates[0]}

    def apply_frame_limits(self, processor: Any, limits: FrameLimits) -> None:
        """Qwen2.5-VL's limits on the video processor, which then rules: the Omni processor class passes its own
        built-in frame size (128-768 tokens per frame pair, the 7B's) over the video processor's, so the loaded
        processor is told to pass the video processor's (the token counter reads that one)."""
        super().apply_frame_limits(processor, limits)
        processor.videos_kwargs = {**processor.videos_kwargs, "size": dict(processor.video_processor.size)}

    def encode_with_audio(
        self,
        processor: Any,
        conversation: list[dict[str, Any]],
        chat_template: str,
        processor_kwargs: dict[str, Any],
        for_generation: bool,
        audios: Sequence[np.ndarray],
    ) -> dict[str, Any]:
        """The processor's encoding of a conversation that is heard: `audios[i]` is the i-th video's sound at the
        feature extractor's rate (silence for a silent file; empty when its videos are not heard), and its audio
        parts carry their sound files' samples. apply_chat_template cannot take decoded sound for a video (it would
        decode the file again, all of it), so the prompt is rendered as it does and the processor called with every
        sound in conversation order, each marked as a video's or a file's; the assistant mask comes from the same
        offsets it uses."""
        from transformers.utils.chat_template_utils import render_jinja_template

        rate = self.audio_sampling_rate(processor)
        prompts, generation_indices = render_jinja_template(  # type: ignore[str-unpack]  # (annotated `-> str`)
            conversations=[conversation],
            chat_template=chat_template,
            return_assistant_tokens_mask=not for_generation,
            add_generation_prompt=for_generation,
            **processor.tokenizer.special_tokens_map,
        )
        blocks = [block for msg in conversation for block in msg["content"]]
        videos = [block["video"] for block in blocks if block["type"] == "video"]
        images = [block["image"] for block in blocks if block["type"] == "image"]
        if audios and len(audios) != len(videos):
            raise ValueError(f"{self.name}: {len(videos)} videos, {len(audios)} sounds (one per video)")
        # every sound in conversation order, and its source: a video's index, or None for a sound file
        sounds: list[Any] = []
        sources: list[int | None] = []
        video_index = 0
        for block in blocks:
            if block["type"] == "video":
                if audios:
                    sounds.append(audios[video_index])
                    sources.append(video_index)
                video_index += 1
            elif block["type"] == "audio":
                sounds.append(block["audio"])
                sources.append(None)
        encoded = processor(
            text=prompts,
            images=images or None,
            videos=videos or None,
            audio=sounds or None,
            audio_from_video_indices=sources if audios else None,
            load_audio_from_video=bool(audios),
            sampling_rate=rate,
            return_offsets_mapping=not for_generation,
            return_text_replacement_offsets=not for_generation,
            **processor_kwargs,
        )
        encoded = dict(encoded)
        if not for_generation:
            encoded = processor._adjust_assistant_masks_indices(encoded, generation_indices)
        if audios:
            encoded[AUDIO_IN_VIDEO] = True
        return encoded

    def example_visuals(self, encoded: dict[str, Any], processor: Any) -> dict[str, torch.Tensor]:
        """Qwen2.5-VL's visual tensors, the sample's sound (features cut to its real frames) and its own RoPE
        positions (`ROPE_KEY`, (3, L)): a batch may mix samples heard and not, which one use_audio_in_video flag
        per forward cannot place (see finish_batch)."""
        visuals = {
            **flat_visuals(encoded, "pixel_values_videos", "video_grid_thw"),
            **flat_visuals(encoded, "pixel_values", "image_grid_thw"),
        }
        if "pixel_values_videos" in visuals:
            visuals[self.time_key] = torch.tensor(encoded[self.time_key], dtype=torch.float32).reshape(-1)
        if encoded.get("input_features") is not None and len(encoded["input_features"]):
            mask = torch.as_tensor(np.asarray(encoded["feature_attention_mask"]), dtype=torch.long)
            frames = int(mask.sum(-1).max())  # the feature extractor's padding past the longest sound is cut
            features = torch.as_tensor(np.asarray(encoded["input_features"]), dtype=torch.float32)
            visuals["input_features"], visuals["feature_attention_mask"] = features[..., :frames], mask[:, :frames]
        if encoded.get(AUDIO_IN_VIDEO):
            visuals[AUDIO_IN_VIDEO] = torch.tensor(True)
        sample = {"input_ids": torch.as_tensor(encoded["input_ids"][0]), **visuals}
        visuals[ROPE_KEY] = self.rope_index.of_processor(processor).positions(sample, self.time_key)
        return visuals

    def batch_visuals(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Qwen2.5-VL's patch rows and grids, then every sound's features padded to the batch's longest and stacked
        in sample order (the model fills audio placeholders in that order); `use_audio_in_video` when every video
        of the batch carries its sound."""
        batch: dict[str, Any] = super().batch_visuals(examples)
        with_sound = [ex for ex in examples if "input_features" in ex]
        if with_sound:
            frames = max(ex["input_features"].shape[-1] for ex in with_sound)
            padded = [
                (
                    pad(ex["input_features"], (0, frames - ex["input_features"].shape[-1])),
                    pad(ex["feature_attention_mask"], (0, frames - ex["feature_attention_mask"].shape[-1])),
                )
                for ex in with_sound
            ]
            batch["input_features"] = torch.cat([features for features, _ in padded])
            batch["feature_attention_mask"] = torch.cat([mask for _, mask in padded])
        heard = [AUDIO_IN_VIDEO in ex for ex in examples if "pixel_values_videos" in ex]
        if heard and all(heard):
            batch[AUDIO_IN_VIDEO] = True
        return batch

    def finish_batch(self, batch: dict[str, Any], examples: Sequence[dict[str, Any]], padding_side: str) -> None:
        """Training and evaluation batches (with labels) get each sample's own positions, (3, B, W): samples heard
        and not mix freely. Generation computes positions itself, from the one flag: its batches must not mix."""
        if not all(ROPE_KEY in ex for ex in examples):
            return
        if "labels" in batch:
            width = batch["input_ids"].shape[1]
            positions = torch.zeros((3, len(examples), width), dtype=examples[0][ROPE_KEY].dtype)
            for row, ex in enumerate(examples):
                length = ex[ROPE_KEY].shape[-1]
                columns = slice(0, length) if padding_side == "right" else slice(width - length, width)
                positions[:, row, columns] = ex[ROPE_KEY]
            batch["position_ids"] = positions
            return
        heard = {AUDIO_IN_VIDEO in ex for ex in examples if "pixel_values_videos" in ex}
        if len(heard) > 1:
            raise ValueError(
                f"{self.name} generates for videos heard with their sound or for videos without, not both in one "
                "batch (one use_audio_in_video flag per forward): generate them in separate batches"
            )

    def packed_position_ids(self, example: dict[str, Any], model_config: Any) -> torch.Tensor:
        """(4, L): text positions 0..L-1, then the (temporal, height, width) positions the thinker computes for the
        sample alone, with its own use_audio_in_video."""
        rope = self.rope_index.of_model(model_config).positions(example, self.time_key)
        return torch.cat([torch.arange(rope.shape[-1])[None], rope])

    def audio_activations(self, audio_config: Any) -> AudioActivations:
        """The Whisper-style tower per audio token: 4 mel frames -> conv1 (stride 1) -> conv2 (stride 2): 2 encoder
        frames -> the layers -> stride-2 average pooling -> ln_post -> proj. Checked against the tensors autograd
        keeps on the tiny model (tests/test_memory_plan.py); the front runs on features padded to whole
        2 x n_window-frame chunks (up to one chunk more per sound)."""
        a = audio_config
        width, mel = a.d_model, a.num_mel_bins
        return AudioActivations(
            # conv1's input (mel bins) and GELU's input per mel frame; conv2's input; its GELU's input per encoder frame
            front=4 * (mel + 2 * width) + 2 * width,
            front_fp32=0,
            first_input=4 * mel,
            hooked_input=True,  # get_input_embeddings: conv1
            **whisper_layer(width, a.encoder_ffn_dim, a.encoder_attention_heads),
            num_layers=a.encoder_layers,
            frames_per_token=2,
            hidden=width,
            after=2 * width,  # ln_post's input, proj's input
            after_fp32=2,  # ln_post's mean and 1/std
            after_linear_inputs=width,
            checkpointed=True,  # GradientCheckpointingLayer
        )

    def unused_module_prefixes(self, config: Any) -> tuple[str, ...]:
        # the audio tower's bos/eos embedding serves the talker's streaming path, never the thinker's forward
        return ("model.audio_tower.audio_bos_eos_token",)

    def blank_paths(self, model: Any, processor: Any, device: torch.device) -> list[BlankPath]:
        """The forward embeds the tokens, runs the audio tower, the image path, the video path, then the language
        model: the audio blank first on the embedding's hook, then Qwen2.5-VL's image and video blanks."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        core = base.model
        extractor = processor.feature_extractor
        blank = extractor(
            np.zeros(extractor.hop_length * 8, np.float32),
            sampling_rate=extractor.sampling_rate,
            return_attention_mask=True,
            return_tensors="pt",
        )
        frames = int(blank["attention_mask"].sum())

        def run_audio() -> torch.Tensor:
            features = blank["input_features"][..., :frames].to(device, dtype=core.audio_tower.dtype)
            mask = blank["attention_mask"][:, :frames].to(device)
            return core.get_audio_features(features, mask, return_dict=True).last_hidden_state.sum()

        audio = BlankPath("input_features", core.get_input_embeddings(), before=False, run=run_audio)
        return [audio, *super().blank_paths(model, processor, device)]


def whisper_layer(width: int, ffn: int, heads: int) -> dict[str, int]:
    """One pre-norm Whisper-style encoder layer per frame (Qwen2.5-Omni's and Qwen3-Omni's audio towers): each
    LayerNorm's input and its fp32 mean and 1/std; q/k/v's shared input; attention's q, k, v, output (and its fp32
    log-sum-exp per head: sdpa and flash attention); out_proj's input; fc1's input; the activation's input; fc2's
    input."""
    return {
        "layer": 8 * width + 2 * ffn,
        "layer_fp32": 4 + heads,
        "layer_linear_inputs": 3 * width + ffn,
    }


QWEN2_5_OMNI = Qwen2_5_Omni()
