"""A request's media decoded in a child process with a real time limit.

data/quality.py's decode limit is a SIGALRM, which only works in a process's main thread; the server decodes in
worker threads, where it did nothing (a decoder stuck inside C code held a worker forever). Each decode runs in a
child process instead: past the deadline, or when its client has gone, the child is killed, and a decode that
exhausts memory takes down only the child.

The children are forked from a small "zygote" process, itself forked when the server starts, before the model
loads or any thread runs: forking the serving process itself while its model thread generates left children
deadlocked on locks that thread held. The zygote is single-threaded and has the decoders imported, so a child
starts in milliseconds. A child writes its result (pickled) into the request's temporary folder.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from vidtune.data.conversation import DataError, Message, media_part, message
from vidtune.data.dataset import load_media
from vidtune.data.video import SamplingConfig
from vidtune.data.video.loading import available_backends

POLL_S = 0.01  # how often the waiting thread looks for a result, a dead child or a gone client


class Cancelled(Exception):
    """The client went away while its media were decoded."""


def _child(job: tuple[Any, ...], result: str) -> None:
    """In the forked child: decode, write ("ok", media) or ("error", one line) to `result`, exit."""
    try:
        import torch

        torch.set_num_threads(1)
        args, kwargs = job
        outcome: tuple[str, Any] = ("ok", load_media(*args, **kwargs))
    except DataError as err:
        outcome = ("error", str(err))
    except BaseException as err:  # anything else still answers the request, in one line
        outcome = ("error", f"failed to decode: {type(err).__name__}: {str(err)[:160]}")
    try:
        Path(result + ".tmp").write_bytes(pickle.dumps(outcome))
        os.replace(result + ".tmp", result)
    finally:
        os._exit(0)  # skip the server's exit handlers, inherited through fork


def _zygote(connection: Any, servers_end: Any) -> None:
    """Fork a child per job received; answer with its pid. Exits when the server closes the pipe."""
    servers_end.close()  # (inherited through fork: held open here, the server's close would never reach us)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; the pipe's end stops this
    _warm_up()
    while True:
        try:
            job, result = connection.recv()
        except (EOFError, OSError):
            os._exit(0)
        pid = os.fork()
        if pid == 0:
            connection.close()
            _child(job, result)
        connection.send(pid)


def _warm_up() -> None:
    """Decode a tiny generated clip once, so that every child starts with the decoders loaded and initialised (a
    first decode in a fresh process costs ~0.15-0.4 s more than the next ones)."""
    import tempfile

    import av
    import numpy as np

    available_backends()
    with tempfile.TemporaryDirectory(prefix="vidtune-warm-") as folder:
        path = os.path.join(folder, "warm.mp4")
        with av.open(path, "w") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for _ in range(4):
                frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        with contextlib.suppress(Exception):  # a warm-up only: a failure here shows in the first real decode
            load_media([message("user", [media_part("video", path)])], SamplingConfig(2), False, None, shortest_edge=16)


class Decoder:
    """Decodes a request's media in a child process, killed after `timeout_s` or once the client has gone."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self.connection, theirs = context.Pipe()
        self.zygote = context.Process(
            target=_zygote, args=(theirs, self.connection), daemon=True, name="vidtune-decoder"
        )
        self.zygote.start()
        theirs.close()
        self.lock = threading.Lock()

    def _start(self, job: tuple[Any, ...], result: Path) -> int:
        with self.lock:
            self.connection.send((job, str(result)))
            return int(self.connection.recv())

    def decode(
        self,
        messages: list[Message],
        sampling: SamplingConfig,
        with_time_instruction: bool,
        shortest_edge: int | None,
        max_frame_pixels: int,
        timeout_s: float,
        folder: str,
        cancelled: threading.Event,
        audio_rate: int | None = None,
        sound_rate: int | None = None,
    ) -> tuple[dict[int, Any], dict[int, str]]:
        """load_media's result, decoded in a child; `folder` (the request's temporary folder) receives it."""
        kwargs = {
            "shortest_edge": shortest_edge,
            "max_frame_pixels": max_frame_pixels,
            "decode_timeout_s": timeout_s,
            "audio_rate": audio_rate,
            "sound_rate": sound_rate,
        }
        result = Path(folder) / f"decoded-{uuid.uuid4().hex}.pkl"
        pid = self._start(((messages, sampling, with_time_instruction, None), kwargs), result)
        deadline = time.monotonic() + timeout_s
        try:
            while not result.exists():
                if cancelled.is_set():
                    raise Cancelled
                if time.monotonic() > deadline:
                    raise DataError(f"decode timed out after {timeout_s:g}s")
                if not _alive(pid) and not result.exists():
                    raise DataError("the decoder process died (out of memory?)")
                time.sleep(POLL_S)
            kind, value = pickle.loads(result.read_bytes())  # written by our own child, in our own folder
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if kind == "error":
            raise DataError(value)
        return value

    def close(self) -> None:
        self.connection.close()
        self.zygote.join(timeout=5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
