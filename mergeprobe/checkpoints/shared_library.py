"""The s3 library backend: one library for every API process and worker, on any host.

- **Bytes**: objects `{S3_MODELS_PREFIX}{sha256}` in the bucket. The same bytes under two names
  are stored once; an object is deleted with the last name that points at it.
- **Index** in Redis, so every process sees an upload or a merge the moment it is registered,
  without listing the bucket: `{prefix}:library:models` (name → the model's description, what
  `GET /v1/models` answers) and `{prefix}:library:headers` (sha256 → its parsed header, zlib'd
  JSON, what validation and planning read). A name is added with HSETNX: two hosts adding the
  same name at once, one wins and the other gets the 409.
- **Workers** read models from a local cache by sha256 (`ModelCache`), fetched once and verified.
  A merge's output is written into the cache directory, uploaded, registered, then kept in the
  cache under its sha256, so a probe of the merged model on that host reads no byte from the store.
- **Uploads** to the API stream to a staging object by multipart upload while hashed, are
  validated by ranged reads of that object (the header, and for sd2 one small tensor), then
  copied server-side to their sha256 key. Nothing is buffered whole, in memory or on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import secrets
import zlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis

from mergeprobe.checkpoints.checkpoint_headers import CheckpointHeader, TensorInfo
from mergeprobe.checkpoints.library import (
    ModelEntry,
    ModelInfo,
    ModelLibrary,
    PinnedModel,
    check_reference,
    check_storable,
    describe_upload,
    find_reference,
    header_size_estimate,
    id_of,
    legacy_hash_of,
    model_changed_error,
    name_conflict,
    name_taken_error,
    parse_header,
    pipelined,
)
from mergeprobe.checkpoints.model_cache import ModelCache
from mergeprobe.checkpoints.variants import CheckpointVariant, detect_variant
from mergeprobe.service.durable import fsync_file
from mergeprobe.service.errors import InvalidInput, NotFound
from mergeprobe.service.s3 import S3RangeFile, connect_s3, key_prefix
from mergeprobe.service.settings import Settings

log = logging.getLogger("mergeprobe.library")

PART_BYTES = 16 * 1024 * 1024  # multipart part size (S3: at least 5 MiB but the last)
_FETCH_CHUNK = 8 * 1024 * 1024
# Staged uploads older than this were cut off (the API that ran them died); swept at start.
STALE_UPLOAD = timedelta(hours=24)
# Redis locks of the index: held for index writes and a HEAD or two (a copy only in the rare case
# that the bytes were deleted between the first HEAD and the lock).
LOCK_SECONDS = 600
LOCK_WAIT_SECONDS = 120
STAGING_TIME = "%Y%m%dT%H%M%S"  # a staged upload's key starts with the time it began


def header_to_json(header: CheckpointHeader) -> bytes:
    tensors = [
        [t.key, t.dtype, list(t.shape), list(t.data_offsets) if t.data_offsets else None, t.storage]
        for t in header.tensors.values()
    ]
    record = {
        "format": header.format,
        "metadata": header.metadata,
        "data_start": header.data_start,
        "file_size": header.file_size,
        "tensors": tensors,
    }
    return zlib.compress(json.dumps(record, separators=(",", ":")).encode(), 6)


def header_from_json(raw: bytes) -> CheckpointHeader:
    record = json.loads(zlib.decompress(raw))
    tensors = {
        key: TensorInfo(
            key, dtype, tuple(shape), tuple(offsets) if offsets else None, tuple(storage) if storage else None
        )
        for key, dtype, shape, offsets, storage in record["tensors"]
    }
    return CheckpointHeader(
        record["format"], tensors, record["metadata"], record["data_start"], record["file_size"]
    )


class S3ModelLibrary(ModelLibrary):
    backend = "s3"

    def __init__(self, settings: Settings, connection: redis.Redis) -> None:
        super().__init__(settings)
        self.s3 = connect_s3(settings, "MERGEPROBE_LIBRARY_BACKEND")
        self.prefix = key_prefix(settings.s3_models_prefix)
        self.redis = connection
        self.records_key = f"{settings.key_prefix}:library:models"
        self.headers_key = f"{settings.key_prefix}:library:headers"
        self.cache = ModelCache(settings.model_cache_path, settings.model_cache_bytes)
        # Merges and imports write here, beside the cache they are moved into when registered.
        self.work_dir = settings.model_cache_path
        self.downloads = settings.s3_downloads
        self.presign_seconds = settings.s3_presign_seconds

    # -- keys ---------------------------------------------------------------
    def object_key(self, sha256: str) -> str:
        return f"{self.prefix}{sha256}"

    def _staging_key(self, token: str) -> str:
        return f"{self.prefix}uploads/{token}"

    # -- the index ----------------------------------------------------------
    def _records(self) -> dict[str, dict[str, Any]]:
        return {
            (k.decode() if isinstance(k, bytes) else k): json.loads(v)
            for k, v in self.redis.hgetall(self.records_key).items()
        }

    def _record(self, name: str) -> dict[str, Any] | None:
        raw = self.redis.hget(self.records_key, name)
        return json.loads(raw) if raw else None

    def names(self) -> list[str]:
        names = (k.decode() if isinstance(k, bytes) else k for k in self.redis.hkeys(self.records_key))
        return sorted(names, key=lambda n: (not n.endswith(".safetensors"), n))  # as the local backend

    # -- locks: what hosts do to the index and the bucket, one at a time where it matters --
    @contextlib.contextmanager
    def _names_lock(self) -> Iterator[None]:
        """Orders the name checks and adds of every host (HSETNX alone guards only exact names)."""
        with self.redis.lock(
            f"{self.records_key}:lock", timeout=LOCK_SECONDS, blocking_timeout=LOCK_WAIT_SECONDS
        ):
            yield

    @contextlib.contextmanager
    def _bytes_lock(self, sha256: str) -> Iterator[None]:
        """Orders an add of these bytes (object present → name registered) and a delete of their
        last name (no name left → object deleted): a delete on one host must not remove the object
        another host has just found present and is about to give a name."""
        with self.redis.lock(
            f"{self.headers_key}:lock:{sha256}", timeout=LOCK_SECONDS, blocking_timeout=LOCK_WAIT_SECONDS
        ):
            yield

    def _header_of(self, sha256: str, name: str, field: str) -> CheckpointHeader:
        cached = self._headers.get(sha256)
        if cached is not None:
            return cached
        raw = self.redis.hget(self.headers_key, sha256)
        if raw is None:
            raise NotFound(
                "unknown-model", "Unknown model", f"{name}: its header is missing from the index", field=field
            )
        header = header_from_json(raw)
        self._headers.put(sha256, header, header_size_estimate(header))
        return header

    def _entry_of(self, record: dict[str, Any], field: str) -> ModelEntry:
        return ModelEntry(
            record["name"],
            record["sha256"],
            record["legacy_hash"],
            self._header_of(record["sha256"], record["name"], field),
            CheckpointVariant(**record["variant"]),
            lora=record["info"].get("lora"),
        )

    def lookup(self, ref: str, *, field: str = "model") -> ModelEntry:
        check_reference(ref, field)
        record = self._record(ref)  # an exact name: one HGET
        if record is None:
            records = self._records()
            found = find_reference(ref, sorted(records), lambda name: records[name]["sha256"])
            record = records.get(found) if found else None
        if record is None:
            raise NotFound("unknown-model", "Unknown model", f"no model {ref!r} in the library", field=field)
        return self._entry_of(record, field)

    def list(self) -> list[ModelInfo]:
        records = self._records()
        return [ModelInfo(id=id_of(name), **records[name]["info"]) for name in sorted(records)]

    def check_name_free(self, name: str, *, field: str = "name") -> None:
        why = name_conflict(name, self.names())
        if why:
            raise name_taken_error(name, why, field)

    def _store_and_register(self, entry: ModelEntry, put_bytes: Any, field: str) -> None:
        """Make sure the bucket holds the entry's bytes (`put_bytes()` puts them there) and add its
        name; the bytes of a name refused are not left behind, unless another name has them."""
        key = self.object_key(entry.sha256)
        if self.s3.head(key) is None:
            put_bytes()  # outside the lock: a copy of gigabytes must not hold up other hosts
        with self._bytes_lock(entry.sha256):
            if self.s3.head(key) is None:  # the last name of these bytes was deleted meanwhile
                put_bytes()
            try:
                self._register(entry, field)
            except BaseException:
                self._drop_unreferenced(entry.sha256)
                raise

    def _register(self, entry: ModelEntry, field: str) -> None:
        """Add a name for bytes in the bucket; a 409 when the name (or its id) was taken meanwhile."""
        info = entry.info().to_dict()
        info.pop("id")
        record = {
            "name": entry.name,
            "sha256": entry.sha256,
            "legacy_hash": entry.legacy_hash,
            "variant": entry.variant.to_dict(),
            "created_at": datetime.now(UTC).isoformat(),
            "info": info,
        }
        with self._names_lock():
            self.check_name_free(entry.name, field=field)
            self.redis.hset(self.headers_key, entry.sha256, header_to_json(entry.header))
            if not self.redis.hsetnx(self.records_key, entry.name, json.dumps(record)):
                raise name_taken_error(entry.name, f"a model named {entry.name!r} already exists", field)

    def _referenced(self, sha256: str) -> bool:
        return any(r["sha256"] == sha256 for r in self._records().values())

    def delete(self, ref: str) -> ModelEntry:
        entry = self.lookup(ref, field="id")
        with self._bytes_lock(entry.sha256):
            self.redis.hdel(self.records_key, entry.name)
            self._drop_unreferenced(entry.sha256)
        return entry

    def _drop_unreferenced(self, sha256: str) -> None:
        """Delete the bytes and header of a sha256 no name points at any more (the caller holds
        the bytes' lock)."""
        if not self._referenced(sha256):
            self.s3.client.delete_object(Bucket=self.s3.bucket, Key=self.object_key(sha256))
            self.redis.hdel(self.headers_key, sha256)

    # -- a worker's files ---------------------------------------------------
    def open_pinned(self, pinned: PinnedModel, *, field: str = "model") -> Path:
        """The local copy of a pinned model's bytes, fetched into the cache (and verified) when this
        host has none; leased until `release_leases`, so no eviction removes it under the job."""
        if not self._referenced(pinned.sha256):  # as the local backend: its bytes left the library
            raise model_changed_error(pinned, "was removed", field)
        ext = Path(pinned.name).suffix
        cached = self.cache.get(pinned.sha256, ext)
        if cached is not None:
            return cached
        head = self.s3.head(self.object_key(pinned.sha256))
        if head is None:
            raise model_changed_error(pinned, "was removed", field)
        return self._fetch(pinned, ext, int(head["ContentLength"]), field)

    def _fetch(self, pinned: PinnedModel, ext: str, size: int, field: str) -> Path:
        self.cache.make_room(size)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.work_dir / f".fetch-{secrets.token_hex(6)}-{pinned.sha256}{ext}"
        digest = hashlib.sha256()
        try:
            stream = self.s3.open_range(self.object_key(pinned.sha256))
            if stream is None:
                raise model_changed_error(pinned, "was removed", field)
            with open(tmp, "wb") as out:
                fcntl.flock(out.fileno(), fcntl.LOCK_EX)  # alive: not to be swept
                for chunk in stream.chunks(_FETCH_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                # The cache trusts a file's name as its checksum: it must not be empty after a crash.
                fsync_file(out)
            if digest.hexdigest() != pinned.sha256:
                raise InvalidInput(
                    "model-corrupt",
                    "Model corrupt",
                    f"{pinned.name}: the bucket's object for sha256 {pinned.sha256[:10]}… holds bytes with sha256 "
                    f"{digest.hexdigest()[:10]}…; the object was changed outside mergeprobe",
                    field=field,
                )
            path = self.cache.admit(tmp, pinned.sha256, ext)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("fetched %s (%d bytes) into the model cache", pinned.name, size)
        return path

    def release_leases(self) -> None:
        self.cache.release_all()

    def hashes(self, path: Path) -> tuple[str, str]:
        """A cache file's name is its sha256 (it was verified when it came in)."""
        stem = path.name.split(".", 1)[0]
        if path.parent == self.cache.root and len(stem) == 64:
            return stem, legacy_hash_of(path)
        return super().hashes(path)

    # -- adding models ------------------------------------------------------
    def _add(self, tmp: Path, name: str, entry: ModelEntry, field: str) -> ModelEntry:
        """A finished local file (a merge, an import): upload it under its sha256, register the
        name, keep it in this host's cache."""
        self.check_name_free(name, field=field)
        sha256, header = entry.sha256, entry.header
        key = self.object_key(sha256)

        def upload() -> None:
            self.s3.client.upload_file(str(tmp), self.s3.bucket, key, Config=_transfer_config())

        self._store_and_register(entry, upload, field)
        self.cache.make_room(header.file_size)
        self.cache.admit(tmp, sha256, Path(name).suffix)
        return entry

    async def store_upload(
        self, name: str, chunks: AsyncIterator[bytes], declared_length: int | None
    ) -> ModelEntry:
        """Stream an upload into a staging object (multipart) while hashing it; validate it by
        ranged reads; copy it to its sha256 key and register it."""
        upload = self._begin_upload(name, declared_length)
        staging = self._staging_key(f"{datetime.now(UTC).strftime(STAGING_TIME)}-{secrets.token_hex(6)}")
        client, bucket = self.s3.client, self.s3.bucket
        upload_id = (await asyncio.to_thread(client.create_multipart_upload, Bucket=bucket, Key=staging))[
            "UploadId"
        ]
        parts: list[dict[str, Any]] = []

        def hash_and_send(batch: list[bytes]) -> None:
            upload.hash(batch)
            number = len(parts) + 1
            response = client.upload_part(
                Bucket=bucket, Key=staging, UploadId=upload_id, PartNumber=number, Body=b"".join(batch)
            )
            parts.append({"ETag": response["ETag"], "PartNumber": number})

        completed = False
        try:
            await pipelined(upload.batches(chunks, PART_BYTES), hash_and_send)
            await asyncio.to_thread(
                client.complete_multipart_upload,
                Bucket=bucket,
                Key=staging,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
            completed = True
            return await asyncio.to_thread(self._commit_staged, staging, name, upload.sha256, upload.size)
        finally:
            if not completed:
                await asyncio.to_thread(
                    _quietly, client.abort_multipart_upload, Bucket=bucket, Key=staging, UploadId=upload_id
                )
            else:
                await asyncio.to_thread(_quietly, client.delete_object, Bucket=bucket, Key=staging)

    def _commit_staged(self, staging: str, name: str, sha256: str, size: int) -> ModelEntry:
        reader = S3RangeFile(self.s3, staging, size)
        header = parse_header(Path(name), name, field="body", fileobj=reader)
        variant = detect_variant(header, name, fileobj=reader)
        lora = describe_upload(header, name, field="body", fileobj=reader)
        check_storable(name, header, variant, field="body", lora=lora)
        reader.seek(0x100000)
        legacy = hashlib.sha256(reader.read(0x10000)).hexdigest()[:8]
        key = self.object_key(sha256)
        entry = ModelEntry(name, sha256, legacy, header, variant, lora=lora)

        def copy() -> None:
            self.s3.client.copy(
                {"Bucket": self.s3.bucket, "Key": staging}, self.s3.bucket, key, Config=_transfer_config()
            )

        self._store_and_register(entry, copy, "body")
        return entry

    def sweep_abandoned_uploads(self) -> list[Path]:
        """Besides this host's dead temp files: staged uploads, finished or not, that began more
        than a day ago (an API that died mid-upload). Their age is read from the key we gave them,
        not from the store's `Initiated` (some S3-compatible servers report a fixed date)."""
        removed = super().sweep_abandoned_uploads()
        prefix = self._staging_key("")
        client, bucket = self.s3.client, self.s3.bucket
        try:
            for upload in client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []):
                if self._stale_staging(upload["Key"]):
                    client.abort_multipart_upload(
                        Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
            for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
                if self._stale_staging(obj["Key"]):
                    client.delete_object(Bucket=bucket, Key=obj["Key"])
        except Exception:  # noqa: BLE001 - housekeeping never stops a start
            log.warning("could not sweep stale uploads in s3://%s/%s", bucket, prefix, exc_info=True)
        return removed

    def _stale_staging(self, key: str) -> bool:
        started = key.removeprefix(self._staging_key("")).split("-", 1)[0]
        try:
            when = datetime.strptime(started, STAGING_TIME).replace(tzinfo=UTC)
        except ValueError:
            return False  # not a key of ours: not ours to delete
        return when < datetime.now(UTC) - STALE_UPLOAD

    # -- downloads ----------------------------------------------------------
    def head(self, entry: ModelEntry) -> dict[str, Any] | None:
        """The object's metadata, or None when its bytes are gone from the bucket."""
        return self.s3.head(self.object_key(entry.sha256))

    def open_range(self, entry: ModelEntry, start: int = 0, end: int | None = None):
        return self.s3.open_range(self.object_key(entry.sha256), start, end)

    def presigned_url(self, entry: ModelEntry, media_type: str | None = None) -> str:
        return self.s3.presigned_get(
            self.object_key(entry.sha256), entry.name, media_type, self.presign_seconds
        )


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES)


def _quietly(call, **kwargs) -> None:
    try:
        call(**kwargs)
    except Exception:  # noqa: BLE001 - cleanup of a failed upload; the upload's own error is reported
        log.warning("s3 cleanup %s failed", getattr(call, "__name__", call), exc_info=True)
