"""Where a request's media come from: a path (or `file://` URL) under --media-root, a base64 `data:` URL written
to a temporary file for the decoders, or an http(s) URL only when the server was started with --allow-urls.

URLs are fetched from public addresses only: the host is resolved, every address it resolves to must be public
(never loopback, private, link-local (cloud metadata at 169.254.169.254), shared, reserved or multicast), and the
connection goes to the address that was checked (no second lookup a rebinding DNS could answer differently).
Redirects are followed by hand, each hop checked the same way; the whole fetch, every hop and byte, has one time
limit and one size limit, so a server trickling bytes cannot hold a worker.

Every refusal is an APIError naming the message part, before anything is decoded.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import os
import socket
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vidtune.train.serving.protocol import APIError

DOWNLOAD_TIMEOUT_S = 30.0  # the whole fetch: every redirect hop, every byte
MAX_REDIRECTS = 5
MAX_PATH_CHARS = 1024  # a media path longer than this is not a path (a 5,000-character one reached the OS)


@dataclass(frozen=True)
class MediaPolicy:
    media_root: Path | None  # local paths resolve here and may not leave it; None refuses local paths
    allow_urls: bool  # fetch http(s) URLs from public addresses (off: a server others reach must not fetch for them)
    max_download_bytes: int
    download_timeout_s: float = DOWNLOAD_TIMEOUT_S


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


def blocked_reason(address: str) -> str | None:
    """Why an address may not be fetched (None: a public address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for reason, hit in (
        ("a loopback", ip.is_loopback),
        ("a link-local (cloud metadata)", ip.is_link_local),
        ("a private", ip.is_private),
        ("a multicast", ip.is_multicast),
        ("an unspecified", ip.is_unspecified),
        ("a reserved", ip.is_reserved),
    ):
        if hit:
            return f"{reason} address"
    return None if ip.is_global else "a non-public address"


def _public_address(url: str, where: str) -> tuple[urllib.parse.SplitResult, str]:
    """The URL's parts and the one public address to connect to, or a refusal naming the reason."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise APIError(400, f"{where}: {url} is refused: only http(s) URLs are fetched", where, "url_not_allowed")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        found = socket.getaddrinfo(parts.hostname or "", port, type=socket.SOCK_STREAM)
    except (ValueError, OSError, UnicodeError):
        raise APIError(400, f"{where}: cannot resolve the host of {url}", where, "media_not_found") from None
    addresses = [str(info[4][0]) for info in found]
    for address in addresses:
        if reason := blocked_reason(address):
            refused = f"{where}: {url} is refused: {parts.hostname} is {reason} (--allow-urls fetches public ones)"
            raise APIError(400, refused, where, "url_not_allowed")
    return parts, addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that was checked, whatever the host name resolves to now."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def _download(url: str, policy: MediaPolicy, files: RequestFiles, where: str) -> str:
    deadline = time.monotonic() + policy.download_timeout_s

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise APIError(
                400, f"{where}: fetching {url} took longer than {policy.download_timeout_s:g}s", where, "url_too_slow"
            )
        return left

    current = url
    try:
        for _ in range(MAX_REDIRECTS + 1):
            parts, address = _public_address(current, where)
            kind = _PinnedHTTPSConnection if parts.scheme.lower() == "https" else _PinnedHTTPConnection
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
            connection = kind(parts.hostname or "", address, port, timeout=remaining())
            try:
                target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
                connection.request("GET", target, headers={"User-Agent": "vidtune-serve"})
                response = connection.getresponse()
                if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                    current = urllib.parse.urljoin(current, response.getheader("Location", ""))
                    continue  # the next hop is checked like the first
                if response.status != 200:
                    raise APIError(
                        400, f"{where}: cannot download {url} (HTTP {response.status})", where, "media_not_found"
                    )
                return _save(response, connection, url, policy, files, where, remaining)
            finally:
                connection.close()
        raise APIError(400, f"{where}: {url} redirects more than {MAX_REDIRECTS} times", where, "media_not_found")
    except (OSError, http.client.HTTPException) as err:
        if time.monotonic() >= deadline:
            remaining()  # the time limit, said as such
        raise APIError(400, f"{where}: cannot download {url} ({err})", where, "media_not_found") from None


def _save(
    response: http.client.HTTPResponse,
    connection: http.client.HTTPConnection,
    url: str,
    policy: MediaPolicy,
    files: RequestFiles,
    where: str,
    remaining: Callable[[], float],
) -> str:
    path = files.new_path(Path(urllib.parse.urlsplit(url).path).suffix)
    with path.open("wb") as out:
        while True:
            if connection.sock is not None:
                connection.sock.settimeout(min(remaining(), 10.0))
            chunk = response.read1(1 << 20)
            remaining()
            if not chunk:
                return str(path)
            if out.tell() + len(chunk) > policy.max_download_bytes:
                raise APIError(400, f"{where}: {url} is larger than {policy.max_download_bytes:,} bytes", where)
            out.write(chunk)


def _local(path_text: str, policy: MediaPolicy, where: str) -> str:
    if policy.media_root is None:
        raise APIError(400, f"{where}: local paths are refused (start the server with --media-root)", where)
    if len(path_text) > MAX_PATH_CHARS or any(len(part) > 255 for part in path_text.split("/")):
        raise APIError(400, f"{where}: the path is too long ({len(path_text):,} characters)", where, "bad_path")
    root = policy.media_root.resolve()
    try:
        path = (root / path_text).resolve()  # an absolute path_text replaces root, then must still lie under it
        if not path.is_relative_to(root):
            raise APIError(400, f"{where}: {path_text} is outside the media root", where, "media_outside_root")
        if not path.is_file():
            raise APIError(400, f"{where}: no such file under the media root: {path_text}", where, "media_not_found")
    except (OSError, ValueError) as err:
        raise APIError(
            400, f"{where}: {path_text!r} is not a usable path ({err.__class__.__name__})", where, "bad_path"
        ) from None
    return str(path)


def resolve_media(url: str, policy: MediaPolicy, files: RequestFiles, where: str) -> str:
    """A local file path the decoders can open for one media URL."""
    if "\x00" in url:
        raise APIError(400, f"{where}: the media URL holds a NUL byte", where, "bad_path")
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
