"""Header reading and strict validation of .safetensors and .ckpt files, malicious pickles included."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

import mergeprobe.checkpoints.ckpt_unpickler as ckpt
import mergeprobe.checkpoints.safetensors_header as st
from mergeprobe.checkpoints.checkpoint_headers import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    CheckpointFormatError,
    read_checkpoint_header,
    sniff_format,
)
from mergeprobe.checkpoints.ckpt_unpickler import read_ckpt_header
from mergeprobe.checkpoints.safetensors_header import read_safetensors_header
from tests.conftest import REPO

# -- helpers ---------------------------------------------------------------------------


class NoFilenoReader:
    """A seekable binary file object with no fileno(), as a reader serving ranged GETs from an
    object store is, and no close(): the header readers must need neither."""

    def __init__(self, data: bytes) -> None:
        self._bytes = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._bytes.read(size)

    def readinto(self, buffer) -> int:
        return self._bytes.readinto(buffer)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._bytes.seek(offset, whence)

    def tell(self) -> int:
        return self._bytes.tell()

    def seekable(self) -> bool:
        return True


@pytest.fixture(params=["path", "BytesIO", "no-fileno"])
def read_header(request):
    """read_checkpoint_header by each route: the path, or the file's bytes in a file object
    (io.BytesIO, NoFilenoReader) handed over at its end under a name that is no file on disk,
    so that a reader that opened the name or relied on the position would fail."""

    def read(path: Path, **kwargs):
        if request.param == "path":
            return read_checkpoint_header(path, **kwargs)
        data = Path(path).read_bytes()
        fileobj = io.BytesIO(data) if request.param == "BytesIO" else NoFilenoReader(data)
        fileobj.seek(0, io.SEEK_END)
        try:
            return read_checkpoint_header(f"/no/such/dir/{Path(path).name}", fileobj=fileobj, **kwargs)
        finally:
            assert not getattr(fileobj, "closed", False)  # the caller's to close

    return read


def _raw_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_st(path: Path, header: dict | bytes, data: bytes) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _small_st(tmp_path: Path) -> Path:
    """a: F32 [2] at data bytes 0-8, b: F16 [3] at 8-14."""
    path = tmp_path / "small.safetensors"
    save_numpy({"a": np.arange(2, dtype=np.float32), "b": np.ones(3, dtype=np.float16)}, str(path))
    return path


def _torch_zip(path: Path, pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A zip laid out like torch.save's, with the given data.pkl."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")
        for name, data in (records or {}).items():
            zf.writestr(f"archive/{name}", data)
    return path


def _rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes | None]) -> Path:
    """A copy of src with the named members (suffix match) replaced, or dropped where None."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            hit = next((k for k in replace if info.filename.endswith(k)), None)
            if hit is None:
                zout.writestr(info.filename, zin.read(info))
            elif replace[hit] is not None:
                zout.writestr(info.filename, replace[hit])
    return dst


def _str_op(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


@dataclass
class Cfg:
    lr: float = 1e-4


class Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# -- safetensors ------------------------------------------------------------------------


def test_safetensors_header_matches_a_real_file(tmp_path, read_header):
    path = tmp_path / "model.safetensors"
    tensors = {
        "model.w16": torch.randn(3, 5).half(),
        "model.bf": torch.randn(2, 2, 3).bfloat16(),
        "model.w32": torch.randn(7),
        "model.ids": torch.arange(4, dtype=torch.int64).reshape(2, 2),
        "model.scalar": torch.tensor(1.5),
        "model.empty": torch.zeros(0, 3),
    }
    save_torch(tensors, str(path), metadata={"format": "pt", "ss_note": "x"})
    header = read_header(path)
    raw, data = _raw_header(path)

    assert header.format == "safetensors"
    assert header.metadata == {"format": "pt", "ss_note": "x"}
    assert header.file_size == path.stat().st_size
    assert header.data_start == path.stat().st_size - len(data)
    assert set(header.tensors) == set(tensors)
    expected_dtypes = {"model.w16": "F16", "model.bf": "BF16", "model.w32": "F32", "model.ids": "I64"}
    for key, tensor in tensors.items():
        info = header.tensors[key]
        assert info.key == key
        assert info.shape == tuple(tensor.shape)
        assert info.data_offsets == tuple(raw[key]["data_offsets"])
        assert info.numel == tensor.numel()
        assert info.nbytes == tensor.numel() * tensor.element_size()
        if key in expected_dtypes:
            assert info.dtype == expected_dtypes[key]
    offsets = [t.data_offsets for t in header.tensors.values()]
    assert offsets == sorted(offsets)  # file order: by data offset
    assert header.tensors["model.scalar"].shape == () and header.tensors["model.scalar"].numel == 1


def test_safetensors_numpy_file_and_direct_reader(tmp_path):
    path = _small_st(tmp_path)
    header = read_safetensors_header(path)
    assert {k: (t.dtype, t.shape, t.data_offsets) for k, t in header.tensors.items()} == {
        "a": ("F32", (2,), (0, 8)),
        "b": ("F16", (3,), (8, 14)),
    }
    assert header.metadata == {}


def test_too_short(tmp_path, read_header):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointFormatError, match="3 bytes long.*8-byte header length"):
        read_header(path)


