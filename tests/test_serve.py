"""`vidtune serve` as a user runs it: a real uvicorn process on 127.0.0.1 and a free port, spoken to over HTTP
(httpx), and its web page driven in a real headless Chromium (Playwright on Debian's chromium)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, tiny_run_overrides

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow

QUESTION = "Which color comes first?"
VIDEO = "videos/eval_0001.mp4"  # relative to the demo corpus, the servers' --media-root
MAX_TOKENS = 12


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path


@contextlib.contextmanager
def running_server(args: list[str], log: Path, fault: str | None = None) -> Iterator[Server]:
    """`vidtune serve ARGS --port 0` in its own process, once /health answers at the port it printed (a port picked
    here and bound later could be taken meanwhile, by a second suite's server too); stopped with SIGINT at the end.
    `fault`: a tests/faults.py spec the server process runs under."""
    path = [str(REPO / ".shim"), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    entry = ["tests.faults", fault] if fault else ["vidtune.train.cli"]
    command = [sys.executable, "-m", *entry, "serve", *args, "--port", "0"]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server("", process, log)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, f"the server exited:\n{log.read_text()}"
            announced = re.search(r" on (http://127\.0\.0\.1:[1-9][0-9]*) ", log.read_text())
            with contextlib.suppress(httpx.HTTPError):
                if announced and httpx.get(f"{announced[1]}/health", timeout=2).status_code == 200:
                    server.url = announced[1]
                    break
            assert time.monotonic() < deadline, f"the server did not come up:\n{log.read_text()}"
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def served_run(tiny_model_dir, demo_corpus, tmp_path_factory) -> Path:
    """A real run folder (adapter, processor, training settings) from one step at a negligible learning rate, so it
    still answers with the random base's long text: many tokens to stream and compare (the trained answer is
    checked on the demo's instruct run, in the browser test)."""
    from vidtune.train.training.config import load_recipe
    from vidtune.train.training.loop import train

    output = tmp_path_factory.mktemp("serve") / "run"
    extra = ("train.max_steps=1", "train.batch_size=1", "train.learning_rate=1e-6")
    return train(load_recipe(None, tiny_run_overrides(tiny_model_dir, demo_corpus, output, *extra)))


@pytest.fixture(scope="module")
def server(served_run, demo_corpus, tmp_path_factory) -> Iterator[Server]:
    args = [str(served_run), "--media-root", str(demo_corpus), "--max-new-tokens", str(MAX_TOKENS)]
    with running_server([*args, "--max-body-mb", "1"], tmp_path_factory.mktemp("serve-log") / "serve.log") as s:
        yield s


def video_request(url: str, **fields) -> dict:
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    return {"model": "run", "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


def streamed_text(server: Server, body: dict) -> tuple[str, list[dict]]:
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks), chunks


@pytest.fixture(scope="module")
def infer_answer(served_run, demo_corpus) -> str:
    """What `vidtune infer` prints for the question (in this process, as the command runs it)."""
    import io

    from vidtune.train import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(
            [
                "infer",
                str(served_run),
                "--video",
                str(demo_corpus / VIDEO),
                "--prompt",
                QUESTION,
                "--max-new-tokens",
                str(MAX_TOKENS),
            ]
        )
    answer = out.getvalue().strip()
    assert len(answer) > 5  # real text to compare, not an empty answer
    return answer


def test_models_and_health(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["run"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_a_chat_completion_equals_vidtune_infer_for_a_path_a_file_url_and_an_upload(server, demo_corpus, infer_answer):
    upload = "data:video/mp4;base64," + base64.b64encode((demo_corpus / VIDEO).read_bytes()).decode()
    for url in (VIDEO, f"file://{demo_corpus / VIDEO}", upload):
        response = httpx.post(f"{server.url}/v1/chat/completions", json=video_request(url), timeout=120)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["message"] == {"role": "assistant", "content": infer_answer}
        assert body["choices"][0]["finish_reason"] == "length"  # the random text never stops on its own
        assert body["usage"]["completion_tokens"] == MAX_TOKENS


def test_streamed_chunks_concatenate_to_the_same_answer(server, infer_answer):
    text, chunks = streamed_text(server, video_request(VIDEO, stream=True))
    assert text == infer_answer
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len(chunks) > 4  # streamed piece by piece, not sent at the end
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


def _post_raw(server: Server, content: bytes | Iterator[bytes]) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers, timeout=60)


def _body(**fields) -> bytes:
    return json.dumps(fields).encode()


NOT_A_VIDEO = "data:video/mp4;base64," + base64.b64encode(b"these are meeting notes, not a video\n" * 20).decode()
BAD_REQUESTS = {
    # name: (raw body, status, error code, words the message must hold)
    "bad JSON": (b'{"messages": [', 400, "invalid_request", "not valid JSON"),
    "no messages": (_body(messages=[]), 400, "invalid_request", "messages"),
    "unknown part type": (
        _body(messages=[{"role": "user", "content": [{"type": "file"}]}]),
        400,
        "invalid_request",
        "messages.0.content.0",
    ),
    "missing video": (_body(**video_request("videos/nope.mp4")), 400, "media_not_found", "videos/nope.mp4"),
    "non-video upload": (_body(**video_request(NOT_A_VIDEO)), 400, "unreadable_media", "not a video"),
    "http URL": (_body(**video_request("http://example.com/clip.mp4")), 400, "url_not_allowed", "--allow-urls"),
    "path outside the media root": (_body(**video_request("../../../etc/passwd")), 400, "media_outside_root", ""),
    "unknown model": (_body(**{**video_request(VIDEO), "model": "gpt-9"}), 404, "model_not_found", "gpt-9"),
    "assistant last": (
        _body(messages=[{"role": "assistant", "content": "hi"}]),
        400,
        "last_message_not_user",
        "user",
    ),
    "oversized body": (_body(**video_request(VIDEO), padding="x" * (2 << 20)), 413, "body_too_large", "1,048,576"),
    # issue 24: hostile input that got through
    "NUL byte in a path": (_body(**video_request("videos/eval\x00.mp4")), 400, "bad_path", "NUL byte"),
    "5,000-character path": (_body(**video_request("a/" * 2500)), 400, "bad_path", "too long (5,000 characters)"),
    "prompt over the context": (
        _body(messages=[{"role": "user", "content": "red blue " * 3000}]),
        400,
        "context_length_exceeded",
        "this model's context is 4,096 tokens",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_its_openai_style_error_and_the_server_stays_up(server, case):
    body, status, code, words = BAD_REQUESTS[case]
    response = _post_raw(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert words in error["message"] and "\n" not in error["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_prompt_far_over_the_context_is_refused_by_its_length_at_once(server):
    """900 kB of text (under the body limit): refused from its character count, without tokenizing it."""
    started = time.monotonic()
    response = _post_raw(server, _body(messages=[{"role": "user", "content": "x" * 900_000}]))
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - started < 5


def test_errors_name_media_by_their_path_under_the_media_root(server, demo_corpus):
    response = _post_raw(server, _body(**video_request("questions_train.jsonl")))  # under the root, not a video
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "unreadable_media"
    assert error["message"].startswith("questions_train.jsonl: ") and str(demo_corpus) not in error["message"]


def test_an_oversized_chunked_body_is_cut_off_with_413(server):
    """No Content-Length to refuse up front: the body is counted as it streams in."""
    response = _post_raw(server, iter([b"x" * (256 << 10)] * 8))
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_twenty_concurrent_requests_are_all_answered_in_shared_batches(server, infer_answer):
    before = httpx.get(f"{server.url}/health").json()

    def ask(index: int) -> tuple[int, str]:
        body = video_request(VIDEO, stream=index % 2 == 1)  # half of them streamed
        if body["stream"]:
            return 200, streamed_text(server, body)[0]
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
        return response.status_code, response.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(ask, range(20)))
    assert [status for status, _ in results] == [200] * 20
    assert {text for _, text in results} == {infer_answer}  # identical prompts: batching changes no answer
    after = httpx.get(f"{server.url}/health").json()
    assert after["requests_answered"] - before["requests_answered"] == 20
    assert after["batches"] - before["batches"] < 20  # queued requests were generated together


ACCESS_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (GET|POST) (\S+) (\d{3}) \d+\.\d{3}s ?(.*)$", re.MULTILINE)


def test_every_request_gets_one_access_line_and_an_error_its_code(server):
    """As vLLM logs requests: method, path, status, latency, tokens and media count; 4xx with the error's code. The
    line is written before the response's last byte leaves, so it is there when the client has its answer."""
    before = len(server.log.read_text())
    assert httpx.get(f"{server.url}/v1/models").status_code == 200
    answered = httpx.post(f"{server.url}/v1/chat/completions", json=video_request(VIDEO, max_tokens=4), timeout=300)
    streamed_text(server, video_request(VIDEO, stream=True, max_tokens=4))
    for case in ("unknown model", "assistant last", "oversized body"):
        assert _post_raw(server, BAD_REQUESTS[case][0]).status_code == BAD_REQUESTS[case][1]
    assert httpx.get(f"{server.url}/no-such-page").status_code == 404
    usage = answered.json()["usage"]
    tokens = f"prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']} media=1"
    assert ACCESS_LINE.findall(server.log.read_text()[before:]) == [
        ("GET", "/v1/models", "200", ""),
        ("POST", "/v1/chat/completions", "200", tokens),
        ("POST", "/v1/chat/completions", "200", tokens),  # streamed: the same prompt and (greedy) answer
        ("POST", "/v1/chat/completions", "404", "media=1 error=model_not_found"),
        ("POST", "/v1/chat/completions", "400", "media=0 error=last_message_not_user"),
        ("POST", "/v1/chat/completions", "413", "error=body_too_large"),
        ("GET", "/no-such-page", "404", "error=invalid_request_error"),
    ]


# ------------------------------------------------------------------------- hostile clients (issue 24, items 12-13)


@pytest.fixture(scope="module")
def hostile_server(served_run, demo_corpus, tmp_path_factory) -> Iterator[Server]:
    """A server that fetches URLs, admits 2 requests at once and decodes for at most 5 s; opening any video named
    `stuck*` hangs inside the decoder (tests/faults.py `hang@`), as a decoder stuck in C does."""
    root = tmp_path_factory.mktemp("hostile-media")
    shutil.copy(demo_corpus / VIDEO, root / "clip.mp4")
    shutil.copy(demo_corpus / VIDEO, root / "stuck.mp4")
    args = [str(served_run), "--media-root", str(root), "--allow-urls", "--max-queue", "2", "--decode-timeout-s", "5"]
    log = tmp_path_factory.mktemp("hostile-log") / "serve.log"
    with running_server([*args, "--max-new-tokens", str(MAX_TOKENS)], log, fault="hang@stuck") as s:
        yield s


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/clip.mp4",
        "http://localhost/clip.mp4",
        "http://[::1]/clip.mp4",
        "http://[::ffff:127.0.0.1]/clip.mp4",
        "http://10.1.2.3/clip.mp4",
        "http://192.168.0.1/clip.mp4",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/clip.mp4",
    ],
)
def test_allow_urls_never_fetches_from_loopback_private_or_metadata_addresses(hostile_server, url):
    response = _post_raw(hostile_server, _body(**video_request(url)))
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "url_not_allowed", error
    assert "(--allow-urls fetches public ones)" in error["message"]
    assert "Connection refused" not in error["message"]  # no port scan through the server


def test_a_decode_that_hangs_is_stopped_at_the_time_limit_and_the_server_goes_on(hostile_server):
    started = time.monotonic()
    response = _post_raw(hostile_server, _body(**video_request("stuck.mp4")))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].endswith("decode timed out after 5s")  # (the child's own limit, or
    # the server's kill of the child: whichever comes first)
    assert 4.5 < time.monotonic() - started < 20
    response = _post_raw(hostile_server, _body(**video_request("clip.mp4")))
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    frames = httpx.post(f"{hostile_server.url}/v1/frames", json={"video_url": "clip.mp4"}, timeout=60)
    assert frames.status_code == 200 and len(frames.json()["frames"]) == len(frames.json()["timestamps_s"]) > 1
    stuck = httpx.post(f"{hostile_server.url}/v1/frames", json={"video_url": "stuck.mp4"}, timeout=60)
    assert stuck.status_code == 400 and stuck.json()["error"]["message"].endswith("decode timed out after 5s")


def test_a_full_server_answers_429_and_gone_clients_are_cancelled(hostile_server):
    """Two long streamed answers fill the server (--max-queue 2): a third request gets 429 at once. Both clients
    then hang up: the one generating is stopped and the queued one dropped, and the server is free again."""
    health = httpx.get(f"{hostile_server.url}/health").json()
    question = [{"role": "user", "content": QUESTION}]  # text only: this test is about the queue, not decoding
    long_answer = _body(messages=question, stream=True, max_tokens=4000)
    with httpx.Client(timeout=60) as first, httpx.Client(timeout=60) as second:
        streams = []
        for client in (first, second):
            url = f"{hostile_server.url}/v1/chat/completions"
            request = client.build_request(
                "POST", url, content=long_answer, headers={"Content-Type": "application/json"}
            )
            response = client.send(request, stream=True)
            assert response.status_code == 200, response.read()
            lines = response.iter_lines()  # (kept: a line iterator that is garbage-collected closes its stream)
            assert next(line for line in lines if line).startswith("data: ")  # admitted: its stream has begun
            streams.append((response, lines))
        busy = _post_raw(hostile_server, _body(**video_request("clip.mp4")))
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
        assert busy.headers["retry-after"] == "1"
        for response, _ in streams:
            response.close()
    deadline = time.monotonic() + 20
    while True:
        now = httpx.get(f"{hostile_server.url}/health").json()
        if now["requests_in_progress"] == 0 and now["requests_cancelled"] - health["requests_cancelled"] == 2:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.2)
    assert now["requests_answered"] == health["requests_answered"]  # neither long answer was generated to the end
    response = _post_raw(hostile_server, _body(**video_request("clip.mp4")))
    assert response.status_code == 200


@pytest.mark.parametrize("family", ["gemma4"])
def test_a_hearing_familys_server_answers_heard_and_silent_clips_as_infer_does(family, family_runs, tmp_path):
    """A family that hears, served: a clip with a sound track and one without, asked at once (batched together
    when they meet in the queue), each get the answer and the prompt (its sound's tokens included) that
    `vidtune infer`'s in-process road gives."""
    from tests.hearing import LOW_HZ, write_tone_twins
    from vidtune.train.demo.clips import write_color_clip
    from vidtune.train.generation.infer import generate, load_for_inference, prompt_example, video_question

    run = family_runs(family)
    heard = write_tone_twins(tmp_path / "media")[LOW_HZ]
    silent = write_color_clip(tmp_path / "media" / "silent.mp4", ["red", "blue"])  # the same pictures, no sound
    im = load_for_inference(str(run))
    questions = {clip.name: video_question(str(clip), QUESTION) for clip in (heard, silent)}
    examples = {name: prompt_example(im, q) for name, q in questions.items()}
    assert "input_features" in examples[heard.name] and "input_features" not in examples[silent.name]
    answers = {name: generate(im, [q], max_new_tokens=MAX_TOKENS)[0] for name, q in questions.items()}
    args = [str(run), "--media-root", str(tmp_path / "media"), "--max-new-tokens", str(MAX_TOKENS)]
    with running_server(args, tmp_path / "serve.log") as server:

        def ask(name: str) -> dict:
            response = httpx.post(f"{server.url}/v1/chat/completions", json=video_request(name), timeout=300)
            assert response.status_code == 200, response.text
            return response.json()

        with ThreadPoolExecutor(4) as pool:
            names = [heard.name, silent.name] * 2
            bodies = list(pool.map(ask, names))
    for name, body in zip(names, bodies, strict=True):
        assert body["choices"][0]["message"]["content"] == answers[name]
        assert body["usage"]["prompt_tokens"] == len(examples[name]["input_ids"])
    assert bodies[0]["usage"]["prompt_tokens"] > bodies[1]["usage"]["prompt_tokens"] + 25  # >= 1 s of sound heard


def test_ctrl_c_stops_the_server_cleanly(server):
    """(Runs last: it stops the module's server.)"""
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(30) == 0
    assert "Traceback" not in server.log.read_text()


# ------------------------------------------------------------------------------------------------- the web page


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium on PATH (the test command installs Debian's chromium when it can)")
    pytest.importorskip("playwright")
    return found


def test_the_web_page_answers_the_order_question_about_an_uploaded_clip(demo_run, tmp_path):
    """First load explains what to do; upload a held-out demo clip, see its sampled frames, ask the order question,
    read the trained answer; a mistyped path is refused beside its field with the clip, its frames and the
    conversation kept (the frames' screenshot unchanged); on a phone-wide window nothing spills sideways."""
    from playwright.sync_api import sync_playwright

    executable = chromium()
    root, _ = demo_run
    corpus = root / "corpus"
    row = json.loads((corpus / "questions_eval.jsonl").read_text().splitlines()[0])
    assert row["question"] == QUESTION
    args = [str(root / "runs" / "instruct"), "--media-root", str(corpus)]
    with running_server(args, tmp_path / "serve.log") as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url)
            hint = page.locator("#hint")
            assert hint.is_visible() and "Choose a video" in hint.inner_text() and "Ask a question" in hint.inner_text()
            assert page.locator("label[for=video-path]").is_visible()  # the path field has its label
            page.screenshot(path=str(tmp_path / "first-load.png"))
            page.set_input_files("#video-file", str(corpus / row["video"]))
            page.wait_for_selector("#frames .frame img", timeout=60_000)
            num_frames = json.loads((root / "runs" / "instruct" / "vidtune.json").read_text())["sampling"]["num_frames"]
            assert page.locator("#frames .frame").count() == num_frames
            page.fill("#prompt", QUESTION)
            page.click("#send")
            page.wait_for_selector(".message.assistant.done", timeout=120_000)
            assert page.locator(".message.assistant").inner_text().strip() == row["answer"]
            assert page.locator(".message.error").count() == 0
            assert not hint.is_visible()
            frames_before = page.locator("#frames").screenshot()
            page.fill("#video-path", "videos/no_such_clip.mp4")
            page.click("#use-path")
            page.wait_for_selector("#path-error:not(:empty)", timeout=60_000)
            assert "no_such_clip.mp4" in page.locator("#path-error").inner_text()
            page.screenshot(path=str(tmp_path / "wrong-path.png"))
            assert page.locator(".message").count() == 2 and page.locator("#frames .frame").count() == num_frames
            assert page.locator("#frames").screenshot() == frames_before  # the same frames, pixel for pixel
            page.fill("#prompt", "And last?")  # the conversation goes on with the clip it had
            page.click("#send")
            page.wait_for_selector(".message.assistant.done >> nth=1", timeout=120_000)
            assert page.locator(".message.error").count() == 0
            page.set_viewport_size({"width": 360, "height": 740})
            assert page.evaluate("document.documentElement.scrollWidth") <= 360
            page.screenshot(path=str(tmp_path / "narrow.png"), full_page=True)
            page.click("#reset")
            assert page.locator(".message").count() == 0
        finally:
            browser.close()


# ------------------------------------------------------------- fetching URLs: every redirect hop, total time and size


@contextlib.contextmanager
def origin_server() -> Iterator[str]:
    """A local HTTP origin: /clip (bytes), /to-private and /to-ftp (redirects), /trickle (a byte every 0.2 s)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            port = self.server.server_address[1]
            redirects = {
                "/to-private": f"http://127.0.0.2:{port}/clip",
                "/to-ftp": "ftp://example.com/clip.mp4",
                "/to-clip": "/clip",
            }
            if self.path in redirects:
                self.send_response(302)
                self.send_header("Location", redirects[self.path])
                self.end_headers()
            elif self.path == "/clip":
                self.send_response(200)
                self.send_header("Content-Length", "3000")
                self.end_headers()
                self.wfile.write(b"v" * 3000)
            elif self.path == "/trickle":
                self.send_response(200)
                self.end_headers()
                with contextlib.suppress(OSError):
                    for _ in range(100):
                        self.wfile.write(b"v")
                        self.wfile.flush()
                        time.sleep(0.2)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_every_redirect_hop_is_checked_and_a_trickling_fetch_is_cut_off(monkeypatch, tmp_path):
    """The fetcher itself, against a local origin treated as public (only 127.0.0.1: any other address, such as
    the loopback 127.0.0.2 a redirect points at, stays refused)."""
    from vidtune.train.serving import media
    from vidtune.train.serving.media import MediaPolicy, RequestFiles, resolve_media
    from vidtune.train.serving.protocol import APIError

    real = media.blocked_reason
    monkeypatch.setattr(media, "blocked_reason", lambda address: None if address == "127.0.0.1" else real(address))
    policy = MediaPolicy(None, True, max_download_bytes=2000, download_timeout_s=1.0)
    files = RequestFiles()
    try:
        with origin_server() as origin:

            def refused(path: str, **changes: Any) -> APIError:
                with pytest.raises(APIError) as err:
                    resolve_media(origin + path, replace(policy, **changes), files, "part")
                return err.value

            assert (
                Path(resolve_media(f"{origin}/to-clip", replace(policy, max_download_bytes=5000), files, "part"))
                .stat()
                .st_size
                == 3000
            )
            error = refused("/to-private")
            assert error.code == "url_not_allowed" and "127.0.0.2 is a loopback address" in error.message
            error = refused("/to-ftp")
            assert error.code == "url_not_allowed" and "only http(s) URLs are fetched" in error.message
            assert "is larger than 2,000 bytes" in refused("/clip").message
            started = time.monotonic()
            error = refused("/trickle", max_download_bytes=10_000)
            assert error.code == "url_too_slow" and "took longer than 1s" in error.message
            assert time.monotonic() - started < 3
    finally:
        files.close()
