"""Merge requests and their plans, decided from the safetensors headers alone.

The plan says, for every output key, its block, element, α, β and action; the API
answers dry runs with it and validates every request against it before queueing
(shape and architecture mismatches are 400s before any tensor is read); the worker's
engine executes it tensor by tensor.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from mergeprobe.checkpoints.archs import (
    BASE,
    UNKNOWN,
    Architecture,
    block_of_key,
    detect_arch,
    element_of_key,
    get_arch,
)
from mergeprobe.checkpoints.checkpoint_headers import CheckpointHeader, TensorInfo
from mergeprobe.checkpoints.elements import check_unet_complete
from mergeprobe.checkpoints.library import ModelLibrary, PinnedModel, validate_output_name
from mergeprobe.checkpoints.variants import (
    EDM_MARKERS,
    EMA_BUFFERS,
    V_PRED_MARKER,
    ZTSNR_MARKER,
    CheckpointVariant,
)
from mergeprobe.lora.lora_request import MAX_LORAS, LoraApplication
from mergeprobe.merging.blockspec import resolve_block_weights
from mergeprobe.merging.elemental import (
    ElementalRule,
    elemental_ratio,
    elements_by_block,
    parse_elemental,
    rule_matches,
    supermerger_differences,
    unmatched_rules,
)
from mergeprobe.merging.merge_methods import MERGE_METHODS, MergeMethod
from mergeprobe.service.errors import InvalidInput
from mergeprobe.service.request_model import RequestModel

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
OUTPUT_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}

Action = Literal["merge", "copy_a", "copy_b", "keep_a", "copy_vae"]
WeightValue = float | list[float] | str


@dataclass(frozen=True)
class BufferKeys:
    """Keys that hold no learned weights. A result takes them from model A as they are (A's bytes
    and dtype, whatever `output.dtype`), never merged or cast, and writes none that A lacks: they
    tell loaders how to treat the file (token positions, prediction type, noise schedule), and the
    result must load as model A does."""

    reason: str  # shown in the plan beside the key's `keep_a`
    names: frozenset[str] = frozenset()  # whole keys
    suffixes: tuple[str, ...] = ()  # the key's last dotted parts
    top_level_prefixes: tuple[str, ...] = ()  # keys without a dot that start so
    kept_when_pruned: bool = False  # outside the model prefixes, yet loaders read it

    def matches(self, key: str) -> bool:
        if key in self.names or any(key.endswith("." + suffix) for suffix in self.suffixes):
            return True
        return "." not in key and key.startswith(self.top_level_prefixes)


# Every key a merge takes from model A unmerged; keys of other float tensors are weights. Integer
# and bool tensors are never weights either (NON_FLOAT_BUFFER).
BUFFER_KEYS: tuple[BufferKeys, ...] = (
    BufferKeys(
        "text encoder position ids: loaders expect int64 0…76 (merged into floats they broke A1111)",
        suffixes=("embeddings.position_ids",),
    ),
    BufferKeys(
        "prediction-type marker (v_pred, ztsnr, EDM): the result predicts what model A predicts",
        names=frozenset({V_PRED_MARKER, ZTSNR_MARKER, *EDM_MARKERS, "edm_vpred.sigma_min"}),
        kept_when_pruned=True,
    ),
    BufferKeys(
        "noise schedule of an LDM checkpoint (A1111 samples with its alphas_cumprod)",
        names=frozenset({"alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod"}),
        top_level_prefixes=("posterior_", "sqrt_"),
    ),
    BufferKeys("EMA bookkeeping (decay, update count)", names=EMA_BUFFERS),
    BufferKeys(
        "CLIP's contrastive temperature (logit_scale): generation never reads it", suffixes=("logit_scale",)
    ),
)
NON_FLOAT_BUFFER = "integer or bool tensor (ids, counters, masks): not a weight"


def buffer_reason(key: str, tensor: TensorInfo) -> str | None:
    """Why `key` is a buffer taken from model A, or None for a weight."""
    for buffers in BUFFER_KEYS:
        if buffers.matches(key):
            return buffers.reason
    return NON_FLOAT_BUFFER if tensor.dtype not in FLOAT_DTYPES else None


def _kept_when_pruned(key: str) -> bool:
    return any(buffers.kept_when_pruned and buffers.matches(key) for buffers in BUFFER_KEYS)


def _known_method(name: str) -> str:
    if name not in MERGE_METHODS:
        raise ValueError(f"unknown mode {name!r}; known: {', '.join(MERGE_METHODS)}")
    return name


# Checked against the registry when a request is validated, so a method registered later (a
# plug-in, a test) is accepted like the built-in ones; the schema lists those known at start.
MergeMode = Annotated[
    str,
    AfterValidator(_known_method),
    WithJsonSchema({"type": "string", "enum": list(MERGE_METHODS)}),
]

_WEIGHT_DOC = (
    "A number; a list of per-block numbers (sd1/sd2: 25 values IN00…OUT11 or 26 with BASE first; sdxl: 19 "
    "or 20, or an sd1 list of 25/26 converted as SuperMerger's weighttoxl does, with a warning); a block spec "
    "string such as `IN00-IN05:0.2, M00:1, OUT00-OUT11(+2):0.7, _:0.5` (later entries win, `_`/`default` for "
    "the rest, `BASE:x` for the text encoders and VAE); or a preset name (GET /v1/presets): SuperMerger's "
    "values, BASE included (1 for ALL_B, else 0); on sdxl its IN00–IN08, M00, OUT00–OUT08 as SuperMerger "
    "takes them, or `NAME@depth` for the curve resampled over U-Net depth."
)


class MergeOutput(RequestModel):
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


class MergeRecipe(RequestModel):
    """What a merge computes: its inputs, method and ratios. Merge jobs write it; sweeps compute it
    in memory as their baseline (one set of fields, so neither can drop one)."""

    model_a: str = Field(description="Model id or name from the library: the base.", examples=["tiny-sd1-a"])
    model_b: str | None = Field(
        default=None, description="Model id or name: α is its share.", examples=["tiny-sd1-b"]
    )
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
        description="BASE's α (text encoders and VAE); wins over a preset's or a list's BASE. Default: the "
        "BASE of alpha's preset or list, alpha when it is a number, else 0.",
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

    def recipe(self) -> dict[str, Any]:
        """The recipe fields of this request, as a MergeRequest takes them."""
        return self.model_dump(include=set(MergeRecipe.model_fields))


class MergeRequest(MergeRecipe):
    """A block-weighted merge of two or three checkpoints, streamed tensor by tensor."""

    model_config = ConfigDict(
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

    model_b: str = Field(description="Model id or name: α is its share.", examples=["tiny-sd1-b"])
    output: MergeOutput = Field(default_factory=MergeOutput)
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where tensors are combined.")
    loras: list[LoraApplication] = Field(
        default_factory=list,
        max_length=MAX_LORAS,
        description="LoRAs added to the merge result in the same pass, matched against model A's keys (as a "
        "bake does: strength × block weight × ΔW per modified tensor); reported per LoRA in the result.",
    )


class ElementalRequest(MergeRequest):
    """A merge whose `elemental` overrides are the point: the plan is written as plan.csv."""

    model_config = ConfigDict(
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


class MergeInputs(BaseModel):
    """What a merge or elemental job runs on, pinned when it was accepted."""

    arch: str
    models: dict[str, PinnedModel] = Field(description="Slot (a, b, c, vae) → the pinned model.")
    output: str = Field(description="File name of the result.")
    loras: list[PinnedModel] = Field(default_factory=list, description="The request's LoRAs, pinned.")


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
    reason: str | None = None  # why a key is kept as in model A (a buffer), in words

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "block": self.block,
            "element": self.element,
            "alpha": self.alpha,
            "beta": self.beta,
            "action": self.action,
            "reason": self.reason,
        }


@dataclass
class MergePlan:
    arch: Architecture
    method: MergeMethod
    pins: dict[str, PinnedModel]  # "a", "b", optionally "c" and "vae"
    paths: dict[str, Path]  # the local files that hold the pinned bytes (none in an s3 API's plan)
    headers: dict[str, CheckpointHeader]
    keys: list[KeyPlan]
    output_name: str
    warnings: list[str] = field(default_factory=list)
    vae_keys: dict[str, str] = field(default_factory=dict)  # output key → its key in output.bake_vae
    # Model A's variant: the result predicts, and is written (modelspec), as model A is.
    variant: CheckpointVariant | None = None
    # key → the LoRA modules added to it after the merge (mergeprobe.lora.bake_plan
    # ModuleApplication, in order); their files are the slots "lora0", "lora1", … of paths/headers.
    loras: dict[str, list[Any]] = field(default_factory=dict)

    def copied_from(self, kp: KeyPlan) -> tuple[str, str] | None:
        """(slot, key in that input) a key's bytes are copied from, or None when it is merged."""
        if kp.action in ("copy_a", "keep_a"):
            return "a", kp.key
        if kp.action == "copy_b":
            return "b", kp.key
        if kp.action == "copy_vae":
            return "vae", self.vae_keys[kp.key]
        return None

    def reads(self, kp: KeyPlan) -> list[tuple[str, str]]:
        """(slot, key) of every input tensor computing `kp` reads."""
        copied = self.copied_from(kp)
        if copied is not None:
            return [copied]
        return [
            (slot, kp.key) for slot in self.headers if slot != "vae" and kp.key in self.headers[slot].tensors
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch.name,
            "mode": self.method.name,
            "output": self.output_name,
            "keys": [k.to_json() for k in self.keys],
            "warnings": self.warnings,
        }

    def inputs(self) -> MergeInputs:
        """What the job record keeps, so the worker re-plans from the same bytes."""
        return MergeInputs(arch=self.arch.name, models=self.pins, output=self.output_name)


