"""Qwen3-Omni-MoE, the thinker (Qwen/Qwen3-Omni-30B-A3B-Instruct without its talker: text out): Qwen3-VL's vision
tower (16 px patches, 2x2 merge, DeepStack features), an audio encoder on 128 mel bins at 16 kHz (three stride-2
convolutions per 100-frame window: 13 tokens per window, 12.5 per second), and a Mixture-of-Experts text model
(30B-A3B: 48 layers, 128 experts, 8 active per token, no shared expert).

What differs from Qwen2.5-Omni (qwen2_5_omni.py, whose batching, sound and per-sample positions this reuses):
- Tokens: `<|vision_start|><|video_pad|><|vision_end|>`, `<|vision_start|><|image_pad|><|vision_end|>`,
  `<|audio_start|><|audio_pad|><|audio_end|>`. A heard video becomes `<|vision_start|><|audio_start|>` + video and
  audio tokens merged by time + `<|audio_end|><|vision_end|>`.
- Prompt: ChatML without a default system prompt (the hub Instruct template; LLaMA-Factory's `qwen3_omni_nothink`).
- Positions (transformers 5.25 `Qwen3OmniMoePreTrainedModelForConditionalGeneration.get_rope_index`): one temporal
  position per audio token and `position_id_per_seconds` (13) per second of video, the two streams merged token by
  token by their time (no 2-second chunks); the positions are float (a frame may fall between two audio tokens).
- Text model: attention (q/k/v/o_proj, nn.Linear) and a sparse MoE block per layer: `mlp.gate`, the router (a
  (experts, hidden) weight, not an nn.Linear), and `mlp.experts`, every expert's gate/up and down projections
  fused into two 3-D parameters (`gate_up_proj` (experts, 2 x moe_intermediate, hidden), `down_proj` (experts,
  hidden, moe_intermediate)). LoRA wraps the attention as linear layers and the experts through PEFT's
  `target_parameters` (a low-rank delta per expert on each 3-D weight); the router stays frozen (LoRA never wraps
  it, full fine-tuning leaves it out) unless `finetune.train_router` asks for it: retraining the routing on a small
  video set moves tokens to experts the rest of the model was not trained with.
"""

from __future__ import annotations

import math
from types import MethodType, SimpleNamespace
from typing import Any

from vidtune.data.families import AudioActivations
from vidtune.data.families.qwen2_5_omni import OmniTokenCounter, Qwen2_5_Omni, RopeIndex, whisper_layer
from vidtune.data.families.qwen2_5_vl import chatml_training_template

N_WINDOW = 50  # the audio encoder's window (config.audio_config.n_window): 2 x 50 mel frames per window


def audio_tokens_for(num_frames: int, n_window: int = N_WINDOW) -> int:
    """Audio tokens for `num_frames` mel frames (the processor's `_get_feat_extract_output_lengths`): per whole
    window of 2 x n_window frames 13, and the rest through the three stride-2 convolutions."""
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

    return int(_get_feat_extract_output_lengths(num_frames, n_window))


class Qwen3OmniTokenCounter(OmniTokenCounter):
    """Qwen2.5-VL's visual arithmetic (16 px patches here), and the sound's: one mel frame per hop of samples,
    capped at the feature extractor's chunk, then the audio encoder's windows and strides."""

    def audio_tokens(self, duration_s: float) -> int:
        extractor = self.processor.feature_extractor
        num_samples = round(duration_s * extractor.sampling_rate)
        frames = min(math.ceil(num_samples / extractor.hop_length), extractor.nb_max_frames)
        return audio_tokens_for(frames, self.processor.n_window)


class Qwen3OmniRopeIndex(RopeIndex):
    """The Qwen3-Omni-MoE thinker's `get_rope_index` with its settings, from the model's config or the processor."""

    def __init__(self, config: Any, spatial_merge_size: int):
        from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as omni

        base = omni.Qwen3OmniMoePreTrainedModelForConditionalGeneration
        self.config, self.spatial_merge_size = config, spatial_merge_size
        for name in ("get_rope_index", "get_llm_pos_ids_for_vision"):
            setattr(self, name, MethodType(getattr(base, name), self))

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
            audio_config=SimpleNamespace(n_window=processor.n_window),
        )
        return cls(settings, processor.video_processor.merge_size)


class Qwen3_Omni_MoE(Qwen2_5_Omni):
    name = "qwen3_omni_moe"
    model_types = ("qwen3_omni_moe_thinker", "qwen3_omni_moe")
    model_class = "Qwen3OmniMoeThinkerForConditionalGeneration"
    chat_template = chatml_training_template(
        None,
        video_placeholder="<|vision_start|><|video_pad|><|vision_end|>",
        image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
        audio_placeholder="<|audio_start|><|audio_pad|><|audio_end|>",
    )
    # attention as linear layers; the experts' fused 3-D weights through `language_model_lora_parameters`
    language_model_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    language_model_lora_parameters = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    router_module = "mlp.gate"
    vision_tower_lora_targets = ("qkv", "proj", "linear_fc1", "linear_fc2")
    audio_tower_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "conv_out", "proj1", "proj2")
    quantization_skip_modules = ("model.visual", "model.audio_tower", "lm_head")
    rope_index = Qwen3OmniRopeIndex
    # the tower's DeepStack features feed the first language layers: its frames are not split across ranks
    splits_sequence = False
    # float positions (a frame between two audio tokens) through packing's integer restarts: not tested yet
    supports_packing = False

    def token_counter(self, processor: Any) -> Qwen3OmniTokenCounter:
        return Qwen3OmniTokenCounter(processor)

    def unused_module_prefixes(self, config: Any) -> tuple[str, ...]:
        return ()

    def audio_activations(self, audio_config: Any) -> AudioActivations:
        """Per window of 2 x n_window mel frames (13 tokens): three stride-2 3x3 convolutions over (mel, time), each
        keeping its input and its GELU's input, conv_out's input (the last GELU's output), then one encoder frame per
        token through Whisper-style layers, ln_post, proj1, its activation and proj2. Checked against the tensors
        autograd keeps on the tiny model (tests/test_memory_plan.py); the front runs on features padded to whole
        windows (up to one more per sound)."""
        a = audio_config
        width, mel, channels = a.d_model, a.num_mel_bins, a.downsample_hidden_size
        window = 2 * a.n_window
        mel_per_token = window / audio_tokens_for(window, a.n_window)
        # (frequency x time) positions per mel frame after each stride-2 convolution
        sizes = [math.ceil(mel / 2**i) / 2**i for i in (1, 2, 3)]
        front = mel + 2 * channels * sum(sizes)  # each convolution's input, each GELU's input
        return AudioActivations(
            front=round(mel_per_token * front),
            front_fp32=0,
            first_input=round(mel_per_token * mel),
            hooked_input=True,  # get_input_embeddings: conv2d1
            **whisper_layer(width, a.encoder_ffn_dim, a.encoder_attention_heads),
            num_layers=a.encoder_layers,
            frames_per_token=1,
            hidden=width,
            after=4 * width,  # ln_post's, proj1's, the activation's and proj2's inputs
            after_fp32=2,
            after_linear_inputs=2 * width,
            checkpointed=True,  # GradientCheckpointingLayer
        )


QWEN3_OMNI_MOE = Qwen3_Omni_MoE()