def test_huge_header_length_fails_fast_without_allocating(tmp_path, read_header):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(
            CheckpointFormatError, match=r"header length 1099511627776 \(bytes 0-7\) exceeds the 100 MB limit"
        ):
            read_header(path)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 1024 * 1024  # nothing near the declared size (or even the 100 MB cap) was allocated
    assert MAX_HEADER_BYTES == 100 * 1024 * 1024


def test_header_limit_is_configurable(tmp_path, read_header):
    path = _small_st(tmp_path)
    with pytest.raises(CheckpointFormatError, match="exceeds the 64 bytes limit"):
        read_header(path, max_header_bytes=64)


def test_header_length_larger_than_file(tmp_path, read_header):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b'{"a": 1}')
    with pytest.raises(
        CheckpointFormatError, match=r"truncated: header length 1000 .* larger than the 8 bytes"
    ):
        read_header(path)
    # Also past the default cap when the caller raises it: still no allocation of that size.
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(CheckpointFormatError, match="truncated: header length"):
        read_header(path, max_header_bytes=2**41)


def test_zero_header_length(tmp_path, read_header):
    path = _write_st(tmp_path / "x.safetensors", b"", b"")
    with pytest.raises(CheckpointFormatError, match="header length .* is 0"):
        read_header(path)


def test_truncated_data(tmp_path, read_header):
    path = _small_st(tmp_path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(
        CheckpointFormatError,
        match=r"truncated: tensor 'b' ends at byte 14 but the file has only 11 bytes of data",
    ):
        read_header(path)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b'{"a": {"dtype": "F32",', r"not valid JSON at byte 30 \(line 1, column 23\)"),
        (b"\xff\xfe{}", "not valid UTF-8 at byte 8"),
        (b'{"a": NaN}', "NaN"),
        (b"[1, 2]", "header JSON is an array, not an object"),
    ],
)
def test_invalid_json(tmp_path, blob, message, read_header):
    path = _write_st(tmp_path / "x.safetensors", blob, b"")
    with pytest.raises(CheckpointFormatError, match=message):
        read_header(path)


