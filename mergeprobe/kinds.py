"""Job kinds: the request schema of each kind and its validation against the model
library, done by the API before anything is queued. Engines live in worker/engines.

To add a kind: a request model, a `prepare` function returning the inputs the
engine needs (resolved file names), an entry in KINDS here, and an engine in
worker/engines registered in worker/tasks.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mergeprobe.archs import UNKNOWN, detect_arch
from mergeprobe.library import ModelLibrary
from mergeprobe.problems import Problem


class InspectRequest(BaseModel):
    """Per-block statistics of one model: what users read before choosing block weights."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"model": "tiny-sd1-a"}]})

    model: str = Field(description="Model id, file name, short hash or sha256 from the library.", examples=["tiny-sd1-a"])


class BlockStats(BaseModel):
    block: str = Field(description="BASE, INnn, M00 or OUTnn.", examples=["IN04"])
    params: int = Field(description="Number of parameters (elements) in the block.", examples=[1234])
    tensors: int = Field(description="Number of tensors in the block.", examples=[12])
    mean_abs: float | None = Field(description="Mean |w| over the block's floating-point parameters.", examples=[0.021])
    dtypes: dict[str, int] = Field(description="Tensor count per safetensors dtype.", examples=[{"F16": 12}])


class InspectResult(BaseModel):
    model: str = Field(description="File name of the inspected model.", examples=["tiny-sd1-a.safetensors"])
    arch: str = Field(description="Detected architecture.", examples=["sd1"])
    total_params: int = Field(examples=[1_066_235_307])
    blocks: list[BlockStats] = Field(description="BASE first, then the U-Net blocks in U-Net order.")


def prepare_inspect(request: InspectRequest, library: ModelLibrary) -> dict[str, Any]:
    path = library.resolve(request.model, field="model")
    header = library.header(path, field="model")
    arch = detect_arch(header.tensors)
    if arch == UNKNOWN:
        raise Problem(
            400,
            "unknown-architecture",
            "Unknown architecture",
            f"{path.name}: its keys match none of sd1, sd2, sdxl, so it has no block table",
            field="model",
        )
    return {"model": path.name, "arch": arch}


@dataclass(frozen=True)
class JobKind:
    name: str
    summary: str
    description: str
    request_model: type[BaseModel]
    result_model: type[BaseModel]
    prepare: Callable[[Any, ModelLibrary], dict[str, Any]]


KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        JobKind(
            name="inspect",
            summary="Inspect a model block by block",
            description=(
                "For every block of the model's architecture (BASE, IN00…, M00, OUT00…), the parameter "
                "count, the tensor count, mean |w| over floating-point parameters and the dtypes. "
                "The result holds the table; the artifact `blocks.csv` holds the same rows."
            ),
            request_model=InspectRequest,
            result_model=InspectResult,
            prepare=prepare_inspect,
        ),
    )
}
