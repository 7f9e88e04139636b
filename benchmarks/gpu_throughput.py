"""Training throughput of LLaVA-NeXT-Video-7B with LoRA on one GPU: tokens/s, samples/s, MFU and peak memory at
8, 16 and 32 frames (the real architecture, random weights, bf16, gradient checkpointing, one sample per step of
frames x 144 video tokens + 256 text tokens, LoRA rank 64 on every attention and MLP projection).

MFU counts model FLOPs, not the recomputation of checkpointing: 4 N per token for the language model under LoRA
(forward 2N, backward to activations 2N; frozen weights get no gradients), attention 3 x 4 L^2 d per layer (forward
and its backward, no discount for the causal mask), and the vision tower's forward 2 N_vision per patch token.
Peak: --peak-tflops, or 989 for H100 SXM / H200, 756 for H100 PCIe, 312 for A100 (bf16 dense).

Run:  python benchmarks/gpu_throughput.py [--frames 8 16 32] [--steps 5]        (needs a GPU)
      python benchmarks/gpu_throughput.py --tiny                                 (the tiny model on CPU: a smoke test)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine

SEVEN_B_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "assets" / "llava_next_video_7b_config.json"
PEAKS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
TEXT_TOKENS = 256


def build(tiny: bool, device: str, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    from vidtune.data.families.llava_next_video import LLAVA_NEXT_VIDEO

    if tiny:
        from vidtune.train.demo.tiny_model import build_tokenizer, tiny_config

        config = tiny_config(build_tokenizer())
    else:
        config = LlavaNextVideoConfig(
            **{k: v for k, v in json.loads(SEVEN_B_CONFIG.read_text()).items() if not k.startswith("_")}
        )
    with torch.device(device):
        model = LlavaNextVideoForConditionalGeneration(config).to(dtype)
    targets = "|".join(LLAVA_NEXT_VIDEO.language_model_lora_targets)
    lora = LoraConfig(r=64, lora_alpha=128, target_modules=rf"model\.language_model\..*\.(?:{targets})")
    model = get_peft_model(model, lora)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, config


def batch_for(config, frames: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    vision = config.vision_config
    per_frame = (vision.image_size // vision.patch_size // config.spatial_pool_stride) ** 2
    video = torch.full((frames * per_frame,), config.video_token_index)
    text = torch.randint(3, 1000, (TEXT_TOKENS,))
    input_ids = torch.cat([text[:32], video, text[32:]]).unsqueeze(0).to(device)
    labels = torch.full_like(input_ids, -100)
    labels[:, -64:] = input_ids[:, -64:]
    pixels = torch.randn(1, frames, 3, vision.image_size, vision.image_size, device=device, dtype=dtype)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values_videos": pixels,
    }


def model_flops(config, tokens: int, frames: int) -> float:
    """FLOPs of one LoRA training step on one sample (see the module docstring); the projector is left out."""
    text, vision = config.text_config, config.vision_config
    hidden, layers = text.hidden_size, text.num_hidden_layers
    kv = hidden * text.num_key_value_heads // text.num_attention_heads  # grouped-query attention shrinks k and v
    language = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * text.intermediate_size)
    language += text.vocab_size * hidden  # the LM head (the embedding is a lookup)
    vision_weights = vision.num_hidden_layers * (
        4 * vision.hidden_size**2 + 2 * vision.hidden_size * vision.intermediate_size
    )
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    return 4 * language * tokens + 12 * layers * tokens**2 * hidden + 2 * vision_weights * patches * frames


def peak_flops(override: float | None) -> float | None:
    if override:
        return override * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAKS.items() if key in name), None)


def measure(model, config, frames: int, steps: int, device: str, dtype: torch.dtype) -> dict[str, float]:
    batch = batch_for(config, frames, device, dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timings = []
    for step in range(steps + 2):  # two warm-up steps
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            timings.append(time.perf_counter() - started)
    seconds = sorted(timings)[len(timings) // 2]
    tokens = batch["input_ids"].shape[1]
    return {
        "frames": frames,
        "tokens": tokens,
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": 1 / seconds,
        "flops": model_flops(config, tokens, frames),
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU (a smoke test, no MFU)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's bf16 dense peak, if not detected")
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.tiny:
        sys.exit("no GPU: run with --tiny for the CPU smoke test")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model, config = build(args.tiny, device, dtype)
    peak = None if args.tiny else peak_flops(args.peak_tflops)
    label = "tiny LLaVA-NeXT-Video (CPU smoke test)" if args.tiny else "LLaVA-NeXT-Video-7B, random weights, bf16"
    print(f"{label}, LoRA r64, gradient checkpointing, 1 sample/step, {machine()}")
    print(f"{'frames':>7}{'tokens':>8}{'step s':>9}{'tokens/s':>10}{'samples/s':>11}{'MFU':>7}{'peak GB':>9}")
    for frames in args.frames:
        row = measure(model, config, frames, args.steps, device, dtype)
        mfu = f"{row['flops'] / row['step_s'] / peak:.1%}" if peak else "n/a"
        print(
            f"{frames:>7}{row['tokens']:>8}{row['step_s']:>9.3f}{row['tokens_per_s']:>10.0f}"
            f"{row['samples_per_s']:>11.2f}{mfu:>7}{row['peak_gb']:>9.1f}"
        )
    print(
        f"re-run: python benchmarks/gpu_throughput.py --frames {' '.join(map(str, args.frames))} --steps "
        f"{args.steps}" + (" --tiny" if args.tiny else "")
    )


if __name__ == "__main__":
    main()
