"""Full-size merge benchmark: mergeprobe's streaming engine against sd-mecha, the I/O floor and a naive merge.

    python benchmarks/merge_bench.py [--arch sd1|sdxl] [--dir DIR] [--keep] [--runs engine,job,mecha,floor,floor_hash,naive] [--repeat N]

Two full-size random fp16 checkpoints of the arch (the real key names and shapes, from
``worker.checkpoints.full_layouts``) are written into DIR/models (reused with --keep when present) and read
once to warm the page cache. Each run then happens in a fresh subprocess, so its peak memory is
its own; the parent samples the child's /proc/<pid>/status every 20 ms and reports the peaks over
the child's timed section of RssAnon (anonymous memory: what the process itself allocated, as
opposed to file pages of the page cache, which memory-mapped inputs use) and VmRSS (file pages
included). Before its timed section each child touches and frees --prefault-mb of memory (see
benchmarks/README.md: on a VM that hands freed memory back to its host, first touches are slow).

Runs (the seconds are those of the timed section, measured in the child):

* engine  ``worker.merging.stream_merge.stream_merge`` on a ``plan_merge`` plan: weighted_sum with 26 block
          weights (BASE and 25 different U-Net values), fp16 output, threads as the job path uses.
* job     the whole merge job path (``worker.engines.merge.run_merge`` with a stand-in job context):
          planning, sha256 of both inputs (cold hash cache), the merge, registering the output
          (which hashes it as well).
* mecha   sd-mecha's ``weighted_sum`` with the same 26 block weights (``sd1-supermerger_blocks`` /
          ``sdxl-supermerger_blocks`` converted to the LDM config), its defaults, the threads the
          engine is given.
* floor   the I/O floor: read both inputs fully and write one file of the same size, 16 MB at a
          time, no arithmetic, then fsync it (the engine fsyncs its output before the commit).
* floor_hash  the floor plus the sha256 of the written bytes in a second thread: the engine must
          hash its output (``modelspec.hash_sha256``), and one sha256 stream runs at ~2 GB/s.
* naive   load everything: ``safetensors.torch.load_file`` both, a weighted sum per key in fp32,
          ``save_file``.

Outputs are deleted after each run; inputs only without --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CHUNK = 16 * 1024 * 1024
SAMPLE_EVERY = 0.02
MODEL_A, MODEL_B = "bench-a", "bench-b"
ALL_RUNS = ("engine", "job", "mecha", "floor", "floor_hash", "naive")
PREFAULT_MB = int(os.environ.get("MERGE_BENCH_PREFAULT_MB", "0") or 0)  # set by the parent for each run


# ----------------------------------------------------------------------------------- weights


def block_weights(arch_name: str) -> dict[str, float]:
    """BASE 0.3 and a gradient over the U-Net blocks, every value different and none 0 or 1
    (0 and 1 would let the engine copy bytes instead of merging)."""
    from mergeprobe.checkpoints.archs import BASE, get_arch

    blocks = get_arch(arch_name).unet_blocks
    weights = {BASE: 0.3}
    for i, block in enumerate(blocks):
        weights[block] = round(0.1 + 0.8 * i / (len(blocks) - 1), 4)
    return weights


def merge_request(arch_name: str, output_name: str, device: str = "cpu"):
    from mergeprobe.merging.merge_plan import MergeRequest

    weights = block_weights(arch_name)
    return MergeRequest(
        model_a=MODEL_A,
        model_b=MODEL_B,
        mode="weighted_sum",
        alpha=list(weights.values()),  # BASE first, then the U-Net blocks in order
        output={"name": output_name, "dtype": "fp16"},
        device=device,
    )


# ------------------------------------------------------------------------------ child runs


class _Timed:
    """The timed section of a run: wall seconds and its CLOCK_MONOTONIC bounds, which the parent
    uses to take the peak memory over this section alone."""

    def __enter__(self):
        self.start = time.monotonic()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.end = time.monotonic()

    def report(self, **extra) -> dict:
        return {"seconds": self.seconds, "t_start": self.start, "t_end": self.end, **extra}


def prefault(megabytes: int) -> None:
    """Touch and free this much memory before the timed section (see the README: on a VM
    whose free memory is handed back to the host, the first touch of a page is slow)."""
    if megabytes <= 0:
        return
    import numpy as np

    block = np.empty(megabytes << 20, dtype=np.uint8)
    block[::4096] = 1
    del block


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _library(directory: Path):
    from mergeprobe.checkpoints.library import ModelLibrary
    from mergeprobe.service.settings import Settings

    return ModelLibrary(Settings())


def child_engine(arch: str, directory: Path, device: str = "cpu") -> dict:
    import torch

    from mergeprobe.merging.merge_metadata import merge_metadata
    from mergeprobe.merging.merge_plan import plan_merge
    from worker.merging.stream_merge import stream_merge

    library = _library(directory)
    request = merge_request(arch, "bench-out-engine.safetensors", device)
    t0 = time.perf_counter()
    plan = plan_merge(request, library)
    plan_s = time.perf_counter() - t0
    fake_hashes = {slot: ("0" * 64, "00000000") for slot in plan.paths}
    metadata = merge_metadata(plan, request.model_dump(), fake_hashes, {})
    out = library.root / plan.output_name
    threads = max(2, min(4, os.cpu_count() or 2))  # what worker/engines/merge.py uses
    prefault(PREFAULT_MB)
    baseline = _rss_anon_mb()
    with _Timed() as timed:
        digest = stream_merge(plan, out, metadata, device=torch.device(device), threads=threads)
    size = out.stat().st_size
    out.unlink()
    return timed.report(
        plan_seconds=plan_s, baseline_rss_anon_mb=baseline, output_bytes=size, data_sha256=digest
    )


class _StageClock:
    """A job reporter (see worker.context.JobReporter) that notes when each stage first reports."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.merged_at: float | None = None

    def set_progress(self, job_id: str, completed: int, total: int, stage: str) -> None:
        self.stages.setdefault(stage, time.perf_counter())
        if stage == "merging tensors" and completed >= total:
            self.merged_at = time.perf_counter()

    def cancel_requested(self, job_id: str) -> bool:
        return False

    def add_counter(self, name: str, value: float) -> None:
        pass


