"""What every S3-compatible store of the service (artifacts, the model library) shares: the
client built from the settings, an open ranged GET, and a seekable file over an object.

boto3 is imported only here and only when an s3 backend is selected, so the API starts
without it when everything is local.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mergeprobe.service.settings import Settings

CHUNK_BYTES = 64 * 1024


@dataclass
class S3Connection:
    """A bucket and the clients that reach it."""

    client: Any
    presign_client: Any  # for URLs handed to HTTP clients: the public endpoint when it differs
    bucket: str
    client_error: type[Exception]

    def missing(self, exc: Exception) -> bool:
        error = getattr(exc, "response", {}).get("Error", {})
        return str(error.get("Code")) in {"404", "NoSuchKey", "NotFound"}

    def head(self, key: str) -> dict[str, Any] | None:
        """The object's metadata, or None when there is no such object."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except self.client_error as exc:
            if self.missing(exc):
                return None
            raise

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> ObjectStream | None:
        """Bytes [start, end) of an object (all of it when end is None), or None when it is absent."""
        args = {"Bucket": self.bucket, "Key": key}
        if end is not None:
            args["Range"] = f"bytes={start}-{end - 1}"
        try:
            response = self.client.get_object(**args)
        except self.client_error as exc:
            if self.missing(exc):
                return None
            raise
        return ObjectStream(response["Body"], int(response["ContentLength"]), response.get("LastModified"))

    def presigned_get(self, key: str, filename: str, media_type: str | None, expires: int) -> str:
        params = {
            "Bucket": self.bucket,
            "Key": key,
            "ResponseContentDisposition": f'attachment; filename="{filename}"',
        }
        if media_type:
            params["ResponseContentType"] = media_type
        return self.presign_client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires)


def connect_s3(settings: Settings, what: str) -> S3Connection:
    """The bucket of MERGEPROBE_S3_BUCKET; `what` names the setting that chose s3, for errors."""
    if not settings.s3_bucket:
        raise RuntimeError(f"{what}=s3 needs MERGEPROBE_S3_BUCKET")
    return connect_bucket(settings, settings.s3_bucket, needed_by=f"{what}=s3")


def connect_bucket(settings: Settings, bucket: str, *, needed_by: str) -> S3Connection:
    """Any bucket at the service's endpoint and region (an import's source), with the clients
    configured as for the service's own bucket; `needed_by` says what asked, for errors."""
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import ClientError
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(f"{needed_by} needs boto3: pip install 'mergeprobe[s3]'") from exc
    endpoint = settings.s3_endpoint_url or None
    # Custom endpoints (MinIO, moto, most S3-compatibles) want path-style addressing.
    config = Config(
        signature_version="s3v4",
        retries={"mode": "standard", "max_attempts": 5},
        max_pool_connections=32,
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    session = boto3.session.Session()
    client = session.client(
        "s3", endpoint_url=endpoint, region_name=settings.s3_region or None, config=config
    )
    public = settings.s3_public_endpoint_url or None
    presign = (
        session.client("s3", endpoint_url=public, region_name=settings.s3_region or None, config=config)
        if public and public != endpoint
        else client
    )
    return S3Connection(client, presign, bucket, ClientError)


def key_prefix(prefix: str | None) -> str:
    """A key prefix as given in the settings: no leading slash, a trailing one unless empty."""
    prefix = (prefix or "").lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


@dataclass
class ObjectStream:
    """An open S3 GET: the bytes of one range of an object, read in chunks."""

    body: Any
    content_length: int
    last_modified: datetime | None

    def chunks(self, size: int = CHUNK_BYTES) -> Any:
        try:
            yield from self.body.iter_chunks(size)
        finally:
            self.body.close()

    def close(self) -> None:
        self.body.close()


class S3RangeFile(io.RawIOBase):
    """A read-only, seekable file over one object, read by ranged GETs of `block` bytes.

    The header readers (safetensors JSON, a .ckpt's zip directory and pickle) read a few small
    regions of a file; this lets them validate an object in the bucket without fetching it.
    The last few blocks are kept, so the zip reader's back-and-forth costs one GET per block.
    """

    def __init__(
        self, s3: S3Connection, key: str, size: int, block: int = 1024 * 1024, keep: int = 8
    ) -> None:
        super().__init__()
        self._s3, self._key, self._size = s3, key, size
        self._block, self._keep = block, keep
        self._blocks: dict[int, bytes] = {}
        self._pos = 0
        self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def _get_block(self, index: int) -> bytes:
        cached = self._blocks.pop(index, None)
        if cached is None:
            start = index * self._block
            end = min(start + self._block, self._size)
            stream = self._s3.open_range(self._key, start, end)
            if stream is None:
                raise OSError(f"s3://{self._s3.bucket}/{self._key} vanished while being read")
            with stream.body as body:
                cached = body.read()
            self.requests += 1
        self._blocks[index] = cached  # most recently used last
        while len(self._blocks) > self._keep:
            self._blocks.pop(next(iter(self._blocks)))
        return cached

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), max(0, self._size - self._pos))
        done = 0
        while done < wanted:
            index, offset = divmod(self._pos, self._block)
            data = self._get_block(index)[offset : offset + wanted - done]
            if not data:
                break
            view[done : done + len(data)] = data
            done += len(data)
            self._pos += len(data)
        return done
