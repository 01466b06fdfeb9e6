"""HTTP to a mergeprobe service, standard library only.

`http.client` rather than a client library: the command-line client runs wherever the package is
installed (the API image has no httpx), bodies stream both ways without being held in memory, and
redirects are followed here so that the bearer token never goes to another origin (a 307 to a
presigned object-store URL must not carry it).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import secrets
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode, urljoin, urlsplit

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "mergeprobe-cli"
CHUNK = 1 << 20
REQUEST_TIMEOUT = 60.0  # seconds a socket waits for the service on an ordinary request
TRANSFER_TIMEOUT = 300.0  # on uploads and downloads (the service validates an upload after it has it)
EVENTS_TIMEOUT = 60.0  # the events stream sends a keepalive every 15 s
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

Progress = Callable[[int, int | None], None]  # (bytes so far, bytes in all or None)


class ClientError(Exception):
    """The service could not be reached or did not answer usably; the message is one line."""


class ApiError(ClientError):
    """The service answered with an error: its status and its problem document (RFC 9457)."""

    def __init__(self, status: int, problem: dict[str, Any], method: str, url: str) -> None:
        self.status = status
        self.problem = problem
        self.method = method
        self.url = url
        self.request: Any = None  # the body sent, when it helps to show the problem
        title = problem.get("title") or http.client.responses.get(status, "error")
        detail = problem.get("detail")
        super().__init__(f"{status} {title}" + (f": {detail}" if detail and detail != title else ""))


class ExistsError(ClientError):
    """A download would overwrite a file."""


class UrlError(ClientError):
    """The service URL given (--url, MERGEPROBE_URL) is not one: a usage error."""


class Response:
    """An answer whose body has not been read yet; close it (or use `with`)."""

    def __init__(self, conn: http.client.HTTPConnection, raw: http.client.HTTPResponse, url: str) -> None:
        self._conn = conn
        self.raw = raw
        self.status = raw.status
        self.headers = raw.headers
        self.url = url

    def read(self, amount: int | None = None) -> bytes:
        try:
            return self.raw.read(amount) if amount is not None else self.raw.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"the connection to {_origin(self.url)} broke off: {_reason(exc)}") from exc

    def readline(self) -> bytes:
        try:
            return self.raw.readline(CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"the connection to {_origin(self.url)} broke off: {_reason(exc)}") from exc

    def json(self) -> Any:
        body = self.read()
        try:
            return json.loads(body)
        except ValueError:
            raise ClientError(
                f"{self.url}: the service answered {self.status} with something that is not JSON"
            ) from None

    def close(self) -> None:
        self.raw.close()
        self._conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the service closed the connection without answering"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text


def _problem_of(status: int, content_type: str, body: bytes) -> dict[str, Any]:
    if "json" in content_type:
        with contextlib.suppress(ValueError):
            doc = json.loads(body)
            if isinstance(doc, dict):
                return doc
    text = body.decode("utf-8", "replace").strip()
    return {
        "status": status,
        "title": http.client.responses.get(status, "error"),
        **({"detail": text[:500]} if text else {}),
    }


class _CountingReader:
    """A file object for http.client's body: counts what is sent, for a progress display."""

    def __init__(self, file: BinaryIO, total: int | None, progress: Progress | None) -> None:
        self.file = file
        self.total = total
        self.progress = progress
        self.sent = 0

    def read(self, amount: int = CHUNK) -> bytes:
        data = self.file.read(amount)
        if data:
            self.sent += len(data)
            if self.progress is not None:
                self.progress(self.sent, self.total)
        return data

    def seekable(self) -> bool:
        return self.file.seekable()

    def seek(self, offset: int) -> int:  # sent again after a redirect
        self.sent = offset
        return self.file.seek(offset)


