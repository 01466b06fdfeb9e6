"""The published block-weight presets: SuperMerger's values and BASE on sd1 and sdxl, and the
depth-resampled curves on request."""

from __future__ import annotations

import math

import pytest

from mergeprobe.checkpoints.archs import SD1, SD2, SDXL
from mergeprobe.merging.presets import (
    PRESET_BASE,
    PRESET_BLOCK_COUNT,
    PRESETS,
    Preset,
    find_preset,
    presets_for,
    resample,
    sd1_to_arch,
)

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


# The preset names of hako-mikan/sd-webui-supermerger scripts/mbwpresets_master.txt, in its order.
SUPERMERGER_NAMES = """GRAD_V GRAD_A FLAT_25 FLAT_75 WRAP08 WRAP12 WRAP14 WRAP16 MID12_50 OUT07 OUT12 OUT12_5
RING08_SOFT RING08_5 RING10_5 RING10_3 SMOOTHSTEP REVERSE-SMOOTHSTEP SMOOTHSTEP*2 R_SMOOTHSTEP*2
SMOOTHSTEP*3 R_SMOOTHSTEP*3 SMOOTHSTEP*4 R_SMOOTHSTEP*4 SMOOTHSTEP/2 R_SMOOTHSTEP/2 SMOOTHSTEP/3
R_SMOOTHSTEP/3 SMOOTHSTEP/4 R_SMOOTHSTEP/4 COSINE REVERSE_COSINE TRUE_CUBIC_HERMITE
TRUE_REVERSE_CUBIC_HERMITE FAKE_CUBIC_HERMITE FAKE_REVERSE_CUBIC_HERMITE ALL_A ALL_B""".split()

# Lines of hako-mikan/sd-webui-supermerger scripts/mbwpresets_master.txt (commit 0b1c4915), copied
# as published: BASE first, then IN00 … IN11, M00, OUT00 … OUT11.
SUPERMERGER_LINES = {
    "GRAD_V": "0,1,0.9166666667,0.8333333333,0.75,0.6666666667,0.5833333333,0.5,0.4166666667,0.3333333333,0.25,0.1666666667,0.0833333333,0,0.0833333333,0.1666666667,0.25,0.3333333333,0.4166666667,0.5,0.5833333333,0.6666666667,0.75,0.8333333333,0.9166666667,1.0",
    "WRAP16": "0,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1",
    "RING10_3": "0,0,0,0,0,0,0,1,1,1,1,1,0,0,0,1,1,1,1,1,0,0,0,0,0,0",
    "OUT12_5": "0,0,0,0,0,0,0,0,0,0,0,0,0,0.5,1,1,1,1,1,1,1,1,1,1,1,1",
    "SMOOTHSTEP*3": "0,0,0.0151909722222222,0.0590277777777778,0.12890625,0.222222222222222,0.336371527777778,0.46875,0.616753472222222,0.777777777777778,0.94921875,0.871527777777778,0.687065972222222,0.5,0.312934027777778,0.128472222222222,0.0507812500000004,0.222222222222222,0.383246527777778,0.53125,0.663628472222223,0.777777777777778,0.87109375,0.940972222222222,0.984809027777777,1",
    "R_SMOOTHSTEP/4": "0,1,0.925925925925926,0.740740740740741,0.5,0.259259259259259,0.0740740740740742,0.,0.0740740740740742,0.259259259259259,0.5,0.740740740740741,0.925925925925926,1.,0.925925925925926,0.740740740740741,0.5,0.259259259259259,0.0740740740740742,0.,0.0740740740740742,0.259259259259259,0.5,0.740740740740741,0.925925925925926,1",
    "ALL_A": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL_B": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
}

