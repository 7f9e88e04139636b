"""Peak memory of one training step (forward + backward + AdamW step) of LLaVA-NeXT-Video, LoRA fp32 / LoRA bf16 /
QLoRA (4-bit nf4), built and trained the way `vidtune train` builds it (build.build_model: LoRA, fp32 trainable
weights, checkpointing where the recipe asks; the chunked loss), beside what `--dry-run`'s memory plan estimates.

CPU (default): a small LLaVA-NeXT-Video (the tiny model's vision side, a language model of --hidden-size x
--layers, ~100M parameters by default) on one clip of --frames frames plus 64 text tokens; each case in a fresh
process, measured as the rise of the process's peak resident memory (getrusage ru_maxrss) while the model loads
and the highest resident memory sampled during the step, both over the resident memory before the model loads (so
the step's figure holds the weights, states and activations, and whatever the allocator keeps).

Sharded (CPU, after the table above): LoRA fp32 under launch/accelerate/fsdp2.yaml with 1 and 2 processes (gloo),
launched with `accelerate launch` as train.sh does; each rank reports the bytes of the weights, gradients and AdamW
states it really holds after one step (DTensor shards: this rank's part), the rise of its resident memory, and the
memory plan's per-rank parts for the same launch (`--dry-run --fsdp`). --no-sharded skips it.

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


def sharded_rank(model_dir: str, frames: int) -> None:
    """One rank of an FSDP2 launch (accelerate launch ... --rank-worker): one LoRA fp32 step, the model's own loss
    (the language head is sharded), then this rank's tensor bytes and resident memory as one JSON line."""
    import torch

    torch.set_num_threads(1)
    from vidtune.train.training.build import build_model, build_optimizer
    from vidtune.train.training.distributed import make_accelerator
    from vidtune.train.training.memory_plan import plan_memory
    from vidtune.train.training.model import apply_finetuning, build_on_meta
    from vidtune.train.training.sharding import is_fsdp, local

    recipe = base_recipe(model_dir, CASES["LoRA fp32"])
    accelerator = make_accelerator(recipe)
    before = resident_bytes()
    model, _, _, _ = build_model(recipe, accelerator)
    optimizer, _ = build_optimizer(recipe, model, total_steps=1, fused=False)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    step = batch(accelerator.unwrap_model(model), frames, 64, accelerator.device)
    recipe.data.max_length = step["input_ids"].shape[1]
    with ResidentPeak() as resident:
        model(**step).loss.backward()
        optimizer.step()
    params = list(model.parameters())
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    meta, family = build_on_meta(recipe.model)
    fsdp = is_fsdp(accelerator)
    plan = plan_memory(
        apply_finetuning(meta, family, recipe.finetune), family, recipe, accelerator.num_processes, fsdp=fsdp
    )
    figures = {
        "rank": accelerator.process_index,
        "processes": accelerator.num_processes,
        "sharded": fsdp,
        "weights": sum(local(p).nbytes for p in params),
        "gradients": sum(local(p.grad).nbytes for p in params if p.grad is not None),
        "optimizer": sum(local(v).nbytes for v in states),
        "step_resident": resident.peak - before,
        "planned": [plan.weights, plan.gradients, plan.optimizer],
    }
    print("RANK-RESULT " + json.dumps(figures), flush=True)


def sharded_launch(model_dir: Path, frames: int, processes: int) -> list[dict]:
    """Every rank's figures of one FSDP2 launch (launch/accelerate/fsdp2.yaml, `processes` CPU processes)."""
    import os
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        *("accelerate", "launch", "--config_file", str(REPO / "launch/accelerate/fsdp2.yaml")),
        *("--num_processes", str(processes), "--main_process_port", str(port)),
        *(__file__, "--rank-worker", str(model_dir), "--frames", str(frames)),
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    found = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("RANK-RESULT")]
    if result.returncode != 0 or len(found) != processes:
        raise SystemExit(
            f"sharded launch failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return sorted(found, key=lambda figures: figures["rank"])


def print_sharded(model_dir: Path, frames: int) -> None:
    MB = 1024**2
    print(f"\nLoRA fp32, {frames} frames, launch/accelerate/fsdp2.yaml; per rank: tensors it holds after one step (MB)")
    header = f"{'processes':<17}{'rank':>5}{'weights':>10}{'grads':>8}{'AdamW':>8}{'step RSS GB':>13}"
    print(f"{header}  planned weights / grads / AdamW (MB)")
    for processes in (1, 2):
        for f in sharded_launch(model_dir, frames, processes):
            engine = "FSDP2" if f["sharded"] else "no sharding"
            planned = " / ".join(f"{value / MB:.1f}" for value in f["planned"])
            print(
                f"{f'{processes} ({engine})':<17}{f['rank']:>5}{f['weights'] / MB:>10.1f}{f['gradients'] / MB:>8.1f}"
                f"{f['optimizer'] / MB:>8.1f}{f['step_resident'] / GB:>13.2f}  {planned}"
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
    args = parser.parse_args()
    if args.rank_worker:
        sharded_rank(args.rank_worker, args.frames[0])
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
