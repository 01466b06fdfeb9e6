"""The header of a safetensors file we are about to write, decided before any tensor is."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable

from mergeprobe.checkpoints.checkpoint_headers import DTYPE_SIZES

_ALIGN = 8  # tensor data starts 8-byte aligned, as safetensors' own writer does


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * DTYPE_SIZES[dtype]


def build_header(
    entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(the 8-byte length + JSON header, key → [begin, end) in the data section),
    tensors laid out back to back in the order given."""
    table: dict[str, object] = {"__metadata__": metadata}
    offsets: dict[str, tuple[int, int]] = {}
    position = 0
    for key, dtype, shape in entries:
        end = position + tensor_nbytes(dtype, shape)
        table[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, end]}
        offsets[key] = (position, end)
        position = end
    raw = json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-(len(raw) + 8) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw, offsets
