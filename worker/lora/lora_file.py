"""Writing a kohya-format LoRA into the library: each module's factors shaped as sd-scripts stores
them, the per-module report, and the commit. Shared by lora_extract and lora_merge.

Factors go to a spill file as each module is made, so memory holds one layer at a time whatever
the ranks (an SDXL LoRA of rank 1024 is gigabytes); the commit writes the safetensors header,
which needs every shape, then copies the spill file after it."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from typing import Any

import torch

from mergeprobe.checkpoints.safetensors_layout import build_header
from mergeprobe.lora.lora_output import LoraLayer
from mergeprobe.service.errors import Unprocessable
from mergeprobe.service.kinds import MergedModel
from worker.context import JobContext
from worker.lora.low_rank import relative_error

STORED_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_COPY_CHUNK = 16 << 20


class LoraWriter:
    """Collects modules (their factors cast to the output dtype, spilled to a temp file of the
    job) and their errors, then writes the LoRA file."""

    def __init__(self, ctx: JobContext, name: str, dtype: str) -> None:
        self.ctx, self.name = ctx, name
        self.dtype = STORED_DTYPES[dtype]
        self.entries: list[tuple[str, str, tuple[int, ...]]] = []
        self.reports: list[dict[str, Any]] = []
        self.conv_ranks: list[int] = []  # of the k×k convolutions (LoCon), for the metadata
        self._residual = 0.0
        self._total = 0.0
        self._spill_path = ctx.library.temp_path(name + ".factors", job_id=ctx.job_id)
        self._spill = open(self._spill_path, "w+b")  # noqa: SIM115 - closed by close()

    def _put(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        self.entries.append((key, _SAFETENSORS_DTYPES[tensor.dtype], tuple(tensor.shape)))
        self._spill.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))

    def add(
        self, layer: LoraLayer, up: torch.Tensor, down: torch.Tensor, delta: torch.Tensor
    ) -> dict[str, Any]:
        """Store `layer` as up (out × r) · down (r × in·kh·kw) with alpha = r; `delta` is the 2-D
        float32 ΔW it stands for, against which the stored (cast) factors' error is reported."""
        up, down = up.to(self.dtype).cpu(), down.to(self.dtype).cpu()
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise Unprocessable(
                "lora-overflow",
                "The LoRA does not fit its dtype",
                f"{layer.name}: its factors overflow {str(self.dtype).removeprefix('torch.')} "
                "(strengths or alphas too large for it); choose output.dtype fp32 or bf16",
                field="output.dtype",
            )
        rank = down.shape[0]
        out, *rest = layer.shape
        up_shape = (out, rank, 1, 1) if len(layer.shape) == 4 else (out, rank)  # conv: 1×1 up, LoCon down
        residual, total = relative_error(delta, up.to(delta.device), down.to(delta.device))
        self._residual += residual
        self._total += total
        self._put(f"{layer.name}.lora_down.weight", down.reshape(rank, *rest))
        self._put(f"{layer.name}.lora_up.weight", up.reshape(up_shape))
        # alpha in float32 whatever the factors' dtype: bf16 cannot hold 301, fp16 not 2049 exactly,
        # and alpha / rank must be 1 (readers take it with .item()).
        self._put(f"{layer.name}.alpha", torch.tensor(float(rank), dtype=torch.float32))
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

    def commit(self, metadata: dict[str, str]) -> dict[str, Any]:
        """Write the file and add it to the library; the result's `model` and `size_bytes`."""
        library = self.ctx.library
        library.check_name_free(self.name, field="output.name")
        header, _ = build_header(self.entries, metadata)
        tmp = library.temp_path(self.name, job_id=self.ctx.job_id)
        try:
            with open(tmp, "wb") as out:
                out.write(header)
                self._spill.seek(0)
                shutil.copyfileobj(self._spill, out, _COPY_CHUNK)
            info = library.commit(tmp, self.name, field="output.name").info()  # fsyncs it
        finally:
            tmp.unlink(missing_ok=True)
        return {"model": MergedModel.of(info).model_dump(), "size_bytes": info.size_bytes}

    def close(self) -> None:
        self._spill.close()
        self._spill_path.unlink(missing_ok=True)

    def __enter__(self) -> LoraWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def modules_csv(reports: list[dict[str, Any]]) -> bytes:
    lines = ["name,key,block,rank,relative_error"]
    lines += [f"{m['name']},{m['key']},{m['block']},{m['rank']},{m['relative_error']:.6g}" for m in reports]
    return ("\n".join(lines) + "\n").encode()
