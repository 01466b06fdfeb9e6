"""The tensor table of a ``.safetensors`` file, read from its JSON header alone.

Pure Python (never imports torch): the HTTP front end validates untrusted uploads with it.
The 8-byte length, the JSON header and the layout of the data section are checked as strictly
as the ``safetensors`` library itself checks them (contiguous tensors, no overlap, no gap, no
trailing bytes), plus a size cap applied before the header is read. Every problem raises
:class:`~mergeprobe.checkpoints.checkpoint_headers.CheckpointFormatError`; the types and message helpers
shared with the ``.ckpt`` reader live in :mod:`mergeprobe.checkpoints.checkpoint_headers`.
"""

from __future__ import annotations

import json
import os
from typing import Any, BinaryIO

from mergeprobe.checkpoints.checkpoint_headers import (
    _MAX_U64,
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    CheckpointFormatError,
    CheckpointHeader,
    TensorInfo,
    _checked_numel,
    _clip,
    _int_text,
    _open_checkpoint,
    _q,
    _size_text,
)

__all__ = ["MAX_TENSORS", "read_safetensors_header"]

# More tensors than this in one header is refused, before the JSON is parsed: the parse builds
# Python objects for every entry (a 100 MB header of 800 k zero-size tensors took 12 s and 1 GB).
# Real checkpoints hold a few thousand (SDXL with EMA ~5 k; LyCORIS full-module SDXL LoRAs ~10 k).
MAX_TENSORS = 100_000
# The ':' a header may hold beyond the 4 of each tensor entry (its key, dtype, shape and
# data_offsets): metadata members and the ':' inside metadata strings (URLs, times, the JSON
# kohya writes in ss_tag_frequency, one ':' per tag).
_METADATA_COLONS = 100_000


def read_safetensors_header(
    path: str | os.PathLike[str],
    max_header_bytes: int = MAX_HEADER_BYTES,
    *,
    fileobj: BinaryIO | None = None,
) -> CheckpointHeader:
    """`fileobj`: read from it instead of opening `path` (see checkpoint_headers._open_checkpoint)."""
    with _open_checkpoint(path, fileobj) as (f, file_size):
        if file_size < 8:
            raise CheckpointFormatError(
                f"the file is {file_size} bytes long; a safetensors file starts with an 8-byte header length"
            )
        prefix = f.read(8)
        if len(prefix) != 8:
            raise CheckpointFormatError("truncated: could not read the 8-byte header length")
        n = int.from_bytes(prefix, "little")
        # Checked before anything of that size is read or allocated.
        if n == 0:
            raise CheckpointFormatError("header length (bytes 0-7) is 0; the header must be a JSON object")
        if n > max_header_bytes:
            raise CheckpointFormatError(
                f"header length {n} (bytes 0-7) exceeds the {_size_text(max_header_bytes)} limit"
            )
        if n > file_size - 8:
            raise CheckpointFormatError(
                f"truncated: header length {n} (bytes 0-7) is larger than the {file_size - 8} bytes "
                "that follow it in the file"
            )
        raw = f.read(n)
    if len(raw) != n:
        raise CheckpointFormatError(f"truncated: expected {n} header bytes at byte 8, read {len(raw)}")
    return _parse_safetensors_header(raw, file_size)


def _kind(value: Any) -> str:
    """A JSON value's type, with its article."""
    if type(value) is bool:
        return "a boolean"
    if value is None:
        return "null"
    return {int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}.get(
        type(value), "a " + type(value).__name__
    )


def _describe(value: Any) -> str:
    return _int_text(value) if type(value) is int else _kind(value)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise CheckpointFormatError(f"header JSON has the key {_q(k)} twice in one object")
        obj[k] = v
    return obj


def _json_constant(name: str) -> None:
    raise CheckpointFormatError(f"header JSON contains {name}, which is not valid JSON")


def _check_entry_counts(raw: bytes) -> None:
    """Refuse a header with more entries than MAX_TENSORS allows before the JSON parse, in one
    pass over the bytes that builds no Python object per entry."""
    # Each tensor entry has a "dtype" key: the count for a plainly written header, in words the
    # uploader recognises.
    dtypes = raw.count(b'"dtype"')
    if dtypes > MAX_TENSORS:
        raise CheckpointFormatError(
            f'header has {dtypes} "dtype" fields, one per tensor; at most {MAX_TENSORS} tensors are accepted'
        )
    # A key can be spelled with escapes ("\u0064type") and an entry can be no tensor at all, but
    # every member of every JSON object is written with a ':' outside strings: this bounds the
    # parse's work whatever the header holds.
    colons, limit = raw.count(b":"), 4 * MAX_TENSORS + _METADATA_COLONS
    if colons > limit:
        raise CheckpointFormatError(
            f"header has {colons} ':' characters; {MAX_TENSORS} tensor entries and their metadata need at "
            f"most {limit}"
        )


