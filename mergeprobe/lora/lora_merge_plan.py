"""The plan of a LoRA merge: several LoRAs, each at its strength and block weights, into one kohya
LoRA. Decided from headers (no torch), by the API at submission and by the worker again.

Every module of every LoRA is matched to the layer it modifies (`bake_plan.match_loras`) in a
layout: the `model` checkpoint's when one is named, else the published checkpoint of the LoRAs'
architecture (`elements.published_weight_shapes`). Modules of different files (kohya, PEFT,
LyCORIS names) that modify one layer become one module of the output, named as sd-scripts names it.

- `concat`: the output's factors are the inputs' side by side, rank = the sum of theirs, each
  input's strength × block weight × alpha/rank folded into its up factor: exact (up to the output
  dtype). Only plain LoRA / LoCon modules can be concatenated.
- `svd`: per layer, the sum of the inputs' updates reduced to `rank` (`conv_rank` for k×k convs,
  default `rank`) or to the `energy` share by SVD, as sd-scripts' svd_merge_lora.py does; any
  algorithm but DoRA (whose update depends on the weight it is applied to).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from mergeprobe.checkpoints.checkpoint_headers import CheckpointHeader, TensorInfo
from mergeprobe.checkpoints.elements import published_weight_shapes
from mergeprobe.checkpoints.library import ModelLibrary, PinnedModel
from mergeprobe.lora.bake_plan import LoraMatching, ModuleApplication, match_loras
from mergeprobe.lora.lora_formats import describe_lora
from mergeprobe.lora.lora_keys import LoraKeyTable
from mergeprobe.lora.lora_output import MAX_RANK, LoraLayer, LoraOutput, LowRankFields, lora_output_name
from mergeprobe.lora.lora_request import MAX_LORAS, LoraApplication
from mergeprobe.service.errors import InvalidInput

PLAIN_ROLES = frozenset({"down", "up"})


class LoraMergeRequest(LowRankFields):
    """Several LoRAs (or one, to resize it) into one LoRA."""

    loras: list[LoraApplication] = Field(min_length=1, max_length=MAX_LORAS)
    mode: Literal["concat", "svd"] = Field(
        default="concat",
        description="`concat`: the inputs' ranks side by side, exact; `svd`: reduced to `rank` / `energy`.",
    )
    model: str | None = Field(
        default=None,
        description="A checkpoint whose layers place the modules in blocks and which the match is reported "
        "against. Default: the published checkpoint of the LoRAs' architecture.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where the SVDs run.")
    output: LoraOutput = Field(default_factory=LoraOutput)


class LoraMergeInputs(BaseModel):
    arch: str
    loras: list[PinnedModel]
    model: PinnedModel | None = None
    output: str = Field(description="File name of the result.")


def plain_module(application: ModuleApplication) -> bool:
    """A LoRA / LoCon module whose update is up · down (no Tucker mid, no DoRA)."""
    roles = set(application.tensors) - {"alpha"}
    return application.algorithm in ("lora", "locon") and roles == PLAIN_ROLES


@dataclass
class LoraMergePlan:
    arch: str
    matching: LoraMatching
    layers: list[tuple[LoraLayer, list[ModuleApplication]]]  # output module → the inputs' modules


def published_header(arch: str) -> CheckpointHeader:
    """A header of the published checkpoint's U-Net and text encoder weights (shapes only)."""
    tensors = {
        key: TensorInfo(key, "F16", shape, None) for key, shape in published_weight_shapes(arch).items()
    }
    return CheckpointHeader("safetensors", tensors, {}, 0, 0)


def _arch_of_loras(request: LoraMergeRequest, library: ModelLibrary, pinned: LoraMergeInputs | None) -> str:
    if pinned is not None:
        return pinned.arch
    arches = []
    for index, application in enumerate(request.loras):
        _, entry = library.pin(application.model, field=f"loras[{index}].model", kind="lora")
        lora = describe_lora(entry.header)
        assert lora is not None  # stored as a LoRA
        arches.append(lora.arch)
        if lora.arch != arches[0]:
            raise InvalidInput(
                "lora-architecture-mismatch",
                "LoRAs of different architectures",
                f"{entry.name} is a LoRA for {lora.arch}; loras[0] is for {arches[0]}",
                field=f"loras[{index}].model",
            )
    return arches[0]


