from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from app.schemas import ProblemModel
from app.state import AppState, get_state
from mergeprobe.checkpoints.archs import ARCHITECTURES
from mergeprobe.checkpoints.library import PinnedModel
from mergeprobe.lora.bake_plan import BakeRequest, LoraMatch, match_loras, plan_bake
from mergeprobe.merging.merge_plan import MergeRequest, plan_merge
from mergeprobe.merging.presets import presets_for

router = APIRouter(tags=["plans"])


class KeyPlanModel(BaseModel):
    key: str = Field(
        examples=["model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"]
    )
    block: str = Field(examples=["OUT05"])
    element: str = Field(examples=["1.transformer_blocks.0.attn2.to_k.weight"])
    alpha: float | None = Field(
        description="α for this key; null when no arithmetic happens.", examples=[0.2]
    )
    beta: float | None = Field(examples=[None])
    action: str = Field(
        description="`merge`, `copy_a` (A's tensor as is, also when α makes the result exactly A), `copy_b`, "
        "`keep_a` (a buffer, not a weight: position_ids, prediction markers, schedule and EMA buffers, "
        "logit_scale, integer and bool tensors; A's bytes and dtype) or `copy_vae` (from output.bake_vae).",
        examples=["merge"],
    )
    reason: str | None = Field(
        default=None,
        description="Why a `keep_a` key is a buffer taken from model A; null for the other actions.",
        examples=[None],
    )


class MergePlanModel(BaseModel):
    arch: str = Field(examples=["sd1"])
    mode: str = Field(examples=["weighted_sum"])
    output: str = Field(description="The output's file name.", examples=["blend.safetensors"])
    keys: list[KeyPlanModel]
    warnings: list[str] = Field(description="Elemental entries that match no key, keys missing in model_c…")
    loras: list[LoraMatch] = Field(
        default_factory=list, description="Per LoRA of the request: what it matches."
    )


class PresetList(BaseModel):
    presets: dict[str, dict[str, list[float]]] = Field(
        description="arch → preset name → per-block values in U-Net order (IN00 … OUTnn).",
        examples=[{"sd1": {"FLAT_25": [0.25] * 25}}],
    )


@router.post(
    "/v1/plans/merge",
    response_model=MergePlanModel,
    summary="Dry run of a merge: what each key would get",
    operation_id="planMerge",
    description="Answers at once from the safetensors headers alone, with the same validation as a merge job.",
    responses={400: {"model": ProblemModel}, 404: {"model": ProblemModel}, 422: {"model": ProblemModel}},
)
def plan(body: MergeRequest, state: AppState = Depends(get_state)) -> dict[str, Any]:
    merge = plan_merge(body, state.library)
    answer = merge.to_json()
    if body.loras:
        matching = match_loras(
            merge.arch.name, merge.headers["a"], merge.pins["a"].name, body.loras, state.library
        )
        answer["loras"] = [report.to_json() for report in matching.reports]
        answer["warnings"] += matching.warnings
    return answer


class BakePlanModel(BaseModel):
    model: PinnedModel
    arch: str = Field(examples=["sd1"])
    loras: list[LoraMatch]
    keys_modified: int = Field(description="Checkpoint tensors at least one LoRA module modifies.")
    warnings: list[str] = Field(description="LoRAs that match partly, or look made for another architecture.")


@router.post(
    "/v1/plans/bake",
    response_model=BakePlanModel,
    summary="Dry run of baking LoRAs into a checkpoint: what each LoRA matches",
    operation_id="planBake",
    description="From the headers alone: for each LoRA, the modules that modify a tensor of the checkpoint "
    "(per block and text encoder), those that match nothing (named), and the strength applied per block. "
    "A LoRA that matches no tensor at all (made for another architecture, or named in a way mergeprobe does "
    "not read) is a 400 naming it and the first unmatched modules; a partial match is a warning.",
    responses={400: {"model": ProblemModel}, 404: {"model": ProblemModel}, 422: {"model": ProblemModel}},
)
def plan_bake_route(body: BakeRequest, state: AppState = Depends(get_state)) -> dict[str, Any]:
    return plan_bake(body, state.library).to_json()


@router.get(
    "/v1/presets", response_model=PresetList, summary="Block-weight presets", operation_id="listPresets"
)
def presets() -> dict[str, Any]:
    return {
        "presets": {
            name: {k: list(v) for k, v in presets_for(arch).items()} for name, arch in ARCHITECTURES.items()
        }
    }
