"""The published block-weight presets and their sdxl resampling."""

from __future__ import annotations

import math

import pytest

from mergeprobe.checkpoints.archs import SD1, SD2, SDXL
from mergeprobe.merging.presets import PRESET_BLOCK_COUNT, PRESETS, find_preset, presets_for, resample

REQUIRED = """GRAD_V GRAD_A FLAT_25 FLAT_75 WRAP08 WRAP12 WRAP14 WRAP16 MID12_50 OUT07 OUT12 OUT12_5
RING08_SOFT RING08_5 RING10_5 RING10_3 SMOOTHSTEP REVERSE-SMOOTHSTEP SMOOTHSTEP*2 R_SMOOTHSTEP*2
SMOOTHSTEP*3 R_SMOOTHSTEP*3 SMOOTHSTEP*4 R_SMOOTHSTEP*4 SMOOTHSTEP/2 R_SMOOTHSTEP/2 COSINE REVERSE_COSINE
TRUE_CUBIC_HERMITE TRUE_REVERSE_CUBIC_HERMITE FAKE_CUBIC_HERMITE FAKE_REVERSE_CUBIC_HERMITE ALL_A ALL_B""".split()

# The list the block-merge article publishes (and MBW's GRAD_V): 1 at the shallow ends, 0 at M00.
GRAD_V = (
    1, 0.9166666667, 0.8333333333, 0.75, 0.6666666667, 0.5833333333, 0.5, 0.4166666667, 0.3333333333, 0.25,
    0.1666666667, 0.0833333333, 0, 0.0833333333, 0.1666666667, 0.25, 0.3333333333, 0.4166666667, 0.5,
    0.5833333333, 0.6666666667, 0.75, 0.8333333333, 0.9166666667, 1.0,
)  # fmt: skip


def test_table_shape():
    assert PRESET_BLOCK_COUNT == len(SD1.unet_blocks) == 25
    assert set(REQUIRED) <= set(PRESETS)
    for name, values in PRESETS.items():
        assert len(values) == 25, name
        assert all(isinstance(v, float) and math.isfinite(v) for v in values), name


def test_published_values():
    assert PRESETS["GRAD_V"] == tuple(float(v) for v in GRAD_V)
    assert all(a + v == pytest.approx(1.0, abs=1e-12) for a, v in zip(PRESETS["GRAD_A"], GRAD_V, strict=True))
    assert PRESETS["FLAT_25"] == (0.25,) * 25
    assert PRESETS["FLAT_75"] == (0.75,) * 25
    assert PRESETS["ALL_A"] == (0.0,) * 25
    assert PRESETS["ALL_B"] == (1.0,) * 25
    assert PRESETS["WRAP08"] == (1.0,) * 4 + (0.0,) * 17 + (1.0,) * 4
    assert PRESETS["OUT07"] == (0.0,) * 18 + (1.0,) * 7
    assert PRESETS["OUT12_5"] == (0.0,) * 12 + (0.5,) + (1.0,) * 12
    assert PRESETS["RING08_SOFT"][4:10] == (0.0, 0.5, 1.0, 1.0, 1.0, 0.5)


def test_curves_match_their_definitions():
    """The published decimals are the curves they are named after (to their 15 printed digits)."""
    for i in range(25):
        x = i / 24
        assert PRESETS["SMOOTHSTEP"][i] == pytest.approx(3 * x**2 - 2 * x**3, abs=1e-12)
        assert PRESETS["REVERSE-SMOOTHSTEP"][i] == pytest.approx(1 - (3 * x**2 - 2 * x**3), abs=1e-12)
        assert PRESETS["COSINE"][i] == pytest.approx((1 + math.cos(math.pi * x)) / 2, abs=1e-12)
        assert PRESETS["REVERSE_COSINE"][i] == pytest.approx((1 - math.cos(math.pi * x)) / 2, abs=1e-12)
        assert PRESETS["R_SMOOTHSTEP/2"][i] == pytest.approx(1 - PRESETS["SMOOTHSTEP/2"][i], abs=1e-12)
        assert PRESETS["TRUE_REVERSE_CUBIC_HERMITE"][i] == pytest.approx(
            1 - PRESETS["TRUE_CUBIC_HERMITE"][i], abs=1e-12
        )


def test_sd2_uses_the_table_and_copies_are_independent():
    sd1 = presets_for(SD1)
    assert sd1 == PRESETS == presets_for(SD2)
    sd1["GRAD_V"] = (0.0,)
    del sd1["FLAT_25"]
    assert presets_for(SD1)["GRAD_V"] == PRESETS["GRAD_V"] and "FLAT_25" in presets_for(SD1)


def test_sdxl_resampling():
    xl = presets_for(SDXL)
    assert list(xl) == list(PRESETS)
    for name, values in xl.items():
        sd1 = PRESETS[name]
        assert len(values) == 19 == len(SDXL.unet_blocks), name
        assert (values[0], values[-1]) == (sd1[0], sd1[-1]), name
        assert values[9] == sd1[12], name  # M00 ← M00
        assert values[3] == sd1[4] and values[15] == sd1[20], name  # x = 4 and x = 20 are whole
    assert xl["FLAT_25"] == (0.25,) * 19
    assert xl["ALL_A"] == (0.0,) * 19
    # sdxl IN01 sits at x = 4/3: 2/3 of sd1 IN01 plus 1/3 of sd1 IN02
    g = PRESETS["GRAD_V"]
    assert xl["GRAD_V"][1] == pytest.approx(g[1] + (g[2] - g[1]) / 3, abs=1e-12)
    assert xl["GRAD_V"][1] == 0.8888888889
    assert xl["WRAP08"] == (1.0, 1.0, 1.0) + (0.0,) * 13 + (1.0, 1.0, 1.0)


def test_resample_rule():
    assert resample([0.0, 1.0], 5) == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert resample((0, 10, 20), 3) == (0.0, 10.0, 20.0)
    assert resample([1.0, 0.0, 1.0], 2) == (1.0, 1.0)
    with pytest.raises(ValueError):
        resample([1.0], 3)
    with pytest.raises(ValueError):
        resample([1.0, 2.0], 1)


def test_find_preset():
    assert find_preset("GRAD_V", SD1) == ("GRAD_V", PRESETS["GRAD_V"])
    assert find_preset(" reverse-smoothstep ", SD1) == ("REVERSE-SMOOTHSTEP", PRESETS["REVERSE-SMOOTHSTEP"])
    name, values = find_preset("r_smoothstep*3", SDXL)
    assert name == "R_SMOOTHSTEP*3" and len(values) == 19
    assert find_preset("GRAD_X", SD1) is None
    assert find_preset("", SD1) is None
