"""RFC 9457 problem details: what the API answers with and a failed job records.

Domain code raises `mergeprobe.service.errors`; `problem_of` gives each its status here. `Problem` itself
is raised only by the HTTP layer (`app/`)."""

from __future__ import annotations

from typing import Any

from mergeprobe.service.errors import (
    Conflict,
    InvalidInput,
    MergeprobeError,
    NotFound,
    Overloaded,
    TooLarge,
    Unprocessable,
    UpstreamFailed,
)

PROBLEM_MEDIA_TYPE = "application/problem+json"
_TYPE_BASE = "https://mergeprobe.dev/problems/"


class Problem(MergeprobeError):
    """An error as a client sees it: a domain error with its HTTP status (and headers).
    The HTTP layer raises these directly; everything below it raises `mergeprobe.service.errors`."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str | None = None,
        *,
        field: str | None = None,
        position: int | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(slug, title, detail, field=field, position=position, errors=errors)
        self.status = status
        self.headers = headers or {}

    def to_dict(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": _TYPE_BASE + self.slug, "title": self.title, "status": self.status}
        if self.detail:
            body["detail"] = self.detail
        if instance:
            body["instance"] = instance
        if self.field is not None:
            body["field"] = self.field
        if self.position is not None:
            body["position"] = self.position
        if self.errors:
            body["errors"] = self.errors
        return body


# The status of each kind of domain error, most specific first.
_STATUS: tuple[tuple[type[MergeprobeError], int], ...] = (
    (InvalidInput, 400),
    (NotFound, 404),
    (Conflict, 409),
    (TooLarge, 413),
    (Unprocessable, 422),
    (Overloaded, 429),
    (UpstreamFailed, 502),
)


def problem_of(error: MergeprobeError) -> Problem:
    """The problem a client is shown for a domain error."""
    if isinstance(error, Problem):
        return error
    status = next((code for cls, code in _STATUS if isinstance(error, cls)), 500)
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, Overloaded) else None
    return Problem(
        status,
        error.slug,
        error.title,
        error.detail,
        field=error.field,
        position=error.position,
        errors=error.errors,
        headers=headers,
    )
