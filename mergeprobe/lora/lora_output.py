"""What the jobs that write a LoRA (lora_extract, lora_merge) share: the output's request fields,
the low-rank settings, the per-module report, and the metadata that makes the file a kohya LoRA
the loaders (A1111/Forge, ComfyUI, LoRA Block Weight, sd-scripts) and our own library read.

No torch: the API validates these at submission.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from mergeprobe.checkpoints.library import ModelLibrary, validate_output_name
from mergeprobe.lora.lora_keys import LoraTarget
from mergeprobe.service.request_model import RequestModel

MAX_RANK = 1024

# kohya sd-scripts' ss_base_model_version and modelspec.architecture of each of our architectures:
# lora_formats reads the architecture of a LoRA from them, and so do the other tools.
_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_MODELSPEC = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}


class LoraOutput(RequestModel):
    name: str | None = Field(
        default=None,
        description="File name of the LoRA in the library (ends .safetensors). Default: derived from the inputs.",
        examples=["style-extract.safetensors"],
    )
    dtype: Literal["fp16", "bf16", "fp32"] = Field(
        default="fp16",
        description="dtype of the stored factors (the reported errors are of the stored ones).",
    )
    metadata: dict[str, str] = Field(
        default_factory=dict, description="Extra string pairs for the file's `__metadata__`."
    )


class LowRankFields(RequestModel):
    """The fields of a request that reduces updates to low rank: the rank cap, and optionally an
    energy target that picks a smaller rank per module."""

    rank: int = Field(
        default=32, ge=1, le=MAX_RANK, description="Rank of each linear (and 1×1 conv) module, at most."
    )
    conv_rank: int | None = Field(
        default=None,
        ge=1,
        le=MAX_RANK,
        description="Rank of each 3×3 convolution (LoCon), at most.",
    )
    energy: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Per module, the smallest rank (up to the cap) whose singular values hold this share of "
        "ΔW's squared Frobenius norm (0.99: 99 %). Default: the cap everywhere.",
    )


@dataclass(frozen=True)
class LoraLayer:
    """One module of a LoRA to write: its kohya name and the checkpoint layer it modifies."""

    name: str  # lora_unet_… / lora_te_… (LoraKeyTable.kohya_name)
    target: LoraTarget
    shape: tuple[int, ...]  # the layer's weight shape (its rows, for a row range of a fused in_proj)
    rank_cap: int

    @property
    def conv(self) -> bool:
        """A k×k convolution with k > 1 (LoCon), whose down factor keeps the kernel."""
        return len(self.shape) == 4 and self.shape[2:] != (1, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.target.key,
            "rows": list(self.target.rows) if self.target.rows else None,
            "block": self.target.block,
            "component": self.target.component,
            "shape": list(self.shape),
            "rank_cap": self.rank_cap,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoraLayer:
        rows = data["rows"]
        target = LoraTarget(data["key"], tuple(rows) if rows else None, data["component"], data["block"])
        return cls(data["name"], target, tuple(data["shape"]), data["rank_cap"])


class LoraModuleReport(BaseModel):
    name: str = Field(examples=["lora_unet_down_blocks_0_attentions_0_proj_in"])
    key: str = Field(description="The checkpoint weight it modifies.")
    block: str = Field(examples=["IN01"])
    rank: int = Field(description="Rank stored.")
    relative_error: float = Field(
        description="‖ΔW − up·down‖ / ‖ΔW‖ (Frobenius) of the stored factors, ΔW being what the module "
        "should add (for an extraction: tuned − base; for a merge: the sum of the inputs' updates)."
    )


class LoraWriteSummary(BaseModel):
    """What every LoRA-writing job reports about the factors it stored."""

    modules: list[LoraModuleReport] = Field(description="Per module, in file order.")
    ranks: dict[str, int] = Field(description="Modules per stored rank.", examples=[{"32": 192}])
    relative_error: float = Field(
        description="Over all modules: sqrt(Σ‖ΔW − up·down‖² / Σ‖ΔW‖²).", examples=[0.08]
    )
    max_relative_error: float = Field(examples=[0.31])


def lora_output_name(request_name: str | None, stem: str, library: ModelLibrary) -> str:
    """The output's file name (the request's, or `<stem>_<6 hex>.safetensors`), checked and free."""
    name = request_name or f"{stem[:80]}_{secrets.token_hex(3)}.safetensors"
    validate_output_name(name)
    library.check_name_free(name, field="output.name")
    return name


def lora_file_metadata(
    arch: str, ranks: list[int], conv_ranks: list[int], recipe: dict[str, Any], extra: dict[str, str]
) -> dict[str, str]:
    """`__metadata__` of a LoRA we write. Each module's alpha is its rank (scale 1), as sd-scripts'
    extract_lora_from_models.py and svd_merge_lora.py store them."""
    dim = max(ranks, default=0)
    ours = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(dim),
        "ss_base_model_version": _BASE_MODEL_VERSION[arch],
        "modelspec.architecture": _MODELSPEC[arch],
        "modelspec.sai_model_spec": "1.0.0",
        "mergeprobe_recipe": json.dumps(recipe, sort_keys=True),
    }
    if arch == "sd2":
        ours["ss_v2"] = "True"
    if conv_ranks:
        conv_dim = max(conv_ranks)
        ours["ss_network_args"] = json.dumps({"conv_dim": str(conv_dim), "conv_alpha": str(conv_dim)})
    # The request's own pairs cannot replace ours: a wrong architecture would make the library and
    # every loader misread the file (merges do the same with their metadata).
    return {**extra, **ours}