def child_job(arch: str, directory: Path) -> dict:
    from mergeprobe.service.kinds import KINDS
    from mergeprobe.service.settings import Settings
    from worker.context import JobContext
    from worker.engines.merge import run_merge

    library = _library(directory)
    # The inputs are hashed when the job is accepted (prepare pins them), as on a first submission;
    # the job's clock starts after that.
    shutil.rmtree(library.hash_cache_dir, ignore_errors=True)
    name = "bench-out-job.safetensors"
    clock = _StageClock()
    ctx = JobContext.local(
        KINDS["merge"], merge_request(arch, name), settings=Settings(), library=library, reporter=clock
    )
    prefault(PREFAULT_MB)
    baseline = _rss_anon_mb()
    with _Timed() as timed:
        result = run_merge(ctx)
    (library.root / name).unlink()
    shutil.rmtree(library.hash_cache_dir, ignore_errors=True)
    t0 = timed.t0
    preparing_started = clock.stages.get("preparing the output", t0)
    merging_started = clock.stages.get("merging tensors", t0)
    merged_at = clock.merged_at or t0
    return timed.report(
        baseline_rss_anon_mb=baseline,
        plan_seconds=preparing_started - t0,
        setup_seconds=merging_started - preparing_started,
        merge_seconds=merged_at - merging_started,
        after_merge_seconds=timed.seconds - (merged_at - t0),
        output_bytes=result["size_bytes"],
        data_sha256=result["data_sha256"],
    )


class _NoProgress:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def child_mecha(arch: str, directory: Path) -> dict:
    import sd_mecha
    import torch

    models = directory / "models"
    config = {"sd1": "sd1-ldm", "sdxl": "sdxl-sgm"}[arch]
    blocks_config = f"{arch}-supermerger_blocks"
    a = sd_mecha.model(models / f"{MODEL_A}.safetensors", config)
    b = sd_mecha.model(models / f"{MODEL_B}.safetensors", config)
    weights = block_weights(arch)
    if arch == "sdxl":
        weights["VAE"] = weights["BASE"]  # sd-mecha's sdxl block config gives the VAE its own weight
    alpha = sd_mecha.convert(sd_mecha.literal(weights, config=blocks_config), config)
    recipe = sd_mecha.weighted_sum(a, b, alpha=alpha)
    out = models / "bench-out-mecha.safetensors"
    threads = max(2, min(4, os.cpu_count() or 2))  # as the engine's
    prefault(PREFAULT_MB)
    baseline = _rss_anon_mb()
    with _Timed() as timed:
        sd_mecha.merge(recipe, output=out, output_dtype=torch.float16, threads=threads, tqdm=_NoProgress)
    size = out.stat().st_size
    out.unlink()
    return timed.report(baseline_rss_anon_mb=baseline, output_bytes=size)


