"""Merge requests and their plans, decided from the safetensors headers alone.

The plan says, for every output key, its block, element, α, β and action; the API
answers dry runs with it and validates every request against it before queueing
(shape and architecture mismatches are 400s before any tensor is read); the worker's
engine executes it tensor by tensor.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mergeprobe.archs import (
    BASE,
    UNET_PREFIX,
    UNKNOWN,
    Architecture,
    block_of_key,
    detect_arch,
    element_of_key,
    get_arch,
)
from mergeprobe.blockspec import resolve_block_weights
from mergeprobe.checkpoint_headers import CheckpointHeader, TensorInfo
from mergeprobe.elemental import (
    elemental_ratio,
    elements_by_block,
    parse_elemental,
    unmatched_rules,
)
from mergeprobe.library import ModelLibrary, validate_model_name
from mergeprobe.merge_methods import MERGE_METHODS, MergeMethod
from mergeprobe.problems import Problem

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
OUTPUT_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
# Prefixes of everything a Stable Diffusion pipeline needs; `prune` drops the rest (EMA
# copies, optimizer or loss state, scheduler buffers).
KEPT_WHEN_PRUNED = (UNET_PREFIX, "first_stage_model.", "cond_stage_model.", "conditioner.")
VAE_PREFIX = "first_stage_model."
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"

Action = Literal["merge", "copy_a", "copy_b", "keep_a", "copy_vae"]
WeightValue = float | list[float] | str
MergeMode = Literal[tuple(MERGE_METHODS)]  # type: ignore[valid-type]

_WEIGHT_DOC = (
    "A number; a list of per-block numbers (sd1/sd2: 25 values IN00…OUT11 or 26 with BASE first; sdxl: 19 "
    "or 20); a block spec string such as `IN00-IN05:0.2, M00:1, OUT00-OUT11(+2):0.7, _:0.5` (later entries "
    "win, `_`/`default` for the rest, `BASE:x` for the text encoders and VAE); or a preset name (GET "
    "/v1/presets)."
)


class MergeOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        default=None,
        description="File name of the result in the library (ends .safetensors). Default: derived from the inputs.",
        examples=["my-merge.safetensors"],
    )
    dtype: Literal["fp16", "bf16", "fp32", "keep"] = Field(
        default="fp16",
        description="Output dtype of floating-point tensors; `keep` keeps each input tensor's dtype.",
    )
    prune: bool = Field(
        default=False,
        description="Drop EMA and training-only keys (everything outside the U-Net, VAE and text encoders).",
    )
    bake_vae: str | None = Field(
        default=None,
        description="A model (full checkpoint or standalone VAE) whose VAE replaces the result's.",
    )
    metadata: dict[str, str] = Field(
        default_factory=dict, description="Extra string pairs for the output's `__metadata__`."
    )


class MergeRequest(BaseModel):
    """A block-weighted merge of two or three checkpoints, streamed tensor by tensor."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_a": "tiny-sd1-a",
                    "model_b": "tiny-sd1-b",
                    "mode": "weighted_sum",
                    "alpha": "IN00-IN11:0.2, M00:0.5, OUT00-OUT11:0.8",
                    "base_alpha": 0,
                    "output": {"name": "blend.safetensors", "dtype": "fp16"},
                }
            ]
        },
    )

    model_a: str = Field(description="Model id or name from the library: the base.", examples=["tiny-sd1-a"])
    model_b: str = Field(description="Model id or name: α is its share.", examples=["tiny-sd1-b"])
    model_c: str | None = Field(
        default=None, description="Third model, only for modes that use one.", examples=["tiny-sd1-c"]
    )
    mode: MergeMode = Field(
        default="weighted_sum",
        description="Merge method (see the description for formulas).",
        examples=["weighted_sum"],
    )
    alpha: WeightValue = Field(
        default=0.5, description="α per block. " + _WEIGHT_DOC, examples=[0.5, "GRAD_V"]
    )
    beta: WeightValue | None = Field(
        default=None, description="β per block, for modes that use it. " + _WEIGHT_DOC
    )
    base_alpha: float | None = Field(
        default=None,
        description="BASE's α (text encoders and VAE). Default: alpha when it is a number, else 0.",
    )
    base_beta: float | None = Field(
        default=None, description="BASE's β. Default: beta when it is a number, else the mode's default."
    )
    elemental: str | None = Field(
        default=None,
        description="Per-element overrides of α, applied last: `blocks:elements:ratio` entries separated by commas or newlines.",
        examples=["OUT05:attn2:0.2"],
    )
    elemental_beta: str | None = Field(default=None, description="Per-element overrides of β (same syntax).")
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Seed of random merge methods (dare).")
    output: MergeOutput = Field(default_factory=MergeOutput)
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where tensors are combined.")


