from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.schemas import ModelInfoModel, ModelList, ProblemModel
from app.state import AppState, get_state

router = APIRouter(prefix="/v1/models", tags=["models"])
_ERRORS = {400: {"model": ProblemModel}, 404: {"model": ProblemModel}}


@router.get("", response_model=ModelList, summary="Models in the library")
def list_models(state: AppState = Depends(get_state)) -> dict:
    return {"models": [m.to_dict() for m in state.library.list()]}


@router.get("/{id}", response_model=ModelInfoModel, summary="One model", responses=_ERRORS)
def get_model(id: str, state: AppState = Depends(get_state)) -> dict:
    return state.library.info(state.library.resolve(id, field="id")).to_dict()


@router.post(
    "",
    status_code=201,
    response_model=ModelInfoModel,
    summary="Upload a model (raw body)",
    description=(
        "The body is the file itself (`curl --data-binary @model.safetensors`), streamed to disk while it is "
        "hashed and capped at MERGEPROBE_MAX_UPLOAD_BYTES; then its header is validated (.ckpt pickles are "
        "read by a restricted unpickler: nothing in them runs) and it is moved into the library."
    ),
    responses={**_ERRORS, 409: {"model": ProblemModel}, 413: {"model": ProblemModel}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload_model(
    request: Request,
    response: Response,
    name: str = Query(
        description="File name in the library, ending .safetensors or .ckpt.",
        examples=["my-merge.safetensors"],
    ),
    state: AppState = Depends(get_state),
) -> dict:
    length = request.headers.get("content-length")
    info = await state.library.store_upload(
        name, request.stream(), int(length) if length and length.isdigit() else None
    )
    response.headers["Location"] = f"/v1/models/{info.id}"
    return info.to_dict()


@router.delete("/{id}", status_code=204, summary="Delete a model", responses=_ERRORS)
async def delete_model(id: str, state: AppState = Depends(get_state)) -> Response:
    await run_in_threadpool(state.library.delete, id)
    return Response(status_code=204)
