"""The start-up measuring pass (token counts, drop reasons) cached on disk, so a relaunch or resume skips it.

Probing a clip reads its whole file (~10 ms for a real one): 100k clips cost ~17 min at every launch, and ranks
1..N used to repeat it after rank 0. A row's measurement is stored under a key made of the row itself, the identity
of every media file it names (absolute path, size, mtime in ns: an edited or replaced file is measured again), and
the settings the measurement depends on (processor, chat template, sampling, length and quality limits). Rank 0
measures first (in parallel processes); the other ranks then read its entries.

One SQLite file (WAL: readers never wait for a writer; parallel measuring processes each open their own
connection), under $VIDTUNE_CACHE_DIR or ~/.cache/vidtune. WAL needs shared memory between its processes, which a
network file system (an NFS home on a cluster, where every node opens the same file) does not give: there the cache
uses a rollback journal and SQLite's dot-file locking (a lock file, atomic on NFS, where byte-range locks are not).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1  # bump when what a measurement holds changes


def cache_dir() -> Path:
    return Path(os.environ.get("VIDTUNE_CACHE_DIR") or Path.home() / ".cache" / "vidtune")


# File systems several machines share (WAL's shared memory and POSIX byte-range locks are unreliable there).
NETWORK_FILE_SYSTEMS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p", "afs",
    "ocfs2", "gfs2", "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs",
}  # fmt: skip
MOUNTS = Path("/proc/mounts")
STALE_LOCK_S = 600.0  # a write holds the lock for milliseconds: one this old was left by a killed process


def network_file_system(path: Path) -> str | None:
    """The type of the network file system holding `path` (from the mount table), or None for a local one."""
    try:
        mounts = MOUNTS.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:  # not Linux: no mount table to read; local (WAL) as before
        return None
    target = os.path.realpath(path)
    best, kind = "", ""
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind if kind in NETWORK_FILE_SYSTEMS else None


def file_identity(path: str) -> list[Any]:
    """Absolute path, size and mtime (ns) of a media file; a missing file has none (measured, and reported, anew)."""
    absolute = os.path.abspath(path)
    try:
        stat = os.stat(absolute)
    except OSError:
        return [absolute, None, None]
    return [absolute, stat.st_size, stat.st_mtime_ns]


def settings_fingerprint(processor: Any, chat_template: str, label_turns: str, data_settings: dict[str, Any]) -> str:
    """A digest of everything besides the row and its files that a measurement depends on."""
    processor_settings = {
        "video": processor.video_processor.to_dict() if getattr(processor, "video_processor", None) else None,
        "image": processor.image_processor.to_dict() if getattr(processor, "image_processor", None) else None,
        "tokenizer": [type(processor.tokenizer).__name__, len(processor.tokenizer), processor.tokenizer.name_or_path],
    }
    settings = [SCHEMA_VERSION, processor_settings, chat_template, label_turns, data_settings]
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class MeasureCache:
    """Row measurements by (row, media file identities, settings); a connection per process, opened on first use."""

    def __init__(self, settings: str, path: Path | None = None):
        self.settings = settings
        self.path = path or cache_dir() / "measure.sqlite"
        self._connection: sqlite3.Connection | None = None
        self.network_fs: str | None = None  # set on connecting

    def __getstate__(self) -> dict[str, Any]:  # pickled into measuring processes without the connection
        return {**self.__dict__, "_connection": None}

    @property
    def connection(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.network_fs = network_file_system(self.path.parent)
            if self.network_fs:
                self._connection = self._connect_shared()
            else:
                self._connection = sqlite3.connect(self.path, timeout=60, isolation_level=None)
                self._connection.execute("PRAGMA journal_mode=WAL")
                self._connection.execute("PRAGMA synchronous=NORMAL")  # WAL: no fsync per entry, still never corrupt
            self._connection.execute("CREATE TABLE IF NOT EXISTS measured (key TEXT PRIMARY KEY, value TEXT)")
        return self._connection

    def _connect_shared(self) -> sqlite3.Connection:
        """A network file system: a rollback journal (no shared memory) and dot-file locking (SQLite's unix-dotfile
        VFS: a `.lock` entry beside the file, created atomically), full syncs. A lock left by a killed process is
        removed once it is STALE_LOCK_S old."""
        lock = Path(f"{self.path}.lock")
        with contextlib.suppress(OSError):
            if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                lock.rmdir() if lock.is_dir() else lock.unlink()
        uri = f"file:{urllib.parse.quote(str(self.path))}?vfs=unix-dotfile"
        connection = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
        connection.execute("PRAGMA journal_mode=DELETE")
        connection.execute("PRAGMA synchronous=FULL")
        return connection

    def key(self, row: dict[str, Any], media_paths: list[str]) -> str:
        identity = [self.settings, row, [file_identity(path) for path in media_paths]]
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        found = self.connection.execute("SELECT value FROM measured WHERE key = ?", (key,)).fetchone()
        return json.loads(found[0]) if found else None

    def put_many(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        if not entries:
            return
        rows = [(key, json.dumps(value)) for key, value in entries]
        self.connection.execute("BEGIN")  # one transaction (the connection autocommits otherwise)
        try:
            self.connection.executemany("INSERT OR REPLACE INTO measured VALUES (?, ?)", rows)
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")
