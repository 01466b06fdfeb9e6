"""Every error leaves as RFC 9457 application/problem+json."""

from __future__ import annotations

import logging
import math
import re

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mergeprobe.probing.colorize_grammar import error_from_validation
from mergeprobe.service.errors import MergeprobeError
from mergeprobe.service.problems import PROBLEM_MEDIA_TYPE, Problem, problem_of

log = logging.getLogger("mergeprobe.api")


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    instance = request.url.path if request is not None else None
    return JSONResponse(
        problem.to_dict(instance),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=problem.headers,
    )


# pydantic names the member of a union a value was tried against inside the location (`alpha` →
# `float`, `list[float]`; `variants` → `PerBlockVariants`); the request's own fields are snake_case.
_UNION_MEMBER = re.compile(r"^([A-Z]\w*|[a-z]+\[.*\]|float|int|str|bool|function-\w+\[.*\])$")


def _field_path(loc: tuple) -> str:
    """The request field a pydantic error location names, as `alpha`, `output.dtype`, `seeds.1`."""
    parts = [
        str(p)
        for p in loc
        if p not in ("body", "query", "path", "header")
        and not (isinstance(p, str) and _UNION_MEMBER.match(p))
    ]
    return ".".join(parts) if parts else ".".join(str(p) for p in loc)


def _non_finite(value: object) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _validation_problem(exc: RequestValidationError) -> Problem:
    for error in exc.errors():
        # A colorize expression is a spec string: a 400 with its position, like the other grammars.
        expression_error = error_from_validation(error, _field_path(tuple(error.get("loc", ()))))
        if expression_error is not None:
            return problem_of(expression_error)
    for error in exc.errors():
        if _non_finite(error.get("input")):
            field = _field_path(tuple(error.get("loc", ())))
            return Problem(
                400,
                "non-finite-number",
                "Invalid request",
                f"{field}: {error['input']} is not a finite number (NaN, Infinity and numbers beyond "
                "±1.8e308 are refused)",
                field=field,
            )
    errors = [
        {
            "field": _field_path(tuple(e.get("loc", ()))),
            "message": e.get("msg", ""),
            "type": e.get("type", ""),
        }
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"field": None, "message": "invalid request", "type": ""}
    if first["type"] == "json_invalid":
        return Problem(
            400,
            "invalid-json",
            "Invalid JSON",
            f"the request body is not valid JSON: {first['message']}",
            field="body",
        )
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return Problem(422, "validation-error", "Invalid request", detail, field=first["field"], errors=errors)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request)

    @app.exception_handler(MergeprobeError)
    async def _domain_error(request: Request, exc: MergeprobeError) -> JSONResponse:
        return problem_response(problem_of(exc), request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(_validation_problem(exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        problem = Problem(
            exc.status_code, slug, str(exc.detail), str(exc.detail), headers=dict(exc.headers or {})
        )
        return problem_response(problem, request)

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        problem = Problem(
            503,
            "redis-unavailable",
            "Queue unavailable",
            f"Redis is not reachable: {exc}",
            headers={"Retry-After": "5"},
        )
        return problem_response(problem, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            Problem(500, "internal-error", "Internal server error", type(exc).__name__), request
        )
