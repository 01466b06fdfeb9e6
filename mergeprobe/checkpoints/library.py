"""The model library: a directory of .safetensors and .ckpt files, addressed by name only.

Plain Python (no torch): the API lists, validates, uploads and deletes models here,
and the worker resolves the same names to paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mergeprobe.checkpoints.archs import UNKNOWN
from mergeprobe.checkpoints.checkpoint_headers import (
    ENGINE_DTYPES,
    CheckpointFormatError,
    CheckpointHeader,
    read_checkpoint_header,
)
from mergeprobe.checkpoints.variants import CheckpointVariant, detect_variant
from mergeprobe.service.errors import Conflict, InvalidInput, MergeprobeError, NotFound, TooLarge
from mergeprobe.service.settings import Settings

MODEL_EXTENSIONS = (".safetensors", ".ckpt")
# Names are file names in one flat directory: no separators, no leading dot, no "..".
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+=,@-]*(?:\.[A-Za-z0-9_+=,@-]+)*$")
_MAX_NAME = 200
_JOB_PARTIAL_RE = re.compile(r"^\.partial-([0-9a-f]{24})-")
_HASH_CHUNK = 8 * 1024 * 1024
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shown(text: object, limit: int = 100) -> str:
    """An untrusted name as an error message shows it: repr, at most `limit` characters of it
    (a 1 MB JSON body of one model name must not come back as a 1 MB problem detail)."""
    if isinstance(text, str) and len(text) > limit:
        return f"{text[:limit]!r}… ({len(text)} characters)"
    return repr(text)


def validate_model_name(name: str, *, field: str = "name") -> str:
    """A file name for the models directory, or a 400 saying what is wrong with it."""
    if not name or len(name) > _MAX_NAME or ".." in name or not _NAME_RE.match(name):
        raise InvalidInput(
            "invalid-model-name",
            "Invalid model name",
            f"{_shown(name)} is not a valid model name: use letters, digits and _ + = , @ - . "
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
    return name


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
    """A model reference as resolved when a job was accepted: its file name and the sha256 of its
    bytes then. Jobs carry these, so a worker runs on the bytes that were validated, or not at all."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    sha256: str = Field(pattern="^[0-9a-f]{64}$")


