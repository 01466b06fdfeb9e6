"""The tensor table of a PyTorch ``.ckpt`` / ``.pt`` / ``.pth`` file, read by a restricted unpickler.

Pure Python (never imports torch): the HTTP front end validates untrusted uploads with it.
Only the zip format ``torch.save`` writes since torch 1.6 is read: its ``<archive>/data.pkl``
record is unpickled by a restricted unpickler. It resolves only an allowlist of globals (the
torch tensor-rebuild functions, storage and dtype names, ``collections.OrderedDict``), and
every one of them resolves to an inert stand-in defined here (a marker object or a small
function that records a shape), so nothing named by the pickle is imported or called. Tensor
data records are never read; only their sizes in the zip directory are compared with what the
pickle declares.

Every problem raises :class:`~mergeprobe.checkpoints.checkpoint_headers.CheckpointFormatError`; the types
and message helpers shared with the safetensors reader live in :mod:`mergeprobe.checkpoints.checkpoint_headers`.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import re
import zipfile
from typing import Any, BinaryIO

from mergeprobe.checkpoints.checkpoint_headers import (
    _MAX_INT64,
    _ZIP_MAGIC,
    DTYPE_SIZES,
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

__all__ = ["MAX_PICKLE_BYTES", "MAX_PICKLE_ENTRIES", "MAX_PICKLE_OPS", "read_ckpt_header"]

# The pickle record (data.pkl) may hold at most this many bytes and opcodes.
MAX_PICKLE_BYTES = 200 * 1024 * 1024
MAX_PICKLE_OPS = 5_000_000
# ... and build at most this many dict entries and list (and set) items, counted in the prescan,
# which walks every opcode in Python: a pickle of a 2.4 M-entry dict has 7 M opcodes, and reaching
# MAX_PICKLE_OPS took seconds. A state dict holds one entry per tensor (SDXL with EMA: ~5 k) and
# a training checkpoint's optimizer state a few per parameter.
MAX_PICKLE_ENTRIES = 200_000
# zipfile turns each central directory entry (46+ bytes) into a ZipInfo object (~10x that).
_MAX_CENTRAL_DIRECTORY = 16 * 1024 * 1024
# Dict keys / set items whose hash an attacker can choose (tuples, floats, big ints,
# frozensets) are what makes hash-collision bombs; real checkpoints use str and small int keys.
_MAX_COMPOSITE_KEYS = 10_000
_MAX_KEY_DEPTH = 4
_MAX_KEY_ITEMS = 256

_NOTHING_RUN = "refusing to load it (nothing in it was run)"


def read_ckpt_header(path: str | os.PathLike[str], *, fileobj: BinaryIO | None = None) -> CheckpointHeader:
    """`fileobj`: read from it instead of opening `path` (see checkpoint_headers._open_checkpoint)."""
    with _open_checkpoint(path, fileobj) as (f, file_size):
        head = f.read(4)
        if head != _ZIP_MAGIC:
            if head[:1] == b"\x80":
                raise CheckpointFormatError(
                    "legacy .ckpt format (a raw pickle, not a zip archive) is not supported; "
                    "re-save it with torch.save or convert it to safetensors"
                )
            raise CheckpointFormatError(
                f"not a PyTorch checkpoint: bytes 0-3 are {head!r}, not the zip signature b'PK\\x03\\x04'"
            )
        _check_zip_directory(f)
        f.seek(0)
        try:
            archive = zipfile.ZipFile(f)
        except Exception as exc:  # zipfile raises many types on malformed input
            raise CheckpointFormatError(f"corrupt zip archive: {_clip(str(exc))}") from None
        with archive:
            tensors = _read_torch_zip(archive, file_size)
    return CheckpointHeader("ckpt", tensors, {}, 0, file_size)


def _check_zip_directory(f: Any) -> None:
    """Cap the central directory before zipfile parses all of it, locating it exactly as
    zipfile will (its own end-record reader; skipped if a future Python drops it)."""
    end_record = getattr(zipfile, "_EndRecData", None)
    if end_record is None:
        return
    try:
        record = end_record(f)
    except Exception as exc:
        raise CheckpointFormatError(f"corrupt zip archive: {_clip(str(exc))}") from None
    if record is None:
        raise CheckpointFormatError(
            "corrupt zip archive: no end of central directory record (truncated file?)"
        )
    size = record[getattr(zipfile, "_ECD_SIZE", 5)]
    if size > _MAX_CENTRAL_DIRECTORY:
        raise CheckpointFormatError(
            f"the zip archive's central directory is {size} bytes; more than {_size_text(_MAX_CENTRAL_DIRECTORY)} "
            "is refused"
        )


def _read_torch_zip(archive: zipfile.ZipFile, file_size: int) -> dict[str, TensorInfo]:
    members = {info.filename: info for info in archive.infolist()}
    pickles = [name for name in members if re.fullmatch(r"[^/]+/data\.pkl", name)]
    if not pickles:
        raise CheckpointFormatError(
            "the zip archive has no <archive>/data.pkl record; it is not a PyTorch checkpoint"
        )
    if len(pickles) > 1:
        raise CheckpointFormatError(
            f"the zip archive has {len(pickles)} data.pkl records ({', '.join(_clip(p) for p in pickles[:3])}); expected one"
        )
    prefix = pickles[0][: -len("data.pkl")]
    info = members[pickles[0]]
    member = _clip(pickles[0])  # as shown in messages
    if info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointFormatError(
            f"{member} is {info.file_size} bytes; pickles over {_size_text(MAX_PICKLE_BYTES)} are refused"
        )
    try:
        with archive.open(info) as fh:
            data = fh.read(MAX_PICKLE_BYTES + 1)
    except Exception as exc:  # bad CRC, bad compression, encryption, truncation ...
        raise CheckpointFormatError(f"cannot read {member} from the zip archive: {_clip(str(exc))}") from None
    if len(data) > MAX_PICKLE_BYTES:
        raise CheckpointFormatError(f"{member} is larger than {_size_text(MAX_PICKLE_BYTES)}; refused")

    _prescan_pickle(data, member)
    unpickler = _RestrictedUnpickler(data, member)
    try:
        root = unpickler.load()
    except CheckpointFormatError:
        raise
    except Exception as exc:  # nothing but the stand-ins here ran; any failure means a broken pickle
        raise CheckpointFormatError(
            f"the pickle in {member} is corrupt: {type(exc).__name__}: {_clip(str(exc))}"
        ) from None

    for key, storage in unpickler.storages.items():
        record = prefix + "data/" + key
        stored = members.get(record)
        if stored is None:
            raise CheckpointFormatError(
                f"storage {_q(key)} used by {member} has no record {_clip(record)} in the zip archive"
            )
        if stored.file_size != storage.nbytes:
            raise CheckpointFormatError(
                f"{_clip(record)} holds {stored.file_size} bytes but the pickle declares {storage.nbytes} bytes "
                f"({storage.numel} x {storage.dtype or 'byte'})"
            )
        if stored.header_offset + stored.compress_size > file_size:
            raise CheckpointFormatError(
                f"truncated: {_clip(record)} would end at byte {stored.header_offset + stored.compress_size} "
                f"but the file has only {file_size} bytes"
            )

    if not isinstance(root, dict):
        raise CheckpointFormatError(
            f"the pickle in {member} holds a {_standin_kind(root)}, not a dict of tensors"
        )
    nested = root.get("state_dict")
    state = nested if isinstance(nested, dict) else root
    tensors: dict[str, TensorInfo] = {}
    for key, value in dict.items(state):
        if type(value) is not _TensorRef:
            continue  # global_step, epoch, nested config dicts, ...
        if type(key) is not str:
            raise CheckpointFormatError(
                f"the state dict in {member} has a tensor under a {type(key).__name__} key"
            )
        tensors[key] = value.info(key, prefix + "data/")
    return tensors


# For counting entries in the prescan: how each opcode changes the depth of the unpickler's stack
# apart from MARKs and the items it takes off above one (pickletools' stack_before/stack_after) ...
_STACK_CHANGE = {
    op.name: len(op.stack_after)
    - sum(item not in (pickletools.markobject, pickletools.stackslice) for item in op.stack_before)
    for op in pickletools.opcodes
}
# ... the opcodes that take every item above the last MARK off the stack, and the MARK ...
_MARK_CONSUMERS = frozenset(
    op.name for op in pickletools.opcodes if pickletools.markobject in op.stack_before
)
# ... and those that take them into a dict (two items an entry) or a list or set (one an item).
_FILLING_OPCODES = {"SETITEMS": 2, "DICT": 2, "APPENDS": 1, "LIST": 1, "ADDITEMS": 1, "FROZENSET": 1}


def _prescan_pickle(data: bytes, member: str) -> None:
    """Walk the opcodes without executing anything: size limits, forbidden opcodes, and any
    GLOBAL outside the allowlist, before the unpickler is even created. The stack depth is
    followed (as pickletools.dis does) only to count the entries the pickle builds."""
    count = entries = depth = 0
    marks: list[int] = []  # the stack depth at each open MARK
    try:
        for opcode, arg, pos in pickletools.genops(data):
            count += 1
            op = opcode.name
            if count > MAX_PICKLE_OPS:
                raise CheckpointFormatError(
                    f"the pickle in {member} has more than {MAX_PICKLE_OPS} opcodes; refused as a possible pickle bomb"
                )
            if op in _FORBIDDEN_OPCODES:
                raise CheckpointFormatError(
                    f"the pickle in {member} uses the {op} opcode (at byte {pos}), which is not "
                    f"allowed; {_NOTHING_RUN}"
                )
            if op == "PROTO" and arg > 2:
                # torch.save writes protocol 2, and torch's weights_only loader (what the worker
                # uses) reads nothing newer: refuse here rather than fail later in a job.
                raise CheckpointFormatError(
                    f"the pickle in {member} uses pickle protocol {arg}; only protocol 2 (what torch.save "
                    "writes by default) is supported"
                )
            if op == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                if (module, name) not in _ALLOWED_GLOBALS:
                    raise _refused(member, module, name)
            if op == "MARK":
                marks.append(depth)
                continue
            if op in _MARK_CONSUMERS:
                if not marks:
                    raise CheckpointFormatError(f"the pickle in {member} is corrupt: {op} without a MARK")
                mark = marks.pop()
                if op in _FILLING_OPCODES:
                    entries += (depth - mark) // _FILLING_OPCODES[op]
                depth = mark
            elif op == "POP" and marks and depth == marks[-1]:
                marks.pop()  # the unpickler's POP takes a MARK when nothing is above it
                continue
            elif op == "SETITEM" or op == "APPEND":
                entries += 1
            depth += _STACK_CHANGE[op]
            if entries > MAX_PICKLE_ENTRIES:
                raise CheckpointFormatError(
                    f"the pickle in {member} builds more than {MAX_PICKLE_ENTRIES} dict entries and list items "
                    "(a state dict has one per tensor); refused as a possible pickle bomb"
                )
    except CheckpointFormatError:
        raise
    except Exception as exc:  # genops: unknown opcode, truncated argument, no STOP ...
        raise CheckpointFormatError(f"the pickle in {member} is corrupt: {_clip(str(exc))}") from None


def _refused(member: str, module: str, name: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"the pickle in {member} needs {_clip(module)}.{_clip(name)}, which is not allowed; {_NOTHING_RUN}"
    )


# -- inert stand-ins for the allowed torch globals --------------------------------------
#
# None of them can be reached by the pickle except through find_class, none has a method the
# unpickler could look up (__setstate__, append, extend, add ...), and the only ones that can be
# called (REDUCE) are _Callable instances wrapping the small functions below.


class _StandIn:
    __slots__ = ()


class _DTypeRef(_StandIn):
    """torch.float16 and friends: a name, nothing more."""

    __slots__ = ("dtype", "torch_name")

    def __init__(self, torch_name: str, dtype: str) -> None:
        self.torch_name = torch_name
        self.dtype = dtype


class _StorageTypeRef(_StandIn):
    """torch.HalfStorage and friends, torch.UntypedStorage (dtype None: bytes)."""

    __slots__ = ("dtype", "torch_name")

    def __init__(self, torch_name: str, dtype: str | None) -> None:
        self.torch_name = torch_name
        self.dtype = dtype


class _StorageRef(_StandIn):
    """What persistent_load returns for ('storage', type, key, location, numel)."""

    __slots__ = ("dtype", "key", "numel")

    def __init__(self, key: str, dtype: str | None, numel: int) -> None:
        self.key = key
        self.dtype = dtype  # None: an untyped (byte) storage
        self.numel = numel

    @property
    def nbytes(self) -> int:
        return self.numel * (DTYPE_SIZES[self.dtype] if self.dtype else 1)


class _TensorRef(_StandIn):
    """What the _rebuild_tensor* stand-ins return; validated when its key is known."""

    __slots__ = ("dtype", "offset", "size", "storage", "stride")

    def __init__(self, storage: _StorageRef, offset: Any, size: Any, stride: Any, dtype: str) -> None:
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride
        self.dtype = dtype

    def info(self, key: str, data_dir: str) -> TensorInfo:
        """`data_dir`: the archive's `<name>/data/`, where each storage is a record."""
        where = f"tensor {_q(key)}"
        if type(self.offset) is not int or not 0 <= self.offset <= _MAX_INT64:
            raise CheckpointFormatError(f"{where}: storage offset is not a non-negative integer")
        shape = _int_tuple(self.size, where, "size")
        stride = _int_tuple(self.stride, where, "stride")
        if len(stride) != len(shape):
            raise CheckpointFormatError(
                f"{where}: size has {len(shape)} dimensions but stride has {len(stride)}"
            )
        numel = _checked_numel(shape, where)
        if numel:
            capacity = self.storage.nbytes // DTYPE_SIZES[self.dtype]
            last = self.offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True))
            if last >= capacity:
                raise CheckpointFormatError(
                    f"{where}: its view (offset {self.offset}, size {list(shape)}, stride {list(stride)}) reaches "
                    f"element {last} but storage {_q(self.storage.key)} holds only {capacity} {self.dtype} elements"
                )
        contiguous = all(stride[i] == math.prod(shape[i + 1 :]) for i in range(len(shape)) if shape[i] > 1)
        storage = (data_dir + self.storage.key, self.offset) if contiguous else None
        return TensorInfo(key, self.dtype, shape, None, storage)