def plan_lora_merge(
    request: LoraMergeRequest, library: ModelLibrary, *, pinned: LoraMergeInputs | None = None
) -> LoraMergePlan:
    arch = _arch_of_loras(request, library, pinned)
    if request.model is not None:
        if pinned is not None and pinned.model is not None:
            path = library.open_pinned(pinned.model, field="model")
            entry = library.entry(path, field="model", name=pinned.model.name)
        else:
            _, entry = library.pin(request.model, field="model")
        if entry.variant.arch != arch:
            raise InvalidInput(
                "lora-architecture-mismatch",
                "LoRA for another architecture",
                f"the LoRAs are for {arch}; {entry.name} is {entry.variant.arch}",
                field="model",
            )
        header, model_name = entry.header, entry.name
    else:
        header, model_name = published_header(arch), f"the published {arch} checkpoint"
    matching = match_loras(
        arch, header, model_name, request.loras, library, pinned=pinned.loras if pinned else None
    )
    by_layer: dict[tuple[str, tuple[int, int] | None], list[ModuleApplication]] = {}
    for application in matching.applications:
        where = f"loras[{application.lora}]"
        if "dora_scale" in application.tensors or "magnitude" in application.tensors:
            raise InvalidInput(
                "lora-not-mergeable",
                "DoRA modules cannot be merged",
                f"{application.module} of {matching.pins[application.lora].name} is DoRA: its update depends "
                "on the weight it is applied to, so no LoRA holds it; bake it into a checkpoint instead",
                field=f"{where}.model",
            )
        if request.mode == "concat" and not plain_module(application):
            raise InvalidInput(
                "lora-not-concatenable",
                "Module cannot be concatenated",
                f"{application.module} of {matching.pins[application.lora].name} is {application.algorithm}"
                + (" with a Tucker core" if "mid" in application.tensors else "")
                + ": only plain LoRA/LoCon factors concatenate; use mode svd",
                field="mode",
            )
        by_layer.setdefault((application.target.key, application.target.rows), []).append(application)
    table = LoraKeyTable.for_checkpoint(arch, header.tensors)
    layers = []
    ranks = _module_ranks(matching)
    for applications in by_layer.values():
        if request.mode == "concat" and (total := sum(ranks[id(a)] for a in applications)) > MAX_RANK:
            raise InvalidInput(
                "lora-rank-too-large",
                "Concatenated rank too large",
                f"{applications[0].target.key}: the LoRAs' ranks on it add up to {total}, over {MAX_RANK}; "
                "use mode svd with a rank",
                field="loras",
            )
        target = applications[0].target
        shape = tuple(header.tensors[target.key].shape)
        if target.rows is not None:
            shape = (target.rows[1] - target.rows[0], *shape[1:])
        conv = len(shape) == 4 and shape[2:] != (1, 1)
        cap = (request.conv_rank or request.rank) if conv else request.rank
        layers.append((LoraLayer(table.kohya_name(target), target, shape, cap), applications))
    return LoraMergePlan(arch, matching, layers)


def _module_ranks(matching: LoraMatching) -> dict[int, int]:
    """Rank of each plain module (its `down` factor's rows), by id of its application."""
    ranks = {}
    for application in matching.applications:
        if "down" in application.tensors:
            header = matching.entries[application.lora].header
            ranks[id(application)] = header.tensors[application.tensors["down"]].shape[0]
    return ranks


def _check_concat_fields(request: LoraMergeRequest) -> None:
    if request.mode != "concat":
        return
    for field in ("rank", "conv_rank", "energy"):
        if field in request.model_fields_set:
            raise InvalidInput(
                "field-not-used",
                "Field not used by concat",
                f"{field} reduces ranks, which mode concat never does (its rank is the inputs' sum); "
                "use mode svd",
                field=field,
            )


def prepare_lora_merge(request: LoraMergeRequest, library: ModelLibrary) -> LoraMergeInputs:
    _check_concat_fields(request)  # here, not in the plan: a job's stored request has every field set
    plan = plan_lora_merge(request, library)
    model = library.pin(request.model, field="model")[0] if request.model else None
    stems = "+".join(pin.name.rsplit(".", 1)[0][:24] for pin in plan.matching.pins[:3])
    return LoraMergeInputs(
        arch=plan.arch,
        loras=plan.matching.pins,
        model=model,
        output=lora_output_name(request.output.name, f"{stems}_{request.mode}", library),
    )
