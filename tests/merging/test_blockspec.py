"""The block-set, sampler-step and block-weight grammars, every rule and every error position."""

from __future__ import annotations

import sys

import pytest

from mergeprobe.checkpoints.archs import SD1, SD2, SDXL
from mergeprobe.merging.blockspec import (
    describe_blocks,
    format_blocks,
    parse_block_set,
    parse_block_words,
    parse_number,
    parse_steps,
    resolve_block_weights,
)
from mergeprobe.merging.presets import PRESETS
from mergeprobe.service.errors import MergeprobeError
from mergeprobe.service.problems import Problem
from mergeprobe.service.problems import problem_of as as_problem

SD1_UNET = list(SD1.unet_blocks)
SDXL_UNET = list(SDXL.unet_blocks)


def problem_of(fn, *args, **kwargs) -> Problem:
    """The problem the client is shown for the domain error the call raises."""
    with pytest.raises(MergeprobeError) as info:
        fn(*args, **kwargs)
    p = as_problem(info.value)
    assert (p.status, p.slug, p.title) == (400, "invalid-spec", "Invalid spec")
    return p


def test_pure_python_no_torch():
    for name in (
        "mergeprobe.merging.blockspec",
        "mergeprobe.merging.presets",
        "mergeprobe.merging.elemental",
    ):
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        source = open(module.__file__, encoding="utf-8").read()
        assert "import torch" not in source and "from torch" not in source


# --- block sets --------------------------------------------------------------------------------------


def test_stepped_range_expansion_sd1():
    assert parse_block_set("IN00-OUT11(+2)", SD1, field="blocks") == [
        "IN00", "IN02", "IN04", "IN06", "IN08", "IN10", "M00",
        "OUT01", "OUT03", "OUT05", "OUT07", "OUT09", "OUT11",
    ]  # fmt: skip


def test_single_list_and_range_crossing_m00():
    assert parse_block_set("IN00", SD1, field="b") == ["IN00"]
    assert parse_block_set("IN00, IN01, M00", SD1, field="b") == ["IN00", "IN01", "M00"]
    assert parse_block_set("IN10-OUT01", SD1, field="b") == ["IN10", "IN11", "M00", "OUT00", "OUT01"]
    assert parse_block_set("IN00-OUT11", SD1, field="b") == SD1_UNET
    assert parse_block_set("M00-M00", SD1, field="b") == ["M00"]
    assert parse_block_set("IN03-IN09(+3)", SD1, field="b") == ["IN03", "IN06", "IN09"]
    assert parse_block_set("IN00-IN02(+7)", SD1, field="b") == ["IN00"]


def test_case_whitespace_order_and_duplicates():
    assert parse_block_set("  out01 ,in00,  m00 ", SD1, field="b") == ["IN00", "M00", "OUT01"]
    assert parse_block_set("IN00 - IN02 ( + 2 ) , in2", SD1, field="b") == ["IN00", "IN02"]
    assert parse_block_set("OUT00, IN05, IN05, IN04-IN06", SD1, field="b") == [
        "IN04",
        "IN05",
        "IN06",
        "OUT00",
    ]
    # leading zero optional, M0 = M00
    assert parse_block_set("in5, M0, out1", SD1, field="b") == ["IN05", "M00", "OUT01"]


def test_sdxl_names_and_expansion():
    assert parse_block_set("IN00-OUT08", SDXL, field="b") == SDXL_UNET
    assert parse_block_set("IN07-OUT01", SDXL, field="b") == ["IN07", "IN08", "M00", "OUT00", "OUT01"]
    assert parse_block_set("IN00-OUT08(+3)", SDXL, field="b") == [
        "IN00",
        "IN03",
        "IN06",
        "M00",
        "OUT02",
        "OUT05",
        "OUT08",
    ]
    assert parse_block_set("IN00-OUT11", SD2, field="b") == SD1_UNET


def test_base_only_when_allowed():
    assert parse_block_set("OUT00, base, IN00", SD1, field="b", allow_base=True) == ["BASE", "IN00", "OUT00"]
    p = problem_of(parse_block_set, "IN00, BASE", SD1, field="b")
    assert p.position == 6 and p.field == "b"
    assert p.detail == (
        "BASE (text encoders, VAE) is not a U-Net block; this field takes U-Net blocks only (IN00–IN11, M00, OUT00–OUT11)"
    )
    p = problem_of(parse_block_set, "BASE-IN03", SD1, field="b", allow_base=True)
    assert p.position == 0 and "cannot be part of a range" in p.detail
    p = problem_of(parse_block_set, "IN00-BASE", SD1, field="b", allow_base=True)
    assert p.position == 5


