"""Durable file commits: what the service reports as stored survives a power cut.

A write is only in the page cache until the kernel writes it back, and a rename or link only in
the directory's cached entries: after a crash the final name can be missing, or present with no
data (the rename reached the disk, the bytes did not). So the bytes of a file are fsynced before it
takes its final name, and the directory after, before anyone is told the file exists:

- ``durable_replace(tmp, final)``: publish `tmp` as `final`, replacing what was there;
- ``durable_link(tmp, final)``: publish `tmp` as `final` only where no `final` exists
  (`FileExistsError` otherwise); `tmp` keeps its name, for the caller to remove;
- ``fsync_file`` / ``fsync_dir`` / ``durable_mkdir``: the steps, for writers with their own commit.

No torch here: the API, the workers and the benchmarks use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

StrPath = str | os.PathLike[str]


def fsync_file(target: int | BinaryIO | StrPath) -> None:
    """Write a file's data and metadata to the disk: an open fd, an open file object (flushed
    first: its buffer is not yet the kernel's), or a path (the file's dirty pages are the inode's,
    so any descriptor of it, even one opened after the writer closed its own, syncs them)."""
    if isinstance(target, int):
        os.fsync(target)
    elif hasattr(target, "fileno"):
        target.flush()
        os.fsync(target.fileno())
    else:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: StrPath) -> None:
    """Write a directory's entries to the disk: the names created, renamed or removed in it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_mkdir(path: StrPath) -> None:
    """`mkdir -p` whose new directories are durable entries of their parents: a file committed
    into a directory created just before is lost with the directory's own entry otherwise."""
    path = Path(path)
    if path.is_dir():
        return
    durable_mkdir(path.parent)
    path.mkdir(exist_ok=True)  # a concurrent writer may create it too: either way, sync its entry
    fsync_dir(path.parent)


def durable_replace(tmp: StrPath, final: StrPath) -> None:
    """Rename the finished file `tmp` to `final` (same filesystem), replacing any `final`, so that
    once this returns `final` has `tmp`'s complete bytes even after a crash."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def durable_link(tmp: StrPath, final: StrPath) -> None:
    """Give the finished file `tmp` the name `final` too (a hard link: create-if-absent, atomic),
    or raise FileExistsError, touching nothing, where `final` exists; once this returns `final` has
    `tmp`'s complete bytes even after a crash. `tmp` stays: its removal need not be durable."""
    fsync_file(tmp)
    os.link(tmp, final)
    fsync_dir(Path(final).parent)
