"""sweep jobs: one baseline in memory, the variants generated against it in batches.

The pipeline is the worker's cached one for model_a. A baseline merge is applied to its
parameters in place, every tensor computed from the memory-mapped input files exactly as
stream_merge computes it (same ranges and random draws, OpenCLIP's fused q/k/v as stored), the
request's LoRAs added in the same pass (`MergePlan.loras`, text encoders included), and model_a's
own values go back at the end (``worker.probing.pipeline_weights``), so the cached pipeline is
unchanged. Variants never write into the pipeline: each one's changed U-Net tensors are computed
aside and substituted for its own rows of a batched U-Net call (``worker.probing.variant_batch``),
so the baseline's weights stay bit for bit what they were. A variant that changes a LoRA's
strength on a block recomputes the keys its modules modify there (the baseline merge of that key
plus every module at the variant's strength), so a LoRA switched off on a block gives model A's
(or the merge's) tensors there exactly.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import replace
from typing import Any

import torch

from mergeprobe.checkpoints.archs import get_arch
from mergeprobe.lora.bake_plan import add_request_loras
from mergeprobe.merging.merge_plan import MergePlan, change_plan, plan_merge
from mergeprobe.probing.sweep_request import BASELINE_NAME, SweepInputs, SweepRequest, Variant, XYVariants
from mergeprobe.service.settings import Settings
from worker.checkpoints.checkpoint_io import MappedCheckpoint
from worker.context import JobContext
from worker.probing.generation import PromptEncoder, get_pipeline, make_scheduler
from worker.probing.pipeline_weights import PipelineWeights as _Weights
from worker.probing.pipeline_weights import apply_plan as _apply_baseline
from worker.probing.render import png_bytes
from worker.probing.sweep_render import (
    Cell,
    difference_image,
    flip_gif,
    influence,
    rows_grid,
    u_grid,
    xy_grid,
)
from worker.probing.variant_batch import VariantBatch

CSV_COLUMNS = ("variant", "label", "seed", "changed_share", "mean_abs_diff", "ssim")


def _variant_patch(weights: _Weights, changed: MergePlan, seed: int) -> dict[str, torch.Tensor]:
    """U-Net parameter name → the variant's tensor, for the parameters whose value it really changes."""
    patch = {}
    for values in weights.planned(changed, seed):
        for param_id, value in values.items():
            param = weights.params[param_id]
            value = value.to(device=param.device, dtype=param.dtype)
            if not torch.equal(value, param.detach()):
                patch[param_id[1]] = value
    return patch


