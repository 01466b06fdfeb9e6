"""The import job's request and the policy on what it may fetch (pure Python, no torch).

An import brings a model into the library from a URL: `http://`, `https://` or `s3://bucket/key`
(a bucket at the service's S3 endpoint, read with the worker's credentials). The worker streams it
(worker/engines/import_model.py) and commits it as an upload is committed.

The worker fetches what a client names, from inside the deployment's network: a request for
`http://169.254.169.254/…` or `http://redis:6379/` is server-side request forgery. So only these
schemes are accepted, and MERGEPROBE_IMPORT_ALLOWED_HOSTS, when set, names the only sources; the
API checks at submission, and the worker checks again with its own settings and at every redirect.
URLs carrying credentials (`user:pass@host`) are refused: the URL is stored in the job record,
which every API client can read. There are no custom request headers for the same reason.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field

from mergeprobe.checkpoints.library import ModelLibrary, shown_text, validate_model_name
from mergeprobe.service.errors import InvalidInput
from mergeprobe.service.request_model import RequestModel
from mergeprobe.service.settings import Settings

MAX_URL_CHARS = 2048
SCHEMES = ("http", "https", "s3")
# S3's rules for bucket names (3-63 characters: lowercase letters, digits, dots and hyphens).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Spaces and control characters are never part of a URL (they must be percent-encoded).
_UNSAFE_RE = re.compile(r"[\x00-\x20\x7f]")


class ImportRequest(RequestModel):
    """A model to bring into the library from a URL."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "url": "https://models.example.com/sd15/blend.safetensors",
                    "sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
                },
                {"url": "s3://team-models/sd15/blend.safetensors", "name": "team-blend.safetensors"},
            ]
        }
    )

    url: str = Field(
        min_length=1,
        max_length=MAX_URL_CHARS,
        description="`http://`, `https://` or `s3://bucket/key` (a bucket at the service's S3 endpoint, read "
        "with the worker's credentials). No `user:password@`: the URL is stored in the job record, which "
        "every API client can read (a presigned URL's signature too, until it expires). Redirects are "
        "followed (at most 5), each checked like the URL itself.",
        examples=["https://models.example.com/sd15/blend.safetensors"],
    )
    name: str | None = Field(
        default=None,
        description="The model's name in the library (ending in .safetensors or .ckpt); default: the last "
        "segment of the URL's path, percent-decoded, which must then be a valid name.",
        examples=["blend.safetensors"],
    )
    sha256: str | None = Field(
        default=None,
        pattern="^[0-9a-fA-F]{64}$",
        description="The sha256 the file must have: on a mismatch the job fails and nothing is stored.",
        examples=["6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"],
    )


class ImportInputs(BaseModel):
    name: str  # the request's name, or the one taken from the URL
    sha256: str | None  # expected, lowercase


@dataclass(frozen=True)
class ImportSource:
    """A URL the import policy accepted, taken apart."""

    url: str
    scheme: str  # http, https or s3
    host: str  # the host name (lowercase) or, for s3, the bucket
    path: str  # the URL's path, or, for s3, the object key

    @property
    def file_name(self) -> str:
        """The last segment of the path (percent-decoded for http(s); s3 keys are not encoded)."""
        last = self.path.rsplit("/", 1)[-1]
        return last if self.scheme == "s3" else unquote(last)


@dataclass(frozen=True)
class AllowedSources:
    """MERGEPROBE_IMPORT_ALLOWED_HOSTS parsed: host names (each also allowing its subdomains), IP
    addresses, and buckets (`s3://bucket`). Nothing listed: anything allowed."""

    hosts: tuple[str, ...]
    buckets: tuple[str, ...]

    @classmethod
    def of(cls, settings: Settings) -> AllowedSources:
        entries = [e.strip().lower().rstrip(".") for e in settings.import_allowed_hosts.split(",")]
        entries = [e for e in entries if e]
        return cls(
            hosts=tuple(e.lstrip(".") for e in entries if not e.startswith("s3://")),
            buckets=tuple(e.removeprefix("s3://").strip("/") for e in entries if e.startswith("s3://")),
        )

    @property
    def anything(self) -> bool:
        return not self.hosts and not self.buckets

    def allows(self, source: ImportSource) -> bool:
        if self.anything:
            # Even with no list, not the cloud metadata services (instance credentials live
            # there); they are reachable only when listed explicitly.
            return source.scheme == "s3" or not _is_metadata_service(source.host)
        if source.scheme == "s3":
            return source.host in self.buckets
        host = source.host.rstrip(".")
        # Addresses match exactly; a name also allows its subdomains, whole labels only.
        return any(
            host == entry or (not _is_ip(entry) and host.endswith("." + entry)) for entry in self.hosts
        )

    def described(self) -> str:
        return ", ".join([*self.hosts, *(f"s3://{b}" for b in self.buckets)])


_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


def _is_metadata_service(host: str) -> bool:
    host = host.rstrip(".").lower()
    if host in _METADATA_HOSTS:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # 169.254.169.254 (AWS, GCP, Azure, …) is link-local; AWS's IPv6 one is fd00:ec2::254.
    return address.is_link_local or address == ipaddress.ip_address("fd00:ec2::254")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _refuse(slug: str, title: str, url: str, why: str) -> InvalidInput:
    return InvalidInput(slug, title, f"{shown_text(url)}: {why}", field="url")


