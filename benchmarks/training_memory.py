"""Peak memory of one training step (forward + backward + AdamW step) of LLaVA-NeXT-Video, LoRA fp32 / LoRA bf16 /
QLoRA (4-bit nf4), built and trained the way `vidtune train` builds it (build.build_model: LoRA, fp32 trainable
weights, checkpointing where the recipe asks; the chunked loss), beside what `--dry-run`'s memory plan estimates.

CPU (default): a small LLaVA-NeXT-Video (the tiny model's vision side, a language model of --hidden-size x
--layers, ~100M parameters by default) on one clip of --frames frames plus 64 text tokens; each case in a fresh
process, measured as the rise of the process's peak resident memory (getrusage ru_maxrss) while the model loads
and the highest resident memory sampled during the step, both over the resident memory before the model loads (so
the step's figure holds the weights, states and activations, and whatever the allocator keeps).

Sharded (CPU, after the table above): LoRA fp32 under launch/accelerate/fsdp2.yaml with 1 and 2 processes, and
LoRA fp32 and bf16 under launch/accelerate/zero3.yaml (DeepSpeed ZeRO-3) with 2 processes, all over gloo, launched
with `accelerate launch` as train.sh does; each rank reports the bytes of the weights, gradients and AdamW states
it really holds after one step (FSDP2: its DTensor shards; ZeRO-3: the partitions and fp32 masters DeepSpeed keeps,
see zero3_bytes), the rise of its resident memory, and the memory plan's per-rank parts for the same launch
(`--dry-run --num-processes N` with `--fsdp` or `--zero-stage 3`). --no-sharded skips it.

GPU (--gpu): the real 7B architecture (tests/assets/llava_next_video_7b_config.json) at 16, 32 and 64 frames
(144 tokens each + 64 text tokens), measured with torch.cuda.max_memory_allocated. The weights are random: a
bf16 checkpoint of them is written once to --checkpoint-dir (~14 GB) so that QLoRA quantizes them as they load,
as it does a downloaded checkpoint.

Run:  python benchmarks/training_memory.py [--frames 8] [--hidden-size 1024] [--layers 8] [--no-sharded]
      python benchmarks/training_memory.py --gpu [--frames 16 32 64] [--checkpoint-dir /tmp/llava-7b-random]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine

PAGE_BYTES = 4096
GB = 1024**3
CASES = {
    "LoRA fp32": ["model.dtype=float32", "train.mixed_precision=no"],
    "LoRA bf16": ["model.dtype=bfloat16", "train.mixed_precision=bf16"],
    "QLoRA nf4 (bf16 compute)": ["model.dtype=bfloat16", "train.mixed_precision=bf16", "model.quantization.bits=4"],
}


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


def write_model(folder: Path, hidden_size: int, layers: int, gpu: bool) -> Path:
    """A model folder: the 7B's architecture (GPU) or the tiny model's with a larger language model (CPU)."""
    import torch
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    from vidtune.train.demo.tiny_model import build_tiny_model

    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    tiny = build_tiny_model(folder / "tiny")  # its processor files serve both (a dry run's audit reads them)
    if gpu:
        config = LlavaNextVideoConfig.from_dict(
            json.loads((REPO / "tests/assets/llava_next_video_7b_config.json").read_text())
        )
    else:
        config = LlavaNextVideoConfig.from_pretrained(tiny)
        text = config.text_config
        text.hidden_size, text.num_hidden_layers = hidden_size, layers
        text.intermediate_size, text.num_attention_heads = hidden_size * 11 // 4, hidden_size // 64
        text.num_key_value_heads, text.head_dim = hidden_size // 64, 64
    with torch.device("cuda" if gpu else "cpu"):
        model = LlavaNextVideoForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for name in (tiny).iterdir():
        if name.name not in ("config.json",) and not name.name.endswith(".safetensors"):
            (folder / name.name).write_bytes(name.read_bytes())
    return folder


def batch(model, frames: int, text_tokens: int, device):  # type: ignore[no-untyped-def]
    """One clip of `frames` frames and `text_tokens` labelled text tokens, as the collator shapes it."""
    import torch

    config = model.config
    vision = config.vision_config
    per_frame = (vision.image_size // vision.patch_size // config.spatial_pool_stride) ** 2
    video = torch.full((1, frames * per_frame), config.video_token_index)
    text = torch.randint(5, 100, (1, text_tokens))
    ids = torch.cat([video, text], dim=1)
    labels = torch.cat([torch.full_like(video, -100), text], dim=1)
    pixels = torch.randn(1, frames, 3, vision.image_size, vision.image_size)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
        "pixel_values_videos": pixels.to(device, model.dtype),
    }


class ResidentPeak:
    """The highest resident memory seen while inside (sampled every millisecond by a thread): ru_maxrss cannot be
    reset, and would report the load's peak (CPU QLoRA reads bf16 weights before quantizing them) instead."""

    def __enter__(self) -> ResidentPeak:
        import threading

        self.peak, self.done = resident_bytes(), threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, resident_bytes())


