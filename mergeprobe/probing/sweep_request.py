"""Sweep jobs: the request, and its expansion into variants (pure Python, no torch).

A sweep loads a baseline once (model_a, or a merge of model_a/b/c computed in memory),
then for each variant patches only the U-Net tensors whose merge ratios it changes,
generates the same prompt and seeds, and restores the tensors bit for bit.

Variants act on U-Net blocks (IN00 … OUTnn); BASE (text encoders and VAE) is set by the
baseline merge only. A variant's formula is `mode` (default: the baseline's mode when the
baseline is a merge, else `scaled_sum`); without model_b, B is taken to be A, so the
layer-influence study — α = 0, β = 0.75 on one block — weakens that block to 75 %.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergeprobe.checkpoints.archs import BASE, Architecture
from mergeprobe.checkpoints.library import ModelLibrary, PinnedModel
from mergeprobe.merging.blockspec import parse_block_set, parse_number
from mergeprobe.merging.elemental import ElementalRule, parse_elemental
from mergeprobe.merging.merge_methods import MERGE_METHODS
from mergeprobe.merging.merge_plan import (
    MergeMode,
    MergeRecipe,
    MergeRequest,
    PlanChange,
    RatioOverride,
    change_plan,
    check_ratios,
    plan_merge,
)
from mergeprobe.probing.capture_estimate import PNG_BOUND
from mergeprobe.probing.dump_request import MAX_PROMPT_CHARS, Sampler
from mergeprobe.probing.pipeline_configs import (
    PREDICTION_TYPE_DOC,
    PipelineVariant,
    PredictionType,
    check_probeable,
)
from mergeprobe.service.errors import InvalidInput
from mergeprobe.service.request_model import RequestModel

MAX_IMAGES = 2000
BASELINE_NAME = "sweep-baseline.safetensors"  # the plan's output name; nothing is written
# A sweep of model_a alone: β·A + α·B with B = A, α = 0, β = 1 is A; variants then change α and β
# (α = 0, β = 0.75 on one block weakens it to 75 %: the layer-influence study).
SOLO_BASELINE = {"mode": "scaled_sum", "alpha": 0.0, "beta": 1.0}


class PerBlockVariants(RequestModel):
    """One variant per named block (the layer-influence study)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"blocks": "IN00-OUT11", "alpha": 0, "beta": 0.75}]}
    )

    blocks: str = Field(
        default="IN00-OUT11", description="Block set: `IN00-OUT11`, `IN00, M00`, `IN00-OUT11(+2)`."
    )
    alpha: float = Field(default=0.0, description="α on the varied block.")
    beta: float | None = Field(default=0.75, description="β on the varied block (for modes that use it).")
    mode: MergeMode | None = Field(
        default=None, description="Formula of the variant; default: see the job description."
    )


class PerElementVariants(RequestModel):
    """One variant per elemental entry (SuperMerger's effective elemental checker)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"elements": ["OUT05:attn2:0", "OUT05:attn1:0", "IN04::0"]}]},
    )

    elements: list[str] = Field(
        min_length=1,
        max_length=500,
        description="Elemental entries `blocks:elements:ratio`; the ratio is the α applied.",
    )
    beta: float | None = Field(default=None, description="β on the matched elements (for modes that use it).")
    mode: MergeMode | None = None


class Axis(RequestModel):
    kind: Literal["alpha", "beta", "block", "seed", "prompt", "elemental"] = Field(
        description="What varies: α or β on every U-Net block, α of one block (`block`), the seed, the prompt, "
        "or an elemental entry string (α overrides)."
    )
    block: str | None = Field(
        default=None, description="For kind `block`: the block whose α varies.", examples=["OUT05"]
    )
    values: list[float | int | str] = Field(min_length=1, max_length=32)


class XYVariants(RequestModel):
    """An X × Y grid; each cell combines one value of each axis."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"x": {"kind": "alpha", "values": [0, 0.5, 1]}, "y": {"kind": "seed", "values": [1, 2]}}
            ]
        },
    )

    x: Axis
    y: Axis
    mode: MergeMode | None = None


