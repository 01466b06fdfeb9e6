"""Sweep images: influence numbers, difference images, flip GIFs, U / X×Y / row grids."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mergeprobe.checkpoints.archs import get_arch
from worker.probing import render
from worker.probing.render import label_font, text_block_height
from worker.probing.sweep_render import (
    BACKGROUND,
    CELL_GAP,
    EMPTY_COLOR,
    GRID_GAP,
    LABEL_PAD,
    MIN_CELL_WIDTH,
    Cell,
    cell_strips,
    cell_text,
    difference_image,
    flip_gif,
    influence,
    influence_text,
    png_bytes,
    render_cell,
    render_cells,
    rows_geometry,
    rows_grid,
    rows_headers,
    ssim_index,
    u_geometry,
    u_grid,
    u_layout,
    xy_geometry,
    xy_grid,
    xy_headers,
)

SD1 = [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
SDXL = [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]


def rgb(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(array, dtype=np.uint8), "RGB")


def random_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return rgb(rng.integers(0, 256, size=(h, w, 3)))


def solid(w: int, h: int, color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (w, h), color)


def region(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(image.crop(box))


def test_does_not_import_torch_and_reuses_png_bytes():
    code = "import sys, worker.probing.sweep_render; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert png_bytes is render.png_bytes


# --- influence -------------------------------------------------------------------------------------------


def test_influence_identical():
    image = random_image(np.random.default_rng(0), 16, 12)
    result = influence(image, image.copy())
    assert result == {"changed_share": 0.0, "mean_abs_diff": 0.0, "ssim": 1.0}
    assert result["ssim"] == 1.0


@pytest.mark.parametrize(("delta", "share"), [(30, 0.01), (10, 0.0), (20, 0.0), (21, 0.01)])
def test_influence_one_pixel(delta, share):
    base = np.full((10, 10, 3), 100, dtype=np.uint8)
    changed = base.copy()
    changed[3, 4, 1] += delta
    result = influence(rgb(base), rgb(changed), threshold=20)
    assert result["changed_share"] == pytest.approx(share)
    assert result["mean_abs_diff"] == pytest.approx(delta / 300)
    assert result["ssim"] < 1.0


def test_influence_size_mismatch():
    with pytest.raises(ValueError, match="size"):
        influence(solid(10, 10, (0, 0, 0)), solid(10, 11, (0, 0, 0)))


def test_ssim_inverse_and_noise():
    rng = np.random.default_rng(1)
    # a smooth image with structure (gradients + a pattern) so noise is a small perturbation
    yy, xx = np.mgrid[0:48, 0:64]
    base = np.stack([xx * 3, yy * 4, (xx + yy) * 2], axis=-1) % 256
    base = base.astype(np.uint8)
    inverse = 255 - base
    noisy = np.clip(base.astype(int) + rng.integers(-3, 4, size=base.shape), 0, 255)
    assert influence(rgb(base), rgb(inverse))["ssim"] < 0.5
    assert influence(rgb(base), rgb(noisy))["ssim"] > 0.9


def reference_ssim(x: np.ndarray, y: np.ndarray, k: int = 7) -> float:
    """Straight double loop over the fully-inside k×k windows, sample (co)variances."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    n = k * k
    values = []
    for i in range(x.shape[0] - k + 1):
        for j in range(x.shape[1] - k + 1):
            wx = x[i : i + k, j : j + k].ravel().tolist()
            wy = y[i : i + k, j : j + k].ravel().tolist()
            mx, my = sum(wx) / n, sum(wy) / n
            vx = sum((a - mx) ** 2 for a in wx) / (n - 1)
            vy = sum((b - my) ** 2 for b in wy) / (n - 1)
            vxy = sum((a - mx) * (b - my) for a, b in zip(wx, wy, strict=True)) / (n - 1)
            s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
            values.append(s)
    return sum(values) / len(values)


def test_ssim_matches_double_loop_reference():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, size=(13, 17, 3))
    b = np.clip(a + rng.integers(-60, 61, size=a.shape), 0, 255)
    ya = a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114
    yb = b[..., 0] * 0.299 + b[..., 1] * 0.587 + b[..., 2] * 0.114
    expected = reference_ssim(ya, yb)
    assert influence(rgb(a), rgb(b))["ssim"] == pytest.approx(expected, abs=1e-9)
    assert ssim_index(ya, yb) == pytest.approx(expected, abs=1e-9)
    # exactly 7×7: a single window
    assert ssim_index(ya[:7, :7], yb[:7, :7]) == pytest.approx(
        reference_ssim(ya[:7, :7], yb[:7, :7]), abs=1e-9
    )


