"""`vidtune serve` under load: N concurrent clients, each sending chat completions about a video one after the
other; prints requests/s, p50/p95 latency and the mean batch the server formed, per N.

The server is the real command in its own process (uvicorn, the model's one worker thread). Without --model it
serves a tiny random LLaVA-NeXT-Video built here, with --max-tokens forced tokens per answer (min_tokens is not
an OpenAI field, so the tiny model's random text is simply cut at max_tokens: it never stops earlier).

Run:  python benchmarks/serve_latency.py [--clients 1 4 16] [--requests 8] [--max-tokens 16] [--model RUN]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(model: str, media_root: Path, num_frames: int, log: Path):
    port = free_port()
    command = [sys.executable, "-m", "vidtune.train.cli", "serve", model, "--port", str(port)]
    command += ["--media-root", str(media_root), "--num-frames", str(num_frames), "--max-batch-size", "32"]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if process.poll() is not None:
                raise SystemExit(f"the server exited:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)


def one_request(url: str, video: str, max_tokens: int) -> float:
    content = [{"type": "video_url", "video_url": {"url": video}}, {"type": "text", "text": "Which color comes first?"}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - started


def load(url: str, videos: list[str], clients: int, requests: int, max_tokens: int) -> tuple[float, list[float]]:
    """Every client sends `requests` requests back to back; (wall seconds, every request's latency)."""

    def client(index: int) -> list[float]:
        return [one_request(url, videos[(index + k) % len(videos)], max_tokens) for k in range(requests)]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for times in pool.map(client, range(clients)) for t in times]
    return time.perf_counter() - started, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients, per round")
    parser.add_argument("--requests", type=int, default=8, help="requests per client per round")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--frames", type=int, default=4, help="frames per video")
    parser.add_argument("--model", help="a run or model folder to serve (default: a tiny random model built here)")
    args = parser.parse_args()

    from vidtune.train.demo.clips import write_color_clip
    from vidtune.train.demo.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="vidtune-serve-bench-"))
    colors = ["red", "green", "blue", "yellow"]
    videos = [write_color_clip(work / f"clip{i}.mp4", [colors[i], colors[(i + 1) % 4]], seed=i).name for i in range(4)]
    model = args.model or str(build_tiny_model(work / "tiny-model"))
    print(f"machine: {machine()}")
    print(f"model: {model}, {args.frames} frames, {args.max_tokens} tokens per answer, {args.requests} requests/client")
    print(f"{'clients':>8} {'requests':>9} {'req/s':>8} {'p50 ms':>9} {'p95 ms':>9} {'mean batch':>11}")
    with server(model, work, args.frames, work / "serve.log") as url:
        one_request(url, videos[0], args.max_tokens)  # warm-up: first-call allocations, lazy imports
        for clients in args.clients:
            before = httpx.get(f"{url}/health").json()
            seconds, latencies = load(url, videos, clients, args.requests, args.max_tokens)
            after = httpx.get(f"{url}/health").json()
            batch = (after["requests_answered"] - before["requests_answered"]) / (after["batches"] - before["batches"])
            p50 = statistics.median(latencies) * 1000
            p95 = statistics.quantiles(latencies, n=20)[-1] * 1000 if len(latencies) > 1 else p50
            rate = len(latencies) / seconds
            print(f"{clients:>8} {len(latencies):>9} {rate:>8.2f} {p50:>9.1f} {p95:>9.1f} {batch:>11.2f}")
    print(f"re-run: python benchmarks/serve_latency.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
