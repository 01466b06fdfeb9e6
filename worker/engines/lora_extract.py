"""lora_extract jobs: a kohya LoRA from model_tuned − model_base, one layer at a time."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import torch

from mergeprobe.checkpoints.archs import Architecture, get_arch
from mergeprobe.lora.lora_extract_plan import ExtractRequest, plan_extract
from mergeprobe.lora.lora_output import LoraLayer, lora_file_metadata
from mergeprobe.service.errors import Unprocessable
from worker.checkpoints.checkpoint_io import MappedCheckpoint
from worker.context import JobContext
from worker.lora.lora_file import LoraWriter, modules_csv
from worker.lora.low_rank import clamp_to_quantile, layer_generator, low_rank
from worker.merging.stream_merge import pick_device

NOT_CARRIED_SHOWN = 20


def _rows(tensor: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return tensor if rows is None else tensor[rows[0] : rows[1]]


def _differs(tuned: MappedCheckpoint, base: MappedCheckpoint, key: str) -> bool:
    mine, theirs = tuned.header.tensors[key], base.header.tensors.get(key)
    if theirs is None or tuple(theirs.shape) != tuple(mine.shape):
        return True
    if (
        mine.dtype == theirs.dtype
        and (raw := tuned.raw(key)) is not None
        and (other := base.raw(key)) is not None
    ):
        return raw != other
    a, b = tuned.get(key), base.get(key)
    if a.is_floating_point() and b.is_floating_point():
        return not torch.equal(a.float(), b.float())
    return not torch.equal(a, b)


def run_lora_extract(ctx: JobContext) -> dict[str, Any]:
    request: ExtractRequest = ctx.request
    tuned_entry, base_entry, layers = plan_extract(request, ctx.library, pinned=ctx.inputs)
    arch = tuned_entry.variant.arch
    device = pick_device(request.device)
    with LoraWriter(ctx, ctx.inputs.output, request.output.dtype) as writer:
        started = time.perf_counter()
        tuned = MappedCheckpoint(tuned_entry.path, tuned_entry.header)
        base = MappedCheckpoint(base_entry.path, base_entry.header)
        try:
            unchanged = _factor_layers(ctx, request, layers, tuned, base, writer, device)
            seconds = time.perf_counter() - started
            ctx.progress(len(layers), len(layers), "comparing the other tensors")
            carried = {layer.target.key for layer in layers}
            not_carried = [
                key for key in tuned.header.tensors if key not in carried and _differs(tuned, base, key)
            ]
        finally:
            tuned.close()
            base.close()
        return _finish(ctx, request, arch, writer, unchanged, not_carried, seconds, device)


def _factor_layers(
    ctx: JobContext,
    request: ExtractRequest,
    layers: list[LoraLayer],
    tuned: MappedCheckpoint,
    base: MappedCheckpoint,
    writer: LoraWriter,
    device: torch.device,
) -> list[str]:
    """Each layer's tuned − base factored into the writer; the names of the layers left out."""
    unchanged = []
    for index, layer in enumerate(layers):
        ctx.check_cancel()
        ctx.progress(index, len(layers), "extracting layers")
        rows = layer.target.rows
        a = _rows(tuned.get(layer.target.key), rows).to(device=device, dtype=torch.float32)
        b = _rows(base.get(layer.target.key), rows).to(device=device, dtype=torch.float32)
        delta = (a - b).reshape(layer.shape[0], -1)
        del a, b
        if float(delta.abs().max()) <= request.min_diff:
            unchanged.append(layer.name)
            continue
        generator = layer_generator(request.seed, layer.name, device) if request.svd == "randomized" else None
        factors = low_rank(delta, layer.rank_cap, energy=request.energy, generator=generator)
        if request.clamp_quantile is not None:
            clamp_to_quantile(factors, request.clamp_quantile)
        writer.add(layer, factors.up, factors.down, delta)
    return unchanged


def _finish(
    ctx: JobContext,
    request: ExtractRequest,
    arch: str,
    writer: LoraWriter,
    unchanged: list[str],
    not_carried: list[str],
    seconds: float,
    device: torch.device,
) -> dict[str, Any]:
    """Warn, write the file and the report."""
    architecture = get_arch(arch)
    if not writer.reports:
        raise Unprocessable(
            "nothing-to-extract",
            "Nothing to extract",
            f"{ctx.inputs.tuned.name} and {ctx.inputs.base.name} differ by at most {request.min_diff} in every layer "
            "a LoRA is made of",
            field="model_tuned",
        )
    if not_carried:
        ctx.warn(
            f"{len(not_carried)} tensors differ between the models but no LoRA module carries them, so the "
            f"LoRA does not reproduce them: {', '.join(not_carried[:5])}"
            + ("" if request.conv_rank else " (set conv_rank to extract the ResBlock convolutions)")
        )
    summary = writer.summary()
    recipe = {
        "kind": "lora_extract",
        "request": request.model_dump(mode="json"),
        "model_tuned": ctx.inputs.tuned.model_dump(),
        "model_base": ctx.inputs.base.model_dump(),
    }
    metadata = lora_file_metadata(
        arch,
        [m["rank"] for m in summary["modules"]],
        writer.conv_ranks,
        recipe,
        request.output.metadata,
    )
    stored = writer.commit(metadata)
    ctx.write_artifact("modules.csv", modules_csv(summary["modules"]), "text/csv")
    return {
        **stored,
        "arch": arch,
        "device": str(device),
        **summary,
        "unchanged": unchanged,
        "not_carried": {
            "count": len(not_carried),
            "keys": not_carried[:NOT_CARRIED_SHOWN],
            "by_block": dict(sorted(Counter(_block(architecture, k) for k in not_carried).items())),
        },
        "seconds": round(seconds, 3),
        "torch": torch.__version__,
    }


def _block(architecture: Architecture, key: str) -> str:
    try:
        return architecture.split_key(key)[0]
    except ValueError:  # a U-Net key of no block
        return "other"
