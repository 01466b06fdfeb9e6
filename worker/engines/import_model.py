"""import jobs: stream a model from an http(s) or s3:// URL into the library, hashed on the way,
then validated and committed as an upload is (mergeprobe/service/model_import.py has the policy)."""

from __future__ import annotations

import hashlib
import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from mergeprobe.checkpoints.library import shown_text
from mergeprobe.service.durable import fsync_file
from mergeprobe.service.errors import Conflict, InvalidInput, TooLarge, UpstreamFailed
from mergeprobe.service.kinds import MergedModel
from mergeprobe.service.model_import import ImportSource, check_source
from mergeprobe.service.s3 import connect_bucket
from mergeprobe.service.settings import Settings
from worker.context import JobContext

CHUNK_BYTES = 1024 * 1024
WRITE_BATCH_BYTES = 8 * 1024 * 1024
# Seconds to connect, and for each read: a source silent this long is given up on. Cancel is seen
# between reads, so also the longest a cancel waits on a stalled source.
TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
USER_AGENT = "mergeprobe-import/0.1"


@dataclass
class Download:
    total: int | None  # bytes the source announced (Content-Length, object size); None: not said
    chunks: Iterable[bytes]


def run_import(ctx: JobContext) -> dict:
    source = check_source(ctx.request.url, ctx.settings)  # the worker's own policy decides what it fetches
    name, expected = ctx.inputs.name, ctx.inputs.sha256
    library = ctx.library
    library.check_name_free(name, field="name")  # taken since submission: fail before downloading
    tmp = library.temp_path(name, job_id=ctx.job_id)
    ctx.progress(0, 0, "connecting")
    started = time.monotonic()
    try:
        with open(tmp, "wb") as out, _opened(source, ctx.settings) as download:
            sha256, size = _copy(ctx, source, download, out)
            fsync_file(out)
        seconds = time.monotonic() - started
        if expected and sha256 != expected:
            raise Conflict(
                "sha256-mismatch",
                "sha256 mismatch",
                f"{shown_text(source.url)} has sha256 {sha256}, not the {expected} the request expected; "
                "nothing was stored",
                field="sha256",
            )
        ctx.progress(size, size, "validating and storing")
        entry = library.commit(tmp, name, sha256=sha256, field="url", name_field="name")
    finally:
        tmp.unlink(missing_ok=True)
    ctx.add_counter("import_bytes", size)
    info = entry.info()
    return {
        "model": MergedModel.of(info).model_dump(),
        "size_bytes": info.size_bytes,
        "sha256": sha256,
        "source": source.url,
        "seconds": round(seconds, 3),
        "bytes_per_second": int(size / seconds) if seconds > 0 else size,
    }


def _copy(ctx: JobContext, source: ImportSource, download: Download, out: BinaryIO) -> tuple[str, int]:
    """Write the chunks to `out` under the size cap; (sha256, size)."""
    limit = ctx.settings.max_upload_bytes
    if download.total is not None and download.total > limit:
        raise _too_large(source, download.total, limit)
    digest, size = hashlib.sha256(), 0
    batch: list[bytes] = []
    batched = 0

    def hash_and_write(chunks: list[bytes]) -> None:
        for chunk in chunks:
            digest.update(chunk)
        out.writelines(chunks)

    # Received on this thread, hashed and written on another (both release the GIL), a batch behind.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="import-write") as writer:
        pending: Future | None = None
        for chunk in download.chunks:
            size += len(chunk)
            if size > limit:
                raise _too_large(source, size, limit)
            batch.append(chunk)
            batched += len(chunk)
            if batched >= WRITE_BATCH_BYTES:
                if pending is not None:
                    pending.result()
                pending, batch, batched = writer.submit(hash_and_write, batch), [], 0
            ctx.progress(size, download.total or 0, "downloading")
            ctx.check_cancel()
        if pending is not None:
            pending.result()
        hash_and_write(batch)
    if download.total is not None and size != download.total:
        raise _source_failed(
            source, f"the transfer ended after {size} of the {download.total} bytes announced"
        )
    return digest.hexdigest(), size