def _mutations():
    """(name, change to the header of _small_st, expected message)."""

    def setp(key, field, value):
        def change(h):
            h[key][field] = value

        return change

    def meta(value):
        def change(h):
            h["__metadata__"] = value

        return change

    def delete(key, field):
        def change(h):
            del h[key][field]

        return change

    def add(key, field, value):
        def change(h):
            h[key][field] = value

        return change

    return [
        ("wrong dtype", setp("a", "dtype", "F17"), r"tensor 'a': unknown dtype 'F17'"),
        ("dtype not a string", setp("a", "dtype", 4), r"tensor 'a': dtype is an integer, not a string"),
        ("sub-byte dtype", setp("a", "dtype", "F4"), r"unknown dtype 'F4'"),
        (
            "offsets vs shape",
            setp("a", "shape", [3]),
            r"tensor 'a': data_offsets \[0, 8\] span 8 bytes but dtype F32 with shape \[3\] needs 12 bytes",
        ),
        ("offsets vs dtype", setp("a", "dtype", "F64"), r"needs 16 bytes"),
        (
            "overlap",
            setp("b", "data_offsets", [6, 12]),
            r"tensors 'a' \(data bytes 0-8\) and 'b' \(data bytes 6-12\) overlap",
        ),
        ("same offsets", setp("b", "data_offsets", [0, 6]), "overlap"),
        ("gap", setp("b", "data_offsets", [10, 16]), r"truncated: tensor 'b' ends at byte 16"),
        ("end before begin", setp("b", "data_offsets", [14, 8]), r"end before they begin"),
        ("negative dim", setp("a", "shape", [-2]), r"shape\[0\] is -2, not a non-negative integer"),
        ("bool dim", setp("a", "shape", [True, 2]), r"shape\[0\] is a boolean"),
        ("float dim", setp("a", "shape", [2.0]), r"shape\[0\] is a number"),
        ("shape not a list", setp("a", "shape", "2"), r"shape is a string, not an array"),
        (
            "offsets not a pair",
            setp("a", "data_offsets", [0, 8, 9]),
            r"data_offsets must be an array \[begin, end\]",
        ),
        ("negative offset", setp("a", "data_offsets", [-8, 0]), r"data_offsets\[0\] is -8"),
        ("missing field", delete("a", "shape"), r"tensor 'a': missing shape"),
        ("extra field", add("a", "extra", 1), r"tensor 'a': unexpected field 'extra'"),
        ("entry not an object", lambda h: h.update(a=[1]), r"tensor 'a': entry is an array, not an object"),
        ("non-string metadata", meta({"epoch": 3}), r"__metadata__\['epoch'\] is an integer, not a string"),
        ("metadata not an object", meta(["x"]), r"__metadata__ is an array, not an object of strings"),
        ("null metadata", meta(None), r"__metadata__ is null"),
        ("huge shape", setp("a", "shape", [2**31, 2**31]), r"needs 18446744073709551616 bytes"),
        ("too many elements", setp("a", "shape", [2**40, 2**40]), r"has more than 2\*\*64 elements"),
    ]


@pytest.mark.parametrize(
    ("change", "message"), [m[1:] for m in _mutations()], ids=[m[0] for m in _mutations()]
)
def test_invalid_tensor_table(tmp_path, change, message, read_header):
    header, data = _raw_header(_small_st(tmp_path))
    header = copy.deepcopy(header)
    change(header)
    path = _write_st(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointFormatError, match=message):
        read_header(path)


def test_gap_and_trailing_bytes_are_refused(tmp_path, read_header):
    header, data = _raw_header(_small_st(tmp_path))
    header["b"]["data_offsets"] = [10, 16]
    path = _write_st(tmp_path / "gap.safetensors", header, data + b"zz")
    with pytest.raises(CheckpointFormatError, match=r"data bytes 8-10 after tensor 'a' belong to no tensor"):
        read_header(path)
    header, data = _raw_header(_small_st(tmp_path))
    path = _write_st(tmp_path / "trail.safetensors", header, data + b"zz")
    with pytest.raises(
        CheckpointFormatError, match="16 bytes but the tensors end at byte 14; 2 trailing bytes"
    ):
        read_header(path)


def test_duplicate_key_and_tensor_cap(tmp_path, monkeypatch, read_header):
    entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    path = _write_st(tmp_path / "dup.safetensors", f'{{"a": {entry}, "a": {entry}}}'.encode(), b"x")
    with pytest.raises(CheckpointFormatError, match="key 'a' twice"):
        read_header(path)
    monkeypatch.setattr(st, "MAX_TENSORS", 2)
    entries = {key: {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i, key in enumerate("abc")}
    two = _write_st(tmp_path / "two.safetensors", {k: entries[k] for k in "ab"}, b"xy")
    assert list(read_header(two).tensors) == ["a", "b"]
    path = _write_st(tmp_path / "many.safetensors", entries, b"xyz")
    with pytest.raises(
        CheckpointFormatError,
        match='header has 3 "dtype" fields, one per tensor; at most 2 tensors are accepted',
    ):
        read_header(path)
    # "dtype" spelled with an escape is not counted before the parse; the parsed header is.
    escaped = json.dumps(entries).replace('"dtype"', '"\\u0064type"').encode()
    path = _write_st(tmp_path / "escaped.safetensors", escaped, b"xyz")
    with pytest.raises(CheckpointFormatError, match="header lists 3 tensors; at most 2 are accepted"):
        read_header(path)


def test_zero_size_tensors_and_empty_file(tmp_path, read_header):
    header = {
        "z1": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
        "z2": {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]},
    }
    parsed = read_header(_write_st(tmp_path / "z.safetensors", header, b""))
    assert list(parsed.tensors) == ["z1", "z2"] and parsed.tensors["z1"].nbytes == 0
    assert read_header(_write_st(tmp_path / "e.safetensors", b"{}", b"")).tensors == {}


