"""Images for sweeps: influence numbers, difference images, flip GIFs, U / X×Y / row grids.

numpy + PIL only (torch is never imported); every function is deterministic.

* `influence` measures how far a variant's image moved from the baseline's, in the
  spirit of SuperMerger's effective elemental checker (share of pixels that changed by
  more than a threshold of 20 on 0–255, the mean absolute difference) plus SSIM.
* `difference_image` and `flip_gif` are what the checker shows: the difference, and a
  two-frame animation that flips between the two images.
* A `Cell` is what one grid position shows: a variant's images side by side at their own size
  (one per seed), its label over them with its influence figure ("changed 12.3 %", the mean
  `changed_share` over its seeds, as influence.csv and the ranking have it), and each image's
  seed under it. `u_grid` lays the per-block cells out in a U as the layer-influence study does
  (IN blocks down the left, M00 at the bottom, OUT blocks up the right, the baseline in the
  middle), `xy_grid` an X × Y plot and `rows_grid` one row per element.

Layout conventions (unlike `worker.probing.render`'s dark grids, these mimic the white sheets of
the studies): the background and the gaps are white, text is black, a position that is
part of a layout but has no image (a block that was not rendered) is light grey. Images are
never shrunk: a cell is at least as large as its images (and MIN_CELL_WIDTH wide). Text is never
cut: labels wrap over lines (`worker.probing.render.wrap_label`) to the width they have (a cell,
a column), and every strip is as high as the most lines drawn in it, the same for every cell of
a grid (`CellStrips`) so that images line up. All geometry and text is exposed (`GridGeometry`,
`u_layout`, `u_geometry`, `xy_headers`, `xy_geometry`, `rows_headers`, `rows_geometry`,
`cell_text`, `cell_strips`, `render_cells`) so that callers and tests can find every cell and
every line.
"""

from __future__ import annotations

import io
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

from worker.probing.render import (
    LABEL_PAD,
    clean_label,
    draw_lines,
    fit_label,
    label_font,
    png_bytes,
    text_block_height,
    text_width,
    wrap_label,
)

__all__ = [
    "BACKGROUND",
    "CELL_GAP",
    "EMPTY_COLOR",
    "GRID_GAP",
    "LABEL_PAD",
    "MIN_CELL_WIDTH",
    "SSIM_WINDOW",
    "Cell",
    "CellStrips",
    "CellText",
    "GridGeometry",
    "Headers",
    "cell_strips",
    "cell_text",
    "difference_image",
    "flip_gif",
    "influence",
    "influence_text",
    "luminance",
    "png_bytes",
    "render_cell",
    "render_cells",
    "rows_geometry",
    "rows_grid",
    "rows_headers",
    "ssim_index",
    "u_geometry",
    "u_grid",
    "u_layout",
    "xy_geometry",
    "xy_grid",
    "xy_headers",
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
"""Pixels between the seeds inside a cell."""
MIN_CELL_WIDTH = 64
"""A cell is at least this wide (its images left-aligned), so that its text has room next to tiny images."""

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


# --- cells ---------------------------------------------------------------------------------------------


def influence_text(changed_share: float) -> str:
    """A variant's influence figure as its cell shows it: "changed 12.3 %" (share × 100, one decimal)."""
    return f"changed {100.0 * changed_share:.1f} %"


@dataclass(frozen=True)
class Cell:
    """What one grid position shows: `images` (a variant's, one per seed) side by side at their own
    size, CELL_GAP apart, top-aligned; `label` over them, then the influence figure
    (`influence_text(changed_share)`) when known; "seed N" under each image when `seeds` are given
    (one per image)."""

    images: tuple[Image.Image, ...]
    label: str
    seeds: tuple[int, ...] = ()
    changed_share: float | None = None

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("a cell needs at least one image")
        if self.seeds and len(self.seeds) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.seeds)} seeds")

    @property
    def image_lefts(self) -> tuple[int, ...]:
        """x of each image in the cell: Σ_{j<i} (wⱼ + CELL_GAP)."""
        lefts, x = [], 0
        for image in self.images:
            lefts.append(x)
            x += image.width + CELL_GAP
        return tuple(lefts)

    @property
    def width(self) -> int:
        """Σ wᵢ + (n − 1)·CELL_GAP, at least MIN_CELL_WIDTH."""
        return max(
            sum(image.width for image in self.images) + CELL_GAP * (len(self.images) - 1), MIN_CELL_WIDTH
        )

    @property
    def image_height(self) -> int:
        return max(image.height for image in self.images)


