"""How feature maps become pixels: the `Colorize` request model and its safe expression language.

Pure Python + numpy (the API imports it to validate requests; no torch here).

Pipeline
========

``colorize(values, spec)`` turns each (H, W) map of float feature values into an
(H, W, 3) uint8 RGB image in two stages, following Dump U-Net's Colorization
settings.

1. The *transform* normalizes the raw values. It defines a unit value ``u`` in
   [0, 1] and a signed value ``s`` in [-1, 1]:

   ============  ==========================================  =========================
   transform     u (unit, [0, 1])                            s (signed, [-1, 1])
   ============  ==========================================  =========================
   ``auto01``    ``(x - lo) / (hi - lo)``, lo/hi the map's   ``2u - 1``
                 own min/max (a constant map gives 0.5)
   ``auto11``    ``|s|``                                     ``x / m``, m the map's own
                                                             max ``|x|`` (all-zero → 0)
   ``linear``    ``(clamp(x, min, max) - min)/(max - min)``  ``2u - 1``
   ``sigmoid``   ``1 / (1 + exp(-gain * (x - offset)))``     ``2u - 1``
   ============  ==========================================  =========================

   "The map's own" means per image: every tile of a feature grid, every cell of
   an attention grid, is normalized on its own statistics (as Dump U-Net does).
   Zero stays zero in ``auto11`` and is the middle of the range for the others
   (``(lo+hi)/2``, ``(min+max)/2``, ``offset``). ±inf are clamped like any value
   (the auto statistics use finite values only); a NaN value gives 0 (``u`` or
   ``s`` as the method reads it).

2. The *method* turns the normalized value into a color:

   ================  ==========================================================
   ``white_black``   grey level ``u``: black at 0, white at 1. With ``auto11``
                     that is ``|x| / max|x|`` (Dump U-Net's "white for large
                     |v|"); with the others low values are dark, high bright.
   ``red_blue``      ``s``: 0 → white, +1 → pure red (255, 0, 0), -1 → pure blue
                     (0, 0, 255), linear in between: ``s > 0`` gives
                     ``(1, 1-s, 1-s)``, ``s < 0`` gives ``(1-|s|, 1-|s|, 1)``.
                     (Dump U-Net fades to black at 0; white reads better.)
   ``custom``        three expressions of ``v`` give the channels. ``v`` is
                     ``u`` in [0, 1] for ``auto01`` and ``s`` in [-1, 1] for
                     ``auto11``, ``linear`` and ``sigmoid`` (Dump U-Net: the
                     ``[0,1]`` form is for White/Black only). With
                     ``space="rgb"`` the expressions ``r``, ``g``, ``b`` are the
                     channels, each clipped to [0, 1]. With ``space="hsl"`` they
                     are ``h``, ``s``, ``l``: hue wraps around (``h mod 1``, so
                     1 ≡ 0 = red, 1/3 green, 2/3 blue), saturation and
                     lightness are clipped to [0, 1]; then HSL → RGB.
   ================  ==========================================================

   A channel value c in [0, 1] becomes the byte ``floor(c * 255 + 0.5)``.

Expressions
===========

A small arithmetic language evaluated elementwise on whole numpy arrays. It is
tokenized and parsed here into a tiny AST; nothing is ever handed to Python's
own evaluator. Grammar (lowest precedence first)::

    expression := additive [ compare additive ]    compare: < <= > >= == !=  (no chains)
    additive   := term { ("+" | "-") term }
    term       := unary { ("*" | "/") unary }
    unary      := ("-" | "+") unary | power
    power      := primary [ "**" unary ]            right-assoc.; -v**2 = -(v**2); 2**-v ok
    primary    := NUMBER | "v" | FUNCTION "(" expression { "," expression } ")"
                | "(" expression ")"

* NUMBER: ``1``, ``0.5``, ``.5``, ``2.``, ``1e-3`` (no signs — that is unary
  minus —, no ``_``, hex, ``inf`` or ``nan``).
* ``v`` is the only variable.
* Functions: ``abs sin cos exp log sqrt`` (1 argument), ``min max`` (2,
  elementwise, NaN propagates), ``clip(x, lo, hi)`` (= ``min(max(x, lo), hi)``),
  ``where(cond, a, b)`` (``a`` where ``cond`` is non-zero, else ``b``; NaN counts
  as false).
* Comparisons give 1.0 (true) or 0.0 (false), so ``(v > 0) * v`` works and
  they are usable anywhere, not only inside ``where``.
* Whitespace is free between tokens. At most 500 characters and 32 levels of
  nesting (parentheses, calls, unary signs and exponents each count one).

Evaluation is float64 with numpy's floating-point warnings suppressed:
``log(-1)``, ``sqrt(-1)``, ``0/0`` give NaN and ``2**1e6``, ``1/0`` give ±inf.
NaN propagates through later operations and the final result has NaN replaced
by 0; infinities are kept (``colorize`` clips them to the channel range).

Every syntax error is a 400 ``Problem`` with slug ``invalid-expression``, the
request ``field`` (e.g. ``features.colorize.h``) and ``position``, the 0-based
character offset of the offending token in the expression as sent.

Validation paths
================

* Plain pydantic: ``Colorize(...)`` / ``Colorize.model_validate(...)`` parses
  all six expressions in field validators; a bad one raises a
  ``ValidationError`` whose error has ``type == "invalid_expression"``, ``loc``
  ending in the expression's field (``h``) and ``ctx`` ``{"position": …,
  "detail": …}``. ``max <= min`` is an ordinary ``value_error`` on ``max``.
* API: a request model that nests ``Colorize`` therefore fails while FastAPI
  parses the body (before the route runs). ``problem_from_error(error, field)``
  turns such an error dict into the 400 ``invalid-expression`` Problem (``field``
  the dotted ``loc`` path), so the API's validation-error handler can map it.
  ``Colorize.validate(field_prefix)`` raises the same Problems for an instance
  that skipped validation (``model_construct``, deserialized job payloads) —
  the worker calls it, and routes may call it again at no cost.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from mergeprobe.problems import Problem

SLUG = "invalid-expression"
TITLE = "Invalid colorize expression"
ERROR_TYPE = "invalid_expression"
"""The pydantic error type the expression validators raise (see `problem_from_error`)."""

MAX_LENGTH = 500
MAX_DEPTH = 32

Method = Literal["white_black", "red_blue", "custom"]
Transform = Literal["auto01", "auto11", "linear", "sigmoid"]
Space = Literal["rgb", "hsl"]

HSL_FIELDS = ("h", "s", "l")
RGB_FIELDS = ("r", "g", "b")


# --- AST --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    pos: int  # 0-based offset of the node's first token in the source


@dataclass(frozen=True)
class Number(Node):
    value: float


@dataclass(frozen=True)
class Variable(Node):
    pass


@dataclass(frozen=True)
class Unary(Node):
    op: str  # "-" or "+"
    operand: Node


@dataclass(frozen=True)
class Binary(Node):
    op: str  # + - * / ** < <= > >= == !=
    left: Node
    right: Node


@dataclass(frozen=True)
class Call(Node):
    name: str
    args: tuple[Node, ...]


def _clip(x: Any, lo: Any, hi: Any) -> Any:
    return np.minimum(np.maximum(x, lo), hi)


def _where(cond: Any, a: Any, b: Any) -> Any:
    return np.where(np.abs(cond) > 0, a, b)  # NaN > 0 is False


FUNCTIONS: dict[str, tuple[int, Callable[..., Any], str]] = {
    "abs": (1, np.abs, "abs(x)"),
    "sin": (1, np.sin, "sin(x)"),
    "cos": (1, np.cos, "cos(x)"),
    "exp": (1, np.exp, "exp(x)"),
    "log": (1, np.log, "log(x)"),
    "sqrt": (1, np.sqrt, "sqrt(x)"),
    "min": (2, np.minimum, "min(a, b)"),
    "max": (2, np.maximum, "max(a, b)"),
    "clip": (3, _clip, "clip(x, lo, hi)"),
    "where": (3, _where, "where(cond, a, b)"),
}
"""name → (number of arguments, numpy implementation, signature)."""

_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "+": np.add,
    "-": np.subtract,
    "*": np.multiply,
    "/": np.divide,
    "**": np.power,
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
    "==": np.equal,
    "!=": np.not_equal,
}
COMPARISONS = frozenset({"<", "<=", ">", ">=", "==", "!="})


def _evaluate(node: Node, v: np.ndarray) -> Any:
    if isinstance(node, Number):
        return np.float64(node.value)
    if isinstance(node, Variable):
        return v
    if isinstance(node, Unary):
        operand = _evaluate(node.operand, v)
        return np.negative(operand) if node.op == "-" else operand
    if isinstance(node, Binary):
        result = _BINARY[node.op](_evaluate(node.left, v), _evaluate(node.right, v))
        return result.astype(np.float64) if node.op in COMPARISONS else result
    if isinstance(node, Call):
        _, fn, _ = FUNCTIONS[node.name]
        return fn(*(_evaluate(a, v) for a in node.args))
    raise TypeError(f"not an expression node: {node!r}")  # pragma: no cover


def _render(node: Node) -> str:
    if isinstance(node, Number):
        return repr(node.value)
    if isinstance(node, Variable):
        return "v"
    if isinstance(node, Unary):
        return f"({node.op}{_render(node.operand)})"
    if isinstance(node, Binary):
        return f"({_render(node.left)} {node.op} {_render(node.right)})"
    if isinstance(node, Call):
        return f"{node.name}({', '.join(_render(a) for a in node.args)})"
    raise TypeError(f"not an expression node: {node!r}")  # pragma: no cover


@dataclass(frozen=True)
class Expr:
    """A parsed expression: `evaluate(v)` runs it on an array; `str()` is the fully parenthesized form."""

    source: str
    root: Node

    def evaluate(self, v: np.ndarray | float) -> np.ndarray:
        """The expression at every element of `v`: a new float64 array shaped like `v`, NaN replaced by 0.

        Numbers broadcast (`"1.0"` gives an array of ones). ±inf are kept.
        """
        values = np.asarray(v, dtype=np.float64)
        with np.errstate(all="ignore"):
            result = np.broadcast_to(np.asarray(_evaluate(self.root, values), dtype=np.float64), values.shape)
            return np.where(np.isnan(result), 0.0, result)

    def __str__(self) -> str:
        return _render(self.root)


# --- tokenizer --------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = ("**", "<=", ">=", "==", "!=", "+", "-", "*", "/", "<", ">", "(", ")", ",")
_VALUE_END = ("number", "name", ")")
_HINTS = {
    "if": "`if … else` is not supported; use where(cond, a, b)",
    "else": "`if … else` is not supported; use where(cond, a, b)",
    "and": "`and` is not supported; multiply comparisons, as in (v > 0) * (v < 1)",
    "or": "`or` is not supported; use max(a, b) of comparisons",
    "not": "`not` is not supported; use 1 - (comparison) or ==",
    "lambda": "`lambda` is not supported: write an expression of v",
    "pi": "there are no named constants; write the number (3.14159265)",
    "e": "there are no named constants; write exp(1) or the number",
}
_CHAR_HINTS = {
    ".": "attribute access is not allowed",
    "[": "subscripts (`[`) are not allowed",
    "]": "subscripts (`]`) are not allowed",
    "'": "strings are not allowed",
    '"': "strings are not allowed",
    ";": "only one expression is allowed (unexpected `;`)",
    "=": "`=` is not an operator (no assignments; write `==` to compare)",
    "!": "unexpected `!` (write `!=` for not-equal)",
    "^": "`^` is not an operator; write `**` for powers",
    "%": "`%` is not supported",
    "&": "`&` is not supported; multiply comparisons for 'and'",
    "|": "`|` is not supported; use max(a, b) of comparisons for 'or'",
    ":": "unexpected `:`",
    "\\": "unexpected `\\`",
}


@dataclass(frozen=True)
class _Token:
    kind: str  # number, name, op, end
    text: str
    pos: int


class _Parser:
    def __init__(self, text: str, field: str) -> None:
        self.text = text
        self.field = field
        self.i = 0
        self.depth = 0
        self.prev_kind = ""
        self.tok = self._scan()

    # - errors and tokens -

    def fail(self, detail: str, pos: int) -> Problem:
        return Problem(400, SLUG, TITLE, detail, field=self.field, position=pos)

    def _scan(self) -> _Token:
        text, i = self.text, self.i
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            self.i = i
            return _Token("end", "", i)
        ch = text[i]
        m = _NUMBER.match(text, i)
        if m:
            end = m.end()
            if end < len(text) and (text[end].isalnum() or text[end] in "_."):
                j = end
                while j < len(text) and (text[j].isalnum() or text[j] in "_."):
                    j += 1
                raise self.fail(f"malformed number `{text[i:j]}`", i)
            token = _Token("number", m.group(), i)
        elif (m := _NAME.match(text, i)) is not None:
            token = _Token("name", m.group(), i)
        else:
            op = next((o for o in _OPERATORS if text.startswith(o, i)), None)
            if op is None:
                if ch == "." and self.prev_kind in _VALUE_END:
                    raise self.fail("attribute access (`.`) is not allowed", i)
                hint = _CHAR_HINTS.get(ch)
                raise self.fail(hint or f"unexpected character `{ch}`", i)
            token = _Token("op", op, i)
        self.i = i + len(token.text)
        self.prev_kind = token.text if token.text == ")" else token.kind
        return token

    def advance(self) -> _Token:
        token = self.tok
        self.tok = self._scan()
        return token

    def at(self, *ops: str) -> bool:
        return self.tok.kind == "op" and self.tok.text in ops

    def describe(self, token: _Token) -> str:
        return "the end of the expression" if token.kind == "end" else f"`{token.text}`"

    def enter(self, pos: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"expression nests deeper than {MAX_DEPTH} levels", pos)

    # - grammar -

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise self.fail(
                "empty expression: write a number, `v` or a formula such as `(2+v)/3`", self.tok.pos
            )
        node = self.expression()
        if self.tok.kind != "end":
            tok = self.tok
            if tok.text == ")":
                raise self.fail("unexpected `)` without a matching `(`", tok.pos)
            if tok.kind == "name" and tok.text in _HINTS:
                raise self.fail(_HINTS[tok.text], tok.pos)
            raise self.fail(
                f"unexpected {self.describe(tok)} after a complete expression (missing operator?)", tok.pos
            )
        return node

    def expression(self) -> Node:
        left = self.additive()
        if self.at(*COMPARISONS):
            op = self.advance()
            right = self.additive()
            if self.at(*COMPARISONS):
                raise self.fail(
                    "comparisons cannot be chained; multiply them, as in (0 < v) * (v < 1)", self.tok.pos
                )
            left = Binary(left.pos, op.text, left, right)
        return left

    def additive(self) -> Node:
        left = self.term()
        while self.at("+", "-"):
            op = self.advance()
            left = Binary(left.pos, op.text, left, self.term())
        return left

    def term(self) -> Node:
        left = self.unary()
        while self.at("*", "/"):
            op = self.advance()
            left = Binary(left.pos, op.text, left, self.unary())
        return left

    def unary(self) -> Node:
        if self.at("-", "+"):
            op = self.advance()
            self.enter(op.pos)
            node = Unary(op.pos, op.text, self.unary())
            self.depth -= 1
            return node
        return self.power()

    def power(self) -> Node:
        base = self.primary()
        if self.at("**"):
            op = self.advance()
            self.enter(op.pos)
            base = Binary(base.pos, "**", base, self.unary())
            self.depth -= 1
        return base

    def primary(self) -> Node:
        tok = self.tok
        if tok.kind == "number":
            self.advance()
            value = float(tok.text)
            if not math.isfinite(value):
                raise self.fail(f"number `{tok.text}` is out of range", tok.pos)
            return Number(tok.pos, value)
        if tok.kind == "name":
            self.advance()
            if self.at("("):
                return self.call(tok)
            if tok.text == "v":
                return Variable(tok.pos)
            if tok.text in FUNCTIONS:
                raise self.fail(f"`{tok.text}` is a function: call it as {FUNCTIONS[tok.text][2]}", tok.pos)
            if tok.text in _HINTS:
                raise self.fail(_HINTS[tok.text], tok.pos)
            raise self.fail(f"unknown name `{tok.text}` (the only variable is `v`)", tok.pos)
        if self.at("("):
            self.advance()
            self.enter(tok.pos)
            node = self.expression()
            self.close(tok)
            self.depth -= 1
            return node
        if tok.kind == "end":
            raise self.fail(
                "expression ends too early: expected a number, `v`, a function call or `(`", tok.pos
            )
        if tok.text == ")":
            raise self.fail("expected a number, `v`, a function call or `(` before `)`", tok.pos)
        raise self.fail(f"expected a number, `v`, a function call or `(`, got `{tok.text}`", tok.pos)

    def close(self, opening: _Token) -> None:
        if self.at(")"):
            self.advance()
            return
        if self.tok.kind == "end":
            raise self.fail("unclosed `(`: missing `)`", opening.pos)
        raise self.fail(f"expected `)` or an operator, got {self.describe(self.tok)}", self.tok.pos)

    def call(self, name: _Token) -> Node:
        if name.text == "v":
            raise self.fail("`v` is the value, not a function (write `v * (…)` to multiply)", name.pos)
        if name.text not in FUNCTIONS:
            known = ", ".join(sorted(FUNCTIONS))
            raise self.fail(f"unknown function `{name.text}` (functions: {known})", name.pos)
        arity, _, signature = FUNCTIONS[name.text]
        opening = self.advance()
        self.enter(opening.pos)
        args: list[Node] = []
        if not self.at(")"):
            args.append(self.expression())
            while self.at(","):
                self.advance()
                args.append(self.expression())
        self.close(opening)
        self.depth -= 1
        if len(args) != arity:
            plural = "argument" if arity == 1 else "arguments"
            raise self.fail(f"`{name.text}` takes {arity} {plural} ({signature}), got {len(args)}", name.pos)
        return Call(name.pos, name.text, tuple(args))


def parse_expression(text: str, *, field: str) -> Expr:
    """Parse a colorize expression; any fault is a 400 `invalid-expression` Problem with `field` and position."""
    if not isinstance(text, str):
        raise Problem(400, SLUG, TITLE, "must be a string expression of v", field=field)
    if len(text) > MAX_LENGTH:
        raise Problem(
            400,
            SLUG,
            TITLE,
            f"expression is {len(text)} characters long; the limit is {MAX_LENGTH}",
            field=field,
            position=MAX_LENGTH,
        )
    return Expr(text, _Parser(text, field).parse())


def problem_from_error(error: Mapping[str, Any], field: str) -> Problem | None:
    """The 400 Problem for one pydantic error dict raised by `Colorize`'s expression validators, else None.

    `field` is the error's `loc` as a dotted request path (``features.colorize.h``).
    """
    if error.get("type") != ERROR_TYPE:
        return None
    ctx = error.get("ctx") or {}
    return Problem(
        400,
        SLUG,
        TITLE,
        str(ctx.get("detail", error.get("msg", ""))),
        field=field,
        position=ctx.get("position"),
    )


# --- request model ----------------------------------------------------------------------------------------


_EXPR_DOC = " Expression of v (see the colorize expression grammar: numbers, v, + - * / **, comparisons, abs min max clip where sin cos exp log sqrt)."


class Colorize(BaseModel):
    """How feature values become colors (Dump U-Net's Colorization settings)."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"method": "white_black", "transform": "auto01"},
                {"method": "red_blue", "transform": "linear", "min": -2.0, "max": 2.0},
                {
                    "method": "custom",
                    "transform": "sigmoid",
                    "gain": 1.0,
                    "offset": 0.0,
                    "space": "hsl",
                    "h": "(2+v)/3",
                    "s": "1.0",
                    "l": "0.5",
                },
            ]
        },
    )

    method: Method = Field(
        default="white_black",
        description=(
            "`white_black`: grey level from the unit value (auto11: |v| / max|v|); `red_blue`: signed value, "
            "0 white, +1 red, -1 blue; `custom`: channels from the expressions below."
        ),
        examples=["white_black", "red_blue", "custom"],
    )
    transform: Transform = Field(
        default="auto01",
        description=(
            "`auto01`: each map's min/max → [0, 1]; `auto11`: each map divided by its max |v| → [-1, 1]; "
            "`linear`: clamp to [min, max] then map to [0, 1]; `sigmoid`: 1/(1+exp(-gain·(v−offset))). "
            "red_blue and custom read [0, 1] results as 2u−1 (custom keeps auto01 in [0, 1])."
        ),
        examples=["auto01", "sigmoid"],
    )
    min: float = Field(
        default=-1.0, description="`linear`: lower clamp, mapped to 0 (or -1).", examples=[-1.0]
    )
    max: float = Field(
        default=1.0, description="`linear`: upper clamp, mapped to 1; above min.", examples=[1.0]
    )
    gain: float = Field(default=1.0, description="`sigmoid`: slope.", examples=[1.0])
    offset: float = Field(
        default=0.0,
        description="`sigmoid`: the value mapped to the middle (0.5, or 0 signed).",
        examples=[0.0],
    )
    space: Space = Field(
        default="hsl",
        description="`custom`: whether the expressions give h, s, l (hue wraps mod 1) or r, g, b.",
        examples=["hsl", "rgb"],
    )
    h: str = Field(
        default="(2+v)/3",
        description="`custom` + `hsl`: hue, 0 red, 1/3 green, 2/3 blue, wraps." + _EXPR_DOC,
        examples=["(2+v)/3"],
    )
    s: str = Field(
        default="1.0",
        description="`custom` + `hsl`: saturation, clipped to [0, 1]." + _EXPR_DOC,
        examples=["1.0"],
    )
    l: str = Field(  # noqa: E741
        default="0.5",
        description="`custom` + `hsl`: lightness, clipped to [0, 1]." + _EXPR_DOC,
        examples=["0.5"],
    )
    r: str = Field(
        default="v",
        description="`custom` + `rgb`: red, clipped to [0, 1]." + _EXPR_DOC,
        examples=["v", "max(v, 0)"],
    )
    g: str = Field(
        default="v", description="`custom` + `rgb`: green, clipped to [0, 1]." + _EXPR_DOC, examples=["v"]
    )
    b: str = Field(
        default="v",
        description="`custom` + `rgb`: blue, clipped to [0, 1]." + _EXPR_DOC,
        examples=["max(-v, 0)"],
    )

    @field_validator("h", "s", "l", "r", "g", "b")
    @classmethod
    def _parse(cls, value: str, info: ValidationInfo) -> str:
        try:
            parse_expression(value, field=str(info.field_name))
        except Problem as problem:
            where = "" if problem.position is None else f" (at position {problem.position})"
            raise PydanticCustomError(
                ERROR_TYPE,
                "{detail}" + where,
                {"detail": problem.detail or TITLE, "position": problem.position},
            ) from None
        return value

    @field_validator("max")
    @classmethod
    def _above_min(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("min")
        if low is not None and not value > low:
            raise ValueError(f"max ({value}) must be greater than min ({low})")
        return value

    def validate(self, field_prefix: str = "colorize") -> None:  # type: ignore[override]
        """Raise the API's Problem for any fault, with fields under `field_prefix` (`features.colorize.h`).

        Expressions: 400 `invalid-expression` with position; `max <= min`: 422
        `validation-error` on `<prefix>.max` (what pydantic's own check becomes in the API).
        """
        self.expressions(field_prefix, every=True)
        if not self.max > self.min:
            raise Problem(
                422,
                "validation-error",
                "Invalid request",
                f"max ({self.max}) must be greater than min ({self.min})",
                field=f"{field_prefix}.max",
            )

    def expressions(self, field_prefix: str = "colorize", *, every: bool = False) -> tuple[Expr, ...]:
        """The parsed expressions of the chosen `space` (h, s, l or r, g, b); all six with `every`."""
        names = HSL_FIELDS + RGB_FIELDS if every else HSL_FIELDS if self.space == "hsl" else RGB_FIELDS
        return tuple(parse_expression(getattr(self, n), field=f"{field_prefix}.{n}") for n in names)


# --- colorizing -------------------------------------------------------------------------------------------


def _finite_extremes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-map (last two axes) min and max over finite values; 0, 0 for a map with none."""
    finite = np.isfinite(x)
    lo = np.where(finite, x, np.inf).min(axis=(-2, -1), keepdims=True)
    hi = np.where(finite, x, -np.inf).max(axis=(-2, -1), keepdims=True)
    none = ~finite.any(axis=(-2, -1), keepdims=True)
    return np.where(none, 0.0, lo), np.where(none, 0.0, hi)


def normalize(values: np.ndarray, spec: Colorize) -> tuple[np.ndarray, np.ndarray]:
    """(u, s): the transform's unit value in [0, 1] and signed value in [-1, 1] (module docstring table).

    `values` has shape (..., H, W); auto statistics are per (H, W) map. NaN inputs give 0 in both.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"expected maps of shape (..., H, W), got shape {x.shape}")
    with np.errstate(all="ignore"):
        if spec.transform == "auto01":
            lo, hi = _finite_extremes(x)
            span = hi - lo
            flat = span <= 0
            u = np.where(flat, 0.5, (np.clip(x, lo, hi) - lo) / np.where(flat, 1.0, span))
            s = 2.0 * u - 1.0
        elif spec.transform == "auto11":
            lo, hi = _finite_extremes(x)
            m = np.maximum(np.abs(lo), np.abs(hi))
            zero = m <= 0
            s = np.where(zero, 0.0, np.clip(x, -m, m) / np.where(zero, 1.0, m))
            u = np.abs(s)
        elif spec.transform == "linear":
            u = (np.clip(x, spec.min, spec.max) - spec.min) / (spec.max - spec.min)
            s = 2.0 * u - 1.0
        else:
            u = 1.0 / (1.0 + np.exp(-spec.gain * (x - spec.offset)))
            s = 2.0 * u - 1.0
        u = np.where(np.isnan(u), 0.0, u)
        s = np.where(np.isnan(s), 0.0, s)
    return u, s