@pytest.mark.parametrize(
    ("spec", "arch", "position", "detail"),
    [
        ("IN99", SD1, 0, "unknown block IN99 (sd1 blocks: IN00–IN11, M00, OUT00–OUT11)"),
        ("IN00, FOO", SD1, 6, "unknown block FOO (sd1 blocks: IN00–IN11, M00, OUT00–OUT11)"),
        ("IN12", SD1, 0, "unknown block IN12 (sd1 blocks: IN00–IN11, M00, OUT00–OUT11)"),
        ("IN00, IN11", SDXL, 6, "sdxl has no block IN11 (IN00–IN08, M00, OUT00–OUT08)"),
        ("IN00-OUT11", SDXL, 5, "sdxl has no block OUT11 (IN00–IN08, M00, OUT00–OUT08)"),
        (
            "IN00, OUT03-IN02",
            SD1,
            6,
            "reversed range OUT03-IN02: OUT03 comes after IN02 in U-Net order (write IN02-OUT03)",
        ),
        ("IN00-OUT11(+0)", SD1, 10, "step must be `(+N)` with N a whole number of 1 or more, got `(+0)`"),
        ("IN00-OUT11(+1.5)", SD1, 10, "step must be `(+N)` with N a whole number of 1 or more, got `(+1.5)`"),
        ("IN00-OUT11(2)", SD1, 10, "step must be `(+N)` with N a whole number of 1 or more, got `(2)`"),
        ("IN00-OUT11(-2)", SD1, 10, "step must be `(+N)` with N a whole number of 1 or more, got `(-2)`"),
        ("IN00-OUT11(+2", SD1, 10, "unclosed `(` in `IN00-OUT11(+2`"),
        ("IN00(+2)", SD1, 4, "a step `(+N)` needs a range, as in `IN00-…(+2)`"),
        ("IN00,,IN01", SD1, 5, "empty item: name a block between the commas"),
        ("IN00, ,IN01", SD1, 6, "empty item: name a block between the commas"),
        ("IN00,", SD1, 5, "empty item: name a block between the commas"),
        ("", SD1, 0, "empty block list: name at least one block (`IN00`, `IN00, M00`, `IN00-OUT11(+2)`)"),
        ("   ", SD1, 0, "empty block list: name at least one block (`IN00`, `IN00, M00`, `IN00-OUT11(+2)`)"),
        ("IN00 IN01", SD1, 5, "unexpected `IN01` after IN00 in `IN00 IN01`"),
        ("IN00-", SD1, 5, "range `IN00-` has no end block"),
        ("IN00-*", SD1, 5, "expected the block that ends the range, got `*`"),
        ("IN00-IN03(+1) x", SD1, 14, "unexpected `x` after `IN00-IN03(+1)`"),
        ("IN00; IN01", SD1, 4, "unexpected `; IN01` after IN00 in `IN00; IN01`"),
        ("*IN00", SD1, 0, "expected a block, got `*IN00`"),
    ],
)
def test_block_set_errors(spec, arch, position, detail):
    p = problem_of(parse_block_set, spec, arch, field="probe.blocks")
    assert (p.field, p.position, p.detail) == ("probe.blocks", position, detail)


def test_block_set_offset_and_type():
    p = problem_of(parse_block_set, "IN00, FOO", SD1, field="x", offset=100)
    assert p.position == 106
    assert problem_of(parse_block_set, ["IN00"], SD1, field="x").position is None


def test_block_words():
    assert parse_block_words("OUT05 OUT03  out04", SD1, field="e") == ["OUT03", "OUT04", "OUT05"]
    assert parse_block_words("BASE IN00-IN04(+2) M00", SD1, field="e") == [
        "BASE",
        "IN00",
        "IN02",
        "IN04",
        "M00",
    ]
    assert parse_block_words("   ", SD1, field="e") == []
    p = problem_of(parse_block_words, "OUT03 OUT99", SD1, field="e", offset=10)
    assert (p.position, p.detail) == (
        16,
        "unknown block OUT99 (sd1 blocks: BASE, IN00–IN11, M00, OUT00–OUT11)",
    )
    p = problem_of(parse_block_words, "IN00 IN00 - IN03", SD1, field="e")
    assert p.position == 10  # no spaces inside a range here: `-` is a word of its own


