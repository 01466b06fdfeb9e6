"""The file sink of the plan executor (``worker.merging.merge_executor``): the streaming merge
engine, never a whole state dict in memory.

All headers are read first and the output header is decided up front, so every tensor's
place in the output file is known before any is computed. Tensors are read as zero-copy
views of the mapped inputs, combined in fp32 by a few threads (large tensors of element-wise
methods in chunks, so memory stays bounded), and each thread writes its result straight to
its place in the output (``pwrite``); the calling thread hashes the results in file order
for ``modelspec.hash_sha256``, concurrently with the writes.

Memory: each merge thread reuses its own fp32 scratch buffers for the chunks it loads, and
results go into a small pool of output buffers that come back once hashed, so a merge of
any size allocates a few dozen MB once instead of fresh buffers per chunk.

A lerp method (weighted_sum) of two inputs already in the output dtype (the usual fp16 + fp16 →
fp16) skips the fp32 copies: ``torch.lerp`` on the stored views computes in fp32 and rounds once, the
same bytes (see ``_Combiner._lerp``).
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeprobe.checkpoints.checkpoint_headers import DTYPE_SIZES, MAX_HEADER_BYTES
from mergeprobe.checkpoints.safetensors_layout import build_header
from mergeprobe.merging.merge_metadata import HASH_PLACEHOLDER
from mergeprobe.merging.merge_plan import KeyPlan, MergePlan
from mergeprobe.service.durable import fsync_file
from mergeprobe.service.errors import TooLarge
from worker.checkpoints.checkpoint_io import TORCH_DTYPES, MappedCheckpoint
from worker.merging import merge_executor
from worker.merging.merge_executor import PlanExecutor, numel_of

MAX_IN_FLIGHT = 6  # tasks submitted and not yet hashed
# safetensors' own reader (ComfyUI, diffusers and Forge load through it) refuses a longer JSON
# header, our reader (the library, the next merge) one over MAX_HEADER_BYTES.
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000
OUTPUT_HEADER_LIMIT = min(SAFETENSORS_MAX_HEADER_BYTES, MAX_HEADER_BYTES)


@dataclass(frozen=True)
class _Task:
    plan: KeyPlan
    start: int  # element range of the flat tensor; (0, numel) when whole
    stop: int
    index: int  # the key's position, for progress


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but this worker has no CUDA device")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _tasks(executor: PlanExecutor) -> Iterator[_Task]:
    for index, key_plan in enumerate(executor.plan.keys):
        # A key LoRA modules modify is one task: its ΔW is of the whole tensor (the merge inside
        # it still goes range by range, `PlanExecutor.merged`).
        if key_plan.action != "merge" or key_plan.key in executor.plan.loras:
            yield _Task(key_plan, 0, numel_of(key_plan.shape), index)
            continue
        for start, stop in executor.ranges(key_plan):
            yield _Task(key_plan, start, stop, index)


class _Result:
    """The bytes of one task's output range; `buffer` goes back to the pool once they are hashed."""

    __slots__ = ("buffer", "data")

    def __init__(self, data: memoryview, buffer: torch.Tensor | None = None) -> None:
        self.data = data
        self.buffer = buffer


