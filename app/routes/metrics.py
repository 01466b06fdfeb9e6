from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from app.schemas import ProblemModel
from app.state import AppState, get_state
from mergeprobe.service.kinds import KINDS
from mergeprobe.service.metrics import CONTENT_TYPE, render

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    operation_id="getMetrics",
    description="Prometheus text format: jobs by kind and status, queue depth and limit, live and busy "
    "workers, job durations by kind (histogram), bytes merges read and wrote, submissions refused "
    "for a full queue. The numbers live in Redis, so every API process answers the same. Needs a key "
    "like every route but `/healthz` when MERGEPROBE_API_KEYS is set.",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}, "description": "The metrics"},
        503: {"model": ProblemModel, "description": "Redis unreachable"},
    },
)
def metrics(state: AppState = Depends(get_state)) -> Response:
    return Response(render(state.store.metrics(tuple(KINDS))), media_type=CONTENT_TYPE)
