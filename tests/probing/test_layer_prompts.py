"""Per-block prompts `(~: spec: text; … :~)`: resolution, plain(), warnings and every error position."""

from __future__ import annotations

import pytest

from mergeprobe.checkpoints.archs import SD1, SD2, SDXL
from mergeprobe.probing.layer_prompts import LayerPrompt, distinct_prompts, parse_layer_prompt
from mergeprobe.service.errors import MergeprobeError
from mergeprobe.service.problems import Problem
from mergeprobe.service.problems import problem_of as as_problem

EXAMPLE = "a (~: IN00-OUT11: cute; M00: excellent :~) girl"


def parse(text: str, arch=SD1, field: str = "prompt") -> LayerPrompt:
    return parse_layer_prompt(text, arch, field=field)


def problem_of(text: str, arch=SD1, field: str = "prompt") -> Problem:
    """The problem the client is shown for the domain error the call raises."""
    with pytest.raises(MergeprobeError) as info:
        parse(text, arch, field)
    p = as_problem(info.value)
    assert (p.status, p.slug, p.field) == (400, "invalid-spec", field)
    return p


def test_pure_python_no_torch():
    import mergeprobe.probing.layer_prompts as module

    source = open(module.__file__, encoding="utf-8").read()
    assert "import torch" not in source and "from torch" not in source


def test_issue_example_exactly():
    lp = parse(EXAMPLE)
    resolved = lp.resolve()
    assert list(resolved) == list(SD1.unet_blocks)
    assert resolved["M00"] == "a excellent girl"
    assert all(v == "a cute girl" for b, v in resolved.items() if b != "M00")
    assert lp.has_groups
    assert distinct_prompts(resolved) == ["a cute girl", "a excellent girl"]
    assert lp.warnings() == []


def test_readme_spacing_variant_gives_the_same_prompts():
    # The reference README writes `cute ;` — the text is stripped at both ends.
    assert parse("a (~: IN00-OUT11: cute ; M00: excellent :~) girl").resolve() == parse(EXAMPLE).resolve()
    assert parse("a (~:IN00-OUT11:cute;M00:excellent;:~) girl").resolve() == parse(EXAMPLE).resolve()


def test_inner_whitespace_and_colons_in_text_are_kept():
    r = parse("x (~: M00:  very   cute, (girl:1.2)  :~)").resolve()
    assert r["M00"] == "x very   cute, (girl:1.2)"
    assert r["IN01"] == "x "


def test_readme_examples():
    r = parse("(~: IN00: A ; IN01: B :~)").resolve()
    assert (r["IN00"], r["IN01"], r["IN02"], r["OUT11"]) == ("A", "B", "", "")
    r = parse("(~: IN00: A ; IN01: B ; IN02: C ; _ : D :~)").resolve()
    assert (r["IN00"], r["IN01"], r["IN02"], r["M00"], r["OUT11"]) == ("A", "B", "C", "D", "D")
    r = parse("(~: IN00,IN01: A ; M00 : B :~)").resolve()
    assert (r["IN00"], r["IN01"], r["M00"], r["IN02"]) == ("A", "A", "B", "")
    r = parse("(~: IN00-OUT11(+2): A :~)").resolve()
    assert [b for b, v in r.items() if v == "A"] == [
        "IN00", "IN02", "IN04", "IN06", "IN08", "IN10", "M00",
        "OUT01", "OUT03", "OUT05", "OUT07", "OUT09", "OUT11",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "text",
    ["(~: _: D; M00: B :~)", "(~: M00: B; _: D :~)", "(~: M00: B; _: X; OUT00: C; _: D :~)"],
)
def test_fallback_wherever_it_stands(text):
    r = parse(text).resolve()
    assert r["M00"] == "B"
    assert r["IN05"] == "D" and r["OUT11"] == "D"


def test_later_pairs_win():
    r = parse("(~: IN00-OUT11: a; IN05-M00: b; M00: c :~)").resolve()
    assert (r["IN04"], r["IN05"], r["IN11"], r["M00"], r["OUT00"]) == ("a", "b", "b", "c", "a")
    r = parse("(~: M00: c; IN05-M00: b :~)").resolve()
    assert r["M00"] == "b"


def test_several_groups_and_shared_text():
    lp = parse("best, (~: M00: red :~) hair, (~: IN01: cat; _: dog :~) photo")
    r = lp.resolve()
    assert r["M00"] == "best, red hair, dog photo"
    assert r["IN01"] == "best,  hair, cat photo"
    assert r["IN02"] == "best,  hair, dog photo"
    assert lp.plain() == "best,  hair,  photo"
    assert len(lp.groups) == 2


def test_no_groups():
    lp = parse("a cute girl")
    assert not lp.has_groups
    assert lp.plain() == "a cute girl"
    assert set(lp.resolve().values()) == {"a cute girl"}
    assert parse("").resolve()["M00"] == ""
    # `(~` or `~)` alone are ordinary text
    assert parse("a (~ girl ~) :~ (~").plain() == "a (~ girl ~) :~ (~"


def test_plain_keeps_the_surrounding_text_verbatim():
    assert parse(EXAMPLE).plain() == "a  girl"
    assert parse("a(~: M00: x :~)girl").plain() == "agirl"


