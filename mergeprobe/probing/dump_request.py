"""The dump job's request and its validation against the model library (pure Python, no torch).

A dump generates an image with one model and, on the way, captures what the
U-Net blocks compute (Dump U-Net style): block outputs (`features`) and
cross-attention maps (`attention`) at chosen sampler steps. Prompts may give
blocks different text with `(~: spec: text; … :~)` groups
(`mergeprobe.probing.layer_prompts`); `layer_prompt_diff` also runs without the groups
and records the difference. A dump with neither `features` nor `attention`
just generates the image. `loras` are added to the model's weights in memory for the job
(matched at submission as a bake matches them) and taken out again, bit for bit.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mergeprobe.checkpoints.archs import UNKNOWN, Architecture, detect_arch, get_arch
from mergeprobe.checkpoints.checkpoint_headers import CheckpointHeader
from mergeprobe.checkpoints.library import ModelLibrary, PinnedModel
from mergeprobe.lora.bake_plan import LoraMatch, match_loras
from mergeprobe.lora.lora_request import MAX_LORAS, LoraApplication
from mergeprobe.merging.blockspec import format_blocks, parse_block_set, parse_steps, spec_problem
from mergeprobe.probing.capture_estimate import block_geometry, estimate_dump
from mergeprobe.probing.colorize import Colorize
from mergeprobe.probing.layer_prompts import LayerPrompt, parse_layer_prompt
from mergeprobe.probing.pipeline_configs import (
    PREDICTION_TYPE_DOC,
    PipelineVariant,
    PredictionType,
    check_probeable,
    fitting_config_dir,
)
from mergeprobe.service.errors import InvalidInput
from mergeprobe.service.request_model import RequestModel
from mergeprobe.service.settings import Settings

Sampler = Literal["euler_a", "euler", "dpmpp_2m", "dpmpp_2m_karras", "ddim"]
MAX_PROMPT_CHARS = 2000
_SIZE_MULTIPLE = 8

_LAYERS_DOC = (
    "U-Net blocks, in the block-set grammar: `IN00`, `IN00, M00`, `IN00-OUT11` (a range in U-Net order, "
    "IN11 → M00 → OUT00), `IN00-OUT11(+2)` (every 2nd block). Names follow the model's architecture "
    "(sd1/sd2: IN00–IN11, M00, OUT00–OUT11; sdxl: IN00–IN08, M00, OUT00–OUT08). Default: every block"
)
_STEPS_DOC = (
    "Sampler steps to capture, 1-based, in the step grammar: `1,5-20(+5)`; each at most `steps`. "
    "Empty: every step."
)
_PROMPT_DOC = (
    "Per-block text with `(~: spec: text; … :~)` groups: `a (~: IN00-OUT11: cute; M00: excellent :~) girl` "
    "gives `a cute girl` to every block but M00, which gets `a excellent girl`. `spec` is a block set or `_` "
    "(every block no other pair of the group names); later pairs win; blocks nothing names get no text; the "
    "text is stripped at both ends and may not hold `;`. Text outside the groups is shared."
)


class Capture(RequestModel):
    """Which blocks to capture, at which sampler steps, and how to render them."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"layers": "IN00-OUT11(+2)", "steps": "1,5-20(+5)"}]},
    )

    layers: str | None = Field(
        default=None,
        description=_LAYERS_DOC
        + " (for `attention`: every block with cross-attention; blocks without it are dropped with a warning).",
        examples=["IN00-OUT11", "IN04, M00, OUT06", "IN00-OUT11(+2)"],
    )
    steps: str = Field(default="", description=_STEPS_DOC, examples=["", "1,5,10", "1,5-20(+5)"])
    colorize: Colorize = Field(
        default_factory=Colorize, description="How captured values are mapped to colors in the images."
    )
    save_tensors: bool = Field(
        default=False, description="Also store the raw captured tensors as .safetensors artifacts."
    )


