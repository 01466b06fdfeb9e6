"""The model library: names → checkpoints, validated once when they come in.

Plain Python (no torch): the API lists, validates, uploads and deletes models here, and the
worker opens the files of the models its jobs were pinned to. Two backends answer the same
methods (`open_library` picks one from the settings):

- `local` (`ModelLibrary`, the default): one directory, MODELS_DIR, file name = model name.
  One host, or hosts that share that directory.
- `s3` (`mergeprobe.checkpoints.shared_library.S3ModelLibrary`): the bytes in an S3-compatible
  bucket addressed by sha256, the index in Redis, and a local cache per worker host.

Names: a model's id is its name without the extension. A reference is looked up as an exact
name first, then (when it looks like one) as a sha256 or short hash, then as an id; names whose
id looks like a hash, or equals another model's name or id, are refused, so no upload can
shadow another model.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import threading
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from mergeprobe.checkpoints.archs import UNKNOWN
from mergeprobe.checkpoints.checkpoint_headers import (
    ENGINE_DTYPES,
    CheckpointFormatError,
    CheckpointHeader,
    check_leading_bytes,
    read_checkpoint_header,
)
from mergeprobe.checkpoints.model_cache import remove_if_unlocked
from mergeprobe.checkpoints.variants import CheckpointVariant, detect_variant
from mergeprobe.lora.lora_formats import LoraFormatError, describe_lora, lora_summary
from mergeprobe.service.durable import durable_link, fsync_file
from mergeprobe.service.errors import Conflict, InvalidInput, MergeprobeError, NotFound, TooLarge
from mergeprobe.service.settings import Settings

MODEL_EXTENSIONS = (".safetensors", ".ckpt")
# Names are file names in one flat directory: no separators, no leading dot, no "..".
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+=,@-]*(?:\.[A-Za-z0-9_+=,@-]+)*$")
_MAX_NAME = 200
# What a lookup reads as a hash: a sha256 or the 10-character short hash AUTOMATIC1111 shows.
_HASH_REF = re.compile(r"^(?:[0-9a-f]{10}|[0-9a-f]{64})$")
# Ids refused for new models: anything a person could mistake for (a prefix of) a hash.
_HASHLIKE_ID = re.compile(r"^[0-9a-fA-F]{8,64}$")
_JOB_PARTIAL_RE = re.compile(r"^\.partial-([0-9a-f]{24})-")
# Temp files of uploads and of a worker's fetches into its cache: locked while being written.
_UNOWNED_TEMP_RE = re.compile(r"^\.(?:partial|fetch)-[0-9a-f]{12}-")
_HASH_CHUNK = 8 * 1024 * 1024
UPLOAD_BATCH_BYTES = 8 * 1024 * 1024  # an upload is hashed and written in batches of this
# AUTOMATIC1111's legacy model hash: sha256 of the 64 KiB at offset 1 MiB.
_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000


@dataclass
class ModelInfo:
    id: str
    name: str
    arch: str
    format: str
    size_bytes: int
    sha256: str
    short_hash: str
    legacy_hash: str
    key_count: int
    dtypes: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    variant: dict[str, Any] = field(default_factory=dict)  # CheckpointVariant.to_dict()
    kind: str = "checkpoint"  # or "lora"
    lora: dict[str, Any] | None = None  # lora_summary() of a LoRA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelEntry:
    """One model of the library: its name, the sha256 of its bytes and what was read from them."""

    name: str
    sha256: str
    legacy_hash: str
    header: CheckpointHeader
    variant: CheckpointVariant
    path: Path | None = None  # the local file (local backend); None where the bytes are elsewhere
    lora: dict[str, Any] | None = None  # lora_summary() when the file is a LoRA

    @property
    def id(self) -> str:
        return id_of(self.name)

    @property
    def kind(self) -> str:
        return "lora" if self.lora is not None else "checkpoint"

    @property
    def size_bytes(self) -> int:
        return self.header.file_size

    def info(self) -> ModelInfo:
        header = self.header
        return ModelInfo(
            id=self.id,
            name=self.name,
            arch=self.lora["arch"] if self.lora is not None else self.variant.arch,
            format=header.format,
            size_bytes=header.file_size,
            sha256=self.sha256,
            short_hash=self.sha256[:10],
            legacy_hash=self.legacy_hash,
            key_count=len(header.tensors),
            dtypes=dict(sorted(Counter(t.dtype for t in header.tensors.values()).items())),
            metadata=dict(header.metadata),
            variant=self.variant.to_dict(),
            kind=self.kind,
            lora=self.lora,
        )


def id_of(name: str) -> str:
    """A model's id: its name without the extension."""
    return name.rsplit(".", 1)[0]


