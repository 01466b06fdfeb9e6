"""The objects a request handler needs, built once per app."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from fastapi import Request

from mergeprobe.checkpoints.library import ModelLibrary, open_library
from mergeprobe.service.artifacts import ArtifactStore
from mergeprobe.service.jobs import JobStore
from mergeprobe.service.settings import Settings


@dataclass
class AppState:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    library: ModelLibrary
    artifacts: ArtifactStore

    @classmethod
    def build(cls, settings: Settings) -> AppState:
        if not settings.redis_url:
            raise RuntimeError(
                "REDIS_URL is not set (`mergeprobe serve` starts an embedded Redis when it is unset)"
            )
        connection = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=15
        )
        return cls(
            settings=settings,
            redis=connection,
            store=JobStore(connection, settings),
            library=open_library(settings, connection),
            artifacts=ArtifactStore(settings),
        )


async def get_state(request: Request) -> AppState:
    # async: FastAPI runs a plain `def` dependency in the thread pool, one hop per request for nothing.
    return request.app.state.mergeprobe