def one_case(model_dir: str, overrides: list[str], frames: int, gpu: bool) -> tuple[float, float, float]:
    """(peak GB while loading, peak GB of the training step, planned GB) in a fresh process."""
    import torch

    from vidtune.train.training import quantization  # noqa: F401  (first: it quiets bitsandbytes' kernel lookup)

    torch.set_num_threads(2)
    from vidtune.train.training.build import build_model, build_optimizer
    from vidtune.train.training.config import load_recipe
    from vidtune.train.training.distributed import make_accelerator, resolve_mixed_precision
    from vidtune.train.training.loss import ChunkedLoss, language_head
    from vidtune.train.training.memory_plan import plan_memory
    from vidtune.train.training.model import apply_finetuning, build_on_meta

    recipe = load_recipe(
        None,
        [
            f"model.name_or_path={model_dir}",
            "train.output_dir=unused",
            "data.sources=[{path: unused.jsonl}]",
            "model.gradient_checkpointing=true",
            "finetune.lora.rank=64",
            *overrides,
        ],
    )
    accelerator = make_accelerator(recipe)
    before = resident_bytes()
    model, _, _, _ = build_model(recipe, accelerator)
    model.train()
    optimizer, _ = build_optimizer(recipe, model, total_steps=1, fused=gpu)
    step = batch(model, frames, 64, accelerator.device)
    recipe.data.max_length = step["input_ids"].shape[1]
    if gpu:
        loading = torch.cuda.max_memory_allocated() / GB
        torch.cuda.reset_peak_memory_stats()
    else:
        loading = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / GB
    with ResidentPeak() as resident:
        with accelerator.autocast():
            loss = ChunkedLoss(language_head(model), accelerator.autocast)(model, step)
        loss.backward()
        optimizer.step()
    measured = torch.cuda.max_memory_allocated() / GB if gpu else (resident.peak - before) / GB
    meta, fam = build_on_meta(recipe.model)
    mixed = resolve_mixed_precision(recipe.train.mixed_precision)
    plan = plan_memory(apply_finetuning(meta, fam, recipe.finetune), fam, recipe, mixed_precision=mixed)
    return loading, measured, plan.total / GB


def base_recipe(model_dir: str, overrides: list[str]):  # type: ignore[no-untyped-def]
    from vidtune.train.training.config import load_recipe

    return load_recipe(
        None,
        [
            f"model.name_or_path={model_dir}",
            "train.output_dir=unused",
            "data.sources=[{path: unused.jsonl}]",
            "model.gradient_checkpointing=true",
            "finetune.lora.rank=64",
            *overrides,
        ],
    )


