"""GPU check: the merge, dump and sweep headline figures of benchmarks/, at engine level, in one run.

    python benchmarks/gpu_check.py [--device cuda|cuda:N|cpu] [--size full|tiny]
                                   [--only merge,dump,sweep,extract] [--out DIR]

No Redis, no API, no rq: each engine is called in this process, the dump and sweep engines with a
stand-in job context (``worker.context.JobContext`` over a store that drops progress and never
cancels; artifacts go to DIR/artifacts and are deleted after each job). Needs torch, diffusers,
transformers, accelerate, safetensors and the project's pure-Python dependencies; see "GPU check"
in benchmarks/README.md for running it on the lent H200.

* merge  ``merge_bench.py``'s ``engine`` (``stream_merge`` of two full-size random SD1 fp16
         checkpoints, 26 block weights, fp16 output, on --device) and ``floor`` (read both inputs,
         write one file of that size) runs, warm page cache, each after merge_bench's default
         prefault, interleaved, medians of 3 (after one untimed engine run that brings the device up).
* dump   ``probe_bench.py``'s ratio: a dump job with the features of all 25 blocks at all 8 steps
         (256×256, CFG) over the same job without captures, pipeline cached, medians of 3.
* sweep  ``sweep_bench.py``'s speed-up: the layer-influence study (25 variants, 4 seeds, 64×64,
         3 steps) through the sweep engine, pipeline cached, against the naive way per variant
         (write the merged checkpoint, load it with ``from_single_file``, generate), measured on 5
         variants and extrapolated to 25.
* extract ``extract_bench.py``'s figure: a rank-32 LoRA extracted from the merge's two inputs
         (B − A, 264 modules), randomised SVD (medians of 3) and full SVD (once), on the device.

Generation runs in MERGEPROBE_GENERATION_DTYPE (``auto``: float16 on CUDA, float32 on a CPU).
``--size tiny`` runs the same code on the tiny generated sd1 models (``worker/checkpoints/tiny_models.py``)
with fewer steps and repeats: a smoke test of this script that takes seconds on a CPU; its
figures mean nothing. With ``--device cpu`` CUDA is hidden from the process.

stdout gets one figure a line, ``name value unit``; progress goes to stderr. DIR (default: a new
temp dir, removed at the end) holds the scratch files; an explicit --out DIR keeps the input
checkpoints, which the next run with the same DIR reuses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import merge_bench  # noqa: E402  (stdlib only at import time, like the two below)
import probe_bench  # noqa: E402
import sweep_bench  # noqa: E402

CHECKS = ("merge", "dump", "sweep", "extract")
FIGURES = sys.stdout  # figures only; everything else is sent to stderr
ARCH = "sd1"


@dataclass(frozen=True)
class Sizes:
    merge_repeat: int
    dump_steps: int
    dump_size: int
    dump_repeat: int
    sweep_steps: int
    sweep_size: int
    sweep_seeds: int
    naive_variants: int


SIZES = {
    # the defaults of merge_bench.py --repeat 3, probe_bench.py --repeat 3 and sweep_bench.py
    "full": Sizes(3, 8, 256, 3, 3, 64, 4, 5),
    "tiny": Sizes(1, 2, 64, 1, 2, 64, 2, 1),
}


def figure(name: str, value, unit: str = "") -> None:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    print(f"{name} {text} {unit}".rstrip(), file=FIGURES, flush=True)


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- inputs


def write_tiny_inputs(models: Path) -> list[Path]:
    """merge_bench's two inputs (seeds 1 and 2, fp16) as tiny sd1 checkpoints."""
    from worker.checkpoints.tiny_models import write_tiny_checkpoint

    names = (merge_bench.MODEL_A, merge_bench.MODEL_B)
    return [
        write_tiny_checkpoint(ARCH, models / f"{name}.safetensors", seed=seed, dtype="fp16")
        for seed, name in enumerate(names, start=1)
    ]


def generation_model(root: Path, size: str) -> str:
    """The model dump and sweep run on: probe_bench's full-sd1 (its configs set up beside it), or
    the tiny model A, whose configs ship with the project."""
    if size == "tiny":
        return merge_bench.MODEL_A
    models = root / "models"
    model_a, full = models / f"{merge_bench.MODEL_A}.safetensors", models / "full-sd1.safetensors"
    if model_a.is_file() and not full.exists():
        with contextlib.suppress(OSError):  # else _setup writes it
            os.link(model_a, full)  # the same file (seed 1, fp16): saves writing 2 GB again
    probe_bench._setup(root, keep=True)
    return "full-sd1"


# -------------------------------------------------------------------------------------- jobs


