"""Per-process state of a worker: settings, connections and the job now running.

Built once per worker process, so loaded models and connections are reused between jobs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cache

import redis

from mergeprobe.checkpoints.library import ModelLibrary, open_library
from mergeprobe.service.artifacts import ArtifactStore
from mergeprobe.service.jobs import JobStore
from mergeprobe.service.settings import Settings


@dataclass
class WorkerRuntime:
    settings: Settings
    store: JobStore
    library: ModelLibrary
    artifacts: ArtifactStore
    name: str = "worker"
    current_job_id: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def connect(settings: Settings) -> redis.Redis:
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set: a worker needs the Redis the API uses")
    return redis.Redis.from_url(settings.redis_url, health_check_interval=30)


@cache
def get_runtime() -> WorkerRuntime:
    settings = Settings()
    settings.ensure_dirs()
    connection = connect(settings)
    return WorkerRuntime(
        settings=settings,
        store=JobStore(connection, settings),
        library=open_library(settings, connection),
        artifacts=ArtifactStore(settings),
    )