def _int_tuple(value: Any, where: str, what: str) -> tuple[int, ...]:
    if type(value) not in (tuple, list):
        raise CheckpointFormatError(f"{where}: {what} is a {_standin_kind(value)}, not a tuple of integers")
    if len(value) > 64:
        raise CheckpointFormatError(f"{where}: {what} has {len(value)} dimensions (at most 64)")
    for i, item in enumerate(value):
        if type(item) is not int or not 0 <= item <= _MAX_INT64:
            shown = _int_text(item) if type(item) is int else f"a {_standin_kind(item)}"
            raise CheckpointFormatError(f"{where}: {what}[{i}] is {shown}, not a non-negative integer")
    return tuple(value)


def _standin_kind(value: Any) -> str:
    if isinstance(value, _TensorRef):
        return "tensor"
    if isinstance(value, _StorageRef):
        return "storage"
    if isinstance(value, (_DTypeRef, _StorageTypeRef)):
        return value.torch_name
    return type(value).__name__


class _PickleDict(dict):
    """What collections.OrderedDict resolves to. A plain dict underneath; BUILD state (the
    _metadata attribute of a module's state_dict) is accepted and dropped."""

    __slots__ = ()


class _Callable(_StandIn):
    __slots__ = ("fn", "name")

    def __init__(self, name: str, fn: Any) -> None:
        self.name = name
        self.fn = fn


