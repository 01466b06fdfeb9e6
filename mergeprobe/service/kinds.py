"""Job kinds: the request schema of each kind and its validation against the model
library, done by the API before anything is queued. Engines live in worker/engines.

To add a kind: a request model, an inputs model, a result model, a `prepare` function that
returns the inputs (every model pinned to its sha256), an engine in worker/engines, and one
entry in KINDS here that names them all.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mergeprobe.checkpoints.archs import UNKNOWN
from mergeprobe.checkpoints.library import ModelLibrary, PinnedModel
from mergeprobe.lora.bake_plan import BakeInputs, BakeRequest, LoraMatch, match_loras, plan_bake
from mergeprobe.lora.lora_extract_plan import ExtractInputs, ExtractRequest, prepare_extract
from mergeprobe.lora.lora_merge_plan import LoraMergeInputs, LoraMergeRequest, prepare_lora_merge
from mergeprobe.lora.lora_output import LoraWriteSummary
from mergeprobe.merging.merge_methods import MERGE_METHODS
from mergeprobe.merging.merge_plan import ElementalRequest, MergeInputs, MergeRequest, plan_merge
from mergeprobe.probing.dump_request import DumpInputs, DumpRequest, DumpResult, prepare_dump
from mergeprobe.probing.sweep_request import SweepInputs, SweepRequest, SweepResult, prepare_sweep
from mergeprobe.service.errors import InvalidInput
from mergeprobe.service.model_import import IMPORT_DESCRIPTION, ImportInputs, ImportRequest, prepare_import
from mergeprobe.service.request_model import RequestModel
from mergeprobe.service.settings import Settings


class InspectRequest(RequestModel):
    """Per-block statistics of one model: what users read before choosing block weights."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "tiny-sd1-a"}]})

    model: str = Field(
        description="Model id, file name, short hash or sha256 from the library.", examples=["tiny-sd1-a"]
    )


class BlockStats(BaseModel):
    block: str = Field(description="BASE, INnn, M00 or OUTnn.", examples=["IN04"])
    params: int = Field(description="Number of parameters (elements) in the block.", examples=[1234])
    tensors: int = Field(description="Number of tensors in the block.", examples=[12])
    mean_abs: float | None = Field(
        description="Mean |w| over the block's floating-point parameters.", examples=[0.021]
    )
    dtypes: dict[str, int] = Field(description="Tensor count per safetensors dtype.", examples=[{"F16": 12}])


class InspectResult(BaseModel):
    model: str = Field(description="File name of the inspected model.", examples=["tiny-sd1-a.safetensors"])
    arch: str = Field(description="Detected architecture.", examples=["sd1"])
    total_params: int = Field(examples=[1_066_235_307])
    blocks: list[BlockStats] = Field(description="BASE first, then the U-Net blocks in U-Net order.")


class InspectInputs(BaseModel):
    model: PinnedModel
    arch: str


def prepare_inspect(request: InspectRequest, library: ModelLibrary) -> InspectInputs:
    pinned, entry = library.pin(request.model, field="model")
    arch = entry.header.arch
    if arch == UNKNOWN:
        raise InvalidInput(
            "unknown-architecture",
            "Unknown architecture",
            f"{pinned.name}: its keys match none of sd1, sd2, sdxl, so it has no block table",
            field="model",
        )
    return InspectInputs(model=pinned, arch=arch)


def model_url(model_id: str) -> str:
    """Where the API describes a library model."""
    return f"/v1/models/{model_id}"


def model_file_url(model_id: str) -> str:
    """Where the API serves a library model's file."""
    return f"/v1/models/{model_id}/file"


class MergedModel(BaseModel):
    id: str = Field(examples=["blend"])
    name: str = Field(examples=["blend.safetensors"])
    sha256: str
    short_hash: str
    url: str = Field(description="The model's description.", examples=["/v1/models/blend"])
    download_url: str = Field(
        description="The model's file (Range, ETag = sha256).", examples=["/v1/models/blend/file"]
    )

    @classmethod
    def of(cls, info: Any) -> MergedModel:
        """A library model (its `ModelEntry.info()`) as a job's result names it."""
        return cls(
            id=info.id,
            name=info.name,
            sha256=info.sha256,
            short_hash=info.short_hash,
            url=model_url(info.id),
            download_url=model_file_url(info.id),
        )


