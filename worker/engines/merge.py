"""merge and elemental jobs: plan from the headers, stream the merge, register the result."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter

import torch

from mergeprobe.lora.bake_plan import add_request_loras
from mergeprobe.merging.merge_metadata import merge_metadata
from mergeprobe.merging.merge_plan import MergePlan, MergeRequest, plan_merge
from mergeprobe.service.kinds import MergedModel
from worker.context import JobContext
from worker.merging.stream_merge import pick_device, stream_merge

PLAN_COLUMNS = ("key", "block", "element", "alpha", "beta", "action", "reason")


def _execute(ctx: JobContext, request: MergeRequest) -> tuple[MergePlan, dict]:
    plan = plan_merge(request, ctx.library, output_name=ctx.inputs.output, pinned=ctx.inputs.models)
    # added to the merge result in the same pass
    reports = add_request_loras(plan, request.loras, ctx.library, ctx.inputs.loras)
    result = write_plan(ctx, plan, request, request.model_dump(mode="json"))
    return plan, {**result, "loras": reports}


def write_plan(ctx: JobContext, plan: MergePlan, request: MergeRequest, recipe: dict) -> dict:
    """Stream a plan into a new library model; the merge result (`recipe`: the request as the
    output's metadata records it)."""
    for warning in plan.warnings:
        ctx.warn(warning)
    ctx.progress(0, len(plan.keys), "preparing the output")  # inputs were hashed when pinned
    hashes = {slot: ctx.library.hashes(path) for slot, path in plan.paths.items()}
    metadata = merge_metadata(plan, recipe, hashes, request.output.metadata)
    library = ctx.library
    library.check_name_free(plan.output_name)
    tmp = library.temp_path(plan.output_name, job_id=ctx.job_id)
    device = pick_device(request.device)
    try:
        data_sha256 = stream_merge(
            plan,
            tmp,
            metadata,
            device=device,
            seed=request.seed,
            threads=max(2, min(4, os.cpu_count() or 2)),
            check_cancel=ctx.check_cancel,
            progress=lambda done, total: ctx.progress(done, total, "merging tensors"),
            read_delay=ctx.settings.debug_tensor_delay,
        )
        # Read back as the library and the next merge will read it (layout, header size): a file
        # that could not be listed is never committed.
        info = library.commit(tmp, plan.output_name, field="output.name").info()
    finally:
        tmp.unlink(missing_ok=True)
    ctx.add_counter("merge_bytes_read", bytes_read(plan))
    ctx.add_counter("merge_bytes_written", info.size_bytes)
    result = {
        "model": MergedModel.of(info).model_dump(),
        "arch": plan.arch.name,
        "mode": plan.method.name,
        "device": str(device),
        "keys": len(plan.keys),
        "actions": dict(sorted(Counter(k.action for k in plan.keys).items())),
        "size_bytes": info.size_bytes,
        "data_sha256": data_sha256,
        "torch": torch.__version__,
    }
    return result


def run_merge(ctx: JobContext) -> dict:
    _, result = _execute(ctx, ctx.request)
    return result


def run_elemental(ctx: JobContext) -> dict:
    plan, result = _execute(ctx, ctx.request)
    ctx.write_artifact("plan.csv", plan_csv(plan), "text/csv")
    return result


def bytes_read(plan: MergePlan) -> int:
    """Bytes of input tensors the merge reads: each source tensor a key's action takes."""
    return sum(plan.headers[slot].tensors[key].nbytes for k in plan.keys for slot, key in plan.reads(k))


def plan_csv(plan: MergePlan) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(PLAN_COLUMNS)
    for k in plan.keys:
        row = k.to_json()
        writer.writerow(["" if row[column] is None else row[column] for column in PLAN_COLUMNS])
    return out.getvalue().encode()
