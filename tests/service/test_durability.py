"""What the service reports as stored is on the disk first (mergeprobe/service/durable.py): a file's
bytes are fsynced before it takes its final name, the directory after.

A power cut cannot be staged in a test, so these observe the OS calls themselves: `os.fsync` is
wrapped to note, at each call, what the disk is being given (a file's sha256, a directory's names),
and then does its real work.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from mergeprobe.checkpoints.library import ModelLibrary
from mergeprobe.merging.merge_plan import ElementalRequest
from mergeprobe.service.durable import durable_link, durable_mkdir, durable_replace, fsync_file
from mergeprobe.service.kinds import KINDS
from mergeprobe.service.settings import Settings
from worker.context import JobContext
from worker.engines.merge import run_elemental


@dataclass(frozen=True)
class Fsync:
    """One os.fsync call, and what it synced: a file's contents, or a directory's entries."""

    path: Path
    sha256: str | None = None
    names: frozenset[str] | None = None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@pytest.fixture
def fsyncs(monkeypatch) -> list[Fsync]:
    """The fsync calls made during the test, in order."""
    calls: list[Fsync] = []
    real_fsync = os.fsync

    def recording_fsync(fd) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.is_dir():
            calls.append(Fsync(path, names=frozenset(os.listdir(path))))
        else:
            calls.append(Fsync(path, sha256=sha256_file(path)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path.resolve()  # as /proc/self/fd names it


def test_fsync_file_syncs_an_fd_a_file_object_after_flushing_it_and_a_path(root, fsyncs):
    by_fd = root / "by-fd"
    fd = os.open(by_fd, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"fd bytes")
    fsync_file(fd)
    os.close(fd)

    by_object = root / "by-object"
    with open(by_object, "wb") as fh:  # buffered: the bytes are still Python's until flushed
        fh.write(b"object bytes")
        fsync_file(fh)

    by_path = root / "by-path"
    by_path.write_bytes(b"path bytes")
    fsync_file(by_path)

    assert fsyncs == [
        Fsync(by_fd, sha256=sha256_bytes(b"fd bytes")),
        Fsync(by_object, sha256=sha256_bytes(b"object bytes")),
        Fsync(by_path, sha256=sha256_bytes(b"path bytes")),
    ]


def test_durable_replace_syncs_the_file_renames_it_then_syncs_the_directory(root, fsyncs):
    final, tmp = root / "model.safetensors", root / ".model.partial"
    final.write_bytes(b"old")
    tmp.write_bytes(b"new")

    durable_replace(tmp, final)

    assert final.read_bytes() == b"new" and not tmp.exists()
    assert fsyncs == [
        Fsync(tmp, sha256=sha256_bytes(b"new")),  # complete, under its temp name
        Fsync(root, names=frozenset({"model.safetensors"})),  # the rename done
    ]


def test_durable_link_syncs_the_file_links_it_then_syncs_the_directory_and_never_replaces(root, fsyncs):
    final, tmp = root / "model.safetensors", root / ".model.partial"
    tmp.write_bytes(b"first")

    durable_link(tmp, final)

    assert final.read_bytes() == b"first" and final.samefile(tmp)
    assert fsyncs == [
        Fsync(tmp, sha256=sha256_bytes(b"first")),
        Fsync(root, names=frozenset({"model.safetensors", ".model.partial"})),
    ]

    second = root / ".second.partial"
    second.write_bytes(b"second")
    with pytest.raises(FileExistsError):
        durable_link(second, final)
    assert final.read_bytes() == b"first"
    assert all(call.names is None for call in fsyncs[2:])  # no directory changed


def test_durable_mkdir_syncs_each_new_directory_into_its_parent(root, fsyncs):
    durable_mkdir(root / "a" / "b")

    assert (root / "a" / "b").is_dir()
    assert fsyncs == [Fsync(root, names=frozenset({"a"})), Fsync(root / "a", names=frozenset({"b"}))]
    durable_mkdir(root / "a" / "b")
    assert len(fsyncs) == 2  # nothing new to sync


def test_a_merge_job_syncs_its_model_and_its_artifact_before_they_take_their_names(root, fsyncs, tiny_models):
    """An elemental job, in-process: the merged model (stream_merge) and plan.csv (ArtifactStore)."""
    models = root / "data" / "models"
    models.mkdir(parents=True)
    os.link(tiny_models["sd1"], models / "sd1-a.safetensors")
    os.link(tiny_models["sd1-b"], models / "sd1-b.safetensors")
    settings = Settings(data_dir=root / "data", models_dir=models)
    library = ModelLibrary(settings)
    request = ElementalRequest.model_validate(
        {"model_a": "sd1-a", "model_b": "sd1-b", "alpha": 0.5, "elemental": "OUT05:attn2:0.2"}
    )
    ctx = JobContext.local(KINDS["elemental"], request, settings=settings, library=library)

    result = run_elemental(ctx)

    # The model's bytes, final header (its data hash) included, synced under its temp name.
    model = library.root / result["model"]["name"]
    model_sha256 = sha256_file(model)
    assert any(call.path != model and call.sha256 == model_sha256 for call in fsyncs), fsyncs

    # plan.csv: its new job folder's entry, its bytes under the temp name, then its own entry.
    plan_csv = ctx.artifact_store.path_of(ctx.job_id, "plan.csv")
    job_dir = plan_csv.parent
    plan_sha256 = sha256_file(plan_csv)
    made = next((c for c in fsyncs if c.path == job_dir.parent and ctx.job_id in (c.names or ())), None)
    written = next((c for c in fsyncs if c.path.parent == job_dir and c.sha256 == plan_sha256), None)
    named = next((c for c in fsyncs if c.path == job_dir and c.names == frozenset({"plan.csv"})), None)
    assert None not in (made, written, named), fsyncs
    assert written.path != plan_csv
    assert fsyncs.index(made) < fsyncs.index(written) < fsyncs.index(named)
