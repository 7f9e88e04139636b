"""A request's media decoded in a child process with a real time limit.

data/quality.py's decode limit is a SIGALRM, which only works in a process's main thread; the server decodes in
worker threads, where it did nothing (a decoder stuck inside C code held a worker forever). Each request's decode
runs in a forked child instead: past the deadline, or when its client has gone, the child is killed, and a decode
that exhausts memory takes down only the child. Forking copies no memory up front (copy on write) and the child
needs nothing loaded: it inherits the decoders the server imported.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from typing import Any

from vidtune.data.conversation import DataError, Message
from vidtune.data.dataset import load_media
from vidtune.data.video import SamplingConfig

POLL_S = 0.05  # how often the waiting thread looks for a result, a dead child or a gone client


class Cancelled(Exception):
    """The client went away while its media were decoded."""


def _decode(connection: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    try:
        import torch

        torch.set_num_threads(1)  # (an OpenMP pool inherited through fork must not be used from the child)
        connection.send(("ok", load_media(*args, **kwargs)))
    except DataError as err:
        connection.send(("error", str(err)))
    except BaseException as err:  # anything else still answers the request, in one line
        connection.send(("error", f"failed to decode: {type(err).__name__}: {str(err)[:160]}"))
    finally:
        connection.close()
        os._exit(0)  # skip the server's exit handlers, inherited through fork


def decode_media(
    messages: list[Message],
    sampling: SamplingConfig,
    with_time_instruction: bool,
    shortest_edge: int | None,
    max_frame_pixels: int,
    timeout_s: float,
    cancelled: threading.Event,
) -> tuple[dict[int, Any], dict[int, str]]:
    """load_media's result, decoded in a child process killed after `timeout_s` or once `cancelled` is set."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    kwargs = {"shortest_edge": shortest_edge, "max_frame_pixels": max_frame_pixels, "decode_timeout_s": timeout_s}
    child = context.Process(
        target=_decode, args=(sender, (messages, sampling, with_time_instruction, None), kwargs), daemon=True
    )
    child.start()
    sender.close()
    deadline = time.monotonic() + timeout_s
    try:
        while not receiver.poll(POLL_S):
            if cancelled.is_set():
                raise Cancelled
            if time.monotonic() > deadline:
                raise DataError(f"decode timed out after {timeout_s:g}s")
            if not child.is_alive() and not receiver.poll(0):
                raise DataError(f"the decoder process died (exit code {child.exitcode}: out of memory?)")
        try:
            kind, value = receiver.recv()
        except EOFError:
            raise DataError(f"the decoder process died (exit code {child.exitcode})") from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()
    if kind == "error":
        raise DataError(value)
    return value
