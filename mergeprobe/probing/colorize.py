"""The `Colorize` request model: how a dump's feature values become colors (Dump U-Net's Colorization).

Pure Python + pydantic (the API imports it to validate requests; no numpy, no torch here).
Its expressions are parsed by `mergeprobe.probing.colorize_grammar`; what each method and transform
does to the values, formula by formula, is `mergeprobe.probing.colorize_render`, which applies it.

Validation paths
================

* Plain pydantic: ``Colorize(...)`` / ``Colorize.model_validate(...)`` parses
  all six expressions in field validators; a bad one raises a
  ``ValidationError`` whose error has ``type == "invalid_expression"``, ``loc``
  ending in the expression's field (``h``) and ``ctx`` ``{"position": …,
  "detail": …}``. ``max <= min`` is an ordinary ``value_error`` on ``max``.
* API: a request model that nests ``Colorize`` therefore fails while FastAPI
  parses the body (before the route runs).
  ``colorize_grammar.error_from_validation(error, field)`` turns such an error dict
  into the ``invalid-expression`` `InvalidInput` error (``field`` the dotted ``loc``
  path), so the API's validation-error handler can map it.
  ``Colorize.validate(field_prefix)`` raises the same errors for an instance
  that skipped validation (``model_construct``, deserialized job payloads) —
  the worker calls it, and routes may call it again at no cost.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from mergeprobe.probing.colorize_grammar import ERROR_TYPE, TITLE, Expr, parse_expression
from mergeprobe.service.errors import InvalidInput, Unprocessable

Method = Literal["white_black", "red_blue", "custom"]
Transform = Literal["auto01", "auto11", "linear", "sigmoid"]
Space = Literal["rgb", "hsl"]

HSL_FIELDS = ("h", "s", "l")
RGB_FIELDS = ("r", "g", "b")

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
        except InvalidInput as problem:
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
        """Raise the domain error for any fault, with fields under `field_prefix` (`features.colorize.h`).

        Expressions: 400 `invalid-expression` with position; `max <= min`: 422
        `validation-error` on `<prefix>.max` (what pydantic's own check becomes in the API).
        """
        self.expressions(field_prefix, every=True)
        if not self.max > self.min:
            raise Unprocessable(
                "validation-error",
                "Invalid request",
                f"max ({self.max}) must be greater than min ({self.min})",
                field=f"{field_prefix}.max",
            )

    def expressions(self, field_prefix: str = "colorize", *, every: bool = False) -> tuple[Expr, ...]:
        """The parsed expressions of the chosen `space` (h, s, l or r, g, b); all six with `every`."""
        names = HSL_FIELDS + RGB_FIELDS if every else HSL_FIELDS if self.space == "hsl" else RGB_FIELDS
        return tuple(parse_expression(getattr(self, n), field=f"{field_prefix}.{n}") for n in names)
