"""Bad samples: what counts as one, how many a run tolerates, and a time limit for decodes that hang.

Policy "skip" drops a bad sample with its reason (counted and logged) and fails only when the corpus is worse than
its budget: more than `max_bad_fraction` of the samples bad, or `max_bad_in_a_row` bad ones in a row (a moved
video folder, a wrong media_root: a configuration error, not noise). Policy "error" stops at the first one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from vidtune.data.conversation import DataError

POLICIES = ("skip", "error")
MAX_FRAME_PIXELS = 4096 * 4096  # the default pixel limit of every entry point that decodes (train, serve, frames, show)
TOO_SHORT = ("repeat", "drop")


@dataclass
class BadSampleConfig:
    policy: str = "skip"  # skip: drop bad samples with a reason, within the budget below | error: stop at the first
    max_bad_fraction: float = 0.05  # fail when more than this fraction of samples (or of a training window) is bad
    max_bad_in_a_row: int = 20  # ... or when this many in a row are
    window: int = 200  # samples per training-time window for max_bad_fraction
    too_short: str = "repeat"  # a clip with fewer frames than asked: repeat frames | drop the sample
    max_frame_pixels: int = MAX_FRAME_PIXELS  # refuse larger frames (an 8K clip x 32 frames is gigabytes of RAM)
    decode_timeout_s: float = 120.0  # a decode taking longer is abandoned (the sample counts as bad)


def validate_bad_samples(cfg: BadSampleConfig) -> None:
    if cfg.policy not in POLICIES:
        raise DataError(f"data.bad_samples.policy must be one of {', '.join(POLICIES)}, got {cfg.policy!r}")
    if cfg.too_short not in TOO_SHORT:
        raise DataError(f"data.bad_samples.too_short must be one of {', '.join(TOO_SHORT)}, got {cfg.too_short!r}")
    if not 0 <= cfg.max_bad_fraction < 1 or cfg.max_bad_in_a_row < 1 or cfg.window < 1:
        raise DataError("data.bad_samples needs 0 <= max_bad_fraction < 1, max_bad_in_a_row >= 1 and window >= 1")
    if cfg.decode_timeout_s <= 0 or cfg.max_frame_pixels <= 0:
        raise DataError("data.bad_samples.decode_timeout_s and max_frame_pixels must be > 0")


KINDS = (  # substring of a reason -> its category, first match wins
    ("outside the media root", "path outside media_root"),
    ("is a URL", "URL refused"),
    ("is relative", "relative path without media_root"),
    ("video not found", "missing file"),
    ("image not found", "missing file"),
    ("empty file", "empty file"),
    ("too short", "too short"),
    ("invalid frame", "invalid frame rate"),
    ("timestamps", "broken timestamps"),
    ("exceed the", "resolution too large"),
    ("timed out", "decode timed out"),
    ("invalid JSON", "malformed row"),
    ("not UTF-8", "malformed row"),
    ("NUL byte", "malformed row"),
    ("max_row_bytes", "row too large"),
    ("not a file", "not a file"),
    (": no video stream", "no video stream"),
    ("not supported by any installed backend", "unsupported codec"),
    (": truncated data", "truncated data"),
    (": truncated or damaged data", "truncated data"),
    (": zero duration", "zero duration"),
    ("cannot", "unreadable"),
    ("failed to decode", "unreadable"),
    ("no video frames", "unreadable"),
    ("stream ended", "unreadable"),
)


def kind_of(reason: str) -> str:
    """A short category for counting bad samples ("missing file", "unreadable", "malformed row", ...)."""
    return next((kind for text, kind in KINDS if text in reason), "malformed row")


@dataclass
class BadSampleLog:
    """Bad samples met so far, in order: counts by kind, a few examples each, and the longest run of them."""

    cfg: BadSampleConfig = field(default_factory=BadSampleConfig)
    total: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    longest_run: int = 0
    _run: int = 0

    def good(self) -> None:
        self.total += 1
        self._run = 0

    def add(self, where: str, reason: str) -> None:
        if self.cfg.policy == "error":
            raise DataError(f"{where}: {reason}")
        self.total += 1
        self.bad.append((where, reason))
        self._run += 1
        self.longest_run = max(self.longest_run, self._run)

    @property
    def kinds(self) -> Counter:
        return Counter(kind_of(reason) for _, reason in self.bad)

    def summary(self, limit: int = 3) -> str:
        if not self.bad:
            return "no bad samples"
        examples = "; ".join(f"{where}: {reason}" for where, reason in self.bad[:limit])
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.kinds.most_common())
        return f"{len(self.bad)} of {self.total} samples bad ({kinds}), e.g. {examples}"

    def over_budget(self) -> str | None:
        if self.longest_run >= self.cfg.max_bad_in_a_row:
            return f"{self.longest_run} bad samples in a row (max_bad_in_a_row={self.cfg.max_bad_in_a_row})"
        if self.total and len(self.bad) / self.total > self.cfg.max_bad_fraction:
            return f"{len(self.bad) / self.total:.1%} bad (max_bad_fraction={self.cfg.max_bad_fraction:g})"
        return None

    def check(self, what: str) -> None:
        """Fail, in one line naming examples, when the bad samples exceed the budget."""
        problem = self.over_budget()
        if problem:
            raise DataError(f"{what}: {problem}: {self.summary()} (data.bad_samples sets the budget)")


class DecodeTimeout(DataError):
    pass


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Interrupt the block after `seconds` (SIGALRM; in a process's main thread only, which DataLoader workers are).

    Decoders that loop in Python (PyAV) are interrupted between frames; a call stuck inside C returns first.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise DecodeTimeout(f"{what}: decode timed out after {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
