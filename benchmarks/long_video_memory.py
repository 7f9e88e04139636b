"""Memory per rank of one long video sample at sequence parallelism 1 and 2 (train.sequence_parallel): what autograd
keeps for backward on each rank (all of it, and the vision tower's part), and on a GPU the peak allocated memory,
tokens/s and MFU of a training step.

Each degree is its own launch of this script (`accelerate launch --config_file launch/accelerate/zero2.yaml
--num_processes N`, DeepSpeed ZeRO-2, as `launch/train.sh` launches), which builds the run exactly as `vidtune
train` does (loop.setup) and times its train_step on the same sample: one step to warm up, one measured. Saved
bytes are counted with autograd's saved-tensor hooks (each storage once, weights left out).

CPU (default): the tiny Qwen2.5-VL (train/demo) on one generated clip of --frames frames at --px x --px (one token
per 28 x 28 px per 2 frames); processes talk over gloo (DS_ACCELERATOR=cpu).
GPU (--gpu): Qwen2.5-VL-7B's architecture (tests/assets/qwen2_5_vl_7b_config.json, random bf16 weights written once
to --checkpoint-dir), LoRA (vision tower too) with gradient checkpointing, at 128, 256 and 512 frames of
448 x 448 px (256 tokens per 2 frames: 16k, 33k and 66k video tokens), SP 1 / 2 / 4 on as many GPUs; MFU from
vidtune's own FLOP count.

Run:  python benchmarks/long_video_memory.py [--frames 64 --px 112] [--sp 1 2]
      python benchmarks/long_video_memory.py --gpu [--frames 128 256 512] [--sp 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine

GB = 1024**3
GPU_SETTINGS = ["model.dtype=bfloat16", "train.mixed_precision=bf16", "model.gradient_checkpointing=true"]


def prepare(workdir: Path, frames: int, px: int, gpu: bool, checkpoint_dir: Path) -> Path:
    """The model folder, one clip and a one-row corpus; returns the recipe path."""
    from vidtune.train.demo.clips import write_color_clip
    from vidtune.train.demo.tiny_model import build_tiny_model
    from vidtune.train.training.config import load_recipe, recipe_to_yaml

    workdir.mkdir(parents=True, exist_ok=True)
    model = checkpoint_dir if gpu else workdir / "tiny-qwen2_5_vl"
    if not (model / "config.json").is_file():
        build_tiny_model(model, family="qwen2_5_vl")
        if gpu:  # the 7B's architecture in place of the tiny one, random bf16 weights (the processor stays)
            import torch
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

            config_json = (REPO / "tests/assets/qwen2_5_vl_7b_config.json").read_text()
            config = Qwen2_5_VLConfig.from_dict(json.loads(config_json))
            Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(model)
    clip = write_color_clip(workdir / f"clip_{frames}.mp4", ["red", "green", "blue", "yellow"], frames / 4, 8, px, px)
    rows = workdir / f"rows_{frames}.jsonl"
    answer = "red then green then blue then yellow"
    row = json.dumps({"video": str(clip), "question": "Which colors, in order?", "answer": answer})
    rows.write_text(f"{row}\n{row}\n")  # two batches: a warm-up step and a measured one
    recipe = load_recipe(
        None,
        [
            f"model.name_or_path={model}",
            f"data.sources=[{{path: {rows}}}]",
            f"data.sampling.num_frames={frames}",
            f"data.max_length={frames * (px // 28) ** 2 // 2 + 256}",
            "data.num_workers=0",
            f"model.frame_limits.max_pixels_per_frame={px * px}",
            f"train.output_dir={workdir / 'out'}",
            "train.max_steps=2",
            "train.batch_size=1",
            "train.log_every_steps=1",
            "logging.report_to=none",
            "finetune.vision_tower=lora",  # the tower's activations are kept for backward: its split shows
            *(GPU_SETTINGS if gpu else ["train.mixed_precision=no"]),
        ],
    )
    path = workdir / f"recipe_{frames}.yaml"
    path.write_text(recipe_to_yaml(recipe))
    return path


def worker(recipe_path: str, sp: int, out: str) -> None:
    """One rank: build the run as `vidtune train` does, warm up one step, measure the next."""
    import torch

    from vidtune.train.training.config import load_recipe
    from vidtune.train.training.flops import peak_tflops
    from vidtune.train.training.loop import setup, train_step

    run = setup(load_recipe(recipe_path, [f"train.sequence_parallel={sp}", f"train.output_dir={out}/{sp}"]))
    acc = run.accelerator
    model = acc.unwrap_model(run.model)
    tower = (model.get_base_model() if hasattr(model, "get_base_model") else model).model.visual
    weights = {p.untyped_storage().data_ptr() for p in run.model.parameters()}
    saved: dict[int, int] = {}
    vision: set[int] = set()
    inside = [False]
    tower.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    tower.register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
            if inside[0]:
                vision.add(storage.data_ptr())
        return tensor

    batches = iter(run.train_loader)
    run.model.train()
    train_step(run, [next(batches)])  # warm-up
    batch = next(batches)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        figures = train_step(run, [batch])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else float("nan")
    tokens, flops = float(figures["tokens"]), float(figures["flops"])
    row = {
        "rank": acc.process_index,
        "saved_gb": sum(saved.values()) / GB,
        "vision_saved_gb": sum(saved[p] for p in vision) / GB,
        "peak_allocated_gb": peak,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "mfu": flops / seconds / (peak_tflops() * 1e12 * acc.num_processes) if peak_tflops() else None,
    }
    rows = acc.gather_for_metrics([row], use_gather_object=True)
    if acc.is_main_process:
        Path(out, f"sp{sp}.json").write_text(json.dumps(rows) + "\n")


def launch(recipe: Path, sp: int, out: Path) -> list[dict]:
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    if "cuda" not in os.environ.get("DS_ACCELERATOR", "cpu"):
        env["DS_ACCELERATOR"] = "cpu" if not _has_gpu() else "cuda"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/accelerate/zero2.yaml"),
        "--num_processes", str(sp), "--main_process_port", str(29700 + sp),
        __file__, "--worker", str(recipe), "--sp", str(sp), "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=not os.environ.get("VERBOSE"))
    return json.loads((out / f"sp{sp}.json").read_text())


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="Qwen2.5-VL-7B's architecture on GPUs")
    parser.add_argument("--frames", type=int, nargs="+")
    parser.add_argument("--px", type=int, help="frame edge in pixels (a multiple of 28)")
    parser.add_argument("--sp", type=int, nargs="+", help="sequence-parallel degrees (1 = one process)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vidtune-long-video"))
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp/qwen2.5-vl-7b-random"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.sp[0], args.out)
        return
    frames = args.frames or ([128, 256, 512] if args.gpu else [64])
    px = args.px or (448 if args.gpu else 112)
    degrees = args.sp or ([1, 2, 4] if args.gpu else [1, 2])
    print(f"machine: {machine()}")
    print("frames  SP  rank  tokens  saved MB  of which vision  peak alloc GB  tokens/s  MFU")
    for count in frames:
        recipe = prepare(args.workdir, count, px, args.gpu, args.checkpoint_dir)
        for sp in degrees:
            for row in launch(recipe, sp, args.workdir / "results"):
                mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
                print(
                    f"{count:6d}  {sp:2d}  {row['rank']:4d}  {row['tokens']:6.0f}  {row['saved_gb'] * 1024:8.1f}  "
                    f"{row['vision_saved_gb'] * 1024:15.1f}  {row['peak_allocated_gb']:13.2f}  "
                    f"{row['tokens_per_s']:8.0f}  {mfu}"
                )


if __name__ == "__main__":
    main()