class ElementalRequest(MergeRequest):
    """A merge whose `elemental` overrides are the point: the plan is written as plan.csv."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_a": "tiny-sd1-a",
                    "model_b": "tiny-sd1-b",
                    "alpha": 0.5,
                    "elemental": "OUT05:attn2:0.2\nNOT OUT04:attn:1",
                }
            ]
        },
    )

    elemental: str = Field(
        description="Per-element overrides of α: `blocks:elements:ratio`, e.g. `OUT05:attn2:0.2`.",
        examples=["OUT03 OUT04 OUT05:attn2 attn1.to_out:0.5"],
    )


@dataclass(frozen=True)
class KeyPlan:
    key: str
    block: str
    element: str
    alpha: float | None
    beta: float | None
    action: Action
    dtype: str  # output dtype (safetensors name)
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "block": self.block,
            "element": self.element,
            "alpha": self.alpha,
            "beta": self.beta,
            "action": self.action,
        }


@dataclass
class MergePlan:
    arch: Architecture
    method: MergeMethod
    paths: dict[str, Path]  # "a", "b", optionally "c" and "vae"
    headers: dict[str, CheckpointHeader]
    keys: list[KeyPlan]
    output_name: str
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch.name,
            "mode": self.method.name,
            "output": self.output_name,
            "keys": [k.to_json() for k in self.keys],
            "warnings": self.warnings,
        }

    def inputs(self) -> dict[str, Any]:
        """What the job record keeps, so the worker re-plans from the same files."""
        return {
            "arch": self.arch.name,
            "models": {k: p.name for k, p in self.paths.items()},
            "output": self.output_name,
        }


def _resolve_models(
    request: MergeRequest, library: ModelLibrary
) -> tuple[dict[str, Path], dict[str, CheckpointHeader]]:
    method = MERGE_METHODS[request.mode]
    refs = {"a": ("model_a", request.model_a), "b": ("model_b", request.model_b)}
    if method.needs_c:
        if not request.model_c:
            raise Problem(
                400, "missing-model", "Invalid request", f"mode {method.name} needs model_c", field="model_c"
            )
        refs["c"] = ("model_c", request.model_c)
    elif request.model_c and request.mode not in ("ties", "dare"):
        raise Problem(
            400,
            "unused-model",
            "Invalid request",
            f"mode {method.name} does not use model_c",
            field="model_c",
        )
    elif request.model_c:
        refs["c"] = ("model_c", request.model_c)
    if request.output.bake_vae:
        refs["vae"] = ("output.bake_vae", request.output.bake_vae)
    paths, headers = {}, {}
    for slot, (field_name, ref) in refs.items():
        paths[slot] = library.resolve(ref, field=field_name)
        headers[slot] = library.header(paths[slot], field=field_name)
    return paths, headers


def _arch_of(headers: dict[str, CheckpointHeader]) -> Architecture:
    archs = {slot: detect_arch(h.tensors) for slot, h in headers.items() if slot != "vae"}
    if archs["a"] == UNKNOWN:
        raise Problem(
            400,
            "unknown-architecture",
            "Unknown architecture",
            "model_a matches none of sd1, sd2, sdxl",
            field="model_a",
        )
    for slot, arch in archs.items():
        if arch != archs["a"]:
            raise Problem(
                400,
                "architecture-mismatch",
                "Architecture mismatch",
                f"model_a is {archs['a']} but model_{slot} is {arch}: they cannot be merged",
                field=f"model_{slot}",
            )
    return get_arch(archs["a"])


def _weights(
    value: Any, base: float | None, arch: Architecture, field_name: str, default_base: float | None
) -> dict[str, float | None]:
    weights = resolve_block_weights(value, arch, field=field_name)
    if base is not None:
        weights[BASE] = base
    elif weights[BASE] is None:
        weights[BASE] = _single_number(value) if _single_number(value) is not None else default_base
    return weights


def _single_number(value: Any) -> float | None:
    """A weight given as one number (or a string holding one) applies to BASE too."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip()) if math.isfinite(float(value.strip())) else None
        except ValueError:
            return None
    return None


