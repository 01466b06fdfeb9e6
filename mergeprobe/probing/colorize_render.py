"""How feature maps become pixels: a `Colorize` spec applied to arrays with numpy.

numpy, no torch: the worker's renderers (`worker/probing/render.py`) call `colorize`; the API never
imports this module. The spec is the request model `mergeprobe.probing.colorize.Colorize`; its
expressions are parsed by `mergeprobe.probing.colorize_grammar` and evaluated here.

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

Evaluating expressions
======================

Evaluation is float64 with numpy's floating-point warnings suppressed:
``log(-1)``, ``sqrt(-1)``, ``0/0`` give NaN and ``2**1e6``, ``1/0`` give ±inf.
NaN propagates through later operations and the final result has NaN replaced
by 0; infinities are kept (``colorize`` clips them to the channel range).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mergeprobe.probing.colorize import Colorize
from mergeprobe.probing.colorize_grammar import COMPARISONS, Binary, Call, Expr, Node, Number, Unary, Variable


def _clip(x: Any, lo: Any, hi: Any) -> Any:
    return np.minimum(np.maximum(x, lo), hi)


def _where(cond: Any, a: Any, b: Any) -> Any:
    return np.where(np.abs(cond) > 0, a, b)  # NaN > 0 is False


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": np.abs,
    "sin": np.sin,
    "cos": np.cos,
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "min": np.minimum,
    "max": np.maximum,
    "clip": _clip,
    "where": _where,
}
"""The numpy implementation of each function of `colorize_grammar.FUNCTIONS`."""

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
        return _FUNCTIONS[node.name](*(_evaluate(a, v) for a in node.args))
    raise TypeError(f"not an expression node: {node!r}")  # pragma: no cover


def evaluate(expr: Expr, v: np.ndarray | float) -> np.ndarray:
    """`expr` at every element of `v`: a new float64 array shaped like `v`, NaN replaced by 0.

    Numbers broadcast (`"1.0"` gives an array of ones). ±inf are kept.
    """
    values = np.asarray(v, dtype=np.float64)
    with np.errstate(all="ignore"):
        result = np.broadcast_to(np.asarray(_evaluate(expr.root, values), dtype=np.float64), values.shape)
        return np.where(np.isnan(result), 0.0, result)


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
    so an unvalidated spec fails with the InvalidInput error under `field_prefix`.
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
        first, second, third = (evaluate(e, v) for e in spec.expressions(field_prefix))
        if spec.space == "hsl":
            rgb = hsl_to_rgb(first, second, third)
        else:
            rgb = np.stack([first, second, third], axis=-1)
    return to_bytes(rgb)