def test_untrusted_key_is_shown_safely(tmp_path, read_header):
    header, data = _raw_header(_small_st(tmp_path))
    nasty = "\x1b[31m" + "k" * 500
    header[nasty] = header.pop("a")
    header[nasty]["dtype"] = "nope"
    path = _write_st(tmp_path / "x.safetensors", header, data)
    with pytest.raises(CheckpointFormatError) as info:
        read_header(path)
    assert "\x1b" not in str(info.value) and len(str(info.value)) < 400


def zero_size_tensors_header(count: int, *, key_length: int = 64, dtype_field: bytes = b'"dtype"') -> bytes:
    """A safetensors JSON header of `count` zero-size F32 tensors under U-Net-like keys of
    `key_length` characters (at 64, entries of ~117 bytes)."""
    entry = b'{%s:"F32","shape":[0],"data_offsets":[0,0]}' % dtype_field
    return (
        b"{"
        + b",".join(
            b'"' + (b"model.diffusion_model.output_blocks.%07d." % i).ljust(key_length, b"k") + b'":' + entry
            for i in range(count)
        )
        + b"}"
    )


def test_header_of_800k_tensors_is_refused_before_parsing(tmp_path):
    # As reported: a 93 MB header of 800 k zero-size tensors. Parsing it took 12 s and 1 GB;
    # the count before the parse needs the header's bytes and nothing per entry.
    header = zero_size_tensors_header(800_000)
    path = _write_st(tmp_path / "zeros.safetensors", header, b"")
    tracemalloc.start()
    try:
        with pytest.raises(
            CheckpointFormatError,
            match='header has 800000 "dtype" fields, one per tensor; at most 100000 tensors are accepted',
        ):
            read_checkpoint_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(header) + 1024 * 1024


def test_header_of_escaped_keys_is_refused_by_its_colons(tmp_path):
    # "\u0064type" is "dtype" to the JSON parser but not to the count of "dtype" fields; each
    # entry still has 4 ':' outside strings, and 150 k entries have more than 100 k entries may.
    header = zero_size_tensors_header(150_000, dtype_field=rb'"\u0064type"')
    path = _write_st(tmp_path / "escaped.safetensors", header, b"")
    with pytest.raises(
        CheckpointFormatError,
        match="header has 600000 ':' characters; 100000 tensor entries and their metadata need at most 500000",
    ):
        read_checkpoint_header(path)


def test_metadata_full_of_colons_is_accepted(tmp_path):
    # kohya's ss_tag_frequency is JSON in a metadata string: one ':' per tag, none a member of the
    # header. A file of few tensors may spend the ':' its tensors leave unused.
    tags = json.dumps({"img/10_subject": {f"tag {i}": 1 for i in range(150_000)}})
    path = tmp_path / "lora.safetensors"
    save_numpy({"w": np.ones(2, dtype=np.float16)}, str(path), metadata={"ss_tag_frequency": tags})
    assert read_checkpoint_header(path).metadata["ss_tag_frequency"] == tags


# -- .ckpt ---------------------------------------------------------------------------------