def _resolve_models(
    request: MergeRequest, library: ModelLibrary, pinned: dict[str, PinnedModel] | None
) -> tuple[
    dict[str, PinnedModel], dict[str, Path], dict[str, CheckpointHeader], dict[str, CheckpointVariant]
]:
    """Each slot's pinned model, local file (where there is one), header and variant: pinned now
    from the request's references (the API: from the library's index, no file needed), or opened
    from the pins a job carries (the worker), never resolved by name again."""
    method = MERGE_METHODS[request.mode]
    refs = {"a": ("model_a", request.model_a), "b": ("model_b", request.model_b)}
    if method.needs_c:
        if not request.model_c:
            raise InvalidInput(
                "missing-model", "Invalid request", f"mode {method.name} needs model_c", field="model_c"
            )
        refs["c"] = ("model_c", request.model_c)
    elif request.model_c and not method.accepts("c"):
        raise InvalidInput(
            "unused-model",
            "Invalid request",
            f"mode {method.name} does not use model_c",
            field="model_c",
        )
    elif request.model_c:
        refs["c"] = ("model_c", request.model_c)
    if request.output.bake_vae:
        refs["vae"] = ("output.bake_vae", request.output.bake_vae)
    pins, paths, headers, variants = {}, {}, {}, {}
    for slot, (field_name, ref) in refs.items():
        if pinned is None:
            pins[slot], entry = library.pin(ref, field=field_name)
            headers[slot], variants[slot] = entry.header, entry.variant
            if entry.path is not None:  # the local backend's: in-process runs (tests, benchmarks) read it
                paths[slot] = entry.path
        else:
            pins[slot] = pinned[slot]
            paths[slot] = library.open_pinned(pins[slot], field=field_name)
            headers[slot] = library.header(paths[slot], field=field_name)
            variants[slot] = library.variant(paths[slot], field=field_name)
    return pins, paths, headers, variants