def _arity(name: str, args: tuple, *counts: int) -> None:
    if len(args) not in counts:
        want = " or ".join(str(c) for c in counts)
        raise CheckpointFormatError(
            f"{name} is called with {len(args)} arguments in the pickle; expected {want}"
        )


def _storage_arg(name: str, value: Any) -> _StorageRef:
    if type(value) is not _StorageRef:
        raise CheckpointFormatError(f"{name} is given a {_standin_kind(value)} where a storage belongs")
    return value


def _tensor_from_storage(name: str, storage: Any, offset: Any, size: Any, stride: Any) -> _TensorRef:
    storage = _storage_arg(name, storage)
    # torch loads an untyped storage here as uint8.
    return _TensorRef(storage, offset, size, stride, storage.dtype or "U8")


def _rebuild_tensor(*args: Any) -> _TensorRef:
    name = "torch._utils._rebuild_tensor"
    _arity(name, args, 4)
    return _tensor_from_storage(name, *args)


def _rebuild_tensor_v2(*args: Any) -> _TensorRef:
    # (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    name = "torch._utils._rebuild_tensor_v2"
    _arity(name, args, 6, 7)
    return _tensor_from_storage(name, *args[:4])


def _rebuild_tensor_v3(*args: Any) -> _TensorRef:
    # (storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype[, metadata]):
    # dtypes without a legacy typed storage class (float8, uint16 ...) over an UntypedStorage.
    name = "torch._utils._rebuild_tensor_v3"
    _arity(name, args, 7, 8)
    storage = _storage_arg(name, args[0])
    dtype = args[6]
    if type(dtype) is not _DTypeRef:
        raise CheckpointFormatError(f"{name} is given a {_standin_kind(dtype)} where a dtype belongs")
    return _TensorRef(storage, args[1], args[2], args[3], dtype.dtype)