class DumpRequest(RequestModel):
    """Generate an image with one model, capturing U-Net block outputs and attention maps."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "tiny-sd1-a",
                    "prompt": "a (~: IN00-OUT11: cute; M00: excellent :~) girl",
                    "negative_prompt": "lowres, blurry",
                    "seed": 3292581281,
                    "steps": 20,
                    "sampler": "euler_a",
                    "cfg_scale": 7.0,
                    "width": 512,
                    "height": 512,
                    "features": {"layers": "IN00, IN05, M00, OUT06, OUT11", "steps": "1,5,10"},
                    "attention": {"layers": "IN01, M00, OUT10", "steps": "20"},
                    "layer_prompt_diff": True,
                }
            ]
        },
    )

    model: str = Field(
        description="Model id, file name, short hash or sha256 from the library.", examples=["tiny-sd1-a"]
    )
    prompt: str = Field(
        max_length=MAX_PROMPT_CHARS,
        description="The prompt. " + _PROMPT_DOC,
        examples=["a cute girl", "a (~: IN00-OUT11: cute; M00: excellent :~) girl"],
    )
    negative_prompt: str = Field(
        default="",
        max_length=MAX_PROMPT_CHARS,
        description="The negative prompt; the same per-block groups work here.",
        examples=["lowres, blurry"],
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**32 - 1,
        description="Seed of the initial noise; image i of a batch uses seed + i.",
    )
    steps: int = Field(default=20, ge=1, le=150, description="Sampler steps.")
    sampler: Sampler = Field(default="euler_a", description="Sampler (A1111 names).", examples=["euler_a"])
    cfg_scale: float = Field(default=7.0, ge=0, le=30, description="Classifier-free guidance scale.")
    width: int = Field(default=512, ge=64, le=2048, description="Image width in pixels, a multiple of 8.")
    height: int = Field(default=512, ge=64, le=2048, description="Image height in pixels, a multiple of 8.")
    batch_size: int = Field(default=1, ge=1, le=8, description="Images generated together.")
    features: Capture | None = Field(
        default=None,
        description="Capture block outputs (feature maps, one image per block and step). Omit for none.",
        examples=[{"layers": "IN00, IN05, M00, OUT06, OUT11", "steps": "1,5,10"}],
    )
    attention: Capture | None = Field(
        default=None,
        description=(
            "Capture cross-attention maps (tokens across, heads down, one image per block and step). "
            "Omit for none."
        ),
        examples=[{"layers": "IN01, M00, OUT10", "steps": "20"}],
    )
    prediction_type: PredictionType | None = Field(default=None, description=PREDICTION_TYPE_DOC)
    layer_prompt_diff: bool = Field(
        default=False,
        description=(
            "Also generate without the per-block groups (every group removed) and record the difference "
            "map; needs at least one group in `prompt` or `negative_prompt`."
        ),
    )
    loras: list[LoraApplication] = Field(
        default_factory=list,
        max_length=MAX_LORAS,
        description="LoRAs added to the model's weights in memory for this job (U-Net and text encoders, as a "
        "bake adds them: strength × block weight × ΔW per modified tensor, in fp32), never written; the "
        "cached pipeline gets its own weights back bit for bit afterwards. Reported per LoRA in the result.",
    )

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int, info: ValidationInfo) -> int:
        if value % _SIZE_MULTIPLE:
            below = value - value % _SIZE_MULTIPLE
            raise ValueError(
                f"{info.field_name} must be a multiple of {_SIZE_MULTIPLE}, got {value} "
                f"(try {below} or {below + _SIZE_MULTIPLE})"
            )
        return value


class DumpResult(BaseModel):
    """What a finished dump job returns; the images themselves are artifacts of the job."""

    model: str = Field(description="File name of the model.", examples=["tiny-sd1-a.safetensors"])
    arch: str = Field(description="Detected architecture.", examples=["sd1"])
    images: list[str] = Field(
        description="Artifact names of the generated images, in batch order.", examples=[["image_0.png"]]
    )
    captures: int = Field(
        description="Capture images written (features and attention, every block and step).", examples=[15]
    )
    prompts: dict[str, str] = Field(
        description="The prompt each U-Net block read, in U-Net order.",
        examples=[{"IN00": "a cute girl", "M00": "a excellent girl"}],
    )
    negative_prompts: dict[str, str] = Field(description="The negative prompt each U-Net block read.")
    warnings: list[str] = Field(
        default_factory=list, description="Things that ran but probably not as meant."
    )
    seconds: float = Field(description="Wall time of the generation and captures.", examples=[4.2])
    device: str = Field(default="cpu", description="Where it ran.", examples=["cuda"])
    dtype: str = Field(
        default="float32",
        description="Precision of the pipeline (setting MERGEPROBE_GENERATION_DTYPE; `auto` runs float16 "
        "on cuda, float32 on a CPU).",
        examples=["float16"],
    )
    pipeline_cached: bool = Field(default=False, description="The worker had the pipeline loaded already.")
    pipeline: PipelineVariant | None = Field(default=None, description="The scheduler variant it ran with.")
    loras: list[LoraMatch] = Field(
        default_factory=list,
        description="Per LoRA of the request: what it matched in the model and the strengths applied per block.",
    )


def _unknown_arch(name: str) -> InvalidInput:
    return InvalidInput(
        "unknown-architecture",
        "Unknown architecture",
        f"{name}: its keys match none of sd1, sd2, sdxl, so it has no block table",
        field="model",
    )


class CaptureInputs(BaseModel):
    """A capture as resolved at submission: block names, 1-based steps, the colorize settings."""

    layers: list[str]
    steps: list[int]
    colorize: dict[str, Any]
    save_tensors: bool


class DumpInputs(BaseModel):
    """What a dump job runs: the pinned model, resolved captures and each block's prompts."""

    model: PinnedModel
    arch: str
    pipeline: PipelineVariant
    features: CaptureInputs | None
    attention: CaptureInputs | None
    prompts: dict[str, str] = Field(description="Block → its prompt.")
    negative_prompts: dict[str, str]
    plain_prompt: str = Field(description="The prompt without per-block groups.")
    plain_negative_prompt: str
    has_groups: bool
    warnings: list[str]
    loras: list[PinnedModel] = Field(default_factory=list, description="The request's LoRAs, pinned.")


