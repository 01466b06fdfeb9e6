"""HTTP answers for artifact downloads, the same for every artifacts backend.

- local: a FileResponse of the file;
- s3, proxy: the API streams the object (one ranged GET per requested range);
- s3, redirect: 307 to a presigned GET URL of the object.

In every case the ETag is the artifact's sha256 (If-None-Match answers 304), one or more byte
ranges answer 206 with Content-Range (several as multipart/byteranges), a range past the end is
a 416 with `Content-Range: bytes */size`, and a malformed one a 400, both as problem+json.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from mergeprobe.service.artifacts import ArtifactStore
from mergeprobe.service.problems import Problem

_MAX_RANGES = 100


def _missing(job_id: str, name: str) -> Problem:
    return Problem(
        404, "unknown-artifact", "Unknown artifact", f"job {job_id} has no artifact {name!r}", field="name"
    )


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
            f"the artifact has {size} bytes",
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


def _content_disposition(name: str) -> str:
    quoted = quote(name)
    return f"attachment; filename*=utf-8''{quoted}" if quoted != name else f'attachment; filename="{name}"'


def _matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def artifact_response(
    store: ArtifactStore, job_id: str, name: str, record: dict[str, Any], request: Request
) -> Response:
    etag = f'"{record["sha256"]}"'
    media_type = record["media_type"]
    size = int(record["size_bytes"])
    s3 = store.backend == "s3"

    if not s3 or _matches(request.headers.get("if-none-match"), etag) or store.downloads == "redirect":
        if not store.exists(job_id, name):
            raise _missing(job_id, name)
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers={"ETag": etag})
    if s3 and store.downloads == "redirect":
        # The object store answers the Range itself; its ETag is its own (not the sha256).
        url = store.presigned_url(job_id, name, media_type)
        return RedirectResponse(url, status_code=307, headers={"ETag": etag, "Cache-Control": "no-store"})

    ranges = None
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header and (if_range is None or if_range == etag):
        ranges = parse_range(range_header, size)

    if not s3:
        # The ranges were checked above, so FileResponse only ever sees satisfiable ones.
        headers = {"ETag": etag}
        return FileResponse(
            store.path_of(job_id, name),
            media_type=media_type,
            headers=headers,
            filename=name,
        )
    return _proxy(store, job_id, name, media_type, size, etag, ranges)


def _proxy(
    store: Any,
    job_id: str,
    name: str,
    media_type: str,
    size: int,
    etag: str,
    ranges: list[tuple[int, int]] | None,
) -> Response:
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": _content_disposition(name),
    }
    if not ranges:
        stream = store.open_range(job_id, name)
        if stream is None:
            raise _missing(job_id, name)
        headers["Content-Length"] = str(stream.content_length)
    else:
        first_start, first_end = ranges[0]
        stream = store.open_range(job_id, name, first_start, first_end)
        if stream is None:
            raise _missing(job_id, name)
    if stream.last_modified is not None:
        headers["Last-Modified"] = formatdate(stream.last_modified.timestamp(), usegmt=True)
    if not ranges:
        return StreamingResponse(stream.chunks(), media_type=media_type, headers=headers)
    if len(ranges) == 1:
        start, end = ranges[0]
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        return StreamingResponse(stream.chunks(), status_code=206, media_type=media_type, headers=headers)

    boundary = secrets.token_hex(13)

    def part_header(start: int, end: int) -> bytes:
        return (
            f"--{boundary}\r\nContent-Type: {media_type}\r\n"
            f"Content-Range: bytes {start}-{end - 1}/{size}\r\n\r\n"
        ).encode("latin-1")

    closing = f"--{boundary}--".encode("latin-1")
    length = sum(len(part_header(s, e)) + (e - s) + 2 for s, e in ranges) + len(closing)
    headers["Content-Length"] = str(length)

    def body() -> Iterator[bytes]:
        current = stream
        try:
            for i, (start, end) in enumerate(ranges):
                if i:
                    current = store.open_range(job_id, name, start, end)
                    if current is None:
                        raise RuntimeError(f"artifact {name} of job {job_id} vanished while being read")
                yield part_header(start, end)
                yield from current.chunks()
                yield b"\r\n"
            yield closing
        finally:
            current.close()

    return StreamingResponse(
        body(), status_code=206, media_type=f"multipart/byteranges; boundary={boundary}", headers=headers
    )