def sharded_rank(model_dir: str, frames: int, case: str) -> None:
    """One rank of a sharded launch (accelerate launch ... --rank-worker): one step of `case`, then this rank's tensor
    bytes and resident memory as one JSON line. FSDP2: LoRA, the model's own loss (the language head is sharded)."""
    import torch

    torch.set_num_threads(1)
    from vidtune.train.training.build import build_model, build_optimizer
    from vidtune.train.training.distributed import make_accelerator, zero_stage
    from vidtune.train.training.sharding import is_fsdp, local

    recipe = base_recipe(model_dir, CASES[case])
    accelerator = make_accelerator(recipe)
    before = resident_bytes()
    model, _, _, _ = build_model(recipe, accelerator)
    optimizer, _ = build_optimizer(recipe, model, total_steps=1, fused=False)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    step = batch(accelerator.unwrap_model(model), frames, 64, accelerator.device)
    recipe.data.max_length = step["input_ids"].shape[1]
    with ResidentPeak() as resident:
        with accelerator.autocast():
            loss = model(**step).loss
        accelerator.backward(loss)  # DeepSpeed: the engine's backward and step
        optimizer.step()
    fsdp, stage = is_fsdp(accelerator), zero_stage(accelerator)
    if stage == 3:
        held = zero3_bytes(model)
    else:
        params = list(model.parameters())
        states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
        held = {
            "weights": sum(local(p).nbytes for p in params),
            "gradients": sum(local(p.grad).nbytes for p in params if p.grad is not None),
            "optimizer": sum(local(v).nbytes for v in states),
        }
    figures = {
        "rank": accelerator.process_index,
        "processes": accelerator.num_processes,
        "engine": "ZeRO-3" if stage == 3 else "FSDP2" if fsdp else "no sharding",
        **held,
        "step_resident": resident.peak - before,
    }
    print("RANK-RESULT " + json.dumps(figures), flush=True)


def zero3_bytes(engine) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """The bytes DeepSpeed's ZeRO-3 holds on this rank after a step (deepspeed/runtime/zero/stage3.py), each storage
    counted once: weights, this rank's partition of every parameter (`ds_tensor`; the trainable ones are views of one
    flat buffer) plus the small parameters it keeps gathered (under stage3_param_persistence_threshold); gradients,
    the partitioned gradient buffer the reduce-scatters accumulate into (`grad_partitions_flat_buffer`, in the
    gradient accumulation dtype); optimizer, the fp32 master partitions (`fp32_partitioned_groups_flat`, the weights'
    own buffer when those are fp32) and the optimizer's states on them (`optimizer.state`: exp_avg, exp_avg_sq)."""
    import torch

    zero = engine.optimizer
    seen: set[int] = set()

    def held(tensors) -> int:  # type: ignore[no-untyped-def]
        total = 0
        for tensor in tensors:
            if tensor is None or not torch.is_tensor(tensor) or tensor.dim() == 0 or tensor.numel() == 0:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    params = list(engine.module.parameters())
    weights = held(p.ds_tensor for p in params) + held(p.data for p in params)  # (gathered: persistent ones)
    gradients = held([zero.grad_partitions_flat_buffer])
    states = [v for state in zero.optimizer.state.values() for v in state.values()]
    optimizer = held(zero.fp32_partitioned_groups_flat) + held(states)
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer}


SHARDED = [  # (launch config, processes, case)
    ("fsdp2.yaml", 1, "LoRA fp32"),
    ("fsdp2.yaml", 2, "LoRA fp32"),
    ("zero3.yaml", 2, "LoRA fp32"),
    ("zero3.yaml", 2, "LoRA bf16"),
]


def planned_parts(model_dir: Path, config: str, processes: int, case: str) -> list[int]:
    """The dry run's per-rank weights, gradients and optimizer bytes for that launch (`vidtune train --dry-run
    --num-processes N` with `--fsdp` or `--zero-stage 3`), computed here: under a ZeRO-3 launch even the meta model
    would be built inside deepspeed.zero.Init."""
    from vidtune.train.training.distributed import resolve_mixed_precision
    from vidtune.train.training.memory_plan import plan_memory
    from vidtune.train.training.model import apply_finetuning, build_on_meta

    recipe = base_recipe(str(model_dir), CASES[case])
    meta, family = build_on_meta(recipe.model)
    zero3 = config.startswith("zero3")
    plan = plan_memory(
        apply_finetuning(meta, family, recipe.finetune),
        family,
        recipe,
        processes,
        zero_stage=3 if zero3 else 0,
        deepspeed=zero3,
        mixed_precision=resolve_mixed_precision(recipe.train.mixed_precision),
        fsdp=config.startswith("fsdp") and processes > 1,
    )
    return [plan.weights, plan.gradients, plan.optimizer]