class MergeResult(BaseModel):
    model: MergedModel = Field(description="The result, registered in the model library (so merges chain).")
    arch: str = Field(examples=["sd1"])
    mode: str = Field(examples=["weighted_sum"])
    device: str = Field(examples=["cuda"])
    keys: int = Field(description="Tensors written.", examples=[1131])
    actions: dict[str, int] = Field(
        description="Keys per plan action.", examples=[{"merge": 1100, "keep_a": 1}]
    )
    size_bytes: int
    data_sha256: str = Field(description="sha256 of the tensor data (also modelspec.hash_sha256).")
    torch: str = Field(description="torch version that computed it.")
    loras: list[LoraMatch] = Field(
        default_factory=list,
        description="Per LoRA of the request: what it matched and the strengths applied.",
    )


def prepare_bake(request: BakeRequest, library: ModelLibrary) -> BakeInputs:
    bake = plan_bake(request, library)
    name = (
        request.output.name
        or f"{bake.model.name.rsplit('.', 1)[0][:60]}_lora_{secrets.token_hex(3)}.safetensors"
    )
    merge = plan_merge(request.as_merge(request.model), library, output_name=name)
    library.check_name_free(merge.output_name, field="output.name")
    return BakeInputs(
        arch=bake.arch,
        model=bake.model,
        loras=[report.lora for report in bake.reports],
        output=merge.output_name,
    )


BAKE_DESCRIPTION = """Bake LoRAs into a checkpoint: a new .safetensors in the library, streamed tensor by
tensor like a merge (memory independent of the checkpoint's size).

Each modified tensor is W + Σ strength · w_block · ΔW, computed in fp32 and cast to `output.dtype`:
ΔW = up · down · alpha / rank (LoRA; LoCon convolutions, with `lora_mid`), LoHa's Hadamard product
(with Tucker), LoKr's Kronecker product, DoRA's magnitude rescale of what the tensor is by then.
`blocks` takes the LoRA Block Weight extension's vectors and presets or any form merge ratios take.
The result reports, per LoRA, the modules matched per block and text encoder, those that matched
nothing (named), and the strength applied per block; POST /v1/plans/bake is the dry run. A LoRA for
another architecture, matching nothing, or not fitting its tensors is a 400 at submission."""


class NotCarried(BaseModel):
    count: int = Field(
        description="Tensors that differ between the models and no module of the LoRA carries."
    )
    keys: list[str] = Field(description="The first 20 of them.")
    by_block: dict[str, int] = Field(examples=[{"IN00": 2, "OUT11": 2, "BASE": 1}])


class LoraExtractResult(LoraWriteSummary):
    model: MergedModel = Field(description="The LoRA, registered in the model library.")
    size_bytes: int
    arch: str = Field(examples=["sd1"])
    device: str = Field(examples=["cpu"])
    unchanged: list[str] = Field(description="Layers left out: no |ΔW| above min_diff.")
    not_carried: NotCarried
    seconds: float = Field(description="Time of the SVDs (reading and factoring the layers).")
    torch: str


LORA_EXTRACT_DESCRIPTION = """A kohya-format LoRA from `model_tuned − model_base`, written to the library.

Per layer ΔW = tuned − base in fp32, factored by SVD into up = U·S (out × r) and down = Vᵀ (r × in, a
conv's down keeping its kernel: LoCon), alpha = r, as sd-scripts' extract_lora_from_models.py stores
them. r is `rank` (`conv_rank` for 3×3 convs), or with `energy` the smallest rank holding that share of
‖ΔW‖² (at most the cap). Layers: the U-Net transformers' linears and 1×1 convs; with `conv_rank`, the
ResBlocks, downsamplers and upsamplers too; with `text_encoders`, the text encoders' attention and MLP
linears (SDXL: `lora_te1_`, `lora_te2_`). The result reports each module's rank and relative error
‖ΔW − up·down‖/‖ΔW‖ of the stored factors (also `modules.csv`), and the tensors that differ but no
module carries (conv_in, norms, the VAE …). Differences from sd-scripts: no factor clamping unless
`clamp_quantile` (sd-scripts: 0.99), a randomised SVD unless `svd: full`, `min_diff` per layer."""


class LoraMergeResult(LoraWriteSummary):
    model: MergedModel = Field(description="The LoRA, registered in the model library.")
    size_bytes: int
    arch: str = Field(examples=["sd1"])
    mode: str = Field(examples=["concat"])
    device: str = Field(examples=["cpu"])
    loras: list[LoraMatch] = Field(description="Per input LoRA: what it matched and the strengths applied.")
    torch: str