def test_ssim_too_small():
    with pytest.raises(ValueError, match="at least 7"):
        ssim_index(np.zeros((6, 10)), np.ones((6, 10)))


# --- difference image and GIF ----------------------------------------------------------------------------


def test_difference_image():
    base = np.full((4, 5, 3), 100, dtype=np.uint8)
    var = base.copy()
    var[0, 0, 2] += 10  # under the threshold: grey 255 - 4·10
    var[1, 1, 0] += 100  # over: red
    image = difference_image(rgb(base), rgb(var), threshold=20)
    assert image.mode == "RGB" and image.size == (5, 4)
    px = np.asarray(image)
    assert tuple(px[2, 2]) == (255, 255, 255)
    assert tuple(px[0, 0]) == (215, 215, 215)
    r, g, b = (int(v) for v in px[1, 1])
    assert r == 255 and g == b and g < 150


def test_flip_gif_two_frames_loops():
    rng = np.random.default_rng(3)
    data = flip_gif(
        random_image(rng, 40, 30), random_image(rng, 40, 30), labels=("base", "IN05"), duration_ms=500
    )
    assert data[:6] in (b"GIF87a", b"GIF89a")
    gif = Image.open(io.BytesIO(data))
    assert gif.n_frames == 2
    assert gif.info.get("loop") == 0
    assert gif.info.get("duration") == 500
    assert gif.size == (40, 30)


# --- cells and the U -------------------------------------------------------------------------------------


def drawn_width(text: str) -> int:
    """The width of `text` as ImageDraw draws it with the renderers' font."""
    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=label_font())
    return right - left


def has_text(region: np.ndarray) -> bool:
    return bool((region != np.asarray(BACKGROUND)).any())


def seeds_cell(label: str, seeds=(1, 2), size=(64, 48), share=None, rng=None) -> Cell:
    rng = rng or np.random.default_rng(sum(seeds))
    return Cell(tuple(random_image(rng, *size) for _ in seeds), label, tuple(seeds), share)


LINE = text_block_height(1, label_font())  # one line of text in a strip


def test_influence_text():
    assert influence_text(0.123) == "changed 12.3 %"
    assert influence_text(0.0) == "changed 0.0 %" and influence_text(1.0) == "changed 100.0 %"


def test_cell_text_shows_label_figure_and_seeds():
    cell = seeds_cell("IN05", seeds=(11, 2024), size=(96, 48), share=0.1234)
    text = cell_text(cell)
    assert text.caption == ("IN05", "changed 12.3 %")
    assert text.seeds == (("seed 11",), ("seed 2024",))
    assert cell_text(seeds_cell("baseline", seeds=(7,), size=(96, 48))).caption == ("baseline",)
    assert cell_text(Cell((solid(96, 48, (0, 0, 0)),), "no seeds")).seeds == ()
    with pytest.raises(ValueError, match="seeds"):
        Cell((solid(8, 8, (0, 0, 0)),), "x", (1, 2))
    with pytest.raises(ValueError, match="image"):
        Cell((), "x")


def test_render_cell_geometry():
    seeds = [solid(70, 40, (10 * i, 20, 30)) for i in range(1, 4)]
    cell = Cell(tuple(seeds), "IN05", (1, 2, 3), 0.5)
    text = cell_text(cell)
    strips = cell_strips([text])
    assert (strips.caption, strips.seeds) == (
        2 * LINE - 2 * LABEL_PAD,
        LINE,
    )  # two caption lines, one seed line
    image = render_cell(cell, text, strips)
    assert image.size == (3 * 70 + 2 * CELL_GAP, strips.caption + 40 + strips.seeds)
    for i, seed in enumerate(seeds):
        x = i * (70 + CELL_GAP)
        assert np.array_equal(
            region(image, (x, strips.caption, x + 70, strips.caption + 40)), np.asarray(seed)
        )
        assert has_text(region(image, (x, strips.caption + 40, x + 70, image.height)))  # "seed i" under it
    assert tuple(np.asarray(image)[strips.caption, 70]) == BACKGROUND  # 1-px gap
    assert has_text(region(image, (0, 0, image.width, strips.caption)))  # caption drawn