def shown_text(text: object, limit: int = 100) -> str:
    """An untrusted name as an error message shows it: repr, at most `limit` characters of it
    (a 1 MB JSON body of one model name must not come back as a 1 MB problem detail)."""
    if isinstance(text, str) and len(text) > limit:
        return f"{text[:limit]!r}… ({len(text)} characters)"
    return repr(text)


def validate_model_name(name: str, *, field: str = "name") -> str:
    """A name for a new model, or a 400 saying what is wrong with it."""
    if not name or len(name) > _MAX_NAME or ".." in name or not _NAME_RE.match(name):
        raise InvalidInput(
            "invalid-model-name",
            "Invalid model name",
            f"{shown_text(name)} is not a valid model name: use letters, digits and _ + = , @ - . "
            "(no path separators, no leading dot, no '..'), at most 200 characters",
            field=field,
        )
    if not name.endswith(MODEL_EXTENSIONS):
        raise InvalidInput(
            "invalid-model-name",
            "Invalid model name",
            f"{name!r} must end with .safetensors or .ckpt",
            field=field,
        )
    if _HASHLIKE_ID.match(id_of(name)):
        raise InvalidInput(
            "invalid-model-name",
            "Invalid model name",
            f"{name!r} looks like a hash: models are looked up by sha256 and short hash too, so a name "
            "made of 8 to 64 hexadecimal digits could be taken for another model's; choose another name",
            field=field,
        )
    return name


def validate_output_name(name: str, *, field: str = "output.name") -> str:
    """A job's output model name: a valid model name that ends .safetensors (what jobs write)."""
    validate_model_name(name, field=field)
    if not name.endswith(".safetensors"):
        raise InvalidInput(
            "invalid-model-name", "Invalid request", "the output is written as .safetensors", field=field
        )
    return name


def name_conflict(name: str, existing: Iterable[str]) -> str | None:
    """Why `name` cannot be added beside the `existing` names (None when it can): it is taken, or
    its id is another model's id or name, or its name is another model's id."""
    new_id = id_of(name)
    for other in existing:
        if other == name:
            return f"a model named {name!r} already exists"
        other_id = id_of(other)
        if other_id == new_id:
            return f"{other!r} already has the id {new_id!r}"
        if new_id == other or name == other_id:
            return f"{name!r} would be confused with {other!r} (one's id is the other's name)"
    return None


def name_taken_error(name: str, why: str, field: str) -> Conflict:
    return Conflict("model-exists", "Model exists", why, field=field)


def check_reference(ref: object, field: str) -> str:
    if not isinstance(ref, str) or not ref or len(ref) > _MAX_NAME or ".." in ref or not _NAME_RE.match(ref):
        raise InvalidInput(
            "invalid-model-name",
            "Invalid model reference",
            f"{shown_text(ref)} is not a model id or name",
            field=field,
        )
    return ref


def find_reference(ref: str, names: list[str], sha256_of_name: Any) -> str | None:
    """The name a reference means among `names`: an exact name, else (for a hash-shaped reference)
    the model with that sha256 or short hash, else the model with that id. `sha256_of_name(name)`
    gives a name's sha256 or "" when it is not known yet."""
    if ref in names:
        return ref
    if _HASH_REF.match(ref):
        for name in names:
            if sha256_of_name(name).startswith(ref):
                return name
    return next((name for name in names if id_of(name) == ref), None)