def test_describe_and_format():
    assert describe_blocks(SDXL) == "IN00–IN08, M00, OUT00–OUT08"
    assert describe_blocks(SD1, with_base=True) == "BASE, IN00–IN11, M00, OUT00–OUT11"
    assert (
        format_blocks(["OUT00", "IN03", "IN04", "IN05", "BASE", "M00", "IN11"], SD1)
        == "BASE, IN03-IN05, IN11-OUT00"
    )


# --- sampler steps -----------------------------------------------------------------------------------


def test_steps():
    assert parse_steps("1,5-20(+5)", 20, field="steps") == [1, 5, 10, 15, 20]
    assert parse_steps("", 4, field="steps") == [1, 2, 3, 4]
    assert parse_steps("  ", 3, field="steps") == [1, 2, 3]
    assert parse_steps(None, 2, field="steps") == [1, 2]
    assert parse_steps("7, 3, 3, 1-2", 10, field="steps") == [1, 2, 3, 7]
    assert parse_steps(" 2 - 9 ( +3 )", 10, field="steps") == [2, 5, 8]
    assert parse_steps("4-4", 4, field="steps") == [4]
    with pytest.raises(ValueError):
        parse_steps("1", 0, field="steps")


@pytest.mark.parametrize(
    ("spec", "position", "detail"),
    [
        ("0", 0, "steps count from 1; 0 is not a step"),
        ("1, 0-3", 3, "steps count from 1; 0 is not a step"),
        ("1,21", 2, "step 21 is beyond total_steps 20"),
        ("5-25", 2, "step 25 is beyond total_steps 20"),
        ("3, 10-5", 3, "reversed range 10-5 (write 5-10)"),
        ("1-5(+0)", 3, "step must be `(+N)` with N a whole number of 1 or more, got `(+0)`"),
        ("1-5(+x)", 3, "step must be `(+N)` with N a whole number of 1 or more, got `(+x)`"),
        ("a", 0, "expected a step, got `a`"),
        ("1.5", 1, "unexpected `.5` after 1 in `1.5`"),
        ("-3", 0, "expected a step, got `-3`"),
        ("1,,2", 2, "empty item: name a step between the commas"),
        ("2,", 2, "empty item: name a step between the commas"),
    ],
)
def test_step_errors(spec, position, detail):
    p = problem_of(parse_steps, spec, 20, field="probe.steps")
    assert (p.field, p.position, p.detail) == ("probe.steps", position, detail)


# --- numbers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", 1.0), (" -0.5 ", -0.5), (".5", 0.5), ("2.", 2.0), ("1e-3", 0.001), ("+1.5", 1.5)],
)
def test_numbers(text, value):
    assert parse_number(text, field="x") == value


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1_000", "0x10", "1+1", "1,5", "٣", "1e999"])
def test_bad_numbers(text):
    problem_of(parse_number, text, field="x")


# --- block weights -----------------------------------------------------------------------------------


def test_weight_number_and_lists():
    w = resolve_block_weights(0.3, SD1, field="alpha")
    assert list(w) == list(SD1.blocks) and w["BASE"] is None and set(list(w.values())[1:]) == {0.3}
    assert resolve_block_weights(1, SDXL, field="alpha")["OUT08"] == 1.0

    values = [i / 24 for i in range(25)]
    w = resolve_block_weights(values, SD1, field="alpha")
    assert w["BASE"] is None and [w[b] for b in SD1_UNET] == values
    w = resolve_block_weights([0.9, *values], SD1, field="alpha")
    assert w["BASE"] == 0.9 and w["OUT11"] == 1.0 and w["M00"] == 0.5

    w = resolve_block_weights(tuple(range(19)), SDXL, field="alpha")
    assert w["BASE"] is None and w["M00"] == 9.0 and w["OUT08"] == 18.0
    w = resolve_block_weights([-1, *range(19)], SDXL, field="alpha")
    assert w["BASE"] == -1.0 and w["IN00"] == 0.0