class ModelLibrary:
    def __init__(self, settings: Settings) -> None:
        self.root = settings.models_path
        self.hash_cache_dir = settings.cache_path / "hashes"
        self.max_upload_bytes = settings.max_upload_bytes
        self.settings = settings
        self._headers: dict[tuple[str, int, int], CheckpointHeader] = {}
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

    def _ids(self) -> dict[str, Path]:
        """id → path. The id is the file stem; when two files share a stem the
        .safetensors one keeps it and the other is known by its full name."""
        ids: dict[str, Path] = {}
        for path in sorted(self._files(), key=lambda p: (p.suffix != ".safetensors", p.name)):
            stem = path.name.rsplit(".", 1)[0]
            ids[stem if stem not in ids else path.name] = path
        return ids

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

    def resolve(self, ref: str, *, field: str = "model") -> Path:
        """A model id, file name, short hash or sha256 → its path in the library."""
        if (
            not isinstance(ref, str)
            or not ref
            or len(ref) > _MAX_NAME
            or ".." in ref
            or not _NAME_RE.match(ref)
        ):
            raise InvalidInput(
                "invalid-model-name",
                "Invalid model reference",
                f"{_shown(ref)} is not a model id or name",
                field=field,
            )
        ids = self._ids()
        path = ids.get(ref)
        if path is None and ref.endswith(MODEL_EXTENSIONS) and (self.root / ref).is_file():
            path = self.root / ref
        if path is None and re.fullmatch(r"[0-9a-f]{10}|[0-9a-f]{64}", ref):
            path = next(
                (p for p in ids.values() if self._cached_hashes(p).get("sha256", "").startswith(ref)), None
            )
        if path is None:
            raise NotFound("unknown-model", "Unknown model", f"no model {ref!r} in the library", field=field)
        return self._contained(path, ref, field)

    def pin(self, ref: str, *, field: str = "model") -> tuple[PinnedModel, Path]:
        """Resolve a reference for a job: the pin (its file name and the sha256 of its bytes now)
        and the file."""
        path = self.resolve(ref, field=field)
        return PinnedModel(name=path.name, sha256=self.hashes(path)[0]), path

    def open_pinned(self, pinned: PinnedModel, *, field: str = "model") -> Path:
        """The file that holds a pinned model's bytes: its own name while it still holds them, else
        another library file with the same sha256; a 409 naming the model when none does (it was
        replaced or deleted after the job was accepted)."""
        path = self.root / pinned.name
        if path.is_file() and self.hashes(path)[0] == pinned.sha256:
            return self._contained(path, pinned.name, field)
        for other in self._ids().values():
            if self._cached_hashes(other).get("sha256") == pinned.sha256:
                return self._contained(other, pinned.name, field)
        stem = pinned.name.rsplit(".", 1)[0]
        what = "changed" if path.is_file() else "was removed"
        raise Conflict(
            "model-changed",
            "Model changed",
            f"{stem} {what} since the job was accepted (sha256 {pinned.sha256[:10]}… is no longer in "
            "the library); submit the job again to run it on the library as it is now",
            field=field,
        )

    def id_of(self, path: Path) -> str:
        return next((i for i, p in self._ids().items() if p.name == path.name), path.name)

    # -- headers and hashes -------------------------------------------------
    def header(self, path: Path, *, field: str = "model") -> CheckpointHeader:
        stat = path.stat()
        cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._headers.get(cache_key)
        if cached is not None:
            return cached
        try:
            header = read_checkpoint_header(path)
        except CheckpointFormatError as exc:
            raise InvalidInput(
                "invalid-checkpoint", "Invalid checkpoint", f"{path.name}: {exc}", field=field
            ) from exc
        with self._lock:
            if len(self._headers) > 64:
                self._headers.clear()
            self._headers[cache_key] = header
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

    def info(self, path: Path) -> ModelInfo:
        header = self.header(path)
        sha256, legacy = self.hashes(path)
        variant = self.variant(path)
        return ModelInfo(
            id=self.id_of(path),
            name=path.name,
            arch=variant.arch,
            format=header.format,
            size_bytes=header.file_size,
            sha256=sha256,
            short_hash=sha256[:10],
            legacy_hash=legacy,
            key_count=len(header.tensors),
            dtypes=dict(sorted(Counter(t.dtype for t in header.tensors.values()).items())),
            metadata=dict(header.metadata),
            variant=variant.to_dict(),
        )

    def list(self) -> list[ModelInfo]:
        infos = []
        for path in self._ids().values():
            try:
                infos.append(self.info(path))
            except MergeprobeError:
                continue  # a broken file dropped into the directory is not a model
        return infos

    # -- writes -------------------------------------------------------------
    def delete(self, ref: str) -> None:
        path = self.resolve(ref, field="id")
        path.unlink()
        self._hash_cache_file(path).unlink(missing_ok=True)

    def temp_path(self, name: str, job_id: str | None = None) -> Path:
        """A hidden file in the library for a model being written; rename it into place when done.

        A job's temp file carries the job id, so that the files of a job whose worker died
        (SIGKILL, OOM: no `finally` ran) can be found and removed: `remove_partials`."""
        self.root.mkdir(parents=True, exist_ok=True)
        # Hidden (the listing skips dot files) and with the real extension, so the header reader accepts it.
        return self.root / f".partial-{job_id or secrets.token_hex(6)}-{name}"

    def remove_partials(self, job_id: str) -> list[Path]:
        """Delete the temp files of one job (the reaper calls this for jobs of lost workers)."""
        if not re.fullmatch(r"[0-9a-f]{24}", job_id) or not self.root.is_dir():
            return []
        removed = []
        for path in self.root.glob(f".partial-{job_id}-*"):
            path.unlink(missing_ok=True)
            removed.append(path)
        return removed

    def partial_job_ids(self) -> set[str]:
        """Job ids that have temp files in the library (uploads' temp files carry none)."""
        if not self.root.is_dir():
            return set()
        return {m.group(1) for p in self.root.iterdir() if (m := _JOB_PARTIAL_RE.match(p.name))}

    def commit(self, tmp: Path, name: str, *, sha256: str | None = None, overwrite: bool = False) -> Path:
        """Move a finished temp file into the library under `name`."""
        final = self.root / name
        if overwrite:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)  # atomic create-if-absent
            except FileExistsError:
                tmp.unlink(missing_ok=True)
                raise Conflict(
                    "model-exists",
                    "Model exists",
                    f"a model named {name!r} already exists",
                    field="name",
                ) from None
            tmp.unlink()
        if sha256:
            self._store_hashes(final, sha256, legacy_hash_of(final))
        return final

    def check_name_free(self, name: str) -> None:
        stem = name.rsplit(".", 1)[0]
        if (self.root / name).exists() or stem in self._ids():
            raise Conflict(
                "model-exists", "Model exists", f"a model named {name!r} already exists", field="name"
            )

    async def store_upload(
        self, name: str, chunks: AsyncIterator[bytes], declared_length: int | None
    ) -> ModelInfo:
        """Stream an upload to disk while hashing it; validate it; then move it into place."""
        validate_model_name(name)
        self.check_name_free(name)
        limit = self.max_upload_bytes
        if declared_length is not None and declared_length > limit:
            raise _too_large(declared_length, limit)
        tmp = self.temp_path(name)
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(size, limit)
                    digest.update(chunk)
                    out.write(chunk)
            try:
                header = read_checkpoint_header(tmp)
            except CheckpointFormatError as exc:
                raise InvalidInput(
                    "invalid-checkpoint", "Invalid checkpoint", f"{name}: {exc}", field="body"
                ) from exc
            check_storable(name, header, detect_variant(header, tmp))
            final = self.commit(tmp, name, sha256=digest.hexdigest())
        finally:
            tmp.unlink(missing_ok=True)
        return self.info(final)


def check_storable(name: str, header: CheckpointHeader, variant: CheckpointVariant) -> None:
    """Refuse a checkpoint no job could use: no tensors, dtypes no engine reads, no known layout."""

    def refuse(slug: str, title: str, why: str) -> InvalidInput:
        return InvalidInput(slug, title, f"{name}: {why}; it was not stored", field="body")

    if not header.tensors:
        raise refuse("no-tensors", "No tensors", "the file holds no tensors")
    odd = sorted({t.dtype for t in header.tensors.values()} - ENGINE_DTYPES)
    if odd:
        example = next(t.key for t in header.tensors.values() if t.dtype in odd)
        raise refuse(
            "unsupported-dtype",
            "Unsupported dtype",
            f"it holds tensors of dtype {', '.join(odd)} (e.g. {_shown(example)!r}), which no merge or probe "
            f"reads; supported: {', '.join(sorted(ENGINE_DTYPES))}",
        )
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
