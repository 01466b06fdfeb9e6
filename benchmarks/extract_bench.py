"""Extracting a rank-32 LoRA from two full-size checkpoints.

    python benchmarks/extract_bench.py [--arch sd1|sd2|sdxl] [--dir DIR] [--keep] [--repeat N]
                                       [--rank 32] [--conv-rank N] [--svd randomized,full] [--device cpu|cuda]

Two full-size random fp16 checkpoints of the arch (real key names and shapes; seeds 1 and 2) are
written into DIR (reused with --keep) and read once to warm the page cache. The lora_extract job's
engine (`worker.engines.lora_extract.run_lora_extract`, in a `JobContext.local`, the request
pinned as the API pins it) then runs `--repeat` times per SVD method: planning, reading both
checkpoints layer by layer, the SVDs, comparing the other tensors, writing and committing the LoRA.
Printed per method: median / min / max seconds of the whole job, the engine's own `seconds`
(reading and factoring the layers), peak anonymous memory (RssAnon, sampled every 20 ms) and the
overall relative error. Random checkpoints differ by full-rank noise: the time of an SVD does not
depend on the values, the error does (a real fine-tune's difference is far closer to low rank).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bake_bench import PeakSampler  # noqa: E402 - after the path set-up
from merge_bench import _rss_anon_mb, warm  # noqa: E402


def run_extract(
    directory: Path, arch: str, output: str, *, rank: int, conv_rank: int | None, svd: str, device: str
) -> dict:
    from mergeprobe.checkpoints.library import ModelLibrary
    from mergeprobe.lora.lora_extract_plan import ExtractRequest
    from mergeprobe.service.kinds import KINDS
    from mergeprobe.service.settings import Settings
    from worker.context import JobContext
    from worker.engines.lora_extract import run_lora_extract

    settings = Settings(data_dir=directory / "data", models_dir=directory / "models")
    library = ModelLibrary(settings)
    request = ExtractRequest(
        model_tuned=f"bench-{arch}-tuned",
        model_base=f"bench-{arch}-base",
        rank=rank,
        conv_rank=conv_rank,
        svd=svd,
        device=device,
        output={"name": output},
    )
    ctx = JobContext.local(KINDS["lora_extract"], request, settings=settings, library=library)
    baseline = _rss_anon_mb()
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    result = run_lora_extract(ctx)
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    (directory / "models" / output).unlink()
    return {
        "seconds": seconds,
        "engine_seconds": result["seconds"],
        "peak_rss_anon_mb": peak,
        "baseline_rss_anon_mb": baseline,
        "modules": len(result["modules"]),
        "relative_error": result["relative_error"],
        "size_mb": result["size_bytes"] / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd1", choices=("sd1", "sd2", "sdxl"))
    parser.add_argument("--dir", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--conv-rank", type=int, default=None)
    parser.add_argument("--svd", default="randomized,full")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    directory = Path(args.dir or f"/tmp/mergeprobe-bench-extract-{args.arch}")
    models = directory / "models"
    models.mkdir(parents=True, exist_ok=True)
    from worker.checkpoints.full_layouts import write_random_checkpoint

    paths = []
    for seed, role in ((1, "base"), (2, "tuned")):
        path = models / f"bench-{args.arch}-{role}.safetensors"
        if not (args.keep and path.is_file()):
            write_random_checkpoint(args.arch, path, seed=seed, dtype="fp16")
        paths.append(path)
    warm(paths)
    print(
        f"{args.arch} fp16, 2 × {paths[0].stat().st_size / 1e9:.2f} GB, rank {args.rank}, device {args.device}"
    )
    for svd in args.svd.split(","):
        runs = []
        for i in range(args.repeat):
            os.sync()
            runs.append(
                run_extract(
                    directory,
                    args.arch,
                    f"bench-extract-{i}.safetensors",
                    rank=args.rank,
                    conv_rank=args.conv_rank,
                    svd=svd,
                    device=args.device,
                )
            )
        seconds = [r["seconds"] for r in runs]
        print(
            f"{svd:10} job median {statistics.median(seconds):6.2f} s  min {min(seconds):6.2f}  "
            f"max {max(seconds):6.2f}; layers {statistics.median(r['engine_seconds'] for r in runs):6.2f} s; "
            f"{runs[0]['modules']} modules, {runs[0]['size_mb']:.0f} MB; peak RssAnon "
            f"{max(r['peak_rss_anon_mb'] for r in runs):.0f} MB (baseline {runs[0]['baseline_rss_anon_mb']:.0f}); "
            f"relative error {runs[0]['relative_error']:.4f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
