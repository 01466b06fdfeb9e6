"""Job artifacts: a local directory (the default) or an S3-compatible bucket.

Either way no reader sees a partial artifact, and the writer computes its sha256 and size while
writing:

- local (`MERGEPROBE_ARTIFACTS_BACKEND=local`): written to a hidden temp file beside the final
  name, then renamed into place, durably (`mergeprobe.service.durable`): an artifact reported as
  stored survives a power cut;
- s3 (`MERGEPROBE_ARTIFACTS_BACKEND=s3`, AWS S3 or MinIO): written to a local temp file under the
  data dir, then uploaded (multipart above 8 MiB) and the temp file deleted. An S3 object appears
  whole or not at all; its sha256 is kept as object metadata. The API and the workers then share
  nothing but Redis and the bucket.

`ArtifactStore(settings)` builds the backend the settings select. boto3 is imported only by the
s3 backend, so the API starts without it when artifacts are local.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from mergeprobe.service.durable import durable_mkdir, durable_replace
from mergeprobe.service.errors import NotFound
from mergeprobe.service.s3 import ObjectStream, connect_s3, key_prefix
from mergeprobe.service.settings import Settings

log = logging.getLogger("mergeprobe.artifacts")

_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]{0,199}$")
_JOB_ID = re.compile(r"^[0-9a-f]{24}$")
_MULTIPART_BYTES = 8 * 1024**2


def artifact_url(job_id: str, name: str) -> str:
    return f"/v1/jobs/{job_id}/artifacts/{name}"


class _HashingWriter:
    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.record: dict[str, Any] | None = None

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._fh.write(data)


class ArtifactStore:
    """Artifacts in a local directory, one folder per job.

    `ArtifactStore(settings)` returns an `S3ArtifactStore` when `settings.artifacts_backend` is
    "s3"; both answer the same methods.
    """

    backend = "local"
    artifact_url = staticmethod(artifact_url)

    def __new__(cls, settings: Settings, *args: Any, **kwargs: Any) -> ArtifactStore:
        if cls is ArtifactStore and getattr(settings, "artifacts_backend", "local") == "s3":
            cls = S3ArtifactStore
        return super().__new__(cls)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.artifacts_path

    # -- names -----------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):
            raise NotFound("unknown-job", "Unknown job", f"no job {job_id!r}")
        return self.root / job_id

    def path_of(self, job_id: str, name: str) -> Path:
        """The local file of an artifact (where the local backend keeps it)."""
        if ".." in name or not _ARTIFACT_NAME.match(name):
            raise NotFound("unknown-artifact", "Unknown artifact", f"no artifact {name!r} in job {job_id}")
        return self.job_dir(job_id) / name

    # -- writing ---------------------------------------------------------------------------

    def _staging_path(self, job_id: str, name: str) -> Path:
        final = self.path_of(job_id, name)
        durable_mkdir(final.parent)
        return final.with_name(f".{secrets.token_hex(6)}.{name}.partial")

    def _commit(self, tmp: Path, job_id: str, name: str, media_type: str, sha256: str, size: int) -> None:
        durable_replace(tmp, self.path_of(job_id, name))

    @contextmanager
    def writer(self, job_id: str, name: str, media_type: str) -> Iterator[_HashingWriter]:
        """Yield a writer; on a clean exit the artifact appears under its name, complete.

        The record of the written artifact is left in `writer.record`.
        """
        tmp = self._staging_path(job_id, name)
        try:
            with open(tmp, "wb") as fh:
                writer = _HashingWriter(fh)
                yield writer
            self._commit(tmp, job_id, name, media_type, writer.sha256.hexdigest(), writer.size)
        finally:
            tmp.unlink(missing_ok=True)
        writer.record = {
            "name": name,
            "url": artifact_url(job_id, name),
            "media_type": media_type,
            "size_bytes": writer.size,
            "sha256": writer.sha256.hexdigest(),
        }

    def write_bytes(self, job_id: str, name: str, data: bytes, media_type: str) -> dict[str, Any]:
        with self.writer(job_id, name, media_type) as w:
            w.write(data)
        assert w.record is not None
        return w.record

    # -- reading ---------------------------------------------------------------------------

    def exists(self, job_id: str, name: str) -> bool:
        return self.path_of(job_id, name).is_file()

    def read_bytes(self, job_id: str, name: str) -> bytes:
        return self.path_of(job_id, name).read_bytes()

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)


class S3ArtifactStore(ArtifactStore):
    """Artifacts as objects `{MERGEPROBE_S3_PREFIX}{job_id}/{name}` in an S3-compatible bucket."""

    backend = "s3"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.s3 = connect_s3(settings, "MERGEPROBE_ARTIFACTS_BACKEND")
        from boto3.s3.transfer import TransferConfig  # there: connect_s3 imported boto3

        self.client, self.bucket = self.s3.client, self.s3.bucket
        self.prefix = key_prefix(settings.s3_prefix)
        self.downloads = settings.s3_downloads
        self.presign_seconds = settings.s3_presign_seconds
        self.staging = (settings.data_dir / "tmp" / "artifact-uploads").resolve()
        self._transfer = TransferConfig(
            multipart_threshold=_MULTIPART_BYTES, multipart_chunksize=_MULTIPART_BYTES
        )

    def key(self, job_id: str, name: str) -> str:
        self.path_of(job_id, name)  # validates both names
        return f"{self.prefix}{job_id}/{name}"

    def _job_prefix(self, job_id: str) -> str:
        self.job_dir(job_id)
        return f"{self.prefix}{job_id}/"

    # -- writing ---------------------------------------------------------------------------

    def _staging_path(self, job_id: str, name: str) -> Path:
        self.key(job_id, name)
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging / f".{job_id}.{secrets.token_hex(6)}.{name}.partial"

    def _commit(self, tmp: Path, job_id: str, name: str, media_type: str, sha256: str, size: int) -> None:
        self.client.upload_file(
            str(tmp),
            self.bucket,
            self.key(job_id, name),
            ExtraArgs={"ContentType": media_type, "Metadata": {"sha256": sha256, "size": str(size)}},
            Config=self._transfer,
        )

    # -- reading ---------------------------------------------------------------------------

    def head(self, job_id: str, name: str) -> dict[str, Any] | None:
        """The object's metadata, or None when there is no such object."""
        return self.s3.head(self.key(job_id, name))

    def exists(self, job_id: str, name: str) -> bool:
        return self.head(job_id, name) is not None

    def open_range(
        self, job_id: str, name: str, start: int = 0, end: int | None = None
    ) -> ObjectStream | None:
        """Bytes [start, end) of an artifact (all of it when end is None), or None when there is no
        such object."""
        return self.s3.open_range(self.key(job_id, name), start, end)

    def read_bytes(self, job_id: str, name: str) -> bytes:
        response = self.client.get_object(Bucket=self.bucket, Key=self.key(job_id, name))
        with response["Body"] as body:
            return body.read()

    def presigned_url(self, job_id: str, name: str, media_type: str | None = None) -> str:
        """A GET URL for the object, valid for `MERGEPROBE_S3_PRESIGN_SECONDS`."""
        return self.s3.presigned_get(self.key(job_id, name), name, media_type, self.presign_seconds)

    def object_keys(self, job_id: str) -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._job_prefix(job_id)):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys

    def remove_job(self, job_id: str) -> None:
        """Delete the job's objects and abort its unfinished uploads; never raises for S3 errors.

        Callers are the worker's failure paths: the job's final status must still be written.
        """
        prefix = self._job_prefix(job_id)
        super().remove_job(job_id)
        for tmp in self.staging.glob(f".{job_id}.*.partial"):
            tmp.unlink(missing_ok=True)
        try:
            keys = self.object_keys(job_id)
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
                )
            uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix)
            for upload in uploads.get("Uploads", []):
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
        except Exception:  # noqa: BLE001 - best effort, like the local rmtree
            log.warning(
                "could not remove the objects of job %s from s3://%s", job_id, self.bucket, exc_info=True
            )
