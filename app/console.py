"""The browser console: `/` and its files under /static/console (plain ES modules, no build step,
nothing from a CDN). The page and its files hold nothing secret and load without a key, so that a
key can be entered; every API call the console makes carries it (app/middleware.py).

`/v1/console/session` gives the console the HttpOnly download cookie (POST) and takes it back
(DELETE); see app/middleware.py for what the cookie is and what it may do."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse

from app.docs_ui import DocsAssets
from app.middleware import DOWNLOAD_COOKIE, DOWNLOAD_TOKEN_SECONDS, download_token
from mergeprobe.service.settings import Settings

CONSOLE_DIR = Path(__file__).resolve().parent / "static" / "console"
CONSOLE_PATH = "/static/console"

SESSION_PATH = "/v1/console/session"


def console_csp(settings: Settings | None = None) -> str:
    """Everything the console loads is its own: scripts and styles from its files (no inline
    style: the scripts change styles through the CSSOM only, which CSP does not govern), images
    from the API (artifacts) or drawn in the page, requests to the API only. With S3 downloads by
    redirect, artifacts (<img>) come from the bucket's endpoint: its origin is allowed for images."""
    img = "'self' data: blob:"
    s3 = settings is not None and "s3" in (settings.artifacts_backend, settings.library_backend)
    if s3 and settings.s3_downloads == "redirect":
        parts = urlsplit(settings.s3_public_endpoint_url or settings.s3_endpoint_url or "")
        # No endpoint: AWS itself, at a bucket- and region-specific host.
        img += f" {parts.scheme}://{parts.netloc}" if parts.netloc else " https://*.amazonaws.com"
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        f"img-src {img}; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )


CONSOLE_CSP = console_csp()


class ConsoleAssets(DocsAssets):
    """The console's files, with the docs' fixed media types (and HTML's), revalidated on every use."""

    def __init__(self, *args, csp: str = CONSOLE_CSP, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.csp = csp

    def file_response(self, full_path, stat_result, scope, status_code=200):  # type: ignore[no-untyped-def]
        response = super().file_response(full_path, stat_result, scope, status_code)
        if response.status_code != 304 and str(full_path).endswith(".html"):
            response.headers["content-type"] = "text/html; charset=utf-8"
        response.headers["content-security-policy"] = self.csp
        return response


def _bearer_key(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    return value[7:].strip() if value[:7].lower() == "bearer " else None


def _cookie_path(request: Request) -> str:
    return f"{request.scope.get('root_path', '').rstrip('/')}/v1/"


def install_console(app: FastAPI) -> None:
    settings: Settings | None = getattr(getattr(app.state, "mergeprobe", None), "settings", None)
    csp = console_csp(settings)
    app.mount(CONSOLE_PATH, ConsoleAssets(directory=CONSOLE_DIR, csp=csp), name="console-assets")

    @app.get("/", include_in_schema=False)
    def console() -> FileResponse:
        return FileResponse(
            CONSOLE_DIR / "index.html",
            media_type="text/html; charset=utf-8",
            headers={
                "cache-control": "no-cache",
                "content-security-policy": csp,
                "x-content-type-options": "nosniff",
                "referrer-policy": "no-referrer",
            },
        )

    # Behind the key like every /v1 route (app/middleware.py): only a caller that has a key gets
    # a cookie, derived from that key. Without MERGEPROBE_API_KEYS there is nothing to derive from
    # and nothing needed: no cookie.
    @app.post(SESSION_PATH, include_in_schema=False, status_code=204)
    def start_session(request: Request) -> Response:
        response = Response(status_code=204)
        key = _bearer_key(request)
        if key:
            expiry = int(time.time()) + DOWNLOAD_TOKEN_SECONDS
            response.set_cookie(
                DOWNLOAD_COOKIE,
                download_token(key, expiry),
                max_age=DOWNLOAD_TOKEN_SECONDS,
                path=_cookie_path(request),
                secure=request.url.scheme == "https",
                httponly=True,
                samesite="strict",
            )
        return response

    # An HttpOnly cookie can only be removed by the server: "Forget key" asks for it here.
    @app.delete(SESSION_PATH, include_in_schema=False, status_code=204)
    def end_session(request: Request) -> Response:
        response = Response(status_code=204)
        response.delete_cookie(
            DOWNLOAD_COOKIE,
            path=_cookie_path(request),
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response
