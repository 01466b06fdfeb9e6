import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.downloads import (
    ZIP_MEDIA_TYPE,
    add_download_routes,
    artifact_download,
    binary_content,
    content_disposition,
    download_response,
    zip_stream,
)
from app.openapi_docs import REDIS_UNAVAILABLE, SSE_EVENT
from app.schemas import JOB_MODELS, Job, JobList, NamedJobStatus, ProblemModel, job_json
from app.state import AppState, get_state
from mergeprobe.service.jobs import FINAL_STATUSES, body_fingerprint
from mergeprobe.service.kinds import KINDS, JobKind
from mergeprobe.service.problems import Problem

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=REDIS_UNAVAILABLE)
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ProblemModel, "description": "Invalid request (field and position named)"},
    404: {"model": ProblemModel},
    409: {"model": ProblemModel, "description": "Idempotency-Key reused with another body"},
    422: {"model": ProblemModel, "description": "Request does not match the schema"},
    429: {
        "model": ProblemModel,
        "description": "Queue full: MERGEPROBE_MAX_QUEUED jobs are waiting",
        "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    },
}
_SSE_POLL = 0.25
_SSE_KEEPALIVE = 15.0


def _admit(state: AppState = Depends(get_state)) -> None:
    """Backpressure, before the body is validated or any model is read: 429 when the queue is full."""
    state.store.check_capacity()


def _submit_handler(kind: JobKind):
    model: type[BaseModel] = kind.request_model

    def submit(
        body: model,  # type: ignore[valid-type]
        response: Response,
        idempotency_key: str | None = Header(
            default=None,
            max_length=255,
            description="Repeat a submission safely: the same key and body return the first job; another body is a 409.",
        ),
        state: AppState = Depends(get_state),
    ) -> dict:
        request = body.model_dump(mode="json")
        idempotency = (idempotency_key, body_fingerprint(kind.name, request)) if idempotency_key else None
        inputs = kind.prepare(body, state.library).model_dump(mode="json")
        job, created = state.store.create(
            kind.name, request, inputs, idempotency, timeout=kind.timeout_in(state.settings)
        )
        response.status_code = 202 if created else 200
        response.headers["Location"] = f"/v1/jobs/{job['id']}"
        return job

    submit.__name__ = f"submit_{kind.name}"
    return submit


for _kind in KINDS.values():
    router.add_api_route(
        f"/{_kind.name}",
        _submit_handler(_kind),
        methods=["POST"],
        status_code=202,
        response_model=JOB_MODELS[_kind.name],
        summary=_kind.summary,
        description=_kind.description
        + "\n\nAnswers 202 with `Location: /v1/jobs/{id}`; 200 when an Idempotency-Key replays an earlier submission.",
        responses={
            200: {
                "model": JOB_MODELS[_kind.name],
                "description": "An Idempotency-Key replay: the job first created with this key and body",
            },
            **_ERRORS,
        },
        operation_id=f"submit{JOB_MODELS[_kind.name].__name__}",  # submitMergeJob, submitLoraExtractJob
        dependencies=[Depends(_admit)],
    )


@router.post("/{kind}", include_in_schema=False)
def submit_unknown_kind(kind: str) -> None:
    raise Problem(
        404,
        "unknown-job-kind",
        "Unknown job kind",
        f"no job kind {kind!r}; known: {', '.join(KINDS)}",
        field="kind",
    )


@router.get("", response_model=JobList, summary="Jobs, newest first", operation_id="listJobs")
def list_jobs(
    kind: str | None = Query(default=None, description="Only jobs of this kind.", examples=["inspect"]),
    status: NamedJobStatus | None = Query(default=None, description="Only jobs in this status."),
    cursor: str | None = Query(
        default=None, pattern="^[0-9a-f]{24}$", description="`next_cursor` of the previous page."
    ),
    limit: int = Query(default=50, ge=1, le=500),
    state: AppState = Depends(get_state),
) -> JSONResponse:
    jobs, next_cursor = state.store.list(kind=kind, status=status, cursor=cursor, limit=limit)
    # Answered through `job_json`, not validated as the documented union (see StoredJob).
    return JSONResponse({"jobs": [job_json(job) for job in jobs], "next_cursor": next_cursor})


@router.get(
    "/{id}",
    response_model=Job,
    summary="One job",
    responses={404: {"model": ProblemModel}},
    operation_id="getJob",
)
def get_job(id: str, state: AppState = Depends(get_state)) -> JSONResponse:
    return JSONResponse(job_json(state.store.require(id)))


