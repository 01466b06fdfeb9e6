"""bake jobs: LoRAs added to a checkpoint's tensors while it is streamed into a new library model."""

from __future__ import annotations

from mergeprobe.lora.bake_plan import attach_loras, plan_bake
from mergeprobe.merging.merge_plan import plan_merge
from worker.context import JobContext
from worker.engines.merge import write_plan


def run_bake(ctx: JobContext) -> dict:
    request, inputs = ctx.request, ctx.inputs
    bake = plan_bake(request, ctx.library, pinned=inputs)
    merge_request = request.as_merge(inputs.model.name)
    plan = plan_merge(
        merge_request,
        ctx.library,
        output_name=inputs.output,
        pinned={"a": inputs.model, "b": inputs.model},
    )
    # One input: B was A at α = 0, so every key is planned as A's.
    for slots in (plan.pins, plan.paths, plan.headers):
        slots.pop("b", None)
    attach_loras(plan, bake.matching)
    result = write_plan(ctx, plan, merge_request, request.model_dump(mode="json"))
    return {**result, "loras": [report.to_json() for report in bake.reports]}