class SweepRequest(MergeRecipe):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_a": "tiny-sd1-a",
                    "variants": {"blocks": "IN00-OUT11", "alpha": 0, "beta": 0.75},
                    "prompt": "a cute girl",
                    "seeds": [1, 2, 3, 4],
                    "steps": 20,
                }
            ]
        },
    )

    model_a: str = Field(
        description="The baseline model (or the base of the baseline merge).", examples=["tiny-sd1-a"]
    )
    model_b: str | None = Field(
        default=None,
        description="With a merge: model B of the baseline. The other merge fields (`model_c`, `mode`, "
        "`alpha`, `beta`, `base_alpha`, `base_beta`, `elemental`, `elemental_beta`, `seed`) are a merge "
        "job's.",
    )
    variants: PerBlockVariants | PerElementVariants | XYVariants
    prompt: str = Field(max_length=MAX_PROMPT_CHARS, examples=["a cute girl"])
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3, 4], min_length=1, max_length=16)
    steps: int = Field(default=20, ge=1, le=150)
    sampler: Sampler = "euler_a"
    cfg_scale: float = Field(default=7.0, ge=0, le=30)
    prediction_type: PredictionType | None = Field(default=None, description=PREDICTION_TYPE_DOC)
    width: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    height: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    diff_threshold: float = Field(
        default=20.0, ge=0, le=255, description="On the 0–255 scale, as SuperMerger's checker."
    )

    def baseline_merge(self) -> MergeRequest:
        """The baseline as a merge request (planned, never written). Without model_b it is model_a
        merged with itself by SOLO_BASELINE, whose every key is model_a's, copied byte for byte."""
        if not self.model_b:
            return MergeRequest(model_a=self.model_a, model_b=self.model_a, seed=self.seed, **SOLO_BASELINE)
        return MergeRequest(**self.recipe())

    @model_validator(mode="after")
    def _seeds_in_range(self) -> SweepRequest:
        for i, seed in enumerate(self.seeds):
            if not 0 <= seed < 2**32:
                raise ValueError(f"seeds[{i}] must be in [0, 2**32)")
        return self


class SweepResult(BaseModel):
    arch: str
    variants: list[str] = Field(description="Variant names in grid order.")
    rows: list[dict[str, Any]] = Field(
        description="Per variant and seed: changed_share, mean_abs_diff, ssim."
    )
    ranking: list[dict[str, Any]] = Field(
        description="Variants by mean changed share, most influential first."
    )
    images: int
    seconds: float
    seconds_generating: float = Field(
        default=0.0, description="Of `seconds`, the time spent in the diffusion pipeline (baseline included)."
    )
    pipeline_calls: int = Field(
        default=0,
        description="Diffusion pipeline calls: one per baseline, then variants sharing prompt and seeds are "
        "batched per call (MERGEPROBE_SWEEP_BATCH_PIXELS); a variant that changes no tensor reuses the baseline.",
    )
    seconds_switching: float = Field(
        default=0.0,
        description="Of `seconds`, the time spent computing the variants' changed tensors: what replaces "
        "writing and loading a checkpoint per variant.",
    )
    device: str = Field(default="cpu", description="Where it ran.", examples=["cuda"])
    dtype: str = Field(
        default="float32", description="Precision of the pipeline, as in dump jobs.", examples=["float16"]
    )
    pipeline_cached: bool = Field(
        default=False, description="The worker had model_a's pipeline loaded already."
    )
    pipeline: PipelineVariant | None = Field(default=None, description="The scheduler variant it ran with.")


