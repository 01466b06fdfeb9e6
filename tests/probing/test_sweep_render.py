"""Sweep images: influence numbers, difference images, flip GIFs, U / X×Y / row grids."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFont

from mergeprobe.checkpoints.archs import get_arch
from worker.probing import render
from worker.probing.sweep_render import (
    BACKGROUND,
    EMPTY_COLOR,
    GRID_GAP,
    LABEL_PAD,
    difference_image,
    flip_gif,
    influence,
    label_cell,
    label_height,
    png_bytes,
    rows_geometry,
    rows_grid,
    ssim_index,
    u_geometry,
    u_grid,
    u_layout,
    xy_geometry,
    xy_grid,
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


def test_label_cell_geometry():
    seeds = [solid(8, 6, (10 * i, 20, 30)) for i in range(1, 4)]
    cell = label_cell(seeds, "IN05")
    strip = label_height()
    assert cell.size == (3 * 8 + 2, strip + 6)
    for i, seed in enumerate(seeds):
        x = i * 9
        assert np.array_equal(region(cell, (x, strip, x + 8, strip + 6)), np.asarray(seed))
    assert tuple(np.asarray(cell)[strip, 8]) == BACKGROUND  # 1-px gap
    assert (np.asarray(cell)[:strip] != BACKGROUND).any()  # label text drawn


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
    seed_w, seed_h = 6, 5
    cells = {
        b: label_cell([random_image(rng, seed_w, seed_h) for _ in range(2)], b) for b in blocks if b != "IN03"
    }
    cw, ch = next(iter(cells.values())).size
    baseline = label_cell([random_image(rng, seed_w, seed_h) for _ in range(2)], "baseline")
    grid = u_grid(cells, baseline, blocks)
    assert grid.size == (3 * cw + 2 * GRID_GAP, rows * ch + (rows - 1) * GRID_GAP)
    geometry = u_geometry(blocks, (cw, ch))
    assert (geometry.width, geometry.height) == grid.size
    layout = u_layout(blocks)
    for block, image in [*cells.items(), ("baseline", baseline)]:
        r, c = layout[block]
        x, y = c * (cw + GRID_GAP), r * (ch + GRID_GAP)
        assert geometry.box(r, c) == (x, y, x + cw, y + ch)
        assert np.array_equal(region(grid, (x, y, x + cw, y + ch)), np.asarray(image)), block
    # the missing block is light grey, unused middle positions and gaps white
    r, c = layout["IN03"]
    assert (region(grid, geometry.box(r, c)) == EMPTY_COLOR).all()
    assert (region(grid, geometry.box(1, 1)) == BACKGROUND).all()
    assert (region(grid, (cw, 0, cw + GRID_GAP, grid.height)) == BACKGROUND).all()


def test_u_grid_bare_baseline_strip_is_labelled():
    cell = label_cell([solid(6, 5, (1, 2, 3))], "IN00")
    strip = solid(6, 5, (200, 100, 50))
    grid = u_grid({"IN00": cell}, strip, SDXL)
    x0, y0, x1, y1 = u_geometry(SDXL, cell.size).box(*u_layout(SDXL)["baseline"])
    assert np.array_equal(region(grid, (x0, y0, x1, y1)), np.asarray(label_cell([strip], "baseline")))
    with pytest.raises(ValueError, match="not in arch_blocks"):
        u_grid({"IN11": cell}, strip, SDXL)


# --- X × Y and rows --------------------------------------------------------------------------------------


def test_xy_grid_geometry_and_paste():
    rng = np.random.default_rng(5)
    cw, ch = 11, 7
    x_labels, y_labels = ["0.0", "0.5"], ["seed 1", "seed 2", "seed 300"]
    cells = {(x, y): random_image(rng, cw, ch) for x in range(2) for y in range(3)}
    grid = xy_grid(cells, x_labels, y_labels, x_title="alpha", y_title="seed")
    font = ImageFont.load_default()
    widest = max(int(np.ceil(font.getbbox(t)[2] - font.getbbox(t)[0])) for t in [*y_labels, "seed"])
    left = widest + 2 * LABEL_PAD + GRID_GAP
    top = 2 * label_height() + GRID_GAP
    assert grid.size == (left + 2 * cw + GRID_GAP, top + 3 * ch + 2 * GRID_GAP)
    g = xy_geometry((cw, ch), x_labels, y_labels, x_title="alpha", y_title="seed")
    assert (g.left, g.top, g.width, g.height) == (left, top, *grid.size)
    x0, y0 = left + 1 * (cw + GRID_GAP), top + 2 * (ch + GRID_GAP)
    assert np.array_equal(region(grid, (x0, y0, x0 + cw, y0 + ch)), np.asarray(cells[(1, 2)]))
    for (x, y), image in cells.items():
        assert np.array_equal(region(grid, g.box(y, x)), np.asarray(image))
    assert (np.asarray(grid)[:top, left:] != BACKGROUND).any()  # x labels / title drawn
    assert (np.asarray(grid)[top:, : left - GRID_GAP] != BACKGROUND).any()  # y labels drawn


def test_xy_grid_missing_and_outside_cells():
    cell = solid(5, 5, (9, 9, 9))
    grid = xy_grid({(0, 0): cell}, ["a", "b"], ["c"], x_title="", y_title="y")
    g = xy_geometry((5, 5), ["a", "b"], ["c"], x_title="", y_title="y")
    assert g.top == label_height() + GRID_GAP and grid.size == (g.width, g.height)
    assert (region(grid, g.box(0, 1)) == EMPTY_COLOR).all()
    with pytest.raises(ValueError, match="outside"):
        xy_grid({(2, 0): cell}, ["a", "b"], ["c"], x_title="x", y_title="y")


def test_rows_grid():
    rng = np.random.default_rng(6)
    baseline = random_image(rng, 13, 6)
    rows = [("OUT05:attn2", random_image(rng, 13, 6)), ("OUT05:attn1", random_image(rng, 13, 6))]
    grid = rows_grid(rows, baseline)
    g = rows_geometry(["baseline", "OUT05:attn2", "OUT05:attn1"], (13, 6))
    assert grid.size == (g.width, g.height) == (g.left + 13, 3 * 6 + 2 * GRID_GAP)
    assert np.array_equal(region(grid, g.box(0, 0)), np.asarray(baseline))
    for i, (_, image) in enumerate(rows, start=1):
        assert np.array_equal(region(grid, g.box(i, 0)), np.asarray(image))
    with pytest.raises(ValueError, match="same size"):
        rows_grid([("x", random_image(rng, 12, 6))], baseline)