# What SuperMerger merges an sdxl model with for those lines: the first value is BASE
# (mergers.py smerge: `base_alpha = float(weights_a_t[0])`), the other 25 go through
# `weighttoxl` (`weight[:9] + weight[12:22]`). Written out by hand: BASE, IN00 … IN08, M00, OUT00 … OUT08.
SUPERMERGER_SDXL = {
    "GRAD_V": (0, 1, 0.9166666667, 0.8333333333, 0.75, 0.6666666667, 0.5833333333, 0.5, 0.4166666667, 0.3333333333,
               0, 0.0833333333, 0.1666666667, 0.25, 0.3333333333, 0.4166666667, 0.5, 0.5833333333, 0.6666666667, 0.75),
    "WRAP16": (0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "RING10_3": (0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0),
    "OUT12_5": (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "SMOOTHSTEP*3": (0, 0, 0.0151909722222222, 0.0590277777777778, 0.12890625, 0.222222222222222, 0.336371527777778,
                     0.46875, 0.616753472222222, 0.777777777777778, 0.5, 0.312934027777778, 0.128472222222222,
                     0.0507812500000004, 0.222222222222222, 0.383246527777778, 0.53125, 0.663628472222223,
                     0.777777777777778, 0.87109375),
    "R_SMOOTHSTEP/4": (0, 1, 0.925925925925926, 0.740740740740741, 0.5, 0.259259259259259, 0.0740740740740742, 0,
                       0.0740740740740742, 0.259259259259259, 1, 0.925925925925926, 0.740740740740741, 0.5,
                       0.259259259259259, 0.0740740740740742, 0, 0.0740740740740742, 0.259259259259259, 0.5),
    "ALL_B": (1,) * 20,
}  # fmt: skip


def as_line(preset: Preset) -> tuple[float, ...]:
    """A resolved preset as SuperMerger writes a weight list: BASE first."""
    return (preset.base, *preset.unet)


@pytest.mark.parametrize("name", list(SUPERMERGER_LINES))
def test_sd1_and_sd2_presets_are_supermergers_lines(name):
    published = tuple(float(v) for v in SUPERMERGER_LINES[name].split(","))
    for arch in (SD1, SD2):
        preset = find_preset(name, arch)
        assert preset is not None and preset.name == name
        assert as_line(preset) == published, (name, arch.name)


@pytest.mark.parametrize("name", list(SUPERMERGER_SDXL))
def test_sdxl_presets_are_what_supermerger_merges_with(name):
    preset = find_preset(name, SDXL)
    assert preset is not None and as_line(preset) == tuple(float(v) for v in SUPERMERGER_SDXL[name])


def test_every_preset_on_sdxl_is_weighttoxl_of_its_sd1_values_and_every_base_is_supermergers():
    assert len(PRESETS) == 38 and list(PRESETS) == SUPERMERGER_NAMES
    xl = presets_for(SDXL)
    assert list(xl) == list(PRESETS)
    for name, sd1 in PRESETS.items():
        # SuperMerger's own slicing, not the by-name rule that the code uses
        assert xl[name] == sd1[:9] + sd1[12:22], name
        assert find_preset(name, SDXL).unet == xl[name]
        assert PRESET_BASE[name] == (1.0 if name == "ALL_B" else 0.0), name
        assert find_preset(name, SD1).base == find_preset(name, SDXL).base == PRESET_BASE[name]
    # spot values: sdxl OUT08 is sd1 OUT08, not OUT11; the dropped blocks leave no trace
    assert xl["GRAD_V"][-1] == 0.75 and xl["WRAP08"] == (1.0,) * 4 + (0.0,) * 14 + (1.0,)
    assert xl["OUT07"] == (0.0,) * 15 + (1.0,) * 4  # sd1 OUT05 … OUT11 are 1: sdxl OUT05 … OUT08


def test_sd1_to_arch():
    values = [i / 24 for i in range(25)]
    assert sd1_to_arch(values, SD1) == sd1_to_arch(values, SD2) == tuple(values)
    xl = sd1_to_arch(values, SDXL)
    assert xl[8] == 8 / 24 and xl[9] == 12 / 24 and xl[10] == 13 / 24 and xl[18] == 21 / 24
    with pytest.raises(ValueError, match="expected 25 sd1 values, got 19"):
        sd1_to_arch(values[:19], SDXL)


def test_depth_resampling_on_request():
    for name, sd1 in PRESETS.items():
        depth = find_preset(name, SDXL, by_depth=True)
        values = depth.unet
        assert depth.name == name and depth.base == PRESET_BASE[name]
        assert len(values) == 19 == len(SDXL.unet_blocks), name
        assert (values[0], values[-1]) == (sd1[0], sd1[-1]), name
        assert values[9] == sd1[12], name  # M00 ← M00
        assert values[3] == sd1[4] and values[15] == sd1[20], name  # x = 4 and x = 20 are whole
        # sd1 and sd2 have the table's block count: depth changes nothing there
        assert find_preset(name, SD1, by_depth=True) == find_preset(name, SD1)
    assert find_preset("FLAT_25", SDXL, by_depth=True).unet == (0.25,) * 19
    # sdxl IN01 sits at x = 4/3: 2/3 of sd1 IN01 plus 1/3 of sd1 IN02
    g = PRESETS["GRAD_V"]
    depth = find_preset("GRAD_V", SDXL, by_depth=True).unet
    assert depth[1] == pytest.approx(g[1] + (g[2] - g[1]) / 3, abs=1e-12)
    assert depth[1] == 0.8888888889
    assert find_preset("WRAP08", SDXL, by_depth=True).unet == (1.0, 1.0, 1.0) + (0.0,) * 13 + (1.0, 1.0, 1.0)
    # the two rules disagree on most presets: only flat ones and OUT12 / OUT12_5 come out the same
    same = [n for n in PRESETS if find_preset(n, SDXL, by_depth=True).unet == presets_for(SDXL)[n]]
    assert same == ["FLAT_25", "FLAT_75", "OUT12", "OUT12_5", "ALL_A", "ALL_B"]


def test_resample_rule():
    assert resample([0.0, 1.0], 5) == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert resample((0, 10, 20), 3) == (0.0, 10.0, 20.0)
    assert resample([1.0, 0.0, 1.0], 2) == (1.0, 1.0)
    with pytest.raises(ValueError):
        resample([1.0], 3)
    with pytest.raises(ValueError):
        resample([1.0, 2.0], 1)


def test_find_preset():
    assert find_preset("GRAD_V", SD1) == Preset("GRAD_V", 0.0, PRESETS["GRAD_V"])
    assert find_preset(" reverse-smoothstep ", SD1) == Preset(
        "REVERSE-SMOOTHSTEP", 0.0, PRESETS["REVERSE-SMOOTHSTEP"]
    )
    preset = find_preset("r_smoothstep*3", SDXL)
    assert preset.name == "R_SMOOTHSTEP*3" and len(preset.unet) == 19
    assert find_preset("all_b", SDXL) == Preset("ALL_B", 1.0, (1.0,) * 19)
    assert find_preset("GRAD_X", SD1) is None
    assert find_preset("", SD1) is None
    assert find_preset("GRAD_V@depth", SDXL) is None  # the option is the block-weight grammar's