def child_floor(arch: str, directory: Path) -> dict:
    from mergeprobe.service.durable import fsync_file

    models = directory / "models"
    out = models / "bench-out-floor.safetensors"
    buf_a, buf_b = bytearray(CHUNK), bytearray(CHUNK)
    prefault(PREFAULT_MB)
    baseline = _rss_anon_mb()
    with (
        _Timed() as timed,
        open(models / f"{MODEL_A}.safetensors", "rb", buffering=0) as fa,
        open(models / f"{MODEL_B}.safetensors", "rb", buffering=0) as fb,
        open(out, "wb", buffering=0) as fo,
    ):
        view_a, view_b = memoryview(buf_a), memoryview(buf_b)
        while True:
            n = fa.readinto(view_a)
            fb.readinto(view_b)
            if not n:
                break
            chunk = view_a[:n]
            while chunk:
                chunk = chunk[fo.write(chunk) :]
        fsync_file(fo)  # as stream_merge does: the written bytes on the disk, in the timed section
    size = out.stat().st_size
    out.unlink()
    return timed.report(baseline_rss_anon_mb=baseline, output_bytes=size)


def child_floor_hash(arch: str, directory: Path) -> dict:
    """The floor plus what the engine must also do: sha256 of every byte written, in a second
    thread (as the engine hashes beside its merge thread)."""
    import hashlib
    import queue
    import threading

    from mergeprobe.service.durable import fsync_file

    models = directory / "models"
    out = models / "bench-out-floor-hash.safetensors"
    ring = [bytearray(CHUNK) for _ in range(4)]
    free: queue.Queue[int] = queue.Queue()
    filled: queue.Queue[tuple[int, int] | None] = queue.Queue()
    for i in range(len(ring)):
        free.put(i)
    digest = hashlib.sha256()

    def hasher() -> None:
        while (item := filled.get()) is not None:
            index, n = item
            digest.update(memoryview(ring[index])[:n])
            free.put(index)

    buf_b = bytearray(CHUNK)
    prefault(PREFAULT_MB)
    baseline = _rss_anon_mb()
    with (
        _Timed() as timed,
        open(models / f"{MODEL_A}.safetensors", "rb", buffering=0) as fa,
        open(models / f"{MODEL_B}.safetensors", "rb", buffering=0) as fb,
        open(out, "wb", buffering=0) as fo,
    ):
        thread = threading.Thread(target=hasher)
        thread.start()
        view_b = memoryview(buf_b)
        while True:
            index = free.get()
            view_a = memoryview(ring[index])
            n = fa.readinto(view_a)
            fb.readinto(view_b)
            if not n:
                break
            chunk = view_a[:n]
            while chunk:
                chunk = chunk[fo.write(chunk) :]
            filled.put((index, n))
        filled.put(None)
        thread.join()
        fsync_file(fo)
    size = out.stat().st_size
    out.unlink()
    return timed.report(baseline_rss_anon_mb=baseline, output_bytes=size)