def test_weight_list_errors():
    p = problem_of(resolve_block_weights, [0.5] * 24, SD1, field="alpha")
    assert p.field == "alpha" and p.position is None
    assert p.detail == "expected 25 weights (IN00…OUT11 in U-Net order) or 26 (BASE first) for sd1, got 24"
    p = problem_of(resolve_block_weights, [0.5] * 24, SDXL, field="alpha")
    assert p.detail == (
        "expected 19 weights (IN00…OUT08 in U-Net order) or 20 (BASE first) for sdxl, "
        "or 25 / 26 sd1 values (converted as SuperMerger's weighttoxl does), got 24"
    )
    p = problem_of(resolve_block_weights, [0.5] * 27, SDXL, field="alpha")
    assert p.detail.endswith("got 27")
    values26: list = [0.5] * 26
    values26[25] = "x"
    assert problem_of(resolve_block_weights, values26, SDXL, field="alpha").field == "alpha[25]"
    values: list = [0.5] * 25
    values[3] = "0.5"
    assert problem_of(resolve_block_weights, values, SD1, field="alpha").field == "alpha[3]"
    values[3] = True
    assert problem_of(resolve_block_weights, values, SD1, field="alpha").field == "alpha[3]"
    values[3] = float("nan")
    assert problem_of(resolve_block_weights, values, SD1, field="alpha").field == "alpha[3]"
    for bad in (True, None, {"IN00": 1}, float("inf")):
        assert problem_of(resolve_block_weights, bad, SD1, field="alpha").field == "alpha"


def test_weight_number_strings():
    text = ",".join(str(i / 24) for i in range(25))
    w = resolve_block_weights(text, SD1, field="alpha")
    assert w["BASE"] is None and w["OUT11"] == 1.0 and w["IN00"] == 0.0
    w = resolve_block_weights("1," + text, SD1, field="alpha")
    assert w["BASE"] == 1.0
    w = resolve_block_weights(" , ".join(["0.5"] * 20), SDXL, field="alpha")
    assert w["BASE"] == 0.5 and w["OUT08"] == 0.5
    w = resolve_block_weights(" 0.25 ", SDXL, field="alpha")
    assert w["BASE"] is None and w["IN00"] == 0.25

    p = problem_of(resolve_block_weights, "0,1", SD1, field="alpha")
    assert p.position == 3
    assert p.detail == "expected 25 weights (IN00…OUT11 in U-Net order) or 26 (BASE first) for sd1, got 2"
    p = problem_of(resolve_block_weights, ",".join(["1"] * 27), SD1, field="alpha")
    assert p.position == 52 and p.detail.endswith("got 27")
    p = problem_of(resolve_block_weights, "0,0.5,abc", SD1, field="alpha")
    assert (p.position, p.detail) == (6, "value `abc` is not a number")
    p = problem_of(resolve_block_weights, "0,,1", SD1, field="alpha")
    assert (p.position, p.detail) == (2, "missing value")
    p = problem_of(resolve_block_weights, "0,nan", SD1, field="alpha")
    assert p.position == 2


def test_weight_presets():
    w = resolve_block_weights("GRAD_V", SD1, field="alpha")
    # SuperMerger's GRAD_V line starts with BASE 0
    assert w["BASE"] == 0.0 and [w[b] for b in SD1_UNET] == list(PRESETS["GRAD_V"])
    assert resolve_block_weights("grad_v", SD1, field="alpha") == w
    assert resolve_block_weights(" FLAT_25 ", SD1, field="alpha")["M00"] == 0.25
    # OUT07 is a preset, not a block spec
    assert [resolve_block_weights("OUT07", SD1, field="a")[b] for b in ("OUT05", "OUT06")] == [1.0, 1.0]
    assert resolve_block_weights("ALL_B", SD2, field="alpha")["BASE"] == 1.0  # ALL_B's line starts with 1
    # sdxl: SuperMerger's weighttoxl, each sdxl block the sd1 block of its name
    w = resolve_block_weights("smoothstep*2", SDXL, field="alpha")
    assert len(w) == 20 and w["BASE"] == 0.0 and w["IN00"] == 0.0 and w["M00"] == 1.0
    assert w["IN08"] == 0.518518518518519 and w["OUT08"] == 0.0859375  # sd1 IN08, sd1 OUT08
    p = problem_of(resolve_block_weights, "GRAD_X", SD1, field="alpha")
    assert p.position == 0 and p.detail.endswith("did you mean the preset GRAD_V?")


