"""Peak memory of the training loss (forward + backward) at 5,120 tokens x 32,064 vocabulary (one 32-frame
LLaVA-NeXT-Video-7B sample): the model's own loss over full fp32 logits (today's path before vidtune's loss.py)
vs vidtune's chunked loss from hidden states.

Measured as the rise of the process's peak resident memory (getrusage ru_maxrss) over its resident memory just
before the loss, each case in a fresh process (tracemalloc cannot see torch's CPU allocations; torch's profiler
records no CPU allocation events on this build). Hidden size 256 by default: logits memory does not depend on it,
and it keeps the matmuls quick on a small CPU (--hidden-size 4096 for the 7B's).

Cases: every position labelled (the worst case for the chunked loss, which computes logits only where a label
counts), and a realistic sample (4,608 video tokens, 512 text tokens of which 100 are the answer); a frozen
language head (LoRA) and a trained one (its weight gradient, the same in both paths, counted in both).

Run:  python benchmarks/loss_memory.py [--tokens 5120] [--vocab 32064] [--hidden-size 256]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine

PAGE_BYTES = 4096


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


def peak_rise(path: str, tokens: int, vocab: int, hidden_size: int, labelled: int, train_head: bool) -> float:
    """MB the peak resident memory rises during one forward + backward of the loss (run in a fresh process)."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from vidtune.train.training.loss import chunked_cross_entropy, shifted_targets

    torch.set_num_threads(2)
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(train_head)
    hidden = torch.randn(1, tokens, hidden_size, requires_grad=True)
    labels = torch.full((1, tokens), -100)
    labels[0, tokens - labelled :] = torch.randint(0, vocab, (labelled,))
    before = resident_bytes()
    if path == "model":  # what LlavaNextVideoForConditionalGeneration.forward does with labels
        loss = ForCausalLMLoss(head(hidden), labels, vocab, num_items_in_batch=1)
    else:
        keep, targets = shifted_targets(labels)
        loss = chunked_cross_entropy(head, hidden[keep], targets)
    loss.backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 1e6


def measure(*args: object) -> float:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(peak_rise, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=5120)
    parser.add_argument("--vocab", type=int, default=32064)
    parser.add_argument("--hidden-size", type=int, default=256)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"loss peak memory, {args.tokens:,} tokens x {args.vocab:,} vocabulary, hidden {args.hidden_size}")
    print(f"{'case':<42}{'model loss MB':>15}{'chunked MB':>12}{'ratio':>8}")
    for labelled, what in ((args.tokens - 1, "all labelled"), (100, "100-token answer")):
        for train_head in (False, True):
            case = f"{what}, head {'trained' if train_head else 'frozen (LoRA)'}"
            common = (args.tokens, args.vocab, args.hidden_size, labelled, train_head)
            today, chunked = measure("model", *common), measure("chunked", *common)
            print(f"{case:<42}{today:>15.0f}{chunked:>12.0f}{today / chunked:>7.1f}x")
    print(f"re-run: python benchmarks/loss_memory.py --tokens {args.tokens} --hidden-size {args.hidden_size}")


if __name__ == "__main__":
    main()