def _check_against_torch(read_header, path: Path, expected: dict[str, torch.Tensor]) -> None:
    header = read_header(path)
    assert header.format == "ckpt" and header.metadata == {} and header.data_start == 0
    assert header.file_size == path.stat().st_size
    assert list(header.tensors) == list(expected)  # pickle order
    names = {v: k for k, v in ckpt._TORCH_DTYPES.items()}
    for key, tensor in expected.items():
        info = header.tensors[key]
        assert info.key == key and info.data_offsets is None
        assert info.shape == tuple(tensor.shape), key
        assert getattr(torch, names[info.dtype]) == tensor.dtype, key
        assert info.nbytes == tensor.numel() * tensor.element_size()


def test_ckpt_with_nested_state_dict(tmp_path, read_header):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        "model.half": torch.randn(2, 3).half(),
        "model.float": base,
        "model.bf16": torch.randn(5).bfloat16(),
        "model.ids": torch.arange(6, dtype=torch.int64),
        "model.view": base[:, 1:3],  # shares base's storage, non-contiguous
        "model.t": base.t(),
        "model.offset_view": base[2],  # storage offset 8
        "model.scalar": torch.tensor(2.0),
        "model.param": torch.nn.Parameter(torch.ones(2, 2)),
        "model.f8": torch.zeros(4, dtype=torch.float8_e4m3fn),
        "model.bool": torch.zeros(3, dtype=torch.bool),
    }
    path = tmp_path / "sd.ckpt"
    extra = {"global_step": 5, "epoch": 1, "input_shape": torch.Size([1, 4]), "betas": (0.9, 0.99)}
    torch.save({"state_dict": state, **extra}, path)
    loaded = torch.load(path, weights_only=True)["state_dict"]
    _check_against_torch(read_header, path, loaded)
    assert read_header(path).tensors["model.half"].dtype == "F16"
    assert read_header(path).tensors["model.bf16"].dtype == "BF16"