def _rebuild_parameter(*args: Any) -> _TensorRef:
    # (data, requires_grad, backward_hooks) and, _with_state, a 4th: Python attributes, dropped.
    name = "torch._utils._rebuild_parameter"
    _arity(name, args, 3, 4)
    if type(args[0]) is not _TensorRef:
        raise CheckpointFormatError(f"{name} is given a {_standin_kind(args[0])} where a tensor belongs")
    return args[0]


def _ordered_dict(*args: Any) -> _PickleDict:
    # OrderedDict pickles as OrderedDict() + SETITEMS; Python 2 era pickles pass [[k, v], ...].
    _arity("collections.OrderedDict", args, 0, 1)
    result = _PickleDict()
    if args:
        if type(args[0]) is not list:
            raise CheckpointFormatError(
                "collections.OrderedDict is given something other than a list of pairs"
            )
        for pair in args[0]:
            if type(pair) not in (list, tuple) or len(pair) != 2:
                raise CheckpointFormatError(
                    "collections.OrderedDict is given something other than a list of pairs"
                )
            result[pair[0]] = pair[1]  # keys checked by the caller (_load_reduce)
    return result


def _torch_size(*args: Any) -> tuple:
    _arity("torch.Size", args, 0, 1)
    if not args:
        return ()
    if type(args[0]) not in (tuple, list) or any(type(d) is not int for d in args[0]):
        raise CheckpointFormatError("torch.Size is given something other than a tuple of integers")
    return tuple(args[0])


