"""Makes the OpenAPI document say what the app really answers (checked by tests/app/test_schemathesis.py).

FastAPI documents every `{"model": ProblemModel}` response as application/json and adds its own
422 (HTTPValidationError); the app answers every error as application/problem+json with a
ProblemModel body. The middleware answers 401 (auth on) and 413 (body cap) on routes that do not
list them. This rewrites the generated document accordingly.
"""

from __future__ import annotations

import json
from typing import Any

from app.middleware import PUBLIC_PATHS
from mergeprobe.service.problems import PROBLEM_MEDIA_TYPE

_PROBLEM_REF = "#/components/schemas/ProblemModel"
_PROBLEM_CONTENT = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": _PROBLEM_REF}}}
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {k: dict(v) for k, v in _PROBLEM_CONTENT.items()}}


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in _METHODS:
                continue
            responses = operation.setdefault("responses", {})
            for status, response in responses.items():
                content = response.get("content", {})
                json_body = content.get("application/json", {}).get("schema", {})
                if status == "422" and json_body.get("$ref", "").endswith("/HTTPValidationError"):
                    responses[status] = _problem("The request does not match the schema")
                elif json_body.get("$ref") == _PROBLEM_REF:
                    content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
            if path not in PUBLIC_PATHS:
                responses.setdefault(
                    "401", _problem("Missing or unknown bearer token (only when MERGEPROBE_API_KEYS is set)")
                )
            if "requestBody" in operation:
                responses.setdefault("413", _problem("The request body is over its cap"))
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{name}"' not in json.dumps(schema):
            components.pop(name, None)
    if "ProblemModel" not in components:
        from app.schemas import ProblemModel

        components["ProblemModel"] = ProblemModel.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
    return schema


# Routes that read or write Redis list this: the error handler answers 503 while Redis is down.
REDIS_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "Redis (the queue) is unreachable; retry after Retry-After seconds",
        "content": _PROBLEM_CONTENT,
        "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}},
    }
}

# One Server-Sent Event of GET /v1/jobs/{id}/events (before OpenAPI 3.2, `schema` describes each event).
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["job", "end"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "`job`: the job as GET /v1/jobs/{id} returns it; `end`: `{}`.",
        },
    },
}
