from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.downloads import MODEL_MEDIA_TYPE, add_download_routes, download_response, model_download
from app.schemas import ModelInfoModel, ModelList, ProblemModel
from app.state import AppState, get_state
from mergeprobe.checkpoints.library import ModelInfo
from mergeprobe.service.errors import Conflict
from mergeprobe.service.kinds import model_file_url, model_url

router = APIRouter(prefix="/v1/models", tags=["models"])
_ERRORS = {400: {"model": ProblemModel}, 404: {"model": ProblemModel}}


def _described(info: ModelInfo) -> dict:
    """A model as the API shows it: what the library knows, and where to download its file."""
    return {**info.to_dict(), "download_url": model_file_url(info.id)}


@router.get("", response_model=ModelList, summary="Models in the library", operation_id="listModels")
def list_models(state: AppState = Depends(get_state)) -> dict:
    return {"models": [_described(m) for m in state.library.list()]}


@router.get(
    "/{id}", response_model=ModelInfoModel, summary="One model", responses=_ERRORS, operation_id="getModel"
)
def get_model(id: str, state: AppState = Depends(get_state)) -> dict:
    return _described(state.library.lookup(id, field="id").info())


def get_model_file(id: str, request: Request, state: AppState = Depends(get_state)) -> Response:
    entry = state.library.lookup(id, field="id")
    return download_response(model_download(state.library, entry), request)


add_download_routes(
    router,
    "/{id}/file",
    get_model_file,
    name="ModelFile",
    summary="Download a model's file",
    description="The checkpoint itself (.safetensors or .ckpt), as `Content-Disposition: attachment` with its "
    "name. Supports Range requests (several ranges answer multipart/byteranges); the ETag is the model's "
    "sha256 (If-None-Match answers 304). With `MERGEPROBE_LIBRARY_BACKEND=s3` the API streams the object, or "
    "with `MERGEPROBE_S3_DOWNLOADS=redirect` answers a 307 to a presigned URL of the object store, which then "
    "serves the bytes and ranges itself.",
    media_type=MODEL_MEDIA_TYPE,
    what="The model's file",
)


@router.post(
    "",
    status_code=201,
    response_model=ModelInfoModel,
    summary="Upload a model (raw body)",
    operation_id="uploadModel",
    description=(
        "The body is the file itself (`curl --data-binary @model.safetensors`), streamed to the library's "
        "storage while it is hashed and capped at MERGEPROBE_MAX_UPLOAD_BYTES; then its header is validated "
        "(.ckpt pickles are read by a restricted unpickler: nothing in them runs) and it is added under `name`. "
        "A name whose id (the name without its extension) is another model's id or name, or looks like a "
        "hash, is refused: lookups by name, id, sha256 and short hash never find the wrong model. LoRA files "
        "(kohya LoRA/LoCon, LyCORIS LoHa/LoKr, DoRA, PEFT) are stored as `kind: lora`, described, and refused "
        "when their architecture cannot be told or none of their modules can be applied."
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
    entry = await state.library.store_upload(
        name, request.stream(), int(length) if length and length.isdigit() else None
    )
    response.headers["Location"] = model_url(entry.id)
    return _described(entry.info())


@router.delete(
    "/{id}",
    status_code=204,
    summary="Delete a model",
    operation_id="deleteModel",
    description="A model that a queued or running job reads (or writes) cannot be deleted: 409 naming the jobs.",
    responses={**_ERRORS, 409: {"model": ProblemModel}},
)
async def delete_model(id: str, state: AppState = Depends(get_state)) -> Response:
    def delete() -> None:
        entry = state.library.lookup(id, field="id")
        jobs = state.store.active_jobs_using(entry.sha256)
        if jobs:
            shown = ", ".join(jobs[:10]) + (f" and {len(jobs) - 10} more" if len(jobs) > 10 else "")
            raise Conflict(
                "model-in-use",
                "Model in use",
                f"{entry.name} is used by {len(jobs)} queued or running job(s): {shown}; cancel them or wait "
                "for them to end, then delete it",
                field="id",
            )
        state.library.delete(entry.name)

    await run_in_threadpool(delete)
    return Response(status_code=204)