def variants_per_call(request: SweepRequest, seeds: int, settings: Settings) -> int:
    """How many variants one pipeline call generates: as many as fit MERGEPROBE_SWEEP_BATCH_PIXELS."""
    images = settings.sweep_batch_pixels // (request.width * request.height)
    return max(1, images // seeds)


def run_sweep(ctx: JobContext) -> dict[str, Any]:
    started = time.monotonic()
    request: SweepRequest = ctx.request
    inputs: SweepInputs = ctx.inputs
    arch = inputs.arch
    settings = ctx.settings
    plan = plan_merge(request.baseline_merge(), ctx.library, output_name=BASELINE_NAME, pinned=inputs.models)
    # added to the baseline in the same pass, matched against model A's keys
    reports = add_request_loras(plan, request.loras, ctx.library, inputs.loras)
    for warning in [*plan.warnings, *inputs.warnings]:
        ctx.warn(warning)
    merge_seed = request.seed
    ctx.progress(0, 1, "loading pipeline")
    pipe, cached, device = get_pipeline(
        settings, plan.paths["a"], plan.headers["a"], arch, plan.pins["a"].sha256, inputs.pipeline
    )
    sources = {
        slot: MappedCheckpoint(p, plan.headers[slot], read_delay=settings.debug_tensor_delay)
        for slot, p in plan.paths.items()
    }
    weights = _Weights(pipe, arch, sources)
    variants = [Variant.from_json(v) for v in inputs.variants]
    unet_blocks = get_arch(arch).unet_blocks
    encoder = PromptEncoder(pipe, arch == "sdxl", device)
    pipe.scheduler = make_scheduler(request.sampler, pipe.scheduler.config)
    baselines_needed = {(tuple(v.seeds or request.seeds), v.prompt or request.prompt) for v in variants}
    total = sum(len(s) for s, _ in baselines_needed) + sum(len(v.seeds or request.seeds) for v in variants)
    done = 0
    timings = {"generating": 0.0, "switching": 0.0}  # where the time went, for the result
    calls = 0
    artifacts: list[dict[str, Any]] = []

    def save(name: str, data: bytes, media_type: str, **facts: Any) -> None:
        record = ctx.write_artifact(name, data, media_type)
        artifacts.append({"name": name, "url": record["url"], **facts})

    def generate(prompt: str, seeds: list[int]):
        nonlocal done, calls
        calls += 1
        pos, pooled = encoder(prompt)
        neg, neg_pooled = encoder(request.negative_prompt, negative=True)
        kwargs: dict[str, Any] = {"prompt_embeds": pos, "negative_prompt_embeds": neg}
        if arch == "sdxl":
            kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)

        def on_step_end(_pipe, index, _timestep, callback_kwargs):
            ctx.check_cancel()
            # A batched call finishes all its images at once: say how far it is meanwhile.
            ctx.progress(done, total, f"generating {len(seeds)} images, step {index + 1} of {request.steps}")
            return callback_kwargs

        generation_started = time.monotonic()
        with torch.no_grad():
            images = pipe(
                **kwargs,
                num_inference_steps=request.steps,
                guidance_scale=request.cfg_scale,
                width=request.width,
                height=request.height,
                num_images_per_prompt=len(seeds),
                generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds],
                callback_on_step_end=on_step_end,
                output_type="pil",
            ).images
        timings["generating"] += time.monotonic() - generation_started
        done += len(seeds)
        ctx.progress(done, total, "generating")
        return images

    rows: list[dict[str, Any]] = []
    cells: dict[str, Cell] = {}  # variant name → its images and seeds, for the grid
    baseline_images: dict[tuple[str, int], Any] = {}
    try:
        ctx.progress(0, total, "merging the baseline")
        _apply_baseline(weights, plan, merge_seed)
        for seeds, prompt in sorted(baselines_needed):
            for seed, image in zip(seeds, generate(prompt, list(seeds)), strict=True):
                if (prompt, seed) not in baseline_images:
                    baseline_images[(prompt, seed)] = image
                    save(
                        f"baseline_s{seed}{_prompt_tag(prompt, request.prompt)}.png",
                        png_bytes(image),
                        "image/png",
                        kind="baseline",
                        seed=seed,
                        prompt=prompt,
                    )

        def record(variant: Variant, prompt: str, seeds: list[int], images: list[Any]) -> None:
            cells[variant.name] = Cell(tuple(images), variant.label, tuple(seeds))
            for seed, image in zip(seeds, images, strict=True):
                base = baseline_images[(prompt, seed)]
                metrics = influence(base, image, request.diff_threshold)
                rows.append({"variant": variant.name, "label": variant.label, "seed": seed, **metrics})
                facts = {"variant": variant.name, "label": variant.label, "seed": seed}
                save(f"{variant.name}_s{seed}.png", png_bytes(image), "image/png", kind="variant", **facts)
                save(
                    f"diff_{variant.name}_s{seed}.png",
                    png_bytes(difference_image(base, image, request.diff_threshold)),
                    "image/png",
                    kind="difference",
                    **facts,
                )
                save(
                    f"flip_{variant.name}_s{seed}.gif",
                    flip_gif(base, image, labels=("baseline", variant.label)),
                    "image/gif",
                    kind="flip",
                    **facts,
                )

        def run_call(call: list[tuple[Variant, dict[str, torch.Tensor]]]) -> None:
            """One pipeline call for variants that share prompt and seeds."""
            nonlocal done
            prompt = call[0][0].prompt or request.prompt
            seeds = list(call[0][0].seeds or request.seeds)
            live = [(variant, patch) for variant, patch in call if patch]
            images: dict[str, list[Any]] = {}
            if live:
                with VariantBatch(pipe.unet, [patch for _, patch in live], len(seeds)):
                    generated = generate(prompt, seeds * len(live))
                for i, (variant, _) in enumerate(live):
                    images[variant.name] = generated[i * len(seeds) : (i + 1) * len(seeds)]
            for variant, patch in call:
                if not patch:
                    # Its weights are the baseline's bit for bit, so its images are the baseline's.
                    images[variant.name] = [baseline_images[(prompt, seed)] for seed in seeds]
                    done += len(seeds)
                    ctx.progress(done, total, "generating")
                record(variant, prompt, seeds, images[variant.name])

        call: list[tuple[Variant, dict[str, torch.Tensor]]] = []
        call_bytes = 0
        for variant in variants:
            ctx.check_cancel()
            switch_started = time.monotonic()
            patch = _variant_patch(weights, change_plan(plan, variant.change(), unet_blocks), merge_seed)
            timings["switching"] += time.monotonic() - switch_started
            patch_bytes = sum(t.numel() * t.element_size() for t in patch.values())
            seeds = variant.seeds or request.seeds
            if call and (
                (variant.prompt, variant.seeds) != (call[0][0].prompt, call[0][0].seeds)
                or sum(1 for _, p in call if p) >= variants_per_call(request, len(seeds), settings)
                or call_bytes + patch_bytes > settings.sweep_batch_bytes
            ):
                run_call(call)
                call, call_bytes = [], 0
            call.append((variant, patch))
            call_bytes += patch_bytes
        if call:
            run_call(call)
    finally:
        weights.restore_a()
        for source in sources.values():
            source.close()

    baseline_cell = (
        Cell(
            tuple(baseline_images[(request.prompt, s)] for s in request.seeds),
            "baseline",
            tuple(request.seeds),
        )
        if all((request.prompt, s) in baseline_images for s in request.seeds)
        else None
    )
    ranking = _ranking(rows)
    grid = _grid(request, variants, _with_influence(cells, ranking), baseline_cell, get_arch(arch))
    save("grid.png", png_bytes(grid), "image/png", kind="grid")
    save("influence.csv", _csv(rows), "text/csv", kind="influence")
    manifest = {"arch": arch, "variants": [v.to_json() for v in variants], "artifacts": artifacts}
    ctx.write_artifact("manifest.json", json.dumps(manifest, indent=1).encode(), "application/json")
    return {
        "arch": arch,
        "variants": [v.name for v in variants],
        "rows": rows,
        "ranking": ranking,
        "images": done,
        "pipeline_cached": cached,
        "pipeline": inputs.pipeline.model_dump(),
        "device": str(device),
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "seconds": round(time.monotonic() - started, 3),
        "seconds_generating": round(timings["generating"], 3),
        "pipeline_calls": calls,
        "seconds_switching": round(timings["switching"], 3),
        "loras": reports,
    }


