"""Baking a rank-32 LoRA into a full-size checkpoint, against the I/O floor.

    python benchmarks/bake_bench.py [--arch sd1|sdxl] [--dir DIR] [--keep] [--repeat N] [--rank 32]

A full-size random fp16 checkpoint of the arch (real key names and shapes) and a kohya LoRA of
`--rank` on every U-Net attention and feed-forward linear, proj_in/out and the text encoders'
attention and MLP layers (module names from the checkpoint's own LoRA key table) are written
into DIR (reused with --keep) and read once to warm the page cache. Runs, interleaved:

* bake   the bake job's engine in-process (`worker.engines.bake.run_bake` in a `JobContext.local`,
         the request pinned as the API pins it): planning, the streamed pass, the fsync, the
         library's commit (which hashes the output).
* floor  read the checkpoint and write a file of its size 16 MB at a time, then fsync.

Peak anonymous memory (RssAnon, what the process allocated itself, not the mapped files) is
sampled every 20 ms during the timed section; `baseline` is RssAnon just before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from library_bench import run_copy  # noqa: E402 - after the path set-up
from merge_bench import _rss_anon_mb, prefault, warm  # noqa: E402

TARGET_SUFFIXES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out_0",
    "ff_net_0_proj",
    "ff_net_2",
    "proj_in",
    "proj_out",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "fc1",
    "fc2",
)


class PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.peak = max(self.peak, _rss_anon_mb())
            time.sleep(0.02)

    def stop(self) -> float:
        self.stopping.set()
        self.join()
        return max(self.peak, _rss_anon_mb())


def write_lora(arch: str, checkpoint: Path, out: Path, rank: int) -> int:
    """A kohya LoRA of `rank` on the checkpoint's attention, feed-forward and text encoder layers."""
    import torch
    from safetensors.torch import save_file

    from mergeprobe.checkpoints.checkpoint_headers import read_checkpoint_header
    from mergeprobe.lora.lora_keys import LoraKeyTable

    header = read_checkpoint_header(checkpoint)
    table = LoraKeyTable.for_checkpoint(arch, {k: t.shape for k, t in header.tensors.items()})
    prefixes = {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for component, names in table.entries.items():
        for name, target in names.items():
            if not name.endswith(TARGET_SUFFIXES) or name.startswith(
                ("input_blocks", "middle_block", "output_blocks")
            ):
                continue  # one name per module: the diffusers-path one
            if component != "unet" and not name.startswith("text_model_"):
                continue
            shape = header.tensors[target.key].shape
            out_rows = shape[0] if target.rows is None else target.rows[1] - target.rows[0]
            module = prefixes[component] + name
            tensors[f"{module}.lora_down.weight"] = (
                torch.randn((rank, shape[1]), generator=generator) * 0.01
            ).half()
            tensors[f"{module}.lora_up.weight"] = (
                torch.randn((out_rows, rank), generator=generator) * 0.01
            ).half()
            tensors[f"{module}.alpha"] = torch.tensor(float(rank) / 2)
    version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[arch]
    save_file(tensors, str(out), metadata={"ss_base_model_version": version, "ss_network_dim": str(rank)})
    return len([k for k in tensors if k.endswith(".lora_down.weight")])


def run_bake(directory: Path, arch: str, output: str) -> dict:
    from mergeprobe.checkpoints.library import ModelLibrary
    from mergeprobe.lora.bake_plan import BakeRequest
    from mergeprobe.service.kinds import KINDS
    from mergeprobe.service.settings import Settings
    from worker.context import JobContext
    from worker.engines.bake import run_bake as engine

    settings = Settings(data_dir=directory / "data", models_dir=directory / "models")
    library = ModelLibrary(settings)
    request = BakeRequest(
        model=f"bench-{arch}",
        loras=[{"model": f"bench-{arch}-lora", "strength": 0.8}],
        output={"name": output},
    )
    ctx = JobContext.local(KINDS["bake"], request, settings=settings, library=library)
    prefault(int(os.environ.get("BAKE_BENCH_PREFAULT_MB", "0")))
    baseline = _rss_anon_mb()
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    result = engine(ctx)
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    (directory / "models" / output).unlink()
    matched = result["loras"][0]["matched"]
    return {
        "seconds": seconds,
        "peak_rss_anon_mb": peak,
        "baseline_rss_anon_mb": baseline,
        "matched": matched,
    }


def run_floor(directory: Path, arch: str) -> dict:
    """The I/O floor: library_bench's copy (read, write 16 MB at a time, fsync) of the checkpoint."""
    return {"seconds": run_copy(directory / "models" / f"bench-{arch}.safetensors", directory)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd1", choices=("sd1", "sd2", "sdxl"))
    parser.add_argument("--dir", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    directory = Path(args.dir or f"/tmp/mergeprobe-bench-bake-{args.arch}")
    models = directory / "models"
    models.mkdir(parents=True, exist_ok=True)
    checkpoint = models / f"bench-{args.arch}.safetensors"
    lora = models / f"bench-{args.arch}-lora.safetensors"
    from worker.checkpoints.full_layouts import write_random_checkpoint

    if not (args.keep and checkpoint.is_file()):
        write_random_checkpoint(args.arch, checkpoint, seed=1, dtype="fp16")
    if not (args.keep and lora.is_file()):
        modules = write_lora(args.arch, checkpoint, lora, args.rank)
        print(f"LoRA: {modules} modules of rank {args.rank}, {lora.stat().st_size / 1e6:.0f} MB", flush=True)
    warm([checkpoint, lora])
    runs: dict[str, list[dict]] = {"bake": [], "floor": []}
    for i in range(args.repeat):
        os.sync()
        runs["floor"].append(run_floor(directory, args.arch))
        os.sync()
        runs["bake"].append(run_bake(directory, args.arch, f"bench-out-{i}.safetensors"))
        os.sync()
    size = checkpoint.stat().st_size
    bake = statistics.median(r["seconds"] for r in runs["bake"])
    floor = statistics.median(r["seconds"] for r in runs["floor"])
    print(f"\n{args.arch} fp16 {size / 1e9:.2f} GB + rank-{args.rank} LoRA, {args.repeat} repeats")
    for name, values in runs.items():
        seconds = [r["seconds"] for r in values]
        print(
            f"{name:6} median {statistics.median(seconds):6.2f} s  min {min(seconds):6.2f}  max {max(seconds):6.2f}"
        )
    peaks = [r["peak_rss_anon_mb"] for r in runs["bake"]]
    print(
        f"bake / floor (medians): {bake / floor:.2f}; peak RssAnon {max(peaks):.0f} MB "
        f"(baseline {runs['bake'][0]['baseline_rss_anon_mb']:.0f} MB); matched {runs['bake'][0]['matched']} modules"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
