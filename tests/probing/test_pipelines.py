"""Which device and precision the worker's generation pipelines use."""

from __future__ import annotations

import pydantic
import pytest
import torch

from mergeprobe.service.settings import Settings
from worker.probing import pipelines


@pytest.mark.parametrize(
    ("cuda", "expected"), [(False, ("cpu", torch.float32)), (True, ("cuda", torch.float16))]
)
def test_auto_is_float16_on_cuda_and_float32_on_a_cpu(monkeypatch, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    device, dtype = pipelines.pick_device(Settings().generation_dtype)
    assert (device.type, dtype) == expected


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_an_explicit_setting_wins(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("MERGEPROBE_GENERATION_DTYPE", name)
    assert pipelines.pick_device(Settings().generation_dtype) == (torch.device("cpu"), getattr(torch, name))


def test_unknown_dtype_setting_is_refused(monkeypatch):
    monkeypatch.setenv("MERGEPROBE_GENERATION_DTYPE", "float64")
    with pytest.raises(pydantic.ValidationError, match="generation_dtype"):
        Settings()
