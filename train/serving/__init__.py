"""`vidtune serve`: an OpenAI-compatible chat server (FastAPI + uvicorn) and a web chat page for a trained model.

protocol.py  the chat-completions request as vLLM accepts it (text, image_url, video_url parts); OpenAI-style errors
media.py     media URLs to files: paths under --media-root, data: URLs, http(s) only with --allow-urls
decode.py    a request's media decoded in a child process with a real time limit, killed when its client leaves
access_log.py one access line per request (status, latency, tokens, media count); --log-requests on|off
engine.py    one model thread; queued requests batched; tokens streamed per request
app.py       the FastAPI app: chat completions (plain and streamed), models, health, frames, the page; `serve`
chat.html    the web chat page served at `/`: pick or upload a video, see its sampled frames, chat, reset
"""
