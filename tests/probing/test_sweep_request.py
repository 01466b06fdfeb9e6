"""Sweep requests expanded into variants (no torch, no models)."""

from __future__ import annotations

import pytest

from mergeprobe.checkpoints.archs import get_arch
from mergeprobe.probing.sweep_request import SweepRequest, expand_variants


@pytest.mark.parametrize(
    "axis",
    [
        {"kind": "alpha", "values": [0, 1]},
        {"kind": "beta", "values": [0.5]},
        {"kind": "block", "block": "OUT05", "values": [0, 0.5]},
        {"kind": "seed", "values": [7]},
        {"kind": "elemental", "values": ["OUT05:attn2:0.2"]},
    ],
)
def test_xy_labels_are_printable_ascii_for_the_grid_font(axis):
    request = SweepRequest.model_validate(
        {
            "model_a": "a",
            "model_b": "b",
            "prompt": "a cat",
            "variants": {"x": axis, "y": {"kind": "prompt", "values": ["a dog"]}},
        }
    )
    variants = expand_variants(request, get_arch("sd1"))
    assert [v.position for v in variants] == [(x, 0) for x in range(len(axis["values"]))]
    for variant in variants:
        assert variant.label.isascii() and variant.label.isprintable(), variant.label
    if axis["kind"] == "block":
        assert variants[1].label.startswith("OUT05 alpha=0.5")
