"""RFC 9457 problem details, raised anywhere and rendered by the API."""

from __future__ import annotations

from typing import Any

PROBLEM_MEDIA_TYPE = "application/problem+json"
_TYPE_BASE = "https://mergeprobe.dev/problems/"


class Problem(Exception):
    """An error a client can act on: HTTP status, a stable type slug, and where the fault is.

    `field` is a JSON path into the request ("alpha", "output.dtype"); `position`
    is a 0-based character offset inside that field when it holds a spec string.
    """

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
        super().__init__(detail or title)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.field = field
        self.position = position
        self.errors = errors
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

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> Problem:
        slug = str(body.get("type", "")).removeprefix(_TYPE_BASE) or "about-blank"
        return cls(
            int(body.get("status", 500)),
            slug,
            str(body.get("title", "Error")),
            body.get("detail"),
            field=body.get("field"),
            position=body.get("position"),
            errors=body.get("errors"),
        )


def bad_request(slug: str, detail: str, *, field: str | None = None, position: int | None = None) -> Problem:
    return Problem(400, slug, "Invalid request", detail, field=field, position=position)


def not_found(slug: str, detail: str, *, field: str | None = None) -> Problem:
    return Problem(404, slug, "Not found", detail, field=field)
