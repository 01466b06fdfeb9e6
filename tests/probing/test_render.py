"""Images from captured tensors: feature grids, attention grids, overlays, PNG bytes."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mergeprobe.probing.colorize import Colorize
from mergeprobe.probing.colorize_render import colorize
from worker.probing.render import (
    GAP_COLOR,
    MIN_CELL_PX,
    attention_grid,
    attention_layout,
    feature_grid,
    grid_shape,
    heatmap_overlay,
    jet,
    normalize_heat,
    png_bytes,
)

RNG = np.random.default_rng(1234)


def pixels(image: Image.Image) -> np.ndarray:
    if image.mode == "L":  # white_black grids are greyscale: the same grey in every channel
        image = image.convert("RGB")
    assert image.mode == "RGB"
    return np.asarray(image)


def test_render_does_not_import_torch():
    code = "import sys, worker.probing.render; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- feature grid ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tiles", "shape"),
    [(1, (1, 1)), (2, (1, 2)), (3, (2, 2)), (5, (2, 3)), (9, (3, 3)), (10, (3, 4)), (321, (18, 18))],
)
def test_grid_shape(tiles, shape):
    rows, cols = grid_shape(tiles)
    assert (rows, cols) == shape
    assert rows * cols >= tiles


def test_feature_grid_four_channels_non_square():
    c, h, w = 4, 2, 3
    feature = RNG.standard_normal((c, h, w)).astype(np.float32)
    spec = Colorize(method="red_blue", transform="auto11")
    image = feature_grid(feature, spec)
    # mean + 4 channels = 5 tiles → cols = ceil(sqrt(5)) = 3, rows = 2, 1-px gaps
    assert image.size == (3 * w + 2, 2 * h + 1) == (11, 5)
    px = pixels(image)
    mean = feature.astype(np.float64).mean(axis=0)
    np.testing.assert_array_equal(px[0:h, 0:w], colorize(mean, spec))
    for k in range(c):
        row, col = divmod(k + 1, 3)
        tile = px[row * (h + 1) : row * (h + 1) + h, col * (w + 1) : col * (w + 1) + w]
        np.testing.assert_array_equal(tile, colorize(feature[k], spec))
    # gap column after each tile, gap row between rows, unused last cell: all GAP_COLOR
    assert (px[:, w] == GAP_COLOR).all() and (px[:, 2 * w + 1] == GAP_COLOR).all()
    assert (px[h] == GAP_COLOR).all()
    assert (px[h + 1 :, 2 * (w + 1) :] == GAP_COLOR).all()


def test_feature_grid_tall_maps_and_per_tile_auto():
    feature = np.stack([np.arange(12.0).reshape(4, 3), np.arange(12.0).reshape(4, 3) * 1000 + 5])
    image = feature_grid(feature, Colorize())
    assert image.size == (2 * 3 + 1, 2 * 4 + 1)  # 3 tiles → 2×2
    px = pixels(image)
    # row 0: mean, channel 0; row 1: channel 1, an empty cell
    mean, first, second = px[0:4, 0:3], px[0:4, 4:7], px[5:9, 0:3]
    np.testing.assert_array_equal(first, second)  # channels 0 and 1 look the same: auto01 per tile
    np.testing.assert_array_equal(mean, first)  # so does their mean (an affine map of channel 0)
    assert first[0, 0].tolist() == [0, 0, 0] and first[-1, -1].tolist() == [255, 255, 255]
    assert (px[5:9, 4:7] == GAP_COLOR).all()


def test_feature_grid_single_channel_and_torch_like_input():
    class FakeTensor:  # what the worker hands over: a torch tensor, converted by duck typing
        def __init__(self, array):
            self.array = array

        def detach(self):
            return self

        def cpu(self):
            return self

        def float(self):
            return self

        def numpy(self):
            return self.array

    feature = RNG.standard_normal((1, 5, 7)).astype(np.float32)
    image = feature_grid(FakeTensor(feature), Colorize())
    assert image.size == (2 * 7 + 1, 5)
    np.testing.assert_array_equal(pixels(image)[:, :7], pixels(image)[:, 8:])  # mean of one channel = it


def test_feature_grid_rejects_wrong_shapes():
    with pytest.raises(ValueError):
        feature_grid(np.zeros((4, 4)), Colorize())
    with pytest.raises(ValueError):
        feature_grid(np.zeros((0, 4, 4)), Colorize())


def test_feature_grid_deterministic():
    feature = RNG.standard_normal((6, 4, 4))
    spec = Colorize(method="custom", transform="sigmoid")
    assert png_bytes(feature_grid(feature, spec)) == png_bytes(feature_grid(feature, spec))


# --- attention grid --------------------------------------------------------------------------------------


def test_attention_grid_geometry_and_cells():
    heads, tokens, h, w = 2, 3, 8, 4
    probs = RNG.random((heads, tokens, h, w)).astype(np.float32)
    spec = Colorize(method="white_black", transform="auto01")
    image = attention_grid(probs, ["a", "cute", "girl"], spec)
    layout = attention_layout(heads, tokens, h, w)
    assert layout.scale == 4 == MIN_CELL_PX // h
    assert (layout.cell_w, layout.cell_h) == (16, 32)
    assert layout.width == layout.left + tokens * 16 + (tokens - 1)
    assert layout.height == layout.top + heads * 32 + (heads - 1)
    assert image.size == (layout.width, layout.height)
    px = pixels(image)
    for head in range(heads):
        for token in range(tokens):
            y = layout.top + head * (layout.cell_h + 1)
            x = layout.left + token * (layout.cell_w + 1)
            cell = px[y : y + layout.cell_h, x : x + layout.cell_w]
            expected = colorize(probs[head, token], spec).repeat(4, axis=0).repeat(4, axis=1)
            np.testing.assert_array_equal(cell, expected)


def test_attention_grid_draws_labels():
    probs = RNG.random((2, 3, 8, 8)).astype(np.float32)
    layout = attention_layout(2, 3, 8, 8)
    labeled = pixels(attention_grid(probs, ["pink", "hair", "<|endoftext|>"], Colorize()))
    blank = pixels(attention_grid(probs, ["", "", ""], Colorize()))
    strip = labeled[: layout.top, layout.left :]
    assert len({tuple(p) for p in strip.reshape(-1, 3)}) > 1  # text drawn, not a uniform strip
    assert (blank[: layout.top, layout.left :] == GAP_COLOR).all()
    head_column = labeled[layout.top :, : layout.left]
    assert len({tuple(p) for p in head_column.reshape(-1, 3)}) > 1  # head indices drawn
    # Labels stay in the strip and the head column: the cells are untouched.
    np.testing.assert_array_equal(labeled[layout.top :, layout.left :], blank[layout.top :, layout.left :])


def test_attention_grid_odd_labels_and_shapes():
    probs = RNG.random((1, 2, 3, 20)).astype(np.float32)  # wide, very small maps
    image = attention_grid(probs, ["日本語", "x" * 200], Colorize(method="red_blue", transform="auto11"))
    layout = attention_layout(1, 2, 3, 20)
    assert layout.scale == 11 and (layout.cell_w, layout.cell_h) == (220, 33)
    assert image.size == (layout.width, layout.height)
    with pytest.raises(ValueError):
        attention_grid(probs, ["only one"], Colorize())
    with pytest.raises(ValueError):
        attention_grid(np.zeros((2, 8, 8)), [], Colorize())


def test_attention_grid_large_maps_are_not_scaled():
    assert attention_layout(8, 77, 64, 64).scale == 1


# --- overlay ---------------------------------------------------------------------------------------------


def test_overlay_size_and_blend():
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    heat = RNG.random((4, 5))
    out = heatmap_overlay(image, heat, alpha=0.5)
    assert out.size == image.size and out.mode == "RGB"
    untouched = heatmap_overlay(image, heat, alpha=0.0)
    assert (pixels(untouched) == [10, 200, 30]).all()
    full = pixels(heatmap_overlay(image, np.ones((4, 5)), alpha=1.0))
    assert (full == [128, 0, 0]).all()  # jet(1) = dark red


def test_overlay_zero_and_one_heat_differ():
    image = Image.new("RGB", (16, 8), (255, 255, 255))
    cold = pixels(heatmap_overlay(image, np.zeros((2, 2))))
    hot = pixels(heatmap_overlay(image, np.ones((2, 2))))
    assert (cold == cold[0, 0]).all() and (hot == hot[0, 0]).all()
    assert cold[0, 0].tolist() == [128, 128, 191]  # ½ white + ½ jet(0) = (0, 0, 128)
    assert hot[0, 0].tolist() == [191, 128, 128]  # ½ white + ½ jet(1) = (128, 0, 0)


def test_overlay_upsamples_smoothly():
    image = Image.new("RGB", (64, 8), (0, 0, 0))
    heat = np.array([[0.0, 1.0]])
    out = pixels(heatmap_overlay(image, heat, alpha=1.0))
    assert out[4, 0].tolist() == [0, 0, 128] and out[4, -1].tolist() == [128, 0, 0]
    assert len({tuple(p) for p in out[4]}) > 10  # bilinear, not two blocks


def test_overlay_accepts_grayscale_and_rejects_bad_alpha():
    image = Image.new("L", (8, 8), 50)
    assert heatmap_overlay(image, np.zeros((2, 2))).mode == "RGB"
    with pytest.raises(ValueError):
        heatmap_overlay(image, np.zeros((2, 2)), alpha=1.5)


def test_jet_and_heat_normalization():
    assert (jet(np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])) * 255).round().tolist() == [
        [0, 0, 128],
        [0, 0, 255],
        [0, 255, 255],
        [255, 255, 0],
        [255, 0, 0],
        [128, 0, 0],
    ]
    assert jet(np.array([-1.0, 2.0, np.nan])).tolist() == [[0, 0, 0.5], [0.5, 0, 0], [0, 0, 0.5]]
    assert normalize_heat(np.array([0.0, 2.0, 4.0])).tolist() == [0, 0.5, 1]
    assert normalize_heat(np.array([-2.0, 2.0, np.inf])).tolist() == [0, 1, 0]
    assert normalize_heat(np.zeros(3)).tolist() == [0, 0, 0]
    assert normalize_heat(np.ones(3)).tolist() == [1, 1, 1]
    assert normalize_heat(np.array([-2.0, 0.0, 2.0]), "minmax").tolist() == [0, 0.5, 1]
    assert normalize_heat(np.ones(3), "minmax").tolist() == [0, 0, 0]
    assert normalize_heat(np.array([-1.0, 0.5, 3.0]), "none").tolist() == [0, 0.5, 1]
    with pytest.raises(ValueError):
        normalize_heat(np.ones(3), "bogus")  # type: ignore[arg-type]


# --- png -------------------------------------------------------------------------------------------------


def test_png_bytes_round_trip():
    image = feature_grid(RNG.standard_normal((3, 5, 6)), Colorize(method="custom"))
    data = png_bytes(image)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as back:
        np.testing.assert_array_equal(np.asarray(back.convert("RGB")), pixels(image))
