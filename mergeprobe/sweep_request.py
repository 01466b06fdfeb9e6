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

from mergeprobe.archs import BASE, UNKNOWN, Architecture, detect_arch, get_arch
from mergeprobe.blockspec import parse_block_set, parse_number
from mergeprobe.dump_request import MAX_PROMPT_CHARS, Sampler
from mergeprobe.elemental import ElementalRule, parse_elemental
from mergeprobe.library import ModelLibrary
from mergeprobe.merge_methods import MERGE_METHODS
from mergeprobe.merge_plan import MergeMode, MergeRequest, WeightValue, plan_merge
from mergeprobe.problems import Problem

MAX_IMAGES = 2000


class PerBlockVariants(BaseModel):
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


class PerElementVariants(BaseModel):
    """One variant per elemental entry (SuperMerger's effective elemental checker)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"elements": ["OUT05:attn2:0", "OUT05:attn1:0", "IN04::0"]}]},
    )

    elements: list[str] = Field(
        min_length=1,
        max_length=500,
        description="Elemental entries `blocks:elements:ratio`; the ratio is the α applied.",
    )
    beta: float | None = Field(default=None, description="β on the matched elements (for modes that use it).")
    mode: MergeMode | None = None


class Axis(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["alpha", "beta", "block", "seed", "prompt", "elemental"] = Field(
        description="What varies: α or β on every U-Net block, α of one block (`block`), the seed, the prompt, "
        "or an elemental entry string (α overrides)."
    )
    block: str | None = Field(
        default=None, description="For kind `block`: the block whose α varies.", examples=["OUT05"]
    )
    values: list[float | int | str] = Field(min_length=1, max_length=32)


class XYVariants(BaseModel):
    """An X × Y grid; each cell combines one value of each axis."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"x": {"kind": "alpha", "values": [0, 0.5, 1]}, "y": {"kind": "seed", "values": [1, 2]}}
            ]
        },
    )

    x: Axis
    y: Axis
    mode: MergeMode | None = None


class SweepRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
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
    model_b: str | None = Field(default=None, description="With a merge: model B of the baseline.")
    model_c: str | None = Field(default=None, description="With a merge: model C of the baseline.")
    mode: MergeMode = Field(
        default="weighted_sum", description="The baseline merge's mode (when model_b is given)."
    )
    alpha: WeightValue = Field(default=0.5, description="The baseline merge's α (as in merge jobs).")
    beta: WeightValue | None = Field(default=None, description="The baseline merge's β.")
    base_alpha: float | None = None
    elemental: str | None = Field(default=None, description="The baseline merge's elemental overrides.")
    variants: PerBlockVariants | PerElementVariants | XYVariants
    prompt: str = Field(max_length=MAX_PROMPT_CHARS, examples=["a cute girl"])
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3, 4], min_length=1, max_length=16)
    steps: int = Field(default=20, ge=1, le=150)
    sampler: Sampler = "euler_a"
    cfg_scale: float = Field(default=7.0, ge=0, le=30)
    width: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    height: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    diff_threshold: float = Field(
        default=20.0, ge=0, le=255, description="On the 0–255 scale, as SuperMerger's checker."
    )

    def baseline_merge(self) -> MergeRequest | None:
        """The baseline as a merge request (planned, never written), or None for model_a alone."""
        if not self.model_b:
            return None
        return MergeRequest(
            model_a=self.model_a,
            model_b=self.model_b,
            model_c=self.model_c,
            mode=self.mode,
            alpha=self.alpha,
            beta=self.beta,
            base_alpha=self.base_alpha,
            elemental=self.elemental,
        )

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


@dataclass
class Override:
    """α and/or β on every key of some blocks."""

    blocks: tuple[str, ...]
    alpha: float | None = None
    beta: float | None = None


@dataclass
class Variant:
    """One cell: overrides of α/β on U-Net keys (blocks first, then elemental rules, later wins),
    and optionally its own seeds or prompt."""

    name: str
    label: str
    overrides: list[Override] = field(default_factory=list)
    rules: list[dict[str, Any]] = field(default_factory=list)  # elemental rules: α = ratio, β = rule_beta
    rule_beta: float | None = None
    mode: str | None = None
    seeds: list[int] | None = None
    prompt: str | None = None
    position: tuple[int, int] | None = None  # (x, y) in an XY grid

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "overrides": [
                {"blocks": list(o.blocks), "alpha": o.alpha, "beta": o.beta} for o in self.overrides
            ],
            "rules": self.rules,
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
            overrides=[Override(tuple(o["blocks"]), o["alpha"], o["beta"]) for o in data["overrides"]],
            rules=data["rules"],
            rule_beta=data["rule_beta"],
            mode=data["mode"],
            seeds=data["seeds"],
            prompt=data["prompt"],
            position=tuple(data["position"]) if data["position"] else None,
        )


def _rules_json(rules: list[ElementalRule]) -> list[dict[str, Any]]:
    return [
        {
            "blocks": sorted(r.blocks - {BASE}),
            "elements": list(r.elements),
            "negated": r.elements_negated,
            "ratio": r.ratio,
            "source": r.source,
        }
        for r in rules
    ]