@dataclass(frozen=True)
class CellText:
    """The text of a cell, in lines no wider than the room they have: `caption` over the images (the
    label's lines, then the influence figure's), `seeds` under them (each image's "seed N" lines)."""

    caption: tuple[str, ...]
    seeds: tuple[tuple[str, ...], ...]


def cell_text(cell: Cell) -> CellText:
    """The caption wrapped to the cell's width less 2·LABEL_PAD; each seed to the room its image has
    (to the next image, the last one to the cell's right edge) less 2·LABEL_PAD."""
    font = label_font()
    room = cell.width - 2 * LABEL_PAD
    caption = wrap_label(font, cell.label, room)
    if cell.changed_share is not None:
        caption += wrap_label(font, influence_text(cell.changed_share), room)
    rights = [*cell.image_lefts[1:], cell.width + CELL_GAP]
    seeds = tuple(
        tuple(wrap_label(font, f"seed {seed}", right - CELL_GAP - left - 2 * LABEL_PAD))
        for seed, left, right in zip(cell.seeds, cell.image_lefts, rights, strict=False)
    )
    return CellText(tuple(caption), seeds)


@dataclass(frozen=True)
class CellStrips:
    """The heights of a grid's cell strips: the caption strip over the images and the seed strip
    under them, each `text_block_height` of the most lines any cell of the grid draws there."""

    caption: int
    seeds: int


def cell_strips(texts: Sequence[CellText]) -> CellStrips:
    font = label_font()
    caption = max(len(text.caption) for text in texts)
    seeds = max((len(lines) for text in texts for lines in text.seeds), default=0)
    return CellStrips(text_block_height(caption, font), text_block_height(seeds, font))


def render_cell(cell: Cell, text: CellText, strips: CellStrips) -> Image.Image:
    """`cell` drawn: width `cell.width`, height strips.caption + cell.image_height + strips.seeds;
    the caption left-aligned in the top strip, image i at (image_lefts[i], strips.caption), its
    seed lines centred under it; white elsewhere."""
    height = strips.caption + cell.image_height + strips.seeds
    canvas = Image.new("RGB", (cell.width, height), BACKGROUND)
    for image, x in zip(cell.images, cell.image_lefts, strict=True):
        canvas.paste(image.convert("RGB"), (x, strips.caption))
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    draw_lines(draw, (0, 0, cell.width, strips.caption), text.caption, font=font, fill=TEXT_COLOR)
    seeds_top = strips.caption + cell.image_height
    for image, x, lines in zip(cell.images, cell.image_lefts, text.seeds, strict=False):
        box = (x, seeds_top, x + image.width, height)
        draw_lines(draw, box, lines, font=font, fill=TEXT_COLOR, center=True)
    return canvas


K = TypeVar("K", bound=Hashable)


def render_cells(cells: Mapping[K, Cell]) -> dict[K, Image.Image]:
    """Every cell drawn as a grid draws it: with the same `cell_strips` for all, so that their images
    line up (a grid's position is the largest of these images, each one top-left in it)."""
    texts = {key: cell_text(cell) for key, cell in cells.items()}
    strips = cell_strips(list(texts.values()))
    return {key: render_cell(cell, texts[key], strips) for key, cell in cells.items()}