def _capture_inputs(
    capture: Capture, arch: Architecture, total_steps: int, *, field: str, warnings: list[str]
) -> CaptureInputs:
    attention = field == "attention"
    if capture.layers is None:
        layers = [b for b in arch.unet_blocks if not (attention and b in arch.textless_blocks)]
    else:
        layers = parse_block_set(capture.layers, arch, field=f"{field}.layers")
        if attention:
            dropped = [b for b in layers if b in arch.textless_blocks]
            layers = [b for b in layers if b not in arch.textless_blocks]
            if not layers:
                raise spec_problem(
                    f"{format_blocks(dropped, arch)} have no cross-attention, so there is no attention map "
                    f"to capture; name blocks with cross-attention",
                    field=f"{field}.layers",
                    position=len(capture.layers) - len(capture.layers.lstrip()),
                )
            if dropped:
                warnings.append(
                    f"attention.layers: {format_blocks(dropped, arch)} have no cross-attention and are skipped"
                )
    steps = parse_steps(capture.steps, total_steps, field=f"{field}.steps")
    capture.colorize.validate(f"{field}.colorize")  # the schema checked it; this names the field in full
    return CaptureInputs(
        layers=layers,
        steps=steps,
        colorize=capture.colorize.model_dump(mode="json"),
        save_tensors=capture.save_tensors,
    )