@router.delete(
    "/{id}",
    response_model=Job,
    status_code=202,
    summary="Cancel a job",
    description="A queued job is canceled at once; a running one is asked to stop and ends within about a "
    "second, its partial files removed. Finished jobs are returned unchanged.",
    responses={404: {"model": ProblemModel}},
    operation_id="cancelJob",
)
def cancel_job(id: str, state: AppState = Depends(get_state)) -> JSONResponse:
    return JSONResponse(job_json(state.store.cancel(id)), status_code=202)


@router.get(
    "/{id}/events",
    summary="Progress as Server-Sent Events",
    description="An `event: job` carrying the job JSON whenever it changes, then `event: end` once it is "
    "succeeded, failed or canceled. Comments keep the connection alive.",
    responses={
        200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}},
        404: {"model": ProblemModel},
    },
    response_class=StreamingResponse,
    operation_id="streamJobEvents",
)
async def job_events(id: str, request: Request, state: AppState = Depends(get_state)) -> StreamingResponse:
    await run_in_threadpool(state.store.require, id)

    async def stream() -> AsyncIterator[str]:
        last = None
        idle = 0.0
        while not await request.is_disconnected():
            job = await run_in_threadpool(state.store.get, id)
            if job is None:
                return
            encoded = json.dumps(job)
            if encoded != last:
                last, idle = encoded, 0.0
                yield f"event: job\ndata: {encoded}\n\n"
            if job["status"] in FINAL_STATUSES:
                yield "event: end\ndata: {}\n\n"
                return
            await asyncio.sleep(_SSE_POLL)
            idle += _SSE_POLL
            if idle >= _SSE_KEEPALIVE:
                idle = 0.0
                yield ": keepalive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def get_artifact(id: str, name: str, request: Request, state: AppState = Depends(get_state)) -> Response:
    job = state.store.require(id)
    record = next((a for a in job["artifacts"] if a["name"] == name), None)
    state.artifacts.path_of(id, name)  # validates the name
    if record is None:
        raise Problem(
            404, "unknown-artifact", "Unknown artifact", f"job {id} has no artifact {name!r}", field="name"
        )
    return download_response(artifact_download(state.artifacts, id, record), request)


add_download_routes(
    router,
    "/{id}/artifacts/{name}",
    get_artifact,
    name="Artifact",
    summary="Download an artifact",
    description="Supports Range requests (several ranges answer multipart/byteranges); the ETag is the "
    "artifact's sha256 (If-None-Match answers 304). With `MERGEPROBE_ARTIFACTS_BACKEND=s3` and "
    "`MERGEPROBE_S3_DOWNLOADS=redirect` the answer is a 307 to a presigned URL of the object store, which then "
    "serves the bytes and ranges itself.",
    media_type="*/*",
    what="The artifact, with the media type of its record (text/csv, image/png, …)",
)


@router.get(
    "/{id}/artifacts.zip",
    operation_id="downloadArtifactsZip",
    summary="Download all of a job's artifacts as one zip",
    description="Every artifact the job lists, as one zip streamed while the artifacts are read (nothing is "
    "built in memory or on disk first), entries named by artifact name: CSV and JSON deflated, the others "
    "(PNG, GIF, safetensors) stored; entries over 4 GiB are zip64. Artifacts are listed once a job has "
    "succeeded: for a job still queued or running, failed or canceled the zip is empty (a valid archive "
    "with no entries).",
    responses={
        200: {
            "description": "The zip, as `Content-Type: application/zip`",
            "content": binary_content(ZIP_MEDIA_TYPE),
            "headers": {
                "Content-Disposition": {
                    "description": '`attachment; filename="<job id>-artifacts.zip"`',
                    "schema": {"type": "string"},
                }
            },
        },
        404: {"model": ProblemModel},
    },
    response_class=StreamingResponse,
)
def get_artifacts_zip(id: str, state: AppState = Depends(get_state)) -> StreamingResponse:
    job = state.store.require(id)
    downloads = [artifact_download(state.artifacts, id, record) for record in job["artifacts"]]
    # Checked before the 200 goes out: a missing artifact is a 404, not a zip cut off midway.
    for download in downloads:
        if not download.exists():
            raise download.missing
    # Entries dated when the job finished: the same job gives the same archive every time.
    modified = datetime.fromisoformat(job["finished_at"] or job["created_at"])
    return StreamingResponse(
        zip_stream(downloads, modified),
        media_type=ZIP_MEDIA_TYPE,
        headers={"Content-Disposition": content_disposition(f"{id}-artifacts.zip")},
    )