@dataclass(frozen=True)
class GridGeometry:
    """Pixel geometry of a grid of equal positions: position (row, col) has its top-left corner at
    (left + col·(cell_w + gap), top + row·(cell_h + gap)); the image is width × height,
    i.e. width = left + cols·cell_w + (cols − 1)·gap, height = top + rows·cell_h + (rows − 1)·gap.
    A position is as large as the largest cell drawn (each cell top-left in it), and as high as
    its row label's lines. `left` / `top` are the header column / rows (0 for `u_grid`), the gap
    after them included.
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


def _slot_size(images: Sequence[Image.Image]) -> tuple[int, int]:
    """The size of a grid position: the widest and the highest of the drawn cells."""
    return max(image.width for image in images), max(image.height for image in images)


def _paste(canvas: Image.Image, image: Image.Image | None, box: tuple[int, int, int, int]) -> None:
    """`image` top-left in the position `box`; a missing image leaves the position EMPTY_COLOR."""
    if image is None:
        ImageDraw.Draw(canvas).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=EMPTY_COLOR)
    else:
        canvas.paste(image, box[:2])


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


def u_grid(cells: Mapping[str, Cell], baseline: Cell, arch_blocks: Sequence[str]) -> Image.Image:
    """The layer-influence study's U: every block's cell at its `u_layout` position, the baseline's
    (label "baseline", its seeds, no figure) in the middle.

    `cells` maps block → its `Cell` (label the block, its seeds, its changed share). Cells are
    drawn by `render_cells` (baseline included); geometry: `u_geometry(arch_blocks, the largest
    drawn cell's size)`. Blocks of `arch_blocks` without a cell are light grey (EMPTY_COLOR);
    unused positions and the gaps are white. ValueError for a cell whose block is not in
    `arch_blocks`.
    """
    layout = u_layout(arch_blocks)
    unknown = sorted(set(cells) - set(layout))
    if unknown:
        raise ValueError(f"cells for blocks not in arch_blocks: {unknown}")
    drawn = render_cells({**cells, "baseline": baseline})
    geometry = u_geometry(arch_blocks, _slot_size(list(drawn.values())))
    canvas = Image.new("RGB", (geometry.width, geometry.height), BACKGROUND)
    for block, (row, col) in layout.items():
        _paste(canvas, drawn.get(block), geometry.box(row, col))
    return canvas


# --- X × Y and rows --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Headers:
    """The text of a grid's headers, in lines: the title over the columns, each column's label, each
    row's label, and the corner's text (left of the column labels, over the row labels)."""

    title: tuple[str, ...] = ()
    columns: tuple[tuple[str, ...], ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    corner: tuple[str, ...] = ()

    @property
    def title_height(self) -> int:
        return text_block_height(len(self.title), label_font())

    @property
    def column_height(self) -> int:
        """The strip of the column labels and the corner: their most lines (at least one)."""
        lines = max(1, len(self.corner), *(len(label) for label in self.columns))
        return text_block_height(lines, label_font())

    @property
    def row_width(self) -> int:
        """The column of the row labels and the corner: their widest line + 2·LABEL_PAD."""
        font = label_font()
        lines = [line for label in (*self.rows, self.corner) for line in label]
        return max((text_width(font, line) for line in lines), default=0) + 2 * LABEL_PAD

    def row_height(self, cell_h: int) -> int:
        """A row's height: the cells' or its label's lines', the higher."""
        font = label_font()
        return max([cell_h, *(text_block_height(len(label), font) for label in self.rows)])


def _wrapped(texts: Sequence[str], width: int) -> tuple[tuple[str, ...], ...]:
    font = label_font()
    return tuple(tuple(wrap_label(font, text, width - 2 * LABEL_PAD)) for text in texts)


def xy_headers(
    cell_size: tuple[int, int],
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    *,
    x_title: str,
    y_title: str,
) -> Headers:
    """`xy_grid`'s header text: the x and y labels and y_title wrapped to the cell width (less
    2·LABEL_PAD), x_title to the width of all the columns."""
    cell_w = cell_size[0]
    columns_width = len(x_labels) * cell_w + (len(x_labels) - 1) * GRID_GAP
    (title,) = _wrapped([x_title], columns_width)
    (corner,) = _wrapped([y_title], cell_w)
    return Headers(title, _wrapped(x_labels, cell_w), _wrapped(y_labels, cell_w), corner)


def _header_geometry(headers: Headers, rows: int, cols: int, cell_size: tuple[int, int]) -> GridGeometry:
    top = headers.title_height + headers.column_height + GRID_GAP if headers.columns else 0
    return GridGeometry(
        rows=rows,
        cols=cols,
        cell_w=cell_size[0],
        cell_h=headers.row_height(cell_size[1]),
        left=headers.row_width + GRID_GAP,
        top=top,
    )


def xy_geometry(
    cell_size: tuple[int, int],
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    *,
    x_title: str,
    y_title: str,
) -> GridGeometry:
    """`xy_grid`'s geometry for drawn cells of `cell_size` (rows = len(y_labels), cols = len(x_labels)),
    headers as `xy_headers`: top = the x title's lines (if any) + the most lines of an x label or
    the y title, + GRID_GAP; left = the widest line of the y labels and the y title + 2·LABEL_PAD
    + GRID_GAP; cell_h = the cells' height or a y label's lines', the higher; cell_w the cells'."""
    headers = xy_headers(cell_size, x_labels, y_labels, x_title=x_title, y_title=y_title)
    return _header_geometry(headers, len(y_labels), len(x_labels), cell_size)


def _draw_headers(canvas: Image.Image, headers: Headers, g: GridGeometry) -> None:
    """The title centred over the columns, each column label centred over its column, the corner
    text left of them, each row label left of its row, vertically centred."""
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    title_bottom = headers.title_height
    labels_bottom = g.top - GRID_GAP
    draw_lines(
        draw, (g.left, 0, g.width, title_bottom), headers.title, font=font, fill=TEXT_COLOR, center=True
    )
    draw_lines(
        draw, (0, title_bottom, g.left - GRID_GAP, labels_bottom), headers.corner, font=font, fill=TEXT_COLOR
    )
    for col, lines in enumerate(headers.columns):
        x0, _ = g.origin(0, col)
        box = (x0, title_bottom, x0 + g.cell_w, labels_bottom)
        draw_lines(draw, box, lines, font=font, fill=TEXT_COLOR, center=True)
    for row, lines in enumerate(headers.rows):
        _, y0 = g.origin(row, 0)
        box = (0, y0, g.left - GRID_GAP, y0 + g.cell_h)
        draw_lines(draw, box, lines, font=font, fill=TEXT_COLOR, middle=True)


def xy_grid(
    cells: Mapping[tuple[int, int], Cell],
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    *,
    x_title: str,
    y_title: str,
) -> Image.Image:
    """An X × Y plot: cell (x, y) (x = column index into x_labels, y = row index into y_labels).

    Cells are drawn by `render_cells` without their labels (the headers say them in full): their
    images at their own size, their figures and seeds; every position is as large as the largest
    drawn cell, so never smaller than the images in it. Geometry: `xy_geometry`; cell (x, y) is at `geometry.origin(y, x)`. Headers
    (`xy_headers`): the x title (if any) centred over the cells on the top lines, the x labels
    centred over their columns on the next, the y title in the corner beside them, the y labels in
    the left column, vertically centred on their rows; all wrapped, none cut. Missing cells are
    light grey. ValueError for cells outside the grid or no cells at all.
    """
    if not x_labels or not y_labels:
        raise ValueError("xy_grid needs at least one x label and one y label")
    outside = sorted(k for k in cells if not (0 <= k[0] < len(x_labels) and 0 <= k[1] < len(y_labels)))
    if outside:
        raise ValueError(f"cells outside the {len(x_labels)} × {len(y_labels)} grid: {outside}")
    if not cells:
        raise ValueError("xy_grid needs at least one cell")
    drawn = render_cells({key: replace(cell, label="") for key, cell in cells.items()})
    size = _slot_size(list(drawn.values()))
    headers = xy_headers(size, x_labels, y_labels, x_title=x_title, y_title=y_title)
    g = _header_geometry(headers, len(y_labels), len(x_labels), size)
    canvas = Image.new("RGB", (g.width, g.height), BACKGROUND)
    _draw_headers(canvas, headers, g)
    for y in range(len(y_labels)):
        for x in range(len(x_labels)):
            _paste(canvas, drawn.get((x, y)), g.box(y, x))
    return canvas


def rows_headers(labels: Sequence[str], cell_size: tuple[int, int]) -> Headers:
    """`rows_grid`'s row labels, wrapped to the cell width (less 2·LABEL_PAD)."""
    return Headers(rows=_wrapped(labels, cell_size[0]))