def run_job(kind: str, engine, request) -> tuple[float, dict]:
    """Run one dump or sweep job without a job store: (seconds of the engine, its result)."""
    from mergeprobe.checkpoints.library import ModelLibrary
    from mergeprobe.service.artifacts import ArtifactStore
    from mergeprobe.service.kinds import KINDS
    from mergeprobe.service.settings import Settings
    from worker.context import JobContext

    settings = Settings()
    library, artifacts = ModelLibrary(settings), ArtifactStore(settings)
    ctx = JobContext.local(KINDS[kind], request, settings=settings, library=library, artifacts=artifacts)
    try:
        started = time.perf_counter()
        result = engine(ctx)
        return time.perf_counter() - started, result
    finally:
        artifacts.remove_job(ctx.job_id)


def cached_pipeline(model: str):
    """Load the model's pipeline into the worker's cache (as on a worker that has seen it)."""
    from mergeprobe.checkpoints.library import ModelLibrary
    from mergeprobe.probing.pipeline_configs import library_pipeline_variant
    from mergeprobe.service.settings import Settings
    from worker.probing.generation import get_pipeline

    library = ModelLibrary(Settings())
    path = library.resolve(model)
    header = library.header(path)
    pipe, _, device = get_pipeline(
        Settings(), path, header, ARCH, library.hashes(path)[0], library_pipeline_variant(library, path)
    )
    return library, path, header, pipe, device


# ------------------------------------------------------------------------------------ checks


def check_merge(root: Path, size: str, device: str, sizes: Sizes) -> None:
    if size == "full":
        inputs = merge_bench.prepare_inputs(ARCH, root, keep=True)
    else:
        inputs = [
            root / "models" / f"{name}.safetensors" for name in (merge_bench.MODEL_A, merge_bench.MODEL_B)
        ]
    merge_bench.warm(inputs)
    merge_bench._clean_outputs(root)
    # Each run touches and frees this much memory first, as merge_bench's children do by default
    # (see its README section: on a VM that hands freed memory back, first touches are slow).
    merge_bench.PREFAULT_MB = (inputs[0].stat().st_size >> 20) + 256
    started = time.perf_counter()
    merge_bench.child_engine(ARCH, root, device)
    log(f"merge: untimed engine run {time.perf_counter() - started:.2f} s")
    engine, floor = [], []
    for rep in range(sizes.merge_repeat):  # interleaved, as merge_bench --repeat does
        merge_bench._clean_outputs(root)
        floor.append(merge_bench.child_floor(ARCH, root)["seconds"])
        merge_bench._clean_outputs(root)
        engine.append(merge_bench.child_engine(ARCH, root, device)["seconds"])
        log(f"merge {rep + 1}/{sizes.merge_repeat}: engine {engine[-1]:.3f} s, floor {floor[-1]:.3f} s")
    merge_bench._clean_outputs(root)
    e, f = statistics.median(engine), statistics.median(floor)
    figure("merge_input_gb", inputs[0].stat().st_size / 1e9, "GB")
    figure("merge_engine_s", e, "s")
    figure("merge_floor_s", f, "s")
    figure("merge_engine_over_floor", e / f, "x")


def check_dump(model: str, sizes: Sizes) -> None:
    from mergeprobe.probing.dump_request import DumpRequest
    from worker.engines.dump import run_dump

    def run(features: bool) -> tuple[float, int]:
        body = probe_bench.dump_body(model, sizes.dump_steps, sizes.dump_size, features)
        seconds, result = run_job("dump", run_dump, DumpRequest.model_validate(body))
        return seconds, result["captures"]

    p, d, captures = probe_bench.time_dump(run, sizes.dump_repeat, lambda line: log(f"dump: {line}"))
    figure("dump_captures", captures, "PNGs")
    figure("dump_plain_s", p, "s")
    figure("dump_all_blocks_s", d, "s")
    figure("dump_overhead_ratio", d / p, "x")


def check_sweep(root: Path, model: str, sizes: Sizes) -> None:
    from mergeprobe.probing.pipeline_configs import find_config_dir
    from mergeprobe.probing.sweep_request import SweepRequest
    from mergeprobe.service.settings import Settings
    from worker.engines.sweep import run_sweep

    started = time.perf_counter()
    library, _, header, _, device = cached_pipeline(model)
    log(f"sweep: pipeline cached in {time.perf_counter() - started:.2f} s")
    body = sweep_bench.study_body(
        model, list(range(1, sizes.sweep_seeds + 1)), sizes.sweep_steps, sizes.sweep_size
    )
    sweep, result = run_job("sweep", run_sweep, SweepRequest.model_validate(body))
    log(
        f"sweep: {sweep:.2f} s for {result['images']} images in {result['pipeline_calls']} calls "
        f"(generating {result['seconds_generating']:.2f} s, switching {result['seconds_switching']:.2f} s)"
    )
    config_dir = find_config_dir(ARCH, header, Settings())
    naive = []
    for block in sweep_bench.NAIVE_BLOCKS[: sizes.naive_variants]:
        write, load, generate = sweep_bench.naive_variant(
            library, body, block, root / "naive.safetensors", config_dir
        )
        naive.append(write + load + generate)
        log(f"sweep: naive {block}: write {write:.2f} s, load {load:.2f} s, generate {generate:.2f} s")
    variants = len(result["variants"])
    naive_all = variants * statistics.mean(naive)  # the baseline's generation left out, as sweep_bench does
    figure("sweep_s", sweep, "s")
    figure("sweep_generating_s", result["seconds_generating"], "s")
    figure("sweep_switching_s", result["seconds_switching"], "s")
    figure("sweep_variants", variants)
    figure("sweep_naive_variant_s", statistics.mean(naive), "s")
    figure("sweep_naive_s", naive_all, "s")  # extrapolated to every variant
    figure("sweep_speedup", naive_all / sweep, "x")