def _parse_safetensors_header(raw: bytes, file_size: int) -> CheckpointHeader:
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    _check_entry_counts(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointFormatError(f"header is not valid UTF-8 at byte {8 + exc.start}") from None
    try:
        header = json.loads(text, object_pairs_hook=_json_object, parse_constant=_json_constant)
    except CheckpointFormatError:
        raise
    except json.JSONDecodeError as exc:
        at = 8 + len(text[: exc.pos].encode("utf-8"))
        raise CheckpointFormatError(
            f"header is not valid JSON at byte {at} (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from None
    except RecursionError:
        raise CheckpointFormatError("header JSON is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise CheckpointFormatError(f"header JSON is not usable: {_clip(str(exc))}") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"header JSON is {_kind(header)}, not an object")

    metadata: dict[str, str] = {}
    if "__metadata__" in header:
        meta = header.pop("__metadata__")
        if not isinstance(meta, dict):
            raise CheckpointFormatError(f"__metadata__ is {_kind(meta)}, not an object of strings")
        for k, v in meta.items():
            if not isinstance(v, str):
                raise CheckpointFormatError(f"__metadata__[{_q(k)}] is {_kind(v)}, not a string")
        metadata = meta
    # Reached by keys spelled with escapes, which the count before the parse does not see.
    if len(header) > MAX_TENSORS:
        raise CheckpointFormatError(f"header lists {len(header)} tensors; at most {MAX_TENSORS} are accepted")

    entries: list[tuple[int, int, int, TensorInfo]] = []
    for index, (key, entry) in enumerate(header.items()):
        info = _safetensors_entry(key, entry)
        begin, end = info.data_offsets  # type: ignore[misc]
        if end > data_size:
            raise CheckpointFormatError(
                f"truncated: tensor {_q(key)} ends at byte {end} but the file has only {data_size} bytes "
                f"of data (the data section starts at byte {data_start})"
            )
        entries.append((begin, end, index, info))

    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    position, previous = 0, None
    for begin, end, _, info in entries:
        if begin < position:
            raise CheckpointFormatError(
                f"tensors {_q(previous.key)} (data bytes {previous.data_offsets[0]}-{previous.data_offsets[1]}) "  # type: ignore[union-attr,index]
                f"and {_q(info.key)} (data bytes {begin}-{end}) overlap"
            )
        if begin > position:
            after = f"after tensor {_q(previous.key)}" if previous is not None else "at the start of the data"
            raise CheckpointFormatError(
                f"data bytes {position}-{begin} {after} belong to no tensor; tensor {_q(info.key)} "
                f"should start at byte {position}"
            )
        position = end
        if end > begin:
            previous = info
    if position != data_size:
        raise CheckpointFormatError(
            f"the data section has {data_size} bytes but the tensors end at byte {position}; "
            f"{data_size - position} trailing bytes belong to no tensor"
        )
    tensors = {info.key: info for _, _, _, info in entries}
    return CheckpointHeader("safetensors", tensors, metadata, data_start, file_size)


def _safetensors_entry(key: str, entry: Any) -> TensorInfo:
    where = f"tensor {_q(key)}"
    if not isinstance(entry, dict):
        raise CheckpointFormatError(f"{where}: entry is {_kind(entry)}, not an object")
    expected = {"dtype", "shape", "data_offsets"}
    missing, extra = expected - entry.keys(), entry.keys() - expected
    if missing:
        raise CheckpointFormatError(f"{where}: missing {', '.join(sorted(missing))}")
    if extra:
        raise CheckpointFormatError(f"{where}: unexpected field {', '.join(_q(k) for k in sorted(extra))}")

    dtype = entry["dtype"]
    if not isinstance(dtype, str):
        raise CheckpointFormatError(f"{where}: dtype is {_kind(dtype)}, not a string")
    if dtype not in DTYPE_SIZES:
        raise CheckpointFormatError(f"{where}: unknown dtype {_q(dtype)} (known: {', '.join(DTYPE_SIZES)})")

    shape = entry["shape"]
    if not isinstance(shape, list):
        raise CheckpointFormatError(f"{where}: shape is {_kind(shape)}, not an array")
    for i, dim in enumerate(shape):
        if type(dim) is not int or dim < 0 or dim > _MAX_U64:
            raise CheckpointFormatError(
                f"{where}: shape[{i}] is {_describe(dim)}, not a non-negative integer"
            )
    numel = _checked_numel(shape, where)

    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise CheckpointFormatError(f"{where}: data_offsets must be an array [begin, end]")
    for i, off in enumerate(offsets):
        if type(off) is not int or off < 0 or off > _MAX_U64:
            raise CheckpointFormatError(
                f"{where}: data_offsets[{i}] is {_describe(off)}, not a non-negative integer"
            )
    begin, end = offsets
    if end < begin:
        raise CheckpointFormatError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    needed = numel * DTYPE_SIZES[dtype]
    if end - begin != needed:
        raise CheckpointFormatError(
            f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes but dtype {dtype} "
            f"with shape {list(shape)} needs {needed} bytes"
        )
    return TensorInfo(key, dtype, tuple(shape), (begin, end))