class _Combiner:
    """Turns one task into the bytes of its output range."""

    def __init__(self, executor: PlanExecutor) -> None:
        self.executor = executor
        self.sources = executor.sources
        self.device = executor.device
        self.chunk = merge_executor.CHUNK_ELEMENTS  # read at merge time: tests change it
        self._local = threading.local()  # per-thread fp32 scratch buffers (CPU)
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()  # output buffers

    # -- buffers --------------------------------------------------------------------------
    def _scratch(self, slot: str, numel: int) -> torch.Tensor | None:
        """This thread's fp32 buffer for `slot`, or None where a fresh tensor is needed."""
        if self.device.type != "cpu" or numel > self.chunk:
            return None
        buffers: dict[str, torch.Tensor] = self._local.__dict__.setdefault("buffers", {})
        buffer = buffers.get(slot)
        if buffer is None:
            buffer = buffers[slot] = torch.empty(self.chunk, dtype=torch.float32)
        return buffer[:numel]

    def _output(self, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(a pooled byte buffer, a `dtype` view of its first `numel` elements), or None."""
        nbytes = numel * dtype.itemsize
        size = self.chunk * 4  # a chunk of fp32
        if nbytes > size:
            return None
        try:
            buffer = self._free.get_nowait()
        except queue.Empty:
            buffer = torch.empty(size, dtype=torch.uint8)
        return buffer, buffer[:nbytes].view(dtype)

    def release(self, result: _Result) -> None:
        if result.buffer is not None:
            self._free.put(result.buffer)

    @staticmethod
    def _bytes(tensor: torch.Tensor) -> memoryview:
        flat = tensor.detach().reshape(-1).contiguous()
        if flat.device.type != "cpu":
            flat = flat.cpu()
        return memoryview(flat.view(torch.uint8).numpy())

    def _result(self, tensor: torch.Tensor, dtype: torch.dtype) -> _Result:
        """`tensor` converted to `dtype`, as bytes in a pooled buffer where one fits."""
        pooled = self._output(tensor.numel(), dtype)
        if pooled is None:
            return _Result(self._bytes(tensor.to(dtype)))
        buffer, out = pooled
        out.copy_(tensor.detach().reshape(-1))
        return _Result(memoryview(out.view(torch.uint8).numpy()), buffer)

    # -- tasks ----------------------------------------------------------------------------
    def _copy(self, slot: str, key: str, task: _Task) -> _Result:
        source = self.sources[slot]
        out_dtype = TORCH_DTYPES[task.plan.dtype]
        if source.header.tensors[key].dtype == task.plan.dtype and (raw := source.raw(key)) is not None:
            return _Result(raw)
        return _Result(self._bytes(source.get(key).to(out_dtype)))

    def _load(self, slot: str, key: str, start: int, stop: int) -> torch.Tensor | None:
        source = self.sources.get(slot)
        if source is None or key not in source.header.tensors:
            return None  # an optional third model (ties, dare) without this key: B's delta alone
        view = source.get(key).reshape(-1)[start:stop]
        scratch = self._scratch(slot, view.numel())
        if scratch is None:
            return view.to(device=self.device, dtype=torch.float32, copy=True)
        return scratch.copy_(view)

    def __call__(self, task: _Task) -> _Result:
        kp = task.plan
        if kp.key in self.executor.plan.loras:
            return self._result(self.executor.with_loras(kp), TORCH_DTYPES[kp.dtype])
        copied = self.executor.plan.copied_from(kp)
        if copied is not None:
            return self._copy(*copied, task)
        out_dtype = TORCH_DTYPES[kp.dtype]
        if self.executor.channels_differ(kp.key):
            return _Result(self._bytes(self.executor.merge_shared_channels(kp).to(out_dtype)))
        if self.executor.lerp_in_place(kp):
            return self._lerp(kp, task, out_dtype)
        merged = self.executor.merge_range(kp, task.start, task.stop, self._load)
        return self._result(merged, out_dtype)

    def _lerp(self, kp: KeyPlan, task: _Task, dtype: torch.dtype) -> _Result:
        """torch.lerp straight from the fp16 / bf16 / fp32 views into the output buffer.

        For half-precision inputs torch computes each element in fp32 (its "opmath" type)
        with the same formula as the fp32 kernel and rounds once, so the bytes equal those of
        weighted_sum on fp32 copies rounded to the output dtype (only the payload of a NaN
        produced from a NaN input may differ), without the two fp32 copies: half the time.
        """
        a = self.sources["a"].get(kp.key).reshape(-1)[task.start : task.stop]
        b = self.sources["b"].get(kp.key).reshape(-1)[task.start : task.stop]
        pooled = self._output(a.numel(), dtype)
        if pooled is None:
            return _Result(self._bytes(torch.lerp(a, b, kp.alpha)))
        buffer, out = pooled
        torch.lerp(a, b, kp.alpha, out=out)
        return _Result(memoryview(out.view(torch.uint8).numpy()), buffer)


def _pwrite_all(fd: int, data: memoryview, position: int) -> None:
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while view:
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written


def stream_merge(
    plan: MergePlan,
    out_path: Path,
    metadata: dict[str, str],
    *,
    device: torch.device,
    seed: int = 0,
    threads: int = 2,  # at most this many merge threads (see _thread_counts)
    check_cancel: Callable[[], None] = lambda: None,
    progress: Callable[[int, int], None] = lambda done, total: None,
    read_delay: float = 0.0,  # seconds per tensor read (settings.debug_tensor_delay)
) -> str:
    """Write the merged checkpoint to `out_path`, fsynced; returns the sha256 of its tensor data."""
    header, offsets = build_header(((k.key, k.dtype, k.shape) for k in plan.keys), metadata)
    _check_header_size(header, metadata)
    sources = {
        slot: MappedCheckpoint(path, plan.headers[slot], read_delay=read_delay)
        for slot, path in plan.paths.items()
    }
    executor = PlanExecutor(plan, sources, device, seed)
    combine = _Combiner(executor)
    data_hash = hashlib.sha256()
    total = len(plan.keys)
    data_start = len(header)

    def work(task: _Task) -> _Result:
        """Runs in a merge thread: compute the task's bytes and write them to their place."""
        result = combine(task)
        itemsize = DTYPE_SIZES[task.plan.dtype]
        _pwrite_all(fd, result.data, data_start + offsets[task.plan.key][0] + task.start * itemsize)
        return result

    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    workers, intra_op = _thread_counts(threads)
    intra_op_threads = torch.get_num_threads()
    torch.set_num_threads(intra_op)
    try:
        _pwrite_all(fd, memoryview(header), 0)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge") as pool:
            pending: deque[tuple[_Task, Future[_Result]]] = deque()

            def finish_one() -> None:
                """Hash the oldest task's bytes (file order) once written; report whole keys."""
                task, future = pending.popleft()
                result = future.result()
                data_hash.update(result.data)
                combine.release(result)
                if task.stop == numel_of(task.plan.shape):
                    progress(task.index + 1, total)

            try:
                for task in _tasks(executor):
                    check_cancel()
                    # copy_context: log lines from merge threads keep the job id (mergeprobe.service.logging).
                    pending.append((task, pool.submit(contextvars.copy_context().run, work, task)))
                    while len(pending) >= MAX_IN_FLIGHT:
                        finish_one()
                while pending:
                    finish_one()
            finally:
                for _, future in pending:
                    future.cancel()
        digest = data_hash.hexdigest()
        placeholder = f'"modelspec.hash_sha256":"{HASH_PLACEHOLDER}"'.encode()
        final_header = header.replace(placeholder, f'"modelspec.hash_sha256":"0x{digest}"'.encode(), 1)
        assert len(final_header) == len(header)
        os.pwrite(fd, final_header, 0)
        # On the disk before the library commits it under its name: a crash must not leave a
        # committed model with missing or zeroed tensors.
        fsync_file(fd)
        return digest
    finally:
        torch.set_num_threads(intra_op_threads)
        os.close(fd)
        for source in sources.values():
            source.close()


def _check_header_size(header: bytes, metadata: dict[str, str]) -> None:
    """Refuse, before a byte is written, a header the readers of the file would refuse."""
    size = len(header) - 8
    if size <= OUTPUT_HEADER_LIMIT:
        return
    metadata_bytes = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
    raise TooLarge(
        "output-header-too-large",
        "Output header too large",
        f"the output's safetensors header would be {size} bytes ({metadata_bytes} of them metadata); "
        f"readers refuse headers over {OUTPUT_HEADER_LIMIT} bytes",
    )


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _thread_counts(threads: int) -> tuple[int, int]:
    """(merge threads, torch intra-op threads) for a merge asked to use at most `threads`.

    The calling thread hashes every output byte (sha256 runs at ~2 GB/s and cannot be split),
    which makes it the critical path of light methods: it keeps a core to itself, the merge
    threads share the others. Those threads are the parallelism; torch's own intra-op
    threads on top of them would oversubscribe the cores and spin-wait, so they share what is
    left (on 2 cores: 1 merge thread, 1 intra-op thread, measured fastest for weighted_sum and
    for the fp32 methods alike).
    """
    cpus = _usable_cpus()
    workers = max(1, min(threads, cpus - 1))
    return workers, max(1, cpus // (workers + 1))