class ApiClient:
    """One service: its base URL (an optional path prefix kept) and its API key."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UrlError(f"not a service URL: {url!r} (expected http://host:port or https://…)")
        try:
            parts.port  # noqa: B018 - parsed here, not at the first request
        except ValueError:
            raise UrlError(f"not a service URL: {url!r} (its port is not a number from 0 to 65535)") from None
        self.base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self.api_key = api_key or None

    # -- requests ---------------------------------------------------------------------------

    def url_of(self, path: str, params: dict[str, Any] | None = None) -> str:
        """An API path (`/v1/...`, as the service writes them in its answers) under the base URL;
        an absolute URL as it is."""
        url = path if "://" in path else self.base + ("" if path.startswith("/") else "/") + path
        query = {k: v for k, v in (params or {}).items() if v is not None}
        return f"{url}{'&' if '?' in url else '?'}{urlencode(query)}" if query else url

    def open(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        body: BinaryIO | bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> Response:
        """Send a request and return the answer once its status is a success (redirects followed);
        an error status raises ApiError with the problem, a network failure ClientError."""
        url = self.url_of(path, params)
        extra = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            extra.setdefault("Content-Type", "application/json")
        for _ in range(MAX_REDIRECTS + 1):
            response = self._send(method, url, body, extra, timeout)
            if response.status not in _REDIRECTS or "Location" not in response.headers:
                break
            response.close()
            url = urljoin(url, response.headers["Location"])
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, body = "GET", None
            elif body is not None and not isinstance(body, bytes):
                if not body.seekable():
                    raise ClientError(f"{method} {url}: redirected, and the body cannot be sent again")
                body.seek(0)
        else:
            raise ClientError(f"{method} {url}: more than {MAX_REDIRECTS} redirects")
        if response.status >= 400:
            try:
                data = response.raw.read(1 << 20)
            except (OSError, http.client.HTTPException):
                data = b""
            response.close()
            problem = _problem_of(response.status, response.headers.get("Content-Type", ""), data)
            raise ApiError(response.status, problem, method, url)
        return response

    def _send(
        self, method: str, url: str, body: BinaryIO | bytes | None, headers: dict[str, str], timeout: float
    ) -> Response:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:  # a redirect's Location with a port that is not one
            raise ClientError(f"{method} {url}: not a URL with a usable port") from None
        conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_class(parts.hostname, port, timeout=timeout, blocksize=CHUNK)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        sent = {"User-Agent": USER_AGENT, "Accept": "application/json, */*", **headers}
        # The key goes to the service only, never to where it redirects (an object store).
        if self.api_key and _origin(url) == _origin(self.base):
            sent["Authorization"] = f"Bearer {self.api_key}"
        try:
            try:
                conn.request(method, target, body=body, headers=sent)
            except (BrokenPipeError, ConnectionResetError):
                # The service may refuse an upload before reading it all (413, 401): its answer
                # is there to read even though the rest of the body could not be sent.
                pass
            raw = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            hint = ""
            if isinstance(exc, ConnectionRefusedError | socket.gaierror):
                hint = " (is `mergeprobe serve` running there? set --url or MERGEPROBE_URL)"
            raise ClientError(f"cannot reach {_origin(url)}: {_reason(exc)}{hint}") from None
        return Response(conn, raw, url)

    def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        with self.open(method, path, **kwargs) as response:
            if response.status == 204:
                return None
            return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request_json("GET", path, params=params)

    # -- transfers --------------------------------------------------------------------------

    def upload(
        self, path: str, file: Path, *, params: dict[str, Any], progress: Progress | None = None
    ) -> Any:
        """POST a file as the raw body, streamed from disk."""
        size = file.stat().st_size
        with file.open("rb") as fh:
            reader = _CountingReader(fh, size, progress)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            return self.request_json(
                "POST", path, params=params, body=reader, headers=headers, timeout=TRANSFER_TIMEOUT
            )

    def download(
        self,
        path: str,
        dest: Path | None,
        *,
        expected_sha256: str | None = None,
        force: bool = False,
        progress: Progress | None = None,
        stdout: BinaryIO | None = None,
    ) -> tuple[int, str]:
        """GET a file into `dest`, streamed: written under a temporary name in its directory,
        checked (length, sha256), then given its name; an existing file is kept unless `force`.
        With `stdout` instead of a path, written there. Returns (bytes, sha256)."""
        if dest is not None and dest.is_dir():
            raise ExistsError(
                f"{dest} is a directory; not replaced (name a file, or a directory to put it in)"
            )
        if dest is not None and not force and dest.exists():
            raise ExistsError(f"{dest} exists; not overwritten (--force replaces it)")
        with self.open("GET", path, timeout=TRANSFER_TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if dest is None:
                assert stdout is not None
                return _copy(response, stdout, total, expected_sha256, progress, response.url)
            dest.parent.mkdir(parents=True, exist_ok=True)
            temp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.part"
            try:
                with temp.open("xb") as out:
                    written, digest = _copy(response, out, total, expected_sha256, progress, response.url)
                    out.flush()
                    os.fsync(out.fileno())
                _give_name(temp, dest, force)
            finally:
                temp.unlink(missing_ok=True)
        return written, digest

    def events(self, path: str) -> Iterator[tuple[str, str]]:
        """Server-Sent Events: (event, data) pairs as they come; ends when the stream does."""
        with self.open(
            "GET", path, headers={"Accept": "text/event-stream"}, timeout=EVENTS_TIMEOUT
        ) as stream:
            event, data = "message", []
            while True:
                line = stream.readline()
                if not line:
                    return
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if not text:
                    if data:
                        yield event, "\n".join(data)
                    event, data = "message", []
                elif text.startswith(":"):
                    continue
                else:
                    name, _, value = text.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "event":
                        event = value
                    elif name == "data":
                        data.append(value)


def _copy(
    response: Response,
    out: BinaryIO,
    total: int | None,
    expected_sha256: str | None,
    progress: Progress | None,
    url: str,
) -> tuple[int, str]:
    digest = hashlib.sha256()
    written = 0
    while chunk := response.read(CHUNK):
        out.write(chunk)
        digest.update(chunk)
        written += len(chunk)
        if progress is not None:
            progress(written, total)
    if total is not None and written != total:
        raise ClientError(f"{url}: the download ended after {written} of {total} bytes")
    sha256 = digest.hexdigest()
    if expected_sha256 and sha256 != expected_sha256.lower():
        raise ClientError(f"{url}: downloaded sha256 {sha256} is not the expected {expected_sha256}")
    return written, sha256


def _give_name(temp: Path, dest: Path, force: bool) -> None:
    """The finished temp file takes its name: atomically, and without replacing an existing file
    unless `force` (a hard link fails if the name exists; a file system without links falls back to
    a check then a rename)."""
    if force:
        os.replace(temp, dest)
        return
    try:
        os.link(temp, dest)
    except FileExistsError:
        raise ExistsError(f"{dest} exists; not overwritten (--force replaces it)") from None
    except OSError:
        if dest.exists():
            raise ExistsError(f"{dest} exists; not overwritten (--force replaces it)") from None
        os.rename(temp, dest)
