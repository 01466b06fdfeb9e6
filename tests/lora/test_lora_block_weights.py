"""LoRA Block Weight vectors and presets as per-block LoRA strengths, and delegation to the merge grammar."""

from __future__ import annotations

import pytest

from mergeprobe.checkpoints.archs import SD1, SD2, SDXL
from mergeprobe.lora.lora_block_weights import (
    LBW_FORMS,
    LBW_PRESETS,
    lbw_presets_markdown,
    list_lbw_presets,
    resolve_lora_block_weights,
)
from mergeprobe.merging.blockspec import resolve_block_weights
from mergeprobe.service.errors import InvalidInput

SD1_17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [
    f"OUT{i:02d}" for i in range(3, 12)
]
SDXL_12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]


def error_of(value, arch, field="lora.weights") -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        resolve_lora_block_weights(value, arch, field=field)
    return info.value


def only(arch, ones: list[str], value: float = 1.0) -> dict[str, float]:
    """Every block 0 but `ones`."""
    return {b: (value if b in ones else 0.0) for b in arch.blocks}


def test_forms_are_the_extensions():
    assert list(LBW_FORMS[17]) == SD1_17
    assert list(LBW_FORMS[12]) == SDXL_12
    assert LBW_FORMS[26] == SD1.blocks
    assert LBW_FORMS[20] == SDXL.blocks


def test_preset_table_is_verbatim():
    assert list(LBW_PRESETS) == [
        "NONE",
        "ALL",
        "INS",
        "IND",
        "INALL",
        "MIDD",
        "OUTD",
        "OUTS",
        "OUTALL",
        "ALL0.5",
    ]
    assert all(len(v) == 17 for v in LBW_PRESETS.values())
    assert dict(list_lbw_presets())["MIDD"] == "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"
    assert dict(list_lbw_presets())["ALL0.5"] == ",".join(["0.5"] * 17)
    table = lbw_presets_markdown()
    assert "| OUTALL | 1 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 1 | 1 | 1 | 1 | 1 | 1 | 1 | 1 | 1 |" in table
    assert "sd-webui-lora-block-weight" in table


