"""The streaming merge engine: never a whole state dict in memory.

All headers are read first and the output header is decided up front; then tensors
are read as zero-copy views of the mapped inputs, combined in fp32 by a few threads
(large tensors of element-wise methods in chunks, so memory stays bounded), and
written in order straight into the output file by one writer that also hashes the
data for `modelspec.hash_sha256`.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeprobe.merge_metadata import HASH_PLACEHOLDER
from mergeprobe.merge_plan import CONV_IN, VAE_PREFIX, KeyPlan, MergePlan
from mergeprobe.safetensors_layout import build_header
from worker.checkpoint_io import TORCH_DTYPES, MappedCheckpoint

CHUNK_ELEMENTS = 1 << 21  # 2 M elements: 8 MB per fp32 operand
MAX_IN_FLIGHT = 6


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


def _seed_for(seed: int, key: str, start: int) -> int:
    digest = hashlib.sha256(f"{seed}:{key}:{start}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _tasks(plan: MergePlan) -> Iterator[_Task]:
    chunkable = plan.method.elementwise
    for index, key_plan in enumerate(plan.keys):
        numel = 1
        for dim in key_plan.shape:
            numel *= dim
        if key_plan.action != "merge" or not chunkable or key_plan.key == CONV_IN or numel <= CHUNK_ELEMENTS:
            yield _Task(key_plan, 0, numel, index)
            continue
        for start in range(0, numel, CHUNK_ELEMENTS):
            yield _Task(key_plan, start, min(start + CHUNK_ELEMENTS, numel), index)


class _Combiner:
    """Turns one task into the bytes of its output range."""

    def __init__(self, plan: MergePlan, sources: dict[str, MappedCheckpoint], device: torch.device, seed: int) -> None:
        self.plan = plan
        self.sources = sources
        self.device = device
        self.seed = seed
        vae = sources.get("vae")
        self.vae_keys: dict[str, str] = {}
        if vae is not None:
            names = set(vae.header.tensors)
            self.vae_keys = {VAE_PREFIX + k.removeprefix(VAE_PREFIX): k for k in names}

    def _bytes(self, tensor: torch.Tensor) -> memoryview:
        flat = tensor.detach().reshape(-1).contiguous()
        if flat.device.type != "cpu":
            flat = flat.cpu()
        return memoryview(flat.view(torch.uint8).numpy())

    def _copy(self, slot: str, key: str, task: _Task) -> memoryview:
        source = self.sources[slot]
        out_dtype = TORCH_DTYPES[task.plan.dtype]
        if source.header.tensors[key].dtype == task.plan.dtype and (raw := source.raw(key)) is not None:
            return raw
        return self._bytes(source.get(key).to(out_dtype))

    def _load(self, slot: str, key: str, task: _Task) -> torch.Tensor | None:
        source = self.sources.get(slot)
        if source is None or key not in source.header.tensors:
            return None  # an optional third model (ties, dare) without this key: B's delta alone
        view = source.get(key).reshape(-1)[task.start : task.stop]
        return view.to(device=self.device, dtype=torch.float32, copy=True)

    def __call__(self, task: _Task) -> memoryview:
        kp = task.plan
        if kp.action in ("copy_a", "keep_a"):
            return self._copy("a", kp.key, task)
        if kp.action == "copy_b":
            return self._copy("b", kp.key, task)
        if kp.action == "copy_vae":
            return self._copy("vae", self.vae_keys[kp.key], task)
        if kp.key == CONV_IN and self._channels_differ(kp.key):
            return self._bytes(self._merge_shared_channels(kp))
        a = self._load("a", kp.key, task)
        b = self._load("b", kp.key, task)
        c = self._load("c", kp.key, task)
        merged = self._apply(kp, a, b, c, task.start)
        return self._bytes(merged.to(TORCH_DTYPES[kp.dtype]))

    def _apply(self, kp: KeyPlan, a, b, c, start: int) -> torch.Tensor:
        rng = torch.Generator(device="cpu")
        rng.manual_seed(_seed_for(self.seed, kp.key, start))
        return self.plan.method.fn(a, b, c, kp.alpha, kp.beta, rng)

    def _channels_differ(self, key: str) -> bool:
        shapes = {src.header.tensors[key].shape for slot, src in self.sources.items() if slot != "vae" and key in src.header.tensors}
        return len(shapes) > 1

    def _merge_shared_channels(self, kp: KeyPlan) -> torch.Tensor:
        """conv_in of an inpainting model (9 input channels) with a normal one (4)."""
        tensors = {s: src.get(kp.key) for s, src in self.sources.items() if s != "vae" and kp.key in src.header.tensors}
        shared = min(t.shape[1] for t in tensors.values())
        result = tensors["a"].to(device=self.device, dtype=torch.float32, copy=True)
        parts = {s: t[:, :shared].to(device=self.device, dtype=torch.float32, copy=True) for s, t in tensors.items()}
        result[:, :shared] = self._apply(kp, parts["a"], parts["b"], parts.get("c"), 0)
        return result.to(TORCH_DTYPES[kp.dtype])


def stream_merge(
    plan: MergePlan,
    out_path: Path,
    metadata: dict[str, str],
    *,
    device: torch.device,
    seed: int = 0,
    threads: int = 2,
    check_cancel: Callable[[], None] = lambda: None,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> str:
    """Write the merged checkpoint to `out_path`; returns the sha256 of its tensor data."""
    header, _ = build_header(((k.key, k.dtype, k.shape) for k in plan.keys), metadata)
    sources = {slot: MappedCheckpoint(path, plan.headers[slot]) for slot, path in plan.paths.items()}
    combine = _Combiner(plan, sources, device, seed)
    data_hash = hashlib.sha256()
    total = len(plan.keys)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, header)
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge") as pool:
            pending: deque[tuple[_Task, Future[memoryview]]] = deque()

            def write_one() -> None:
                task, future = pending.popleft()
                data = future.result()
                data_hash.update(data)
                view = memoryview(data).cast("B")
                while view:
                    view = view[os.write(fd, view) :]
                if task.stop == _numel(task.plan.shape):
                    progress(task.index + 1, total)

            for task in _tasks(plan):
                check_cancel()
                pending.append((task, pool.submit(combine, task)))
                while len(pending) >= MAX_IN_FLIGHT:
                    write_one()
            while pending:
                write_one()
        digest = data_hash.hexdigest()
        placeholder = f'"modelspec.hash_sha256":"{HASH_PLACEHOLDER}"'.encode()
        final_header = header.replace(placeholder, f'"modelspec.hash_sha256":"0x{digest}"'.encode(), 1)
        assert len(final_header) == len(header)
        os.pwrite(fd, final_header, 0)
        return digest
    finally:
        os.close(fd)
        for source in sources.values():
            source.close()


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
