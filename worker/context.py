"""What an engine sees of its job: typed request and inputs, settings, progress, cancel,
artifacts, warnings. No HTTP, no rq: the runtime comes in, so an engine runs as well in-process
(tests, benchmarks: `JobContext.local`) as in a worker."""

from __future__ import annotations

import secrets
import time
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from mergeprobe.checkpoints.library import ModelLibrary
from mergeprobe.service.artifacts import ArtifactStore
from mergeprobe.service.errors import Conflict
from mergeprobe.service.kinds import JobKind
from mergeprobe.service.settings import Settings

_PROGRESS_EVERY = 0.25  # seconds between progress writes
_CANCEL_POLL_EVERY = 0.2  # seconds between looks at the cancel flag


class JobCanceled(Exception):
    pass


class JobReporter(Protocol):
    """Where a running job reports to: the job store in a worker, memory in-process."""

    def set_progress(self, job_id: str, completed: int, total: int, stage: str) -> None: ...

    def cancel_requested(self, job_id: str) -> bool: ...

    def add_counter(self, name: str, value: float) -> None: ...


class LocalReporter:
    """A reporter for engines run in-process: keeps the last progress and the counters; `cancel()`
    makes the engine stop at its next check, as a cancel flag in Redis does."""

    def __init__(self) -> None:
        self.progress: tuple[int, int, str] | None = None
        self.counters: dict[str, float] = {}
        self.canceled = False

    def set_progress(self, job_id: str, completed: int, total: int, stage: str) -> None:
        self.progress = (completed, total, stage)

    def cancel_requested(self, job_id: str) -> bool:
        return self.canceled

    def cancel(self) -> None:
        self.canceled = True

    def add_counter(self, name: str, value: float) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + value


class JobContext:
    def __init__(
        self,
        *,
        job_id: str,
        kind: JobKind,
        request: BaseModel,
        inputs: BaseModel,
        settings: Settings,
        library: ModelLibrary,
        artifacts: ArtifactStore,
        reporter: JobReporter,
    ) -> None:
        self.job_id = job_id
        self.kind = kind
        self.request: Any = request  # kind.request_model, validated by the API
        self.inputs: Any = inputs  # kind.inputs_model: models pinned to their sha256
        self.settings = settings
        self.library = library
        self.artifact_store = artifacts
        self.reporter = reporter
        self.artifacts: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self._last_progress = 0.0
        self._last_cancel_poll = 0.0

    @classmethod
    def from_job(cls, job: dict[str, Any], kind: JobKind, **runtime: Any) -> JobContext:
        """The context of a stored job: its request and inputs as the API accepted them."""
        try:
            request = kind.request_model.model_validate(job["request"])
            inputs = kind.inputs_model.model_validate(job["inputs"])
        except ValidationError as exc:
            # A job queued by an older version (before inputs were pinned, say) is not run on guesses.
            raise Conflict(
                "job-outdated",
                "Job from an older version",
                f"this {kind.name} job was accepted by a mergeprobe version whose job records this worker "
                f"cannot read ({exc.error_count()} mismatches); submit it again",
            ) from exc
        return cls(job_id=job["id"], kind=kind, request=request, inputs=inputs, **runtime)

    @classmethod
    def local(
        cls,
        kind: JobKind,
        request: BaseModel,
        *,
        settings: Settings,
        library: ModelLibrary,
        artifacts: ArtifactStore | None = None,
        reporter: JobReporter | None = None,
    ) -> JobContext:
        """A context for running an engine in-process, without Redis or a queue: the request is
        prepared (validated and pinned) exactly as the API prepares it."""
        return cls(
            job_id=secrets.token_hex(12),
            kind=kind,
            request=request,
            inputs=kind.prepare(request, library),
            settings=settings,
            library=library,
            artifacts=artifacts or ArtifactStore(settings),
            reporter=reporter or LocalReporter(),
        )

    def progress(self, completed: int, total: int, stage: str) -> None:
        now = time.monotonic()
        # total 0 (not known yet: a download without a Content-Length) is throttled like any other.
        if 0 < total <= completed or now - self._last_progress >= _PROGRESS_EVERY:
            self._last_progress = now
            self.reporter.set_progress(self.job_id, completed, total, stage)

    def check_cancel(self) -> None:
        """Engines call this between tensors or sampler steps; cheap between polls."""
        now = time.monotonic()
        if now - self._last_cancel_poll < _CANCEL_POLL_EVERY:
            return
        self._last_cancel_poll = now
        if self.reporter.cancel_requested(self.job_id):
            raise JobCanceled(self.job_id)

    def add_counter(self, name: str, value: float) -> None:
        self.reporter.add_counter(name, value)

    def write_artifact(self, name: str, data: bytes, media_type: str) -> dict[str, Any]:
        record = self.artifact_store.write_bytes(self.job_id, name, data, media_type)
        self.artifacts.append(record)
        return record

    def warn(self, message: str) -> None:
        self.warnings.append(message)
