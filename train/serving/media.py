"""Where a request's media come from: a path (or `file://` URL) under --media-root, a base64 `data:` URL written
to a temporary file for the decoders, or an http(s) URL only when the server was started with --allow-urls.

Every refusal is an APIError naming the message part, before anything is decoded.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vidtune.train.serving.protocol import APIError

DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class MediaPolicy:
    media_root: Path | None  # local paths resolve here and may not leave it; None refuses local paths
    allow_urls: bool  # fetch http(s) URLs (off: a server reachable by others must not fetch for them)
    max_download_bytes: int


class RequestFiles:
    """The temporary files of one request (uploads and downloads), removed when the request is done."""

    def __init__(self) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="vidtune-serve-")
        self.count = 0

    def new_path(self, suffix: str) -> Path:
        self.count += 1
        return Path(self.folder.name) / f"media{self.count}{suffix}"

    def close(self) -> None:
        self.folder.cleanup()


SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "image/png": ".png"}


def _from_data_url(url: str, files: RequestFiles, where: str) -> str:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, f"{where}: a data: URL must be base64 (data:video/mp4;base64,...)", where, "bad_data_url")
    try:
        content = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the data: URL is not valid base64", where, "bad_data_url") from None
    path = files.new_path(SUFFIXES.get(header[len("data:") : -len(";base64")], ""))
    path.write_bytes(content)
    return str(path)


def _download(url: str, policy: MediaPolicy, files: RequestFiles, where: str) -> str:
    path = files.new_path(Path(urllib.parse.urlparse(url).path).suffix)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, path.open("wb") as out:
            while chunk := response.read(1 << 20):
                if out.tell() + len(chunk) > policy.max_download_bytes:
                    raise APIError(400, f"{where}: {url} is larger than {policy.max_download_bytes:,} bytes", where)
                out.write(chunk)
    except OSError as err:
        raise APIError(400, f"{where}: cannot download {url} ({err})", where, "media_not_found") from None
    return str(path)


def _local(path_text: str, policy: MediaPolicy, where: str) -> str:
    if policy.media_root is None:
        raise APIError(400, f"{where}: local paths are refused (start the server with --media-root)", where)
    root = policy.media_root.resolve()
    path = (root / path_text).resolve()  # an absolute path_text replaces root, then must still lie under it
    if not path.is_relative_to(root):
        raise APIError(400, f"{where}: {path_text} is outside the media root", where, "media_outside_root")
    if not path.is_file():
        raise APIError(400, f"{where}: no such file under the media root: {path_text}", where, "media_not_found")
    return str(path)


def resolve_media(url: str, policy: MediaPolicy, files: RequestFiles, where: str) -> str:
    """A local file path the decoders can open for one media URL."""
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme == "data":
        return _from_data_url(url, files, where)
    if scheme in ("http", "https"):
        if not policy.allow_urls:
            refused = f"{where}: http(s) URLs are refused (start the server with --allow-urls)"
            raise APIError(400, refused, where, "url_not_allowed")
        return _download(url, policy, files, where)
    if scheme == "file":
        return _local(urllib.parse.unquote(urllib.parse.urlparse(url).path), policy, where)
    if scheme and len(scheme) > 1:  # (a one-letter scheme is a Windows drive)
        raise APIError(400, f"{where}: unsupported URL scheme {scheme!r}", where, "bad_url")
    return _local(os.path.expanduser(url), policy, where)