def _prompt_tag(prompt: str, main: str) -> str:
    return "" if prompt == main else "_p" + hashlib.sha256(prompt.encode()).hexdigest()[:6]


def _grid(
    request: SweepRequest, variants: list[Variant], cells: dict[str, Cell], baseline_cell: Cell | None, arch
):
    spec = request.variants
    if isinstance(spec, XYVariants):
        by_position = {v.position: cells[v.name] for v in variants}
        xs = sorted({v.position[0] for v in variants})
        ys = sorted({v.position[1] for v in variants})
        x_labels = [next(v.label.split(" | ")[0] for v in variants if v.position == (x, 0)) for x in xs]
        y_labels = [next(v.label.split(" | ")[1] for v in variants if v.position == (0, y)) for y in ys]
        return xy_grid(by_position, x_labels, y_labels, x_title=spec.x.kind, y_title=spec.y.kind)
    if hasattr(spec, "blocks"):
        return u_grid({v.name: cells[v.name] for v in variants}, baseline_cell, list(arch.unet_blocks))
    return rows_grid([cells[v.name] for v in variants], baseline_cell)


def _with_influence(cells: dict[str, Cell], ranking: list[dict[str, Any]]) -> dict[str, Cell]:
    """Each variant's cell with its influence figure: its mean changed share over its seeds (the
    ranking's, from the rows of influence.csv)."""
    changed = {r["variant"]: r["changed_share"] for r in ranking}
    return {name: replace(cell, changed_share=changed[name]) for name, cell in cells.items()}


def _ranking(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    ranking = [
        {
            "variant": name,
            "label": group[0]["label"],
            "changed_share": sum(r["changed_share"] for r in group) / len(group),
            "mean_abs_diff": sum(r["mean_abs_diff"] for r in group) / len(group),
            "ssim": sum(r["ssim"] for r in group) / len(group),
        }
        for name, group in by_variant.items()
    ]
    return sorted(ranking, key=lambda r: (-r["changed_share"], -r["mean_abs_diff"]))


def _csv(rows: list[dict[str, Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **{k: f"{row[k]:.6f}" for k in ("changed_share", "mean_abs_diff", "ssim")}})
    return out.getvalue().encode()