def _arch_of(headers: dict[str, CheckpointHeader]) -> Architecture:
    archs = {slot: detect_arch(h.tensors) for slot, h in headers.items() if slot != "vae"}
    if archs["a"] == UNKNOWN:
        raise InvalidInput(
            "unknown-architecture",
            "Unknown architecture",
            "model_a matches none of sd1, sd2, sdxl",
            field="model_a",
        )
    for slot, arch in archs.items():
        if arch != archs["a"]:
            raise InvalidInput(
                "architecture-mismatch",
                "Architecture mismatch",
                f"model_a is {archs['a']} but model_{slot} is {arch}: they cannot be merged",
                field=f"model_{slot}",
            )
    return get_arch(archs["a"])


def _weights(
    value: Any,
    base: float | None,
    arch: Architecture,
    field_name: str,
    default_base: float | None,
    warnings: list[str],
) -> dict[str, float | None]:
    """Per-block ratios; BASE's is, in this order: `base` (the request's base_alpha / base_beta),
    what the value says (a preset's BASE, a list's first value, `BASE:x`), a single number,
    `default_base`."""
    weights = resolve_block_weights(value, arch, field=field_name, warnings=warnings)
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


def _vae_tensors(arch: Architecture, header: CheckpointHeader) -> dict[str, str]:
    """Output key → key in the VAE file (a full checkpoint or a standalone VAE)."""
    full = {k: k for k in header.tensors if k.startswith(arch.vae_prefix)}
    if full:
        return full
    standalone = {
        arch.vae_prefix + k: k
        for k in header.tensors
        if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
    }
    if not standalone:
        raise InvalidInput(
            "not-a-vae", "Invalid request", "output.bake_vae has no VAE keys", field="output.bake_vae"
        )
    return standalone


