"""The plan of baking LoRAs into a checkpoint: which tensor each LoRA module modifies and with what
strength, and what matched nothing. Decided from headers alone (no torch), by the API at
submission and for the dry run `POST /v1/plans/bake`.

Per LoRA: the modules it holds (`lora_formats.describe_lora`) are matched to the checkpoint's keys
(`lora_keys.LoraKeyTable`), and its per-block strengths resolved (`lora_block_weights`): a module
acting on a key of block B is applied at `strength × w_B`. A LoRA that matches no key at all (made
for another architecture, or named in a way we do not read) is a 400 naming it and the first
names that matched nothing, and so is a LoRA for another architecture than the model's or a
module whose update does not fit its tensor; one that matches partly is a warning.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from mergeprobe.checkpoints.archs import UNKNOWN, get_arch
from mergeprobe.checkpoints.checkpoint_headers import CheckpointHeader
from mergeprobe.checkpoints.library import ModelEntry, ModelLibrary, PinnedModel
from mergeprobe.lora.lora_block_weights import resolve_lora_block_weights
from mergeprobe.lora.lora_formats import BAKEABLE_ALGORITHMS, describe_lora
from mergeprobe.lora.lora_keys import LoraKeyTable, LoraTarget
from mergeprobe.lora.lora_request import MAX_LORAS, LoraApplication
from mergeprobe.merging.merge_plan import MergeOutput, MergePlan, MergeRequest
from mergeprobe.service.errors import InvalidInput
from mergeprobe.service.request_model import RequestModel

UNMATCHED_SHOWN = 50  # names of unmatched modules listed per LoRA in a report
MAX_STRENGTH = 1000.0  # |strength × block weight|: a recipe beyond it is a mistake


class BakeRequest(RequestModel):
    """Bake LoRAs into a checkpoint: W + Σ strength · w_block · ΔW per modified tensor, in fp32."""

    model: str = Field(description="The checkpoint the LoRAs are applied to.", examples=["tiny-sd1-a"])
    loras: list[LoraApplication] = Field(min_length=1, max_length=MAX_LORAS)
    output: MergeOutput = Field(default_factory=MergeOutput)
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where tensors are computed.")

    def as_merge(self, model_name: str) -> MergeRequest:
        """The merge that writes the output: the model with itself at α = 0 (every key A's, cast,
        pruned, its metadata written as a merge's) to which the plan's LoRA modules are added."""
        return MergeRequest(
            model_a=model_name, model_b=model_name, alpha=0, output=self.output, device=self.device
        )


class LoraMatch(BaseModel):
    """What one LoRA of a bake matched in the checkpoint."""

    lora: PinnedModel
    arch: str = Field(description="The architecture the LoRA was made for.", examples=["sd1"])
    formats: list[str] = Field(examples=[["kohya-lora"]])
    modules: int = Field(description="Modules in the file.", examples=[192])
    matched: int = Field(description="Modules that modify a tensor of the checkpoint.", examples=[192])
    matched_by_block: dict[str, int] = Field(
        description="Matched modules per block (BASE: the text encoders).",
        examples=[{"BASE": 72, "IN01": 10}],
    )
    matched_by_component: dict[str, int] = Field(examples=[{"te": 72, "unet": 120}])
    unmatched: list[str] = Field(
        description=f"Modules that modify nothing in this checkpoint (the first {UNMATCHED_SHOWN})."
    )
    unmatched_count: int
    unbakeable: list[str] = Field(description="Modules of algorithms that cannot be applied (full, ia3).")
    strengths: dict[str, float] = Field(
        description="Per block: the strength applied (the LoRA's strength × its block weight).",
        examples=[{"BASE": 0.8, "IN01": 0.0}],
    )


@dataclass(frozen=True)
class ModuleApplication:
    """One LoRA module applied to one checkpoint tensor (or a row range of it)."""

    lora: int  # index in the request's loras
    module: str
    target: LoraTarget
    strength: float  # the LoRA's strength × its weight on the target's block
    algorithm: str  # lora, locon, loha, lokr
    tensors: dict[str, str]  # role (lora_formats' names: down, up, mid, alpha, hada_w1_a …) → key in the file
    alpha: float | None  # when the file's metadata says it (PEFT); else read from `tensors["alpha"]`

    @property
    def slot(self) -> str:
        """The LoRA file's slot in a merge plan's paths and headers."""
        return f"lora{self.lora}"


@dataclass
class LoraReport:
    lora: PinnedModel
    arch: str
    formats: tuple[str, ...]
    modules: int
    matched: int
    matched_by_block: dict[str, int]  # block (BASE for text encoders) → modules
    matched_by_component: dict[str, int]  # unet / te / te1 / te2 → modules
    unmatched: list[str]  # module names that modify nothing in this checkpoint
    unbakeable: list[str]  # modules of algorithms that cannot be applied (full, ia3)
    strengths: dict[str, float]  # block → strength applied (strength × block weight)

    def to_json(self) -> dict[str, Any]:
        return {
            "lora": self.lora.model_dump(),
            "arch": self.arch,
            "formats": list(self.formats),
            "modules": self.modules,
            "matched": self.matched,
            "matched_by_block": self.matched_by_block,
            "matched_by_component": self.matched_by_component,
            "unmatched": self.unmatched[:UNMATCHED_SHOWN],
            "unmatched_count": len(self.unmatched),
            "unbakeable": self.unbakeable[:UNMATCHED_SHOWN],
            "strengths": self.strengths,
        }


@dataclass
class LoraBake:
    """The plan of a bake: the checkpoint and what its LoRAs match in it."""

    model: PinnedModel
    arch: str
    matching: LoraMatching

    @property
    def reports(self) -> list[LoraReport]:
        return self.matching.reports

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model.model_dump(),
            "arch": self.arch,
            "loras": [r.to_json() for r in self.matching.reports],
            "keys_modified": len(self.matching.keys()),
            "warnings": self.matching.warnings,
        }


class BakeInputs(BaseModel):
    """What a bake job runs on, pinned when it was accepted."""

    arch: str
    model: PinnedModel
    loras: list[PinnedModel]
    output: str = Field(description="File name of the result.")


def _opened(library: ModelLibrary, pinned: PinnedModel, field: str) -> tuple[PinnedModel, ModelEntry]:
    """A worker's entry of a pinned file (its local copy), as `library.pin` gives the API's."""
    return pinned, library.entry(library.open_pinned(pinned, field=field), field=field, name=pinned.name)


@dataclass
class LoraMatching:
    """The LoRAs of a request matched against one checkpoint."""

    reports: list[LoraReport]
    applications: list[ModuleApplication]
    warnings: list[str]
    pins: list[PinnedModel]
    entries: list[ModelEntry]

    def keys(self) -> dict[str, list[ModuleApplication]]:
        by_key: dict[str, list[ModuleApplication]] = {}
        for application in self.applications:
            by_key.setdefault(application.target.key, []).append(application)
        return by_key


def match_loras(
    arch_name: str,
    header: CheckpointHeader,
    model_name: str,
    loras: list[LoraApplication],
    library: ModelLibrary,
    *,
    pinned: list[PinnedModel] | None = None,
) -> LoraMatching:
    """Each LoRA's modules matched to the tensors of a checkpoint (`header`, of `arch_name`), with
    their strengths per block; `pinned` (a job's inputs) replaces resolving the LoRAs' names."""
    arch = get_arch(arch_name)
    table = LoraKeyTable.for_checkpoint(arch_name, {k: t.shape for k, t in header.tensors.items()})
    matching = LoraMatching([], [], [], [], [])
    for index, application in enumerate(loras):
        where = f"loras[{index}]"
        if pinned is None:
            lora_pin, lora_entry = library.pin(application.model, field=f"{where}.model", kind="lora")
        else:
            lora_pin, lora_entry = _opened(library, pinned[index], f"{where}.model")
        weights = resolve_lora_block_weights(
            1.0 if application.blocks is None else application.blocks,
            arch,
            field=f"{where}.blocks",
            warnings=matching.warnings,
        )
        lora = describe_lora(lora_entry.header)  # alphas are read by the worker, from the tensors
        assert lora is not None  # the library stored it as a LoRA
        if lora.arch != arch_name:
            # Checked by name, not left to the matching: an sd1 LoRA's text-encoder modules do match
            # SDXL's CLIP-L (same names and shapes), so it would half-apply and look like it worked.
            raise InvalidInput(
                "lora-architecture-mismatch",
                "LoRA for another architecture",
                f"{lora_entry.name} is a LoRA for {lora.arch} ({lora.arch_source}); {model_name} is {arch_name}",
                field=f"{where}.model",
            )
        for block, weight in weights.items():
            if not abs(application.strength * weight) <= MAX_STRENGTH:
                raise InvalidInput(
                    "invalid-strength",
                    "Invalid strength",
                    f"{block}'s strength would be {application.strength} × {weight}; at most {MAX_STRENGTH} in size",
                    field=f"{where}.blocks",
                )
        matched: list[ModuleApplication] = []
        unmatched, unbakeable, duplicates = [], [], []
        claimed: dict[tuple[str, tuple[int, int] | None], str] = {}
        for module in lora.modules.values():
            if module.algorithm not in BAKEABLE_ALGORITHMS:
                unbakeable.append(module.name)
                continue
            target = table.match(module.name)
            if target is None:
                unmatched.append(module.name)
                continue
            # The same layer under two names (kohya's LDM and diffusers paths, lora_te and lora_te1,
            # kohya and PEFT names): applied once, as the loaders that key by layer do.
            first = claimed.setdefault((target.key, target.rows), module.name)
            if first != module.name:
                duplicates.append(f"{module.name} (= {first})")
                continue
            _check_fits(module.name, module.delta_shape, target, header.tensors[target.key].shape, where)
            matched.append(
                ModuleApplication(
                    index,
                    module.name,
                    target,
                    application.strength * weights[target.block],
                    module.algorithm,
                    dict(module.keys),
                    module.alpha if module.alpha_source == "metadata" else None,
                )
            )
        if not matched:
            raise InvalidInput(
                "lora-matches-nothing",
                "LoRA matches nothing",
                f"{lora_entry.name} ({', '.join(lora.formats)}, made for {lora.arch}) modifies no tensor of "
                f"{model_name} ({arch_name}): none of its {len(lora.modules)} modules matched, e.g. "
                f"{', '.join(unmatched[:5]) or ', '.join(unbakeable[:5])}",
                field=f"{where}.model",
            )
        if duplicates:
            matching.warnings.append(
                f"{where} {lora_entry.name}: {len(duplicates)} modules name a layer another module of it already "
                f"modifies and are applied once, e.g. {', '.join(duplicates[:3])}"
            )
        if unmatched:
            matching.warnings.append(
                f"{where} {lora_entry.name}: {len(unmatched)} of its {len(lora.modules)} modules match no tensor "
                f"of {model_name} and are not applied, e.g. {', '.join(unmatched[:3])}"
            )
        matching.applications.extend(matched)
        matching.pins.append(lora_pin)
        matching.entries.append(lora_entry)
        matching.reports.append(
            LoraReport(
                lora=lora_pin,
                arch=lora.arch,
                formats=lora.formats,
                modules=len(lora.modules),
                matched=len(matched),
                matched_by_block=dict(sorted(Counter(a.target.block for a in matched).items())),
                matched_by_component=dict(sorted(Counter(a.target.component for a in matched).items())),
                unmatched=unmatched,
                unbakeable=unbakeable,
                strengths={block: application.strength * w for block, w in weights.items()},
            )
        )
    return matching


def attach_loras(plan: MergePlan, matching: LoraMatching) -> None:
    """Make a worker's merge plan add the matched LoRA modules: their files join as slots
    `lora0`, `lora1`, … (pins, local files, headers) and the plan's keys list their modules."""
    for index, (pin, entry) in enumerate(zip(matching.pins, matching.entries, strict=True)):
        slot = f"lora{index}"
        plan.pins[slot], plan.headers[slot] = pin, entry.header
        if entry.path is not None:
            plan.paths[slot] = entry.path
    planned = {kp.key for kp in plan.keys}
    plan.loras = {key: modules for key, modules in matching.keys().items() if key in planned}
    plan.warnings.extend(matching.warnings)
    for key in sorted(set(matching.keys()) - planned):  # output.prune dropped it
        plan.warnings.append(
            f"{key} is not in the output, so the LoRA modules that modify it are not applied"
        )


def add_request_loras(
    plan: MergePlan, loras: list[LoraApplication], library: ModelLibrary, pinned: list[PinnedModel]
) -> list[dict[str, Any]]:
    """A worker's merge plan with a job's LoRAs (`pinned`) matched against its model A and
    attached (`attach_loras`); the LoRAs' match reports."""
    if not loras:
        return []
    matching = match_loras(
        plan.arch.name, plan.headers["a"], plan.pins["a"].name, loras, library, pinned=pinned
    )
    attach_loras(plan, matching)
    return [report.to_json() for report in matching.reports]


def plan_bake(request: BakeRequest, library: ModelLibrary, *, pinned: BakeInputs | None = None) -> LoraBake:
    """The plan of a bake request; `pinned` (a job's inputs) replaces resolving the names, and then
    the entries have local files."""
    if pinned is None:
        model_pin, entry = library.pin(request.model, field="model")
    else:
        model_pin, entry = _opened(library, pinned.model, "model")
    arch_name = entry.variant.arch
    if arch_name == UNKNOWN:
        raise InvalidInput(
            "unknown-architecture",
            "Unknown architecture",
            f"{entry.name}: its keys match none of sd1, sd2, sdxl",
            field="model",
        )
    matching = match_loras(
        arch_name, entry.header, entry.name, request.loras, library, pinned=pinned.loras if pinned else None
    )
    return LoraBake(model_pin, arch_name, matching)


def _check_fits(
    module: str, delta: tuple[int, ...] | None, target: LoraTarget, shape: tuple[int, ...], where: str
) -> None:
    """A 400 at submission when a module's ΔW cannot be added to its tensor (a LoRA trained on a
    model of another size), rather than a failed job. Same outputs and same element count is a fit:
    linear ↔ 1×1 conv, and LoHa/LoKr factors that hold a conv kernel flattened."""
    if delta is None:
        return
    expected = shape if target.rows is None else (target.rows[1] - target.rows[0], *shape[1:])
    if delta[0] == expected[0] and math.prod(delta) == math.prod(expected):
        return
    raise InvalidInput(
        "lora-shape-mismatch",
        "LoRA does not fit",
        f"module {module} makes a {list(delta)} update for {target.key}"
        f"{f' rows {target.rows[0]}-{target.rows[1]}' if target.rows else ''}, which is {list(expected)}",
        field=f"{where}.model",
    )