def sharded_launch(model_dir: Path, frames: int, config: str, processes: int, case: str) -> list[dict]:
    """Every rank's figures of one launch (launch/accelerate/CONFIG, `processes` CPU processes over gloo)."""
    import os
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        *("accelerate", "launch", "--config_file", str(REPO / "launch/accelerate" / config)),
        *("--num_processes", str(processes), "--main_process_port", str(port)),
        *(__file__, "--rank-worker", str(model_dir), "--frames", str(frames), "--rank-case", case),
    ]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
    }
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    # (the ranks share one stdout: their lines may run into each other)
    found = [json.loads(figures) for figures in re.findall(r"RANK-RESULT (\{[^{}]*\})", result.stdout)]
    if result.returncode != 0 or len(found) != processes:
        raise SystemExit(
            f"sharded launch failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return sorted(found, key=lambda figures: figures["rank"])


def print_sharded(model_dir: Path, frames: int) -> None:
    MB = 1024**2
    print(f"\n{frames} frames, launch/accelerate/CONFIG; per rank: tensors it holds after one step (MB)")
    header = f"{'config':<12}{'case':<11}{'processes':<17}{'rank':>5}{'weights':>10}{'grads':>8}{'Adam':>8}"
    print(f"{header}{'step RSS GB':>13}  planned weights / grads / Adam (MB)")
    for config, processes, case in SHARDED:
        planned = " / ".join(f"{value / MB:.1f}" for value in planned_parts(model_dir, config, processes, case))
        for f in sharded_launch(model_dir, frames, config, processes, case):
            launched = f"{processes} ({f['engine']})"
            print(
                f"{config:<12}{case:<11}{launched:<17}{f['rank']:>5}{f['weights'] / MB:>10.1f}"
                f"{f['gradients'] / MB:>8.1f}{f['optimizer'] / MB:>8.1f}{f['step_resident'] / GB:>13.2f}  {planned}"
            )


def measure(*args: object) -> tuple[float, float, float]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(one_case, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the 7B architecture on the GPU")
    parser.add_argument("--frames", type=int, nargs="+", help="frames per clip (default: 8 on CPU, 16 32 64 on GPU)")
    parser.add_argument("--hidden-size", type=int, default=1024, help="CPU: the language model's hidden size")
    parser.add_argument("--layers", type=int, default=8, help="CPU: the language model's layers")
    parser.add_argument("--checkpoint-dir", default="/tmp/vidtune-training-memory", help="model folder (reused)")
    parser.add_argument("--no-sharded", action="store_true", help="CPU: skip the FSDP2 1- and 2-process launches")
    parser.add_argument("--rank-worker", help=argparse.SUPPRESS)  # (one rank of a sharded launch: its model folder)
    parser.add_argument("--rank-case", default="LoRA fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        sharded_rank(args.rank_worker, args.frames[0], args.rank_case)
        return
    frames = args.frames or ([16, 32, 64] if args.gpu else [8])
    model_dir = write_model(Path(args.checkpoint_dir), args.hidden_size, args.layers, args.gpu)
    print(f"machine: {machine()}")
    what = "LLaVA-NeXT-Video-7B" if args.gpu else f"LLaVA-NeXT-Video, {args.layers} x {args.hidden_size} LM"
    print(f"peak memory of one training step, {what}, LoRA rank 64, gradient checkpointing")
    print(f"{'case':<28}{'frames':>8}{'loading GB':>12}{'step GB':>10}{'planned GB':>12}")
    for count in frames:
        for case, overrides in CASES.items():
            loading, measured, planned = measure(str(model_dir), overrides, count, args.gpu)
            print(f"{case:<28}{count:>8}{loading:>12.2f}{measured:>10.2f}{planned:>12.2f}")
    if not args.gpu and not args.no_sharded:
        print_sharded(model_dir, frames[0])
    flags = "--gpu " if args.gpu else f"--hidden-size {args.hidden_size} --layers {args.layers} "
    print(f"re-run: python benchmarks/training_memory.py {flags}--frames {' '.join(map(str, frames))}")


if __name__ == "__main__":
    main()