LORA_MERGE_DESCRIPTION = """Several LoRAs, each at its `strength` and `blocks` weights (as in bakes), into one
kohya-format LoRA in the library; one LoRA with mode `svd` resizes it.

Modules of the inputs that modify the same layer (whatever their naming: kohya, PEFT, LyCORIS) become
one module, named as sd-scripts names it. `concat`: the inputs' factors side by side (rank = the sum of
theirs; strength × block weight × alpha/rank folded into up): baking the result equals baking the
inputs, up to the output dtype; plain LoRA/LoCon only. `svd`: the summed update of each layer reduced to
`rank` (`conv_rank` for 3×3 convs) or `energy` by SVD, computed from the factors without forming ΔW where
the inputs are plain LoRAs; LoHa, LoKr and Tucker modules are expanded first. DoRA cannot be merged (its
update depends on the weight). Each module's relative error is reported (also `modules.csv`). Blocks
are those of `model`'s layers, or of the published checkpoint of the LoRAs' architecture."""


class ImportResult(BaseModel):
    model: MergedModel = Field(description="The imported model, registered in the model library.")
    size_bytes: int = Field(examples=[2_132_625_894])
    sha256: str = Field(description="sha256 of the downloaded bytes, computed while they streamed in.")
    source: str = Field(
        description="The URL as requested.", examples=["https://models.example.com/sd15/blend.safetensors"]
    )
    seconds: float = Field(description="Time of the download (validating and storing not included).")
    bytes_per_second: int = Field(description="size_bytes / seconds.", examples=[104_857_600])


def prepare_merge(request: MergeRequest, library: ModelLibrary) -> MergeInputs:
    plan = plan_merge(request, library)
    library.check_name_free(plan.output_name)
    inputs = plan.inputs()
    if request.loras:
        inputs.loras = match_loras(
            plan.arch.name, plan.headers["a"], plan.pins["a"].name, request.loras, library
        ).pins
    return inputs


def _merge_description() -> str:
    lines = [
        "A block-weighted merge, streamed tensor by tensor into a new .safetensors in the model library.",
        "α and β are per key, after block weights and elemental overrides; α is model B's share.",
        "Computed in fp32 per tensor and cast to `output.dtype`. Buffers (position_ids, the v_pred/ztsnr "
        "markers, schedule buffers, model_ema.decay, logit_scale, integer tensors) are A's, byte for byte "
        "(`keep_a` with a `reason`); a weight only in B is copied from B, a buffer only in B is not written. "
        "conv_in of an inpainting model A (9 channels) merges its shared channels with a 4-channel B and keeps "
        "A's others; an inpainting B or C with a 4-channel A, an input missing U-Net tensors its architecture "
        "needs, a VAE or text encoder on one side only where the ratios merge it, any other shape mismatch "
        "and an architecture mismatch are 400s before any tensor is read.",
        "",
        "Modes (TIES, DARE and slerp: the plain modes follow the papers, the `_sd_mecha` ones reproduce "
        "sd-mecha's conventions, which differ):",
    ]
    for method in MERGE_METHODS.values():
        beta = f" β: {method.beta.description}." if method.beta else ""
        models = ", ".join(
            [slot.upper() for slot in method.inputs]
            + [f"{slot.upper()} optional" for slot in method.optional_inputs]
        )
        lines.append(f"- `{method.name}` ({models}): {method.formula.rstrip('.')}.{beta}")
    lines += [
        "",
        "The output's `__metadata__` holds `sd_merge_recipe` (the request as run, with each input's sha256), "
        "`sd_merge_models` (sha256 → name, legacy hash and that parent's own `sd_merge_models`), `modelspec.*` "
        "and `format: pt`. Dry run first with POST /v1/plans/merge.",
    ]
    return "\n".join(lines)