def check_source(url: str, settings: Settings) -> ImportSource:
    """The source a URL names, or a 400 naming `url` when it may not be imported from."""
    if _UNSAFE_RE.search(url):
        raise _refuse(
            "invalid-url", "Invalid URL", url, "spaces and control characters must be percent-encoded"
        )
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:  # e.g. "Invalid IPv6 URL" for an unclosed [
        raise _refuse("invalid-url", "Invalid URL", url, str(exc)) from None
    if scheme not in SCHEMES:
        raise _refuse(
            "unsupported-url-scheme",
            "Unsupported URL scheme",
            url,
            "only http://, https:// and s3://bucket/key URLs can be imported from",
        )
    source = _s3_source(url) if scheme == "s3" else _http_source(url, scheme)
    allowed = AllowedSources.of(settings)
    if not allowed.allows(source):
        what = f"bucket {source.host!r}" if scheme == "s3" else f"host {source.host!r}"
        raise _refuse(
            "import-source-not-allowed",
            "Import source not allowed",
            url,
            f"imports from {what} are not allowed here; allowed: {allowed.described()} "
            "(MERGEPROBE_IMPORT_ALLOWED_HOSTS)",
        )
    return source


def _credentials_refused(url: str) -> InvalidInput:
    # The URL is not echoed: it holds a secret.
    return InvalidInput(
        "credentials-in-url",
        "Credentials in URL",
        "URLs with user:password@ are refused, as the URL is stored in the job record, which every API "
        "client can read; import from a source that needs no credentials, or from s3:// with the worker's",
        field="url",
    )


def _http_source(url: str, scheme: str) -> ImportSource:
    if not url.isascii():
        raise _refuse("invalid-url", "Invalid URL", url, "non-ASCII characters must be percent-encoded")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _refuse("invalid-url", "Invalid URL", url, str(exc)) from None
    if "@" in parts.netloc:
        raise _credentials_refused(url)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError as exc:
        raise _refuse("invalid-url", "Invalid URL", url, f"invalid port ({exc})") from None
    if not parts.hostname:
        raise _refuse("invalid-url", "Invalid URL", url, "the URL names no host")
    return ImportSource(url, scheme, parts.hostname, parts.path)


def _s3_source(url: str) -> ImportSource:
    # Not urlsplit: an S3 key is everything after the bucket, `?` and `#` included.
    bucket, _, key = url.split("://", 1)[1].partition("/")
    if "@" in bucket:
        raise _credentials_refused(url)
    if not _BUCKET_RE.match(bucket):
        raise _refuse(
            "invalid-url",
            "Invalid URL",
            url,
            f"{shown_text(bucket)} is not an S3 bucket name (3-63 lowercase letters, digits, '.' and '-')",
        )
    if not key or key.endswith("/"):
        raise _refuse("invalid-url", "Invalid URL", url, "the URL names no object: use s3://bucket/key")
    return ImportSource(url, "s3", bucket, key)


def import_name(request: ImportRequest, source: ImportSource) -> str:
    """The name the model gets: the request's, or the URL's file name (a 400 naming `name` when
    that is no valid model name)."""
    if request.name is not None:
        return validate_model_name(request.name, field="name")
    try:
        return validate_model_name(source.file_name, field="name")
    except InvalidInput as exc:
        raise InvalidInput(
            exc.slug,
            exc.title,
            f"no name given, and the URL's file name is no model name: {exc.detail}; give one in `name`",
            field="name",
        ) from None


def prepare_import(request: ImportRequest, library: ModelLibrary) -> ImportInputs:
    source = check_source(request.url, library.settings)
    name = import_name(request, source)
    library.check_name_free(name, field="name")
    return ImportInputs(name=name, sha256=request.sha256.lower() if request.sha256 else None)


IMPORT_DESCRIPTION = """Bring a model into the library from a URL: a user's model store, a mirror.

- `url`: `http://` or `https://` (redirects followed, at most 5, each checked like the URL), or
  `s3://bucket/key` at the service's S3 endpoint (MERGEPROBE_S3_ENDPOINT_URL, MERGEPROBE_S3_REGION),
  read with the worker's credentials (boto3's chain). Other schemes and URLs with `user:password@`
  are 400s; so are sources MERGEPROBE_IMPORT_ALLOWED_HOSTS does not list, when it is set (the worker
  fetches from inside the deployment's network: the list keeps it to the stores meant).
- `name`: default the URL's file name; a name that is taken is a 409 at submission.
- `sha256`: when given, a file with other bytes fails the job (409 `sha256-mismatch`) and nothing
  is stored.

The file is streamed to a temporary file and hashed on the way; a `Content-Length` or object size
over MERGEPROBE_MAX_UPLOAD_BYTES fails the job before any byte is read, and a transfer that passes it
fails as it does. Progress is in bytes (`total` 0 while the source has not said its size), stage
`downloading`, then `validating and storing`: the header is checked as for an upload (a file that is
no checkpoint fails the job with `invalid-checkpoint`) and the model is added to the library. A
source that answers with an error, cannot be reached (30 s to connect and for each read) or breaks
off fails the job with a 502 `import-source-failed`. A canceled import stops between chunks and leaves
no file behind."""
