"""Writing a kohya-format LoRA into the library: each module's factors shaped as sd-scripts stores
them, the per-module report, and the commit. Shared by lora_extract and lora_merge."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from safetensors.torch import save_file

from mergeprobe.lora.lora_output import LoraLayer
from mergeprobe.service.kinds import MergedModel
from worker.context import JobContext
from worker.lora.low_rank import relative_error

STORED_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class LoraWriter:
    """Collects modules (their factors cast to the output dtype) and their errors, then writes the
    file. A module's factors are of the order of rank × (out + in) values: a rank-32 SD1 LoRA is
    ~75 MB in fp16, held until written."""

    def __init__(self, dtype: str) -> None:
        self.dtype = STORED_DTYPES[dtype]
        self.tensors: dict[str, torch.Tensor] = {}
        self.reports: list[dict[str, Any]] = []
        self.conv_ranks: list[int] = []  # of the k×k convolutions (LoCon), for the metadata
        self._residual = 0.0
        self._total = 0.0

    def add(
        self, layer: LoraLayer, up: torch.Tensor, down: torch.Tensor, delta: torch.Tensor
    ) -> dict[str, Any]:
        """Store `layer` as up (out × r) · down (r × in·kh·kw) with alpha = r; `delta` is the 2-D
        float32 ΔW it stands for, against which the stored (cast) factors' error is reported."""
        up, down = up.to(self.dtype).cpu(), down.to(self.dtype).cpu()
        rank = down.shape[0]
        out, *rest = layer.shape
        if len(layer.shape) == 4:  # conv: down keeps the kernel (LoCon), up is 1×1
            down_shape, up_shape = (rank, *rest), (out, rank, 1, 1)
        else:
            down_shape, up_shape = (rank, *rest), (out, rank)
        residual, total = relative_error(delta, up.to(delta.device), down.to(delta.device))
        self._residual += residual
        self._total += total
        self.tensors[f"{layer.name}.lora_down.weight"] = down.reshape(down_shape).contiguous()
        self.tensors[f"{layer.name}.lora_up.weight"] = up.reshape(up_shape).contiguous()
        self.tensors[f"{layer.name}.alpha"] = torch.tensor(float(rank), dtype=self.dtype)
        report = {
            "name": layer.name,
            "key": layer.target.key,
            "block": layer.target.block,
            "rank": rank,
            "relative_error": math.sqrt(residual / total) if total > 0 else 0.0,
        }
        self.reports.append(report)
        if layer.conv:
            self.conv_ranks.append(rank)
        return report

    def summary(self) -> dict[str, Any]:
        return {
            "modules": self.reports,
            "ranks": {str(r): n for r, n in sorted(Counter(m["rank"] for m in self.reports).items())},
            "relative_error": math.sqrt(self._residual / self._total) if self._total > 0 else 0.0,
            "max_relative_error": max((m["relative_error"] for m in self.reports), default=0.0),
        }

    def commit(self, ctx: JobContext, name: str, metadata: dict[str, str]) -> dict[str, Any]:
        """Write the file and add it to the library; the result's `model` and `size_bytes`."""
        library = ctx.library
        library.check_name_free(name, field="output.name")
        tmp = library.temp_path(name, job_id=ctx.job_id)
        try:
            save_file(self.tensors, str(tmp), metadata=metadata)  # the commit fsyncs it
            info = library.commit(tmp, name, field="output.name").info()
        finally:
            tmp.unlink(missing_ok=True)
        return {"model": MergedModel.of(info).model_dump(), "size_bytes": info.size_bytes}


def modules_csv(reports: list[dict[str, Any]]) -> bytes:
    lines = ["name,key,block,rank,relative_error"]
    lines += [f"{m['name']},{m['key']},{m['block']},{m['rank']},{m['relative_error']:.6g}" for m in reports]
    return ("\n".join(lines) + "\n").encode()