def _out_dtype(requested: str, source: TensorInfo) -> str:
    if source.dtype not in FLOAT_DTYPES or requested == "keep":
        return source.dtype
    return OUTPUT_DTYPES[requested]


def _vae_tensors(header: CheckpointHeader) -> dict[str, str]:
    """Output key → key in the VAE file (a full checkpoint or a standalone VAE)."""
    full = {k: k for k in header.tensors if k.startswith(VAE_PREFIX)}
    if full:
        return full
    standalone = {
        VAE_PREFIX + k: k
        for k in header.tensors
        if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
    }
    if not standalone:
        raise Problem(
            400, "not-a-vae", "Invalid request", "output.bake_vae has no VAE keys", field="output.bake_vae"
        )
    return standalone


def default_output_name(request: MergeRequest, paths: dict[str, Path]) -> str:
    stems = "_".join(paths[s].name.rsplit(".", 1)[0][:40] for s in ("a", "b", "c") if s in paths)
    return f"{stems}_{request.mode}_{secrets.token_hex(3)}.safetensors"


def plan_merge(request: MergeRequest, library: ModelLibrary, *, output_name: str | None = None) -> MergePlan:
    if request.mode not in MERGE_METHODS:
        raise Problem(
            400,
            "unknown-mode",
            "Invalid request",
            f"unknown mode {request.mode!r}; known: {', '.join(MERGE_METHODS)}",
            field="mode",
        )
    method = MERGE_METHODS[request.mode]
    paths, headers = _resolve_models(request, library)
    arch = _arch_of(headers)
    name = output_name or request.output.name or default_output_name(request, paths)
    validate_model_name(name, field="output.name")
    if not name.endswith(".safetensors"):
        raise Problem(
            400,
            "invalid-model-name",
            "Invalid request",
            "the output is written as .safetensors",
            field="output.name",
        )

    alphas = _weights(request.alpha, request.base_alpha, arch, "alpha", 0.0)
    if request.beta is None:
        if method.beta_required:
            raise Problem(
                400,
                "missing-beta",
                "Invalid request",
                f"mode {method.name} needs beta ({method.beta})",
                field="beta",
            )
        # Only BASE's β may be given; the U-Net blocks keep the mode's default (None).
        betas: dict[str, float | None] = dict.fromkeys(arch.blocks)
        betas[BASE] = request.base_beta
    else:
        betas = _weights(request.beta, request.base_beta, arch, "beta", None)
        if betas[BASE] is None and method.name != "scaled_sum":
            betas[BASE] = 0.0
    if method.beta is None and (request.beta is not None or request.base_beta is not None):
        raise Problem(
            400,
            "unused-beta",
            "Invalid request",
            f"mode {method.name} does not use beta",
            field="beta" if request.beta is not None else "base_beta",
        )
    rules_a = parse_elemental(request.elemental, arch, field="elemental") if request.elemental else []
    rules_b = (
        parse_elemental(request.elemental_beta, arch, field="elemental_beta")
        if request.elemental_beta
        else []
    )
    if rules_b and method.beta is None:
        raise Problem(
            400,
            "unused-beta",
            "Invalid request",
            f"mode {method.name} does not use beta",
            field="elemental_beta",
        )

    a, b = headers["a"].tensors, headers["b"].tensors
    c = headers["c"].tensors if "c" in headers else None
    vae = _vae_tensors(headers["vae"]) if "vae" in headers else {}
    prune = request.output.prune
    keys: list[KeyPlan] = []
    warnings: list[str] = []
    out_keys = [k for k in a] + [k for k in b if k not in a]
    for key in out_keys:
        if prune and not key.startswith(KEPT_WHEN_PRUNED):
            continue
        try:
            block, element = block_of_key(arch, key), element_of_key(arch, key)
        except ValueError as exc:
            raise Problem(
                400, "unknown-key", "Invalid checkpoint", str(exc), field="model_a" if key in a else "model_b"
            ) from None
        alpha = alphas[block]
        beta = betas[block]
        if rules_a:
            alpha = (
                elemental_ratio(rules_a, block, element)
                if elemental_ratio(rules_a, block, element) is not None
                else alpha
            )
        if rules_b:
            over = elemental_ratio(rules_b, block, element)
            beta = over if over is not None else beta
        if key in vae:
            src = headers["vae"].tensors[vae[key]]
            if key in a and a[key].shape != src.shape:
                raise _shape_problem(key, a[key], src, "output.bake_vae")
            keys.append(
                KeyPlan(
                    key,
                    block,
                    element,
                    None,
                    None,
                    "copy_vae",
                    _out_dtype(request.output.dtype, src),
                    src.shape,
                )
            )
            continue
        if key not in a:
            keys.append(
                KeyPlan(
                    key,
                    block,
                    element,
                    None,
                    None,
                    "copy_b",
                    _out_dtype(request.output.dtype, b[key]),
                    b[key].shape,
                )
            )
            continue
        ta = a[key]
        out = _out_dtype(request.output.dtype, ta)
        if key not in b:
            keys.append(KeyPlan(key, block, element, None, None, "copy_a", out, ta.shape))
            continue
        if ta.dtype not in FLOAT_DTYPES or "position_ids" in key:
            keys.append(KeyPlan(key, block, element, None, None, "keep_a", out, ta.shape))
            continue
        for slot, other in (("b", b), ("c", c)):
            if other is None:
                continue
            if key not in other:
                if slot == "c" and method.needs_c:
                    warnings.append(f"{key}: not in model_c; kept as in model_a")
                    keys.append(KeyPlan(key, block, element, None, None, "copy_a", out, ta.shape))
                    break
                continue
            if other[key].shape != ta.shape and not _conv_in_channels_differ(key, ta, other[key]):
                raise _shape_problem(key, ta, other[key], f"model_{slot}")
        else:
            # Mixed channel counts always take the arithmetic path: only it keeps A's extra channels.
            partial = any(o is not None and key in o and o[key].shape != ta.shape for o in (b, c))
            action = "merge" if partial else _shortcut(method, alpha, beta)
            keys.append(KeyPlan(key, block, element, alpha, beta, action, out, ta.shape))
    if method.name == "dare":
        for k in keys:
            if k.action == "merge" and not 0.0 <= (k.beta or 0.0) < 1.0:
                raise Problem(
                    400,
                    "invalid-beta",
                    "Invalid request",
                    f"dare's β (drop probability) must be in [0, 1); {k.key} has {k.beta}",
                    field="beta",
                )
    for rules, field_name in ((rules_a, "elemental"), (rules_b, "elemental_beta")):
        if rules:
            grouped = elements_by_block(arch, [k.key for k in keys])
            for rule in unmatched_rules(rules, grouped):
                warnings.append(f"{field_name} entry {rule.index} (`{rule.source}`) matches no key")
    return MergePlan(arch, method, paths, headers, keys, name, warnings)