def test_cells_are_at_least_their_images_and_min_width():
    tiny = Cell((solid(6, 5, (1, 2, 3)),), "IN00", (1,))
    assert tiny.width == MIN_CELL_WIDTH
    drawn = render_cells({"a": tiny})["a"]
    assert drawn.width == MIN_CELL_WIDTH and drawn.height >= 5
    big = seeds_cell("x", seeds=(1, 2), size=(300, 200))
    assert render_cells({"b": big})["b"].size[0] == 601


def test_render_cells_share_the_strips_so_images_line_up():
    cells = {
        "short": seeds_cell("IN00", share=0.5),
        "long": seeds_cell("a label much longer than the cell is wide, wrapped", share=0.5),
        "baseline": seeds_cell("baseline"),
    }
    drawn = render_cells(cells)
    strips = cell_strips([cell_text(cell) for cell in cells.values()])
    assert len(cell_text(cells["long"]).caption) > 2
    assert {image.size for image in drawn.values()} == {(129, strips.caption + 48 + strips.seeds)}
    for key, cell in cells.items():
        top = strips.caption
        assert np.array_equal(region(drawn[key], (0, top, 64, top + 48)), np.asarray(cell.images[0])), key


def test_u_layout_sd1():
    layout = u_layout(SD1)
    assert set(layout) == set(SD1) | {"baseline"}
    assert layout["IN00"] == (0, 0)
    assert layout["IN11"] == (11, 0)
    assert [layout[f"IN{i:02d}"] for i in range(12)] == [(i, 0) for i in range(12)]
    rows = max(r for r, _ in layout.values()) + 1
    last_col = max(c for _, c in layout.values())
    assert rows == 13 and last_col == 2
    assert layout["M00"] == (rows - 1, 1)
    assert layout["OUT00"] == (11, last_col)
    assert layout["OUT11"] == (0, last_col)
    assert [layout[f"OUT{i:02d}"] for i in range(12)] == [(11 - i, 2) for i in range(12)]
    base_row, base_col = layout["baseline"]
    assert base_col == 1 and abs(base_row - (rows - 1) / 2) <= 1
    assert len(set(layout.values())) == len(layout)  # no two cells share a position


def test_u_layout_sdxl_and_base():
    layout = u_layout(SDXL)
    assert max(r for r, _ in layout.values()) + 1 == 10
    assert layout["IN08"] == (8, 0) and layout["OUT00"] == (8, 2) and layout["OUT08"] == (0, 2)
    assert layout["M00"] == (9, 1) and layout["baseline"] == (4, 1)
    # the repository's architecture tables give the same shapes; BASE goes to the top of the middle
    assert u_layout(list(get_arch("sd1").unet_blocks)) == u_layout(SD1)
    with_base = u_layout(list(get_arch("sdxl").blocks))
    assert with_base["BASE"] == (0, 1)
    assert {k: v for k, v in with_base.items() if k != "BASE"} == layout


@pytest.mark.parametrize(("blocks", "rows"), [(SD1, 13), (SDXL, 10)])
def test_u_grid_geometry_and_paste(blocks, rows):
    rng = np.random.default_rng(4)
    cells = {
        b: seeds_cell(b, seeds=(1, 2), size=(64, 40), share=i / 100, rng=rng)
        for i, b in enumerate(blocks)
        if b != "IN03"
    }
    baseline = seeds_cell("baseline", seeds=(1, 2), size=(64, 40), rng=rng)
    grid = u_grid(cells, baseline, blocks)
    drawn = render_cells({**cells, "baseline": baseline})
    cw, ch = drawn["IN00"].size
    assert cw == 2 * 64 + CELL_GAP and ch == 2 * LINE - 2 * LABEL_PAD + 40 + LINE  # block + figure, seed line
    assert grid.size == (3 * cw + 2 * GRID_GAP, rows * ch + (rows - 1) * GRID_GAP)
    geometry = u_geometry(blocks, (cw, ch))
    assert (geometry.width, geometry.height) == grid.size
    layout = u_layout(blocks)
    for block, image in drawn.items():
        r, c = layout[block]
        x, y = c * (cw + GRID_GAP), r * (ch + GRID_GAP)
        assert geometry.box(r, c) == (x, y, x + cw, y + ch)
        assert np.array_equal(region(grid, (x, y, x + cw, y + ch)), np.asarray(image)), block
    # the missing block is light grey, unused middle positions and gaps white
    r, c = layout["IN03"]
    assert (region(grid, geometry.box(r, c)) == EMPTY_COLOR).all()
    assert (region(grid, geometry.box(1, 1)) == BACKGROUND).all()
    assert (region(grid, (cw, 0, cw + GRID_GAP, grid.height)) == BACKGROUND).all()