# Hand-computed from the extension's table: the 17-form names, every other block 0 (`to26`).
SD1_EXPECTED = {
    "NONE": only(SD1, []),
    "ALL": only(SD1, SD1_17),
    "INS": only(SD1, ["BASE", "IN01", "IN02", "IN04"]),
    "IND": only(SD1, ["BASE", "IN05", "IN07", "IN08"]),
    "INALL": only(SD1, ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08"]),
    "MIDD": only(SD1, ["BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06"]),
    "OUTD": only(SD1, ["BASE", "OUT03", "OUT04", "OUT05", "OUT06"]),
    "OUTS": only(SD1, ["BASE", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]),
    "OUTALL": only(SD1, ["BASE"] + [f"OUT{i:02d}" for i in range(3, 12)]),
    "ALL0.5": only(SD1, SD1_17, 0.5),
}
# On sdxl the same by-name placement: OUT09–OUT11 dropped, IN00/IN03/IN06/OUT00–OUT02 at 0.
SDXL_EXPECTED = {
    "NONE": only(SDXL, []),
    "ALL": only(SDXL, SD1_17),
    "INS": only(SDXL, ["BASE", "IN01", "IN02", "IN04"]),
    "IND": only(SDXL, ["BASE", "IN05", "IN07", "IN08"]),
    "INALL": only(SDXL, ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08"]),
    "MIDD": only(SDXL, ["BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06"]),
    "OUTD": only(SDXL, ["BASE", "OUT03", "OUT04", "OUT05", "OUT06"]),
    "OUTS": only(SDXL, ["BASE", "OUT07", "OUT08"]),
    "OUTALL": only(SDXL, ["BASE", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08"]),
    "ALL0.5": only(SDXL, SD1_17, 0.5),
}


@pytest.mark.parametrize("name", list(LBW_PRESETS))
def test_every_preset_sd1_sd2(name):
    warnings: list[str] = []
    got = resolve_lora_block_weights(name, SD1, field="w", warnings=warnings)
    assert list(got) == list(SD1.blocks)
    assert got == SD1_EXPECTED[name]
    assert warnings == []
    assert resolve_lora_block_weights(name, SD2, field="w") == SD1_EXPECTED[name]


@pytest.mark.parametrize("name", list(LBW_PRESETS))
def test_every_preset_sdxl(name):
    warnings: list[str] = []
    got = resolve_lora_block_weights(name, SDXL, field="w", warnings=warnings)
    assert list(got) == list(SDXL.blocks)
    assert got == SDXL_EXPECTED[name]
    assert len(warnings) == 1 and "OUT00, OUT01, OUT02 get 0" in warnings[0]
    assert "OUT09, OUT10, OUT11 dropped" in warnings[0]


def test_preset_names_any_case_and_spaces():
    assert resolve_lora_block_weights(" outall ", SD1, field="w") == SD1_EXPECTED["OUTALL"]
    assert resolve_lora_block_weights("all0.5", SD1, field="w") == SD1_EXPECTED["ALL0.5"]


def test_vector_17_sd1():
    text = "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"
    got = resolve_lora_block_weights(text, SD1, field="w")
    assert got == SD1_EXPECTED["OUTALL"]
    values = [round(0.05 * i, 2) for i in range(17)]
    got = resolve_lora_block_weights(values, SD1, field="w")
    assert [got[b] for b in SD1_17] == values
    assert [got[b] for b in ("IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02")] == [
        0.0
    ] * 9


def test_vector_strings_with_spaces():
    text = " 1 , 0,0 ,0, 0,0,0,0 ,1,1,1,1 , 1,1,1,1,1 "
    assert resolve_lora_block_weights(text, SD1, field="w") == SD1_EXPECTED["OUTALL"]
    text12 = " 0.5, 1 ,1,1,1, 1,  1,1,1,1,1,1"
    got = resolve_lora_block_weights(text12, SDXL, field="w")
    assert got == {**only(SDXL, SDXL_12), "BASE": 0.5}


def test_vector_26_sd1_and_20_sdxl():
    values = [i / 25 for i in range(26)]
    got = resolve_lora_block_weights(values, SD1, field="w")
    assert list(got.values()) == values
    assert got == resolve_block_weights(values, SD1, field="w")
    text = ",".join(str(v) for v in values)
    assert resolve_lora_block_weights(text, SD2, field="w") == got
    values20 = [i / 19 for i in range(20)]
    got = resolve_lora_block_weights(values20, SDXL, field="w")
    assert list(got.values()) == values20
    assert got == resolve_block_weights(values20, SDXL, field="w")


def test_vector_12_sdxl():
    values = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]
    got = resolve_lora_block_weights(values, SDXL, field="w")
    assert [got[b] for b in SDXL_12] == values
    assert [got[b] for b in ("IN00", "IN01", "IN02", "IN03", "IN06", "OUT06", "OUT07", "OUT08")] == [0.0] * 8


def test_number():
    assert resolve_lora_block_weights(0.7, SDXL, field="w") == dict.fromkeys(SDXL.blocks, 0.7)
    assert resolve_lora_block_weights(" 0.25 ", SD1, field="w") == dict.fromkeys(SD1.blocks, 0.25)
    assert resolve_lora_block_weights(1, SD1, field="w")["BASE"] == 1.0


def test_wrong_lengths():
    e = error_of([1.0] * 12, SD1)
    assert e.field == "lora.weights"
    assert e.detail.startswith("expected 17, 25, 26 values for sd1")
    assert "(a 12-value vector is LoRA Block Weight's form for sdxl)" in e.detail
    e = error_of(",".join(["1"] * 17), SDXL, field="a.b")
    assert e.field == "a.b" and e.position == len(",".join(["1"] * 17))
    assert e.detail.startswith("expected 12, 19, 20, 25, 26 values for sdxl")
    assert "BASE, IN04, IN05, IN07, IN08, M00, OUT00, OUT01, OUT02, OUT03, OUT04, OUT05" in e.detail
    assert "LoRA Block Weight's form for sd1, sd2" in e.detail
    e = error_of("1,0,1", SD1)
    assert e.detail.endswith("got 3") and e.position == 5
    text = ",".join(["1"] * 27)
    e = error_of(text, SD1)
    assert e.position == 52 and e.detail.endswith("got 27")


def test_bad_number_positions():
    text = "1,0,0,0,0,0,0,0,1,1,1,1,1,1,abc,1,1"
    e = error_of(text, SD1)
    assert (e.field, e.position, e.detail) == (
        "lora.weights",
        text.index("abc"),
        "value `abc` is not a number",
    )
    e = error_of("1,0,0,0,0,0,0,0,1,1,1,1,1,1,,1,1", SD1)
    assert (e.position, e.detail) == (28, "missing value")
    e = error_of([1.0] * 16 + [float("nan")], SD1)
    assert e.field == "lora.weights[16]"
    e = error_of([1.0] * 16 + [True], SD1)
    assert e.field == "lora.weights[16]"


@pytest.mark.parametrize("token", ["R", "U", "X", "X+0.5", "X-1"])
def test_random_and_variable_values_refused(token):
    text = "1,0,0,0,0,0,0,0," + token + ",1,1,1,1,1,1,1,1"
    e = error_of(text, SD1)
    assert e.position == 16
    assert "not supported" in e.detail and "recipe must give the same merge" in e.detail
    e = error_of([1.0] * 8 + [token] + [1.0] * 8, SD1)
    assert e.field == "lora.weights[8]" and "not supported" in e.detail
    assert error_of(f"  {token}", SD1).position == 2


def test_delegates_to_resolve_block_weights():
    values = [i / 24 for i in range(25)]
    got = resolve_lora_block_weights(values, SD1, field="w")
    merge = resolve_block_weights(values, SD1, field="w")
    assert merge["BASE"] is None
    assert got == {**merge, "BASE": 1.0}

    spec = "IN00-IN03:0.3, _:0.7"
    got = resolve_lora_block_weights(spec, SD1, field="w")
    assert got == {**resolve_block_weights(spec, SD1, field="w"), "BASE": 1.0}
    spec = "BASE:0, IN00-IN03:0.3, _:0.7"
    assert resolve_lora_block_weights(spec, SDXL, field="w") == resolve_block_weights(spec, SDXL, field="w")

    assert resolve_lora_block_weights("GRAD_V", SD1, field="w") == resolve_block_weights(
        "GRAD_V", SD1, field="w"
    )
    assert resolve_lora_block_weights("OUT07", SD1, field="w") == resolve_block_weights(
        "OUT07", SD1, field="w"
    )
    # a 19-value sdxl list and SuperMerger's 26-value sd1 list on sdxl, with its warning
    assert resolve_lora_block_weights([0.5] * 19, SDXL, field="w") == dict.fromkeys(SDXL.blocks, 0.5) | {
        "BASE": 1.0
    }
    warnings: list[str] = []
    got = resolve_lora_block_weights([0.25] * 26, SDXL, field="w", warnings=warnings)
    assert got == dict.fromkeys(SDXL.blocks, 0.25) and len(warnings) == 1


def test_delegated_errors_keep_their_positions():
    e = error_of("IN00-IN03:0.3, M00:x, _:1", SD1)
    assert e.position == 19
    e = error_of("IN00-IN03:0.3", SD1)
    assert "no weight for" in e.detail


def test_unknown_names_and_types():
    e = error_of("  OUTAL", SD1)
    assert e.position == 2 and "did you mean OUTALL?" in e.detail and "NONE, ALL" in e.detail
    e = error_of(None, SD1)
    assert e.field == "lora.weights" and "LoRA Block Weight" in e.detail
    e = error_of(float("inf"), SD1)
    assert e.field == "lora.weights"