def child_naive(arch: str, directory: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from mergeprobe.checkpoints.archs import block_of_key, get_arch

    models = directory / "models"
    out = models / "bench-out-naive.safetensors"
    arch_info = get_arch(arch)
    weights = block_weights(arch)
    prefault(PREFAULT_MB)
    baseline = _rss_anon_mb()
    with _Timed() as timed:
        a = load_file(models / f"{MODEL_A}.safetensors")
        b = load_file(models / f"{MODEL_B}.safetensors")
        merged = {}
        for key, ta in a.items():
            if not ta.is_floating_point() or "position_ids" in key:
                merged[key] = ta
                continue
            alpha = weights[block_of_key(arch_info, key)]
            merged[key] = ta.float().lerp_(b[key].float(), alpha).to(torch.float16)
        del a, b
        save_file(merged, out, metadata={"format": "pt"})
    size = out.stat().st_size
    out.unlink()
    return timed.report(baseline_rss_anon_mb=baseline, output_bytes=size)


CHILDREN = {
    "engine": child_engine,
    "job": child_job,
    "mecha": child_mecha,
    "floor": child_floor,
    "floor_hash": child_floor_hash,
    "naive": child_naive,
}


# ----------------------------------------------------------------------------------- parent


def _status(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("RssAnon", "VmRSS", "VmHWM"):
                    values[name] = int(rest.split()[0])  # kB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def run_child(run: str, arch: str, directory: Path, prefault_mb: int) -> dict:
    env = dict(os.environ)
    env.update(
        MERGEPROBE_DATA_DIR=str(directory),
        MERGEPROBE_MODELS_DIR=str(directory / "models"),
        MERGE_BENCH_PREFAULT_MB=str(prefault_mb),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        run,
        "--arch",
        arch,
        "--dir",
        str(directory),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    samples: list[tuple[float, dict[str, int]]] = []
    while proc.poll() is None:
        samples.append((time.monotonic(), _status(proc.pid)))
        time.sleep(SAMPLE_EVERY)
    wall = time.perf_counter() - started
    stdout = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"run {run} failed with exit status {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    timed = [v for t, v in samples if result["t_start"] <= t <= result["t_end"]]

    def peak(name: str, among: list[dict[str, int]]) -> float:
        return max((v.get(name, 0) for v in among), default=0) / 1024

    everything = [v for _, v in samples]
    result.update(
        process_seconds=wall,
        samples=len(timed),
        peak_rss_anon_mb=peak("RssAnon", timed),  # the timed section: what the targets are about
        peak_rss_mb=peak("VmRSS", timed),  # file pages (mapped inputs) included
        process_peak_rss_anon_mb=peak("RssAnon", everything),  # with imports and the prefault
        process_vm_hwm_mb=peak("VmHWM", everything),
    )
    return result


def summarize(reps: list[dict]) -> dict:
    """The median run by seconds, with the min and max seconds and the worst peak memory of all."""
    ordered = sorted(reps, key=lambda r: r["seconds"])
    summary = dict(ordered[(len(ordered) - 1) // 2])
    summary.update(
        repeats=len(reps),
        min_seconds=ordered[0]["seconds"],
        max_seconds=ordered[-1]["seconds"],
        all_seconds=[r["seconds"] for r in reps],
        peak_rss_anon_mb=max(r["peak_rss_anon_mb"] for r in reps),
        peak_rss_mb=max(r["peak_rss_mb"] for r in reps),
    )
    return summary


def expected_size(arch: str) -> int:
    from mergeprobe.checkpoints.safetensors_layout import build_header, tensor_nbytes
    from worker.checkpoints.full_layouts import file_order, full_state_dict_layout

    layout = full_state_dict_layout(arch)
    order = file_order(layout)
    header, _ = build_header(((k, layout[k][1], layout[k][0]) for k in order), {"format": "pt"})
    return len(header) + sum(tensor_nbytes(layout[k][1], layout[k][0]) for k in order)


def prepare_inputs(arch: str, directory: Path, keep: bool) -> list[Path]:
    from worker.checkpoints.full_layouts import write_random_checkpoint

    models = directory / "models"
    models.mkdir(parents=True, exist_ok=True)
    size = expected_size(arch)
    paths = []
    for seed, name in enumerate((MODEL_A, MODEL_B), start=1):
        path = models / f"{name}.safetensors"
        if keep and path.is_file() and path.stat().st_size == size:
            print(f"reusing {path}", flush=True)
        else:
            t0 = time.perf_counter()
            write_random_checkpoint(arch, path, seed=seed, dtype="fp16")
            print(f"wrote {path} ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s", flush=True)
        paths.append(path)
    return paths


def warm(paths: list[Path]) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for path in paths:
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
        print(f"read {path.name} in {time.perf_counter() - t0:.1f} s (page cache warm)", flush=True)


def _clean_outputs(directory: Path) -> None:
    for path in (directory / "models").glob("*bench-out-*"):
        path.unlink(missing_ok=True)
    os.sync()  # write-back of the previous run's output must not land in the next one


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("sd1", "sdxl"), default="sd1")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the inputs and outputs go (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the inputs, and reuse them when present")
    parser.add_argument(
        "--runs", default=",".join(ALL_RUNS), help=f"comma-separated subset of {','.join(ALL_RUNS)}"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the table shows the median")
    parser.add_argument(
        "--prefault-mb",
        type=int,
        default=None,
        help="memory each run touches and frees before its timed section (default: the output size + 256 MB; 0: none)",
    )
    parser.add_argument("--child", choices=ALL_RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.child:
        result = CHILDREN[args.child](args.arch, args.dir)
        print(json.dumps(result), flush=True)
        return 0

    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - set(ALL_RUNS)
    if unknown:
        parser.error(f"unknown runs: {', '.join(sorted(unknown))}")
    directory = args.dir or Path(tempfile.gettempdir()) / f"mergeprobe-bench-{args.arch}"
    directory = directory.resolve()
    inputs = prepare_inputs(args.arch, directory, args.keep)
    size = inputs[0].stat().st_size
    free = shutil.disk_usage(directory).free
    if free < 1.2 * size:
        raise SystemExit(f"not enough free disk in {directory} for an output ({free / 1e9:.1f} GB free)")
    prefault_mb = args.prefault_mb if args.prefault_mb is not None else (size >> 20) + 256
    results: dict[str, dict] = {}
    try:
        os.sync()
        warm(inputs)
        reps: dict[str, list[dict]] = {run: [] for run in runs}
        for rep in range(args.repeat):  # interleaved, so that a slow spell of the machine hits every run
            for run in runs:
                _clean_outputs(directory)
                print(f"running {run} ({rep + 1}/{args.repeat}) ...", flush=True)
                r = run_child(run, args.arch, directory, prefault_mb)
                reps[run].append(r)
                print(
                    f"  {r['seconds']:.2f} s, peak RssAnon {r['peak_rss_anon_mb']:.0f} MB, "
                    f"peak RSS {r['peak_rss_mb']:.0f} MB ({r['samples']} samples)",
                    flush=True,
                )
        results.update({run: summarize(runs_of) for run, runs_of in reps.items()})
    finally:
        _clean_outputs(directory)
        if not args.keep:
            for path in inputs:
                path.unlink(missing_ok=True)
            shutil.rmtree(directory / "cache", ignore_errors=True)

    print_table(args.arch, size, prefault_mb, results)
    if args.json:
        args.json.write_text(
            json.dumps({"arch": args.arch, "prefault_mb": prefault_mb, "results": results}, indent=2)
        )
    return 0


def print_table(arch: str, size: int, prefault_mb: int, results: dict[str, dict]) -> None:
    print()
    print(
        f"{arch}: two {size / 1e9:.2f} GB fp16 inputs, warm page cache, {os.cpu_count()} CPUs, "
        f"prefault {prefault_mb} MB"
    )
    header = f"{'run':<10} {'seconds':>8} {'min':>7} {'max':>7} {'peak RssAnon MB':>16} {'baseline MB':>12} {'peak RSS MB':>12}"
    print(header)
    for run, r in results.items():
        print(
            f"{run:<10} {r['seconds']:>8.2f} {r['min_seconds']:>7.2f} {r['max_seconds']:>7.2f} "
            f"{r['peak_rss_anon_mb']:>16.0f} {r['baseline_rss_anon_mb']:>12.0f} {r['peak_rss_mb']:>12.0f}"
        )
    if "job" in results:
        j = results["job"]
        print(
            f"job path: plan {j['plan_seconds']:.2f} s, setup {j['setup_seconds']:.2f} s, "
            f"merge {j['merge_seconds']:.2f} s, registering the output (hashes it) {j['after_merge_seconds']:.2f} s"
        )
    if (
        "engine" in results
        and "job" in results
        and results["engine"]["data_sha256"] != results["job"]["data_sha256"]
    ):
        print("WARNING: the engine and job runs wrote different tensor data")
    engine = results.get("engine")
    if engine:
        for other in ("floor", "floor_hash", "mecha", "naive"):
            if other in results:
                print(f"engine / {other}: {engine['seconds'] / results[other]['seconds']:.2f}")
        verdicts = []
        if "floor" in results:
            met = engine["seconds"] <= 1.5 * results["floor"]["seconds"]
            verdicts.append(f"engine <= 1.5 x floor: {'met' if met else 'MISSED'}")
        verdicts.append(f"peak RssAnon <= 512 MB: {'met' if engine['peak_rss_anon_mb'] <= 512 else 'MISSED'}")
        print("targets: " + "; ".join(verdicts))


if __name__ == "__main__":
    raise SystemExit(main())
