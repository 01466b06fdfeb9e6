"""The sizes of the pictures a dump draws, computed without drawing them (pure Python: no numpy, no PIL).

`worker.probing.render` draws feature and attention grids with these shapes and factors; the
capture estimate (`mergeprobe.probing.capture_estimate`) counts the pixels of the same pictures at
submission, so the two cannot drift apart.

* A feature grid has C + 1 tiles (the channel mean, then the channels) in `grid_shape(C + 1)`,
  1 pixel apart, each map upscaled by `upscale_factor` (nearest neighbour) so that the grid's long
  side is at least READABLE_PX, never past MAX_PICTURE_PX.
* An attention grid's cells are the maps upscaled by `attention_scale` (at least MIN_CELL_PX high).
* Either is framed: at least MIN_FRAME_WIDTH wide, with a title strip above and a colour-bar strip
  below that together take at most FRAME_HEIGHT_BOUND pixels (the renderer's tests hold it to it).
"""

from __future__ import annotations

import math

READABLE_PX = 512
"""A feature grid is upscaled (integer factor, nearest neighbour) until its long side is at least this."""
MAX_PICTURE_PX = 4096
"""...but never so far that its long side passes this (a grid already longer stays as it is)."""
MIN_CELL_PX = 64
"""Attention cells are upscaled by an integer factor until at least this many pixels high."""
MIN_FRAME_WIDTH = 320
"""A framed picture is at least this wide (its content centred), so that its title and colour bar read."""
FRAME_HEIGHT_BOUND = 200
"""The most pixels a frame adds to its content's height: the title's lines, the colour bar, its labels
and note (a few lines each at the widths the pictures have)."""


def grid_shape(tiles: int) -> tuple[int, int]:
    """(rows, cols) of a near-square grid: cols = ceil(sqrt(n)), rows = ceil(n / cols)."""
    cols = math.ceil(math.sqrt(tiles))
    return math.ceil(tiles / cols), cols


def upscale_factor(rows: int, cols: int, tile_h: int, tile_w: int) -> int:
    """The integer factor for tiles of tile_h × tile_w in rows × cols, 1 pixel apart: the smallest that
    makes the grid's long side at least READABLE_PX, unless that passes MAX_PICTURE_PX, then the
    largest that stays within it; 1 at least (a grid is never shrunk)."""
    gaps = (rows - 1, cols - 1)
    lengths = (rows * tile_h, cols * tile_w)
    needed = min(math.ceil((READABLE_PX - g) / n) for g, n in zip(gaps, lengths, strict=True))
    allowed = min((MAX_PICTURE_PX - g) // n for g, n in zip(gaps, lengths, strict=True))
    return max(1, min(needed, allowed))


def feature_grid_size(channels: int, map_h: int, map_w: int) -> tuple[int, int]:
    """(width, height) of the tiles of a feature grid of `channels` maps of map_h × map_w, before its
    frame: cols·(W·s + 1) − 1 by rows·(H·s + 1) − 1, s = `upscale_factor`."""
    rows, cols = grid_shape(channels + 1)
    scale = upscale_factor(rows, cols, map_h, map_w)
    return cols * (map_w * scale + 1) - 1, rows * (map_h * scale + 1) - 1


def attention_scale(map_h: int) -> int:
    """ceil(MIN_CELL_PX / map_h), at least 1: the factor that makes a map at least MIN_CELL_PX high."""
    return max(1, math.ceil(MIN_CELL_PX / map_h))


def framed_pixels_bound(content_w: int, content_h: int) -> int:
    """At most how many pixels a framed picture of content_w × content_h content has."""
    return max(content_w, MIN_FRAME_WIDTH) * (content_h + FRAME_HEIGHT_BOUND)