def test_u_grid_cells_show_block_seeds_and_influence():
    cells = {
        "IN05": seeds_cell("IN05", seeds=(3, 41), share=0.123),
        "M00": seeds_cell("M00", seeds=(3, 41), share=0),
    }
    baseline = seeds_cell("baseline", seeds=(3, 41))
    assert cell_text(cells["IN05"]).caption == ("IN05", "changed 12.3 %")
    assert cell_text(cells["M00"]).caption == ("M00", "changed 0.0 %")
    assert cell_text(baseline).caption == ("baseline",)
    for cell in [*cells.values(), baseline]:
        assert cell_text(cell).seeds == (("seed 3",), ("seed 41",))
    grid = u_grid(cells, baseline, SDXL)
    drawn = render_cells({**cells, "baseline": baseline})
    geometry = u_geometry(SDXL, drawn["IN05"].size)
    strips = cell_strips([cell_text(cell) for cell in [*cells.values(), baseline]])
    for block in ("IN05", "M00", "baseline"):
        x0, y0, x1, y1 = geometry.box(*u_layout(SDXL)[block])
        assert has_text(region(grid, (x0, y0, x1, y0 + strips.caption))), block  # block name and figure
        for left in (0, 64 + CELL_GAP):  # a seed under each image
            assert has_text(region(grid, (x0 + left, y1 - strips.seeds, x0 + left + 64, y1))), block


def test_u_grid_rejects_unknown_blocks():
    with pytest.raises(ValueError, match="not in arch_blocks"):
        u_grid({"IN11": seeds_cell("IN11")}, seeds_cell("baseline"), SDXL)


# --- X × Y and rows --------------------------------------------------------------------------------------


def test_xy_grid_geometry_and_paste():
    rng = np.random.default_rng(5)
    x_labels, y_labels = ["0.0", "0.5"], ["seed 1", "seed 2", "seed 300"]
    cells = {
        (x, y): seeds_cell("", seeds=(y,), size=(70, 50), share=0.1, rng=rng)
        for x in range(2)
        for y in range(3)
    }
    grid = xy_grid(cells, x_labels, y_labels, x_title="alpha", y_title="seed")
    drawn = render_cells(cells)
    cw, ch = drawn[(0, 0)].size
    assert cw == 70 and ch > 50
    g = xy_geometry((cw, ch), x_labels, y_labels, x_title="alpha", y_title="seed")
    widest = max(drawn_width(t) for t in [*y_labels, "seed"])
    assert abs(g.left - (widest + 2 * LABEL_PAD + GRID_GAP)) <= 1
    assert g.top == 2 * LINE + GRID_GAP  # the title's line, the labels' line
    assert grid.size == (g.width, g.height) == (g.left + 2 * cw + GRID_GAP, g.top + 3 * ch + 2 * GRID_GAP)
    for (x, y), image in drawn.items():
        assert np.array_equal(region(grid, g.box(y, x)), np.asarray(image))
    assert has_text(np.asarray(grid)[: g.top, g.left :])  # x labels / title drawn
    assert has_text(np.asarray(grid)[g.top :, : g.left - GRID_GAP])  # y labels drawn


def test_xy_cells_are_never_smaller_than_their_images():
    rng = np.random.default_rng(7)
    size = (80, 60)
    cells = {(x, 0): seeds_cell("", seeds=(1, 2), size=size, share=0.25, rng=rng) for x in range(2)}
    x_labels = ["a very long x label that is much wider than one cell", "b"]
    grid = xy_grid(cells, x_labels, ["y"], x_title="x", y_title="y")
    g = xy_geometry(render_cells(cells)[(0, 0)].size, x_labels, ["y"], x_title="x", y_title="y")
    assert grid.size == (g.width, g.height)
    assert g.cell_w >= 2 * size[0] + CELL_GAP and g.cell_h >= size[1]
    strips = cell_strips([cell_text(cell) for cell in cells.values()])
    for (x, y), cell in cells.items():
        x0, y0, _, _ = g.box(y, x)
        for image, left in zip(cell.images, (0, size[0] + CELL_GAP), strict=True):
            box = (x0 + left, y0 + strips.caption, x0 + left + size[0], y0 + strips.caption + size[1])
            assert np.array_equal(region(grid, box), np.asarray(image))  # at its own size, not shrunk