# torch dtype attribute -> safetensors dtype name.
_TORCH_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "complex64": "C64",
}
# Legacy typed storage classes torch still writes for these dtypes.
_TORCH_STORAGES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "ComplexFloatStorage": "C64",
}

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _Callable("collections.OrderedDict", _ordered_dict),
    ("torch._utils", "_rebuild_tensor"): _Callable("torch._utils._rebuild_tensor", _rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Callable("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Callable("torch._utils._rebuild_tensor_v3", _rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Callable("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Callable(
        "torch._utils._rebuild_parameter_with_state", _rebuild_parameter
    ),
    ("torch", "Size"): _Callable("torch.Size", _torch_size),
    ("torch", "UntypedStorage"): _StorageTypeRef("torch.UntypedStorage", None),
    ("torch.storage", "UntypedStorage"): _StorageTypeRef("torch.storage.UntypedStorage", None),
    **{("torch", n): _StorageTypeRef(f"torch.{n}", d) for n, d in _TORCH_STORAGES.items()},
    **{("torch", n): _DTypeRef(f"torch.{n}", d) for n, d in _TORCH_DTYPES.items()},
}

_FORBIDDEN_OPCODES = frozenset(
    # Instantiation without find_class's say-so (INST/OBJ/NEWOBJ*), the copyreg extension
    # registry (EXT*), text persistent ids and out-of-band buffers: torch.save never writes them.
    ["INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "NEXT_BUFFER", "READONLY_BUFFER"]
)


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """pickle's own (pure Python) unpickler with every opcode that could call, import or mutate
    something replaced by a checked version. The pure Python implementation is used so that
    these opcodes can be overridden (the C one only lets find_class/persistent_load be), and its
    memo is a dict (the C unpickler preallocates a list sized by the largest memo index)."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, data: bytes, member: str) -> None:
        super().__init__(io.BytesIO(data), fix_imports=False, encoding="utf-8")
        self.member = member
        self.storages: dict[str, _StorageRef] = {}
        self._composite_keys = 0

    # -- name resolution ---------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        standin = _ALLOWED_GLOBALS.get((module, name))
        if standin is None:
            raise _refused(self.member, module, name)
        return standin

    def persistent_load(self, pid: Any) -> _StorageRef:
        if type(pid) is not tuple or len(pid) != 5:
            raise CheckpointFormatError(
                f"the pickle in {self.member} has a persistent id that is not a storage record"
            )
        tag, storage_type, key, _location, numel = pid
        if isinstance(tag, bytes):
            tag = tag.decode("ascii", "replace")
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if tag != "storage" or type(storage_type) is not _StorageTypeRef or type(key) is not str:
            raise CheckpointFormatError(
                f"the pickle in {self.member} has a persistent id that is not a storage record"
            )
        if type(numel) is not int or not 0 <= numel <= _MAX_INT64:
            raise CheckpointFormatError(f"storage {_q(key)} in {self.member} has an invalid element count")
        seen = self.storages.get(key)
        if seen is None:
            seen = self.storages[key] = _StorageRef(key, storage_type.dtype, numel)
        elif seen.dtype != storage_type.dtype or seen.numel != numel:
            raise CheckpointFormatError(
                f"storage {_q(key)} in {self.member} is declared twice with different types or sizes"
            )
        return seen

    # -- checked opcodes ---------------------------------------------------------------
    def _forbidden(self) -> None:
        raise CheckpointFormatError(f"the pickle in {self.member} uses a forbidden opcode; {_NOTHING_RUN}")

    for _op in _FORBIDDEN_OPCODES:
        dispatch[getattr(pickle, _op)[0]] = _forbidden
    del _op

    def _check_key(self, key: Any, depth: int = 0, budget: list[int] | None = None) -> None:
        """Dict keys and set items: types whose hash the pickle cannot choose go free; the
        others are capped in number, depth and size (deep tuples crash hash(), and chosen
        hashes make collision bombs)."""
        kind = type(key)
        if kind is str or kind is bytes or kind is bool or key is None:
            return
        if kind is int and -(2**61) < key < 2**61:
            return
        if depth == 0:
            self._composite_keys += 1
            if self._composite_keys > _MAX_COMPOSITE_KEYS:
                raise CheckpointFormatError(
                    f"the pickle in {self.member} uses more than {_MAX_COMPOSITE_KEYS} non-string dict keys"
                )
            budget = [_MAX_KEY_ITEMS]
        if kind is int or kind is float or isinstance(key, _StandIn):
            return
        if kind is tuple or kind is frozenset:
            if depth >= _MAX_KEY_DEPTH:
                raise CheckpointFormatError(f"the pickle in {self.member} has a dict key nested too deeply")
            assert budget is not None
            budget[0] -= len(key)
            if budget[0] < 0:
                raise CheckpointFormatError(f"the pickle in {self.member} has a dict key that is too large")
            for item in key:
                self._check_key(item, depth + 1, budget)
            return
        raise CheckpointFormatError(f"the pickle in {self.member} uses a {_standin_kind(key)} as a dict key")

    def _target(self, kinds: tuple[type, ...], op: str) -> Any:
        target = self.stack[-1]
        if type(target) not in kinds:
            raise CheckpointFormatError(
                f"the pickle in {self.member} applies {op} to a {_standin_kind(target)}; {_NOTHING_RUN}"
            )
        return target

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if type(func) is not _Callable:
            raise CheckpointFormatError(
                f"the pickle in {self.member} calls a {_standin_kind(func)}, which is not allowed; {_NOTHING_RUN}"
            )
        if type(args) is not tuple:
            raise CheckpointFormatError(
                f"the pickle in {self.member} calls {func.name} without an argument tuple"
            )
        if func.fn is _ordered_dict and args and type(args[0]) is list:
            for pair in args[0]:
                if type(pair) in (list, tuple) and len(pair) == 2:
                    self._check_key(pair[0])
        self.stack[-1] = func.fn(*args)

    dispatch[pickle.REDUCE[0]] = _load_reduce

    def _load_build(self) -> None:
        self.stack.pop()  # the state: dropped
        self._target((_PickleDict,), "BUILD (setting attributes)")

    dispatch[pickle.BUILD[0]] = _load_build

    def _load_append(self) -> None:
        value = self.stack.pop()
        self._target((list,), "APPEND").append(value)

    dispatch[pickle.APPEND[0]] = _load_append

    def _load_appends(self) -> None:
        items = self.pop_mark()
        self._target((list,), "APPENDS").extend(items)

    dispatch[pickle.APPENDS[0]] = _load_appends

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        target = self._target((dict, _PickleDict), "SETITEM")
        self._check_key(key)
        target[key] = value

    dispatch[pickle.SETITEM[0]] = _load_setitem

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._target((dict, _PickleDict), "SETITEMS")
        if len(items) % 2:
            raise CheckpointFormatError(
                f"the pickle in {self.member} has SETITEMS with an odd number of items"
            )
        for i in range(0, len(items), 2):
            self._check_key(items[i])
            target[items[i]] = items[i + 1]

    dispatch[pickle.SETITEMS[0]] = _load_setitems

    def _load_dict(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise CheckpointFormatError(f"the pickle in {self.member} has DICT with an odd number of items")
        result: dict[Any, Any] = {}
        for i in range(0, len(items), 2):
            self._check_key(items[i])
            result[items[i]] = items[i + 1]
        self.append(result)

    dispatch[pickle.DICT[0]] = _load_dict

    def _load_additems(self) -> None:
        items = self.pop_mark()
        target = self._target((set,), "ADDITEMS")
        for item in items:
            self._check_key(item)
            target.add(item)

    dispatch[pickle.ADDITEMS[0]] = _load_additems

    def _load_frozenset(self) -> None:
        items = self.pop_mark()
        for item in items:
            self._check_key(item)
        self.append(frozenset(items))

    dispatch[pickle.FROZENSET[0]] = _load_frozenset