def legacy_hash_of(path: Path) -> str:
    with open(path, "rb") as fh:
        fh.seek(_LEGACY_OFFSET)
        return hashlib.sha256(fh.read(_LEGACY_LENGTH)).hexdigest()[:8]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class PinnedModel(BaseModel):
    """A model reference as resolved when a job was accepted: its name and the sha256 of its bytes
    then. Jobs carry these, so a worker runs on the bytes that were validated, or not at all."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    sha256: str = Field(pattern="^[0-9a-f]{64}$")


def header_size_estimate(header: CheckpointHeader) -> int:
    """Rough bytes a parsed header holds in memory (a TensorInfo, its key and shape ≈ 400 bytes)."""
    return (
        400 * len(header.tensors)
        + sum(len(k) for k in header.tensors)
        + 2 * sum(len(k) + len(v) for k, v in header.metadata.items())
    )


class HeaderCache:
    """Parsed headers by file version, bounded by their estimated size: the least recently used
    go first, and one larger than a quarter of the budget is never kept (a pathological upload's
    header must not stay in the API's memory)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Any, value: Any, size: int) -> None:
        if size > self.max_bytes // 4:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and self._items:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped


def open_library(settings: Settings, connection: redis.Redis | None = None) -> ModelLibrary:
    """The library the settings select; the s3 backend keeps its index in `connection`'s Redis."""
    if settings.library_backend == "s3":
        from mergeprobe.checkpoints.shared_library import S3ModelLibrary

        if connection is None:
            raise RuntimeError("MERGEPROBE_LIBRARY_BACKEND=s3 needs REDIS_URL: its index lives in Redis")
        return S3ModelLibrary(settings, connection)
    return ModelLibrary(settings)


class ModelLibrary:
    """The local backend: the files of MODELS_DIR, which is also where merges and uploads are
    written (hidden `.partial-…` files, renamed into place when complete)."""

    backend = "local"

    def __init__(self, settings: Settings) -> None:
        self.root = settings.models_path
        self.work_dir = self.root  # where temp files of uploads and jobs go
        self.hash_cache_dir = settings.cache_path / "hashes"
        self.max_upload_bytes = settings.max_upload_bytes
        self.settings = settings
        self._headers = HeaderCache(settings.header_cache_bytes)
        # The sd2 rule reads a tensor from the file: once per file version, not per listing.
        self._variants: dict[tuple[str, int, int], CheckpointVariant] = {}
        self._lock = threading.Lock()

    # -- lookup -------------------------------------------------------------
    def _files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(
            p for p in self.root.iterdir() if p.name.endswith(MODEL_EXTENSIONS) and not p.name.startswith(".")
        )

    def _contained(self, path: Path, ref: str, field: str) -> Path:
        """The resolved path, refusing symlinks that lead out of the library."""
        resolved = path.resolve()
        if resolved.parent != self.root.resolve() and self.root.resolve() not in resolved.parents:
            raise InvalidInput(
                "invalid-model-name",
                "Invalid model name",
                f"{ref!r} leads outside the model library",
                field=field,
            )
        return resolved

    def names(self) -> list[str]:
        """Every model's name. Files dropped into the directory that share an id: the
        .safetensors one first, so a lookup by that id finds it."""
        return [p.name for p in sorted(self._files(), key=lambda p: (p.suffix != ".safetensors", p.name))]

    def lookup(self, ref: str, *, field: str = "model") -> ModelEntry:
        """A model by name, sha256, short hash or id (in that order)."""
        check_reference(ref, field)
        found = find_reference(
            ref, self.names(), lambda name: self._cached_hashes(self.root / name).get("sha256", "")
        )
        if found is None:
            raise NotFound("unknown-model", "Unknown model", f"no model {ref!r} in the library", field=field)
        return self.entry(self._contained(self.root / found, ref, field), field=field)

    def entry(self, path: Path, *, field: str = "model", name: str | None = None) -> ModelEntry:
        """The entry of a local file (hashed once per file version)."""
        header = self.header(path, field=field)
        sha256, legacy = self.hashes(path)
        lora = self._lora_of(path, header, field)
        return ModelEntry(
            name or path.name, sha256, legacy, header, self.variant(path, field=field), path, lora
        )

    def _lora_of(self, path: Path, header: CheckpointHeader, field: str) -> dict[str, Any] | None:
        """A local file's LoRA summary (None for a checkpoint), once per file version."""
        stat = path.stat()
        cache_key = ("lora", str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if cache_key in self._variants:
                return self._variants[cache_key]  # type: ignore[return-value]
        lora = describe_upload(header, path.name, field=field, path=path)
        with self._lock:
            self._variants[cache_key] = lora  # type: ignore[assignment]
        return lora

    def pin(
        self, ref: str, *, field: str = "model", kind: str = "checkpoint"
    ) -> tuple[PinnedModel, ModelEntry]:
        """Resolve a reference for a job: the pin (its name and the sha256 of its bytes now) and
        the entry, which must be of `kind` (a LoRA is not a model to merge or probe)."""
        entry = self.lookup(ref, field=field)
        if entry.kind != kind:
            what = (
                f"a LoRA ({', '.join(entry.lora['formats'])}, {entry.lora['arch']})"
                if entry.lora
                else "a checkpoint"
            )
            raise InvalidInput(
                "wrong-model-kind",
                "Wrong kind of model",
                f"{entry.name} is {what}, and {field} takes a {kind}",
                field=field,
            )
        return PinnedModel(name=entry.name, sha256=entry.sha256), entry

    def resolve(self, ref: str, *, field: str = "model") -> Path:
        """The local file of a model (fetched first where the library keeps its bytes elsewhere)."""
        return self.open_pinned(self.pin(ref, field=field)[0], field=field)

    def open_pinned(self, pinned: PinnedModel, *, field: str = "model") -> Path:
        """The file that holds a pinned model's bytes: its own name while it still holds them, else
        another library file with the same sha256; a 409 naming the model when none does (it was
        replaced or deleted after the job was accepted)."""
        path = self.root / pinned.name
        if path.is_file() and self.hashes(path)[0] == pinned.sha256:
            return self._contained(path, pinned.name, field)
        for name in self.names():
            other = self.root / name
            if self._cached_hashes(other).get("sha256") == pinned.sha256:
                return self._contained(other, pinned.name, field)
        raise model_changed_error(pinned, "changed" if path.is_file() else "was removed", field)

    def release_leases(self) -> None:
        """End of a job: the local backend holds nothing for it."""

    # -- headers and hashes of local files ------------------------------------
    def header(self, path: Path, *, field: str = "model") -> CheckpointHeader:
        stat = path.stat()
        cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
        cached = self._headers.get(cache_key)
        if cached is not None:
            return cached
        header = parse_header(path, path.name, field=field)
        self._headers.put(cache_key, header, header_size_estimate(header))
        return header

    def _hash_cache_file(self, path: Path) -> Path:
        return self.hash_cache_dir / f"{path.name}.json"

    def _cached_hashes(self, path: Path) -> dict[str, Any]:
        try:
            stat = path.stat()
            cached = json.loads(self._hash_cache_file(path).read_text())
        except (OSError, ValueError):
            return {}
        if cached.get("size") == stat.st_size and cached.get("mtime_ns") == stat.st_mtime_ns:
            return cached
        return {}

    def _store_hashes(self, path: Path, sha256: str, legacy: str) -> None:
        stat = path.stat()
        self.hash_cache_dir.mkdir(parents=True, exist_ok=True)
        record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256, "legacy_hash": legacy}
        tmp = self.hash_cache_dir / f".{path.name}.{secrets.token_hex(4)}.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self._hash_cache_file(path))

    def hashes(self, path: Path) -> tuple[str, str]:
        """(sha256, legacy hash), computed once per file version and cached by size and mtime."""
        cached = self._cached_hashes(path)
        if cached:
            return cached["sha256"], cached["legacy_hash"]
        sha256, legacy = sha256_of(path), legacy_hash_of(path)
        self._store_hashes(path, sha256, legacy)
        return sha256, legacy

    def variant(self, path: Path, *, field: str = "model") -> CheckpointVariant:
        stat = path.stat()
        cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._variants.get(cache_key)
        if cached is not None:
            return cached
        variant = detect_variant(self.header(path, field=field), path)
        with self._lock:
            if len(self._variants) > 64:
                self._variants.clear()
            self._variants[cache_key] = variant
        return variant

    def list(self) -> list[ModelInfo]:
        infos = []
        for name in self.names():
            try:
                infos.append(self.entry(self.root / name).info())
            except (MergeprobeError, OSError):
                continue  # a broken file dropped into the directory is not a model
        return infos

    # -- writes -------------------------------------------------------------
    def delete(self, ref: str) -> ModelEntry:
        entry = self.lookup(ref, field="id")
        assert entry.path is not None
        entry.path.unlink()
        self._hash_cache_file(entry.path).unlink(missing_ok=True)
        return entry

    def temp_path(self, name: str, job_id: str | None = None) -> Path:
        """A hidden file for a model being written; `commit` moves it into the library.

        A job's temp file carries the job id, so that the files of a job whose worker died
        (SIGKILL, OOM: no `finally` ran) can be found and removed: `remove_partials`. An upload's
        carries a random 12-digit token and is locked while written: `sweep_abandoned_uploads`."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # Hidden (the listing skips dot files) and with the real extension, so the header reader accepts it.
        return self.work_dir / f".partial-{job_id or secrets.token_hex(6)}-{name}"

    def remove_partials(self, job_id: str) -> list[Path]:
        """Delete the temp files of one job (the reaper calls this for jobs of lost workers)."""
        if not re.fullmatch(r"[0-9a-f]{24}", job_id) or not self.work_dir.is_dir():
            return []
        removed = []
        for path in self.work_dir.glob(f".partial-{job_id}-*"):
            path.unlink(missing_ok=True)
            removed.append(path)
        return removed

    def partial_job_ids(self) -> set[str]:
        """Job ids that have temp files in the library (uploads' temp files carry none)."""
        if not self.work_dir.is_dir():
            return set()
        return {m.group(1) for p in self.work_dir.iterdir() if (m := _JOB_PARTIAL_RE.match(p.name))}

    def sweep_abandoned_uploads(self) -> list[Path]:
        """Delete temp files of uploads (and cache fetches) no process is writing: their writer was
        cut off by a crash. A writer holds an exclusive lock on its temp file, so a live one is
        never touched, also not one of another process sharing the directory."""
        if not self.work_dir.is_dir():
            return []
        removed = []
        for path in self.work_dir.iterdir():
            if _UNOWNED_TEMP_RE.match(path.name) and remove_if_unlocked(path):
                removed.append(path)
        return removed

    def check_name_free(self, name: str, *, field: str = "name") -> None:
        why = name_conflict(name, self.names())
        if why:
            raise name_taken_error(name, why, field)

    def commit(
        self,
        tmp: Path,
        name: str,
        *,
        sha256: str | None = None,
        field: str = "name",
        name_field: str | None = None,
        header: CheckpointHeader | None = None,
    ) -> ModelEntry:
        """Validate a finished temp file (its header as the library and the next job will read it)
        and add it to the library under `name`, durably; the temp file is gone either way.

        `sha256` when the writer hashed the bytes as it wrote them; `header` when it parsed them.
        Problems with the file name `field`; a name taken meanwhile, `name_field` (default: `field`)."""
        try:
            header = header or parse_header(tmp, name, field=field)
            variant = detect_variant(header, tmp)
            lora = describe_upload(header, name, field=field, path=tmp)
            check_storable(name, header, variant, field=field, lora=lora)
            sha256 = sha256 or sha256_of(tmp)
            legacy = legacy_hash_of(tmp)
            entry = self._add(
                tmp, name, ModelEntry(name, sha256, legacy, header, variant, lora=lora), name_field or field
            )
        finally:
            tmp.unlink(missing_ok=True)
        return entry

    def _add(self, tmp: Path, name: str, entry: ModelEntry, field: str) -> ModelEntry:
        """Add a validated temp file as `entry` (its path is filled in here)."""
        sha256, legacy, header, variant = entry.sha256, entry.legacy_hash, entry.header, entry.variant
        final = self.root / name
        # The link alone is atomic only for the exact name: `m.ckpt` and `m.safetensors` committed
        # at once would both get in. One lock file orders every add in this directory.
        with self._names_lock():
            self.check_name_free(name, field=field)
            try:
                durable_link(tmp, final)  # atomic create-if-absent
            except FileExistsError:
                raise name_taken_error(name, f"a model named {name!r} already exists", field) from None
        try:
            self._store_hashes(final, sha256, legacy)
        except BaseException:
            final.unlink(missing_ok=True)  # a commit that fails leaves no model behind
            raise
        stat = final.stat()
        self._headers.put((str(final), stat.st_size, stat.st_mtime_ns), header, header_size_estimate(header))
        with self._lock:
            self._variants[(str(final), stat.st_size, stat.st_mtime_ns)] = variant
            self._variants[("lora", str(final), stat.st_size, stat.st_mtime_ns)] = entry.lora  # type: ignore[assignment]
        return replace(entry, path=final)

    @contextlib.contextmanager
    def _names_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".names.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            yield

    def _begin_upload(self, name: str, declared_length: int | None) -> UploadStream:
        """Checks an upload passes before a byte of its body is read."""
        validate_model_name(name)
        self.check_name_free(name)
        if declared_length is not None and declared_length > self.max_upload_bytes:
            raise _too_large(declared_length, self.max_upload_bytes)
        return UploadStream(name, self.max_upload_bytes)

    async def store_upload(
        self, name: str, chunks: AsyncIterator[bytes], declared_length: int | None
    ) -> ModelEntry:
        """Stream an upload to a temp file while hashing it; then validate and add it, off the
        event loop (a pathological header takes seconds to refuse, and other requests go on)."""
        upload = self._begin_upload(name, declared_length)
        tmp = self.temp_path(name)
        try:
            # The lock says "alive, not to be swept" until the file is committed or removed.
            with open(tmp, "wb") as out:
                fcntl.flock(out.fileno(), fcntl.LOCK_EX)

                def hash_and_write(batch: list[bytes]) -> None:
                    upload.hash(batch)
                    out.writelines(batch)

                await pipelined(upload.batches(chunks, UPLOAD_BATCH_BYTES), hash_and_write)
                await asyncio.to_thread(fsync_file, out)
                return await asyncio.to_thread(self.commit, tmp, name, sha256=upload.sha256, field="body")
        finally:
            tmp.unlink(missing_ok=True)


class UploadStream:
    """An upload's body as it arrives: capped, its first bytes checked against its name's
    extension (a file of the wrong kind is refused at once, not after gigabytes), gathered into
    batches that the consumer hashes (`hash`, in order) and stores."""

    def __init__(self, name: str, limit: int) -> None:
        self.name, self.limit = name, limit
        self.size = 0
        self._digest = hashlib.sha256()
        self._head = b""

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def _check_head(self) -> None:
        try:
            check_leading_bytes(self.name, self._head)
        except CheckpointFormatError as exc:
            raise InvalidInput(
                "invalid-checkpoint", "Invalid checkpoint", f"{self.name}: {exc}", field="body"
            ) from exc

    def hash(self, batch: list[bytes]) -> None:
        for chunk in batch:
            self._digest.update(chunk)  # hashlib releases the GIL: a thread hashes while the loop receives

    async def batches(self, source: AsyncIterator[bytes], size: int) -> AsyncIterator[list[bytes]]:
        """The body's chunks in lists of at least `size` bytes (the last one shorter), not copied."""
        batch: list[bytes] = []
        batched = 0
        async for chunk in source:
            self.size += len(chunk)
            if self.size > self.limit:
                raise _too_large(self.size, self.limit)
            if len(self._head) < 16:
                self._head += chunk[: 16 - len(self._head)]
                if len(self._head) == 16:
                    self._check_head()
            batch.append(chunk)
            batched += len(chunk)
            if batched >= size:
                yield batch
                batch, batched = [], 0
        if batch or not self.size:
            yield batch


async def pipelined(batches: AsyncIterator[list[bytes]], process: Any) -> None:
    """`process(batch)` in a thread for each batch, in order, while the next batch is received:
    the event loop parses the request body on one core while hashing and writing (which release
    the GIL) run on another."""
    pending: asyncio.Future | None = None
    try:
        async for batch in batches:
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(asyncio.to_thread(process, batch))
    except BaseException:
        if pending is not None:
            await asyncio.gather(pending, return_exceptions=True)
        raise
    if pending is not None:
        await pending


def parse_header(source: Path, name: str, *, field: str = "model", fileobj: Any = None) -> CheckpointHeader:
    """A checkpoint's header, or a 400 naming the model and what is wrong with the file."""
    try:
        if fileobj is not None:
            return read_checkpoint_header(name, fileobj=fileobj)
        return read_checkpoint_header(source)
    except CheckpointFormatError as exc:
        raise InvalidInput("invalid-checkpoint", "Invalid checkpoint", f"{name}: {exc}", field=field) from exc


def model_changed_error(pinned: PinnedModel, what: str, field: str) -> Conflict:
    return Conflict(
        "model-changed",
        "Model changed",
        f"{id_of(pinned.name)} {what} since the job was accepted (sha256 {pinned.sha256[:10]}… is no longer "
        "in the library); submit the job again to run it on the library as it is now",
        field=field,
    )


def describe_upload(
    header: CheckpointHeader, name: str, *, field: str, path: Path | None = None, fileobj: Any = None
) -> dict[str, Any] | None:
    """The LoRA summary of a file (None for a checkpoint), or a 400 for a malformed LoRA."""
    try:
        lora = describe_lora(header, path, fileobj=fileobj)
    except LoraFormatError as exc:
        raise InvalidInput("invalid-lora", "Invalid LoRA", f"{name}: {exc}", field=field) from exc
    if lora is None:
        return None
    for module in lora.modules.values():
        why = None
        if module.rank == 0:
            why = "has rank 0"
        elif module.alpha is not None and not math.isfinite(module.alpha):
            why = f"has alpha {module.alpha}"
        if why:
            raise InvalidInput(
                "invalid-lora",
                "Invalid LoRA",
                f"{name}: module {module.name} {why}; it was not stored",
                field=field,
            )
    return lora_summary(lora)


def check_storable(
    name: str,
    header: CheckpointHeader,
    variant: CheckpointVariant,
    *,
    field: str = "body",
    lora: dict[str, Any] | None = None,
) -> None:
    """Refuse a file no job could use: no tensors, dtypes no engine reads, a checkpoint of no known
    layout, a LoRA for no architecture we can tell or with nothing that can be applied."""

    def refuse(slug: str, title: str, why: str) -> InvalidInput:
        return InvalidInput(slug, title, f"{name}: {why}; it was not stored", field=field)

    if not header.tensors:
        raise refuse("no-tensors", "No tensors", "the file holds no tensors")
    odd = sorted({t.dtype for t in header.tensors.values()} - ENGINE_DTYPES)
    if odd:
        example = next(t.key for t in header.tensors.values() if t.dtype in odd)
        raise refuse(
            "unsupported-dtype",
            "Unsupported dtype",
            f"it holds tensors of dtype {', '.join(odd)} (e.g. {shown_text(example)!r}), which no merge or probe "
            f"reads; supported: {', '.join(sorted(ENGINE_DTYPES))}",
        )
    if lora is not None:
        if lora["arch"] not in ("sd1", "sd2", "sdxl"):
            raise refuse(
                "unknown-lora-architecture",
                "Unknown LoRA architecture",
                f"it is a LoRA ({', '.join(lora['formats'])}) for an architecture that cannot be told: "
                f"{lora['arch_source']}",
            )
        if lora["unbakeable_modules"] == lora["module_count"]:
            raise refuse(
                "unsupported-lora",
                "Unsupported LoRA",
                f"it is a LoRA of {', '.join(lora['algorithms'])} modules only, which mergeprobe cannot apply "
                "(LoRA, LoCon, LoHa and LoKr can be)",
            )
        return
    if variant.refiner:
        raise refuse(
            "unsupported-architecture",
            "Unsupported architecture",
            "it is an SDXL refiner (12 input blocks, 384 channels, a 2560-wide label_emb); mergeprobe has "
            "no block table or pipeline for refiners",
        )
    if variant.arch == UNKNOWN:
        raise refuse(
            "unknown-architecture",
            "Unknown architecture",
            "its keys match none of sd1, sd2, sdxl (a U-Net under model.diffusion_model.input_blocks.N with "
            "the text encoder keys of one of them)",
        )


def _too_large(size: int, limit: int) -> TooLarge:
    return TooLarge(
        "upload-too-large",
        "Upload too large",
        f"the upload is {size} bytes or more; the limit (MERGEPROBE_MAX_UPLOAD_BYTES) is {limit}",
        field="body",
    )
