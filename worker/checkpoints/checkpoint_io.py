"""Reading tensors from checkpoint files one at a time (the torch side of the library).

safetensors files are memory-mapped and each tensor is a zero-copy view of the file's
pages (file-backed memory, not the process's own), so reading a 7 GB model costs no
anonymous memory. .ckpt pickles load only through torch's weights_only unpickler
(nothing in them runs), memory-mapped as well.
"""

from __future__ import annotations

import mmap
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mergeprobe.checkpoints.checkpoint_headers import CheckpointHeader

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class MappedCheckpoint:
    """Tensors of one checkpoint by key, as views of the mapped file (safetensors) or of
    torch's mmapped load (.ckpt). Views are read-only: copy before writing to them."""

    def __init__(self, path: Path, header: CheckpointHeader, *, read_delay: float = 0.0) -> None:
        self.header = header
        self.read_delay = read_delay  # settings.debug_tensor_delay: a slow disk, simulated
        self._mmap: mmap.mmap | None = None
        self._state: dict[str, torch.Tensor] | None = None
        if header.format == "safetensors":
            with open(path, "rb") as fh:
                self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._mmap.madvise(mmap.MADV_SEQUENTIAL)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            self._state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}

    def get(self, key: str) -> torch.Tensor:
        if self.read_delay:
            time.sleep(self.read_delay)
        if self._state is not None:
            return self._state[key]
        info = self.header.tensors[key]
        dtype = TORCH_DTYPES[info.dtype]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        begin = self.header.data_start + info.data_offsets[0]
        with warnings.catch_warnings():
            # The mapping is read-only on purpose; torch warns that the view is not writable.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._mmap, dtype=dtype, count=info.numel, offset=begin)
        return flat.view(info.shape)

    def raw(self, key: str) -> memoryview | None:
        """The tensor's bytes as stored, without a copy (safetensors only)."""
        if self._mmap is None:
            return None
        begin, end = self.header.tensors[key].data_offsets
        return memoryview(self._mmap)[self.header.data_start + begin : self.header.data_start + end]

    def close(self) -> None:
        self._state = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes when it does
            self._mmap = None


@contextmanager
def open_checkpoint(
    path: Path, header: CheckpointHeader, *, read_delay: float = 0.0
) -> Iterator[MappedCheckpoint]:
    checkpoint = MappedCheckpoint(path, header, read_delay=read_delay)
    try:
        yield checkpoint
    finally:
        checkpoint.close()