@dataclass
class Variant:
    """One cell: overrides of α/β on U-Net keys (blocks first, then elemental rules, later wins),
    and optionally its own seeds or prompt."""

    name: str
    label: str
    overrides: list[RatioOverride] = field(default_factory=list)
    rules: list[ElementalRule] = field(default_factory=list)  # α = each rule's ratio, β = rule_beta
    rule_beta: float | None = None
    mode: str | None = None
    seeds: list[int] | None = None
    prompt: str | None = None
    position: tuple[int, int] | None = None  # (x, y) in an XY grid

    def change(self) -> PlanChange:
        """What this variant changes in the baseline's plan."""
        return PlanChange(
            overrides=tuple(self.overrides),
            rules=tuple(self.rules),
            rule_beta=self.rule_beta,
            method=MERGE_METHODS[self.mode] if self.mode else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "overrides": [
                {"blocks": sorted(o.blocks), "alpha": o.alpha, "beta": o.beta} for o in self.overrides
            ],
            "rules": [rule.to_json() for rule in self.rules],
            "rule_beta": self.rule_beta,
            "mode": self.mode,
            "seeds": self.seeds,
            "prompt": self.prompt,
            "position": list(self.position) if self.position else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Variant:
        return cls(
            name=data["name"],
            label=data["label"],
            overrides=[
                RatioOverride(frozenset(o["blocks"]), o["alpha"], o["beta"]) for o in data["overrides"]
            ],
            rules=[ElementalRule.from_json(rule) for rule in data["rules"]],
            rule_beta=data["rule_beta"],
            mode=data["mode"],
            seeds=data["seeds"],
            prompt=data["prompt"],
            position=tuple(data["position"]) if data["position"] else None,
        )


def _no_base_only(rules: list[ElementalRule], field_name: str) -> None:
    for rule in rules:
        if rule.blocks == {BASE}:
            raise InvalidInput(
                "invalid-variant",
                "Invalid request",
                f"entry {rule.index} (`{rule.source}`) names only BASE: sweep variants act on U-Net blocks "
                "(set BASE through the baseline merge)",
                field=field_name,
                position=rule.position,
            )


def _axis_parts(axis: Axis, arch: Architecture, field_name: str) -> list[dict[str, Any]]:
    """Each value of an axis as a partial variant: label plus overrides, rules, seeds or prompt."""
    parts = []
    if axis.kind == "block":
        if not axis.block:
            raise InvalidInput(
                "invalid-variant",
                "Invalid request",
                "axis kind `block` needs `block`",
                field=f"{field_name}.block",
            )
        blocks = frozenset(parse_block_set(axis.block, arch, field=f"{field_name}.block"))
    for i, value in enumerate(axis.values):
        where = f"{field_name}.values[{i}]"
        if axis.kind in ("alpha", "beta", "block"):
            if isinstance(value, str):
                value = parse_number(value, field=where)
            number = float(value)
            if axis.kind == "block":
                parts.append(
                    {
                        "label": f"{axis.block} alpha={number:g}",
                        "overrides": [RatioOverride(blocks, alpha=number)],
                    }
                )
            else:
                override = RatioOverride(frozenset(arch.unet_blocks), **{axis.kind: number})
                parts.append({"label": f"{axis.kind}={number:g}", "overrides": [override]})
        elif axis.kind == "seed":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
                raise InvalidInput(
                    "invalid-variant", "Invalid request", "seeds are integers in [0, 2**32)", field=where
                )
            parts.append({"label": f"seed={value}", "seeds": [value]})
        elif axis.kind == "prompt":
            if not isinstance(value, str) or len(value) > MAX_PROMPT_CHARS:
                raise InvalidInput(
                    "invalid-variant", "Invalid request", "prompt values are strings", field=where
                )
            parts.append({"label": value[:40], "prompt": value})
        else:
            if not isinstance(value, str):
                raise InvalidInput(
                    "invalid-variant",
                    "Invalid request",
                    "elemental values are entry strings",
                    field=where,
                )
            rules = parse_elemental(value, arch, field=where)
            _no_base_only(rules, where)
            parts.append({"label": value[:40], "rules": rules})
    return parts


def expand_variants(request: SweepRequest, arch: Architecture) -> list[Variant]:
    spec = request.variants
    if isinstance(spec, PerBlockVariants):
        blocks = parse_block_set(spec.blocks, arch, field="variants.blocks")
        return [
            Variant(b, b, overrides=[RatioOverride(frozenset((b,)), spec.alpha, spec.beta)], mode=spec.mode)
            for b in blocks
        ]
    if isinstance(spec, PerElementVariants):
        variants = []
        for i, entry in enumerate(spec.elements):
            rules = parse_elemental(entry, arch, field=f"variants.elements[{i}]")
            _no_base_only(rules, f"variants.elements[{i}]")
            variants.append(Variant(f"e{i:02d}", entry, rules=rules, rule_beta=spec.beta, mode=spec.mode))
        return variants
    if spec.x.kind == spec.y.kind and spec.x.kind in ("seed", "prompt", "alpha", "beta"):
        raise InvalidInput(
            "invalid-variant",
            "Invalid request",
            f"x and y both vary {spec.x.kind}",
            field="variants.y.kind",
        )
    xs = _axis_parts(spec.x, arch, "variants.x")
    ys = _axis_parts(spec.y, arch, "variants.y")
    variants = []
    for yi, y in enumerate(ys):
        for xi, x in enumerate(xs):
            variants.append(
                Variant(
                    name=f"x{xi}_y{yi}",
                    label=f"{x['label']} | {y['label']}",
                    overrides=x.get("overrides", []) + y.get("overrides", []),
                    rules=x.get("rules", []) + y.get("rules", []),
                    mode=spec.mode,
                    seeds=y.get("seeds", x.get("seeds")),
                    prompt=y.get("prompt", x.get("prompt")),
                    position=(xi, yi),
                )
            )
    return variants


class SweepInputs(BaseModel):
    """What a sweep job runs: the baseline's pinned models and the expanded variants."""

    arch: str
    pipeline: PipelineVariant = Field(description="How model A's pipeline is built.")
    models: dict[str, PinnedModel] = Field(description="Slot (a, b, c) → the baseline merge's pinned model.")
    variants: list[dict[str, Any]] = Field(description="Each variant as `Variant.to_json` writes it.")


def prepare_sweep(request: SweepRequest, library: ModelLibrary) -> SweepInputs:
    if not request.model_b and (request.model_c or request.elemental or request.elemental_beta):
        raise InvalidInput(
            "invalid-request", "Invalid request", "a baseline merge needs model_b", field="model_b"
        )
    plan = plan_merge(request.baseline_merge(), library, output_name=BASELINE_NAME)
    pipeline = check_probeable(
        plan.pins["a"].name,
        plan.headers["a"],
        plan.variant,
        request.prediction_type,
        library.settings,
        field="model_a",
    )
    variants = expand_variants(request, plan.arch)
    for variant in variants:
        changed = change_plan(plan, variant.change(), plan.arch.unet_blocks)
        if changed.method.needs_c and "c" not in plan.pins:
            raise InvalidInput(
                "invalid-variant",
                "Invalid request",
                f"variant mode {changed.method.name} needs model_c",
                field="variants.mode",
            )
        # The same rules as a merge's: dare's β = 1 is refused here as it is in a merge job.
        check_ratios(changed.method, changed.keys, fields=lambda key, param: f"variants.{param}")
    baselines = {(tuple(v.seeds or request.seeds), v.prompt) for v in variants}
    images = sum(len(v.seeds or request.seeds) for v in variants) + sum(len(seeds) for seeds, _ in baselines)
    if images > MAX_IMAGES:
        raise InvalidInput(
            "too-many-images",
            "Invalid request",
            f"the sweep would generate {images} images; the limit is {MAX_IMAGES}",
            field="variants",
        )
    # Each image is written as a PNG and drawn once more into grid.png, which is built in memory.
    pixels = images * request.width * request.height * PNG_BOUND
    settings = library.settings
    if 2 * pixels > settings.max_capture_bytes or pixels > settings.max_capture_memory_bytes:
        raise InvalidInput(
            "capture-too-large",
            "Capture too large",
            f"the sweep's {images} images of {request.width}x{request.height} would write about "
            f"{2 * pixels / 1024**3:.2f} GiB and hold a {pixels / 1024**3:.2f} GiB grid in worker memory "
            f"(MERGEPROBE_MAX_CAPTURE_BYTES {settings.max_capture_bytes / 1024**3:.2f} GiB, "
            f"MERGEPROBE_MAX_CAPTURE_MEMORY_BYTES {settings.max_capture_memory_bytes / 1024**3:.2f} GiB); "
            "use fewer variants or seeds, or smaller images",
            field="variants",
        )
    return SweepInputs(
        arch=plan.arch.name, pipeline=pipeline, models=plan.pins, variants=[v.to_json() for v in variants]
    )
