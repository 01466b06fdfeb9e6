"""Full-size checkpoints probed offline with zero configuration: a dump and a sweep on random-weight
sd1, sd2 (ε and v) and sdxl checkpoints with the real key names, and no MERGEPROBE_PIPELINE_CONFIGS_DIR.

    python benchmarks/full_size_probe.py [--dir DIR] [--keep] [--variants sd1,sd2-epsilon,sd2-v,sdxl]
                                         [--size 64] [--steps 1] [--dtype auto]

Each checkpoint is written by ``worker.checkpoints.full_layouts`` (fp16; sd2's ε and v files differ
only in the tensor ComfyUI's rule reads, so detection decides which scheduler they get). Each runs
in a fresh process, as in a worker that just started: the dump request is prepared exactly as the
API prepares it (variant detection, refusals), the pipeline is loaded from the shipped configs with
the shipped CLIP tokenizers (timed: the load), then a dump job and a sweep job run through the real
engines. Printed per variant: detected variant, load seconds, dump and sweep seconds, and the
process's peak resident memory (ru_maxrss) after the load and at the end. Random weights make
noise images: this measures loading and the offline path, not image quality.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = {"sd1": "sd1", "sd2-epsilon": "sd2", "sd2-v": "sd2", "sdxl": "sdxl"}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_model(root: Path, variant: str, keep: bool) -> Path:
    from mergeprobe.checkpoints.checkpoint_headers import read_checkpoint_header
    from mergeprobe.checkpoints.variants import SD2_V_STATISTIC_KEY
    from worker.checkpoints.full_layouts import write_random_checkpoint

    path = root / "models" / f"full-{variant}.safetensors"
    if keep and path.exists():
        return path
    started = time.perf_counter()
    write_random_checkpoint(VARIANTS[variant], path, seed=1, dtype="fp16")
    if variant.startswith("sd2"):
        # Standard-normal values have std ≈ 1 (> 0.09: v); the ε file gets a 0.02 spread there.
        header = read_checkpoint_header(path)
        info = header.tensors[SD2_V_STATISTIC_KEY]
        spread = 1.0 if variant == "sd2-v" else 0.02
        values = [spread * (2 * i / (info.numel - 1) - 1) * 3**0.5 for i in range(info.numel)]
        with open(path, "r+b") as f:
            f.seek(header.data_start + info.data_offsets[0])
            f.write(struct.pack(f"<{info.numel}e", *values))
    print(
        f"wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return path


def child(root: Path, variant: str, size: int, steps: int) -> dict:
    """One variant in this (fresh) process: prepare, load, dump, sweep; returns the figures."""
    os.environ.pop("MERGEPROBE_PIPELINE_CONFIGS_DIR", None)
    os.environ.update(HF_HUB_OFFLINE="1", MERGEPROBE_DATA_DIR=str(root), MERGEPROBE_LOG_FORMAT="text")
    from mergeprobe.checkpoints.library import ModelLibrary
    from mergeprobe.probing.dump_request import DumpRequest
    from mergeprobe.probing.sweep_request import SweepRequest
    from mergeprobe.service.artifacts import ArtifactStore
    from mergeprobe.service.kinds import KINDS
    from mergeprobe.service.settings import Settings
    from worker.context import JobContext
    from worker.engines.dump import run_dump
    from worker.engines.sweep import run_sweep
    from worker.probing.generation import get_pipeline

    settings = Settings()
    assert settings.pipeline_configs_dir is None
    library, artifacts = ModelLibrary(settings), ArtifactStore(settings)
    model = f"full-{variant}"
    figures: dict = {"variant": variant, "rss_start_mb": round(_peak_rss_mb())}
    dump = DumpRequest(
        model=model,
        prompt="a photo of a cat, best quality",
        steps=steps,
        width=size,
        height=size,
        attention={"layers": "M00", "steps": str(steps)},
    )
    ctx = JobContext.local(KINDS["dump"], dump, settings=settings, library=library, artifacts=artifacts)
    figures["detected"] = library.variant(library.resolve(model)).name
    figures["prediction_type"] = ctx.inputs.pipeline.prediction_type
    path = library.open_pinned(ctx.inputs.model)
    started = time.perf_counter()
    get_pipeline(
        settings, path, library.header(path), ctx.inputs.arch, ctx.inputs.model.sha256, ctx.inputs.pipeline
    )
    figures["load_s"] = round(time.perf_counter() - started, 1)
    figures["rss_after_load_mb"] = round(_peak_rss_mb())
    started = time.perf_counter()
    result = run_dump(ctx)
    figures["dump_s"] = round(time.perf_counter() - started, 1)
    assert result["pipeline_cached"] and result["pipeline"]["prediction_type"] == figures["prediction_type"]
    sweep = SweepRequest(
        model_a=model,
        variants={"blocks": "IN00, M00", "alpha": 0, "beta": 0.5},
        prompt="a photo of a cat",
        seeds=[1],
        steps=steps,
        width=size,
        height=size,
    )
    sctx = JobContext.local(KINDS["sweep"], sweep, settings=settings, library=library, artifacts=artifacts)
    started = time.perf_counter()
    run_sweep(sctx)
    figures["sweep_s"] = round(time.perf_counter() - started, 1)
    figures["rss_peak_mb"] = round(_peak_rss_mb())
    for job in (ctx.job_id, sctx.job_id):
        artifacts.remove_job(job)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mergeprobe-full-probe")
    parser.add_argument("--keep", action="store_true", help="reuse checkpoints written by an earlier run")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--dtype", default="auto", help="MERGEPROBE_GENERATION_DTYPE for the runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.dir.resolve()
    if args.child:
        print("RESULT " + json.dumps(child(root, args.child, args.size, args.steps)), flush=True)
        return 0
    rows = []
    for variant in args.variants.split(","):
        path = write_model(root, variant, args.keep)
        env = {**os.environ, "MERGEPROBE_GENERATION_DTYPE": args.dtype}
        command = [sys.executable, __file__, "--dir", str(root), "--child", variant]
        command += ["--size", str(args.size), "--steps", str(args.steps)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            return 1
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
        print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            path.unlink()
    print(
        f"\n{'variant':<12} {'detected':<12} {'pred':<13} {'load s':>7} {'dump s':>7} {'sweep s':>8} {'RSS load MB':>12} {'RSS peak MB':>12}"
    )
    for r in rows:
        print(
            f"{r['variant']:<12} {r['detected']:<12} {r['prediction_type']:<13} {r['load_s']:>7} {r['dump_s']:>7} "
            f"{r['sweep_s']:>8} {r['rss_after_load_mb']:>12} {r['rss_peak_mb']:>12}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
