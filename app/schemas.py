"""Response schemas of the HTTP API (request schemas live with their job kinds)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, RootModel, create_model
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema
from typing_extensions import TypeAliasType

from mergeprobe.probing.dump_request import MAX_PROMPT_CHARS
from mergeprobe.service.kinds import KINDS, JobKind
from mergeprobe.service.request_model import RequestModel

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
# The same, named in the OpenAPI document: one JobStatus enum for the jobs of every kind.
NamedJobStatus = TypeAliasType("JobStatus", JobStatus)


class ProblemModel(BaseModel):
    """RFC 9457 problem details. `field` names the request field at fault and,
    inside a spec string, `position` is the 0-based character offset."""

    type: str = Field(examples=["https://mergeprobe.dev/problems/unknown-model"])
    title: str = Field(examples=["Unknown model"])
    status: int = Field(examples=[404])
    detail: str | None = Field(default=None, examples=["no model 'foo' in the library"])
    instance: str | None = Field(default=None, examples=["/v1/jobs/inspect"])
    field: str | None = Field(default=None, examples=["model"])
    position: int | None = Field(default=None, examples=[7])
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="Every validation error, when several."
    )


class Progress(BaseModel):
    completed: int = Field(description="Units done (tensors, sampler steps, images).", examples=[412])
    total: int = Field(description="Units in all; 0 while unknown.", examples=[1131])
    stage: str = Field(description="What the job is doing now.", examples=["reading tensors"])


class Artifact(BaseModel):
    name: str = Field(examples=["blocks.csv"])
    url: str = Field(examples=["/v1/jobs/0190f2a1b2c3d4e5f6a7b8c9/artifacts/blocks.csv"])
    media_type: str = Field(examples=["text/csv"])
    size_bytes: int = Field(examples=[1532])
    sha256: str = Field(description="Also the download's ETag.", examples=["9f2c" + "0" * 60])


class _JobFields(BaseModel):
    """What every job record holds; each kind's model below narrows `kind` and types `result`."""

    id: str = Field(description="24 hex digits, time-ordered.", examples=["0190f2a1b2c3d4e5f6a7b8c9"])
    kind: str = Field(examples=["inspect"])
    status: NamedJobStatus
    progress: Progress
    created_at: str = Field(examples=["2026-11-21T05:00:00.000Z"])
    started_at: str | None = None
    finished_at: str | None = None
    request: dict[str, Any] = Field(
        description="The request body as validated.", examples=[{"model": "tiny-sd1-a"}]
    )
    inputs: dict[str, Any] = Field(
        default_factory=dict,
        description="What the request resolved to when it was accepted (model file names, architecture).",
        examples=[{"model": "tiny-sd1-a.safetensors", "arch": "sd1"}],
    )
    artifacts: list[Artifact] = Field(default_factory=list)
    result: dict[str, Any] | None = None
    error: ProblemModel | None = None
    warnings: list[str] = Field(default_factory=list)
    worker: str | None = Field(default=None, description="The worker that ran it.")
    cancel_requested: bool | None = Field(default=None, description="Set on a DELETE of a running job.")