DUMP_DESCRIPTION = """Generate with the model and capture what its U-Net blocks do.

- `features`: each selected block's output at each selected sampler step, one PNG per (block, step,
  CFG half[, batch item]): channels tiled in a near-square grid with 1-pixel gaps, the channel mean
  first (`features_IN04_step005_cond.png`).
- `attention`: cross-attention (attn2) probabilities per token and head for every transformer in the
  selected blocks: per (block, step) a PNG with one row per head and one column per prompt token,
  labelled with the token (`attention_OUT05_step010.png`); per token a heatmap over the generated
  image, averaged over heads, blocks and steps (`heatmap_t02_girl.png`).
- Per-block prompts in `prompt`/`negative_prompt`: `a (~: IN00-OUT11: cute; M00: excellent :~) girl`.
  `layer_prompt_diff` also runs without the groups (same seed) and renders with − without per block
  and step (`diff_M00_step005_cond.png`). The result lists every block's resolved prompt.
- `save_tensors`: one `tensors.safetensors` with every captured tensor as float32:
  `features/<block>/step<NNN>/<half>` (batch, channels, h, w);
  `attention/<block>/step<NNN>/<half>/t<i>` (batch, heads, h, w, tokens) for transformer i of the
  block (each row sums to 1 over the 77 tokens); `diff/<block>/step<NNN>/<half>`. Its `__metadata__`
  entry `mergeprobe` is JSON describing shapes, steps, halves and the request.
- `loras`: LoRAs added to the model's weights in memory for the job (U-Net and text encoders;
  `strength` and `blocks` as in bake jobs), never written; the cached pipeline gets its own weights
  back bit for bit afterwards, also when the job fails or is canceled. The result reports per LoRA
  the modules matched (in total, per block and text encoder), those that matched nothing (named),
  and the strength applied per block; a LoRA for another architecture or matching no key of the
  model is a 400 at submission naming it (`loras[i].model`).
- `manifest.json` lists every artifact with its kind, block, step and half. Halves are `uncond` and
  `cond` (diffusers batches [uncond, cond]); with cfg_scale ≤ 1 there is only `cond`. Steps are
  1-based sampler steps.

Checkpoints load into diffusers pipelines offline from the configs shipped with the project or in
MERGEPROBE_PIPELINE_CONFIGS_DIR; the worker caches loaded pipelines (LRU by sha256)."""


SWEEP_DESCRIPTION = """Generate the same prompt and seeds with many variants of one model, without writing
a checkpoint per variant.

The baseline is `model_a`, or a merge of model_a/b/c (`mode`, `alpha`, `beta`, `base_alpha`,
`elemental` as in merge jobs) computed in memory. `variants` is one of:
- per block: `{"blocks": "IN00-OUT11", "alpha": 0, "beta": 0.75}`: one variant per named block (the
  layer-influence study: with `scaled_sum`, β·A + α·B, this weakens one block to 75 %);
- per element: `{"elements": ["OUT05:attn2:0", ...]}`: one variant per elemental entry, the ratio being
  the α applied (SuperMerger's effective elemental checker);
- an XY grid: `{"x": {"kind": "alpha", "values": [...]}, "y": {"kind": "seed", "values": [...]}}`, kinds
  alpha, beta (every U-Net block), block (α of `block`), seed, prompt, elemental.
- per block of a LoRA: `{"lora": 0, "blocks": "IN00-OUT11", "weight": 0}`: one variant per named
  block with LoRA 0's block weight there set to `weight` (0, the default, switches it off on that
  block): the layer-influence study of a LoRA, with the same U grid, influence.csv and ranking;
- XY kinds `lora_strength` (a LoRA's strength on every U-Net block) and `lora_block` (its block
  weight on `block`), with `lora` the LoRA's index in `loras` (default 0).
A variant's formula is its `mode`, default the baseline's mode when the baseline is a merge, else
`scaled_sum`; without model_b, B is A. Variants act on U-Net blocks; BASE follows the baseline.
`loras` are added to the baseline in memory after its merge, as a merge job's are (matched against
model A's keys, text encoders included), never written; the result reports each LoRA's match as a
bake's does, and a LoRA matching nothing or made for another architecture is a 400 naming it. A
LoRA's text-encoder (BASE) strength is the baseline's in every variant: naming BASE in a LoRA
variant is a 400.
For each variant only the U-Net tensors it changes are patched, and their baseline values are put
back bit for bit after its images; each prompt is encoded once.

Artifacts: `grid.png` (per-block sweeps: the study's U, IN00…IN11 down the left, M00 at the bottom,
OUT00…OUT11 up the right, the baseline in the centre, seeds side by side in each cell; XY: a labelled
X × Y grid; per element: a labelled row per element), every image, per variant and seed a difference
image and a two-frame GIF against the baseline, `influence.csv` (changed_share: share of pixels whose
difference exceeds `diff_threshold` in any channel; mean_abs_diff; ssim on luminance), and
`manifest.json`. The result ranks variants by mean changed share."""