def rows_geometry(labels: Sequence[str], cell_size: tuple[int, int]) -> GridGeometry:
    """`rows_grid`'s geometry for row labels `labels` ("baseline" first, then the elements) and drawn
    cells of `cell_size`: one column, left = the widest line of the labels (`rows_headers`) +
    2·LABEL_PAD + GRID_GAP, top = 0, cell_h = the cells' height or a label's lines', the higher."""
    return _header_geometry(rows_headers(labels, cell_size), len(labels), 1, cell_size)


def rows_grid(rows: Sequence[Cell], baseline: Cell) -> Image.Image:
    """Per-element sweeps: the baseline's row first, then one row per cell in order, each cell's label
    (wrapped) left of it, vertically centred; the cells drawn without their label (it is the
    row's), with their seeds and figures (`render_cells`).

    Geometry: `rows_geometry([baseline.label, *labels], the largest drawn cell's size)`; the
    baseline is row 0, rows[i] is row i + 1.
    """
    entries = [baseline, *rows]
    drawn = render_cells({i: replace(cell, label="") for i, cell in enumerate(entries)})
    size = _slot_size(list(drawn.values()))
    headers = rows_headers([cell.label for cell in entries], size)
    g = _header_geometry(headers, len(entries), 1, size)
    canvas = Image.new("RGB", (g.width, g.height), BACKGROUND)
    _draw_headers(canvas, headers, g)
    for row in range(len(entries)):
        _paste(canvas, drawn[row], g.box(row, 0))
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
        draw.rectangle(
            (0, 0, min(width, frame.width) - 1, text_block_height(1, font) - 1), fill=_GIF_LABEL_BG
        )
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