def hsl_to_rgb(h: np.ndarray, s: np.ndarray, l: np.ndarray) -> np.ndarray:  # noqa: E741
    """HSL → RGB, all in [0, 1], elementwise; hue wraps mod 1, s and l are clipped. Returns (..., 3)."""
    with np.errstate(all="ignore"):
        hue = np.mod(np.asarray(h, dtype=np.float64), 1.0)
    hue = np.where(np.isfinite(hue), hue, 0.0)
    sat = np.clip(np.asarray(s, dtype=np.float64), 0.0, 1.0)
    light = np.clip(np.asarray(l, dtype=np.float64), 0.0, 1.0)
    a = sat * np.minimum(light, 1.0 - light)
    channels = []
    for n in (0.0, 8.0, 4.0):
        k = np.mod(n + hue * 12.0, 12.0)
        channels.append(light - a * np.maximum(-1.0, np.minimum(np.minimum(k - 3.0, 9.0 - k), 1.0)))
    return np.stack(channels, axis=-1)


def to_bytes(channels: np.ndarray) -> np.ndarray:
    """Channel values → uint8: floor(clip(c, 0, 1) · 255 + 0.5) (NaN → 0)."""
    c = np.clip(np.nan_to_num(np.asarray(channels, dtype=np.float64), nan=0.0), 0.0, 1.0)
    return np.floor(c * 255.0 + 0.5).astype(np.uint8)


def colorize(values: np.ndarray, spec: Colorize, *, field_prefix: str = "colorize") -> np.ndarray:
    """RGB bytes for feature maps: (H, W) → (H, W, 3) uint8, or a stack (..., H, W) → (..., H, W, 3).

    Each (H, W) map is normalized on its own (auto transforms). See the module
    docstring for every method × transform. Expressions are parsed here again,
    so an unvalidated spec fails with the 400 Problem under `field_prefix`.
    """
    u, s = normalize(values, spec)
    if spec.method == "white_black":
        rgb = np.repeat(u[..., None], 3, axis=-1)
    elif spec.method == "red_blue":
        pos = np.maximum(s, 0.0)
        neg = np.maximum(-s, 0.0)
        rgb = np.stack([1.0 - neg, 1.0 - pos - neg, 1.0 - pos], axis=-1)
    else:
        v = u if spec.transform == "auto01" else s
        first, second, third = (e.evaluate(v) for e in spec.expressions(field_prefix))
        if spec.space == "hsl":
            rgb = hsl_to_rgb(first, second, third)
        else:
            rgb = np.stack([first, second, third], axis=-1)
    return to_bytes(rgb)
