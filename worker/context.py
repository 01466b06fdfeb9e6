"""What an engine sees of its job: progress, cancel, artifacts, warnings. No HTTP, no rq."""

from __future__ import annotations

import time
from typing import Any

from mergeprobe.artifacts import ArtifactStore
from mergeprobe.jobs import JobStore
from mergeprobe.library import ModelLibrary

_PROGRESS_EVERY = 0.25  # seconds between progress writes
_CANCEL_POLL_EVERY = 0.2  # seconds between looks at the cancel flag


class JobCanceled(Exception):
    pass


class JobContext:
    def __init__(self, job: dict, store: JobStore, library: ModelLibrary, artifacts: ArtifactStore) -> None:
        self.job = job
        self.job_id: str = job["id"]
        self.request: dict[str, Any] = job["request"]
        self.inputs: dict[str, Any] = job.get("inputs") or {}
        self.store = store
        self.library = library
        self.artifact_store = artifacts
        self.artifacts: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self._last_progress = 0.0
        self._last_cancel_poll = 0.0

    def progress(self, completed: int, total: int, stage: str) -> None:
        now = time.monotonic()
        if completed >= total or now - self._last_progress >= _PROGRESS_EVERY:
            self._last_progress = now
            self.store.set_progress(self.job_id, completed, total, stage)

    def check_cancel(self) -> None:
        """Engines call this between tensors or sampler steps; cheap between polls."""
        now = time.monotonic()
        if now - self._last_cancel_poll < _CANCEL_POLL_EVERY:
            return
        self._last_cancel_poll = now
        if self.store.cancel_requested(self.job_id):
            raise JobCanceled(self.job_id)

    def write_artifact(self, name: str, data: bytes, media_type: str) -> dict[str, Any]:
        record = self.artifact_store.write_bytes(self.job_id, name, data, media_type)
        self.artifacts.append(record)
        return record

    def warn(self, message: str) -> None:
        self.warnings.append(message)