def test_weight_presets_by_depth():
    # the curve over U-Net depth: sdxl OUT08 at the sd1 curve's end (OUT11), IN01 between sd1 IN01 and IN02
    w = resolve_block_weights("smoothstep*2@depth", SDXL, field="alpha")
    assert w["BASE"] == 0.0 and w["M00"] == 1.0 and w["OUT08"] == 0.0 and w["IN03"] == 0.148148148148148
    w = resolve_block_weights(" GRAD_V @ Depth ", SDXL, field="alpha")
    assert w["IN01"] == 0.8888888889 and w["OUT08"] == 1.0
    assert resolve_block_weights("ALL_B@depth", SDXL, field="alpha")["BASE"] == 1.0
    # sd1 and sd2 have the table's 25 blocks: the same values either way
    assert resolve_block_weights("GRAD_V@depth", SD1, field="alpha") == resolve_block_weights(
        "GRAD_V", SD1, field="alpha"
    )
    p = problem_of(resolve_block_weights, "GRAD_V@names", SDXL, field="alpha")
    assert p.position == 6 and p.detail.startswith("unknown preset option `@names`")
    p = problem_of(resolve_block_weights, "  GRAD_X@depth", SDXL, field="alpha")
    assert p.position == 2 and p.detail.startswith("`GRAD_X` is not a preset name")
    assert p.detail.endswith("did you mean the preset GRAD_V?")
    p = problem_of(resolve_block_weights, "@depth", SDXL, field="alpha")
    assert p.position == 0 and p.detail.startswith("`@depth` must follow a preset name")
    assert problem_of(resolve_block_weights, "IN00:1@depth", SDXL, field="alpha").position == 0


def test_sd1_lists_on_sdxl_convert_as_supermerger():
    # SuperMerger's own format: BASE first, then sd1's IN00 … OUT11 (here 0, 1/24, …, 1)
    sd1 = [i / 24 for i in range(25)]
    warnings: list[str] = []
    w = resolve_block_weights([0.3, *sd1], SDXL, field="alpha", warnings=warnings)
    assert w["BASE"] == 0.3
    assert [w[b] for b in SDXL_UNET] == sd1[:9] + sd1[12:22]  # weighttoxl: weight[:9] + weight[12:22]
    assert w["M00"] == 0.5 and w["OUT08"] == 21 / 24
    assert warnings == [
        "alpha: 26 sd1 values (BASE first) converted to sdxl as SuperMerger's weighttoxl does: each sdxl "
        "block takes the sd1 block of the same name (IN00–IN08, M00, OUT00–OUT08); dropped IN09=0.375, "
        "IN10=0.416667, IN11=0.458333, OUT09=0.916667, OUT10=0.958333, OUT11=1"
    ]
    # 25 values: no BASE; a string works the same
    warnings.clear()
    text = ",".join(str(v) for v in sd1)
    w = resolve_block_weights(text, SDXL, field="beta", warnings=warnings)
    assert w["BASE"] is None and w["IN08"] == 8 / 24 and w["OUT00"] == 13 / 24
    assert len(warnings) == 1 and warnings[0].startswith("beta: 25 sd1 values converted to sdxl")
    # without a list to report to, the conversion still happens
    assert resolve_block_weights(sd1, SDXL, field="alpha")["OUT08"] == 21 / 24
    # lists that fit the architecture say nothing
    warnings.clear()
    resolve_block_weights([0.3, *sd1], SD1, field="alpha", warnings=warnings)
    resolve_block_weights([0.5] * 20, SDXL, field="alpha", warnings=warnings)
    assert warnings == []
    p = problem_of(resolve_block_weights, ",".join(["1"] * 27), SDXL, field="alpha")
    assert p.position == 52 and p.detail.endswith("got 27")


def test_weight_spec():
    w = resolve_block_weights("IN00-IN05:0.2, M00:1, OUT00-OUT11(+2):0.7, _:0.5", SD1, field="alpha")
    assert w["BASE"] is None
    assert [w[f"IN{i:02d}"] for i in range(12)] == [0.2] * 6 + [0.5] * 6
    assert w["M00"] == 1.0
    assert [w[f"OUT{i:02d}"] for i in range(12)] == [0.7, 0.5] * 6


