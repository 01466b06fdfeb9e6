"""HTTP downloads of stored files: job artifacts and library models, one at a time or a job's
artifacts as one zip.

A `Download` says what the answer needs to know of a file, whichever store keeps it; one
implementation answers for all of them:

- a local file: a FileResponse;
- an object in a bucket, proxied: the API streams it (one ranged GET per requested range);
- an object in a bucket, `MERGEPROBE_S3_DOWNLOADS=redirect`: 307 to a presigned GET URL.

In every case the ETag is the file's sha256 (If-None-Match answers 304), one or more byte ranges
answer 206 with Content-Range (several as multipart/byteranges), a range past the end is a 416
with `Content-Range: bytes */size`, a malformed one a 400, both as problem+json, and HEAD answers
the headers of a GET without its body.
"""

from __future__ import annotations

import secrets
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from app.schemas import ProblemModel
from mergeprobe.checkpoints.library import ModelEntry, ModelLibrary
from mergeprobe.service.artifacts import ArtifactStore
from mergeprobe.service.problems import Problem
from mergeprobe.service.s3 import CHUNK_BYTES, ObjectStream

FILE_CHUNK_BYTES = 4 * 1024 * 1024  # what a local file is read and sent in

_MAX_RANGES = 100
MODEL_MEDIA_TYPE = "application/octet-stream"
ZIP_MEDIA_TYPE = "application/zip"


@dataclass(frozen=True)
class StoredObject:
    """A file kept as an object in a bucket, as its store reaches it."""

    open_range: Callable[[int, int | None], ObjectStream | None]  # bytes [start, end); None: gone
    head: Callable[[], dict[str, Any] | None]  # the object's metadata (S3 HEAD); None: gone
    presigned_url: Callable[[], str] | None  # set when downloads are 307s to the object store


@dataclass(frozen=True)
class Download:
    """A file to answer with: what it is, and where its bytes are (`path` or `stored`)."""

    filename: str
    media_type: str
    size: int
    sha256: str
    missing: Problem  # the 404 when the bytes are no longer where the record says
    path: Path | None = None
    stored: StoredObject | None = None

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'

    def exists(self) -> bool:
        if self.stored is None:
            return self.path is not None and self.path.is_file()
        return self.stored.head() is not None

    def chunks(self) -> Iterator[bytes]:
        """All of its bytes, read a chunk at a time."""
        if self.stored is None:
            if self.path is None or not self.path.is_file():
                raise self.missing
            with open(self.path, "rb") as fh:
                while chunk := fh.read(CHUNK_BYTES):
                    yield chunk
            return
        stream = self.stored.open_range(0, None)
        if stream is None:
            raise self.missing
        yield from stream.chunks()


def artifact_download(store: ArtifactStore, job_id: str, record: dict[str, Any]) -> Download:
    """An artifact of a job, from its record in the job."""
    name, media_type = record["name"], record["media_type"]
    missing = Problem(
        404, "unknown-artifact", "Unknown artifact", f"job {job_id} has no artifact {name!r}", field="name"
    )
    common = {
        "filename": name,
        "media_type": media_type,
        "size": int(record["size_bytes"]),
        "sha256": record["sha256"],
        "missing": missing,
    }
    if store.backend != "s3":
        return Download(**common, path=store.path_of(job_id, name))
    stored = StoredObject(
        open_range=lambda start, end: store.open_range(job_id, name, start, end),
        head=lambda: store.head(job_id, name),
        presigned_url=(lambda: store.presigned_url(job_id, name, media_type))
        if store.downloads == "redirect"
        else None,
    )
    return Download(**common, stored=stored)


def model_download(library: ModelLibrary, entry: ModelEntry) -> Download:
    """The file of a library model."""
    missing = Problem(
        404,
        "unknown-model",
        "Unknown model",
        f"{entry.name}: its file is no longer in the library's storage",
        field="id",
    )
    common = {
        "filename": entry.name,
        "media_type": MODEL_MEDIA_TYPE,
        "size": entry.size_bytes,
        "sha256": entry.sha256,
        "missing": missing,
    }
    if library.backend != "s3":
        return Download(**common, path=entry.path)
    stored = StoredObject(
        open_range=lambda start, end: library.open_range(entry, start, end),
        head=lambda: library.head(entry),
        presigned_url=(lambda: library.presigned_url(entry, MODEL_MEDIA_TYPE))
        if library.downloads == "redirect"
        else None,
    )
    return Download(**common, stored=stored)


# -- one file --------------------------------------------------------------------------------


def _bad_range(detail: str) -> Problem:
    return Problem(400, "malformed-range", "Malformed Range header", detail, field="Range")