def test_ckpt_flat_state_dict_and_module_state_dict(tmp_path, read_header):
    flat = {"w": torch.randn(4, 4), "b": torch.zeros(4, dtype=torch.float64), "n": 3}
    path = tmp_path / "flat.pt"
    torch.save(flat, path)
    _check_against_torch(read_header, path, {"w": flat["w"], "b": flat["b"]})

    # An nn.Module state_dict is an OrderedDict with a _metadata attribute (pickled with BUILD);
    # with optimizer state alongside, as Lightning saves it.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2))
    optimizer = torch.optim.Adam(model.parameters())
    model[0](torch.ones(1, 3, 4, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "lightning.pth"
    torch.save(
        {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "lr": 1e-3}, path
    )
    _check_against_torch(read_header, path, dict(model.state_dict()))


def test_ckpt_without_tensors(tmp_path, read_header):
    path = tmp_path / "none.ckpt"
    torch.save({"state_dict": {"step": 1}}, path)
    assert read_header(path).tensors == {}


def test_ckpt_top_level_not_a_dict(tmp_path, read_header):
    path = tmp_path / "list.ckpt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointFormatError, match=r"holds a list, not a dict of tensors"):
        read_header(path)


def _system_pickle(command: str) -> bytes:
    return b"\x80\x02cos\nsystem\n" + _str_op(command) + b"\x85R."  # GLOBAL os.system, REDUCE


def test_ckpt_os_system_via_global_reduce_is_refused_and_not_run(tmp_path):
    # The payload is live: plain pickle runs it.
    live_marker = tmp_path / "live"
    live = tmp_path / "live.pkl"
    live.write_bytes(_system_pickle(f"touch {live_marker}"))
    loader = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())"
    subprocess.run([sys.executable, "-c", loader, str(live)], check=True, timeout=30)
    assert live_marker.exists()

    marker = tmp_path / "pwned"
    path = _torch_zip(tmp_path / "evil.ckpt", _system_pickle(f"touch {marker}"))
    with pytest.raises(
        CheckpointFormatError,
        match=r"the pickle in archive/data\.pkl needs os\.system, which is not allowed; "
        r"refusing to load it \(nothing in it was run\)",
    ):
        read_checkpoint_header(path)
    assert not marker.exists()


def test_ckpt_reduce_hidden_in_a_real_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": Evil(f"touch {marker}")}, path)
    with pytest.raises(
        CheckpointFormatError, match=rf"needs {os.system.__module__}\.system, which is not allowed"
    ):
        read_checkpoint_header(path)
    # Protocol 4 (STACK_GLOBAL) is refused outright: torch's weights_only loader reads protocol 2 only.
    path = _torch_zip(tmp_path / "evil4.ckpt", pickle.dumps({"x": Evil(f"touch {marker}")}, protocol=4))
    with pytest.raises(CheckpointFormatError, match="pickle protocol 4"):
        read_checkpoint_header(path)
    assert not marker.exists()


@pytest.mark.parametrize("module", ["builtins", "__builtin__"])
def test_ckpt_exec_is_refused(tmp_path, module):
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').close()"
    pkl = b"\x80\x02c" + module.encode() + b"\nexec\n" + _str_op(code) + b"\x85R."
    path = _torch_zip(tmp_path / "evil.ckpt", pkl)
    with pytest.raises(CheckpointFormatError, match=rf"needs {module}\.exec, which is not allowed"):
        read_ckpt_header(path)
    assert not marker.exists()


def test_ckpt_custom_class_is_refused(tmp_path):
    path = tmp_path / "cfg.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2), "cfg": Cfg()}}, path)
    with pytest.raises(CheckpointFormatError, match=rf"needs {Cfg.__module__}\.Cfg, which is not allowed"):
        read_ckpt_header(path)


@pytest.mark.parametrize(
    ("pkl", "message"),
    [
        # Calling an allowed non-function (a dtype marker).
        (b"\x80\x02ctorch\nfloat16\n)R.", "calls a torch.float16, which is not allowed"),
        # NEWOBJ on an allowed name.
        (b"\x80\x02ctorch\nSize\n)\x81.", r"uses the NEWOBJ opcode \(at byte \d+\)"),
        # BUILD (attribute setting) on something other than an OrderedDict.
        (b"\x80\x02]}b.", r"applies BUILD \(setting attributes\) to a list"),
        # APPEND onto a dict.
        (b"\x80\x02}K\x01a.", "applies APPEND to a dict"),
        # The copyreg extension registry.
        (b"\x80\x02\x82\x01.", "uses the EXT1 opcode"),
        # Wrong argument count for a rebuild function.
        (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nK\x01\x85R.", "called with 1 arguments"),
        # A persistent id that is not a storage record.
        (b"\x80\x02X\x01\x00\x00\x00xQ.", "persistent id that is not a storage record"),
        # Truncated pickle.
        (b"\x80\x02}q\x00(X\x05\x00\x00\x00", "is corrupt"),
        # SETITEMS with no MARK to take its items from.
        (b"\x80\x02}K\x01K\x02u.", "is corrupt: SETITEMS without a MARK"),
    ],
)
def test_ckpt_crafted_pickles(tmp_path, pkl, message, read_header):
    path = _torch_zip(tmp_path / "crafted.ckpt", pkl)
    with pytest.raises(CheckpointFormatError, match=message):
        read_header(path)


def test_ckpt_deeply_nested_dict_key_does_not_crash(tmp_path):
    # hash() of a 100k-deep tuple overflows the C stack (a segfault); refuse before hashing.
    # In a subprocess so that a regression shows as a failure, not a dead test run.
    pkl = b"\x80\x02}" + b")" + b"\x85" * 100_000 + b"K\x01s."
    path = _torch_zip(tmp_path / "deep.ckpt", pkl)
    code = (
        "import sys; from mergeprobe.checkpoints.checkpoint_headers import CheckpointFormatError\n"
        "from mergeprobe.checkpoints.ckpt_unpickler import read_ckpt_header\n"
        "try:\n    read_ckpt_header(sys.argv[1])\nexcept CheckpointFormatError as e:\n    print('refused:', e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "refused: the pickle in archive/data.pkl has a dict key nested too deeply" in result.stdout


def test_ckpt_limits(tmp_path, monkeypatch, read_header):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {f"w{i}": torch.ones(1) for i in range(50)}}, path)
    monkeypatch.setattr(ckpt, "MAX_PICKLE_OPS", 100)
    with pytest.raises(CheckpointFormatError, match="more than 100 opcodes"):
        read_header(path)
    monkeypatch.setattr(ckpt, "_MAX_CENTRAL_DIRECTORY", 200)
    with pytest.raises(
        CheckpointFormatError, match=r"central directory is \d+ bytes; more than 200 bytes is refused"
    ):
        read_header(path)
    monkeypatch.undo()
    monkeypatch.setattr(ckpt, "MAX_PICKLE_BYTES", 100)
    with pytest.raises(CheckpointFormatError, match="pickles over 100 bytes are refused"):
        read_header(path)
    monkeypatch.undo()
    # Many keys with attacker-chosen hashes (collision bombs).
    pkl = (
        b"\x80\x02}("
        + b"".join(b"G" + struct.pack(">d", float(i) + 0.5) + b"K\x00" for i in range(20_000))
        + b"u."
    )
    with pytest.raises(CheckpointFormatError, match="more than 10000 non-string dict keys"):
        read_header(_torch_zip(tmp_path / "keys.ckpt", pkl))


def ckpt_of_dict_entries(path: Path, count: int) -> Path:
    """A zip laid out like torch.save's whose pickle is one dict of `count` str -> int entries."""
    return _torch_zip(path, pickle.dumps({f"k{i}": i for i in range(count)}, protocol=2))


def test_ckpt_pickle_of_2_4m_dict_entries_is_refused_early(tmp_path):
    # As reported: 2.4 M dict entries, 7 M opcodes. The prescan walked 5 M of them (MAX_PICKLE_OPS)
    # before refusing it; it now stops at the 200 001st entry.
    path = ckpt_of_dict_entries(tmp_path / "entries.ckpt", 2_400_000)
    with pytest.raises(
        CheckpointFormatError,
        match=r"the pickle in archive/data\.pkl builds more than 200000 dict entries and list items",
    ):
        read_checkpoint_header(path)


def test_ckpt_entry_cap_counts_dict_entries_and_list_items(tmp_path, monkeypatch):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {f"w{i}": torch.ones(1) for i in range(50)}}, path)
    # 51 entries: the outer dict's and one per tensor (the tuples that rebuild a tensor are none).
    monkeypatch.setattr(ckpt, "MAX_PICKLE_ENTRIES", 51)
    assert len(read_ckpt_header(path).tensors) == 50
    monkeypatch.setattr(ckpt, "MAX_PICKLE_ENTRIES", 50)
    with pytest.raises(CheckpointFormatError, match="builds more than 50 dict entries and list items"):
        read_ckpt_header(path)

    monkeypatch.setattr(ckpt, "MAX_PICKLE_ENTRIES", 4)
    # One dict entry and 4 list items (APPENDS).
    lists = _torch_zip(tmp_path / "list.ckpt", pickle.dumps({"x": [1, 2, 3, 4]}, protocol=2))
    with pytest.raises(CheckpointFormatError, match="builds more than 4 dict entries"):
        read_ckpt_header(lists)
    # 5 entries set after two MARKs, the second taken off again by POP (the unpickler's POP takes
    # a MARK when nothing is above it): SETITEMS then takes all 10 items above the first MARK.
    pairs = b"".join(b"K%cK\x00" % i for i in range(5))
    popped_mark = _torch_zip(tmp_path / "pop.ckpt", b"\x80\x02}((0" + pairs + b"u.")
    with pytest.raises(CheckpointFormatError, match="builds more than 4 dict entries"):
        read_ckpt_header(popped_mark)


