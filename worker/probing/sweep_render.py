"""Images for sweeps: influence numbers, difference images, flip GIFs, U / X×Y / row grids.

numpy + PIL only (torch is never imported); every function is deterministic.

* `influence` measures how far a variant's image moved from the baseline's, in the
  spirit of SuperMerger's effective elemental checker (share of pixels that changed by
  more than a threshold of 20 on 0–255, the mean absolute difference) plus SSIM.
* `difference_image` and `flip_gif` are what the checker shows: the difference, and a
  two-frame animation that flips between the two images.
* `label_cell` puts a variant's seeds side by side under a label; `u_grid` lays the
  per-block cells out in a U as the layer-influence study does (IN blocks down the left,
  M00 at the bottom, OUT blocks up the right, the baseline in the middle), `xy_grid` an
  X × Y plot and `rows_grid` one row per element.

Layout conventions (unlike `worker.probing.render`'s dark grids, these mimic the white sheets of
the studies): the background and the gaps are white, text is black, a position that is
part of a layout but has no image (a block that was not rendered) is light grey. All
geometry is exposed (`GridGeometry`, `u_layout`, `u_geometry`, `xy_geometry`,
`rows_geometry`, `label_height`) so that callers and tests can find every cell.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from worker.probing.render import clean_label, fit_label, label_font, png_bytes, text_width

__all__ = [
    "BACKGROUND",
    "CELL_GAP",
    "EMPTY_COLOR",
    "GRID_GAP",
    "LABEL_PAD",
    "SSIM_WINDOW",
    "GridGeometry",
    "difference_image",
    "flip_gif",
    "influence",
    "label_cell",
    "label_height",
    "luminance",
    "png_bytes",
    "rows_geometry",
    "rows_grid",
    "ssim_index",
    "u_geometry",
    "u_grid",
    "u_layout",
    "xy_geometry",
    "xy_grid",
]

BACKGROUND = (255, 255, 255)
"""Background, gaps and label strips."""
EMPTY_COLOR = (225, 225, 225)
"""A layout position whose image is missing (e.g. a block that was not rendered)."""
TEXT_COLOR = (0, 0, 0)
GAP = 4
GRID_GAP = GAP
"""Pixels between the cells of `u_grid`, `xy_grid`, `rows_grid` (and between their headers and cells)."""
CELL_GAP = 1
"""Pixels between the seeds inside a `label_cell`."""
LABEL_PAD = 2
"""Padding around every text line."""

SSIM_WINDOW = 7
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2

# difference_image colours
_DIFF_OVER_LIGHT = 150  # green/blue level of a pixel just over the threshold (→ 0 at the largest difference)

# flip_gif label box
_GIF_LABEL_BG = (0, 0, 0)
_GIF_LABEL_FG = (255, 255, 255)


# --- images in, arrays out -------------------------------------------------------------------------------


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _pair(baseline: Image.Image, variant: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    if baseline.size != variant.size:
        raise ValueError(f"images differ in size: baseline {baseline.size}, variant {variant.size}")
    return _rgb(baseline), _rgb(variant)


def luminance(image: Image.Image | np.ndarray) -> np.ndarray:
    """Y = 0.299·R + 0.587·G + 0.114·B, float64 (H, W) in [0, 255]."""
    rgb = _rgb(image) if isinstance(image, Image.Image) else np.asarray(image, dtype=np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


# --- influence -------------------------------------------------------------------------------------------


def _box_mean_valid(a: np.ndarray, k: int) -> np.ndarray:
    """Mean of every fully-inside k×k window of `a` (H, W) → (H − k + 1, W − k + 1), via 2-D cumulative sums."""
    h, w = a.shape
    table = np.zeros((h + 1, w + 1), dtype=np.float64)
    np.cumsum(a, axis=0, out=table[1:, 1:])
    np.cumsum(table[1:, 1:], axis=1, out=table[1:, 1:])
    sums = table[k:, k:] - table[:-k, k:] - table[k:, :-k] + table[:-k, :-k]
    return sums / float(k * k)


def ssim_index(x: np.ndarray, y: np.ndarray, window: int = SSIM_WINDOW) -> float:
    """Mean structural similarity of two equal-shape 2-D arrays on the 0–255 scale.

    scikit-image's defaults for 8-bit data: a `window`×`window` uniform window, data
    range 255 (C1 = (0.01·255)², C2 = (0.03·255)²), sample (co)variances (× N/(N − 1),
    N = window²), the mean over the window positions fully inside the image:

        S = (2·μx·μy + C1)(2·σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))

    Window means come from cumulative sums (each array is first centred on its own
    mean, which leaves the variances unchanged and keeps the sums small). Identical
    inputs give exactly 1.0. Raises ValueError when the image is smaller than the window.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"ssim needs two equal-shape 2-D arrays, got {x.shape} and {y.shape}")
    if min(x.shape) < window:
        raise ValueError(
            f"ssim needs images of at least {window}×{window} pixels, got {x.shape[1]}×{x.shape[0]}"
        )
    if np.array_equal(x, y):
        return 1.0
    mx, my = float(x.mean()), float(y.mean())
    xc, yc = x - mx, y - my
    ux, uy = _box_mean_valid(xc, window), _box_mean_valid(yc, window)
    cov_norm = window * window / (window * window - 1.0)
    vx = cov_norm * (_box_mean_valid(xc * xc, window) - ux * ux)
    vy = cov_norm * (_box_mean_valid(yc * yc, window) - uy * uy)
    vxy = cov_norm * (_box_mean_valid(xc * yc, window) - ux * uy)
    ux += mx
    uy += my
    numerator = (2.0 * ux * uy + SSIM_C1) * (2.0 * vxy + SSIM_C2)
    denominator = (ux * ux + uy * uy + SSIM_C1) * (vx + vy + SSIM_C2)
    return float(np.mean(numerator / denominator))


