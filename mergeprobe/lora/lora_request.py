"""A LoRA as a request names it: which one, how strong, per block. Shared by bake and merge requests."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from mergeprobe.service.request_model import RequestModel

MAX_LORAS = 32


class LoraApplication(RequestModel):
    model: str = Field(description="The LoRA: id, file name, short hash or sha256 in the library.")
    strength: float = Field(default=1.0, ge=-100, le=100, description="Multiplies every ΔW of the LoRA.")
    blocks: Any = Field(
        default=None,
        description="Per-block strength multipliers: a number, a LoRA Block Weight vector (17 or 26 values "
        "on sd1/sd2, 12 or 20 on sdxl, as a list or a comma-separated string), an LBW preset (ALL, INS, IND, "
        "INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5, NONE), or any form merge ratios take (25/26 or 19/20 "
        "list, spec string `IN00-IN03:0.3, _:0.7`, merge preset). Default: 1 everywhere.",
        examples=["1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", "OUTALL"],
    )
