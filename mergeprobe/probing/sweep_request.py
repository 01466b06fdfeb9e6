"""Sweep jobs: the request, and its expansion into variants (pure Python, no torch).

A sweep loads a baseline once (model_a, or a merge of model_a/b/c computed in memory),
then for each variant patches only the U-Net tensors whose merge ratios it changes,
generates the same prompt and seeds, and restores the tensors bit for bit.

Variants act on U-Net blocks (IN00 … OUTnn); BASE (text encoders and VAE) is set by the
baseline merge only. A variant's formula is `mode` (default: the baseline's mode when the
baseline is a merge, else `scaled_sum`); without model_b, B is taken to be A, so the
layer-influence study — α = 0, β = 0.75 on one block — weakens that block to 75 %.

`loras` are added to the baseline in memory (after its merge, as a merge job adds them), and
variants may change a LoRA's strength on U-Net blocks: per block (`LoraBlockVariants`, the
study of one LoRA: switched off on one block at a time) or along an XY axis (`lora_strength`,
`lora_block`). A variant's LoRA change is resolved at submission into the strength applied per
(LoRA, block), `Variant.lora_strengths`, which the plan change carries (`PlanChange`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergeprobe.checkpoints.archs import BASE, Architecture
from mergeprobe.checkpoints.library import ModelLibrary, PinnedModel
from mergeprobe.lora.bake_plan import MAX_STRENGTH, LoraMatch, LoraMatching, match_loras
from mergeprobe.lora.lora_block_weights import resolve_lora_block_weights
from mergeprobe.lora.lora_request import MAX_LORAS, LoraApplication
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


class LoraBlockVariants(RequestModel):
    """One variant per named block with one LoRA's weight set on that block (the layer-influence
    study of a LoRA: with `weight` 0, the LoRA switched off on one block at a time)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"lora": 0, "blocks": "IN00-OUT11", "weight": 0}]},
    )

    lora: int = Field(ge=0, description="The LoRA varied: its index in `loras`.")
    blocks: str = Field(
        default="IN00-OUT11",
        description="U-Net block set, as for per-block variants: one variant per block. BASE (the text "
        "encoders) is refused: the LoRA's text-encoder strength is the baseline's.",
    )
    weight: float = Field(
        default=0.0,
        ge=-100,
        le=100,
        description="The LoRA's block weight on the varied block: its strength there becomes "
        "`loras[lora].strength × weight` (0: switched off there).",
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


LORA_KINDS = ("lora_strength", "lora_block")
AxisKind = Literal["alpha", "beta", "block", "seed", "prompt", "elemental", "lora_strength", "lora_block"]


class Axis(RequestModel):
    kind: AxisKind = Field(
        description="What varies: α or β on every U-Net block, α of one block (`block`), the seed, the prompt, "
        "an elemental entry string (α overrides), a LoRA's strength on every U-Net block (`lora_strength`; "
        "its text-encoder strength stays the baseline's), or a LoRA's block weight on `block` (`lora_block`: "
        "its strength there is the LoRA's strength × the value)."
    )
    block: str | None = Field(
        default=None,
        description="For kinds `block` and `lora_block`: the U-Net block (or block set) varied.",
        examples=["OUT05"],
    )
    lora: int | None = Field(
        default=None,
        ge=0,
        description="For kinds `lora_strength` and `lora_block`: the LoRA, its index in `loras` (default 0).",
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
    variants: PerBlockVariants | PerElementVariants | LoraBlockVariants | XYVariants
    loras: list[LoraApplication] = Field(
        default_factory=list,
        max_length=MAX_LORAS,
        description="LoRAs added to the baseline in memory after its merge, as a merge job's `loras` (matched "
        "against model A's keys; strength × block weight × ΔW per modified tensor, text encoders included); "
        "never written, and the cached pipeline gets its own weights back bit for bit. Reported per LoRA in "
        'the result. Variants may change a LoRA\'s strength on U-Net blocks: `{"lora": 0, "blocks": '
        '"IN00-OUT11", "weight": 0}`, XY kinds `lora_strength` and `lora_block`.',
    )
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
    loras: list[LoraMatch] = Field(
        default_factory=list,
        description="Per LoRA of the request: what it matched in model A and the strengths applied per block "
        "in the baseline.",
    )


@dataclass(frozen=True)
class LoraOverride:
    """A LoRA's strength and/or block weight on some U-Net blocks (None keeps the baseline's)."""

    lora: int
    blocks: frozenset[str]
    strength: float | None = None
    weight: float | None = None
    field: str = ""  # the request field it came from, for errors


@dataclass(frozen=True)
class LoraBase:
    """A LoRA of the request as the baseline applies it: its strength and block weights."""

    strength: float
    weights: dict[str, float]


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
    # LoRA index → block → the strength applied there (strength × block weight), where it differs
    # from the baseline's by request
    lora_strengths: dict[int, dict[str, float]] = field(default_factory=dict)

    def change(self) -> PlanChange:
        """What this variant changes in the baseline's plan."""
        return PlanChange(
            overrides=tuple(self.overrides),
            rules=tuple(self.rules),
            rule_beta=self.rule_beta,
            method=MERGE_METHODS[self.mode] if self.mode else None,
            lora_strengths=tuple(
                (lora, block, strength)
                for lora, per_block in sorted(self.lora_strengths.items())
                for block, strength in per_block.items()
            ),
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
            "lora_strengths": {str(lora): per_block for lora, per_block in self.lora_strengths.items()},
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
            lora_strengths={
                int(lora): dict(per_block) for lora, per_block in data.get("lora_strengths", {}).items()
            },
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


def _lora_bases(request: SweepRequest, arch: Architecture) -> list[LoraBase]:
    """Each LoRA of the request as the baseline applies it (its strength and block weights)."""
    return [
        LoraBase(
            application.strength,
            resolve_lora_block_weights(
                1.0 if application.blocks is None else application.blocks, arch, field=f"loras[{i}].blocks"
            ),
        )
        for i, application in enumerate(request.loras)
    ]


def _lora_index(index: int | None, request: SweepRequest, field_name: str) -> int:
    """The LoRA a variant varies (default the first), which must be one of the request's."""
    index = 0 if index is None else index
    if not request.loras:
        raise InvalidInput(
            "invalid-variant",
            "Invalid request",
            "LoRA variants vary a LoRA of `loras`, and the request has none",
            field=field_name,
        )
    if index >= len(request.loras):
        raise InvalidInput(
            "invalid-variant",
            "Invalid request",
            f"there is no LoRA {index}: `loras` has {len(request.loras)} "
            f"(indices 0–{len(request.loras) - 1})",
            field=field_name,
        )
    return index


def _lora_blocks(spec: str | None, arch: Architecture, field_name: str) -> frozenset[str]:
    """The U-Net blocks a LoRA variant names. BASE is refused: variants change U-Net tensors only,
    so a LoRA's text-encoder strength is the baseline's."""
    if not spec:
        raise InvalidInput(
            "invalid-variant", "Invalid request", "name the U-Net blocks varied", field=field_name
        )
    blocks = parse_block_set(spec, arch, field=field_name, allow_base=True)
    if BASE in blocks:
        raise InvalidInput(
            "invalid-variant",
            "Invalid request",
            "BASE (the text encoders) cannot vary per variant: sweep variants change U-Net blocks only, so a "
            "LoRA's text-encoder strength is the baseline's (set it with the LoRA's `blocks`, e.g. "
            "`BASE:0.5, _:1`)",
            field=field_name,
            position=max(spec.upper().find("BASE"), 0),
        )
    return frozenset(blocks)


def _lora_strengths(
    overrides: list[LoraOverride], bases: list[LoraBase], arch: Architecture
) -> dict[int, dict[str, float]]:
    """LoRA → block → the strength applied there with `overrides` (later ones winning): the given or
    the baseline's strength × the given or the baseline's block weight."""
    chosen: dict[tuple[int, str], tuple[float | None, float | None, str]] = {}
    for override in overrides:
        for block in override.blocks:
            strength, weight, _ = chosen.get((override.lora, block), (None, None, ""))
            chosen[(override.lora, block)] = (
                override.strength if override.strength is not None else strength,
                override.weight if override.weight is not None else weight,
                override.field,
            )
    result: dict[int, dict[str, float]] = {}
    for lora in sorted({lora for lora, _ in chosen}):
        base = bases[lora]
        for block in arch.unet_blocks:
            if (lora, block) not in chosen:
                continue
            strength, weight, where = chosen[(lora, block)]
            # The same product, in the same order, as bake_plan.match_loras: a variant that repeats
            # the baseline's strength changes nothing, bit for bit.
            applied = (base.strength if strength is None else strength) * (
                base.weights[block] if weight is None else weight
            )
            if not abs(applied) <= MAX_STRENGTH:
                raise InvalidInput(
                    "invalid-strength",
                    "Invalid strength",
                    f"loras[{lora}]'s strength on {block} would be {applied:g}; at most {MAX_STRENGTH:g} in size",
                    field=where,
                )
            result.setdefault(lora, {})[block] = applied
    return result


def _axis_parts(
    axis: Axis, arch: Architecture, field_name: str, request: SweepRequest
) -> list[dict[str, Any]]:
    """Each value of an axis as a partial variant: label plus overrides, rules, LoRA overrides,
    seeds or prompt."""
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
    if axis.kind in LORA_KINDS:
        lora = _lora_index(axis.lora, request, f"{field_name}.lora")
        if axis.kind == "lora_block":
            blocks = _lora_blocks(axis.block, arch, f"{field_name}.block")
        elif axis.block:
            raise InvalidInput(
                "invalid-variant",
                "Invalid request",
                "`block` is for kinds block and lora_block: lora_strength varies every U-Net block",
                field=f"{field_name}.block",
            )
    elif axis.lora is not None:
        raise InvalidInput(
            "invalid-variant",
            "Invalid request",
            "`lora` is for kinds lora_strength and lora_block",
            field=f"{field_name}.lora",
        )
    for i, value in enumerate(axis.values):
        where = f"{field_name}.values[{i}]"
        if axis.kind in ("alpha", "beta", "block", *LORA_KINDS):
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
            elif axis.kind == "lora_strength":
                override = LoraOverride(lora, frozenset(arch.unet_blocks), strength=number, field=where)
                parts.append({"label": f"lora{lora}={number:g}", "loras": [override]})
            elif axis.kind == "lora_block":
                override = LoraOverride(lora, blocks, weight=number, field=where)
                parts.append({"label": f"{axis.block} lora{lora}={number:g}", "loras": [override]})
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


def _same_axes(x: Axis, y: Axis) -> bool:
    """Whether x and y vary the same thing (a grid whose every cell takes y's value of it)."""
    if x.kind != y.kind:
        return False
    if x.kind in ("seed", "prompt", "alpha", "beta"):
        return True
    if x.kind == "lora_strength":
        return (x.lora or 0) == (y.lora or 0)
    return x.kind == "lora_block" and (x.lora or 0) == (y.lora or 0) and x.block == y.block


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
    bases = _lora_bases(request, arch)
    if isinstance(spec, LoraBlockVariants):
        # The study's variants, named by block as per-block merge variants are (the U grid, the ranking).
        lora = _lora_index(spec.lora, request, "variants.lora")
        blocks = _lora_blocks(spec.blocks, arch, "variants.blocks")
        return [
            Variant(
                b,
                b,
                lora_strengths=_lora_strengths(
                    [LoraOverride(lora, frozenset((b,)), weight=spec.weight, field="variants.weight")],
                    bases,
                    arch,
                ),
            )
            for b in arch.unet_blocks
            if b in blocks
        ]
    if _same_axes(spec.x, spec.y):
        raise InvalidInput(
            "invalid-variant",
            "Invalid request",
            f"x and y both vary {spec.x.kind}",
            field="variants.y.kind",
        )
    xs = _axis_parts(spec.x, arch, "variants.x", request)
    ys = _axis_parts(spec.y, arch, "variants.y", request)
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
                    lora_strengths=_lora_strengths(x.get("loras", []) + y.get("loras", []), bases, arch),
                )
            )
    return variants


def _lora_variant_warnings(request: SweepRequest, arch: Architecture, matching: LoraMatching) -> list[str]:
    """What LoRA variants will not do that their request may suggest."""
    warnings = []
    spec = request.variants
    if isinstance(spec, XYVariants):
        for name, axis in (("x", spec.x), ("y", spec.y)):
            if axis.kind not in LORA_KINDS:
                continue
            report = matching.reports[axis.lora or 0]
            te = sum(n for component, n in report.matched_by_component.items() if component != "unet")
            if axis.kind == "lora_strength" and te:
                warnings.append(
                    f"variants.{name}: lora_strength sets loras[{axis.lora or 0}] ({report.lora.name})'s strength "
                    f"on the U-Net blocks; its {te} text-encoder modules keep the baseline's strength"
                )
            if axis.kind == "lora_block":
                blocks = _lora_blocks(axis.block, arch, f"variants.{name}.block")
                if not any(report.matched_by_block.get(b) for b in blocks):
                    warnings.append(
                        f"variants.{name}: loras[{axis.lora or 0}] ({report.lora.name}) modifies no tensor of "
                        f"{axis.block}; its values change nothing"
                    )
    elif isinstance(spec, LoraBlockVariants):
        report = matching.reports[spec.lora]
        blocks = _lora_blocks(spec.blocks, arch, "variants.blocks")
        idle = [b for b in arch.unet_blocks if b in blocks and not report.matched_by_block.get(b)]
        if idle:
            warnings.append(
                f"variants: loras[{spec.lora}] ({report.lora.name}) modifies no tensor of {', '.join(idle)}; "
                "those variants are the baseline"
            )
    return warnings


class SweepInputs(BaseModel):
    """What a sweep job runs: the baseline's pinned models and the expanded variants."""

    arch: str
    pipeline: PipelineVariant = Field(description="How model A's pipeline is built.")
    models: dict[str, PinnedModel] = Field(description="Slot (a, b, c) → the baseline merge's pinned model.")
    variants: list[dict[str, Any]] = Field(description="Each variant as `Variant.to_json` writes it.")
    loras: list[PinnedModel] = Field(default_factory=list, description="The request's LoRAs, pinned.")
    warnings: list[str] = Field(default_factory=list, description="Found at submission, reported by the job.")


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
    # LoRAs are matched against model A's keys, as a merge job's are; a LoRA for another
    # architecture or matching nothing is a 400 naming it (loras[i].model).
    matching = (
        match_loras(plan.arch.name, plan.headers["a"], plan.pins["a"].name, request.loras, library)
        if request.loras
        else None
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
        arch=plan.arch.name,
        pipeline=pipeline,
        models=plan.pins,
        variants=[v.to_json() for v in variants],
        loras=matching.pins if matching else [],
        warnings=_lora_variant_warnings(request, plan.arch, matching) if matching else [],
    )
