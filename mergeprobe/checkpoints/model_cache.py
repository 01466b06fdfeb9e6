"""A worker's local copies of library models, addressed by sha256 (the s3 library's cache).

`DIR/<sha256>.<ext>`: a file is only ever renamed into place after its bytes were hashed and
matched the name, so a name is its own checksum. Least recently used files (by mtime, touched
on every use) go first when a new one needs room beyond `max_bytes`.

A file a job reads is leased: its descriptor holds a shared `flock` until the job ends, and
eviction takes an exclusive non-blocking one, so no process on this host (several workers may
share one cache directory) ever loses a file under a running job. A cache over its cap because
every file is leased grows rather than failing the job.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from pathlib import Path

log = logging.getLogger("mergeprobe.model_cache")

_CACHED = re.compile(r"^[0-9a-f]{64}\.(safetensors|ckpt)$")


class ModelCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._leases: dict[Path, int] = {}

    def path_for(self, sha256: str, ext: str) -> Path:
        return self.root / f"{sha256}{ext}"

    def get(self, sha256: str, ext: str) -> Path | None:
        """The cached file, leased and marked as just used; None when it is not here."""
        path = self.path_for(sha256, ext)
        try:
            self.lease(path)
        except FileNotFoundError:
            return None
        os.utime(path)
        return path

    def lease(self, path: Path) -> None:
        """Hold a shared lock on the file until `release_all`; FileNotFoundError when it is gone
        (also when an eviction removed it between our open and our lock)."""
        if path in self._leases:
            return
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            raise FileNotFoundError(path)
        self._leases[path] = fd

    def release_all(self) -> None:
        """Drop this process's leases (a worker calls it when a job ends)."""
        for fd in self._leases.values():
            os.close(fd)  # closing the descriptor releases its flock
        self._leases.clear()

    def files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if _CACHED.match(p.name)]

    def size(self) -> int:
        total = 0
        for path in self.files():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def make_room(self, nbytes: int) -> list[Path]:
        """Evict least recently used files not leased anywhere until `nbytes` more fit the cap."""
        entries = []
        for path in self.files():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime_ns, stat.st_size, path))
        used = sum(size for _, size, _ in entries)
        evicted = []
        for _, size, path in sorted(entries):
            if used + nbytes <= self.max_bytes:
                break
            if path in self._leases or not remove_if_unlocked(path):
                continue
            used -= size
            evicted.append(path)
        if used + nbytes > self.max_bytes:
            log.warning(
                "model cache %s: %d bytes in use by running jobs; going over its %d-byte cap",
                self.root,
                used,
                self.max_bytes,
            )
        return evicted

    def admit(self, tmp: Path, sha256: str, ext: str) -> Path:
        """Give a verified file its sha256 name in the cache and lease it. Where another process
        of the host got there first, its file (the same bytes) is kept: replacing it would pull
        the file from under that process's lease."""
        final = self.path_for(sha256, ext)
        try:
            os.link(tmp, final)
        except FileExistsError:
            pass
        tmp.unlink(missing_ok=True)
        self.lease(final)
        return final


def remove_if_unlocked(path: Path) -> bool:
    """Delete a file unless some process holds a lock on it (a lease, a writer's lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)
    return True
