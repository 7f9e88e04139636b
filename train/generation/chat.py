"""`vidtune chat`: a multi-turn conversation about a video in the terminal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vidtune.data.conversation import Message, media_part, message, text_part
from vidtune.train.generation.infer import InferenceModel, generate

CHAT_HELP = "commands: /video PATH (talk about another video), /reset (forget the conversation), /quit"


def chat(
    im: InferenceModel,
    video: str,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
    max_new_tokens: int = 128,
) -> None:
    """A multi-turn conversation about a video in the terminal."""
    write(CHAT_HELP)
    history: list[Message] = []
    current = str(Path(video).resolve())
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history = []
            write("(conversation reset)")
            continue
        if line.startswith("/video"):
            candidate = line[len("/video") :].strip()
            if not Path(candidate).is_file():
                write(f"(no video at {candidate!r})")
                continue
            current, history = str(Path(candidate).resolve()), []
            write(f"(now talking about {candidate})")
            continue
        parts = [text_part(line)] if history else [media_part("video", current), text_part(line)]
        history.append(message("user", parts))
        reply = generate(im, [history], max_new_tokens)[0]
        history.append(message("assistant", [text_part(reply)]))
        write(f"model> {reply}")
