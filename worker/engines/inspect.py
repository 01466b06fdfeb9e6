"""Per-block statistics of one checkpoint, read tensor by tensor."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from mergeprobe.checkpoints.archs import block_of_key, get_arch
from worker.checkpoints.checkpoint_io import open_checkpoint
from worker.context import JobContext

CSV_COLUMNS = ("block", "params", "tensors", "mean_abs", "dtypes")


@dataclass
class _Accumulator:
    params: int = 0
    tensors: int = 0
    float_params: int = 0
    abs_sum: float = 0.0
    dtypes: dict[str, int] = field(default_factory=dict)

    def row(self, block: str) -> dict:
        return {
            "block": block,
            "params": self.params,
            "tensors": self.tensors,
            "mean_abs": self.abs_sum / self.float_params if self.float_params else None,
            "dtypes": dict(sorted(self.dtypes.items())),
        }


@contextmanager
def _single_threaded() -> Iterator[None]:
    """One reduction per tensor, memory-bound: torch's intra-op thread pool only adds barrier
    waits, which on a busy host (API, worker and Redis sharing 2 cores) cost 50x: the tiny sd1
    took 316 ms with 2 threads and 6 ms with 1. Jobs run one at a time per worker, so the
    process-wide setting is restored before anything else uses torch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_inspect(ctx: JobContext) -> dict:
    path = ctx.library.open_pinned(ctx.inputs.model)
    header = ctx.library.header(path)
    arch = get_arch(ctx.inputs.arch)
    blocks = {block: _Accumulator() for block in arch.blocks}
    total = len(header.tensors)
    with (
        _single_threaded(),
        open_checkpoint(path, header, read_delay=ctx.settings.debug_tensor_delay) as reader,
    ):
        for done, (key, info) in enumerate(header.tensors.items(), start=1):
            ctx.check_cancel()
            acc = blocks[block_of_key(arch, key)]
            acc.params += info.numel
            acc.tensors += 1
            acc.dtypes[info.dtype] = acc.dtypes.get(info.dtype, 0) + 1
            tensor = reader.get(key)
            if tensor.is_floating_point() and tensor.numel():
                acc.float_params += tensor.numel()
                acc.abs_sum += float(tensor.abs().sum(dtype=torch.float64))
            ctx.progress(done, total, "reading tensors")
    rows = [acc.row(block) for block, acc in blocks.items()]
    ctx.write_artifact("blocks.csv", _csv(rows), "text/csv")
    return {
        "model": path.name,
        "arch": arch.name,
        "total_params": sum(r["params"] for r in rows),
        "blocks": rows,
    }


def _csv(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        mean_abs = "" if row["mean_abs"] is None else f"{row['mean_abs']:.8g}"
        dtypes = " ".join(f"{k}:{v}" for k, v in row["dtypes"].items())
        writer.writerow({**row, "mean_abs": mean_abs, "dtypes": dtypes})
    return out.getvalue().encode()