def test_ckpt_legacy_format_is_refused(tmp_path, read_header):
    path = tmp_path / "old.ckpt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(
        CheckpointFormatError, match=r"legacy \.ckpt format .* not supported; re-save it with torch\.save"
    ):
        read_header(path)


def test_ckpt_broken_archives(tmp_path, read_header):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"a": torch.ones(3), "b": torch.ones(2, dtype=torch.float16)}}, good)

    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointFormatError, match="corrupt zip archive"):
        read_header(truncated)

    no_pickle = _rewrite_zip(good, tmp_path / "nopkl.ckpt", {"/data.pkl": None})
    with pytest.raises(CheckpointFormatError, match=r"no <archive>/data\.pkl record"):
        read_header(no_pickle)

    no_storage = _rewrite_zip(good, tmp_path / "nostorage.ckpt", {"/data/1": None})
    with pytest.raises(
        CheckpointFormatError, match=r"storage '1' used by good/data\.pkl has no record good/data/1"
    ):
        read_header(no_storage)

    short_storage = _rewrite_zip(good, tmp_path / "short.ckpt", {"/data/0": b"\0" * 4})
    with pytest.raises(
        CheckpointFormatError, match=r"good/data/0 holds 4 bytes but the pickle declares 12 bytes"
    ):
        read_header(short_storage)

    not_zip = tmp_path / "text.ckpt"
    not_zip.write_bytes(b"hello world")
    with pytest.raises(CheckpointFormatError, match="not the zip signature"):
        read_header(not_zip)