def rule_matches_json(rule: dict[str, Any], block: str, element: str) -> bool:
    if block not in rule["blocks"]:
        return False
    if not rule["elements"]:
        return True
    return any(e in element for e in rule["elements"]) != rule["negated"]


def _no_base_only(rules: list[ElementalRule], field_name: str) -> None:
    for rule in rules:
        if rule.blocks == {BASE}:
            raise Problem(
                400,
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
            raise Problem(
                400,
                "invalid-variant",
                "Invalid request",
                "axis kind `block` needs `block`",
                field=f"{field_name}.block",
            )
        blocks = tuple(parse_block_set(axis.block, arch, field=f"{field_name}.block"))
    for i, value in enumerate(axis.values):
        where = f"{field_name}.values[{i}]"
        if axis.kind in ("alpha", "beta", "block"):
            if isinstance(value, str):
                value = parse_number(value, field=where)
            number = float(value)
            if axis.kind == "block":
                parts.append(
                    {"label": f"{axis.block} alpha={number:g}", "overrides": [Override(blocks, alpha=number)]}
                )
            else:
                override = Override(arch.unet_blocks, **{axis.kind: number})
                parts.append({"label": f"{axis.kind}={number:g}", "overrides": [override]})
        elif axis.kind == "seed":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
                raise Problem(
                    400, "invalid-variant", "Invalid request", "seeds are integers in [0, 2**32)", field=where
                )
            parts.append({"label": f"seed={value}", "seeds": [value]})
        elif axis.kind == "prompt":
            if not isinstance(value, str) or len(value) > MAX_PROMPT_CHARS:
                raise Problem(
                    400, "invalid-variant", "Invalid request", "prompt values are strings", field=where
                )
            parts.append({"label": value[:40], "prompt": value})
        else:
            if not isinstance(value, str):
                raise Problem(
                    400,
                    "invalid-variant",
                    "Invalid request",
                    "elemental values are entry strings",
                    field=where,
                )
            rules = parse_elemental(value, arch, field=where)
            _no_base_only(rules, where)
            parts.append({"label": value[:40], "rules": _rules_json(rules)})
    return parts


def expand_variants(request: SweepRequest, arch: Architecture) -> list[Variant]:
    spec = request.variants
    if isinstance(spec, PerBlockVariants):
        blocks = parse_block_set(spec.blocks, arch, field="variants.blocks")
        return [
            Variant(b, b, overrides=[Override((b,), spec.alpha, spec.beta)], mode=spec.mode) for b in blocks
        ]
    if isinstance(spec, PerElementVariants):
        variants = []
        for i, entry in enumerate(spec.elements):
            rules = parse_elemental(entry, arch, field=f"variants.elements[{i}]")
            _no_base_only(rules, f"variants.elements[{i}]")
            variants.append(
                Variant(f"e{i:02d}", entry, rules=_rules_json(rules), rule_beta=spec.beta, mode=spec.mode)
            )
        return variants
    if spec.x.kind == spec.y.kind and spec.x.kind in ("seed", "prompt", "alpha", "beta"):
        raise Problem(
            400,
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


def prepare_sweep(request: SweepRequest, library: ModelLibrary) -> dict[str, Any]:
    merge = request.baseline_merge()
    if merge is not None:
        plan = plan_merge(merge, library, output_name="sweep-baseline.safetensors")
        arch = plan.arch
        models = {slot: p.name for slot, p in plan.paths.items()}
    else:
        if request.model_c or request.elemental:
            raise Problem(
                400, "invalid-request", "Invalid request", "a baseline merge needs model_b", field="model_b"
            )
        path = library.resolve(request.model_a, field="model_a")
        arch_name = detect_arch(library.header(path, field="model_a").tensors)
        if arch_name == UNKNOWN:
            raise Problem(
                400,
                "unknown-architecture",
                "Unknown architecture",
                f"{path.name} matches none of sd1, sd2, sdxl",
                field="model_a",
            )
        arch = get_arch(arch_name)
        models = {"a": path.name}
    variants = expand_variants(request, arch)
    default_mode = request.mode if request.model_b else "scaled_sum"
    for variant in variants:
        method = MERGE_METHODS[variant.mode or default_mode]
        if method.needs_c and not request.model_c:
            raise Problem(
                400,
                "invalid-variant",
                "Invalid request",
                f"variant mode {method.name} needs model_c",
                field="variants.mode",
            )
        gives_beta = (
            any(o.beta is not None for o in variant.overrides)
            or variant.rule_beta is not None
            or request.beta is not None
        )
        if method.beta_required and not gives_beta:
            raise Problem(
                400,
                "invalid-variant",
                "Invalid request",
                f"variant mode {method.name} needs beta ({method.beta})",
                field="variants.beta",
            )
    baselines = {(tuple(v.seeds or request.seeds), v.prompt) for v in variants}
    images = sum(len(v.seeds or request.seeds) for v in variants) + sum(len(seeds) for seeds, _ in baselines)
    if images > MAX_IMAGES:
        raise Problem(
            400,
            "too-many-images",
            "Invalid request",
            f"the sweep would generate {images} images; the limit is {MAX_IMAGES}",
            field="variants",
        )
    return {
        "arch": arch.name,
        "models": models,
        "variants": [v.to_json() for v in variants],
    }