def parse_range(header: str, size: int) -> list[tuple[int, int]] | None:
    """Half-open byte ranges [start, end) of a Range header, overlaps merged, or None to ignore it.

    Follows Starlette's FileResponse: parts that are not numbers are skipped, more than 100 ranges
    are ignored (the whole body is sent).
    """
    units, sep, spec = header.partition("=")
    if not sep:
        raise _bad_range("expected `bytes=start-end`")
    if units.strip().lower() != "bytes":
        raise _bad_range("only byte ranges are supported")
    if spec.count(",") + 1 > _MAX_RANGES:
        return None
    ranges: list[tuple[int, int]] = []
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        first, last = first.strip(), last.strip()
        if not dash or not (first or last):
            continue
        try:
            if first:
                start = int(first)
                end = int(last) + 1 if last and int(last) < size else size
            else:
                start, end = max(size - int(last), 0), size
        except ValueError:
            continue
        ranges.append((start, end))
    if not ranges:
        raise _bad_range("no range requested")
    if any(not 0 <= start < size for start, _ in ranges):
        raise Problem(
            416,
            "range-not-satisfiable",
            "Range not satisfiable",
            f"the file has {size} bytes",
            field="Range",
            headers={"Content-Range": f"bytes */{size}"},
        )
    if any(start >= end for start, end in ranges):
        raise _bad_range("a range's start must come before its end")
    ranges.sort()
    merged = [ranges[0]]
    for start, end in ranges[1:]:
        if start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def content_disposition(filename: str) -> str:
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


def _matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def download_response(download: Download, request: Request) -> Response:
    """The answer to a GET or HEAD of one file."""
    etag = download.etag
    not_modified = _matches(request.headers.get("if-none-match"), etag)
    stored = download.stored
    if stored is None:
        if download.path is None or not download.path.is_file():
            raise download.missing
    elif (not_modified or stored.presigned_url is not None) and stored.head() is None:
        # Neither answer reads the object, so this is the one look at whether it is still there.
        raise download.missing
    if not_modified:
        return Response(status_code=304, headers={"ETag": etag})
    if stored is not None and stored.presigned_url is not None:
        # The object store answers the Range itself; its ETag is its own (not the sha256).
        return RedirectResponse(
            stored.presigned_url(), status_code=307, headers={"ETag": etag, "Cache-Control": "no-store"}
        )

    ranges = None
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header and (if_range is None or if_range == etag):
        ranges = parse_range(range_header, download.size)

    if stored is None:
        # The ranges were checked above, so FileResponse only ever sees satisfiable ones; it
        # answers HEAD itself.
        response = FileResponse(
            download.path, media_type=download.media_type, headers={"ETag": etag}, filename=download.filename
        )
        # Starlette reads 64 KiB per thread hop: a 2 GB model was 33 k hops, 190 MB/s here.
        response.chunk_size = FILE_CHUNK_BYTES
        return response
    return _proxy(download, stored, ranges, headers_only=request.method == "HEAD")


def _proxy(
    download: Download, stored: StoredObject, ranges: list[tuple[int, int]] | None, *, headers_only: bool
) -> Response:
    """Stream an object through the API; for a HEAD, the same headers from the object's metadata."""
    media_type, size = download.media_type, download.size
    headers = {
        "ETag": download.etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": content_disposition(download.filename),
    }
    stream: ObjectStream | None = None
    if headers_only:
        meta = stored.head()
        if meta is None:
            raise download.missing
        length, last_modified = int(meta["ContentLength"]), meta.get("LastModified")
    else:
        first_start, first_end = ranges[0] if ranges else (0, None)
        stream = stored.open_range(first_start, first_end)
        if stream is None:
            raise download.missing
        length, last_modified = stream.content_length, stream.last_modified
    if last_modified is not None:
        headers["Last-Modified"] = formatdate(last_modified.timestamp(), usegmt=True)

    status, multipart = 200, False
    if not ranges:
        headers["Content-Length"] = str(length)
    elif len(ranges) == 1:
        status = 206
        start, end = ranges[0]
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
    else:
        status, multipart = 206, True
        boundary = secrets.token_hex(13)
        part_media_type = media_type
        media_type = f"multipart/byteranges; boundary={boundary}"

        def part_header(start: int, end: int) -> bytes:
            return (
                f"--{boundary}\r\nContent-Type: {part_media_type}\r\n"
                f"Content-Range: bytes {start}-{end - 1}/{size}\r\n\r\n"
            ).encode("latin-1")

        closing = f"--{boundary}--".encode("latin-1")
        headers["Content-Length"] = str(
            sum(len(part_header(s, e)) + (e - s) + 2 for s, e in ranges) + len(closing)
        )

        def parts(first: ObjectStream) -> Iterator[bytes]:
            current: ObjectStream | None = first
            try:
                for i, (start, end) in enumerate(ranges):
                    if i:
                        current = stored.open_range(start, end)
                        if current is None:
                            raise RuntimeError(f"{download.filename} vanished while being read")
                    yield part_header(start, end)
                    yield from current.chunks()
                    yield b"\r\n"
                yield closing
            finally:
                if current is not None:
                    current.close()

    if stream is None:  # a HEAD
        return Response(status_code=status, headers=headers, media_type=media_type)
    body = parts(stream) if multipart else stream.chunks()
    return StreamingResponse(body, status_code=status, media_type=media_type, headers=headers)