def test_weight_spec_later_wins_and_default_anywhere():
    w = resolve_block_weights(
        "default:0, IN00-OUT11:0.3, IN05:0.9, IN03-IN06:-0.5, BASE:1.5", SD1, field="alpha"
    )
    assert w["BASE"] == 1.5
    assert [w[b] for b in ("IN02", "IN03", "IN05", "IN06", "IN07")] == [0.3, -0.5, -0.5, -0.5, 0.3]
    w = resolve_block_weights("_:0.25, M00:1, _:0.75", SD1, field="alpha")
    assert w["M00"] == 1.0 and w["IN00"] == 0.75 and w["BASE"] is None  # `_` never sets BASE
    w = resolve_block_weights("in00 - out08 : 1e-1", SDXL, field="alpha")
    assert set(w.values()) == {None, 0.1}
    w = resolve_block_weights("IN00-OUT11(+2):1, IN01-OUT10(+2):0", SD1, field="alpha")
    assert [w[b] for b in SD1_UNET] == [1.0, 0.0] * 6 + [1.0] + [0.0, 1.0] * 6


@pytest.mark.parametrize(
    ("spec", "position", "detail"),
    [
        ("IN00-IN05:0.2, M00:1", None, "no weight for IN06-IN11, OUT00-OUT11 (add `_:<ratio>` for the rest)"),
        (
            "IN00-OUT11(+2):1",
            None,
            "no weight for IN01, IN03, IN05, IN07, IN09, IN11, OUT00, OUT02, OUT04, OUT06, OUT08, OUT10 (add `_:<ratio>` for the rest)",
        ),
        ("BASE:1, IN00-OUT10:1", None, "no weight for OUT11 (add `_:<ratio>` for the rest)"),
        ("IN00:0.5, IN99:1, _:0", 10, "unknown block IN99 (sd1 blocks: BASE, IN00–IN11, M00, OUT00–OUT11)"),
        (
            "_:0, OUT03-IN02:1",
            5,
            "reversed range OUT03-IN02: OUT03 comes after IN02 in U-Net order (write IN02-OUT03)",
        ),
        ("_:0, IN00-IN04(+0):1", 14, "step must be `(+N)` with N a whole number of 1 or more, got `(+0)`"),
        ("_:0, IN00:nan", 10, "ratio `nan` is not a number"),
        ("_:0, IN00:inf", 10, "ratio `inf` is not a number"),
        ("_:0, IN00:1e400", 10, "ratio `1e400` is out of range"),
        ("_:0, IN00:1/2", 10, "ratio `1/2` is not a number"),
        ("_:0, IN00:", 10, "missing ratio"),
        ("_:0, IN00 0.5", 5, "entry `IN00 0.5` has no `:RATIO` (write `BLOCKS:RATIO`)"),
        ("_:0, IN00:1:2", 11, "entry `IN00:1:2` has more than one `:`"),
        ("_:0,, IN00:1", 4, "empty entry: write `BLOCKS:RATIO` between the commas"),
        ("_:0, IN00:1,", 12, "empty entry: write `BLOCKS:RATIO` between the commas"),
        ("_:0,  :1", 6, "entry `:1` names no block (use `_:RATIO` for every block not named elsewhere)"),
        ("_:0, IN00, IN01:1", 5, "entry `IN00` has no `:RATIO` (write `BLOCKS:RATIO`)"),
        ("_:0, IN00 IN01:1", 10, "unexpected `IN01` after IN00 in `IN00 IN01`"),
        ("IN00-IN05", 0, "entry `IN00-IN05` has no `:RATIO` (write `BLOCKS:RATIO`)"),
        ("", 0, "empty weight spec"),
    ],
)
def test_weight_spec_errors(spec, position, detail):
    p = problem_of(resolve_block_weights, spec, SD1, field="merge.alpha")
    assert (p.field, p.position, p.detail) == ("merge.alpha", position, detail)


def test_weight_spec_sdxl_names():
    w = resolve_block_weights("IN00-IN08:0, M00:0.5, OUT00-OUT08:1", SDXL, field="alpha")
    assert list(w) == ["BASE", *SDXL_UNET] and w["IN08"] == 0.0 and w["OUT00"] == 1.0
    p = problem_of(resolve_block_weights, "_:0, OUT09:1", SDXL, field="alpha")
    assert (p.position, p.detail) == (5, "sdxl has no block OUT09 (BASE, IN00–IN08, M00, OUT00–OUT08)")


def test_format_blocks_short_runs():
    assert format_blocks(["IN00", "IN01", "OUT11"], SD1) == "IN00, IN01, OUT11"
    assert format_blocks([], SD1) == ""