def test_ckpt_view_past_its_storage_is_refused(tmp_path, read_header):
    # A hand-made pickle: a 4-element FloatStorage viewed as 3x2.
    pkl = (
        b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
        b"K\x00K\x03K\x02\x86K\x02K\x01\x86\x89ccollections\nOrderedDict\n)RtRs."
    )
    path = _torch_zip(tmp_path / "view.ckpt", pkl, {"data/0": b"\0" * 16})
    with pytest.raises(
        CheckpointFormatError, match=r"tensor 'w': its view .* reaches element 5 but storage '0' holds only 4"
    ):
        read_header(path)


# -- dispatch and sniffing -------------------------------------------------------------------


def test_dispatch_by_extension_and_magic(tmp_path, read_header):
    st = _small_st(tmp_path)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"w": torch.ones(1)}, ckpt)

    upper = tmp_path / "M.SAFETENSORS"
    upper.write_bytes(st.read_bytes())
    assert read_header(upper).format == "safetensors"

    disguised = tmp_path / "zip.safetensors"
    disguised.write_bytes(ckpt.read_bytes())
    with pytest.raises(
        CheckpointFormatError, match=r"ends in \.safetensors but its first bytes are those of a PyTorch"
    ):
        read_header(disguised)
    disguised = tmp_path / "st.ckpt"
    disguised.write_bytes(st.read_bytes())
    with pytest.raises(
        CheckpointFormatError, match=r"ends in \.ckpt but its first bytes are those of a safetensors"
    ):
        read_header(disguised)

    other = tmp_path / "model.bin"
    other.write_bytes(st.read_bytes())
    with pytest.raises(CheckpointFormatError, match=r"unsupported file type \(extension '\.bin'\)"):
        read_header(other)
    with pytest.raises(CheckpointFormatError, match="no extension"):
        read_checkpoint_header(tmp_path / "model")


def test_sniff_format(tmp_path):
    st = _small_st(tmp_path)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"w": torch.ones(1)}, ckpt)
    legacy = tmp_path / "old.ckpt"
    torch.save({"w": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)

    assert sniff_format(st.read_bytes()[:16]) == "safetensors"
    assert sniff_format(ckpt.read_bytes()[:16]) == "ckpt"
    assert sniff_format(legacy.read_bytes()[:16]) == "ckpt"
    assert sniff_format(pickle.dumps({}, protocol=2)) == "ckpt"
    # A safetensors length whose low byte is 0x80 is still safetensors.
    assert sniff_format(struct.pack("<Q", 0x280) + b"{") == "safetensors"
    for junk in (b"", b"abc", b"GIF89a......", b"\x80\x09xyz"):
        assert sniff_format(junk) is None


def test_dtype_table():
    assert DTYPE_SIZES["F16"] == 2 and DTYPE_SIZES["BF16"] == 2 and DTYPE_SIZES["F8_E4M3"] == 1
    assert DTYPE_SIZES["I64"] == 8 and DTYPE_SIZES["BOOL"] == 1 and DTYPE_SIZES["U16"] == 2
    assert set(ckpt._TORCH_DTYPES.values()) == set(DTYPE_SIZES)
    for name, code in ckpt._TORCH_DTYPES.items():
        assert getattr(torch, name).itemsize == DTYPE_SIZES[code]


def test_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import mergeprobe.checkpoints.checkpoint_headers, mergeprobe.checkpoints.ckpt_unpickler, mergeprobe.checkpoints.safetensors_header\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