# -- a job's artifacts as one zip --------------------------------------------------------------


class _ZipOutput:
    """What zipfile writes, held until the generator hands it on: zipfile sees a file it cannot
    seek, so it writes each entry's sizes after its data and never goes back."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def _compressible(media_type: str) -> bool:
    # CSV and JSON shrink; PNG, GIF and safetensors hardly do, and deflating them costs CPU for nothing.
    return media_type.startswith("text/") or media_type.endswith("json")


def zip_stream(downloads: Iterable[Download], modified: datetime) -> Iterator[bytes]:
    """A zip of the files, entries named by their file names, produced while the files are read:
    nothing is held but the chunk in flight. Entries over 4 GiB are zip64."""
    output = _ZipOutput()
    date_time = modified.timetuple()[:6]
    with zipfile.ZipFile(output, "w") as archive:
        for download in downloads:
            entry = zipfile.ZipInfo(download.filename, date_time=date_time)
            entry.compress_type = (
                zipfile.ZIP_DEFLATED if _compressible(download.media_type) else zipfile.ZIP_STORED
            )
            entry.file_size = download.size  # decides zip64 up front: the header cannot be rewritten
            with archive.open(entry, "w") as member:
                for chunk in download.chunks():
                    member.write(chunk)
                    if data := output.take():
                        yield data
            if data := output.take():
                yield data
    yield output.take()


# -- routes ----------------------------------------------------------------------------------

_HEADERS = {
    "ETag": "The file's sha256, quoted.",
    "Content-Length": "Bytes in the body.",
    "Accept-Ranges": "`bytes`.",
    "Content-Disposition": "`attachment` with the file's name.",
}


def _documented_headers(names: Iterable[str]) -> dict[str, Any]:
    return {name: {"description": _HEADERS[name], "schema": {"type": "string"}} for name in names}


def binary_content(*media_types: str) -> dict[str, Any]:
    """The OpenAPI `content` of a binary body. application/octet-stream is listed beside the body's
    own media type: code generators (openapi-python-client) read a body as bytes only under that
    type, and leave an operation answering `*/*` or application/zip without a response type."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {media_type: dict(binary) for media_type in (*media_types, MODEL_MEDIA_TYPE)}


def add_download_routes(
    router: APIRouter,
    path: str,
    endpoint: Callable[..., Response],
    *,
    name: str,
    summary: str,
    description: str,
    media_type: str,
    what: str,
) -> None:
    """GET and HEAD of one file, documented: the 200's body is binary (so generated clients
    download it), the HEAD answers the same headers without it. `name` (`ModelFile`) makes the
    operation ids `downloadModelFile` and `headModelFile`."""
    errors: dict[int | str, dict[str, Any]] = {
        304: {"description": "Not modified (If-None-Match named the ETag)"},
        307: {"description": "Redirect to a presigned object-store URL (s3 backend, redirect downloads)"},
        400: {"model": ProblemModel, "description": "Malformed Range header"},
        404: {"model": ProblemModel},
        416: {"model": ProblemModel, "description": "Range not satisfiable (`Content-Range: bytes */size`)"},
    }
    router.add_api_route(
        path,
        endpoint,
        methods=["GET"],
        operation_id=f"download{name}",
        summary=summary,
        description=description,
        response_class=Response,
        responses={
            200: {
                "description": what,
                "content": binary_content(media_type),
                "headers": _documented_headers(_HEADERS),
            },
            206: {
                "description": "Partial content: one range, or several as multipart/byteranges",
                "content": binary_content(media_type, "multipart/byteranges"),
            },
            **errors,
        },
    )
    router.add_api_route(
        path,
        endpoint,
        methods=["HEAD"],
        operation_id=f"head{name}",
        summary=f"{summary}: headers only",
        description="The headers the GET answers (size, ETag, ranges), without the body.",
        response_class=Response,
        responses={
            200: {"description": "The headers of the GET", "headers": _documented_headers(_HEADERS)},
            206: {"description": "The headers of a ranged GET"},
            **errors,
        },
    )
