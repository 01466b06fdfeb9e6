"""ASGI middleware: bearer-token auth and a cap on request bodies."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time

from starlette._utils import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mergeprobe.service.problems import PROBLEM_MEDIA_TYPE, Problem

# The one route a load balancer or orchestrator probes without credentials, and the browser
# console's page (app/console.py): it holds nothing secret and must load for a key to be entered.
# /docs and /redoc with their assets hold nothing secret either; the pages add the console's key
# to their own requests (app/docs_ui.py), /openapi.json itself stays behind the key.
PUBLIC_PATHS = frozenset({"/healthz", "/", "/docs", "/redoc"})
PUBLIC_PREFIXES = ("/static/console/", "/static/docs/")
# What the browser fetches by itself, and no script can add a header to: model files and
# artifacts (<a download>, <img>). The console gets an HttpOnly cookie for them from
# POST /v1/console/session (app/console.py): never the key itself (cookies are not isolated by
# port, any other app on this host could read a script-readable one), but a token derived from
# it that expires, `<expiry>.<HMAC-SHA256(key, "mergeprobe-download:<expiry>")>`. It is accepted
# for these routes only, and only for GET and HEAD: it can neither change nor list anything.
DOWNLOAD_COOKIE = "mergeprobe_download"
DOWNLOAD_TOKEN_SECONDS = 12 * 3600
COOKIE_PATHS = re.compile(r"/v1/(models/[^/]+/file|jobs/[^/]+/artifacts/[^/]+|jobs/[^/]+/artifacts\.zip)")
UPLOAD_PATH = "/v1/models"


def download_token(key: str | bytes, expiry: int) -> str:
    """The download cookie's value for `key`, valid until `expiry` (Unix seconds)."""
    raw = key.encode() if isinstance(key, str) else key
    mac = hmac.new(raw, f"mergeprobe-download:{expiry}".encode(), hashlib.sha256).hexdigest()
    return f"{expiry}.{mac}"


def route_path(scope: Scope) -> str:
    """The path the app routes on: without the root path (`--root-path`, a proxy's prefix)."""
    return get_route_path(scope)


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

    def _valid_download_token(self, token: bytes) -> bool:
        expiry, _, mac = token.partition(b".")
        if not expiry.isdigit() or len(expiry) > 12 or int(expiry) <= time.time():
            return False
        expected = [download_token(key, int(expiry)).encode() for key in self.keys]
        return any([hmac.compare_digest(token, e) for e in expected])

    def _authorized(self, scope: Scope) -> bool:
        path = route_path(scope)
        cookie_allowed = scope["method"] in ("GET", "HEAD") and COOKIE_PATHS.fullmatch(path)
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return self._matches(value[7:].strip())
        if cookie_allowed:
            for name, value in scope.get("headers", []):
                if name == b"cookie":
                    for part in value.split(b";"):
                        key, _, token = part.strip().partition(b"=")
                        if key == DOWNLOAD_COOKIE.encode() and token and self._valid_download_token(token):
                            return True
        return False

    @staticmethod
    def _public(scope: Scope) -> bool:
        path = route_path(scope)
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
        if scope["type"] != "http" or (route_path(scope) == UPLOAD_PATH and scope["method"] == "POST"):
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
