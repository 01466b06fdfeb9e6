"""Images from captured tensors: feature grids, attention grids, heat-map overlays, PNG bytes; and the
text helpers every picture of the worker uses (`sweep_render` draws its labels with them too).

numpy + PIL only. Tensors may be numpy arrays or anything with torch's
`.detach().cpu().float().numpy()` (converted by duck typing; torch is never imported).
Every function is deterministic: same input, same pixels.

A feature grid or an attention grid is a *framed* picture (`Frame`), from the top:

* a title strip (`TITLE_FONT_SIZE`, wrapped to the width): where the capture comes from
  (`Capture.title`) and what the grid shows, e.g.
  "IN04 · step 5 · cond · channels 0-319 (mean first)";
* the grid, upscaled by an integer factor with nearest neighbour (feature grids until their long
  side is at least `READABLE_PX`, 512, never past `MAX_PICTURE_PX`, 4096; attention cells until they
  are at least `MIN_CELL_PX`, 64, high), tiles 1 pixel apart. These shapes and factors are
  `mergeprobe.probing.picture_geometry`'s, which the capture estimate counts too;
* a colour bar: the colours of the scale from left to right, labelled at both ends and the middle
  (`ColourScale`), and a note saying how the values were normalised and which values the
  capture holds.

Layout conventions:

* Gaps and margins are `GAP_COLOR` (dark grey 40, 40, 40), so they stay visible
  against black (white_black) and white (red_blue) tiles; text is light grey.
* Auto transforms (`auto01`, `auto11`) normalize every tile / cell on its own
  statistics, as Dump U-Net does (it colorizes each channel map separately), so their colour
  bar is labelled in the tile's terms ("tile min" … "tile max", "-max|v|" … "+max|v|").
  Use `linear` with fixed min/max to compare tiles on one scale: its bar is labelled with
  those values.
* Labels are never cut: `wrap_label` splits them over lines (at spaces, and inside a word that
  is wider than the line, after punctuation where it can), and strips grow to hold the lines.

Text is drawn with Pillow's built-in font (Aileron, embedded in Pillow >= 10.1: nothing to download)
at `LABEL_FONT_SIZE` / `TITLE_FONT_SIZE` pixels. It has printable ASCII and the middle dot
(`FONT_GLYPHS`); `clean_label` turns any other character into `?`.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mergeprobe.probing.colorize import Colorize
from mergeprobe.probing.colorize_render import colorize as colorize_values
from mergeprobe.probing.picture_geometry import (
    MIN_FRAME_WIDTH,
    attention_scale,
    feature_grid_size,
    grid_shape,
    upscale_factor,
)

GAP_COLOR = (40, 40, 40)
TEXT_COLOR = (230, 230, 230)
LABEL_FONT_SIZE = 12
"""Pixel size of labels: attention tokens, colour-bar labels and notes, every label of the sweep grids."""
TITLE_FONT_SIZE = 16
"""Pixel size of the title of a feature or attention grid."""
FONT_GLYPHS = "·"
"""Characters beyond printable ASCII that the built-in font draws."""
LABEL_PAD = 2
"""Padding around a block of text lines (above, below, left and right)."""

FRAME_MARGIN = 6
"""Pixels left and right of the title, the colour bar and its note, and above and below the bar strip."""
BAR_HEIGHT = 14
"""Height of the colour bar."""


def _as_array(x: Any, ndim: int, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, converted without importing torch
        x = x.detach().cpu().float().numpy()
    array = np.asarray(x, dtype=np.float32)
    if array.ndim != ndim or 0 in array.shape:
        raise ValueError(f"{what}: expected a non-empty {ndim}-D array, got shape {array.shape}")
    return array


def _tile(tiles: np.ndarray, rows: int, cols: int, scale: int = 1, gap: int = 1) -> np.ndarray:
    """(N, h, w, C) uint8 tiles, each upscaled `scale` times (nearest neighbour) → one canvas of
    (rows·(h·scale + gap) − gap, cols·(w·scale + gap) − gap, C), row-major.

    Cells after the N-th and the gaps are GAP_COLOR (its first C channels).
    """
    n, h, w, channels = tiles.shape
    th, tw = h * scale, w * scale
    fill = GAP_COLOR[:channels]
    canvas = np.empty((rows * (th + gap), cols * (tw + gap), channels), dtype=np.uint8)
    canvas[...] = fill
    padded = np.empty((rows * cols, h, w, channels), dtype=np.uint8)
    padded[...] = fill
    padded[:n] = tiles
    grid = padded.reshape(rows, cols, h, w, channels).transpose(0, 2, 1, 3, 4)  # rows, h, cols, w, C
    if scale > 1:
        grid = grid.repeat(scale, axis=1).repeat(scale, axis=3)
    canvas.reshape(rows, th + gap, cols, tw + gap, channels)[:, :th, :, :tw] = grid
    return np.ascontiguousarray(canvas[: canvas.shape[0] - gap, : canvas.shape[1] - gap])


# --- text ------------------------------------------------------------------------------------------------


_fonts = threading.local()  # size → font, per thread: a FreeType face is not shared between threads


def label_font(size: int = LABEL_FONT_SIZE) -> ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size` pixels: nothing to download or install (loaded once per thread)."""
    fonts = _fonts.__dict__.setdefault("by_size", {})
    if size not in fonts:
        try:
            fonts[size] = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: only its small bitmap font, at one size
            fonts[size] = ImageFont.load_default()
    return fonts[size]