class DocumentedAs:
    """Annotates a `dict | None` field to be documented as `model | None` while it is validated as
    the dict it is. A job's result was checked against its kind's result model by the worker that
    stored it (worker/tasks.py `checked_result`); the API answers it as stored, so validating it
    again could only change what clients get (defaults filled in) or turn a record written by an
    earlier version into a 500 for the whole listing."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(core_schema.nullable_schema(self.model.__pydantic_core_schema__))


def _model_name_of(kind: str) -> str:
    """`lora_extract` → `LoraExtractJob`."""
    return "".join(part.capitalize() for part in kind.split("_")) + "Job"


def _job_model(kind: JobKind) -> type[BaseModel]:
    result_model = kind.result_model
    return create_model(
        _model_name_of(kind.name),
        __base__=_JobFields,
        __doc__=f"A job of kind `{kind.name}`: {kind.summary[0].lower()}{kind.summary[1:]}.",
        kind=(Literal[kind.name], Field(examples=[kind.name])),  # type: ignore[valid-type]
        result=(
            Annotated[dict[str, Any] | None, DocumentedAs(result_model)],
            Field(
                default=None,
                description=f"The {result_model.__name__}, once the job has succeeded; null until then, "
                "and when it failed or was canceled.",
            ),
        ),
    )


# Per kind, the job as the API answers it: `MergeJob`, `DumpJob`, ...
JOB_MODELS: dict[str, type[BaseModel]] = {name: _job_model(kind) for name, kind in KINDS.items()}


class Job(RootModel[Annotated[Union[tuple(JOB_MODELS.values())], Field(discriminator="kind")]]):  # type: ignore[misc]  # noqa: UP007
    """A job of any kind; `kind` tells which, and so what `result` holds."""


class StoredJob(_JobFields):
    """A job record as the API answers it, whatever its kind: `Job` documents the answer, this
    reads it. A record of a kind this version does not know (written by a newer one during a
    rolling upgrade) is answered as stored instead of failing the whole listing."""

    result: dict[str, Any] | None = None


def job_json(record: dict[str, Any]) -> dict[str, Any]:
    """A stored job record as the API answers it (defaults filled in, fields in order)."""
    return StoredJob.model_validate(record).model_dump(mode="json")


class JobList(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class VariantModel(BaseModel):
    """What the checkpoint is beyond its architecture, detected from its header (see the README's
    "Your own checkpoints")."""

    arch: Literal["sd1", "sd2", "sdxl", "unknown"]
    name: str = Field(
        description="sd1, sd2-epsilon, sd2-v, sdxl, sdxl-v, sdxl-edm, sdxl-refiner, unknown; `-inpainting` "
        "(9-channel conv_in) or `-Nch` appended for other U-Net inputs.",
        examples=["sd2-v"],
    )
    title: str = Field(examples=["Stable Diffusion 2.x, v-prediction"])
    prediction_type: Literal["epsilon", "v_prediction", "edm"] | None = Field(
        description="What the U-Net predicts; dumps and sweeps accept `prediction_type` to override it."
    )
    prediction_source: str = Field(
        description="Why: the `v_pred` marker key, the file's modelspec.prediction_type, ComfyUI's sd2 weight "
        "statistic (with its value), or the default.",
        examples=["the v_pred marker key"],
    )
    zero_terminal_snr: bool = Field(description="The `ztsnr` marker key: trained with zero terminal SNR.")
    in_channels: int | None = Field(description="Channels the U-Net's conv_in reads: 4, 9 (inpainting), 8.")
    inpainting: bool
    refiner: bool = Field(description="An SDXL refiner U-Net.")
    ema: Literal["none", "separate", "only"] = Field(
        description="`separate`: model_ema.* weight copies beside the model's (a training checkpoint); "
        "`only`: EMA copies and no model weights. An '-emaonly' release has its EMA weights under the "
        "model's own names and reads as `none`."
    )
    has_unet: bool
    has_vae: bool
    has_text_encoders: bool
    resolution: int | None = Field(description="Native image side in pixels.", examples=[768])


class LoraInfoModel(BaseModel):
    """What the library shows of a LoRA file."""

    arch: Literal["sd1", "sd2", "sdxl"] = Field(description="The architecture it was trained for.")
    arch_source: str = Field(
        description="Why: training metadata (`ss_base_model_version`, `modelspec.architecture`) or shapes.",
        examples=["metadata ss_base_model_version='sd_v1'"],
    )
    formats: list[str] = Field(
        description="`<naming>-<algorithm>` of its modules: kohya-lora, kohya-locon, lycoris-loha, "
        "lycoris-lokr, peft-lora, diffusers-lora …",
        examples=[["kohya-lora"]],
    )
    algorithms: list[str] = Field(examples=[["lora"]])
    module_count: int = Field(examples=[192])
    ranks: list[int] = Field(description="Distinct ranks of its modules.", examples=[[32]])
    alphas: list[float] = Field(description="Distinct alphas stored in it.", examples=[[16.0]])
    dora: bool = Field(description="DoRA magnitude vectors present.")
    touches_unet: bool
    text_encoders: list[str] = Field(description="te (sd1/sd2), te1 and te2 (sdxl) it modifies.")
    unbakeable_modules: int = Field(description="Modules of algorithms that cannot be applied (full, ia3).")
    training_metadata: dict[str, str] = Field(
        description="Its `ss_*` training metadata (kohya sd-scripts), the useful keys.",
        examples=[{"ss_network_dim": "32", "ss_network_alpha": "16"}],
    )


class ModelInfoModel(BaseModel):
    id: str = Field(description="The file name without its extension.", examples=["tiny-sd1-a"])
    name: str = Field(description="The file name in the library.", examples=["tiny-sd1-a.safetensors"])
    arch: Literal["sd1", "sd2", "sdxl", "unknown"] = Field(description="Detected from key names and shapes.")
    format: Literal["safetensors", "ckpt"]
    size_bytes: int = Field(examples=[2132625894])
    sha256: str = Field(
        description="Of the whole file; cached by size and mtime.", examples=["6ce0161689" + "0" * 54]
    )
    short_hash: str = Field(
        description="First 10 hex of sha256 (AUTOMATIC1111's hash).", examples=["6ce0161689"]
    )
    legacy_hash: str = Field(
        description="AUTOMATIC1111's old 8-hex hash of 64 KiB at 1 MiB.", examples=["7460a6fa"]
    )
    key_count: int = Field(examples=[1131])
    dtypes: dict[str, int] = Field(description="Tensor count per dtype.", examples=[{"F16": 1130, "I64": 1}])
    metadata: dict[str, str] = Field(
        description="The safetensors `__metadata__`.", examples=[{"format": "pt"}]
    )
    variant: VariantModel
    kind: Literal["checkpoint", "lora"] = Field(
        description="A checkpoint (merge, probe, inspect it) or a LoRA (LoRA, LoCon, LoHa, LoKr, DoRA, PEFT); "
        "a LoRA given where a job takes a checkpoint is a 400 `wrong-model-kind`."
    )
    lora: LoraInfoModel | None = Field(default=None, description="For a LoRA: what it holds.")
    download_url: str = Field(
        description="The model's file: GET it (Range, ETag = sha256).",
        examples=["/v1/models/tiny-sd1-a/file"],
    )


class ModelList(BaseModel):
    models: list[ModelInfoModel]


class ArchInfo(BaseModel):
    name: str = Field(examples=["sd1"])
    title: str = Field(examples=["Stable Diffusion 1.x"])
    blocks: list[str] = Field(description="U-Net blocks in U-Net order.", examples=[["IN00", "M00", "OUT00"]])
    base: str = Field(
        default="BASE", description="The block of every key outside the U-Net (text encoders, VAE)."
    )
    textless_blocks: list[str] = Field(description="Blocks with no cross-attention (they read no prompt).")


class ArchList(BaseModel):
    archs: list[ArchInfo]


class BlockList(BaseModel):
    arch: str = Field(examples=["sdxl"])
    blocks: list[str] = Field(description="U-Net blocks in U-Net order (BASE not included).")


class ElementTable(BaseModel):
    arch: str = Field(examples=["sd1"])
    base: dict[str, Any] = Field(
        description="BASE has no table: its element is the full key; key counts by prefix."
    )
    blocks: dict[str, list[str]] = Field(
        description="U-Net block → sorted element names.",
        examples=[{"OUT05": ["1.transformer_blocks.0.attn2.to_k.weight"]}],
    )


class TokenizeRequest(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "a (masterpiece:1.2) girl"}]})

    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="The prompt, as a dump or sweep takes it.")


class TokenModel(BaseModel):
    position: int = Field(
        description="Index in the text encoder's input; 0 is the start token.", examples=[1]
    )
    id: int = Field(examples=[320])
    text: str = Field(description="The BPE token, its end-of-word mark removed.", examples=["a"])


class TokenList(BaseModel):
    arch: str = Field(examples=["sdxl"])
    tokens: list[TokenModel] = Field(
        description="Every token, `<|startoftext|>` (49406) first and `<|endoftext|>` (49407) last. Every "
        "text encoder of these architectures reads the same tokens (sdxl's two included); they differ only "
        "in the padding after the end token."
    )
    context_length: int = Field(
        description="Tokens a text encoder reads, start and end included.", examples=[77]
    )
    truncated: bool = Field(description="The prompt runs past context_length: the pipelines cut it there.")


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    workers: int | None = Field(default=None, description="Live workers (readyz only).")
    queued: int | None = Field(default=None, description="Jobs waiting in the queue (readyz only).")