def test_xy_labels_wrap_to_the_cell_and_are_not_cut():
    cell = seeds_cell("", seeds=(1,), size=(64, 64), share=0.5)
    long_x = "IN04 alpha=0.5 and a description longer than any cell"
    long_y = "a cat sitting on a windowsill at dusk, soft light"
    x_labels, y_labels = [long_x, "alpha=0.75"], [long_y, "seed=1234567890"]
    cells = {(0, 0): cell, (1, 1): cell}
    cw, ch = render_cells(cells)[(0, 0)].size
    headers = xy_headers((cw, ch), x_labels, y_labels, x_title="alpha", y_title="prompt")
    g = xy_geometry((cw, ch), x_labels, y_labels, x_title="alpha", y_title="prompt")
    room = cw - 2 * LABEL_PAD
    for label, lines in [
        *zip(x_labels, headers.columns, strict=True),
        *zip(y_labels, headers.rows, strict=True),
    ]:
        assert all(drawn_width(line) <= room for line in lines), lines  # every line fits the cell width
        assert "".join(lines).replace(" ", "") == label.replace(" ", "")  # all of it, split over lines
    assert len(headers.columns[0]) > 2 and len(headers.rows[0]) > 2
    most = max(len(lines) for lines in headers.columns)
    assert g.top - GRID_GAP - headers.title_height >= text_block_height(
        most, label_font()
    )  # the strip holds them
    assert g.cell_h >= text_block_height(len(headers.rows[0]), label_font())  # the row holds its label
    grid = xy_grid(cells, x_labels, y_labels, x_title="alpha", y_title="prompt")
    assert grid.size == (g.width, g.height)
    # every line of the long x label is drawn: each line's band over the first column has text
    x0, _ = g.origin(0, 0)
    line = text_block_height(1, label_font()) - 2 * LABEL_PAD
    top = headers.title_height + LABEL_PAD
    for i in range(len(headers.columns[0])):
        assert has_text(region(grid, (x0, top + i * line, x0 + cw, top + (i + 1) * line))), i
    # the y label's lines sit left of their row, inside it
    _, y0 = g.origin(0, 0)
    assert has_text(region(grid, (0, y0, g.left - GRID_GAP, y0 + g.cell_h)))


def test_xy_grid_missing_and_outside_cells():
    cell = seeds_cell("", seeds=(1,), size=(64, 40))
    grid = xy_grid({(0, 0): cell}, ["a", "b"], ["c"], x_title="", y_title="y")
    size = render_cells({0: cell})[0].size
    g = xy_geometry(size, ["a", "b"], ["c"], x_title="", y_title="y")
    assert g.top == LINE + GRID_GAP and grid.size == (g.width, g.height)
    assert (region(grid, g.box(0, 1)) == EMPTY_COLOR).all()
    with pytest.raises(ValueError, match="outside"):
        xy_grid({(2, 0): cell}, ["a", "b"], ["c"], x_title="x", y_title="y")


def test_rows_grid():
    rng = np.random.default_rng(6)
    baseline = seeds_cell("baseline", seeds=(1,), size=(72, 48), rng=rng)
    rows = [
        seeds_cell(label, seeds=(1,), size=(72, 48), share=0.2, rng=rng)
        for label in ("OUT05:attn2:0", "IN04::1")
    ]
    grid = rows_grid(rows, baseline)
    drawn = render_cells({i: replace(cell, label="") for i, cell in enumerate([baseline, *rows])})
    size = drawn[0].size
    g = rows_geometry(["baseline", "OUT05:attn2:0", "IN04::1"], size)
    assert grid.size == (g.width, g.height) == (g.left + 72, 3 * g.cell_h + 2 * GRID_GAP)
    for i in range(3):
        assert np.array_equal(region(grid, g.box(i, 0)), np.asarray(drawn[i]))
    headers = rows_headers(["baseline", "OUT05:attn2:0", "IN04::1"], size)
    assert headers.rows == (("baseline",), ("OUT05:", "attn2:0"), ("IN04::1",))
    assert all(drawn_width(line) <= 72 - 2 * LABEL_PAD for lines in headers.rows for line in lines)
    # cells of another size: each top-left in a position as large as the largest
    wide = seeds_cell("wide", seeds=(1, 2), size=(72, 48), rng=rng)
    mixed = rows_grid([wide], baseline)
    g = rows_geometry(["baseline", "wide"], render_cells({0: replace(wide, label="")})[0].size)
    assert mixed.size == (g.width, g.height) and g.cell_w == 2 * 72 + CELL_GAP
