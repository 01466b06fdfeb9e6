"""A worker's cache of models by sha256: least recently used out first, never a file a job on
this host reads (leases are flocks, so they hold across the worker processes sharing a cache)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from mergeprobe.checkpoints.model_cache import ModelCache

MB = 1024 * 1024


def _put(cache: ModelCache, tag: str, size: int, age: float) -> str:
    """A cached file of `size` bytes last used `age` seconds ago; returns its sha256 (the name)."""
    sha256 = (tag * 64)[:64]
    tmp = cache.root / f".tmp-{tag}"
    tmp.write_bytes(b"\0" * size)
    path = cache.admit(tmp, sha256, ".safetensors")
    cache.release_all()
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return sha256


def test_least_recently_used_go_first_and_a_hit_counts_as_use(tmp_path):
    cache = ModelCache(tmp_path, max_bytes=3 * MB)
    old, middle, new = _put(cache, "a", MB, 30), _put(cache, "b", MB, 20), _put(cache, "c", MB, 10)
    assert cache.get(old, ".safetensors") is not None  # used now: the most recent
    cache.release_all()
    evicted = cache.make_room(MB)
    assert [p.name for p in evicted] == [f"{middle}.safetensors"]
    assert cache.get(middle, ".safetensors") is None
    assert {p.name for p in cache.files()} == {f"{old}.safetensors", f"{new}.safetensors"}
    assert cache.size() == 2 * MB


def test_a_file_a_job_reads_is_never_evicted_not_even_by_another_process(tmp_path):
    cache = ModelCache(tmp_path, max_bytes=2 * MB)
    held_here, held_there = _put(cache, "a", MB, 30), _put(cache, "b", MB, 20)
    assert cache.get(held_here, ".safetensors") is not None  # this process's job reads it
    # Another worker process on the host leases the second one and keeps it until told to stop.
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from mergeprobe.checkpoints.model_cache import ModelCache;"
            f"c = ModelCache(Path({str(tmp_path)!r}), 0); assert c.get({held_there!r}, '.safetensors');"
            "print('leased', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "leased"
        # Another cache object (as another worker would have) needs room: nothing may go.
        assert ModelCache(tmp_path, max_bytes=2 * MB).make_room(MB) == []
        assert cache.size() == 2 * MB  # over the cap after the next fetch, rather than a failed job
    finally:
        other.communicate("")
    # The other job ended: its file may go now; ours still may not.
    evicted = ModelCache(tmp_path, max_bytes=2 * MB).make_room(MB)
    assert [p.name for p in evicted] == [f"{held_there}.safetensors"]
    cache.release_all()
    assert [p.name for p in ModelCache(tmp_path, max_bytes=MB).make_room(MB)] == [f"{held_here}.safetensors"]
