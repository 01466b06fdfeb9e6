"""lora_merge jobs: several LoRAs into one, layer by layer (see mergeprobe.lora.lora_merge_plan)."""

from __future__ import annotations

import math
from typing import Any

import torch

from mergeprobe.lora.lora_merge_plan import LoraMergeRequest, plain_module, plan_lora_merge
from mergeprobe.lora.lora_output import lora_file_metadata
from worker.checkpoints.checkpoint_io import MappedCheckpoint
from worker.context import JobContext
from worker.lora.lora_delta import lora_delta
from worker.lora.lora_file import LoraWriter, modules_csv
from worker.lora.low_rank import layer_generator, low_rank, low_rank_of_product
from worker.merging.merge_executor import module_factors
from worker.merging.stream_merge import pick_device


def _scaled_factors(factors: dict[str, torch.Tensor], alpha: float | None, strength: float):
    """(up, down) as 2-D float32 matrices with strength × alpha/rank folded in, its square root on
    each (sign on up), so that neither grows as the square of the other in a half-precision file."""
    down, up = factors["lora_down.weight"].float(), factors["lora_up.weight"].float()
    rank = down.shape[0]
    scale = strength * ((alpha / rank) if alpha else 1.0)
    root = math.sqrt(abs(scale))
    return up.reshape(up.shape[0], rank) * math.copysign(root, scale), down.reshape(rank, -1) * root


def run_lora_merge(ctx: JobContext) -> dict[str, Any]:
    request: LoraMergeRequest = ctx.request
    plan = plan_lora_merge(request, ctx.library, pinned=ctx.inputs)
    for warning in plan.matching.warnings:
        ctx.warn(warning)
    device = pick_device(request.device)
    sources = [MappedCheckpoint(entry.path, entry.header) for entry in plan.matching.entries]
    with LoraWriter(ctx, ctx.inputs.output, request.output.dtype) as writer:
        try:
            for index, (layer, modules) in enumerate(plan.layers):
                ctx.check_cancel()
                ctx.progress(index, len(plan.layers), "merging modules")
                up, down, delta = _merged_layer(request, layer, modules, sources, device)
                writer.add(layer, up, down, delta)
        finally:
            for source in sources:
                source.close()
        return _finish(ctx, request, plan, writer, device)


def _merged_layer(request, layer, modules, sources, device):
    """(up, down, ΔW) of one output module from the inputs' modules of its layer."""
    rows = layer.shape[0]
    if all(plain_module(module) for module in modules):
        ups, downs = [], []
        for module in modules:
            factors, alpha = module_factors(sources[module.lora], module, device)
            up, down = _scaled_factors(factors, alpha, module.strength)
            ups.append(up)
            downs.append(down)
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
        delta = up @ down
        if request.mode == "svd":
            reduced = low_rank_of_product(up, down, layer.rank_cap, energy=request.energy)
            up, down = reduced.up, reduced.down
        return up, down, delta
    # LoHa, LoKr, Tucker cores (mode svd only): their updates summed, then reduced
    delta = torch.zeros(rows, *layer.shape[1:], device=device)
    for module in modules:
        factors, alpha = module_factors(sources[module.lora], module, device)
        delta += module.strength * lora_delta(module.algorithm, factors, layer.shape, alpha=alpha)
    delta = delta.reshape(rows, -1)
    reduced = low_rank(
        delta, layer.rank_cap, energy=request.energy, generator=layer_generator(0, layer.name, device)
    )
    return reduced.up, reduced.down, delta


def _finish(ctx, request, plan, writer, device) -> dict[str, Any]:
    summary = writer.summary()
    recipe = {
        "kind": "lora_merge",
        "request": request.model_dump(mode="json"),
        "loras": [pin.model_dump() for pin in ctx.inputs.loras],
    }
    metadata = lora_file_metadata(
        plan.arch, [m["rank"] for m in summary["modules"]], writer.conv_ranks, recipe, request.output.metadata
    )
    stored = writer.commit(metadata)
    ctx.write_artifact("modules.csv", modules_csv(summary["modules"]), "text/csv")
    return {
        **stored,
        "arch": plan.arch,
        "mode": request.mode,
        "device": str(device),
        "loras": [report.to_json() for report in plan.matching.reports],
        **summary,
        "torch": torch.__version__,
    }
