"""Gemma 4 (google/gemma-4-E4B-it): a SigLIP-style vision encoder with 2-D patch positions and k x k pooling, a
conformer audio encoder, a Gemma 4 text model (per-layer embeddings, sliding and global attention layers).

Prompt format (the hub template's message loop): `<bos><|turn>user\\n{media}{text}<turn|>\\n<|turn>model\\n`, the
assistant's role written `model`, one `<|video|>` / `<|image|>` / `<|audio|>` marker per media item where it appears,
text trimmed. Ours is the same prompt with each answer and its `<turn|>` marked for labels (the newline after it is
not: the model stops at `<turn|>`).

Visual tokens: every frame is resized (aspect kept) to the largest size whose patch grid fits `max_soft_tokens` x
k x k patches (E4B: 70 x 3x3 of 16 px for video, 280 for images), then pooled k x k: up to 70 tokens per frame. The
processor writes each frame as `mm:ss <|image>` + its tokens + `<image|>`, frames joined by spaces, from the frames'
times (we hand it the real ones, as for Qwen3-VL: without metadata it assumes 24 fps and the text is wrong). Images
are `<|image>` + tokens + `<image|>`. The counts below are the processor's own (its size arithmetic and its
per-video / per-audio expansion hooks).

Sound: Gemma 4 takes audio as its own media item (no audio-in-video mode): a heard video is the video, then its
sound as an audio part right after it, `<|audio>` + 25 tokens per second + `<audio|>`. The processor pads features
to a multiple of 128 samples and marks the real frames (`input_features_mask`); the model keeps only the real
tokens. A silent file heard beside a sounding one in a sample is heard as silence of its span.

Batching: the video processor pads every frame's patches to one length (max_soft_tokens x k x k) and concatenates
frames along one axis with `num_frames_per_video` to split them, so clips of any frame count share a batch by
concatenation (images likewise, audio padded to the longest). `mm_token_type_ids` (per token) lets vision tokens
attend to their own image or frame bidirectionally in the sliding layers: it is padded with the text.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.nn.functional import pad
from transformers.models.gemma4.video_processing_gemma4 import get_aspect_ratio_preserving_size
from transformers.video_utils import VideoMetadata

from vidtune.data.families import AudioActivations, BlankPath, ModelFamily
from vidtune.data.families.qwen2_5_vl import video_metadata

END_OF_TURN = "<turn|>"
VIDEO_KEYS = ("pixel_values_videos", "video_position_ids", "num_frames_per_video")
IMAGE_KEYS = ("pixel_values", "image_position_ids")
AUDIO_KEYS = ("input_features", "input_features_mask")


def training_template() -> str:
    """The hub prompt with generation markers around each answer and its `<turn|>`."""
    media = (
        "{%- if item['type'] == 'text' -%}{{- item['text'] | trim -}}"
        "{%- elif item['type'] == 'image' -%}{{- '<|image|>' -}}"
        "{%- elif item['type'] == 'audio' -%}{{- '<|audio|>' -}}"
        "{%- elif item['type'] == 'video' -%}{{- '<|video|>' -}}"
        "{%- endif -%}"
    )
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{% generation %}"
        "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') | trim -}}"
        "{{- '<turn|>' -}}"
        "{% endgeneration %}"
        "{{- '\\n' -}}"
        "{%- else -%}"
        "{%- for item in message['content'] -%}" + media + "{%- endfor -%}"
        "{{- '<turn|>\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}"
    )


def soft_tokens(pixel_processor: Any, height: int, width: int) -> int:
    """Tokens one frame or image of this size becomes: the processor's resize arithmetic, then k x k pooling."""
    patch, kernel = pixel_processor.patch_size, pixel_processor.pooling_kernel_size
    target_h, target_w = get_aspect_ratio_preserving_size(
        height=height,
        width=width,
        patch_size=patch,
        max_patches=pixel_processor.max_soft_tokens * kernel**2,
        pooling_kernel_size=kernel,
    )
    return (target_h // patch) * (target_w // patch) // kernel**2


def extractor_limits(extractor: Any) -> dict[str, Any]:
    """The feature extractor's own padding and length limits (its call's defaults: pad to a multiple of 128 samples,
    at most 30 s), given to the processor explicitly. Gemma4Processor merges the tokenizer's init kwargs into the
    audio kwargs where the names match, after the defaults: a tokenizer saved with its backend's padding state on
    loads back with `max_length` and `pad_to_multiple_of` None, which then reached the extractor with
    truncation=True and its `pad` raised "When setting truncation=True, make sure that max_length is defined". A
    run that processed its samples in the main process (data.num_workers=0) saved such a tokenizer (each processor
    call leaves the padding on), so scoring it (vidtune eval, the demo) failed on every heard prompt."""
    defaults = inspect.signature(type(extractor).__call__).parameters
    return {name: defaults[name].default for name in ("max_length", "pad_to_multiple_of", "truncation")}


class Gemma4TokenCounter:
    """A clip's, an image's and a sound's tokens as the processor writes them (timestamps, boundary tokens
    included), from its own arithmetic and per-item expansion hooks."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.text_tokens = lru_cache(maxsize=65536)(self._text_tokens)
        self.audio_samples_tokens = lru_cache(maxsize=4096)(self._audio_samples_tokens)

    def _text_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def video_tokens(
        self, num_frames: int, height: int, width: int, timestamps_s: Sequence[float] | None = None
    ) -> int:
        if timestamps_s is None:
            raise ValueError("Gemma 4's video token count depends on the frame timestamps; none were given")
        per_frame = soft_tokens(self.processor.video_processor, height, width)
        metadata = VideoMetadata(**video_metadata(timestamps_s, 0.0))
        stand_in = {"num_soft_tokens_per_video": [per_frame], "video_metadata": [metadata]}
        return self.text_tokens(self.processor.replace_video_token(stand_in, 0))

    def image_tokens(self, height: int, width: int) -> int:
        return soft_tokens(self.processor.image_processor, height, width) + 2  # + <|image> and <image|>

    def _audio_samples_tokens(self, num_samples: int) -> int:
        extractor = self.processor.feature_extractor
        mask = extractor([np.zeros(num_samples, np.float32)], sampling_rate=extractor.sampling_rate)
        expansion = self.processor.replace_audio_token({"input_features_mask": mask["input_features_mask"]}, 0)
        return self.text_tokens(expansion)

    def audio_tokens(self, duration_s: float) -> int:
        """A sound file's `<|audio|>` marker expanded: `<|audio>` + 25 tokens per second + `<audio|>`."""
        rate = self.processor.feature_extractor.sampling_rate
        return self.audio_samples_tokens(round(duration_s * rate))

    def video_audio_tokens(self, duration_s: float) -> int:
        """A heard video's sound: its audio part's tokens, as a sound file's (the marker it replaces is not counted
        in the template's tokens, which never hold it)."""
        return self.audio_tokens(duration_s)


class Gemma4(ModelFamily):
    name = "gemma4"
    model_types = ("gemma4",)
    model_class = "Gemma4ForConditionalGeneration"
    chat_template = training_template()
    language_model_prefix = "model.language_model."
    vision_tower_prefix = "model.vision_tower."
    projector_prefix = "model.embed_vision."
    language_model_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # the tower's projections are clippable linears: the nn.Linear inside each is named `linear`
    vision_tower_lora_targets = ("linear",)
    audio_tower_prefix = "model.audio_tower."  # the conformer; its projection to the text width is embed_audio
    # the conformer's clippable linears (an nn.Linear named `linear` inside each), its relative-position keys, the
    # subsampling's input projection and its output projection
    audio_tower_lora_targets = ("linear", "relative_k_proj", "input_proj_linear", "output_proj")
    audio_projector_prefix = "model.embed_audio."
    quantization_skip_modules = (
        "model.vision_tower",
        "model.audio_tower",
        "model.embed_vision",
        "model.embed_audio",
        "lm_head",
    )
    visual_keys = (*VIDEO_KEYS, *IMAGE_KEYS, *AUDIO_KEYS)
    token_keys = ("mm_token_type_ids",)
    hears = True
    supports_packing = False
    packing_refusal = (
        "its sliding layers' bidirectional attention over each image or frame is built from mm_token_type_ids "
        "per row, which packed rows are not tested with yet"
    )

    def attention_implementations(self, requested: str) -> str | dict[str, str]:
        """The audio tower's chunked local attention exists in eager form only (transformers refuses sdpa for it)."""
        return {"": requested, "text_config": requested, "vision_config": requested, "audio_config": "eager"}

    def prepare_model(self, model: Any) -> None:
        """The token embeddings' output requires grad on every sample. Gemma 4 feeds it to its per-layer-input
        projection as well as to the decoder: a sample with images, video or sound has it require grad (through
        the trained projector), a text-only one would not, and ZeRO-3 would then gather that projection's weight in
        backward on one rank and not the other (a collective mismatch: seen on 2 CPU ranks)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.enable_input_require_grads()

    def token_counter(self, processor: Any) -> Gemma4TokenCounter:
        return Gemma4TokenCounter(processor)

    def decode_edge_px(self, processor: Any) -> int | None:
        """The side of a square frame at the processor's budget: no frame's shorter side is larger after its
        resize, so decoders scale no further than the processor needs."""
        video = processor.video_processor
        side = video.patch_size * video.pooling_kernel_size
        return int(np.sqrt(video.max_soft_tokens)) * side

    def audio_sampling_rate(self, processor: Any) -> int:
        return int(processor.feature_extractor.sampling_rate)

    def audio_activations(self, audio_config: Any) -> AudioActivations:
        """The conformer per audio token (4 mel frames; one encoder frame per token), checked against the tensors
        autograd keeps on the tiny model (tests/test_memory_plan.py):
        - subsampling: two stride-2 3x3 convolutions over (time, mel), each followed by a LayerNorm and a ReLU, then
          input_proj_linear. The first's output (channels[0] x 2 x mel/2 per token) is kept three times (the norm's
          input, the ReLU's output, the second convolution's input): at E4B's 128 channels, 49k values per token,
          far more than a conformer layer keeps.
        - each layer: two half-step feed-forward blocks (4x width), chunked local attention with relative
          positions, a light convolution block, nine RMSNorms (each keeps its fp32 input and normed output), and
          clamps around every clippable linear (each keeps the clamp's input, the linear's input and its output).
          Attention computes in fp32: q, the keys and values blocked with their context (context / chunk times
          each), the logits before the soft cap and the softmax per head and context position.
        - after: output_proj's input, embed_audio's norm input (fp32)."""
        a = audio_config
        width, heads, ffn = a.hidden_size, a.num_attention_heads, 4 * a.hidden_size
        first, second = a.subsampling_conv_channels
        mel = first  # the mel bins: input_proj_linear's width, first // 4 x second, assumes as many as channels
        per_first = 2 * math.ceil(mel / 2)  # (time x mel) positions per token after the first convolution
        per_second = math.ceil(math.ceil(mel / 2) / 2)
        context = a.attention_chunk_size + a.attention_context_left - 1 + a.attention_context_right
        blocks = context / a.attention_chunk_size  # each key and value is copied into this many blocks
        return AudioActivations(
            front=4 * mel + 3 * first * per_first + 3 * second * per_second,
            front_fp32=2 * (per_first + per_second),  # the LayerNorms' mean and 1/std
            first_input=4 * mel,
            hooked_input=False,  # its tower has no input embeddings
            # feed-forward blocks 2 x (5 width + 4 ffn), attention's projections 10 width, the layer's own clamps
            # 3 width, the light convolution 12 width
            layer=2 * (5 * width + 4 * ffn) + 10 * width + 3 * width + 12 * width,
            layer_fp32=round(9 * (2 * width + 2) + 3 * width + 2 * blocks * width + 2 * heads * context + context / 4),
            layer_linear_inputs=8 * width + 2 * ffn,
            num_layers=a.num_hidden_layers,
            frames_per_token=1,
            hidden=width,
            after=width,
            after_fp32=a.output_proj_dims + 2,
            after_linear_inputs=width,
            checkpointed=False,  # plain nn.Module layers: gradient checkpointing leaves them whole
            projector=a.output_proj_dims,  # embed_audio's projection input
        )

    def video_processor_kwargs(self, timings: Sequence[tuple[Sequence[float], float] | None]) -> dict[str, Any]:
        """Each video's real frame times as the processor's metadata (it writes them as `mm:ss` before frames)."""
        if any(t is None for t in timings):
            raise ValueError(f"{self.name} needs each video's frame timestamps (pass the decoded Clip, not frames)")
        return {"video_metadata": [video_metadata(*t) for t in timings if t is not None]} if timings else {}

    def encode_with_audio(
        self,
        processor: Any,
        conversation: list[dict[str, Any]],
        chat_template: str,
        processor_kwargs: dict[str, Any],
        for_generation: bool,
        audios: Sequence[Any],
    ) -> dict[str, Any]:
        """Each video followed by its sound as an audio part (`audios[i]`: the i-th video's; none when the videos
        are not heard), then the processor's own apply_chat_template, as for a sample without sound: it takes the
        conversation's sound files (audio parts with their samples) where they are."""
        sounds = iter(audios)
        heard = []
        for msg in conversation:
            content = []
            for part in msg["content"]:
                content.append(part)
                if part["type"] == "video" and audios:
                    content.append({"type": "audio", "audio": np.asarray(next(sounds), dtype=np.float32)})
            heard.append({**msg, "content": content})
        return self.encode(
            processor,
            heard,
            chat_template=chat_template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=not for_generation,
            add_generation_prompt=for_generation,
            return_tensors=processor_kwargs.pop("return_tensors", None),
            processor_kwargs={
                **processor_kwargs,
                "sampling_rate": self.audio_sampling_rate(processor),
                "audio_kwargs": extractor_limits(processor.feature_extractor),
            },
        )

    def example_visuals(self, encoded: dict[str, Any], processor: Any) -> dict[str, torch.Tensor]:
        """Frames (frames, patches, patch pixels) with their patch positions and per-video frame counts; images
        likewise; sound features cut to the real frames; mm_token_type_ids (L,)."""
        visuals: dict[str, torch.Tensor] = {}
        if encoded.get("pixel_values_videos") is not None and len(encoded["pixel_values_videos"]):
            visuals["pixel_values_videos"] = torch.as_tensor(np.asarray(encoded["pixel_values_videos"]))
            visuals["video_position_ids"] = torch.as_tensor(np.asarray(encoded["video_position_ids"]))
            frames = np.asarray(encoded["num_frames_per_video"]).reshape(-1)
            visuals["num_frames_per_video"] = torch.as_tensor(frames, dtype=torch.long)
        if encoded.get("pixel_values") is not None and len(encoded["pixel_values"]):
            visuals["pixel_values"] = torch.as_tensor(np.asarray(encoded["pixel_values"]))
            visuals["image_position_ids"] = torch.as_tensor(np.asarray(encoded["image_position_ids"]))
        if encoded.get("input_features") is not None and len(encoded["input_features"]):
            mask = torch.as_tensor(np.asarray(encoded["input_features_mask"]), dtype=torch.bool)
            frames_kept = int(mask.sum(-1).max())  # the extractor's padding past the longest sound is cut
            features = torch.as_tensor(np.asarray(encoded["input_features"]), dtype=torch.float32)
            visuals["input_features"], visuals["input_features_mask"] = (
                features[:, :frames_kept],
                mask[:, :frames_kept],
            )
        visuals["mm_token_type_ids"] = torch.as_tensor(np.asarray(encoded["mm_token_type_ids"][0]), dtype=torch.long)
        return visuals

    def batch_visuals(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Frames, images and their positions concatenated in sample order (the model fills placeholders in that
        order); sounds padded to the batch's longest (mask False past each one's end)."""
        batch: dict[str, torch.Tensor] = {}
        for key in (*VIDEO_KEYS, *IMAGE_KEYS):
            parts = [ex[key] for ex in examples if key in ex]
            if parts:
                batch[key] = torch.cat(parts)
        with_sound = [ex for ex in examples if "input_features" in ex]
        if with_sound:
            frames = max(ex["input_features"].shape[1] for ex in with_sound)
            batch["input_features"] = torch.cat(
                [pad(ex["input_features"], (0, 0, 0, frames - ex["input_features"].shape[1])) for ex in with_sound]
            )
            batch["input_features_mask"] = torch.cat(
                [pad(ex["input_features_mask"], (0, frames - ex["input_features_mask"].shape[1])) for ex in with_sound]
            )
        return batch

    def blank_paths(self, model: Any, processor: Any, device: torch.device) -> list[BlankPath]:
        """The forward embeds the tokens (and their per-layer embeddings), runs the image path, the video path
        (both through the one vision tower), the audio path, then the language model. No module runs between the
        video and the audio paths: a rank short of video runs its blank before the audio tower when it hears
        sound, else before the language model (`fallback`)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        core = base.model
        video = processor.video_processor
        side = video.patch_size * video.pooling_kernel_size
        blank_frame = np.zeros((1, side, side, 3), dtype=np.uint8)
        frames = video(videos=[blank_frame], do_sample_frames=False, return_tensors="pt")
        image = processor.image_processor(images=[blank_frame[0]], return_tensors="pt")
        extractor = processor.feature_extractor
        sound = extractor([np.zeros(extractor.hop_length * 16, np.float32)], return_tensors="pt")

        def run_image() -> torch.Tensor:
            pixels = image["pixel_values"].to(device, dtype=core.vision_tower.dtype)
            output = core.get_image_features(pixels, image["image_position_ids"].to(device), return_dict=True)
            return sum((f.sum() for f in output.pooler_output), torch.zeros((), device=device))

        def run_video() -> torch.Tensor:
            pixels = frames["pixel_values_videos"].to(device, dtype=core.vision_tower.dtype)
            output = core.get_video_features(
                pixels,
                frames["video_position_ids"].to(device),
                num_frames_per_video=torch.as_tensor(frames["num_frames_per_video"]),
                return_dict=True,
            )
            return sum((f.sum() for f in output.pooler_output), torch.zeros((), device=device))

        def run_audio() -> torch.Tensor:
            features = sound["input_features"].to(device, dtype=core.audio_tower.dtype)
            mask = sound["input_features_mask"].to(device)
            return core.get_audio_features(features, mask, return_dict=True).pooler_output.sum()

        text = core.language_model
        # the image path runs right after the per-layer embeddings (or the embeddings, without them)
        after_embeddings = getattr(text, "embed_tokens_per_layer", None) or core.get_input_embeddings()
        paths = [
            BlankPath("pixel_values", after_embeddings, before=False, run=run_image),
            BlankPath("pixel_values_videos", text, before=True, run=run_video),
        ]
        if core.audio_tower is not None:
            paths[1] = BlankPath("pixel_values_videos", core.audio_tower, before=True, run=run_video, fallback=text)
            paths.append(BlankPath("input_features", text, before=True, run=run_audio))
        return paths

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        return list(dict.fromkeys([end_of_turn, tokenizer.eos_token_id]))


GEMMA4 = Gemma4()
