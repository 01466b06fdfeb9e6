from __future__ import annotations

from fastapi import APIRouter, Depends

from app.schemas import Health, ProblemModel
from app.state import AppState, get_state
from mergeprobe.service.problems import Problem

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The API process is up", operation_id="getHealth")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Redis reachable and at least one live worker",
    operation_id="getReadiness",
    responses={503: {"model": ProblemModel, "description": "Not ready"}},
)
def readyz(state: AppState = Depends(get_state)) -> Health:
    state.redis.ping()
    workers = len(state.store.live_workers())
    if workers == 0:
        raise Problem(
            503,
            "no-workers",
            "Not ready",
            "no live worker is attached to the queue",
            headers={"Retry-After": "5"},
        )
    return Health(status="ok", workers=workers, queued=state.store.queue_depth())