def influence(baseline: Image.Image, variant: Image.Image, threshold: float = 20.0) -> dict[str, float]:
    """How far `variant` moved from `baseline` (images of equal size, compared in RGB).

    * `changed_share`: the share (0…1) of pixels whose absolute difference exceeds
      `threshold` (0–255 scale, strictly greater) in any channel.
    * `mean_abs_diff`: the mean absolute difference over pixels and channels (0–255).
    * `ssim`: `ssim_index` of the two luminances (1.0 = identical).
    """
    a, b = _pair(baseline, variant)
    diff = np.abs(a - b)
    return {
        "changed_share": float(np.mean(np.any(diff > threshold, axis=-1))),
        "mean_abs_diff": float(diff.mean()),
        "ssim": ssim_index(luminance(a), luminance(b)),
    }


def difference_image(
    baseline: Image.Image, variant: Image.Image, threshold: float = 20.0, *, gain: float = 4.0
) -> Image.Image:
    """The checker's difference picture, on white (like SuperMerger's "white" diff colour).

    Per pixel, d = the largest absolute channel difference (0–255).

    * d ≤ `threshold`: grey, 255 − min(255, gain·d), so identical pixels are white and
      small differences show as faint grey (amplified `gain` times to be visible).
    * d > `threshold`: red, (255, L, L) with L going from 150 (just over the threshold,
      salmon) down to 0 (d = 255, pure red), so the pixels that count in
      `influence`'s `changed_share` stand out and their strength still shows.

    Returns an RGB image the size of the inputs.
    """
    a, b = _pair(baseline, variant)
    d = np.abs(a - b).max(axis=-1)
    grey = 255.0 - np.minimum(255.0, gain * d)
    over = d > threshold
    strength = np.clip((d - threshold) / max(255.0 - threshold, 1e-9), 0.0, 1.0)
    light = _DIFF_OVER_LIGHT * (1.0 - strength)
    out = np.empty(d.shape + (3,), dtype=np.float64)
    out[...] = grey[..., None]
    out[over, 0] = 255.0
    out[over, 1] = light[over]
    out[over, 2] = light[over]
    return Image.fromarray(np.floor(out + 0.5).astype(np.uint8), "RGB")


