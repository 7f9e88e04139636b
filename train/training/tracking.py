"""Run logging: wandb through Accelerate's tracker (offline when no key is configured, never a login prompt),
plus a plain console line per logging step (readable in SLURM logs, where progress bars are not)."""

from __future__ import annotations

import hashlib
import json
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vidtune.train.training.config import Recipe, recipe_to_dict

METRICS_FILE = "metrics.jsonl"


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """The user's WANDB_MODE if set; online with a configured key; offline otherwise (wandb would prompt)."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_key_configured() else "offline")


_total_steps: int | None = None  # the running run's step budget, named by its console lines (`step 10/20: ...`)


def start(accelerator: Any, recipe: Recipe, total_steps: int | None = None) -> None:
    global _total_steps
    _total_steps = total_steps
    if recipe.logging.report_to == "tensorboard":  # OUTPUT/tensorboard/PROJECT: `tensorboard --logdir OUTPUT`
        accelerator.init_trackers(project_name=recipe.logging.project)  # the recipe is saved in the run folder
        return
    if recipe.logging.report_to != "wandb":
        return
    output_dir = Path(recipe.train.output_dir).resolve()
    # A stable id per output folder: a resumed run continues the same wandb run.
    run_id = hashlib.sha1(str(output_dir).encode()).hexdigest()[:12]
    accelerator.init_trackers(
        project_name=recipe.logging.project,
        config=recipe_to_dict(recipe),
        init_kwargs={
            "wandb": {
                "name": recipe.logging.run_name or output_dir.name,
                "dir": str(output_dir),
                "mode": wandb_mode(),
                "id": run_id,
                "resume": "allow",
            }
        },
    )


def log(accelerator: Any, metrics: dict[str, float], step: int, output_dir: str | Path) -> None:
    """To the trackers, the console, and OUTPUT/metrics.jsonl (one JSON object per logged step)."""
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        of_total = f"/{_total_steps}" if _total_steps else ""
        tqdm.write(f"step {step}{of_total}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        with (Path(output_dir) / METRICS_FILE).open("a", encoding="utf-8") as sink:
            sink.write(json.dumps({"step": step, **metrics}) + "\n")


def truncate_metrics(output_dir: str | Path, last_step: int) -> None:
    """On resume: forget steps after the checkpoint (they were lost with the crash and will be run again)."""
    kept = [m for m in read_metrics(output_dir) if m["step"] <= last_step]
    (Path(output_dir) / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in kept), encoding="utf-8")


def read_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


LOSS_PLOT = "loss.png"


def write_loss_plot(output_dir: str | Path) -> Path | None:
    """OUTPUT/loss.png from metrics.jsonl: train and eval loss over steps, the learning rate on its own axis below
    (written at each checkpoint and at the end, so a run in progress can be glanced at)."""
    metrics = read_metrics(output_dir)
    train = [(m["step"], m["train/loss"]) for m in metrics if "train/loss" in m]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    evals = [(m["step"], m["eval/loss"]) for m in metrics if "eval/loss" in m]
    rates = [(m["step"], m["train/lr"]) for m in metrics if "train/lr" in m]
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=[3, 1])
    loss_axis.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        loss_axis.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    loss_axis.set_title(Path(output_dir).resolve().name)
    lr_axis.plot(*zip(*rates, strict=True), color="tab:gray")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimizer step")
    figure.tight_layout()
    path = Path(output_dir) / LOSS_PLOT
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


WANDB_CLOSE_TIMEOUT_S = 120.0


def finish(accelerator: Any, wandb_close_timeout_s: float = WANDB_CLOSE_TIMEOUT_S) -> None:
    wandb_runs = [tracker.run for tracker in accelerator.trackers if tracker.name == "wandb"]
    accelerator.end_training()
    for run in wandb_runs:
        close_wandb(run, wandb_close_timeout_s)


def close_wandb(run: Any, timeout_s: float) -> None:
    """Wait (bounded) until wandb has written everything logged to the run's transaction log, run-ID.wandb: the
    file an offline run keeps and `wandb sync` uploads. `run.finish()` does not promise it (wandb 0.31): wandb-core
    holds records in a 32 KiB buffer and writes them when it closes the run's stream, on a notice the client sends
    without waiting for it (`inform_finish`), so a loaded machine can leave the file at its 7-byte header when
    finish returns. `wandb.teardown()` waits for wandb-core to close every stream and exit (its atexit hook does
    the same when the process ends; a later run starts a new one)."""
    import threading

    import wandb

    closer = threading.Thread(target=wandb.teardown, name="wandb-teardown", daemon=True)
    closer.start()
    closer.join(timeout_s)
    if closer.is_alive():
        print(
            f"warning: wandb did not finish writing {run.settings.sync_file} within {timeout_s:g} s: "
            "`wandb sync` of this run may miss its last metrics",
            file=sys.stderr,
        )


def peak_memory_gb() -> float:
    """The highest memory this process has used so far: tensors on the GPU (torch's allocator, a host-side counter:
    no device sync), or the process's peak resident set on a CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


class Progress:
    """The per-step metrics: the step's own, throughput since this process started training (samples, tokens,
    model TFLOPs per GPU and, with a known peak, MFU: flops.py), and counters."""

    def __init__(self, processes: int = 1, peak_tflops: float | None = None) -> None:
        self.started, self.samples, self.tokens, self.flops = time.perf_counter(), 0, 0, 0.0
        self.data_wait_s = 0.0  # the main process waiting for batches (added by the loop)
        self.processes, self.peak_tflops = processes, peak_tflops

    def update(self, step: dict[str, float], epoch: int, nonfinite_steps: int, failed_samples: int) -> dict[str, float]:
        self.samples += int(step["samples"])
        self.tokens += int(step["tokens"])
        self.flops += float(step.get("flops", 0.0))  # summed over ranks
        elapsed = time.perf_counter() - self.started
        tflops = self.flops / elapsed / self.processes / 1e12
        figures = {"train/tflops_per_gpu": tflops, "train/elapsed_s": elapsed, "train/peak_memory_gb": peak_memory_gb()}
        if self.peak_tflops:
            figures["train/mfu"] = tflops / self.peak_tflops
        return {
            "train/loss": step["loss"],
            "train/lr": step["lr"],
            "train/grad_norm": step["grad_norm"],
            "train/epoch": epoch,
            "train/samples_per_s": self.samples / elapsed,
            "train/tokens_per_s": self.tokens / elapsed,
            "train/data_wait_fraction": self.data_wait_s / elapsed,
            "train/nonfinite_steps": nonfinite_steps,
            "data/failed_samples": failed_samples,
            **figures,
            **{k: v for k, v in step.items() if k.startswith("train/")},  # the objective's own (train/objectives)
        }