@dataclass(frozen=True)
class JobKind:
    """Everything about one kind of job, in one place: the API builds its route from the request
    model, `prepare` turns a valid request into pinned typed inputs before queueing, the worker
    imports `engine` (a `module:function` path, so the API never imports torch) and checks what it
    returns against `result_model`."""

    name: str
    summary: str
    description: str
    request_model: type[BaseModel]
    inputs_model: type[BaseModel]
    result_model: type[BaseModel]
    prepare: Callable[[Any, ModelLibrary], BaseModel]
    engine: str
    timeout: int  # seconds before rq stops a job of this kind; MERGEPROBE_JOB_TIMEOUTS overrides

    def timeout_in(self, settings: Settings) -> int:
        return int(settings.job_timeouts.get(self.name, self.timeout))


# A merge of two SDXL checkpoints from a slow disk is the longest thing we do.
_HOUR = 3600

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
            inputs_model=InspectInputs,
            result_model=InspectResult,
            prepare=prepare_inspect,
            engine="worker.engines.inspect:run_inspect",
            timeout=_HOUR // 2,
        ),
        JobKind(
            name="merge",
            summary="Merge two or three checkpoints block by block",
            description=_merge_description(),
            request_model=MergeRequest,
            inputs_model=MergeInputs,
            result_model=MergeResult,
            prepare=prepare_merge,
            engine="worker.engines.merge:run_merge",
            timeout=3 * _HOUR,
        ),
        JobKind(
            name="elemental",
            summary="Merge with per-element overrides (Elemental Merge)",
            description=(
                "The same as a merge, with `elemental` required: entries `blocks:elements:ratio` separated by "
                "commas or newlines; blocks are space-separated names or ranges (empty = all, leading NOT "
                "inverts), elements are substrings of the key relative to its block (empty = all, leading NOT "
                "inverts; for BASE the full key); later entries win. Also writes the plan as `plan.csv`. "
                "Entries that match no key are warnings. Element names per block: GET /v1/archs/{arch}/elements."
            ),
            request_model=ElementalRequest,
            inputs_model=MergeInputs,
            result_model=MergeResult,
            prepare=prepare_merge,
            engine="worker.engines.merge:run_elemental",
            timeout=3 * _HOUR,
        ),
        JobKind(
            name="dump",
            summary="Probe U-Net blocks during generation (Dump U-Net)",
            description=DUMP_DESCRIPTION,
            request_model=DumpRequest,
            inputs_model=DumpInputs,
            result_model=DumpResult,
            prepare=prepare_dump,
            engine="worker.engines.dump:run_dump",
            timeout=_HOUR,
        ),
        JobKind(
            name="sweep",
            summary="Layer-influence studies and XY grids, in memory",
            description=SWEEP_DESCRIPTION,
            request_model=SweepRequest,
            inputs_model=SweepInputs,
            result_model=SweepResult,
            prepare=prepare_sweep,
            engine="worker.engines.sweep:run_sweep",
            timeout=6 * _HOUR,
        ),
        JobKind(
            name="bake",
            summary="Bake LoRAs into a checkpoint",
            description=BAKE_DESCRIPTION,
            request_model=BakeRequest,
            inputs_model=BakeInputs,
            result_model=MergeResult,
            prepare=prepare_bake,
            engine="worker.engines.bake:run_bake",
            timeout=3 * _HOUR,
        ),
        JobKind(
            name="lora_extract",
            summary="Extract a LoRA from the difference of two checkpoints",
            description=LORA_EXTRACT_DESCRIPTION,
            request_model=ExtractRequest,
            inputs_model=ExtractInputs,
            result_model=LoraExtractResult,
            prepare=prepare_extract,
            engine="worker.engines.lora_extract:run_lora_extract",
            timeout=3 * _HOUR,
        ),
        JobKind(
            name="lora_merge",
            summary="Merge LoRAs into one LoRA (concatenated or resized by SVD)",
            description=LORA_MERGE_DESCRIPTION,
            request_model=LoraMergeRequest,
            inputs_model=LoraMergeInputs,
            result_model=LoraMergeResult,
            prepare=prepare_lora_merge,
            engine="worker.engines.lora_merge:run_lora_merge",
            timeout=_HOUR,
        ),
        JobKind(
            name="import",
            summary="Import a model from an http(s) or s3:// URL",
            description=IMPORT_DESCRIPTION,
            request_model=ImportRequest,
            inputs_model=ImportInputs,
            result_model=ImportResult,
            prepare=prepare_import,
            engine="worker.engines.import_model:run_import",
            # Long enough for an SDXL checkpoint (7 GB) at 1 MB/s.
            timeout=3 * _HOUR,
        ),
    )
}