# --- text ------------------------------------------------------------------------------------------------


def _line_height(font: Any) -> int:
    _, _, _, bottom = font.getbbox("Ag|y0")
    return int(math.ceil(bottom))


def label_height() -> int:
    """Height of one text strip: the font's line plus 2·LABEL_PAD (the label strip of `label_cell`)."""
    return _line_height(label_font()) + 2 * LABEL_PAD


def _draw_text(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, *, center: bool) -> None:
    """`text` (cleaned, cut to fit) in box (x0, y0, x1, y1): vertically centred, left-aligned or centred."""
    font = label_font()
    x0, y0, x1, y1 = box
    text = fit_label(font, clean_label(text), x1 - x0 - 2 * LABEL_PAD)
    if not text:
        return
    width = text_width(font, text)
    x = x0 + (x1 - x0 - width) // 2 if center else x0 + LABEL_PAD
    y = y0 + max(0, (y1 - y0 - _line_height(font)) // 2)
    draw.text((x, y), text, fill=TEXT_COLOR, font=font)


# --- cells -----------------------------------------------------------------------------------------------


def label_cell(images: Sequence[Image.Image], label: str) -> Image.Image:
    """The images (a variant's seeds) side by side, CELL_GAP (1) pixel apart, under a label strip.

    Width = Σ wᵢ + (n − 1); height = `label_height()` + max hᵢ. The strip shows `label`
    (printable ASCII, others as `?`, cut with `..` to the width), left-aligned; images are
    top-aligned at x = Σ_{j<i} (wⱼ + 1), y = `label_height()`; gaps are white.
    """
    if not images:
        raise ValueError("label_cell needs at least one image")
    rgb = [image.convert("RGB") for image in images]
    strip = label_height()
    width = sum(image.width for image in rgb) + CELL_GAP * (len(rgb) - 1)
    height = strip + max(image.height for image in rgb)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    x = 0
    for image in rgb:
        canvas.paste(image, (x, strip))
        x += image.width + CELL_GAP
    _draw_text(ImageDraw.Draw(canvas), (0, 0, width, strip), label, center=False)
    return canvas


@dataclass(frozen=True)
class GridGeometry:
    """Pixel geometry of a grid of equal cells: cell (row, col) has its top-left corner at
    (left + col·(cell_w + gap), top + row·(cell_h + gap)); the image is width × height,
    i.e. width = left + cols·cell_w + (cols − 1)·gap, height = top + rows·cell_h + (rows − 1)·gap.
    `left` / `top` are the header column / rows (0 for `u_grid`), the gap after them included.
    """

    rows: int
    cols: int
    cell_w: int
    cell_h: int
    left: int
    top: int
    gap: int = GRID_GAP

    @property
    def width(self) -> int:
        return self.left + self.cols * self.cell_w + (self.cols - 1) * self.gap

    @property
    def height(self) -> int:
        return self.top + self.rows * self.cell_h + (self.rows - 1) * self.gap

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of cell (row, col)."""
        return self.left + col * (self.cell_w + self.gap), self.top + row * (self.cell_h + self.gap)

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of cell (row, col), x1 / y1 exclusive (a PIL crop box)."""
        x, y = self.origin(row, col)
        return x, y, x + self.cell_w, y + self.cell_h


def _cell_size(images: Sequence[Image.Image], what: str) -> tuple[int, int]:
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise ValueError(f"{what}: all cells must have the same size, got {sorted(sizes)}")
    return sizes.pop()


# --- U layout --------------------------------------------------------------------------------------------


def _kind(block: str) -> str:
    if block.startswith("IN"):
        return "in"
    if block.startswith("OUT"):
        return "out"
    if block.startswith("M"):
        return "mid"
    return "other"


def _u_shape(arch_blocks: Sequence[str]) -> tuple[int, int]:
    """(arm, middle): rows of the U's arms and number of middle columns."""
    blocks = set(arch_blocks)
    arm = max(sum(_kind(b) == "in" for b in blocks), sum(_kind(b) == "out" for b in blocks), 1)
    return arm, max(1, sum(_kind(b) == "mid" for b in blocks))


def u_layout(arch_blocks: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(row, col) of every block of `arch_blocks` and of "baseline" in the study's U.

    With n_in IN blocks, n_out OUT blocks and n_mid middle blocks (in the order given):

    * columns: 0 = IN, 1 … m = middle (m = max(1, n_mid)), m + 1 = OUT; so 3 columns for
      sd1 / sdxl;
    * rows: arm = max(n_in, n_out) rows for the arms plus one bottom row for the middle
      blocks: 13 for sd1, 10 for sdxl;
    * INi at (i, 0), going down (IN00 at the top); OUTk at (arm − 1 − k, m + 1), going
      up (OUT00 at the bottom of the right arm, the last OUT block at the top);
    * middle blocks (M00) on the bottom row (arm, 1 …): the bottom of the U;
    * "baseline" in the central middle column (1 + (m − 1) // 2) at row (rows − 1) // 2
      (row 6 of 13 for sd1, row 4 of 10 for sdxl);
    * any other block (e.g. BASE) in the middle columns from the top, row-major, skipping
      the baseline's position (ValueError when they do not fit above the bottom row).
    """
    blocks = list(dict.fromkeys(arch_blocks))
    if "baseline" in blocks:
        raise ValueError('"baseline" is reserved for the baseline cell')
    ins, outs, mids, others = (
        [b for b in blocks if _kind(b) == kind] for kind in ("in", "out", "mid", "other")
    )
    arm, middle = _u_shape(blocks)
    rows = arm + 1
    center_col = 1 + (middle - 1) // 2
    layout: dict[str, tuple[int, int]] = {"baseline": ((rows - 1) // 2, center_col)}
    for i, block in enumerate(ins):
        layout[block] = (i, 0)
    for k, block in enumerate(outs):
        layout[block] = (arm - 1 - k, middle + 1)
    for j, block in enumerate(mids):
        layout[block] = (arm, 1 + j)
    free = [(r, c) for r in range(arm) for c in range(1, middle + 1) if (r, c) != layout["baseline"]]
    if len(others) > len(free):
        raise ValueError(f"{len(others)} non-U-Net blocks do not fit in the U's middle column(s)")
    for block, position in zip(others, free, strict=False):
        layout[block] = position
    return layout


def u_geometry(arch_blocks: Sequence[str], cell_size: tuple[int, int]) -> GridGeometry:
    """`u_grid`'s geometry: the rows × cols of `u_layout` (arm + 1 rows, middle + 2 columns),
    cells of `cell_size` (w, h), GRID_GAP apart, no margin (left = top = 0). For sd1:
    width = 3·w + 2·4, height = 13·h + 12·4; for sdxl: 3·w + 2·4, 10·h + 9·4."""
    arm, middle = _u_shape(arch_blocks)
    return GridGeometry(
        rows=arm + 1, cols=middle + 2, cell_w=cell_size[0], cell_h=cell_size[1], left=0, top=0
    )


def u_grid(cells: dict[str, Image.Image], baseline: Image.Image, arch_blocks: Sequence[str]) -> Image.Image:
    """The layer-influence study's U: every block's cell at its `u_layout` position.

    `cells` maps block → `label_cell` output (all the same size). `baseline` is the
    baseline's cell of that size, or the bare seed strip that `label_cell(..., "baseline")`
    turns into one. Geometry: `u_geometry(arch_blocks, cell size)`. Blocks of
    `arch_blocks` without a cell are light grey (EMPTY_COLOR); unused positions and the
    gaps are white. ValueError for a cell whose block is not in `arch_blocks`.
    """
    layout = u_layout(arch_blocks)
    unknown = sorted(set(cells) - set(layout) - {"baseline"})
    if unknown:
        raise ValueError(f"cells for blocks not in arch_blocks: {unknown}")
    images = {block: image.convert("RGB") for block, image in cells.items() if block != "baseline"}
    size = _cell_size(list(images.values()), "u_grid") if images else None
    base = baseline.convert("RGB")
    if size is None:
        size = base.size
    if base.size != size:
        labelled = label_cell([base], "baseline")
        if labelled.size != size:
            raise ValueError(f"baseline {base.size} fits neither the cell size {size} nor its image strip")
        base = labelled
    images["baseline"] = base
    geometry = u_geometry(arch_blocks, size)
    canvas = Image.new("RGB", (geometry.width, geometry.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for block, (row, col) in layout.items():
        x, y = geometry.origin(row, col)
        if block in images:
            canvas.paste(images[block], (x, y))
        else:
            draw.rectangle((x, y, x + size[0] - 1, y + size[1] - 1), fill=EMPTY_COLOR)
    return canvas


# --- X × Y and rows --------------------------------------------------------------------------------------


def xy_geometry(
    cell_size: tuple[int, int],
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    *,
    x_title: str,
    y_title: str,
) -> GridGeometry:
    """`xy_grid`'s geometry (rows = len(y_labels), cols = len(x_labels)).

    top = (2 if x_title else 1)·`label_height()` + GRID_GAP (a title line, then the x
    labels); left = the widest of the y labels and y_title (as drawn) + 2·LABEL_PAD + GRID_GAP.
    """
    font = label_font()
    widest = max(text_width(font, clean_label(text)) for text in [*y_labels, y_title])
    lines = 2 if x_title else 1
    return GridGeometry(
        rows=len(y_labels),
        cols=len(x_labels),
        cell_w=cell_size[0],
        cell_h=cell_size[1],
        left=widest + 2 * LABEL_PAD + GRID_GAP,
        top=lines * label_height() + GRID_GAP,
    )


def xy_grid(
    cells: dict[tuple[int, int], Image.Image],
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    *,
    x_title: str,
    y_title: str,
) -> Image.Image:
    """An X × Y plot: cell (x, y) (x = column index into x_labels, y = row index into y_labels).

    Geometry: `xy_geometry`; cell (x, y) is at `geometry.origin(y, x)`. The x title
    (if any) is centred over the cells on the top line, the x labels centred over their
    columns (cut to the cell width) on the next; the y title sits in the corner on the
    x-label line, the y labels in the left column, vertically centred on their rows.
    Missing cells are light grey. ValueError for cells outside the grid or of unequal size.
    """
    if not x_labels or not y_labels:
        raise ValueError("xy_grid needs at least one x label and one y label")
    outside = sorted(k for k in cells if not (0 <= k[0] < len(x_labels) and 0 <= k[1] < len(y_labels)))
    if outside:
        raise ValueError(f"cells outside the {len(x_labels)} × {len(y_labels)} grid: {outside}")
    if not cells:
        raise ValueError("xy_grid needs at least one cell")
    images = {key: image.convert("RGB") for key, image in cells.items()}
    size = _cell_size(list(images.values()), "xy_grid")
    g = xy_geometry(size, x_labels, y_labels, x_title=x_title, y_title=y_title)
    canvas = Image.new("RGB", (g.width, g.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    line = label_height()
    label_top = g.top - GRID_GAP - line
    if x_title:
        _draw_text(draw, (g.left, 0, g.width, line), x_title, center=True)
    _draw_text(draw, (0, label_top, g.left - GRID_GAP, label_top + line), y_title, center=False)
    for x, label in enumerate(x_labels):
        x0, _ = g.origin(0, x)
        _draw_text(draw, (x0, label_top, x0 + g.cell_w, label_top + line), label, center=True)
    for y, label in enumerate(y_labels):
        _, y0 = g.origin(y, 0)
        _draw_text(draw, (0, y0, g.left - GRID_GAP, y0 + g.cell_h), label, center=False)
    for y in range(len(y_labels)):
        for x in range(len(x_labels)):
            x0, y0 = g.origin(y, x)
            if (x, y) in images:
                canvas.paste(images[(x, y)], (x0, y0))
            else:
                draw.rectangle((x0, y0, x0 + g.cell_w - 1, y0 + g.cell_h - 1), fill=EMPTY_COLOR)
    return canvas


def rows_geometry(labels: Sequence[str], cell_size: tuple[int, int]) -> GridGeometry:
    """`rows_grid`'s geometry for row labels `labels` ("baseline" first, then the elements):
    one column, left = the widest label + 2·LABEL_PAD + GRID_GAP, top = 0."""
    font = label_font()
    widest = max(text_width(font, clean_label(text)) for text in labels)
    return GridGeometry(
        rows=len(labels),
        cols=1,
        cell_w=cell_size[0],
        cell_h=cell_size[1],
        left=widest + 2 * LABEL_PAD + GRID_GAP,
        top=0,
    )


def rows_grid(rows: Sequence[tuple[str, Image.Image]], baseline: Image.Image) -> Image.Image:
    """Per-element sweeps: a row "baseline" (the baseline's seed strip) first, then one row per
    (label, image) in order, the label left of its image, vertically centred.

    All images must have the same size. Geometry: `rows_geometry(["baseline", *labels], size)`;
    the baseline row is row 0, rows[i] is row i + 1.
    """
    entries = [("baseline", baseline.convert("RGB"))] + [
        (label, image.convert("RGB")) for label, image in rows
    ]
    size = _cell_size([image for _, image in entries], "rows_grid")
    g = rows_geometry([label for label, _ in entries], size)
    canvas = Image.new("RGB", (g.width, g.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for row, (label, image) in enumerate(entries):
        x, y = g.origin(row, 0)
        canvas.paste(image, (x, y))
        _draw_text(draw, (0, y, g.left - GRID_GAP, y + g.cell_h), label, center=False)
    return canvas


# --- GIF -------------------------------------------------------------------------------------------------


def _corner_label(image: Image.Image, text: str) -> Image.Image:
    """A copy of `image` with `text` in a black box at the top-left corner (cut to the width)."""
    frame = image.convert("RGB")
    font = label_font()
    text = fit_label(font, clean_label(text), frame.width - 2 * LABEL_PAD)
    if text:
        draw = ImageDraw.Draw(frame)
        width = text_width(font, text) + 2 * LABEL_PAD
        draw.rectangle((0, 0, min(width, frame.width) - 1, label_height() - 1), fill=_GIF_LABEL_BG)
        draw.text((LABEL_PAD, LABEL_PAD), text, fill=_GIF_LABEL_FG, font=font)
    return frame


def flip_gif(
    baseline: Image.Image,
    variant: Image.Image,
    *,
    labels: tuple[str, str] = ("baseline", "variant"),
    duration_ms: int = 600,
) -> bytes:
    """A looping two-frame GIF, baseline ↔ variant, each frame labelled in its top-left corner
    (white text in a black box), `duration_ms` per frame, adaptive 256-colour palette.

    Two frames as long as the labelled frames differ (PIL merges identical frames).
    """
    if baseline.size != variant.size:
        raise ValueError(f"images differ in size: baseline {baseline.size}, variant {variant.size}")
    frames = [
        _corner_label(baseline, labels[0]).quantize(256, dither=Image.Dither.NONE),
        _corner_label(variant, labels[1]).quantize(256, dither=Image.Dither.NONE),
    ]
    buffer = io.BytesIO()
    frames[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=int(duration_ms),
        loop=0,
        disposal=1,
    )
    return buffer.getvalue()