def _shortcut(method: MergeMethod, alpha: float | None, beta: float | None) -> Action:
    """Exact results that need no arithmetic: taken byte for byte (and faster)."""
    if method.name == "weighted_sum" and alpha == 0.0:
        return "copy_a"
    if method.name == "weighted_sum" and alpha == 1.0:
        return "copy_b"
    if method.name in ("add_difference", "train_difference") and alpha == 0.0:
        return "copy_a"
    if method.name == "scaled_sum" and alpha == 0.0 and beta == 1.0:
        return "copy_a"
    return "merge"


def _conv_in_channels_differ(key: str, ta: TensorInfo, tb: TensorInfo) -> bool:
    """Inpainting (9 input channels) vs normal (4): the shared channels merge, A's others stay."""
    return (
        key == CONV_IN
        and len(ta.shape) == len(tb.shape) == 4
        and ta.shape[0] == tb.shape[0]
        and ta.shape[2:] == tb.shape[2:]
    )


def _shape_problem(key: str, ta: TensorInfo, other: TensorInfo, field_name: str) -> Problem:
    return Problem(
        400,
        "shape-mismatch",
        "Shape mismatch",
        f"{key}: model_a has shape {list(ta.shape)} but {field_name} has {list(other.shape)}",
        field=field_name,
    )
