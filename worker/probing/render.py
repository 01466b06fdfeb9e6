"""Images from captured tensors: feature grids, attention grids, heat-map overlays, PNG bytes.

numpy + PIL only. Tensors may be numpy arrays or anything with torch's
`.detach().cpu().float().numpy()` (converted by duck typing; torch is never imported).
Every function is deterministic: same input, same pixels.

Layout conventions:

* Gaps and margins are `GAP_COLOR` (dark grey 40, 40, 40), so they stay visible
  against black (white_black) and white (red_blue) tiles.
* Auto transforms (`auto01`, `auto11`) normalize every tile / cell on its own
  statistics, as Dump U-Net does (it colorizes each channel map separately).
  Use `linear` with fixed min/max to compare tiles on one scale.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mergeprobe.probing.colorize import Colorize
from mergeprobe.probing.colorize_render import colorize as colorize_values

GAP_COLOR = (40, 40, 40)
TEXT_COLOR = (230, 230, 230)
MIN_CELL_PX = 32
"""Attention cells are upscaled by an integer factor until at least this many pixels high."""
LABEL_PAD = 2


def _as_array(x: Any, ndim: int, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, converted without importing torch
        x = x.detach().cpu().float().numpy()
    array = np.asarray(x, dtype=np.float32)
    if array.ndim != ndim or 0 in array.shape:
        raise ValueError(f"{what}: expected a non-empty {ndim}-D array, got shape {array.shape}")
    return array


def _tile(tiles: np.ndarray, rows: int, cols: int, gap: int = 1) -> np.ndarray:
    """(N, h, w, 3) uint8 tiles → one (rows·h + (rows−1)·gap, cols·w + (cols−1)·gap, 3) canvas, row-major.

    Cells after the N-th and the gaps are GAP_COLOR.
    """
    n, h, w, _ = tiles.shape
    padded = np.empty((rows * cols, h + gap, w + gap, 3), dtype=np.uint8)
    padded[...] = GAP_COLOR
    padded[:n, :h, :w] = tiles
    canvas = padded.reshape(rows, cols, h + gap, w + gap, 3).transpose(0, 2, 1, 3, 4)
    canvas = canvas.reshape(rows * (h + gap), cols * (w + gap), 3)
    return np.ascontiguousarray(canvas[: canvas.shape[0] - gap, : canvas.shape[1] - gap])


def grid_shape(tiles: int) -> tuple[int, int]:
    """(rows, cols) of a near-square grid: cols = ceil(sqrt(n)), rows = ceil(n / cols)."""
    cols = math.ceil(math.sqrt(tiles))
    return math.ceil(tiles / cols), cols


def feature_grid(feature: Any, colorize: Colorize) -> Image.Image:
    """One block's features (C, H, W) as a grid image (RGB; greyscale "L" for white_black): the
    channel mean first, then channels 0…C−1.

    C + 1 tiles of H×W in `grid_shape(C + 1)` (row-major), separated by 1-pixel
    GAP_COLOR gaps: width = cols·W + cols − 1, height = rows·H + rows − 1.
    Every tile is colorized on its own (auto transforms per tile).
    """
    array = _as_array(feature, 3, "feature")
    mean = array.astype(np.float64).mean(axis=0, keepdims=True)
    stack = np.concatenate([mean, array.astype(np.float64)], axis=0)
    rows, cols = grid_shape(stack.shape[0])
    tiled = _tile(colorize_values(stack, colorize), rows, cols)
    if colorize.method == "white_black":
        # Grey levels in all three channels: a one-channel PNG says the same, 3× faster to encode.
        return Image.fromarray(np.ascontiguousarray(tiled[..., 0]), "L")
    return Image.fromarray(tiled, "RGB")


# --- attention grid --------------------------------------------------------------------------------------


def label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font: nothing to download or install."""
    return ImageFont.load_default()


def clean_label(text: str) -> str:
    """Printable ASCII only (the built-in font has no other glyphs)."""
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in str(text))


def text_width(font: Any, text: str) -> int:
    left, _, right, _ = font.getbbox(text) if text else (0, 0, 0, 0)
    return int(math.ceil(right - left))


def fit_label(font: Any, text: str, width: int) -> str:
    """`text`, cut and ended with `..` when wider than `width` pixels."""
    if text_width(font, text) <= width:
        return text
    while text and text_width(font, text + "..") > width:
        text = text[:-1]
    return text + ".." if text else ""


@dataclass(frozen=True)
class AttentionLayout:
    """Pixel geometry of `attention_grid`: cells at (left + t·(cell_w+1), top + h·(cell_h+1))."""

    scale: int
    cell_w: int
    cell_h: int
    left: int  # head-index column, its padding included
    top: int  # token-label strip, its padding included
    width: int
    height: int