@contextmanager
def _opened(source: ImportSource, settings: Settings) -> Iterator[Download]:
    opener = _http_opened if source.scheme in ("http", "https") else _s3_opened
    with opener(source, settings) as download:
        yield download


# -- http(s) -----------------------------------------------------------------
class _PolicedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most MAX_REDIRECTS redirects, each to a URL the import policy accepts: an
    allowed host may not send the worker on to one that is not."""

    max_redirections = MAX_REDIRECTS

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        try:
            if newurl.partition(":")[0].lower() not in ("http", "https"):
                raise InvalidInput(
                    "unsupported-url-scheme", "Unsupported URL scheme", "only http(s) redirects are followed"
                )
            check_source(newurl, self.settings)
        except InvalidInput as exc:
            raise InvalidInput(
                exc.slug,
                exc.title,
                f"{shown_text(req.full_url)} redirected to a URL that may not be imported from: {exc.detail}",
                field="url",
            ) from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _http_opener(settings: Settings) -> urllib.request.OpenerDirector:
    """http and https only (urllib's default opener also reads file:, ftp: and data: URLs), with
    proxies from the environment as any HTTP client of the host uses them."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        _PolicedRedirects(settings),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.HTTPDefaultErrorHandler(),  # raises HTTPError for the statuses not handled above
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener


@contextmanager
def _http_opened(source: ImportSource, settings: Settings) -> Iterator[Download]:
    # identity: a compressed transfer would be stored compressed (urllib does not decode it).
    request = urllib.request.Request(  # noqa: S310 - check_source admitted http(s) only, as does the opener
        source.url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    )
    try:
        response = _http_opener(settings).open(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _source_failed(source, f"it answered {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _source_failed(source, f"it could not be reached: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise _source_failed(source, f"{type(exc).__name__}: {exc}") from None
    with response:
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise _source_failed(source, f"it sent the file encoded ({encoding}) though asked for identity")
        yield Download(_content_length(response.headers.get("Content-Length")), _read(source, response))


def _content_length(value: str | None) -> int | None:
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


def _read(source: ImportSource, response: http.client.HTTPResponse) -> Iterator[bytes]:
    while True:
        try:
            # read1: what has arrived, up to a chunk, so that a slow source still lets cancel in.
            chunk = response.read1(CHUNK_BYTES)
        except (OSError, http.client.HTTPException) as exc:
            raise _source_failed(source, f"reading failed: {type(exc).__name__}: {exc}") from None
        if not chunk:
            return
        yield chunk


# -- s3 ----------------------------------------------------------------------
@contextmanager
def _s3_opened(source: ImportSource, settings: Settings) -> Iterator[Download]:
    from botocore.exceptions import BotoCoreError

    s3 = connect_bucket(settings, source.host, needed_by="an s3:// import")
    failures = (s3.client_error, BotoCoreError, OSError)
    try:
        stream = s3.open_range(source.path)
    except failures as exc:
        raise _source_failed(source, f"{type(exc).__name__}: {exc}") from None
    if stream is None:
        raise _source_failed(
            source, f"there is no object {shown_text(source.path)} in bucket {source.host!r}"
        )

    def chunks() -> Iterator[bytes]:
        try:
            yield from stream.chunks(CHUNK_BYTES)
        except failures as exc:
            raise _source_failed(source, f"reading failed: {type(exc).__name__}: {exc}") from None

    try:
        yield Download(stream.content_length, chunks())
    finally:
        stream.close()


# -- errors ------------------------------------------------------------------
def _source_failed(source: ImportSource, why: str) -> UpstreamFailed:
    return UpstreamFailed(
        "import-source-failed", "Import source failed", f"{shown_text(source.url)}: {why}", field="url"
    )


def _too_large(source: ImportSource, size: int, limit: int) -> TooLarge:
    return TooLarge(
        "import-too-large",
        "Import too large",
        f"{shown_text(source.url)} is {size} bytes or more; the limit (MERGEPROBE_MAX_UPLOAD_BYTES) is {limit}",
        field="url",
    )