def default_output_name(request: MergeRequest, pins: dict[str, PinnedModel]) -> str:
    stems = "_".join(pins[s].name.rsplit(".", 1)[0][:40] for s in ("a", "b", "c") if s in pins)
    return f"{stems}_{request.mode}_{secrets.token_hex(3)}.safetensors"


def plan_merge(
    request: MergeRequest,
    library: ModelLibrary,
    *,
    output_name: str | None = None,
    pinned: dict[str, PinnedModel] | None = None,
) -> MergePlan:
    """The plan of a merge request. `pinned` (a job's inputs) replaces resolving the model names."""
    if request.mode not in MERGE_METHODS:
        raise InvalidInput(
            "unknown-mode",
            "Invalid request",
            f"unknown mode {request.mode!r}; known: {', '.join(MERGE_METHODS)}",
            field="mode",
        )
    method = MERGE_METHODS[request.mode]
    pins, paths, headers, variants = _resolve_models(request, library, pinned)
    arch = _arch_of(headers)
    _check_unets(arch, headers)
    name = output_name or request.output.name or default_output_name(request, pins)
    validate_output_name(name)

    warnings: list[str] = []
    alphas = _weights(request.alpha, request.base_alpha, arch, "alpha", 0.0, warnings)
    if request.beta is None:
        if method.beta is not None and method.beta.required:
            raise InvalidInput(
                "missing-beta",
                "Invalid request",
                f"mode {method.name} needs beta ({method.beta.meaning})",
                field="beta",
            )
        # Only BASE's β may be given; the U-Net blocks keep the mode's default (None).
        betas: dict[str, float | None] = dict.fromkeys(arch.blocks)
        betas[BASE] = request.base_beta
    else:
        betas = _weights(request.beta, request.base_beta, arch, "beta", None, warnings)
        if betas[BASE] is None and method.beta is not None:
            betas[BASE] = method.beta.base_default
    if method.beta is None and (request.beta is not None or request.base_beta is not None):
        raise InvalidInput(
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
        raise InvalidInput(
            "unused-beta",
            "Invalid request",
            f"mode {method.name} does not use beta",
            field="elemental_beta",
        )

    a, b = headers["a"].tensors, headers["b"].tensors
    c = headers["c"].tensors if "c" in headers else None
    vae = _vae_tensors(arch, headers["vae"]) if "vae" in headers else {}
    prune = request.output.prune
    keys: list[KeyPlan] = []
    buffers_not_in_a: list[str] = []
    absent = _absent_components(arch, headers)
    out_keys = [k for k in a] + [k for k in b if k not in a]
    for key in out_keys:
        # Pruned: only what a pipeline needs (no EMA copies, optimizer or loss state, scheduler
        # buffers), and the prediction markers loaders read.
        if prune and not key.startswith(arch.model_prefixes) and not _kept_when_pruned(key):
            continue
        try:
            block, element = block_of_key(arch, key), element_of_key(arch, key)
        except ValueError as exc:
            raise InvalidInput(
                "unknown-key", "Invalid checkpoint", str(exc), field="model_a" if key in a else "model_b"
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
        reason = buffer_reason(key, a[key] if key in a else b[key])
        if reason is not None:
            if key in a:
                keys.append(
                    KeyPlan(key, block, element, None, None, "keep_a", a[key].dtype, a[key].shape, reason)
                )
            else:
                buffers_not_in_a.append(key)
            continue
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
            _check_one_sided(method, key, alpha, beta, has="b", lacks="a", absent=absent, arch=arch)
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
            _check_one_sided(method, key, alpha, beta, has="a", lacks="b", absent=absent, arch=arch)
            keys.append(KeyPlan(key, block, element, None, None, "copy_a", out, ta.shape))
            continue
        for slot, other in (("b", b), ("c", c)):
            if other is None:
                continue
            if key not in other:
                if slot == "c" and method.needs_c:
                    _check_one_sided(method, key, alpha, beta, has="a", lacks="c", absent=absent, arch=arch)
                    warnings.append(f"{key}: not in model_c; kept as in model_a")
                    keys.append(KeyPlan(key, block, element, None, None, "copy_a", out, ta.shape))
                    break
                continue
            if other[key].shape != ta.shape and not _conv_in_channels_differ(arch, key, ta, other[key]):
                raise _shape_problem(key, ta, other[key], f"model_{slot}")
        else:
            action = _action(method, headers, key, alpha, beta)
            keys.append(KeyPlan(key, block, element, alpha, beta, action, out, ta.shape))
    check_ratios(method, keys, fields=_ratio_fields(request, rules_a, rules_b))
    if buffers_not_in_a:
        shown = ", ".join(buffers_not_in_a[:5]) + (" …" if len(buffers_not_in_a) > 5 else "")
        warnings.append(
            f"{len(buffers_not_in_a)} buffer(s) only in model_b not written ({shown}): buffers come from model_a"
        )
    warnings.extend(_prediction_differences({s: v for s, v in variants.items() if s != "vae"}))
    for rules, field_name in ((rules_a, "elemental"), (rules_b, "elemental_beta")):
        if rules:
            grouped = elements_by_block(arch, [k.key for k in keys])
            for rule in unmatched_rules(rules, grouped):
                warnings.append(f"{field_name} entry {rule.index} (`{rule.source}`) matches no key")
            ratioed = [(k.key, k.block, k.element) for k in keys if k.alpha is not None]
            warnings.extend(supermerger_differences(rules, arch, ratioed, field=field_name))
    return MergePlan(arch, method, pins, paths, headers, keys, name, warnings, vae, variants["a"])


def _ratio_fields(
    request: MergeRequest, rules_a: list[ElementalRule], rules_b: list[ElementalRule]
) -> Callable[[KeyPlan, str], str]:
    """Which request field set a key's α or β, for error messages: the elemental entry that
    matched it, else BASE's own field or the per-block one."""

    def field_of(key: KeyPlan, param: str) -> str:
        rules = rules_a if param == "alpha" else rules_b
        if rules and elemental_ratio(rules, key.block, key.element) is not None:
            return "elemental" if param == "alpha" else "elemental_beta"
        if key.block == BASE and getattr(request, f"base_{param}") is not None:
            return f"base_{param}"
        return param

    return field_of


def check_ratios(
    method: MergeMethod, keys: Iterable[KeyPlan], *, fields: Callable[[KeyPlan, str], str]
) -> None:
    """A 400 for the first key whose α or β the method does not accept (dare's β = 1 divides
    by zero); `fields` names the request field the value came from."""
    for key in keys:
        if key.alpha is None:
            continue  # copied or kept: no arithmetic
        if method.beta is not None and method.beta.required and key.beta is None:
            raise InvalidInput(
                "missing-beta",
                "Invalid request",
                f"mode {method.name} needs beta ({method.beta.meaning}); {key.key} has none",
                field=fields(key, "beta"),
            )
        for param, why in method.ratio_problems(key.alpha, key.beta):
            raise InvalidInput(
                f"invalid-{param}", "Invalid request", f"{why} on {key.key}", field=fields(key, param)
            )


def _action(
    method: MergeMethod, headers: dict[str, CheckpointHeader], key: str, alpha: float, beta: float | None
) -> Action:
    """`merge`, or the input the result equals exactly (copied byte for byte, and faster)."""
    shapes = {h.tensors[key].shape for slot, h in headers.items() if slot != "vae" and key in h.tensors}
    if len(shapes) > 1:
        return "merge"  # mixed channel counts (inpainting conv_in): only arithmetic keeps A's extra ones
    return method.shortcut(alpha, beta) or "merge"


@dataclass(frozen=True)
class RatioOverride:
    """α and/or β on every key of some blocks (None keeps the plan's value)."""

    blocks: frozenset[str]
    alpha: float | None = None
    beta: float | None = None


@dataclass(frozen=True)
class PlanChange:
    """A change to a plan's ratios: block overrides, then elemental rules (their ratio is α,
    `rule_beta` their β), later ones winning; optionally another method for the keys it touches.
    A sweep variant is one."""

    overrides: tuple[RatioOverride, ...] = ()
    rules: tuple[ElementalRule, ...] = ()
    rule_beta: float | None = None
    method: MergeMethod | None = None
    # (LoRA index, block, strength applied there): new strengths (the LoRA's strength × its block
    # weight) of the modules of a plan's attached LoRAs (`MergePlan.loras`) on those blocks.
    lora_strengths: tuple[tuple[int, str, float], ...] = ()


def change_plan(plan: MergePlan, change: PlanChange, blocks: Collection[str]) -> MergePlan:
    """The keys of `blocks` that `change` touches, with their new α, β and action, as a plan of
    their own on the same inputs: what a sweep variant computes instead of the baseline. Keys
    without ratios (copied from one input, kept) never get new ratios. A key LoRA modules modify
    is in it when its ratios are touched or a module's strength changes; its `loras` entry lists
    its modules with the variant's strengths."""
    method = change.method or plan.method
    strengths = {(lora, block): strength for lora, block, strength in change.lora_strengths}
    keys, loras = [], {}
    for kp in plan.keys:
        if kp.block not in blocks:
            continue
        changed = kp
        if kp.alpha is not None:
            alpha, beta, touched = kp.alpha, kp.beta, False
            for override in change.overrides:
                if kp.block in override.blocks:
                    touched = True
                    alpha = override.alpha if override.alpha is not None else alpha
                    beta = override.beta if override.beta is not None else beta
            for rule in change.rules:
                if rule_matches(rule, kp.block, kp.element):
                    touched = True
                    alpha = rule.ratio
                    beta = change.rule_beta if change.rule_beta is not None else beta
            if touched:
                action = _action(method, plan.headers, kp.key, alpha, beta)
                changed = replace(kp, alpha=alpha, beta=beta, action=action)
        modules = plan.loras.get(kp.key)
        restrengthened = modules
        if modules and strengths:
            restrengthened = [
                replace(m, strength=strengths.get((m.lora, m.target.block), m.strength)) for m in modules
            ]
        if changed is kp and restrengthened == modules:
            continue
        keys.append(changed)
        if modules:
            loras[kp.key] = restrengthened
    return replace(plan, method=method, keys=keys, warnings=[], loras=loras)


def _conv_in_channels_differ(arch: Architecture, key: str, ta: TensorInfo, tb: TensorInfo) -> bool:
    """Inpainting (9 input channels) in A vs normal (4) in B: the shared channels merge, A's others
    stay. The other way round is refused by `_check_unets`."""
    return (
        key == arch.conv_in
        and len(ta.shape) == len(tb.shape) == 4
        and ta.shape[0] == tb.shape[0]
        and ta.shape[2:] == tb.shape[2:]
        and ta.shape[1] >= tb.shape[1]
    )


def _check_unets(arch: Architecture, headers: dict[str, CheckpointHeader]) -> None:
    """Refuse an input whose U-Net the result cannot be made from: one that lacks tensors the
    architecture needs (a LoRA, an extract, a damaged file: merged, the result would miss them or
    hold A's in their place), or a B or C that reads more input channels than A (an inpainting
    model in B would lose its extra channels, as the result takes A's conv_in shape)."""
    for slot, header in headers.items():
        if slot == "vae":
            continue
        check_unet_complete(header.tensors, arch.name, name=f"model_{slot}", field=f"model_{slot}")
    channels = {slot: _conv_in_channels(arch, h) for slot, h in headers.items() if slot != "vae"}
    for slot in ("b", "c"):
        if (
            slot in channels
            and None not in (channels[slot], channels["a"])
            and channels[slot] > channels["a"]
        ):
            what = "an inpainting model" if channels[slot] == 9 else "a model with a wider conv_in"
            raise InvalidInput(
                "inpainting-model-not-a",
                "Inpainting model must be model_a",
                f"model_{slot} is {what} (its U-Net reads {channels[slot]} input channels) and model_a reads "
                f"{channels['a']}: the result takes model_a's conv_in, so model_{slot}'s extra channels would be "
                f"lost. Put the inpainting model in model_a (as SuperMerger requires): the shared channels merge "
                f"and its extra ones are kept.",
                field=f"model_{slot}",
            )


def _conv_in_channels(arch: Architecture, header: CheckpointHeader) -> int | None:
    conv_in = header.tensors.get(arch.conv_in)
    return conv_in.shape[1] if conv_in is not None and len(conv_in.shape) == 4 else None


def _components(arch: Architecture) -> dict[str, str]:
    """Key prefix → name of each component outside the U-Net (the VAE, each text encoder)."""
    encoders = arch.text_encoder_prefixes
    names = (
        {encoders[0]: "text encoder"}
        if len(encoders) == 1
        else {prefix: f"text encoder {i} (`{prefix}`)" for i, prefix in enumerate(encoders, 1)}
    )
    return {arch.vae_prefix: "VAE", **names}


def _absent_components(arch: Architecture, headers: dict[str, CheckpointHeader]) -> dict[str, set[str]]:
    """slot → prefixes of the components that input has no key of."""
    return {
        slot: {prefix for prefix in _components(arch) if not any(k.startswith(prefix) for k in h.tensors)}
        for slot, h in headers.items()
        if slot != "vae"
    }


def _check_one_sided(
    method: MergeMethod,
    key: str,
    alpha: float,
    beta: float | None,
    *,
    has: str,
    lacks: str,
    absent: dict[str, set[str]],
    arch: Architecture,
) -> None:
    """Refuse `key` when it belongs to a component (VAE, text encoder) the `lacks` input has none of
    and its ratios ask for arithmetic: the result would be the `has` input's component alone,
    not the merge asked for. Ratios that make the result exactly that input (α 0 keeps A's,
    weighted_sum's α 1 takes B's) are what the request asks, and pass."""
    prefix = next((p for p in absent[lacks] if key.startswith(p)), None)
    if prefix is None or method.shortcut(alpha, beta) == f"copy_{has}":
        return
    component = _components(arch)[prefix]
    ratios = f"α {alpha}" + (f", β {beta}" if beta is not None else "")
    if lacks == "a":
        fix = "give a complete checkpoint as model_a"
        if component == "VAE":
            fix += ", or set one with output.bake_vae"
        detail = (
            f"model_a has no {component} (no `{prefix}` keys) but model_b has one: at {ratios} the result "
            f"would take model_b's {component} whole ({key}), not the merge asked for; {fix}"
        )
    else:
        detail = (
            f"model_{lacks} has no {component} (no `{prefix}` keys), so {key} cannot be merged at {ratios}: the "
            f"result would silently keep model_a's {component}. Give a complete checkpoint as model_{lacks}, or "
            f"set base_alpha to 0 (or an elemental BASE entry) to keep model_a's {component} on purpose"
        )
        if component == "VAE":
            detail += ", or set one with output.bake_vae"
    raise InvalidInput("missing-component", "Missing component", detail, field=f"model_{lacks}")


def _prediction_differences(variants: dict[str, CheckpointVariant]) -> list[str]:
    """Warnings for inputs that predict otherwise than model A (the result is written as model A)."""
    a = variants["a"]
    return [
        f"model_{slot} is {v.prediction_type} and model_a {a.prediction_type}: the result keeps model_a's "
        f"prediction type (its markers and modelspec.prediction_type)"
        for slot, v in variants.items()
        if slot != "a" and v.prediction_type != a.prediction_type
    ]


def _shape_problem(key: str, ta: TensorInfo, other: TensorInfo, field_name: str) -> InvalidInput:
    return InvalidInput(
        "shape-mismatch",
        "Shape mismatch",
        f"{key}: model_a has shape {list(ta.shape)} but {field_name} has {list(other.shape)}",
        field=field_name,
    )
