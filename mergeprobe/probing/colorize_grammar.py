"""The colorize expression language: its tokenizer, parser and AST, and the errors it reports.

Pure Python (no numpy, no torch): the API imports it to validate requests. An expression is
tokenized and parsed here into a tiny AST; nothing is ever handed to Python's own evaluator.
:mod:`mergeprobe.probing.colorize_render` evaluates the AST elementwise on whole numpy arrays.

A small arithmetic language of one variable. Grammar (lowest precedence first)::

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

Every syntax error is an ``InvalidInput`` error with slug ``invalid-expression``, the
request ``field`` (e.g. ``features.colorize.h``) and ``position``, the 0-based
character offset of the offending token in the expression as sent. Inside a
pydantic model (``mergeprobe.probing.colorize.Colorize``) it travels as a validation error
of type ``ERROR_TYPE``; ``error_from_validation`` turns that back into the error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mergeprobe.service.errors import InvalidInput

SLUG = "invalid-expression"
TITLE = "Invalid colorize expression"
ERROR_TYPE = "invalid_expression"
"""The pydantic error type the expression validators raise (see `error_from_validation`)."""

MAX_LENGTH = 500
MAX_DEPTH = 32


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


FUNCTIONS: dict[str, tuple[int, str]] = {
    "abs": (1, "abs(x)"),
    "sin": (1, "sin(x)"),
    "cos": (1, "cos(x)"),
    "exp": (1, "exp(x)"),
    "log": (1, "log(x)"),
    "sqrt": (1, "sqrt(x)"),
    "min": (2, "min(a, b)"),
    "max": (2, "max(a, b)"),
    "clip": (3, "clip(x, lo, hi)"),
    "where": (3, "where(cond, a, b)"),
}
"""name → (number of arguments, signature); `mergeprobe.probing.colorize_render` implements each one."""

COMPARISONS = frozenset({"<", "<=", ">", ">=", "==", "!="})


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
    """A parsed expression: `str()` is the fully parenthesized form; `colorize_render.evaluate` runs it."""

    source: str
    root: Node

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

    def fail(self, detail: str, pos: int) -> InvalidInput:
        return InvalidInput(SLUG, TITLE, detail, field=self.field, position=pos)

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
                raise self.fail(f"`{tok.text}` is a function: call it as {FUNCTIONS[tok.text][1]}", tok.pos)
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
        arity, signature = FUNCTIONS[name.text]
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
    """Parse a colorize expression; any fault is an `invalid-expression` InvalidInput with `field` and position."""
    if not isinstance(text, str):
        raise InvalidInput(SLUG, TITLE, "must be a string expression of v", field=field)
    if len(text) > MAX_LENGTH:
        raise InvalidInput(
            SLUG,
            TITLE,
            f"expression is {len(text)} characters long; the limit is {MAX_LENGTH}",
            field=field,
            position=MAX_LENGTH,
        )
    return Expr(text, _Parser(text, field).parse())


def error_from_validation(error: Mapping[str, Any], field: str) -> InvalidInput | None:
    """The InvalidInput error for one pydantic error dict raised by `Colorize`'s expression validators, else None.

    `field` is the error's `loc` as a dotted request path (``features.colorize.h``).
    """
    if error.get("type") != ERROR_TYPE:
        return None
    ctx = error.get("ctx") or {}
    return InvalidInput(
        SLUG,
        TITLE,
        str(ctx.get("detail", error.get("msg", ""))),
        field=field,
        position=ctx.get("position"),
    )
