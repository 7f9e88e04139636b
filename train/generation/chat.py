"""`vidtune chat`: a multi-turn conversation about a video in the terminal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vidtune.data.conversation import Message, media_part, message, text_part
from vidtune.train.generation.infer import InferenceModel, TextStreamer, generate

CHAT_HELP = (
    "commands: /help (this list), /video PATH (talk about another video), /reset (forget the conversation), "
    "/quit (or Ctrl-D, Ctrl-C)"
)


def sampling_kwargs(temperature: float, top_p: float) -> dict[str, Any]:
    """generate() keywords: greedy at temperature 0 (the default, as `vidtune infer`), else sampled."""
    return {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}


def chat(
    im: InferenceModel,
    video: str,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
    max_new_tokens: int = 128,
    stream: Callable[[str], None] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> None:
    """A multi-turn conversation about a video in the terminal. With `stream`, each reply goes out piece by piece
    as it is generated (`model> `, the pieces, a newline); without, as one `model> reply` line through `write`."""
    write(CHAT_HELP)
    history: list[Message] = []
    current = str(Path(video).resolve())
    kwargs = sampling_kwargs(temperature, top_p)
    try:
        while True:
            try:
                line = read("you> ").strip()
            except EOFError:
                return
            if not line:
                continue
            if line.startswith("/"):
                if line in ("/quit", "/exit"):
                    return
                current, history = command(line, current, history, write)
                continue
            parts = [text_part(line)] if history else [media_part("video", current), text_part(line)]
            history.append(message("user", parts))
            if stream is None:
                reply = generate(im, [history], max_new_tokens, **kwargs)[0]
                write(f"model> {reply}")
            else:
                stream("model> ")
                reply = generate(im, [history], max_new_tokens, streamer=TextStreamer(im, stream), **kwargs)[0]
                stream("\n")
            history.append(message("assistant", [text_part(reply)]))
    except KeyboardInterrupt:  # Ctrl-C while typing or while the model answers: leave quietly
        write("")


def command(line: str, current: str, history: list[Message], write: Callable[[str], None]) -> tuple[str, list]:
    """A /command (never sent to the model): the video and history after it."""
    name, _, argument = line.partition(" ")
    if name == "/help":
        write(CHAT_HELP)
    elif name == "/reset":
        write("(conversation reset)")
        return current, []
    elif name == "/video":
        candidate = argument.strip()
        if not Path(candidate).is_file():
            write(f"(no video at {candidate!r})")
        else:
            write(f"(now talking about {candidate})")
            return str(Path(candidate).resolve()), []
    else:
        write(f"(unknown command {name}; /help lists them)")
    return current, history
