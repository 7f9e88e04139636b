"""Queued, batched generation for the server: one worker thread owns the model; requests that arrive while it
generates wait in a queue and go together in its next batch (no timer: a lone request starts at once).

Each request's tokens are streamed to it as they come (the `streamer` hook of transformers' generate), decoded per
request, so a streamed answer and a plain one are the same text, and both equal `generate()`'s (`vidtune infer`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from vidtune.train.generation.infer import AnswerText, InferenceModel, generate_tokens

log = logging.getLogger("vidtune.serve")


@dataclass(frozen=True)
class Settings:
    """What a request asks of generation; requests with equal `sampling` share a batch."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    @property
    def sampling(self) -> tuple[float, float]:
        return (0.0, 1.0) if self.temperature == 0 else (self.temperature, self.top_p)

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class Job:
    """One request in the queue. `emit` is called from the worker thread with ("delta", text), then once with
    ("done", Result), ("error", message) or ("cancelled", None) once `cancelled` is set (its client went away)."""

    example: dict[str, torch.Tensor]
    settings: Settings
    emit: Callable[[str, Any], None]
    answer: AnswerText
    finished: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_tokens reached)


class JobsStreamer(BaseStreamer):
    """Receives each generation step's tokens (B,) for a batch of jobs and hands every job its new text."""

    def __init__(self, im: InferenceModel, jobs: list[Job]):
        self.jobs = jobs
        self.stop_ids = set(im.stop_ids)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt ids
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.reshape(len(self.jobs), -1)[:, -1].tolist(), strict=True):
            if job.cancelled.is_set():
                job.finished = True
            if job.finished:
                continue
            if token in self.stop_ids:
                job.finished = True
                continue
            text = job.answer.add(token)
            job.finished = len(job.answer.tokens) >= job.settings.max_new_tokens
            if text:
                job.emit("delta", text)

    def end(self) -> None:
        pass


class AllFinished(StoppingCriteria):
    """Stops a batch's generation once each of its jobs has its answer or was cancelled (a batch whose clients all
    went away stops at once, instead of generating up to max_tokens for nobody)."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = all(job.finished or job.cancelled.is_set() for job in self.jobs)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """The model's one worker thread and its queue."""

    def __init__(self, im: InferenceModel, max_batch_size: int = 8):
        self.im, self.max_batch_size = im, max_batch_size
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="vidtune-engine", daemon=True)
        self.batches = 0  # generate() calls, and the requests they answered (/health reports both)
        self.answered = 0
        self.cancelled = 0  # requests dropped because their client went away

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def _next_jobs(self) -> list[Job] | None:
        first = self.queue.get()
        if first is None:
            return None
        jobs = [first]
        while len(jobs) < self.max_batch_size:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # stop after this batch
                break
            jobs.append(job)
        return jobs

    def _work(self) -> None:
        while (jobs := self._next_jobs()) is not None:
            groups: dict[tuple[float, float], list[Job]] = {}
            for job in self._drop_cancelled(jobs):
                groups.setdefault(job.settings.sampling, []).append(job)
            for group in groups.values():
                self._run_batch(group)

    def _drop_cancelled(self, jobs: list[Job]) -> list[Job]:
        for job in jobs:
            if job.cancelled.is_set():
                self.cancelled += 1
                job.emit("cancelled", None)
        return [job for job in jobs if not job.cancelled.is_set()]

    def _run_batch(self, jobs: list[Job]) -> None:
        settings = jobs[0].settings
        max_new_tokens = max(job.settings.max_new_tokens for job in jobs)
        try:
            generate_tokens(
                self.im,
                [job.example for job in jobs],
                max_new_tokens,
                streamer=JobsStreamer(self.im, jobs),
                stopping_criteria=StoppingCriteriaList([AllFinished(jobs)]),
                **settings.generate_kwargs(),
            )
        except Exception as err:  # one failed batch fails its requests, never the server
            log.exception("generation failed")
            for job in jobs:
                job.emit("error", f"generation failed: {type(err).__name__}: {err}")
            return
        self.batches += 1
        jobs = self._drop_cancelled(jobs)
        self.answered += len(jobs)
        for job in jobs:
            if rest := job.answer.rest():
                job.emit("delta", rest)
            tokens = len(job.answer.tokens)
            stopped = tokens < job.settings.max_new_tokens
            result = Result(job.answer.sent, len(job.example["input_ids"]), tokens, "stop" if stopped else "length")
            job.emit("done", result)