def title_font() -> ImageFont.FreeTypeFont:
    return label_font(TITLE_FONT_SIZE)


def clean_label(text: str) -> str:
    """Printable ASCII and `FONT_GLYPHS` only (the built-in font has no other glyphs); others as `?`."""
    return "".join(ch if 32 <= ord(ch) < 127 or ch in FONT_GLYPHS else "?" for ch in str(text))


def text_width(font: Any, text: str) -> int:
    """Pixels from where `text` is drawn to the right edge of its ink (0 for no text)."""
    return int(math.ceil(font.getbbox(text)[2])) if text else 0


def line_height(font: Any) -> int:
    """The step from one line of text to the next: the bottom of the font's tallest, deepest glyphs."""
    return int(math.ceil(font.getbbox("Ag|y0")[3]))


def text_block_height(lines: int, font: Any) -> int:
    """Height of a block of `lines` lines with LABEL_PAD above and below (0 for no lines)."""
    return lines * line_height(font) + 2 * LABEL_PAD if lines else 0


def fit_label(font: Any, text: str, width: int) -> str:
    """`text`, cut and ended with `..` when wider than `width` pixels (a label on top of an image, where
    lines would hide it: the flip GIFs' corner labels; grids wrap theirs with `wrap_label`)."""
    if text_width(font, text) <= width:
        return text
    while text and text_width(font, text + "..") > width:
        text = text[:-1]
    return text + ".." if text else ""


_BREAK_AFTER = frozenset(":,;=|_/)")
"""A word wider than a line is split after one of these where it can (`_split_word`); not after `.` or
`-`, which belong to numbers ("alpha=" / "-0.25", not "alpha=-0." / "25")."""


def _fitting_length(font: Any, text: str, width: int) -> int:
    """The longest prefix of `text` (at least one character) no wider than `width`."""
    lo, hi = 1, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_width(font, text[:mid]) <= width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _split_word(font: Any, word: str, width: int) -> list[str]:
    """`word` in pieces no wider than `width`: each piece the longest prefix that fits, or the part up to
    the last punctuation in it when that keeps more than half of it (`OUT05:` / `attn2:0`)."""
    pieces = []
    while len(word) > 1 and text_width(font, word) > width:
        fits = _fitting_length(font, word, width)
        after_punctuation = max((i + 1 for i, ch in enumerate(word[:fits]) if ch in _BREAK_AFTER), default=0)
        cut = after_punctuation if 2 * after_punctuation > fits else fits
        pieces.append(word[:cut])
        word = word[cut:]
    return [*pieces, word]