def attention_layout(heads: int, tokens: int, map_h: int, map_w: int) -> AttentionLayout:
    """The geometry for `heads` rows × `tokens` columns of map_h × map_w maps.

    scale = ceil(MIN_CELL_PX / map_h) (at least 1), nearest-neighbour; the label
    strip is as high as the font's line plus 2·LABEL_PAD; the head column as wide as
    the widest head index plus 2·LABEL_PAD.
    """
    font = label_font()
    scale = max(1, math.ceil(MIN_CELL_PX / map_h))
    cell_w, cell_h = map_w * scale, map_h * scale
    _, text_top, _, text_bottom = font.getbbox("Ag|y0")
    top = int(math.ceil(text_bottom)) + 2 * LABEL_PAD
    left = text_width(font, str(heads - 1)) + 2 * LABEL_PAD
    width = left + tokens * (cell_w + 1) - 1
    height = top + heads * (cell_h + 1) - 1
    return AttentionLayout(scale, cell_w, cell_h, left, top, width, height)


def attention_grid(probs: Any, token_labels: list[str], colorize: Colorize) -> Image.Image:
    """Cross-attention maps (heads, tokens, H, W): a row per head, a column per prompt token.

    Token labels (printable ASCII, others as `?`, cut with `..` to the column
    width) above the columns, head indices 0… at the left, 1-pixel gaps; each
    cell colorized on its own and upscaled by `attention_layout(...).scale`
    (nearest neighbour). Geometry: `attention_layout`.
    """
    array = _as_array(probs, 4, "probs")
    heads, tokens, map_h, map_w = array.shape
    if len(token_labels) != tokens:
        raise ValueError(f"{tokens} token maps but {len(token_labels)} token labels")
    layout = attention_layout(heads, tokens, map_h, map_w)
    cells = colorize_values(array.reshape(heads * tokens, map_h, map_w).astype(np.float64), colorize)
    cells = cells.repeat(layout.scale, axis=1).repeat(layout.scale, axis=2)
    grid = _tile(cells, heads, tokens)

    canvas = np.empty((layout.height, layout.width, 3), dtype=np.uint8)
    canvas[...] = GAP_COLOR
    canvas[layout.top :, layout.left :] = grid
    image = Image.fromarray(canvas, "RGB")

    draw = ImageDraw.Draw(image)
    font = label_font()
    for t, label in enumerate(token_labels):
        text = fit_label(font, clean_label(label), layout.cell_w - 2)
        if text:
            x = layout.left + t * (layout.cell_w + 1)
            draw.text((x, LABEL_PAD), text, fill=TEXT_COLOR, font=font)
    for h in range(heads):
        y = layout.top + h * (layout.cell_h + 1) + LABEL_PAD
        draw.text((LABEL_PAD, y), str(h), fill=TEXT_COLOR, font=font)
    return image


# --- heat-map overlay ------------------------------------------------------------------------------------

_JET_STOPS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_COLORS = np.array(
    [
        [0.0, 0.0, 0.5],  # dark blue
        [0.0, 0.0, 1.0],  # blue
        [0.0, 1.0, 1.0],  # cyan
        [1.0, 1.0, 0.0],  # yellow
        [1.0, 0.0, 0.0],  # red
        [0.5, 0.0, 0.0],  # dark red
    ]
)


def jet(x: np.ndarray) -> np.ndarray:
    """The classic "jet" colormap, piecewise linear: x in [0, 1] (clipped) → (..., 3) floats in [0, 1]."""
    x = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0), 0.0, 1.0)
    return np.stack([np.interp(x, _JET_STOPS, _JET_COLORS[:, c]) for c in range(3)], axis=-1)


def normalize_heat(heat: Any, mode: Literal["max", "minmax", "none"] = "max") -> np.ndarray:
    """A heat map scaled to [0, 1] (float64; non-finite values count as 0).

    `max` (DAAM's convention): heat / max(heat), negatives → 0, all ≤ 0 → 0, so an
    all-ones map stays 1 and an all-zeros map 0. `minmax`: (heat − min) / (max − min),
    a constant map → 0. `none`: clipped to [0, 1] as it is.
    """
    h = np.asarray(heat, dtype=np.float64)
    h = np.where(np.isfinite(h), h, 0.0)
    if mode == "max":
        top = h.max() if h.size else 0.0
        return np.clip(h / top, 0.0, 1.0) if top > 0 else np.zeros_like(h)
    if mode == "minmax":
        lo, hi = (h.min(), h.max()) if h.size else (0.0, 0.0)
        return (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    if mode == "none":
        return np.clip(h, 0.0, 1.0)
    raise ValueError(f"unknown normalization {mode!r}")


def heatmap_overlay(
    image: Image.Image,
    heat: Any,
    alpha: float = 0.5,
    *,
    normalize: Literal["max", "minmax", "none"] = "max",
) -> Image.Image:
    """DAAM-style overlay: `heat` (h, w) normalized (`normalize_heat`), bilinearly upsampled to the
    image size, colored with `jet`, and blended: out = (1 − alpha)·image + alpha·color, rounded.

    Returns an RGB image the size of `image`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = image.convert("RGB")
    heat_array = _as_array(heat, 2, "heat")
    unit = normalize_heat(heat_array, normalize).astype(np.float32)
    resized = Image.fromarray(unit, "F").resize(base.size, Image.Resampling.BILINEAR)
    color = jet(np.asarray(resized, dtype=np.float64)) * 255.0
    blended = (1.0 - alpha) * np.asarray(base, dtype=np.float64) + alpha * color
    return Image.fromarray(np.floor(np.clip(blended, 0.0, 255.0) + 0.5).astype(np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG (no optimize pass, zlib level 1: fast; deterministic)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()
