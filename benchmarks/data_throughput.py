"""Data-path throughput: samples/s through decode, frame sampling, processing (LLaVA-NeXT-Video-7B's 336 px video
pipeline, 144 tokens per frame) and collation, one process, on the shared real clips and on generated 10 s and 60 s
720p clips with 2 s GOPs. Three ways, measured in the same run on the same cores:

  seed      OpenCV decodes every frame of the file, keeps every k-th (the approach this project started from)
  vidtune   seek-based decoding of only the sampled frames (decord, PyAV fallback), scaled by the decoder
  cached    vidtune with a warm frame cache (data/frame_cache.py)

Run:  python benchmarks/data_throughput.py [--frames 8] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import generated_clip, machine, seven_b_processor

from vidtune.data.collator import Collator
from vidtune.data.conversation import media_part, message, text_part
from vidtune.data.examples import ExampleBuilder
from vidtune.data.families.llava_next_video import LLAVA_NEXT_VIDEO
from vidtune.data.frame_cache import FrameCache, FrameCacheConfig
from vidtune.data.video import SamplingConfig, load_clip

BATCH = 4


def seed_frames(path: str, num_frames: int) -> np.ndarray:
    """The seed snippet: decode every frame with OpenCV, keep every k-th."""
    import cv2

    capture = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    step = max(1, len(frames) // num_frames)
    return np.stack(frames[::step][:num_frames])


def samples_per_second(read_frames, path: str, builder: ExampleBuilder, repeats: int) -> float:
    """Build `repeats` batches of BATCH samples of one clip (decode, process, collate); samples per second."""
    conversation = [
        message("user", [media_part("video", path), text_part("What happens in this video?")]),
        message("assistant", [text_part("A colour gradient slides to the right.")]),
    ]
    collate = Collator(builder.tokenizer.pad_token_id, family=builder.family)
    started = time.perf_counter()
    for _ in range(repeats):
        collate([builder.build(conversation, {0: read_frames(path)}) for _ in range(BATCH)])
    return repeats * BATCH / (time.perf_counter() - started)


def clips(workdir: Path, quick: bool) -> dict[str, Path]:
    found: dict[str, Path] = {}
    shared = Path(__file__).resolve().parents[2] / "shared" / "videos"
    for name in ("bikes.mp4", "carphone.mp4", "bigbuckbunny_720p.mp4"):
        if (shared / name).is_file() and not quick:
            found[f"shared {name}"] = shared / name
    if quick:
        found["generated 2 s 320x240"] = generated_clip(workdir / "q2.mp4", 2, height=240, width=320)
    else:
        found["generated 10 s 720p"] = generated_clip(workdir / "g10.mp4", 10)
        found["generated 60 s 720p"] = generated_clip(workdir / "g60.mp4", 60)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="batches of 4 samples per measurement")
    parser.add_argument("--quick", action="store_true", help="a tiny generated clip only (used by the tests)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vidtune-bench"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # one process, one thread: the DataLoader worker's budget
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    processor = seven_b_processor(workdir)
    builder = ExampleBuilder(processor, LLAVA_NEXT_VIDEO)
    sampling = SamplingConfig(args.frames)
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = FrameCache(FrameCacheConfig(dir=cache_dir), sampling, builder.frame_px)
        ways = {
            "seed": lambda p: seed_frames(p, args.frames),
            "vidtune": lambda p: load_clip(p, sampling, shortest_edge=builder.frame_px).frames,
            "cached": lambda p: cache.load(p).frames,
        }
        print(f"data path, samples/s (decode + sample {args.frames} frames + 336 px processing + collate), {machine()}")
        print(f"{'clip':<32}{'seed':>9}{'vidtune':>9}{'cached':>9}{'x seed':>8}{'x cached':>10}")
        for name, path in clips(workdir, args.quick).items():
            cache.load(str(path))  # warm the cache (not timed)
            rates = {way: samples_per_second(read, str(path), builder, args.repeats) for way, read in ways.items()}
            print(
                f"{name:<32}{rates['seed']:>9.2f}{rates['vidtune']:>9.2f}{rates['cached']:>9.2f}"
                f"{rates['vidtune'] / rates['seed']:>7.1f}x{rates['cached'] / rates['seed']:>9.1f}x"
            )
    print(f"re-run: python benchmarks/data_throughput.py --frames {args.frames} --repeats {args.repeats}")


if __name__ == "__main__":
    main()
