"""rq tasks: thin adapters between the queue and the engines.

rq hands over only a job id (JSON serializer); the job record in Redis says what to do.
"""

from __future__ import annotations

import errno
import importlib
import logging
import time
import traceback
from collections.abc import Callable
from functools import cache
from typing import Any

from rq.timeouts import JobTimeoutException

from mergeprobe.service.errors import MergeprobeError
from mergeprobe.service.jobs import problem_dict
from mergeprobe.service.kinds import KINDS, JobKind
from mergeprobe.service.logging import job_logging
from mergeprobe.service.problems import problem_of
from worker.context import JobCanceled, JobContext
from worker.runtime import get_runtime

log = logging.getLogger("mergeprobe.worker")


@cache
def engine_of(kind: JobKind) -> Callable[[JobContext], dict[str, Any]]:
    """The engine a kind names (`module:function`), imported on first use."""
    module, _, function = kind.engine.partition(":")
    return getattr(importlib.import_module(module), function)


def checked_result(kind: JobKind, result: dict[str, Any]) -> dict[str, Any]:
    """An engine's result as its kind's result model documents it (an engine returning another
    shape is a bug: the job fails instead of storing what clients are not told about)."""
    unknown = set(result) - set(kind.result_model.model_fields)
    if unknown:
        raise TypeError(f"the {kind.name} engine returned fields its result model lacks: {sorted(unknown)}")
    return kind.result_model.model_validate(result).model_dump(mode="json")


def run_job(job_id: str) -> str:
    """rq's entry point. Every log line the job produces in this thread carries its id and kind."""
    record = get_runtime().store.get(job_id)
    with job_logging(job_id, record["kind"] if record else None):
        log.info("job %s picked up", job_id)
        started = time.monotonic()
        outcome = _run_job(job_id)
        log.info("job %s %s after %.2f s", job_id, outcome, time.monotonic() - started)
        return outcome


def _run_job(job_id: str) -> str:
    runtime = get_runtime()
    store = runtime.store
    job = store.claim(job_id, runtime.name)
    if job is None:
        return "skipped"  # canceled (or deleted) while queued
    with runtime.lock:
        runtime.current_job_id = job_id
    kind = KINDS[job["kind"]]
    ctx: JobContext | None = None
    try:
        ctx = JobContext.from_job(
            job,
            kind,
            settings=runtime.settings,
            library=runtime.library,
            artifacts=runtime.artifacts,
            reporter=store,
        )
        result = checked_result(kind, engine_of(kind)(ctx))
    except JobCanceled:
        runtime.artifacts.remove_job(job_id)
        store.finish(
            job_id,
            "canceled",
            artifacts=[],
            error=problem_dict(
                409, "job-canceled", "Job canceled", "canceled while running; partial files removed"
            ),
        )
        return "canceled"
    except JobTimeoutException:
        runtime.artifacts.remove_job(job_id)
        timeout = kind.timeout_in(runtime.settings)
        detail = (
            f"the job ran longer than its {timeout} s limit for {job['kind']} jobs (MERGEPROBE_JOB_TIMEOUTS)"
        )
        store.finish(
            job_id, "failed", artifacts=[], error=problem_dict(504, "job-timeout", "Job timed out", detail)
        )
        return "failed"
    except MergeprobeError as error:
        runtime.artifacts.remove_job(job_id)
        warnings = ctx.warnings if ctx is not None else []
        store.finish(job_id, "failed", artifacts=[], error=problem_of(error).to_dict(), warnings=warnings)
        return "failed"
    except Exception as exc:  # noqa: BLE001 - any engine failure becomes the job's error
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        runtime.artifacts.remove_job(job_id)
        detail = f"{type(exc).__name__}: {exc}"
        error = _disk_full(exc) or problem_dict(500, "job-error", "Job failed", detail)
        store.finish(job_id, "failed", artifacts=[], error=error)
        return "failed"
    finally:
        runtime.library.release_leases()  # the job's models may leave this host's cache now
        with runtime.lock:
            runtime.current_job_id = None
    assert ctx is not None
    store.finish(job_id, "succeeded", result=result, artifacts=ctx.artifacts, warnings=ctx.warnings)
    return "succeeded"


def _disk_full(exc: BaseException) -> dict | None:
    """The problem for a job that ran out of disk (ENOSPC, EDQUOT), also when wrapped by a library."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {seen.filename}" if seen.filename else ""
            detail = (
                f"no space left on the device{where}; partial files were removed. Free space in "
                "the artifacts or models directory (MERGEPROBE_ARTIFACTS_DIR, MERGEPROBE_MODELS_DIR) "
                "and submit the job again"
            )
            return problem_dict(507, "disk-full", "No space left on device", detail)
        seen = seen.__cause__ or seen.__context__
    return None
