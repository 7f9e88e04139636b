"""Fault injection for crash-safety tests: the real process meets a real fault at a chosen point.

The shipped code has no fault checks; these patch its functions in the process under test. In-process tests call
`inject(monkeypatch, spec)`; subprocess tests run this module in place of the CLI (plain python or `accelerate
launch -m tests.faults`), which patches, then calls `vidtune.train.cli.main`:

    python -m tests.faults kill@4.1 train RECIPE.yaml [overrides]

A spec holds comma-separated faults:
  kill@STEP.MICRO    SIGKILL this process just before micro-batch MICRO of optimizer step STEP+1
  term@STEP.MICRO    SIGTERM (int@: SIGINT) to this process at the same point: a preemption, handled
  killsave@STEP      SIGKILL this process in the middle of writing the checkpoint of step STEP
  nan@STEP.N         make the loss NaN for N micro-batches (default 1) once STEP optimizer steps are done
  infgrad@STEP       an infinite gradient (finite loss) in the last micro-batch of optimizer step STEP+1 (once)
  pgterm@STEP.MICRO  SIGTERM to this process's whole process group (DataLoader workers too), as clusters send it
  hang@TEXT          opening a video whose path contains TEXT never returns (until the decode time limit)
  enospc@final.N     the first N final saves fail with ENOSPC, as on a full disk (N=0: every one)
  enospc@step.STEP   every save of the checkpoint of step STEP fails with ENOSPC (the disk stays full)
  crashpublish@STEP  the save of step STEP raises just before its rename (as a kill there would leave it)
  nanweights@STEP    the trainable weights turn NaN in optimizer step STEP
  termeval@STEP      SIGTERM to this process as the eval-loss evaluation after step STEP starts
  termgen@STEP       the same as the generation-based evaluation after step STEP starts
  shortgen@N         rank 1 samples GRPO completions of at most N tokens (its ranks then generate different lengths)
  fixedgen@N         GRPO rollouts still generate, then each completion is replaced by a fixed one of up to N words
                     chosen by its prompt's tokens and its place in the group: the same rollouts at any world size
  towerframes@DIR    no fault, a probe: under train.sequence_parallel each rank appends the number of frames its
                     vision tower encodes per micro-batch to DIR/rank<RANK>.txt
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from typing import Any

SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT, "pgterm": signal.SIGTERM}
FAULTS = (
    *SIGNALS,
    "killsave",
    "nan",
    "infgrad",
    "hang",
    "enospc",
    "crashpublish",
    "nanweights",
    "termeval",
    "termgen",
    "shortgen",
    "fixedgen",
    "towerframes",
)


def parse(spec: str) -> list[tuple[str, str]]:
    faults = [tuple(item.split("@", 1)) for item in spec.split(",") if item]
    unknown = [f for f in faults if len(f) != 2 or f[0] not in FAULTS]
    if unknown:
        raise ValueError(f"unknown faults {unknown} in {spec!r}")
    return faults  # type: ignore[return-value]


def patches(spec: str) -> list[tuple[Any, str, Any]]:
    """(module, attribute, replacement) for every fault in the spec."""
    from vidtune.data.video import loading as video
    from vidtune.train.training import checkpoint, held_out, loop, outputs

    result: list[tuple[Any, str, Any]] = []
    for action, where in parse(spec):
        if action in SIGNALS:
            result.append((loop, "micro_step", _signal_before_micro_batch(loop.micro_step, action, where)))
        elif action == "killsave":
            result.append((checkpoint, "write_manifest", _kill_while_saving(checkpoint.write_manifest, int(where))))
        elif action == "nan":
            result.append((loop, "forward_loss", _nan_loss(loop.forward_loss, where)))
        elif action in ("shortgen", "fixedgen"):
            from vidtune.train.objectives import select

            wrap = _short_generation if action == "shortgen" else _fixed_generation
            result.append((select.Rollout, "__call__", wrap(_latest(result, select.Rollout, "__call__"), int(where))))
        elif action == "infgrad":
            result.append((loop, "micro_step", _infinite_gradient(loop.micro_step, int(where))))
        elif action == "enospc" and where.startswith("step."):
            result.append((checkpoint, "write_manifest", _disk_full_at_step(checkpoint.write_manifest, int(where[5:]))))
        elif action == "enospc":
            result.append((outputs, "save_final", _disk_full(outputs.save_final, int(where.partition(".")[2] or 0))))
        elif action == "crashpublish":
            result.append((checkpoint, "publish", _crash_before_publish(checkpoint.publish, int(where))))
        elif action == "nanweights":
            result.append((loop, "train_step", _nan_weights(loop.train_step, int(where))))
        elif action == "towerframes":
            from vidtune.train.training import sequence_split

            result.append((sequence_split, "encode_share", _count_frames(sequence_split.encode_share, where)))
        elif action in ("termeval", "termgen"):
            name = "evaluate" if action == "termeval" else "generation_eval"
            result.append((held_out, name, _term_at_eval(getattr(held_out, name), int(where))))
        else:
            result.append((video, "open_video", _hang_on_open(video.open_video, where)))
    return result


def _latest(result: list[tuple[Any, str, Any]], module: Any, name: str) -> Any:
    """The replacement an earlier fault in the spec made for module.name (faults on one function compose)."""
    earlier = [replacement for owner, attribute, replacement in result if (owner, attribute) == (module, name)]
    return earlier[-1] if earlier else getattr(module, name)


def inject(monkeypatch: Any, spec: str) -> None:
    for module, name, replacement in patches(spec):
        monkeypatch.setattr(module, name, replacement)


def _signal_before_micro_batch(real: Any, action: str, where: str) -> Any:
    step, _, micro = where.partition(".")

    def micro_step(run: Any, index: int, *args: Any, **kwargs: Any) -> Any:
        if run.state.step == int(step) and index == int(micro or 0):
            if action == "pgterm":
                os.killpg(os.getpgrp(), signal.SIGTERM)
            else:
                os.kill(os.getpid(), SIGNALS[action])
        return real(run, index, *args, **kwargs)

    return micro_step


def _kill_while_saving(real: Any, step: int) -> Any:
    def write_manifest(folder: Any) -> None:
        # The checkpoint's files are written, its manifest not yet and its folder not yet renamed.
        if folder.name == f".tmp-step_{step:08d}":
            os.kill(os.getpid(), signal.SIGKILL)
        real(folder)

    return write_manifest


def _nan_loss(real: Any, where: str) -> Any:
    step, _, times = where.partition(".")
    fired = [0]

    def forward_loss(run: Any, batch: Any) -> Any:
        loss = real(run, batch)
        if run.state.step >= int(step) and fired[0] < int(times or 1):
            fired[0] += 1
            return loss * float("nan")
        return loss

    return forward_loss


def _short_generation(real: Any, tokens: int) -> Any:
    def rollout(self: Any, model: Any, batch: Any) -> Any:
        if self.accelerator.process_index == 1:
            self.settings.max_new_tokens = tokens
        return real(self, model, batch)

    return rollout


def _fixed_generation(real: Any, words: int) -> Any:
    vocabulary = ("red", "green", "blue", "then", "first", "last")

    def rollout(self: Any, model: Any, batch: Any) -> Any:
        import torch

        sampled, _ = real(self, model, batch)  # the real (synced) generation still runs, at its own lengths
        texts = []
        for row, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"], strict=True)):
            key = int(ids[mask.bool()].sum()) + row
            texts.append(" ".join(vocabulary[(key + k) % len(vocabulary)] for k in range(1 + key % words)))
        tokens = [self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.stop_ids[:1] for text in texts]
        width = max(map(len, tokens))
        padded = [ids + self.stop_ids[:1] * (width - len(ids)) for ids in tokens]
        return torch.tensor(padded, dtype=sampled.dtype, device=sampled.device), texts

    return rollout


def _infinite_gradient(real: Any, step: int) -> Any:
    fired = [False]

    def micro_step(run: Any, index: int, batch: Any, scale: Any, last: bool) -> Any:
        loss = real(run, index, batch, scale, last)
        if run.state.step == step and last and not fired[0]:
            fired[0] = True
            run.trainable[0].grad.view(-1)[0] = float("inf")
        return loss

    return micro_step


class InjectedCrash(RuntimeError):
    """Stands for a process killed at the injection point (in-process tests then relaunch)."""


def _disk_full(real: Any, times: int) -> Any:
    failed = [0]

    def write(*args: Any, **kwargs: Any) -> Any:
        if not times or failed[0] < times:
            failed[0] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return write


def _disk_full_at_step(real: Any, step: int) -> Any:
    def write_manifest(folder: Any) -> None:
        if folder.name == f".tmp-step_{step:08d}":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(folder)

    return write_manifest


def _crash_before_publish(real: Any, step: int) -> Any:
    fired = [False]

    def publish(tmp: Any, final: Any) -> None:
        if final.name == f"step_{step:08d}" and not fired[0]:
            fired[0] = True
            raise InjectedCrash(f"crashed before publishing {final.name}")
        real(tmp, final)

    return publish


def _nan_weights(real: Any, step: int) -> Any:
    def train_step(run: Any, window: Any) -> Any:
        result = real(run, window)
        if run.state.step + 1 == step and not result.get("skipped"):
            run.trainable[0].data.fill_(float("nan"))
        return result

    return train_step


def _term_at_eval(real: Any, step: int) -> Any:
    def evaluate(run: Any) -> Any:
        if run.state.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(run)

    return evaluate


def _hang_on_open(real: Any, text: str) -> Any:
    def open_video(path: str, *args: Any, **kwargs: Any) -> Any:
        if text in path:
            time.sleep(10**6)
        return real(path, *args, **kwargs)

    return open_video


def _count_frames(real: Any, folder: str) -> Any:
    def encode_share(model: Any, inputs: dict[str, Any]) -> Any:
        if "video_grid_thw" in inputs:  # Qwen: rows of temporal patches of temporal_patch_size frames
            frames = int(inputs["video_grid_thw"][:, 0].sum()) * model.config.vision_config.temporal_patch_size
        else:  # (1, frames, C, H, W)
            frames = inputs["pixel_values_videos"].shape[1]
        with open(os.path.join(folder, f"rank{os.environ['RANK']}.txt"), "a") as log:
            log.write(f"{frames}\n")
        return real(model, inputs)

    return encode_share


def cli_command(*args: str, fault: str | None = None) -> list[str]:
    """`python -m vidtune.train.cli ARGS`, or through this module with a fault spec."""
    if fault:
        return [sys.executable, "-m", "tests.faults", fault, *args]
    return [sys.executable, "-m", "vidtune.train.cli", *args]


def main(argv: list[str]) -> None:
    spec, *cli_args = argv
    for module, name, replacement in patches(spec):
        setattr(module, name, replacement)
    from vidtune.train.cli import main as cli_main

    cli_main(cli_args)


if __name__ == "__main__":
    main(sys.argv[1:])
