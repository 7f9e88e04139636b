"""Start-up measuring pass (probe every clip, count every row's tokens, drop what cannot fit) on a generated corpus
of tiny clips: a first launch (empty cache) with 1 and with N measuring processes, today's path (no cache), and a
relaunch that reads the on-disk cache (data/measure_cache.py). Times only the measuring pass (`measure_and_filter`),
not imports or model load, which no cache removes; extrapolated linearly to 100k clips.

Run:  python benchmarks/measure_startup.py [--clips 2000] [--processes 2] [--workdir /tmp/vidtune-measure]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, seven_b_processor

from vidtune.data import dataset
from vidtune.data.examples import ExampleBuilder
from vidtune.data.families.llava_next_video import LLAVA_NEXT_VIDEO
from vidtune.data.sources import SourceConfig, load_conversations
from vidtune.data.video import SamplingConfig
from vidtune.train.demo.clips import write_video


def corpus(workdir: Path, num_clips: int) -> Path:
    """num_clips 1-3 s 64x64 clips (encoded once, then reused) and a caption corpus naming them."""
    rng = np.random.default_rng(0)
    annotations = workdir / "captions.jsonl"
    with annotations.open("w") as out:
        for index in range(num_clips):
            clip = workdir / "clips" / f"{index:05d}.mp4"
            if not clip.is_file():
                frames = rng.integers(0, 255, (8 * int(rng.integers(1, 4)), 64, 64, 3), dtype=np.uint8)
                write_video(clip, frames, fps=8)
            out.write(json.dumps({"video": str(clip), "caption": f"clip number {index}"}) + "\n")
    return annotations


def timed_pass(rows, measurer: dataset.Measurer, processes: int | None) -> float:
    start = time.perf_counter()
    dataset.measure_and_filter(rows, measurer, num_proc=processes)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vidtune-measure")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cfg = dataset.DataConfig(sampling=SamplingConfig(8), max_length=8192)
    builder = ExampleBuilder(seven_b_processor(args.workdir), LLAVA_NEXT_VIDEO)
    rows = load_conversations([SourceConfig(path=str(corpus(args.workdir, args.clips)))])
    print(f"machine: {machine()}")
    print(f"measuring pass, {len(rows):,} clips (64x64, 1-3 s, H.264)")
    print(f"{'launch':<40}{'seconds':>9}{'ms/clip':>9}{'100k clips, min':>17}")

    def report(name: str, seconds: float) -> None:
        per_clip = seconds / len(rows)
        print(f"{name:<40}{seconds:>9.2f}{per_clip * 1e3:>9.2f}{per_clip * 1e5 / 60:>17.1f}")

    report("today: no cache, 1 process", timed_pass(rows, dataset.Measurer(builder, cfg), None))
    times = {}
    for processes in (1, args.processes):
        os.environ["VIDTUNE_CACHE_DIR"] = tempfile.mkdtemp(dir=args.workdir)  # an empty cache
        times[processes] = timed_pass(rows, dataset.cached_measurer(builder, cfg), processes)
        report(f"first launch, {processes} process(es)", times[processes])
    relaunch = timed_pass(rows, dataset.cached_measurer(builder, cfg), None)
    report("relaunch (cache read back), 1 process", relaunch)
    print(f"relaunch speed-up over a first launch (1 process): {times[1] / relaunch:.1f}x")
    print(f"first launch, {args.processes} processes vs 1: {times[1] / times[args.processes]:.2f}x")
    print(f"re-run: python benchmarks/measure_startup.py --clips {args.clips} --processes {args.processes}")


if __name__ == "__main__":
    main()
