"""Reading tensors from checkpoint files one at a time (the torch side of the library)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from mergeprobe.checkpoint_headers import CheckpointHeader
from safetensors import safe_open

# Fault injection for operators and tests: seconds to sleep per tensor read, to
# simulate a slow disk and so exercise cancel and worker-loss paths on tiny models.
_DEBUG_DELAY = float(os.environ.get("MERGEPROBE_DEBUG_TENSOR_DELAY", "0") or 0)


class TensorReader:
    def __init__(self, get) -> None:
        self._get = get

    def get(self, key: str) -> torch.Tensor:
        if _DEBUG_DELAY:
            time.sleep(_DEBUG_DELAY)
        return self._get(key)


@contextmanager
def open_checkpoint(path: Path, header: CheckpointHeader) -> Iterator[TensorReader]:
    """A reader of single tensors. safetensors files are memory-mapped; .ckpt pickles
    load only through torch's weights_only unpickler (nothing in them runs), mmapped."""
    if header.format == "safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield TensorReader(handle.get_tensor)
        return
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}
    try:
        yield TensorReader(state.__getitem__)
    finally:
        del state, loaded
