"""The tensor table of a checkpoint file, read without tensor data and without running its pickle.

Pure Python (never imports torch): the HTTP front end validates untrusted uploads with it.
:func:`read_checkpoint_header` picks the reader by file extension:

* ``.safetensors``: :mod:`mergeprobe.checkpoints.safetensors_header` checks the JSON header and the
  layout of the data section as strictly as the ``safetensors`` library does.
* ``.ckpt`` / ``.pt`` / ``.pth`` (the zip format ``torch.save`` writes since torch 1.6):
  :mod:`mergeprobe.checkpoints.ckpt_unpickler` reads ``<archive>/data.pkl`` with a restricted unpickler
  that resolves only inert stand-ins for the torch tensor-rebuild globals.

Each reader takes a path, or a path (its name: the extension, the messages) and ``fileobj``: any
seekable binary file object, e.g. one that serves ranged GETs from an object store, which is read
and never closed.

This module holds what both readers share: the result types, the dtype table, the error and
the helpers that keep untrusted text in error messages short and printable. Every problem
raises :class:`CheckpointFormatError` with a message meant for the user who uploaded the file.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import BinaryIO

__all__ = [
    "DTYPE_SIZES",
    "ENGINE_DTYPES",
    "MAX_HEADER_BYTES",
    "CheckpointFormatError",
    "CheckpointHeader",
    "TensorInfo",
    "check_leading_bytes",
    "read_checkpoint_header",
    "read_float_values",
    "sniff_format",
]

# safetensors: a longer JSON header is refused before it is read.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Both formats: dimensions, strides and offsets live in (u)int64 in every reader of these files.
_MAX_INT64 = 2**63 - 1
_MAX_U64 = 2**64 - 1

# Bytes per element, by safetensors dtype name.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "C64": 8,
}

# The dtypes the engines read (worker/checkpoints/checkpoint_io.TORCH_DTYPES maps each to torch).
# Files holding any other (C64, U16, U32, U64, the FNUZ float8s) are refused at upload.
ENGINE_DTYPES = frozenset(
    {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}
)

_ZIP_MAGIC = b"PK\x03\x04"
_EXTENSIONS = {".safetensors": "safetensors", ".ckpt": "ckpt", ".pt": "ckpt", ".pth": "ckpt"}


class CheckpointFormatError(ValueError):
    """The file is not a valid checkpoint. The message says what is wrong and where."""


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int] | None  # safetensors: [begin, end) in the data section; ckpt: None
    # ckpt: (zip record of its storage, first element) when the tensor is contiguous; else None
    storage: tuple[str, int] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class CheckpointHeader:
    format: str  # "safetensors" | "ckpt"
    tensors: dict[str, TensorInfo]  # file order (safetensors: by data offset; ckpt: pickle order)
    metadata: dict[str, str]  # safetensors __metadata__; ckpt: {}
    data_start: int  # safetensors: 8 + header length; ckpt: 0
    file_size: int

    @cached_property
    def arch(self) -> str:
        """detect_arch() of the tensors, computed once per header (the library caches headers)."""
        from mergeprobe.checkpoints.archs import detect_arch

        return detect_arch(self.tensors)


_FLOAT_FORMATS = {"F64": "d", "F32": "f", "F16": "e"}
MAX_VALUES_READ = 1 << 16


def read_float_values(
    path: str | os.PathLike[str] | None,
    header: CheckpointHeader,
    key: str,
    *,
    fileobj: BinaryIO | None = None,
) -> list[float] | None:
    """The values of one small floating-point tensor, read without torch (F64, F32, F16, BF16),
    from the file at `path` or from `fileobj` (then `path` may be None).

    None when the tensor is of another dtype, larger than MAX_VALUES_READ elements, or (ckpt)
    not contiguous. Used for the one statistic variant detection needs, on the API side.
    """
    import struct
    import zipfile

    info = header.tensors[key]
    if info.dtype not in (*_FLOAT_FORMATS, "BF16") or info.numel > MAX_VALUES_READ:
        return None
    size = info.numel * DTYPE_SIZES[info.dtype]
    if info.data_offsets is not None:
        with _open_checkpoint(path, fileobj) as (f, _):
            f.seek(header.data_start + info.data_offsets[0])
            raw = f.read(size)
    elif info.storage is not None:
        record, first = info.storage
        with (
            _open_checkpoint(path, fileobj) as (f, _),
            zipfile.ZipFile(f) as archive,
            archive.open(record) as fh,
        ):
            fh.seek(first * DTYPE_SIZES[info.dtype])
            raw = fh.read(size)
    else:
        return None
    if len(raw) != size:
        return None
    if info.dtype == "BF16":  # the high half of a float32
        halves = struct.unpack(f"<{info.numel}H", raw)
        return list(
            struct.unpack(f"<{info.numel}f", struct.pack(f"<{info.numel}I", *(h << 16 for h in halves)))
        )
    return list(struct.unpack(f"<{info.numel}{_FLOAT_FORMATS[info.dtype]}", raw))


# -- helpers ---------------------------------------------------------------------------


@contextmanager
def _open_checkpoint(
    path: str | os.PathLike[str] | None, fileobj: BinaryIO | None
) -> Iterator[tuple[BinaryIO, int]]:
    """(file, its size in bytes), positioned at byte 0: `fileobj` when given, left open for its
    owner; else the file at `path`, closed on exit.

    `fileobj` needs read, seek and tell, and read(n) must return n bytes short of the end of the
    file (as io.BufferedReader's does; zipfile relies on that too). It needs no fileno(): its
    size is found by seeking to its end.
    """
    if fileobj is not None:
        fileobj.seek(0, os.SEEK_END)
        size = fileobj.tell()
        fileobj.seek(0)
        yield fileobj, size
        return
    if path is None:
        raise TypeError("a checkpoint needs a path or a fileobj")
    with open(path, "rb") as f:
        yield f, os.fstat(f.fileno()).st_size


def _clip(text: str, limit: int = 120) -> str:
    """Untrusted text made safe and short for an error message."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _q(key: str) -> str:
    return "'" + _clip(key).replace("'", "\\'") + "'"


def _size_text(n: int) -> str:
    mib = 1024 * 1024
    return f"{n // mib} MB" if n >= mib and n % mib == 0 else f"{n} bytes"


def _int_text(value: int) -> str:
    return str(value) if -(10**30) < value < 10**30 else "a huge integer"


def _checked_numel(shape: list[int] | tuple[int, ...], where: str) -> int:
    if 0 in shape:
        return 0
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > _MAX_U64:
            raise CheckpointFormatError(
                f"{where}: shape {_clip(str(list(shape)))} has more than 2**64 elements"
            )
    return numel


def sniff_format(first_bytes: bytes) -> str | None:
    """The format the first bytes of a file (16 are plenty) show: "safetensors", "ckpt" or None.

    safetensors: a JSON header that starts with "{" right after the 8-byte length.
    ckpt: a zip archive (torch.save since 1.6) or a raw pickle (PROTO opcode, legacy torch.save).
    """
    head = bytes(first_bytes[:16])
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0:
        return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        return "ckpt"
    if head[:1] == b"\x80" and (len(head) < 2 or 2 <= head[1] <= pickle.HIGHEST_PROTOCOL):
        return "ckpt"
    return None


def expected_format(path: str | os.PathLike[str]) -> str:
    """The format a file's name promises: "safetensors" or "ckpt"."""
    ext = os.path.splitext(os.fsdecode(path))[1].lower()
    expected = _EXTENSIONS.get(ext)
    if expected is None:
        shown = f"extension {_q(ext)}" if ext else "no extension"
        raise CheckpointFormatError(
            f"unsupported file type ({shown}); expected .safetensors, .ckpt, .pt or .pth"
        )
    return expected


def check_leading_bytes(path: str | os.PathLike[str], head: bytes) -> str:
    """The format a file's name promises, checked against its first 16 bytes: an upload of the
    wrong kind of file is refused as soon as they arrive."""
    expected = expected_format(path)
    ext = os.path.splitext(os.fsdecode(path))[1].lower()
    found = sniff_format(head)
    if found is not None and found != expected:
        what = "a safetensors file" if found == "safetensors" else "a PyTorch checkpoint (zip or pickle)"
        raise CheckpointFormatError(f"the file name ends in {ext} but its first bytes are those of {what}")
    return expected


def read_checkpoint_header(
    path: str | os.PathLike[str],
    max_header_bytes: int = MAX_HEADER_BYTES,
    *,
    fileobj: BinaryIO | None = None,
) -> CheckpointHeader:
    """The header of a .safetensors, .ckpt, .pt or .pth file, chosen by the extension of `path`;
    the first bytes of the file must not contradict the extension.

    With `fileobj` the bytes are read from it (see _open_checkpoint), which is left open, and
    `path` only names the file."""
    expected_format(path)  # before the file is opened: a name no reader takes is refused as such
    with _open_checkpoint(path, fileobj) as (f, _):
        head = f.read(16)
    expected = check_leading_bytes(path, head)
    # Imported here, not at the top: both readers import the shared types above from this module.
    if expected == "safetensors":
        from mergeprobe.checkpoints.safetensors_header import read_safetensors_header

        return read_safetensors_header(path, max_header_bytes, fileobj=fileobj)
    from mergeprobe.checkpoints.ckpt_unpickler import read_ckpt_header

    return read_ckpt_header(path, fileobj=fileobj)