def wrap_label(font: Any, text: str, width: int) -> list[str]:
    """`text` (cleaned, runs of spaces as one) as lines no wider than `width` pixels, nothing dropped.

    Words fill each line greedily; a word wider than a line is split (`_split_word`). Only a
    single character wider than `width` makes a wider line. No text gives no lines.
    """
    words = clean_label(text).split()
    if text_width(font, " ".join(words)) <= width:  # most labels: one line
        return [" ".join(words)] if words else []
    lines: list[str] = []
    line = ""
    for word in words:
        candidate = f"{line} {word}" if line else word
        if text_width(font, candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        *full, line = _split_word(font, word, width)
        lines.extend(full)
    return [*lines, line] if line else lines


def draw_lines(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    lines: Sequence[str],
    *,
    font: Any,
    fill: Any,
    center: bool = False,
    middle: bool = False,
) -> None:
    """`lines` one under another in box (x0, y0, x1, y1): from y0 + LABEL_PAD down (or the block centred
    vertically with `middle`), each at x0 + LABEL_PAD (or centred in the box with `center`)."""
    x0, y0, x1, y1 = box
    step = line_height(font)
    y = y0 + LABEL_PAD
    if middle:
        y = y0 + max(LABEL_PAD, (y1 - y0 - len(lines) * step) // 2)
    for line in lines:
        x = x0 + (x1 - x0 - text_width(font, line)) // 2 if center else x0 + LABEL_PAD
        draw.text((x, y), line, fill=fill, font=font)
        y += step


def _ink(mode: str, color: tuple[int, int, int]) -> Any:
    """`color` as a fill of an image of `mode` ("L" grids: its grey level)."""
    return color[0] if mode == "L" else color


# --- titles and colour bars -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capture:
    """Where a captured tensor comes from, for the title of its picture: the U-Net block, the sampler
    step, the CFG half ("cond" / "uncond"), the image of the batch (None in a batch of one) and what
    the picture shows when not the block's output itself (e.g. a difference)."""

    block: str
    step: int
    half: str
    batch_index: int | None = None
    what: str = ""

    def title(self) -> str:
        """e.g. "IN04 · step 5 · cond", "IN04 · step 5 · cond · image 1 · block prompts - plain prompt"."""
        parts = [self.block, f"step {self.step}", self.half]
        if self.batch_index is not None:
            parts.append(f"image {self.batch_index}")
        return " · ".join([*parts, self.what] if self.what else parts)


def _number(x: float) -> str:
    return f"{x:.3g}"


def _value_range(values: np.ndarray) -> str:
    """ "values here LO to HI": the finite extremes of what the picture shows."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return "no finite values"
    return f"values here {_number(float(finite.min()))} to {_number(float(finite.max()))}"


@dataclass(frozen=True)
class ColourScale:
    """What a colour bar shows: the values `low` … `high` run through the Colorize spec from its left
    end to its right (for the auto transforms, normalised values: 0 … 1 for auto01, -1 … 1 for
    auto11), the labels at its left end, middle and right end, and a note on how values were
    normalised."""

    low: float
    high: float
    ticks: tuple[str, str, str]
    note: str


SIGMOID_BAR_SPAN = 6.0
"""A sigmoid bar spans offset ± this / |gain| (the colours from 0.25 % to 99.75 % of the way)."""


def colour_scale(colorize: Colorize, values: np.ndarray, unit: str = "tile") -> ColourScale:
    """The colour bar of pictures of `values` colorized with `colorize`, each `unit` (tile, cell) on its
    own for the auto transforms."""
    shown = _value_range(values)
    if colorize.transform == "auto01":
        note = f"auto01: each {unit} from its own min (left) to its own max (right); {shown}"
        return ColourScale(0.0, 1.0, (f"{unit} min", "", f"{unit} max"), note)
    if colorize.transform == "auto11":
        note = f"auto11: each {unit} divided by its own max |v|; {shown}"
        return ColourScale(-1.0, 1.0, ("-max|v|", "0", "+max|v|"), note)
    if colorize.transform == "linear":
        low, high = colorize.min, colorize.max
        note = f"linear: one scale, values clamped to [{_number(low)}, {_number(high)}]; {shown}"
        return ColourScale(low, high, (_number(low), _number((low + high) / 2), _number(high)), note)
    span = SIGMOID_BAR_SPAN / abs(colorize.gain) if colorize.gain else 1.0
    low, high = colorize.offset - span, colorize.offset + span
    gain, offset = _number(colorize.gain), _number(colorize.offset)
    note = f"sigmoid: one scale, 1/(1+exp(-g·(v-o))) with g = {gain}, o = {offset}; {shown}"
    return ColourScale(low, high, (_number(low), offset, _number(high)), note)


def colour_bar(colorize: Colorize, scale: ColourScale, width: int, height: int = BAR_HEIGHT) -> np.ndarray:
    """(height, width, 3) uint8: column i the colour of low + (high − low)·i / (width − 1)."""
    ramp = np.linspace(scale.low, scale.high, max(width, 2))[None, :width]
    return np.repeat(colorize_values(ramp, colorize), height, axis=0)


@dataclass(frozen=True)
class Frame:
    """Pixel geometry of a framed picture (`framed`): the title's lines, the content centred below
    them, the colour-bar strip under the content (FRAME_MARGIN, the bar, one line of its three
    labels, the note's lines, FRAME_MARGIN). Every y counts from the picture's top."""

    width: int
    content_w: int
    content_h: int
    title: tuple[str, ...]  # lines, TITLE_FONT_SIZE
    colours: ColourScale  # what the bar shows, its labels (ticks)
    note: tuple[str, ...]  # colours.note in lines, LABEL_FONT_SIZE
    title_height: int
    label_line: int  # line_height of the label font

    @property
    def content_left(self) -> int:
        return (self.width - self.content_w) // 2

    @property
    def content_top(self) -> int:
        return self.title_height

    @property
    def bar(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the colour bar, x1 / y1 exclusive."""
        y0 = self.content_top + self.content_h + FRAME_MARGIN
        return FRAME_MARGIN, y0, self.width - FRAME_MARGIN, y0 + BAR_HEIGHT

    @property
    def ticks_top(self) -> int:
        return self.bar[3] + 1

    @property
    def note_top(self) -> int:
        return self.ticks_top + self.label_line

    @property
    def height(self) -> int:
        return self.note_top + len(self.note) * self.label_line + 2 * LABEL_PAD + FRAME_MARGIN


def frame_layout(content_size: tuple[int, int], title: str, scale: ColourScale) -> Frame:
    """The frame of content of `content_size` (w, h): width max(w, MIN_FRAME_WIDTH); the title and the
    note wrapped to the width less 2·FRAME_MARGIN."""
    width = max(content_size[0], MIN_FRAME_WIDTH)
    text_width_px = width - 2 * FRAME_MARGIN - 2 * LABEL_PAD
    title_lines = tuple(wrap_label(title_font(), title, text_width_px))
    return Frame(
        width=width,
        content_w=content_size[0],
        content_h=content_size[1],
        title=title_lines,
        colours=scale,
        note=tuple(wrap_label(label_font(), scale.note, text_width_px)),
        title_height=text_block_height(len(title_lines), title_font()),
        label_line=line_height(label_font()),
    )


def framed(content: Image.Image, frame: Frame, colorize: Colorize) -> Image.Image:
    """`content` in its frame (`frame_layout`): title, content, colour bar with its labels and note,
    on GAP_COLOR, in the content's mode ("L" or "RGB")."""
    mode = content.mode
    canvas = Image.new(mode, (frame.width, frame.height), _ink(mode, GAP_COLOR))
    canvas.paste(content, (frame.content_left, frame.content_top))
    x0, y0, x1, y1 = frame.bar
    bar = colour_bar(colorize, frame.colours, x1 - x0, y1 - y0)
    canvas.paste(
        Image.fromarray(np.ascontiguousarray(bar[..., 0]), "L")
        if mode == "L"
        else Image.fromarray(bar, "RGB"),
        (x0, y0),
    )
    draw = ImageDraw.Draw(canvas)
    fill = _ink(mode, TEXT_COLOR)
    text_box = (FRAME_MARGIN, 0, frame.width - FRAME_MARGIN, frame.title_height)
    draw_lines(draw, text_box, frame.title, font=title_font(), fill=fill)
    font = label_font()
    low, middle, high = frame.colours.ticks
    y = frame.ticks_top
    draw.text((x0, y), low, fill=fill, font=font)
    draw.text(((x0 + x1 - text_width(font, middle)) // 2, y), middle, fill=fill, font=font)
    draw.text((x1 - text_width(font, high), y), high, fill=fill, font=font)
    note_box = (FRAME_MARGIN, frame.note_top, frame.width - FRAME_MARGIN, frame.height)
    draw_lines(draw, note_box, frame.note, font=font, fill=fill)
    return canvas


# --- feature grid ----------------------------------------------------------------------------------------


def feature_title(channels: int, capture: Capture | None = None) -> str:
    """The title of a feature grid of `channels` channels: e.g.
    "IN04 · step 5 · cond · channels 0-319 (mean first)"."""
    shown = f"channels 0-{channels - 1}" if channels > 1 else "channel 0"
    return " · ".join([*([capture.title()] if capture else []), f"{shown} (mean first)"])


@dataclass(frozen=True)
class FeatureLayout:
    """Pixel geometry of `feature_grid`: rows × cols tiles of tile_w × tile_h (the maps × scale),
    1 pixel apart, in the frame's content; tile 0 is the channel mean, tile k + 1 channel k."""

    rows: int
    cols: int
    scale: int
    tile_w: int
    tile_h: int
    frame: Frame

    def tile_box(self, index: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of tile `index` in the picture, x1 / y1 exclusive."""
        row, col = divmod(index, self.cols)
        x = self.frame.content_left + col * (self.tile_w + 1)
        y = self.frame.content_top + row * (self.tile_h + 1)
        return x, y, x + self.tile_w, y + self.tile_h


def feature_layout(feature: Any, colorize: Colorize, capture: Capture | None = None) -> FeatureLayout:
    """The geometry of `feature_grid(feature, colorize, capture)` for a (C, H, W) feature."""
    array = _as_array(feature, 3, "feature")
    channels, h, w = array.shape
    rows, cols = grid_shape(channels + 1)
    scale = upscale_factor(rows, cols, h, w)
    content = feature_grid_size(channels, h, w)
    frame = frame_layout(content, feature_title(channels, capture), colour_scale(colorize, array))
    return FeatureLayout(rows, cols, scale, w * scale, h * scale, frame)


def feature_grid(feature: Any, colorize: Colorize, capture: Capture | None = None) -> Image.Image:
    """One block's features (C, H, W) as a framed grid (RGB; greyscale "L" for white_black): the
    channel mean first, then channels 0…C−1.

    C + 1 tiles in `grid_shape(C + 1)` (row-major), each upscaled by `upscale_factor` (nearest
    neighbour; ≥ 512 px on the grid's long side, ≤ 4096), 1 pixel apart; every tile colorized on
    its own for the auto transforms. Titled with `feature_title(C, capture)`, the colour bar of
    `colour_scale` below. Geometry: `feature_layout`.
    """
    array = _as_array(feature, 3, "feature")
    layout = feature_layout(array, colorize, capture)
    mean = array.astype(np.float64).mean(axis=0, keepdims=True)
    stack = np.concatenate([mean, array.astype(np.float64)], axis=0)
    tiles = colorize_values(stack, colorize)
    if colorize.method == "white_black":
        # Grey levels in all three channels: one channel says the same, 3× less to upscale and encode.
        grid = Image.fromarray(_tile(tiles[..., :1], layout.rows, layout.cols, layout.scale)[..., 0], "L")
    else:
        grid = Image.fromarray(_tile(tiles, layout.rows, layout.cols, layout.scale), "RGB")
    return framed(grid, layout.frame, colorize)


# --- attention grid --------------------------------------------------------------------------------------


def attention_title(heads: int, tokens: int, capture: Capture | None = None) -> str:
    what = f"attention of {heads} heads (rows) to {tokens} tokens (columns)"
    return " · ".join([*([capture.title()] if capture else []), what])


@dataclass(frozen=True)
class AttentionLayout:
    """Pixel geometry of `attention_grid`, in the picture: cell (head h, token t) at
    (left + t·(cell_w+1), top + h·(cell_h+1)); the token labels' lines in the strip above the cells
    (`labels`, one tuple of lines per token, each line no wider than cell_w − 2·LABEL_PAD), the head
    indices in the column left of them; all inside `frame`'s content."""

    scale: int
    cell_w: int
    cell_h: int
    left: int  # the frame's content left + the head-index column, its padding included
    top: int  # the frame's title + the token-label strip, its padding included
    labels: tuple[tuple[str, ...], ...]
    frame: Frame

    @property
    def width(self) -> int:
        return self.frame.width

    @property
    def height(self) -> int:
        return self.frame.height


def attention_layout(
    probs: Any, token_labels: Sequence[str], colorize: Colorize, capture: Capture | None = None
) -> AttentionLayout:
    """The geometry of `attention_grid(probs, token_labels, colorize, capture)` for (heads, tokens, H, W).

    Cells are the maps × `attention_scale(H)`; the label strip is as high as the most lines a token
    label wraps to (`wrap_label` at the cell width) plus 2·LABEL_PAD; the head column as wide as the
    widest head index plus 2·LABEL_PAD.
    """
    array = _as_array(probs, 4, "probs")
    heads, tokens, map_h, map_w = array.shape
    if len(token_labels) != tokens:
        raise ValueError(f"{tokens} token maps but {len(token_labels)} token labels")
    font = label_font()
    scale = attention_scale(map_h)
    cell_w, cell_h = map_w * scale, map_h * scale
    labels = tuple(tuple(wrap_label(font, label, cell_w - 2 * LABEL_PAD)) for label in token_labels)
    strip = text_block_height(max(1, *(len(lines) for lines in labels)), font)
    column = text_width(font, str(heads - 1)) + 2 * LABEL_PAD
    content = (column + tokens * (cell_w + 1) - 1, strip + heads * (cell_h + 1) - 1)
    scale_of_bar = colour_scale(colorize, array, "cell")
    frame = frame_layout(content, attention_title(heads, tokens, capture), scale_of_bar)
    left, top = frame.content_left + column, frame.content_top + strip
    return AttentionLayout(scale, cell_w, cell_h, left, top, labels, frame)


def attention_grid(
    probs: Any, token_labels: Sequence[str], colorize: Colorize, capture: Capture | None = None
) -> Image.Image:
    """Cross-attention maps (heads, tokens, H, W): a row per head, a column per prompt token, framed.

    Token labels (printable ASCII, others as `?`) wrapped over lines to the column width above
    the columns, head indices 0… at the left, 1-pixel gaps; each cell colorized on its own
    (auto transforms) and upscaled by `attention_scale(H)` (nearest neighbour). Titled with
    `attention_title`, the colour bar of `colour_scale(..., "cell")` below. Geometry:
    `attention_layout`.
    """
    array = _as_array(probs, 4, "probs")
    layout = attention_layout(array, token_labels, colorize, capture)
    heads, tokens, map_h, map_w = array.shape
    cells = colorize_values(array.reshape(heads * tokens, map_h, map_w).astype(np.float64), colorize)
    grid = _tile(cells, heads, tokens, layout.scale)

    frame = layout.frame
    content = np.empty((frame.content_h, frame.content_w, 3), dtype=np.uint8)
    content[...] = GAP_COLOR
    content[layout.top - frame.content_top :, layout.left - frame.content_left :] = grid
    image = framed(Image.fromarray(content, "RGB"), frame, colorize)

    draw = ImageDraw.Draw(image)
    font = label_font()
    for t, lines in enumerate(layout.labels):
        x = layout.left + t * (layout.cell_w + 1)
        draw_lines(
            draw, (x, frame.content_top, x + layout.cell_w, layout.top), lines, font=font, fill=TEXT_COLOR
        )
    for h in range(heads):
        y = layout.top + h * (layout.cell_h + 1)
        draw.text((frame.content_left + LABEL_PAD, y + LABEL_PAD), str(h), fill=TEXT_COLOR, font=font)
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
