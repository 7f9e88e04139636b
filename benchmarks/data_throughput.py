"""Data-path throughput: samples/s through decode, frame sampling, processing (LLaVA-NeXT-Video-7B's 336 px video
pipeline, 144 tokens per frame) and collation, one process, one thread, on the shared real clips and on generated
720p clips with 2 s GOPs, encoded two ways (x264 ultrafast: no B-frames, the cheapest to decode; and "camera": x264
medium with B-frames, as encoders and cameras write them). Four ways, interleaved round by round (common.py):

  seed        the seed snippet: OpenCV decodes every frame, converts and keeps every one, then takes every k-th
  decode-all  a fair decode-everything baseline: OpenCV decodes every frame (one thread) but converts only the
              kept ones (grab/retrieve), so memory holds 8 frames, not the whole clip
  vidtune     seek-based decoding of only the sampled frames, scaled by the decoder (data/video.py)
  cached      vidtune with a warm frame cache (data/frame_cache.py); what filling it costs is its own row

Each figure is min/median/max over rounds; ratios are paired per round.

Run:  python benchmarks/data_throughput.py [--frames 8] [--rounds 3] [--seconds 10 60] [--shared DIR] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ENCODINGS,
    add_shared_argument,
    generated_clip,
    interleaved,
    machine,
    rates,
    seven_b_processor,
    shared_clips,
    speedup,
)

from vidtune.data.collator import Collator
from vidtune.data.conversation import media_part, message, text_part
from vidtune.data.examples import ExampleBuilder
from vidtune.data.families.llava_next_video import LLAVA_NEXT_VIDEO
from vidtune.data.frame_cache import FrameCache, FrameCacheConfig
from vidtune.data.video import SamplingConfig, load_clip

BATCH = 4
SHARED_CLIPS = ("bikes.mp4", "carphone.mp4", "bigbuckbunny_720p.mp4")


def kept_indices(num_frames_in_file: int, num_frames: int) -> list[int]:
    """The seed snippet's choice: every k-th frame, k = frames in the file // frames wanted."""
    step = max(1, num_frames_in_file // num_frames)
    return list(range(0, num_frames_in_file, step))[:num_frames]


def seed_frames(path: str, num_frames: int) -> np.ndarray:
    """The seed snippet as it was: decode and convert every frame with OpenCV, keep them all, then pick."""
    import cv2

    capture = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return np.stack([frames[i] for i in kept_indices(len(frames), num_frames)])


def seed_bytes(path: str) -> int:
    """What the seed's list of every frame as RGB weighs (its peak memory per sample, beside the decoder)."""
    import cv2

    capture = cv2.VideoCapture(path)
    props = (cv2.CAP_PROP_FRAME_COUNT, cv2.CAP_PROP_FRAME_HEIGHT, cv2.CAP_PROP_FRAME_WIDTH)
    count, height, width = (int(capture.get(prop)) for prop in props)
    capture.release()
    return count * height * width * 3


def decode_all_frames(path: str, num_frames: int) -> np.ndarray:
    """Decode every frame (grab: the decoder must, without seeking) but convert only the kept ones (retrieve),
    one decode thread like vidtune's DataLoader workers."""
    import cv2

    capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    wanted = set(kept_indices(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), num_frames))
    frames, index = [], 0
    while capture.grab():
        if index in wanted:
            frames.append(cv2.cvtColor(capture.retrieve()[1], cv2.COLOR_BGR2RGB))
        index += 1
    capture.release()
    return np.stack(frames)


def batch_of(read_frames: Callable[[str], np.ndarray], path: str, builder: ExampleBuilder) -> Callable[[], object]:
    """One call = one collated batch of BATCH samples of the clip (each decoded, processed, then collated)."""
    conversation = [
        message("user", [media_part("video", path), text_part("What happens in this video?")]),
        message("assistant", [text_part("A colour gradient slides to the right.")]),
    ]
    collate = Collator(builder.tokenizer.pad_token_id, family=builder.family)
    return lambda: collate([builder.build(conversation, {0: read_frames(path)}) for _ in range(BATCH)])


def cache_fill(cache: FrameCache, path: str, scratch: Path) -> Callable[[], object]:
    """One call = filling the cache for the clip from scratch (decode its frame grid, write it)."""
    return lambda: cache.fill(path, None, None, scratch / "fill.npy", scratch / "fill.json")


def clips(workdir: Path, args: argparse.Namespace) -> dict[str, Path]:
    if args.quick:
        return {"generated 2 s 320x240": generated_clip(workdir / "q2.mp4", 2, height=240, width=320)}
    found = {f"shared {name}": path for name, path in shared_clips(SHARED_CLIPS, args.shared).items()}
    for seconds in args.seconds:
        for encoding in args.encodings:
            path = workdir / f"g{seconds:g}_{encoding}.mp4"
            found[f"generated {seconds:g} s 720p {encoding}"] = generated_clip(path, seconds, encoding=encoding)
    return found


def measure_clip(name: str, path: Path, builder: ExampleBuilder, cache: FrameCache, args: argparse.Namespace) -> None:
    n = args.frames
    ways = {
        "seed": batch_of(lambda p: seed_frames(p, n), str(path), builder),
        "decode-all": batch_of(lambda p: decode_all_frames(p, n), str(path), builder),
        "vidtune": batch_of(
            lambda p: load_clip(p, cache.sampling, shortest_edge=builder.frame_px).frames, str(path), builder
        ),
        "cached": batch_of(lambda p: cache.load(p).frames, str(path), builder),
        "cache fill": cache_fill(cache, str(path), Path(cache.root)),
    }
    cache.load(str(path))  # the cached way reads a warm cache; its cost is the "cache fill" row
    seconds = interleaved(ways, args.rounds, args.warmup_rounds)
    print(f"{name} (the seed holds {seed_bytes(str(path)) / 1e9:.2f} GB of RGB frames per sample)")
    for way in ("seed", "decode-all", "vidtune", "cached"):
        vs_seed, vs_fair = speedup(seconds, way, "seed"), speedup(seconds, way, "decode-all")
        print(
            f"  {way:<12}{rates(seconds[way], BATCH).format(2):>22}"
            f"{vs_seed.format(1, 'x'):>20}{vs_fair.format(1, 'x'):>20}"
        )
    fill_ms = [1000 * s for s in seconds["cache fill"]]
    print(f"  {'cache fill':<12}{f'{min(fill_ms):.0f}/{np.median(fill_ms):.0f}/{max(fill_ms):.0f} ms per clip':>22}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs every way once, interleaved")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--seconds", type=float, nargs="+", default=[10, 60], help="lengths of the generated clips")
    parser.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=list(ENCODINGS))
    parser.add_argument("--quick", action="store_true", help="a tiny generated clip only (used by the tests)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vidtune-bench"))
    add_shared_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one process, one thread: the DataLoader worker's budget
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    builder = ExampleBuilder(seven_b_processor(workdir), LLAVA_NEXT_VIDEO)
    print(f"data path, samples/s (decode + sample {args.frames} frames + 336 px processing + collate), {machine()}")
    rounds = f"{args.rounds} rounds after {args.warmup_rounds} warm-up"
    print(f"batches of {BATCH} samples, {rounds}, interleaved; min/median/max")
    print(f"  {'way':<12}{'samples/s':>22}{'x seed':>20}{'x decode-all':>20}")
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = FrameCache(FrameCacheConfig(dir=cache_dir), SamplingConfig(args.frames), builder.frame_px)
        for name, path in clips(workdir, args).items():
            measure_clip(name, path, builder, cache, args)
    print(f"re-run: python benchmarks/data_throughput.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
