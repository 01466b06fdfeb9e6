"""Domain errors: what is wrong and where in the request, said without HTTP.

Everything below the API raises these. `mergeprobe.service.problems.problem_of` turns one into the
RFC 9457 problem that the API answers with (`app/errors.py`) and that a failed job records
(`worker/tasks.py`); the HTTP status is decided there, by the error's class.
"""

from __future__ import annotations

from typing import Any


class MergeprobeError(Exception):
    """`slug` is a stable type name; `field` a JSON path into the request ("alpha", "output.dtype");
    `position` a 0-based character offset inside that field when it holds a spec string."""

    def __init__(
        self,
        slug: str,
        title: str,
        detail: str | None = None,
        *,
        field: str | None = None,
        position: int | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.slug = slug
        self.title = title
        self.detail = detail
        self.field = field
        self.position = position
        self.errors = errors


class InvalidInput(MergeprobeError):
    """The request, or a file it names, is not something mergeprobe can accept."""


class NotFound(MergeprobeError):
    """The request names a model, job or artifact that does not exist."""


class Conflict(MergeprobeError):
    """The request collides with the state of things: a name taken, a model changed."""


class TooLarge(MergeprobeError):
    """The request or an upload is over a configured size limit."""


class Unprocessable(MergeprobeError):
    """The request is well formed but cannot be carried out as asked: a rule between its fields, or
    something this deployment lacks (a pipeline config)."""


class UpstreamFailed(MergeprobeError):
    """A server the service fetched from on the request's behalf (an import's source) answered with
    an error, could not be reached, or broke off the transfer."""


class Overloaded(MergeprobeError):
    """Too much is waiting already; try again after `retry_after` seconds."""

    def __init__(self, slug: str, title: str, detail: str | None = None, *, retry_after: int) -> None:
        super().__init__(slug, title, detail)
        self.retry_after = retry_after
