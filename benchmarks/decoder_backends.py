"""Decoder throughput per backend, side by side in one run: TorchCodec, decord and PyAV each open a clip (probe
included), sample N frames (evaluation sampling) and return them upright at the 7B's 336 px shortest edge, the
work `load_clip` does for every training sample. Backends run interleaved over rounds (benchmarks/common.py), on
the shared clips and on generated 360p clips of 10 s, 60 s and (with --long) 10 min with 2 s GOPs.

Run:  python benchmarks/decoder_backends.py [--frames 8 32] [--rounds 5] [--long] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Spread, add_shared_argument, generated_clip, interleaved, machine, shared_clips, speedup

from vidtune.data.video import SamplingConfig, VideoError, available_backends, load_clip

SHORTEST_EDGE = 336
SHARED = ("bikes.mp4", "carphone.mp4", "bigbuckbunny_720p.mp4")


def clips(workdir: Path, shared: str | None, quick: bool, long: bool) -> dict[str, Path]:
    if quick:
        return {"generated 2 s 320x240": generated_clip(workdir / "q2.mp4", 2, height=240, width=320)}
    found = {f"shared {name}": path for name, path in shared_clips(SHARED, shared).items()}
    lengths = [10, 60] + ([600] if long else [])
    for seconds in lengths:
        label = f"generated {seconds // 60} min 360p" if seconds >= 60 else f"generated {seconds} s 360p"
        found[label] = generated_clip(workdir / f"g{seconds}_360p.mp4", seconds, height=360, width=640)
    return found


def readable(path: Path, backends: list[str], num_frames: int) -> list[str]:
    """The backends that read this clip (a refusal is said, never timed)."""
    usable = []
    for backend in backends:
        try:
            load_clip(str(path), SamplingConfig(num_frames, backend=backend), shortest_edge=SHORTEST_EDGE)
            usable.append(backend)
        except VideoError as err:
            print(f"  {backend} refuses {path.name}: {err}")
    return usable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--long", action="store_true", help="also a generated 10-minute clip (slow to encode)")
    parser.add_argument("--quick", action="store_true", help="a tiny generated clip only (used by the tests)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vidtune-bench"))
    add_shared_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker's budget
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    backends = available_backends()
    print(f"decoder backends, ms per clip (open + sample + decode to {SHORTEST_EDGE} px), min/median/max over")
    print(f"{args.rounds} interleaved rounds; {machine()}; backends here: {', '.join(backends)}")
    for name, path in clips(workdir, args.shared, args.quick, args.long).items():
        for num_frames in args.frames:
            usable = readable(path, backends, num_frames)

            def decode(backend: str, n: int = num_frames, clip: Path = path):
                return lambda: load_clip(str(clip), SamplingConfig(n, backend=backend), shortest_edge=SHORTEST_EDGE)

            seconds = interleaved({b: decode(b) for b in usable}, args.rounds)
            print(f"{name}, {num_frames} frames")
            for backend in usable:
                ms = Spread.of(1000 * s for s in seconds[backend]).format(1, " ms")
                ratio = speedup(seconds, backend, "pyav").format(2, "x") if "pyav" in usable else "n/a"
                print(f"  {backend:<11} {ms:>22}   x pyav {ratio}")
    frames = " ".join(str(n) for n in args.frames)
    print(
        f"re-run: python benchmarks/decoder_backends.py --frames {frames} --rounds {args.rounds}"
        + " --long" * args.long
    )


if __name__ == "__main__":
    main()
