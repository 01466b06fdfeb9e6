"""ASGI middleware: bearer-token auth and a cap on request bodies."""

from __future__ import annotations

import hmac
import json
import re
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mergeprobe.service.problems import PROBLEM_MEDIA_TYPE, Problem

# The one route a load balancer or orchestrator probes without credentials, and the browser
# console's page (app/console.py): it holds nothing secret and must load for a key to be entered.
PUBLIC_PATHS = frozenset({"/healthz", "/"})
PUBLIC_PREFIXES = ("/static/console/",)
# The console keeps its key in a cookie as well (SameSite=Strict), for what the browser fetches
# by itself and no script can add a header to: model files and artifacts (<a download>, <img>).
# It is accepted there only, and only for GET and HEAD: never for a request that changes state.
KEY_COOKIE = b"mergeprobe_key"
COOKIE_PATHS = re.compile(r"^/v1/(models/[^/]+/file|jobs/[^/]+/artifacts/[^/]+|jobs/[^/]+/artifacts\.zip)$")
UPLOAD_PATH = "/v1/models"


async def send_problem(send: Send, problem: Problem, path: str) -> None:
    body = json.dumps(problem.to_dict(path)).encode()
    headers = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in problem.headers.items()]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BearerAuth:
    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _matches(self, token: bytes) -> bool:
        # Compare against every key so timing does not reveal which one matched.
        return any([hmac.compare_digest(token, key) for key in self.keys])

    def _authorized(self, scope: Scope) -> bool:
        cookie_allowed = scope["method"] in ("GET", "HEAD") and COOKIE_PATHS.match(scope["path"])
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return self._matches(value[7:].strip())
        if cookie_allowed:
            for name, value in scope.get("headers", []):
                if name == b"cookie":
                    for part in value.split(b";"):
                        key, _, token = part.strip().partition(b"=")
                        if key == KEY_COOKIE and token:
                            return self._matches(unquote_to_bytes(token))
        return False

    @staticmethod
    def _public(scope: Scope) -> bool:
        path = scope["path"]
        return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or self._public(scope) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        problem = Problem(
            401,
            "unauthorized",
            "Unauthorized",
            "this service requires 'Authorization: Bearer <key>' (MERGEPROBE_API_KEYS)",
            field="Authorization",
            headers={"WWW-Authenticate": 'Bearer realm="mergeprobe"'},
        )
        await send_problem(send, problem, scope["path"])


class BodyLimit:
    """Refuses JSON bodies over the cap, by Content-Length up front or while they stream.
    Model uploads have their own, much larger, cap in the library."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["path"] == UPLOAD_PATH and scope["method"] == "POST"):
            await self.app(scope, receive, send)
            return
        too_large = Problem(
            413,
            "request-too-large",
            "Request body too large",
            f"request bodies are limited to {self.max_bytes} bytes",
            field="body",
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await send_problem(send, too_large, scope["path"])
                return
        received = 0
        response_started = exceeded = replaced = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    # A Problem, so that the app's own handler answers if the route is reading the body.
                    raise too_large
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started, replaced
            if message["type"] == "http.response.start":
                response_started = True
                if exceeded and message["status"] != 413:
                    # FastAPI turns any error while it reads a body into 400 "There was an error
                    # parsing the body": answer what happened instead, and drop the app's body.
                    replaced = True
                    await send_problem(send, too_large, scope["path"])
                    return
            if not replaced:
                await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Problem as problem:
            if response_started or problem is not too_large:
                raise
            await send_problem(send, too_large, scope["path"])