def prepare_dump(request: DumpRequest, library: ModelLibrary) -> DumpInputs:
    """Validate a dump against its model and resolve everything the engine needs (400 on any spec error)."""
    pinned, entry = library.pin(request.model, field="model")
    header = entry.header
    arch_name = detect_arch(header.tensors)
    if arch_name == UNKNOWN:
        raise _unknown_arch(entry.name)
    arch = get_arch(arch_name)
    pipeline = check_probeable(entry.name, header, entry.variant, request.prediction_type, library.settings)

    warnings: list[str] = []
    # A LoRA for another architecture, or matching no key of the model, is a 400 naming it.
    matching = match_loras(arch.name, header, entry.name, request.loras, library) if request.loras else None
    if matching is not None:
        warnings.extend(matching.warnings)
    prompt = parse_layer_prompt(request.prompt, arch, field="prompt")
    negative = parse_layer_prompt(request.negative_prompt, arch, field="negative_prompt")
    for field, parsed in (("prompt", prompt), ("negative_prompt", negative)):
        warnings.extend(f"{field}: {w}" for w in parsed.warnings())

    features = (
        _capture_inputs(request.features, arch, request.steps, field="features", warnings=warnings)
        if request.features is not None
        else None
    )
    attention = (
        _capture_inputs(request.attention, arch, request.steps, field="attention", warnings=warnings)
        if request.attention is not None
        else None
    )

    has_groups = prompt.has_groups or negative.has_groups
    prompts, negative_prompts = prompt.resolve(), negative.resolve()
    if request.layer_prompt_diff:
        if not has_groups:
            raise InvalidInput(
                "invalid-request",
                "Invalid request",
                "layer_prompt_diff compares a run with per-block prompts to one without them, but neither "
                "`prompt` nor `negative_prompt` holds a `(~: spec: text :~)` group",
                field="layer_prompt_diff",
            )
        if _changes_nothing(prompt, prompts) and _changes_nothing(negative, negative_prompts):
            warnings.append(
                "layer_prompt_diff: the groups give every block the prompt without them; "
                "the difference maps will be zero"
            )

    inputs = DumpInputs(
        model=pinned,
        arch=arch.name,
        pipeline=pipeline,
        features=features,
        attention=attention,
        prompts=prompts,
        negative_prompts=negative_prompts,
        plain_prompt=prompt.plain(),
        plain_negative_prompt=negative.plain(),
        has_groups=has_groups,
        warnings=warnings,
        loras=matching.pins if matching is not None else [],
    )
    check_capture_size(request, inputs, header, arch, library.settings)
    return inputs


def _gb(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def check_capture_size(
    request: DumpRequest, inputs: DumpInputs, header: CheckpointHeader, arch: Architecture, settings: Settings
) -> None:
    """Refuse a dump whose estimated captures exceed the caps (400 naming the larger capture)."""
    if inputs.features is None and inputs.attention is None:
        return
    geometry = block_geometry(header, arch, fitting_config_dir(arch.name, header, settings))
    estimate = estimate_dump(request, inputs, geometry)
    over = []
    if estimate.written_bytes > settings.max_capture_bytes:
        over.append(
            f"would write about {_gb(estimate.written_bytes)} (MERGEPROBE_MAX_CAPTURE_BYTES is "
            f"{_gb(settings.max_capture_bytes)})"
        )
    if estimate.memory_bytes > settings.max_capture_memory_bytes:
        over.append(
            f"would hold about {_gb(estimate.memory_bytes)} in worker memory (MERGEPROBE_MAX_CAPTURE_MEMORY_BYTES "
            f"is {_gb(settings.max_capture_memory_bytes)})"
        )
    if over:
        field = estimate.largest_capture
        shares = ", ".join(f"{name} {_gb(size)}" for name, size in estimate.by_capture.items() if size)
        raise InvalidInput(
            "capture-too-large",
            "Capture too large",
            f"this dump {' and '.join(over)}; by capture: {shares}. Capture fewer steps or blocks, a smaller "
            f"image, or without save_tensors",
            field=field,
        )


def _changes_nothing(parsed: LayerPrompt, resolved: dict[str, str]) -> bool:
    plain = parsed.plain()
    return all(text == plain for text in resolved.values())