def check_extract(root: Path, size: str, sizes: Sizes) -> None:
    """extract_bench's figure: a rank-32 LoRA from merge_bench's two inputs (B − A), randomised SVD
    (medians of merge_repeat) and full SVD (once), the job's engine on the device it picks."""
    from mergeprobe.lora.lora_extract_plan import ExtractRequest
    from worker.engines.lora_extract import run_lora_extract

    if size == "full":
        merge_bench.prepare_inputs(ARCH, root, keep=True)
    for svd, repeat in (("randomized", sizes.merge_repeat), ("full", 1)):
        seconds, layers = [], []
        for rep in range(repeat):
            output = f"gpu-check-extract-{svd}-{rep}.safetensors"
            request = ExtractRequest(
                model_tuned=merge_bench.MODEL_B,
                model_base=merge_bench.MODEL_A,
                rank=32,
                svd=svd,
                output={"name": output},
            )
            took, result = run_job("lora_extract", run_lora_extract, request)
            (root / "models" / output).unlink(missing_ok=True)
            seconds.append(took)
            layers.append(result["seconds"])
            log(
                f"extract {svd} {rep + 1}/{repeat}: {took:.2f} s on {result['device']}, {len(result['modules'])} modules"
            )
        figure(f"extract_{svd}_s", statistics.median(seconds), "s")
        figure(f"extract_{svd}_layers_s", statistics.median(layers), "s")


# -------------------------------------------------------------------------------------- main


def _environment(root: Path, device: str) -> None:
    """Everything goes under root; nothing is fetched; --device cpu hides CUDA (set before torch loads)."""
    os.environ.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MERGEPROBE_DATA_DIR=str(root),
        MERGEPROBE_MODELS_DIR=str(root / "models"),
        MERGEPROBE_ARTIFACTS_BACKEND="local",
        MERGEPROBE_ARTIFACTS_DIR=str(root / "artifacts"),
        MERGEPROBE_PIPELINE_CONFIGS_DIR=str(root / "configs"),
    )
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _device_figures(device: str) -> str:
    """Print the device figures; returns the device as the engines name it (cuda:N becomes the
    current CUDA device, which is what their plain "cuda" means)."""
    import platform

    import diffusers
    import torch

    from mergeprobe.service.settings import Settings
    from worker.probing.pipelines import pick_device

    if device == "cpu":
        figure("device", f"cpu {platform.machine()} ({os.cpu_count()} cores)")
    else:
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA device")
        torch.cuda.set_device(torch.device(device))
        torch.zeros(1, device="cuda")  # the CUDA context, before anything is timed
        figure("device", torch.cuda.get_device_name())
    figure("torch", torch.__version__)
    figure("diffusers", diffusers.__version__)
    _, dtype = pick_device(Settings().generation_dtype)  # as dump and sweep jobs pick it
    figure("generation_dtype", str(dtype).removeprefix("torch."))
    return "cpu" if device == "cpu" else "cuda"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--size", choices=tuple(SIZES), default="full")
    parser.add_argument(
        "--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}"
    )
    parser.add_argument("--out", type=Path, default=None, help="scratch files (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    checks = [c.strip() for c in args.only.split(",") if c.strip()]
    if not checks or set(checks) - set(CHECKS):
        parser.error(f"--only takes a comma-separated subset of {','.join(CHECKS)}")
    if args.device != "cpu" and args.device.split(":")[0] != "cuda":
        parser.error("--device is cuda, cuda:N or cpu")

    root = (args.out or Path(tempfile.mkdtemp(prefix="mergeprobe-gpu-check-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    _environment(root, args.device)
    sizes = SIZES[args.size]
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the helpers' progress lines
            device = _device_figures(args.device)
            figure("size", args.size)
            if args.size == "tiny":
                write_tiny_inputs(root / "models")
            if "merge" in checks:
                check_merge(root, args.size, device, sizes)
            if "dump" in checks or "sweep" in checks:
                model = generation_model(root, args.size)
                if "dump" in checks:
                    check_dump(model, sizes)
                if "sweep" in checks:
                    check_sweep(root, model, sizes)
            if "extract" in checks:
                check_extract(root, args.size, sizes)
        figure("total_s", time.perf_counter() - started, "s")
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            merge_bench._clean_outputs(root)
            (root / "naive.safetensors").unlink(missing_ok=True)
            shutil.rmtree(root / "artifacts", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
