"""A battery of frame-index-coded clips encoded the ways real files are (FFmpeg's command line), and a reader of
the code: every frame shows its own index as a 4x4 grid of black/white cells, so the content of any decoded frame
says which frame it is, whatever the backend, its scaling or its rotation.

Cell (0, 0) is always white and the other three corners black, so a sideways or upside-down frame is recognised;
the other 12 cells carry the index (up to 4,095 frames).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GRID = 4
CORNERS = {(0, 0): 1, (0, GRID - 1): 0, (GRID - 1, 0): 0, (GRID - 1, GRID - 1): 0}
BIT_CELLS = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in CORNERS]


def coded_frame(index: int, height: int, width: int) -> np.ndarray:
    """uint8 (height, width, 3): the index as cells, white 235 / black 16 (video range survives every encoder)."""
    cells = np.zeros((GRID, GRID), dtype=np.uint8)
    for (r, c), value in CORNERS.items():
        cells[r, c] = value
    for bit, (r, c) in enumerate(BIT_CELLS):
        cells[r, c] = (index >> bit) & 1
    rows = np.minimum(np.arange(height) * GRID // height, GRID - 1)
    cols = np.minimum(np.arange(width) * GRID // width, GRID - 1)
    plane = np.where(cells[rows][:, cols] == 1, 235, 16).astype(np.uint8)
    return np.repeat(plane[:, :, None], 3, axis=2)


def read_code(frame: np.ndarray) -> int | None:
    """The index a decoded upright frame shows; None when its corners say it is not upright (or unreadable)."""
    luma = frame.astype(np.float32).mean(axis=2)
    height, width = luma.shape
    values = np.zeros((GRID, GRID), dtype=np.uint8)
    for r in range(GRID):
        for c in range(GRID):  # the centre half of each cell: away from blurred edges
            top, bottom = int((r + 0.25) * height / GRID), max(int((r + 0.75) * height / GRID), 1)
            left, right = int((c + 0.25) * width / GRID), max(int((c + 0.75) * width / GRID), 1)
            cell = luma[top : max(bottom, top + 1), left : max(right, left + 1)]
            values[r, c] = cell.mean() > 125
    if any(values[r, c] != v for (r, c), v in CORNERS.items()):
        return None
    return sum(int(values[r, c]) << bit for bit, (r, c) in enumerate(BIT_CELLS))


@dataclass
class BatteryClip:
    name: str
    path: Path
    pts_s: list[float] = field(default_factory=list)  # presentation time of every frame (first = 0)
    height: int = 0  # as displayed
    width: int = 0
    unreadable: str = ""  # the reason a reader must give, for files no backend can read

    @property
    def frame_s(self) -> float:
        return float(np.median(np.diff(self.pts_s))) if len(self.pts_s) > 1 else 1.0


def ffmpeg_available() -> bool:
    return shutil.which("ffmpeg") is not None


def _encode(path: Path, frames: np.ndarray, pts_s: list[float], args: list[str], pix_fmt_in: str = "rgb24") -> None:
    """Raw frames on stdin with their own timestamps (VFR kept: -fps_mode passthrough), encoded by `args`."""
    count, height, width = frames.shape[:3]
    # A timebase of 1 ms for the input; setpts places each frame at its own time.
    times = (
        "+".join(f"{t:.3f}*eq(N\\,{i})" for i, t in enumerate(pts_s)) if len(set(np.diff(pts_s).round(4))) > 1 else ""
    )
    rate = round(1 / float(np.median(np.diff(pts_s)))) if count > 1 else 10
    vf = [f"settb=1/1000,setpts=({times})/TB"] if times else []
    command = [
        "ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", pix_fmt_in, "-s", f"{width}x{height}",
        "-r", str(rate), "-i", "-", *(["-vf", ",".join(vf)] if vf else []),
        *(["-fps_mode", "passthrough", "-enc_time_base", "1/1000"] if times else []),
        *args, str(path),
    ]  # fmt: skip
    subprocess.run(command, input=frames.tobytes(), check=True, capture_output=True)


X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "10", "-bf", "3", "-g", "12", "-threads", "1"]
X264_B = ["-c:v", "libx264", "-preset", "medium", "-crf", "10", "-bf", "3", "-g", "12", "-threads", "1"]


def build_battery(folder: Path) -> list[BatteryClip]:
    """Encode every battery clip into `folder` (once; reused when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    clips: list[BatteryClip] = []

    def clip(name, args, count=30, fps=10.0, height=48, width=64, pts=None, rotate=0, pix_fmt_in="rgb24", gray=False):
        pts_s = pts if pts is not None else [i / fps for i in range(count)]
        upright = np.stack([coded_frame(i, height, width) for i in range(len(pts_s))])
        stored = np.rot90(upright, k=-rotate // 90, axes=(1, 2)) if rotate else upright  # FFmpeg turns it back
        path = folder / name
        if not path.exists():
            data = np.ascontiguousarray(stored[..., 0] if gray else stored)
            _encode(path, data, pts_s, args, "gray" if gray else pix_fmt_in)
            if rotate:  # the display matrix asks players to turn the picture upright
                turned = path.with_name("rot-" + path.name)
                subprocess.run(
                    ["ffmpeg", "-v", "error", "-y", "-i", str(path), "-c", "copy", "-metadata:s:v:0",
                     f"rotate={rotate}", str(turned)],
                    check=True, capture_output=True,
                )  # fmt: skip
                turned.replace(path)
        clips.append(BatteryClip(name, path, [t - pts_s[0] for t in pts_s], height, width))

    clip("h264_faststart.mp4", [*X264, "-movflags", "+faststart"])
    clip("h264_moov_at_end.mp4", X264)
    clip("h264_fragmented.mp4", [*X264, "-movflags", "frag_keyframe+empty_moov"])
    clip("h264_bframes.avi", X264_B)
    clip("mpeg4_bframes.avi", ["-c:v", "mpeg4", "-q:v", "2", "-bf", "2", "-g", "12"])
    clip("hevc_10bit.mp4", ["-c:v", "libx265", "-pix_fmt", "yuv420p10le", "-crf", "8", "-tag:v", "hvc1",
                            "-x265-params", "log-level=error:bframes=3"])  # fmt: skip
    clip("vp9.webm", ["-c:v", "libvpx-vp9", "-crf", "10", "-b:v", "0", "-deadline", "realtime", "-cpu-used", "8"])
    clip("av1.mp4", ["-c:v", "libaom-av1", "-crf", "10", "-cpu-used", "8", "-row-mt", "0"], count=12)
    clip("animation.gif", ["-c:v", "gif"], count=12)
    clip("mjpeg.avi", ["-c:v", "mjpeg", "-q:v", "2"])
    clip("h264_yuv444.mp4", [*X264, "-pix_fmt", "yuv444p"])
    clip("h264_grey.mp4", [*X264, "-pix_fmt", "gray"], gray=True)
    clip("h264_odd_size.mkv", [*X264, "-pix_fmt", "yuv444p"], height=37, width=53)
    clip("h264_16x16.mp4", X264, height=16, width=16, count=12)
    clip("h264_portrait_96x128.mp4", X264, height=128, width=96, count=12)
    clip("h264_rotated_90.mp4", X264, height=80, width=48, rotate=90)
    clip("h264_rotated_270.mp4", X264, height=80, width=48, rotate=270)
    mild = [round(0.1 * i + 0.03 * np.sin(i * 1.7), 3) for i in range(30)]
    clip("h264_vfr_mild.mp4", X264, pts=mild)
    burst = [round(0.035 * i, 3) for i in range(20)] + [round(0.7 + 0.5 * i + 0.2 * (i % 3), 3) for i in range(21)]
    clip("h264_vfr_extreme.mp4", X264, pts=burst)
    clip("h264_vfr_extreme.mkv", X264, pts=burst)
    clip("h264_3_frames.mp4", X264, count=3)
    _unreadable(folder, clips)
    return clips


def _unreadable(folder: Path, clips: list[BatteryClip]) -> None:
    audio = folder / "audio_only.m4a"
    if not audio.exists():
        subprocess.run(
            ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac",
             str(audio)],
            check=True, capture_output=True,
        )  # fmt: skip
    clips.append(BatteryClip("audio_only.m4a", audio, unreadable="no video stream"))
    truncated = folder / "truncated.mp4"
    if not truncated.exists():
        whole = (folder / "h264_faststart.mp4").read_bytes()
        truncated.write_bytes(whole[: len(whole) // 2])
    clips.append(BatteryClip("truncated.mp4", truncated, unreadable="truncated"))