@pytest.mark.parametrize(
    "text",
    [
        "a (~: :~) girl",
        "a (~::~) girl",
        "a (~: IN00-OUT11: ; M00: :~) girl",
        "a (~: _: ;:~) girl (~: M00:  :~)",
    ],
)
def test_empty_groups_resolve_to_exactly_plain(text):
    lp = parse(text)
    assert lp.has_groups
    plain = lp.plain()
    assert all(v == plain for v in lp.resolve().values())
    assert distinct_prompts(lp.resolve()) == [plain]


def test_unnamed_blocks_get_exactly_plain():
    lp = parse("a (~: M00: x :~) girl, (~: IN01: y :~)")
    r = lp.resolve()
    assert r["IN05"] == lp.plain() == "a  girl, "
    assert distinct_prompts(r) == ["a  girl, ", "a  girl, y", "a x girl, "]


def test_negative_prompt_same_syntax():
    lp = parse("lowres, (~: OUT00-OUT11: blurry :~)", field="negative_prompt")
    r = lp.resolve()
    assert r["OUT05"] == "lowres, blurry" and r["IN04"] == "lowres, "
    p = problem_of("lowres (~: IN99: x :~)", field="negative_prompt")
    assert p.position == 11


def test_distinct_prompts_order():
    assert distinct_prompts({"IN00": "b", "IN01": "a", "M00": "b", "OUT00": "c"}) == ["b", "a", "c"]


# --- warnings ------------------------------------------------------------------------------------------


def test_warning_for_textless_blocks_sd1():
    lp = parse("a (~: IN00: x :~)")
    assert lp.warnings() == [
        "(~: IN00: x :~) at position 6 names only blocks without cross-attention (IN00); they read no prompt"
    ]
    lp = parse("(~: IN09-IN11, OUT00-OUT02: x; IN00-IN01: y :~)")
    warnings = lp.warnings()
    assert len(warnings) == 1
    assert "(IN09-IN11, OUT00-OUT02)" in warnings[0] and "position 4" in warnings[0]
    assert parse("(~: IN00-IN01: y :~)").warnings() == []  # IN01 reads text
    assert parse("(~: IN03, IN06: y :~)", SD2).warnings() != []


def test_warning_for_textless_blocks_sdxl():
    # sdxl: IN00-IN03, IN06, OUT06-OUT08 have no cross-attention; IN04 and IN05 do
    assert parse("(~: IN00-IN03: x :~)", SDXL).warnings() == [
        "(~: IN00-IN03: x :~) at position 4 names only blocks without cross-attention (IN00-IN03); "
        "they read no prompt"
    ]
    assert parse("(~: IN06, OUT06-OUT08: x :~)", SDXL).warnings() != []
    assert parse("(~: IN04: x :~)", SDXL).warnings() == []
    # On sd1 IN01/IN02 read text: no warning there.
    assert parse("(~: IN01-IN02: x :~)", SD1).warnings() == []
    assert parse("(~: IN01-IN02: x :~)", SDXL).warnings() != []


def test_warning_when_fallback_reaches_only_textless_blocks():
    lp = parse("(~: IN01-OUT11: x; _: y :~)")
    (warning,) = lp.warnings()
    assert warning.startswith("(~: _: y :~) at position 19: `_` reaches only blocks")
    assert "(IN00)" in warning


def test_warning_shortens_long_text():
    (warning,) = parse("(~: IN00: " + "word " * 30 + ":~)").warnings()
    assert "…" in warning and len(warning) < 200


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "position", "needle"),
    [
        ("a (~: M00: x girl", 2, "no closing"),
        ("a (~: M00: x :~) (~: IN01: y", 17, "no closing"),
        ("a girl :~) b", 7, "closes no group"),
        ("a (~: M00: x :~) :~)", 17, "closes no group"),
        ("a (~: M00: (~: IN01: y :~) :~)", 11, "do not nest"),
        ("a (~: M00 x :~)", 6, "no `:`"),
        ("a (~: M00: x; cute :~)", 14, "no `:`"),
        ("a (~: : x :~)", 6, "names no block"),
        ("a (~: M00: x;  : y :~)", 15, "names no block"),
        ("a (~: M00: x; ; IN01: y :~)", 14, "empty pair"),
        ("a (~: ; :~)", 6, "empty pair"),
        ("a (~: IN99: x :~)", 6, "unknown block"),
        ("a (~: M00, IN00-IN99: x :~)", 16, "unknown block"),
        ("a (~: cute: x :~)", 6, "unknown block"),
        ("a (~: BASE: x :~)", 6, "not a U-Net block"),
        ("a (~: IN05-IN02: x :~)", 6, "reversed range"),
        ("a (~: IN00-OUT11(+0): x :~)", 16, "step"),
        ("a (~: M00,: x :~)", 10, "empty item"),
        ("a (~:~) b", 2, "no closing"),
    ],
)
def test_errors_with_position(text, position, needle):
    p = problem_of(text)
    assert p.position == position, (p.position, p.detail)
    assert needle in p.detail


def test_sdxl_names():
    r = parse("(~: IN00-OUT08: a; IN08: b :~)", SDXL).resolve()
    assert list(r) == list(SDXL.unet_blocks)
    assert r["IN08"] == "b" and r["OUT08"] == "a"
    p = problem_of("a (~: IN09: x :~)", SDXL)
    assert p.position == 6 and "sdxl has no block IN09" in p.detail
    p = problem_of("(~: IN00-OUT11: x :~)", SDXL)
    assert p.position == 9 and "OUT11" in p.detail
    assert parse("(~: IN09: x :~)", SD1).resolve()["IN09"] == "x"
