"""The colorize request model, its expression language (every rule, every error position) and the colors."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

import mergeprobe.probing.colorize as colorize_module
import mergeprobe.probing.colorize_grammar as grammar_module
import mergeprobe.probing.colorize_render as render_module
from mergeprobe.probing.colorize import Colorize
from mergeprobe.probing.colorize_grammar import (
    ERROR_TYPE,
    FUNCTIONS,
    MAX_DEPTH,
    MAX_LENGTH,
    error_from_validation,
    parse_expression,
)
from mergeprobe.probing.colorize_render import colorize, evaluate, hsl_to_rgb, normalize, to_bytes
from mergeprobe.service.errors import MergeprobeError
from mergeprobe.service.problems import Problem
from mergeprobe.service.problems import problem_of as as_problem

FIELD = "features.colorize.h"


def problem_of(text: str, field: str = FIELD) -> Problem:
    """The problem the client is shown for the domain error the call raises."""
    with pytest.raises(MergeprobeError) as info:
        parse_expression(text, field=field)
    p = as_problem(info.value)
    assert (p.status, p.slug, p.title) == (400, "invalid-expression", "Invalid colorize expression")
    assert p.field == field
    return p


def ev(text: str, v) -> np.ndarray:
    return evaluate(parse_expression(text, field="f"), np.asarray(v, dtype=np.float64))


# --- safety ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [colorize_module, grammar_module, render_module])
def test_source_never_hands_text_to_python(module):
    source = Path(module.__file__).read_text(encoding="utf-8")
    for pattern in (
        r"(?<![\w.])eval\s*\(",  # builtins only: `re.compile(` is a regex, not code
        r"(?<![\w.])exec\s*\(",
        r"(?<![\w.])compile\s*\(",
        r"literal_eval",
        r"import\s+ast\b",
        r"from\s+ast\b",
        r"__import__",
        r"__builtins__",
        r"\bimportlib\b",
    ):
        assert not re.search(pattern, source), pattern
    assert "import torch" not in source and "from torch" not in source


def test_import_does_not_load_torch():
    code = (
        "import sys, mergeprobe.probing.colorize, mergeprobe.probing.colorize_render; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_request_model_and_the_grammar_need_no_numpy():
    # The API imports these two to validate requests; only the worker's rendering needs numpy.
    code = "import sys, mergeprobe.probing.colorize; assert 'numpy' not in sys.modules, 'numpy imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_every_function_of_the_grammar_is_implemented():
    assert set(render_module._FUNCTIONS) == set(FUNCTIONS)


@pytest.mark.parametrize(
    "template",
    [
        "__import__('os').system('touch {marker}')",
        '__import__("os").system("touch {marker}")',
        "open('{marker}', 'w')",
        "v.__class__.__init__.__globals__['os'].system('touch {marker}')",
        "[c for c in ().__class__.__base__.__subclasses__()]",
        "(lambda: __import__('os').system('touch {marker}'))()",
        "v; __import__('os').system('touch {marker}')",
        "exec('import os; os.system(\"touch {marker}\")')",
    ],
)
def test_crafted_expressions_run_nothing(tmp_path, template):
    marker = tmp_path / "pwned"
    text = template.format(marker=marker)
    problem_of(text)
    with pytest.raises(ValidationError):
        Colorize(method="custom", h=text)
    unvalidated = Colorize.model_construct(method="custom", space="hsl", h=text)
    with pytest.raises(MergeprobeError):
        colorize(np.zeros((2, 2)), unvalidated)
    assert not marker.exists()


# --- grammar: what parses, and how it groups -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rendered"),
    [
        ("v", "v"),
        ("1", "1.0"),
        ("0.5", "0.5"),
        (".5", "0.5"),
        ("2.", "2.0"),
        ("1e-3", "0.001"),
        ("1E+2", "100.0"),
        ("  v  ", "v"),
        ("\tv\n", "v"),
        ("1+2*v", "(1.0 + (2.0 * v))"),
        ("1-2-v", "((1.0 - 2.0) - v)"),
        ("v/2/4", "((v / 2.0) / 4.0)"),
        ("(1+2)*v", "((1.0 + 2.0) * v)"),
        ("2**3**2", "(2.0 ** (3.0 ** 2.0))"),
        ("-v**2", "(-(v ** 2.0))"),
        ("2**-v", "(2.0 ** (-v))"),
        ("--v", "(-(-v))"),
        ("+v", "(+v)"),
        ("-v*2", "((-v) * 2.0)"),
        ("(2+v)/3", "((2.0 + v) / 3.0)"),
        ("v<1", "(v < 1.0)"),
        ("v <= 1", "(v <= 1.0)"),
        ("v>1", "(v > 1.0)"),
        ("v>=1", "(v >= 1.0)"),
        ("v==1", "(v == 1.0)"),
        ("v!=1", "(v != 1.0)"),
        ("1+v < 2*v", "((1.0 + v) < (2.0 * v))"),
        ("(v > 0) * v", "((v > 0.0) * v)"),
        ("abs(v)", "abs(v)"),
        ("min(v, 0.5)", "min(v, 0.5)"),
        ("max(v,0.5)", "max(v, 0.5)"),
        ("clip(v, 0, 1)", "clip(v, 0.0, 1.0)"),
        ("where(v > 0, sqrt(v), -v)", "where((v > 0.0), sqrt(v), (-v))"),
        ("sin(cos(exp(log(v))))", "sin(cos(exp(log(v))))"),
        ("abs ( v )", "abs(v)"),
    ],
)
def test_grammar(text, rendered):
    assert str(parse_expression(text, field="f")) == rendered


@pytest.mark.parametrize(
    ("text", "position", "words"),
    [
        # Python escapes
        ("__import__('os')", 0, "unknown function `__import__`"),
        ("v.real", 1, "attribute access"),
        ("(v).real", 3, "attribute access"),
        ("v[0]", 1, "subscripts"),
        ('"a"', 0, "strings are not allowed"),
        ("'a'", 0, "strings are not allowed"),
        ("exec(v)", 0, "unknown function `exec`"),
        ("eval(v)", 0, "unknown function `eval`"),
        ("lambda", 0, "`lambda` is not supported"),
        ("lambda v: v", 0, "`lambda` is not supported"),
        ("1 if v else 2", 2, "where(cond, a, b)"),
        ("v;v", 1, "only one expression"),
        ("v = 1", 2, "no assignments"),
        ("v and 1", 2, "`and` is not supported"),
        ("not v", 0, "`not` is not supported"),
        # names and calls
        ("x", 0, "unknown name `x`"),
        ("2 * os", 4, "unknown name `os`"),
        ("pi", 0, "no named constants"),
        ("abs", 0, "`abs` is a function"),
        ("v(1)", 0, "`v` is the value, not a function"),
        ("foo(v)", 0, "unknown function `foo`"),
        ("abs()", 0, "`abs` takes 1 argument (abs(x)), got 0"),
        ("abs(v, v)", 0, "`abs` takes 1 argument"),
        ("min(v)", 0, "`min` takes 2 arguments (min(a, b)), got 1"),
        ("1 + clip(v, 1)", 4, "`clip` takes 3 arguments (clip(x, lo, hi)), got 2"),
        ("where(v, 1)", 0, "`where` takes 3 arguments"),
        ("min(v,)", 6, "before `)`"),
        ("min(,v)", 4, "got `,`"),
        # numbers
        ("2v", 0, "malformed number `2v`"),
        ("1.2.3", 0, "malformed number `1.2.3`"),
        ("0x10", 0, "malformed number `0x10`"),
        ("1_000", 0, "malformed number `1_000`"),
        ("1e", 0, "malformed number `1e`"),
        ("v + 1e999", 4, "out of range"),
        # operators and structure
        ("", 0, "empty expression"),
        ("   ", 3, "empty expression"),
        ("v v", 2, "after a complete expression"),
        ("1 2", 2, "after a complete expression"),
        ("v +", 3, "ends too early"),
        ("* v", 0, "got `*`"),
        ("v * * v", 4, "got `*`"),
        ("v // 2", 3, "got `/`"),
        ("v ^ 2", 2, "write `**`"),
        ("v % 2", 2, "`%` is not supported"),
        ("v & 1", 2, "`&`"),
        ("v | 1", 2, "`|`"),
        ("!v", 0, "`!=`"),
        ("v ? 1", 2, "unexpected character `?`"),
        ("0 < v < 1", 6, "cannot be chained"),
        ("(v + 1", 0, "unclosed `(`"),
        ("1 + ((v)", 4, "unclosed `(`"),
        ("abs(v", 3, "unclosed `(`"),
        ("(v v)", 3, "expected `)` or an operator, got `v`"),
        ("v)", 1, "without a matching `(`"),
        ("()", 1, "before `)`"),
        ("{v}", 0, "unexpected character `{`"),
        ("v: 1", 1, "unexpected `:`"),
        ("ç", 0, "unexpected character `ç`"),
    ],
)
def test_errors_and_positions(text, position, words):
    p = problem_of(text)
    assert p.position == position, (text, p.detail)
    assert words in (p.detail or ""), p.detail


def test_leftmost_error_wins():
    # The attribute access at 9 is never reached: the missing operand at 4 comes first.
    assert problem_of("1 + ) + v.real").position == 4


def test_length_cap():
    ok = ("v+" * 249 + "v").ljust(MAX_LENGTH)
    assert len(ok) == MAX_LENGTH
    parse_expression(ok, field="f")
    p = problem_of(ok + " ")
    assert p.position == MAX_LENGTH
    assert "501 characters" in (p.detail or "")


def test_depth_cap():
    parse_expression("(" * MAX_DEPTH + "v" + ")" * MAX_DEPTH, field="f")
    p = problem_of("(" * (MAX_DEPTH + 1) + "v" + ")" * (MAX_DEPTH + 1))
    assert p.position == MAX_DEPTH and "nests deeper" in (p.detail or "")
    assert problem_of("-" * (MAX_DEPTH + 1) + "v").position == MAX_DEPTH
    nested_calls = "abs(" * (MAX_DEPTH + 1) + "v" + ")" * (MAX_DEPTH + 1)
    assert problem_of(nested_calls).position == 4 * MAX_DEPTH + 3
    # A long flat chain is not nesting: it only meets the length cap.
    assert ev("v" + "+v" * 200, [1.0])[0] == 201.0


def test_not_a_string():
    with pytest.raises(MergeprobeError) as info:
        parse_expression(3, field="f")  # type: ignore[arg-type]
    assert info.value.position is None


# --- evaluation ----------------------------------------------------------------------------------------


def test_defaults_evaluate():
    v = np.array([-1.0, 0.0, 1.0])
    spec = Colorize()
    h, s, l = spec.expressions()  # noqa: E741
    np.testing.assert_allclose(evaluate(h, v), [1 / 3, 2 / 3, 1.0])
    np.testing.assert_array_equal(evaluate(s, v), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(evaluate(l, v), [0.5, 0.5, 0.5])
    r, g, b = spec.model_copy(update={"space": "rgb"}).expressions()
    np.testing.assert_array_equal(evaluate(r, v), v)


def test_numbers_broadcast_to_the_shape_of_v():
    out = ev("1.0", np.zeros((2, 3)))
    assert out.shape == (2, 3) and out.dtype == np.float64
    np.testing.assert_array_equal(out, np.ones((2, 3)))
    assert ev("2 * 3 - 1", np.zeros(4)).tolist() == [5.0] * 4


def test_evaluate_returns_a_new_array():
    v = np.array([1.0, 2.0])
    out = ev("v", v)
    out[0] = 99.0
    assert v[0] == 1.0


def test_arithmetic_and_functions():
    v = np.array([-4.0, -1.0, 0.0, 0.25, 4.0])
    np.testing.assert_allclose(ev("v * 2 + 1", v), [-7, -1, 1, 1.5, 9])
    np.testing.assert_allclose(ev("-v**2", v), -(v**2))
    np.testing.assert_allclose(ev("2**-1", v), [0.5] * 5)
    np.testing.assert_allclose(ev("abs(v)", v), np.abs(v))
    np.testing.assert_allclose(ev("min(v, 0)", v), [-4, -1, 0, 0, 0])
    np.testing.assert_allclose(ev("max(v, 0)", v), [0, 0, 0, 0.25, 4])
    np.testing.assert_allclose(ev("clip(v, -1, 1)", v), [-1, -1, 0, 0.25, 1])
    np.testing.assert_allclose(ev("clip(v, 1, -1)", v), [-1, -1, -1, -1, -1])  # min(max(x, lo), hi)
    np.testing.assert_allclose(ev("where(v > 0, 1, -1)", v), [-1, -1, -1, 1, 1])
    np.testing.assert_allclose(ev("where(v, 5, 7)", v), [5, 5, 7, 5, 5])
    np.testing.assert_allclose(ev("(v >= 0) * v", v), [0, 0, 0, 0.25, 4])
    np.testing.assert_allclose(ev("(v == 0) + (v != 0) * 2", v), [2, 2, 1, 2, 2])
    np.testing.assert_allclose(ev("(v < 0) - (v <= 0)", v), [0, 0, -1, 0, 0])
    np.testing.assert_allclose(ev("sin(v) ** 2 + cos(v) ** 2", v), [1] * 5)
    np.testing.assert_allclose(ev("exp(log(abs(v) + 1))", v), np.abs(v) + 1)


def test_invalid_math_gives_zero_not_warnings():
    v = np.array([-4.0, -1.0, 0.0, 4.0])
    with np.errstate(all="raise"):  # evaluation must not warn or raise under any outer setting
        np.testing.assert_array_equal(ev("sqrt(v)", v), [0, 0, 0, 2])
        np.testing.assert_array_equal(ev("log(v)", v), [0, 0, -math.inf, math.log(4)])
        np.testing.assert_array_equal(ev("0 / v * 0", v), [0, 0, 0, 0])  # 0/0 → NaN → 0
        np.testing.assert_array_equal(ev("1 / v", v), [-0.25, -1, math.inf, 0.25])
        np.testing.assert_array_equal(ev("v ** 0.5", v), [0, 0, 0, 2])  # negative base → NaN → 0
        np.testing.assert_array_equal(ev("2 ** (v * 10000)", v), [0, 0, 1, math.inf])
        np.testing.assert_array_equal(ev("10 ** 400", v), [math.inf] * 4)
        np.testing.assert_array_equal(ev("sqrt(v) + 1", v), [0, 0, 1, 3])  # NaN propagates, then 0
        np.testing.assert_array_equal(ev("where(v > 0, sqrt(v), 7)", v), [7, 7, 7, 2])
        np.testing.assert_array_equal(ev("where(sqrt(v), 1, 2)", v), [2, 2, 2, 1])  # NaN is false
        np.testing.assert_array_equal(ev("max(sqrt(v), 1)", v), [0, 0, 1, 2])  # NaN propagates


def test_huge_values_are_clipped_by_colorize():
    spec = Colorize(
        method="custom", space="rgb", transform="linear", r="10 ** 300 * v", g="-(10**300)", b="0/0"
    )
    out = colorize(np.array([[1.0, -1.0]]), spec)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [0, 0, 0]


# --- the model -----------------------------------------------------------------------------------------


def test_model_defaults_and_schema():
    spec = Colorize()
    assert (spec.method, spec.transform, spec.space) == ("white_black", "auto01", "hsl")
    assert (spec.min, spec.max, spec.gain, spec.offset) == (-1.0, 1.0, 1.0, 0.0)
    assert (spec.h, spec.s, spec.l, spec.r, spec.g, spec.b) == ("(2+v)/3", "1.0", "0.5", "v", "v", "v")
    schema = Colorize.model_json_schema()
    for name, prop in schema["properties"].items():
        assert prop.get("description"), name
        assert prop.get("examples"), name
    assert schema["additionalProperties"] is False


def test_model_rejects_bad_expressions_with_position():
    with pytest.raises(ValidationError) as info:
        Colorize(method="custom", l="0.5 + v.real")
    (error,) = info.value.errors()
    assert error["type"] == ERROR_TYPE
    assert error["loc"] == ("l",)
    assert error["ctx"] == {"detail": "attribute access (`.`) is not allowed", "position": 7}
    assert "position 7" in error["msg"]


def test_model_parses_every_expression_whatever_the_method():
    with pytest.raises(ValidationError) as info:
        Colorize(method="white_black", r="v +", b="(")
    assert [e["loc"] for e in info.value.errors()] == [("r",), ("b",)]


def test_model_other_checks():
    with pytest.raises(ValidationError) as info:
        Colorize(min=1.0, max=1.0)
    assert info.value.errors()[0]["loc"] == ("max",)
    with pytest.raises(ValidationError):
        Colorize(extra_field=1)
    with pytest.raises(ValidationError):
        Colorize(gain=math.inf)
    with pytest.raises(ValidationError):
        Colorize(offset=math.nan)
    with pytest.raises(ValidationError):
        Colorize(method="rainbow")
    with pytest.raises(ValidationError):
        Colorize(transform="log")


def test_nested_model_error_maps_to_the_api_problem():
    class Features(BaseModel):
        colorize: Colorize

    class DumpRequest(BaseModel):
        features: Features

    with pytest.raises(ValidationError) as info:
        DumpRequest.model_validate({"features": {"colorize": {"method": "custom", "s": "abs(v, 1)"}}})
    (error,) = info.value.errors()
    field = ".".join(str(p) for p in error["loc"])
    domain_error = error_from_validation(error, field)
    assert domain_error is not None
    assert as_problem(domain_error).to_dict() == {
        "type": "https://mergeprobe.dev/problems/invalid-expression",
        "title": "Invalid colorize expression",
        "status": 400,
        "detail": "`abs` takes 1 argument (abs(x)), got 2",
        "field": "features.colorize.s",
        "position": 0,
    }
    assert error_from_validation({"type": "missing", "loc": ("x",), "msg": "Field required"}, "x") is None


def test_validate_raises_problems_under_the_prefix():
    Colorize().validate("features.colorize")
    bad = Colorize.model_construct(**{**Colorize().model_dump(), "g": "v +"})
    with pytest.raises(MergeprobeError) as info:
        bad.validate("features.colorize")
    p = as_problem(info.value)
    assert (p.status, p.slug, p.field, p.position) == (400, "invalid-expression", "features.colorize.g", 3)
    flipped = Colorize.model_construct(**{**Colorize().model_dump(), "min": 2.0, "max": 1.0})
    with pytest.raises(MergeprobeError) as info:
        flipped.validate("features.colorize")
    assert (as_problem(info.value).status, info.value.field) == (422, "features.colorize.max")


# --- colors --------------------------------------------------------------------------------------------


def test_hsl_known_colors():
    h = np.array([0.0, 1 / 3, 2 / 3, 1.0, -1 / 3, 1 / 6, 0.5, 0.0, 0.0, 0.0])
    s = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 5.0])
    l = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25, 1.0, -1.0])  # noqa: E741
    assert to_bytes(hsl_to_rgb(h, s, l)).tolist() == [
        [255, 0, 0],  # red
        [0, 255, 0],  # green
        [0, 0, 255],  # blue
        [255, 0, 0],  # hue wraps: 1 ≡ 0
        [0, 0, 255],  # -1/3 ≡ 2/3
        [255, 255, 0],  # yellow
        [0, 255, 255],  # cyan
        [64, 64, 64],  # no saturation: grey at the lightness
        [255, 255, 255],  # l = 1
        [0, 0, 0],  # s, l clipped
    ]


def test_hsl_matches_colorsys():
    import colorsys

    rng = np.random.default_rng(0)
    h, s, l = rng.random((3, 50))  # noqa: E741
    expected = [colorsys.hls_to_rgb(*x) for x in zip(h, l, s, strict=True)]
    np.testing.assert_allclose(hsl_to_rgb(h, s, l), expected, atol=1e-12)


def test_to_bytes_rounds_half_up_and_clips():
    assert to_bytes(np.array([0.0, 0.5, 1 / 255, 0.999, 1.0, 2.0, -1.0, np.nan, np.inf])).tolist() == [
        0,
        128,
        1,
        255,
        255,
        255,
        0,
        0,
        255,
    ]


X = np.array([[-2.0, -1.0, 0.0], [1.0, 2.0, 4.0]])  # 2×3, min -2, max 4, max|x| 4
WHITE, RED, BLUE = [255, 255, 255], [255, 0, 0], [0, 0, 255]


def grey(n: int) -> list[int]:
    return [n, n, n]


def pixels(spec: Colorize, x: np.ndarray = X) -> list[list[int]]:
    out = colorize(x, spec)
    assert out.shape == (*x.shape, 3) and out.dtype == np.uint8
    return out.reshape(-1, 3).tolist()


def test_white_black_each_transform():
    assert pixels(Colorize(transform="auto01")) == [
        grey(0),
        grey(43),
        grey(85),
        grey(128),
        grey(170),
        grey(255),
    ]
    # auto11: |x| / max|x| (white for large |v|)
    assert pixels(Colorize(transform="auto11")) == [
        grey(128),
        grey(64),
        grey(0),
        grey(64),
        grey(128),
        grey(255),
    ]
    assert pixels(Colorize(transform="linear")) == [
        grey(0),
        grey(0),
        grey(128),
        grey(255),
        grey(255),
        grey(255),
    ]
    assert pixels(Colorize(transform="linear", min=0, max=4)) == [
        grey(0),
        grey(0),
        grey(0),
        grey(64),
        grey(128),
        grey(255),
    ]
    sig = pixels(Colorize(transform="sigmoid", gain=math.log(3)))  # σ(±1) = 3/4, 1/4
    assert sig[1:4] == [grey(64), grey(128), grey(191)]
    assert pixels(Colorize(transform="sigmoid", gain=math.log(3), offset=1))[3] == grey(128)


def test_red_blue_each_transform():
    assert pixels(Colorize(method="red_blue", transform="auto01")) == [
        BLUE,
        [85, 85, 255],
        [170, 170, 255],
        WHITE,  # the midrange (lo + hi) / 2 = 1
        [255, 170, 170],
        RED,
    ]
    assert pixels(Colorize(method="red_blue", transform="auto11")) == [
        [128, 128, 255],
        [191, 191, 255],
        WHITE,  # zero stays white
        [255, 191, 191],
        [255, 128, 128],
        RED,
    ]
    assert pixels(Colorize(method="red_blue", transform="linear")) == [BLUE, BLUE, WHITE, RED, RED, RED]
    sig = pixels(Colorize(method="red_blue", transform="sigmoid", gain=math.log(3)))
    assert sig[1:4] == [[128, 128, 255], WHITE, [255, 128, 128]]


def test_custom_hsl_defaults_green_blue_red():
    spec = Colorize(method="custom", transform="linear")  # v = s in [-1, 1]; h = (2+v)/3
    assert pixels(spec, np.array([[-1.0, 0.0, 1.0]])) == [[0, 255, 0], BLUE, RED]
    spec = Colorize(method="custom", transform="sigmoid", gain=100.0)
    assert pixels(spec, np.array([[-1.0, 0.0, 1.0]])) == [[0, 255, 0], BLUE, RED]
    spec = Colorize(method="custom", transform="auto11")
    assert pixels(spec, np.array([[-3.0, 0.0, 3.0]])) == [[0, 255, 0], BLUE, RED]


def test_custom_auto01_sees_unit_values():
    spec = Colorize(method="custom", transform="auto01", space="rgb", r="v", g="1 - v", b="0")
    assert pixels(spec) == [[0, 255, 0], [43, 213, 0], [85, 170, 0], [128, 128, 0], [170, 85, 0], [255, 0, 0]]


def test_custom_rgb_clips_channels():
    spec = Colorize(method="custom", transform="linear", space="rgb", r="v * 2", g="-v", b="0.5")
    assert pixels(spec, np.array([[-1.0, 0.25, 1.0]])) == [[0, 255, 128], [128, 0, 128], [255, 0, 128]]


def test_auto_statistics_are_per_map_in_a_stack():
    a = np.array([[0.0, 1.0], [2.0, 3.0]])
    stack = np.stack([a, a * 100 - 7])
    out = colorize(stack, Colorize())
    assert out.shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], colorize(a, Colorize()))


def test_degenerate_and_non_finite_maps():
    flat = np.full((2, 2), 7.0)
    assert pixels(Colorize(), flat) == [grey(128)] * 4
    assert pixels(Colorize(method="red_blue"), flat) == [WHITE] * 4
    zeros = np.zeros((1, 2))
    assert pixels(Colorize(transform="auto11"), zeros) == [grey(0)] * 2
    assert pixels(Colorize(method="red_blue", transform="auto11"), zeros) == [WHITE] * 2
    odd = np.array([[np.nan, -np.inf, 0.0, 1.0, np.inf]])
    u, s = normalize(odd, Colorize())
    assert u.tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0]]
    assert s.tolist() == [[0.0, -1.0, -1.0, 1.0, 1.0]]
    assert pixels(Colorize(transform="sigmoid"), np.array([[np.nan, -np.inf, np.inf]])) == [
        grey(0),
        grey(0),
        grey(255),
    ]


def test_colorize_does_not_touch_its_input_and_is_deterministic():
    x = X.copy()
    spec = Colorize(method="custom", transform="auto11")
    first = colorize(x, spec)
    np.testing.assert_array_equal(x, X)
    np.testing.assert_array_equal(first, colorize(x, spec))


def test_colorize_needs_maps():
    with pytest.raises(ValueError):
        colorize(np.zeros(3), Colorize())
