"""The HTTP front end. It validates, enqueues and answers; it never imports torch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.console import install_console
from app.docs_ui import install_docs
from app.errors import install_error_handlers
from app.middleware import BearerAuth, BodyLimit
from app.openapi_docs import document_problems
from app.routes import archs, health, jobs, metrics, models, plans
from app.state import AppState
from mergeprobe.service.settings import Settings

log = logging.getLogger("mergeprobe.api")
_REAP_EVERY = 5.0

DESCRIPTION = """
mergeprobe merges Stable Diffusion checkpoints block by block and probes what each U-Net block does.

Jobs are submitted with `POST /v1/jobs/{kind}`, run by GPU workers from a Redis queue, and
their artifacts are served back by URL. Every error is RFC 9457 `application/problem+json`
naming the request field at fault (and, inside a spec string, the character position).

Blocks: sd1/sd2 have BASE (text encoder and VAE) plus IN00–IN11, M00, OUT00–OUT11; sdxl has
BASE plus IN00–IN08, M00, OUT00–OUT08.
"""


async def _reap_lost_jobs(state: AppState) -> None:
    """Fail jobs of dead workers even when no other worker is left to notice."""
    while True:
        try:
            for job_id in await asyncio.to_thread(state.store.reap_lost):
                await asyncio.to_thread(state.artifacts.remove_job, job_id)  # what the dead worker left
                await asyncio.to_thread(state.library.remove_partials, job_id)  # half-written models
        except Exception:  # noqa: BLE001 - Redis may be down for a while; keep trying
            log.debug("reaper: redis unavailable", exc_info=True)
        await asyncio.sleep(_REAP_EVERY)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    settings.ensure_dirs()
    state = AppState.build(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for path in await asyncio.to_thread(state.library.sweep_abandoned_uploads):
            log.warning("removed %s, the temp file of an upload cut off by a crash", path.name)
        reaper = asyncio.create_task(_reap_lost_jobs(state))
        try:
            yield
        finally:
            reaper.cancel()

    app = FastAPI(
        title="mergeprobe",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's own pages load Swagger UI and ReDoc from a CDN; these serve them from the package.
        docs_url=None,
        redoc_url=None,
    )
    app.state.mergeprobe = state
    install_error_handlers(app)
    install_docs(app)
    install_console(app)
    for router in (health.router, metrics.router, archs.router, models.router, jobs.router, plans.router):
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(BearerAuth, keys=settings.api_key_list)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Required when MERGEPROBE_API_KEYS is set.",
                }
            }
            schema["security"] = [{"bearer": []}, {}]
            app.openapi_schema = document_problems(schema)
        return app.openapi_schema

    app.openapi = openapi
    return app
