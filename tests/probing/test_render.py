"""Images from captured tensors: feature grids, attention grids, overlays, PNG bytes."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mergeprobe.probing.colorize import Colorize
from mergeprobe.probing.colorize_render import colorize
from mergeprobe.probing.picture_geometry import (
    FRAME_HEIGHT_BOUND,
    MAX_PICTURE_PX,
    MIN_CELL_PX,
    READABLE_PX,
    attention_scale,
    feature_grid_size,
    framed_pixels_bound,
    grid_shape,
    upscale_factor,
)
from worker.probing.render import (
    BAR_HEIGHT,
    GAP_COLOR,
    LABEL_PAD,
    TEXT_COLOR,
    Capture,
    attention_grid,
    attention_layout,
    colour_scale,
    feature_grid,
    feature_layout,
    feature_title,
    heatmap_overlay,
    jet,
    label_font,
    normalize_heat,
    png_bytes,
    text_block_height,
    title_font,
    wrap_label,
)

RNG = np.random.default_rng(1234)


def pixels(image: Image.Image) -> np.ndarray:
    if image.mode == "L":  # white_black grids are greyscale: the same grey in every channel
        image = image.convert("RGB")
    assert image.mode == "RGB"
    return np.asarray(image)


def crop(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return pixels(image.crop(box))


def drawn_width(text: str, font=None) -> int:
    """The width of `text` as ImageDraw draws it with the renderers' font."""
    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox(
        (0, 0), text, font=font or label_font()
    )
    return right - left


def has_text(region: np.ndarray, background) -> bool:
    return bool((region != np.asarray(background)).any())


def test_render_does_not_import_torch():
    code = "import sys, worker.probing.render; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- labels ----------------------------------------------------------------------------------------------


def test_wrap_label_fits_and_keeps_every_character():
    font = label_font()
    text = "a cat sitting on a windowsill IN04:attn2:0_extra_long_identifier_without_spaces"
    for width in (40, 64, 100, 300):
        lines = wrap_label(font, text, width)
        assert all(drawn_width(line) <= width for line in lines), (width, lines)
        assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    assert wrap_label(font, "alpha=0.25", 1000) == ["alpha=0.25"]
    assert wrap_label(font, "", 50) == [] and wrap_label(font, "   ", 50) == []


def test_wrap_label_breaks_long_words_after_punctuation_not_in_numbers():
    font = label_font()
    width = drawn_width("alpha=0.2")  # "alpha=0.25" is a little wider
    assert wrap_label(font, "alpha=0.25", width) == ["alpha=", "0.25"]
    assert wrap_label(font, "OUT05:attn2:0", drawn_width("OUT05:attn2")) == ["OUT05:", "attn2:0"]
    assert wrap_label(font, "x" * 30, drawn_width("x" * 10)) == ["x" * 10] * 3
    assert wrap_label(font, "日本", 100) == ["??"]  # the built-in font draws ASCII (and ·) only


# --- feature grid ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tiles", "shape"),
    [(1, (1, 1)), (2, (1, 2)), (3, (2, 2)), (5, (2, 3)), (9, (3, 3)), (10, (3, 4)), (321, (18, 18))],
)
def test_grid_shape(tiles, shape):
    rows, cols = grid_shape(tiles)
    assert (rows, cols) == shape
    assert rows * cols >= tiles


def grid_long_side(rows: int, cols: int, h: int, w: int, scale: int) -> int:
    return max(cols * (w * scale + 1) - 1, rows * (h * scale + 1) - 1)


@pytest.mark.parametrize(
    ("rows", "cols", "h", "w"),
    [(2, 3, 2, 3), (1, 2, 5, 7), (18, 18, 8, 8), (36, 36, 4, 4), (18, 18, 64, 64), (2, 1, 12, 700)],
)
def test_upscale_factor_reaches_the_readable_size(rows, cols, h, w):
    scale = upscale_factor(rows, cols, h, w)
    long_side = grid_long_side(rows, cols, h, w, scale)
    if grid_long_side(rows, cols, h, w, 1) >= READABLE_PX:
        assert scale == 1  # never shrunk, never enlarged when already readable
    else:
        assert READABLE_PX <= long_side <= MAX_PICTURE_PX
        assert grid_long_side(rows, cols, h, w, scale - 1) < READABLE_PX  # the smallest such factor
    assert upscale_factor(1, 2, 1, 5000) == 1  # past MAX_PICTURE_PX already: left as it is


def test_feature_grid_upscales_tiles_with_one_pixel_gaps():
    c, h, w = 4, 2, 3
    feature = RNG.standard_normal((c, h, w)).astype(np.float32)
    spec = Colorize(method="red_blue", transform="auto11")
    image = feature_grid(feature, spec)
    layout = feature_layout(feature, spec)
    # mean + 4 channels = 5 tiles → cols = ceil(sqrt(5)) = 3, rows = 2; 3·(3s + 1) − 1 ≥ 512 → s = 57
    assert (layout.rows, layout.cols, layout.scale) == (2, 3, 57)
    assert (layout.tile_w, layout.tile_h) == (171, 114)
    assert image.size == (layout.frame.width, layout.frame.height)
    assert layout.frame.content_w == 3 * 171 + 2 >= READABLE_PX
    mean = feature.astype(np.float64).mean(axis=0)
    for index, values in enumerate([mean, *feature]):
        expected = colorize(values, spec).repeat(57, axis=0).repeat(57, axis=1)
        np.testing.assert_array_equal(crop(image, layout.tile_box(index)), expected)
    # the gap column after the first tile and the gap row between the rows; the unused last cell
    x0, y0, x1, y1 = layout.tile_box(0)
    assert (crop(image, (x1, y0, x1 + 1, y1)) == GAP_COLOR).all()
    assert (crop(image, (x0, y1, x1, y1 + 1)) == GAP_COLOR).all()
    assert (crop(image, layout.tile_box(5)) == GAP_COLOR).all()


@pytest.mark.parametrize("shape", [(320, 8, 8), (1280, 4, 4), (4, 2, 3), (1, 5, 7), (3, 12, 1)])
def test_feature_grid_is_at_least_the_readable_size(shape):
    image = feature_grid(RNG.standard_normal(shape).astype(np.float32), Colorize())
    layout = feature_layout(np.zeros(shape), Colorize())
    assert max(layout.frame.content_w, layout.frame.content_h) >= READABLE_PX
    assert max(image.size) >= READABLE_PX and max(image.size) <= MAX_PICTURE_PX + 200


def test_the_frame_stays_within_the_estimates_bound():
    """The capture estimate counts a picture as framed_pixels_bound of its grid: the longest title and
    note a dump writes fit in FRAME_HEIGHT_BOUND, at the narrowest frame."""
    worst = Capture("OUT11", 150, "uncond", 15, "difference: block prompts - plain prompt")
    spec = Colorize(method="custom", transform="sigmoid", gain=-1.2345, offset=-0.98765)
    feature = np.array([[[-1.2345e-30, 9.8765e30]]] * 1280, dtype=np.float32)
    layout = feature_layout(feature, spec, worst)
    frame = layout.frame
    assert (frame.content_w, frame.content_h) == feature_grid_size(1280, 1, 2)
    assert frame.height - frame.content_h <= FRAME_HEIGHT_BOUND
    assert frame.width * frame.height <= framed_pixels_bound(frame.content_w, frame.content_h)
    probs = np.zeros((20, 77, 1, 2), dtype=np.float32)
    attention = attention_layout(probs, ["<|startoftext|>"] * 77, spec, worst).frame
    assert attention.height - attention.content_h <= FRAME_HEIGHT_BOUND


def test_feature_grid_per_tile_auto():
    feature = np.stack([np.arange(12.0).reshape(4, 3), np.arange(12.0).reshape(4, 3) * 1000 + 5])
    image = feature_grid(feature, Colorize())
    layout = feature_layout(feature, Colorize())
    assert (layout.rows, layout.cols) == (2, 2)  # 3 tiles → 2×2
    mean, first, second = (crop(image, layout.tile_box(i)) for i in range(3))
    np.testing.assert_array_equal(first, second)  # channels 0 and 1 look the same: auto01 per tile
    np.testing.assert_array_equal(mean, first)  # so does their mean (an affine map of channel 0)
    assert first[0, 0].tolist() == [0, 0, 0] and first[-1, -1].tolist() == [255, 255, 255]
    assert (crop(image, layout.tile_box(3)) == GAP_COLOR).all()


def test_feature_grid_title_strip():
    capture = Capture("IN04", 5, "cond")
    assert feature_title(320, capture) == "IN04 · step 5 · cond · channels 0-319 (mean first)"
    assert feature_title(1) == "channel 0 (mean first)"
    assert (
        Capture("M00", 12, "uncond", 1, "difference").title()
        == "M00 · step 12 · uncond · image 1 · difference"
    )
    feature = RNG.standard_normal((320, 8, 8)).astype(np.float32)
    image = feature_grid(feature, Colorize(), capture)
    frame = feature_layout(feature, Colorize(), capture).frame
    assert frame.title == ("IN04 · step 5 · cond · channels 0-319 (mean first)",)  # one line: it fits
    assert frame.content_top == frame.title_height >= 16
    strip = crop(image, (0, 0, frame.width, frame.content_top))
    assert has_text(strip, GAP_COLOR)
    assert (strip == TEXT_COLOR[0]).any()  # light text on the dark strip ("L": one grey)
    # A title too long for the width is wrapped over lines, not cut.
    long = Capture("IN04", 5, "cond", what="difference: " + " ".join(["block prompts - plain prompt"] * 4))
    title = feature_layout(np.zeros((3, 2, 2)), Colorize(), long).frame.title
    assert len(title) > 1 and " ".join(title) == feature_title(3, long)


def bar_pixels(image: Image.Image, feature: np.ndarray, spec: Colorize) -> np.ndarray:
    return crop(image, feature_layout(feature, spec).frame.bar)


def test_feature_grid_colour_bar_white_black():
    feature = RNG.standard_normal((6, 4, 4)).astype(np.float32) * 3
    spec = Colorize()
    image = feature_grid(feature, spec)
    frame = feature_layout(feature, spec).frame
    bar = bar_pixels(image, feature, spec)
    assert bar.shape[0] == BAR_HEIGHT and bar.shape[1] == frame.width - 2 * 6
    assert (bar == bar[:1]).all()  # every row the same ramp
    grey = bar[0, :, 0].astype(int)
    assert (np.diff(grey) >= 0).all() and grey[0] == 0 and grey[-1] == 255  # black → white, monotonic
    assert frame.colours.ticks == ("tile min", "", "tile max")
    low, high = float(feature.min()), float(feature.max())
    assert frame.colours.note.endswith(f"values here {low:.3g} to {high:.3g}")
    assert " ".join(frame.note) == frame.colours.note
    below = crop(image, (0, frame.ticks_top, frame.width, frame.height))
    assert has_text(below, GAP_COLOR)  # the bar's labels and the note are drawn


def test_feature_grid_colour_bar_red_blue_and_fixed_scales():
    feature = RNG.standard_normal((3, 4, 4)).astype(np.float32)
    spec = Colorize(method="red_blue", transform="auto11")
    bar = bar_pixels(feature_grid(feature, spec), feature, spec)[0].astype(int)
    assert bar[0].tolist() == [0, 0, 255] and bar[-1].tolist() == [255, 0, 0]  # blue … red
    assert (np.diff(bar[:, 0]) >= 0).all() and (np.diff(bar[:, 2]) <= 0).all()
    assert bar[len(bar) // 2].tolist() == [255, 255, 255] or bar[len(bar) // 2 - 1].min() >= 250  # white at 0
    assert colour_scale(spec, feature).ticks == ("-max|v|", "0", "+max|v|")
    linear = Colorize(method="white_black", transform="linear", min=-2, max=2)
    assert colour_scale(linear, feature).ticks == ("-2", "0", "2")
    assert "clamped to [-2, 2]" in colour_scale(linear, feature).note
    sigmoid = Colorize(transform="sigmoid", gain=2.0, offset=1.0)
    scale = colour_scale(sigmoid, feature)
    assert (scale.low, scale.high, scale.ticks[1]) == (-2.0, 4.0, "1")
    assert colour_scale(Colorize(), np.array([np.nan])).note.endswith("no finite values")


def test_feature_grid_torch_like_input():
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
    layout = feature_layout(feature, Colorize())
    assert image.size == (layout.frame.width, layout.frame.height)
    np.testing.assert_array_equal(crop(image, layout.tile_box(0)), crop(image, layout.tile_box(1)))


def test_feature_grid_rejects_wrong_shapes():
    with pytest.raises(ValueError):
        feature_grid(np.zeros((4, 4)), Colorize())
    with pytest.raises(ValueError):
        feature_grid(np.zeros((0, 4, 4)), Colorize())


def test_feature_grid_deterministic():
    feature = RNG.standard_normal((6, 4, 4))
    spec = Colorize(method="custom", transform="sigmoid")
    capture = Capture("OUT11", 3, "uncond")
    assert png_bytes(feature_grid(feature, spec, capture)) == png_bytes(feature_grid(feature, spec, capture))


# --- attention grid --------------------------------------------------------------------------------------


def test_attention_grid_geometry_and_cells():
    heads, tokens, h, w = 2, 3, 8, 4
    probs = RNG.random((heads, tokens, h, w)).astype(np.float32)
    spec = Colorize(method="white_black", transform="auto01")
    labels = ["a", "cute", "girl"]
    image = attention_grid(probs, labels, spec, Capture("M00", 2, "cond"))
    layout = attention_layout(probs, labels, spec, Capture("M00", 2, "cond"))
    assert layout.scale == 8 == MIN_CELL_PX // h
    assert (layout.cell_w, layout.cell_h) == (32, 64)
    assert image.size == (layout.width, layout.height)
    title = "M00 · step 2 · cond · attention of 2 heads (rows) to 3 tokens (columns)"
    assert " ".join(layout.frame.title) == title  # wrapped to the frame's width (MIN_FRAME_WIDTH)
    assert all(drawn_width(line, title_font()) <= layout.width for line in layout.frame.title)
    for head in range(heads):
        for token in range(tokens):
            y = layout.top + head * (layout.cell_h + 1)
            x = layout.left + token * (layout.cell_w + 1)
            cell = crop(image, (x, y, x + layout.cell_w, y + layout.cell_h))
            expected = colorize(probs[head, token], spec).repeat(8, axis=0).repeat(8, axis=1)
            np.testing.assert_array_equal(cell, expected)


def test_attention_labels_wrap_to_the_cell_and_are_drawn():
    probs = RNG.random((2, 3, 8, 8)).astype(np.float32)
    labels = ["pink", "hair", "<|endoftext|>"]
    layout = attention_layout(probs, labels, Colorize())
    image = attention_grid(probs, labels, Colorize())
    room = layout.cell_w - 2 * LABEL_PAD
    assert layout.labels[:2] == (("pink",), ("hair",))
    assert len(layout.labels[2]) > 1 and "".join(layout.labels[2]) == "<|endoftext|>"  # wrapped, not cut
    assert all(drawn_width(line) <= room for lines in layout.labels for line in lines)
    strip_top = layout.frame.content_top
    assert layout.top - strip_top >= text_block_height(max(map(len, layout.labels)), label_font())
    for t in range(3):
        x = layout.left + t * (layout.cell_w + 1)
        assert has_text(crop(image, (x, strip_top, x + layout.cell_w, layout.top)), GAP_COLOR)
    head_column = crop(
        image, (layout.frame.content_left, layout.top, layout.left, layout.top + layout.cell_h)
    )
    assert has_text(head_column, GAP_COLOR)  # head index drawn


def test_attention_grid_odd_labels_and_shapes():
    probs = RNG.random((1, 2, 3, 20)).astype(np.float32)  # wide, very small maps
    labels = ["日本語", "x" * 200]
    layout = attention_layout(probs, labels, Colorize(method="red_blue", transform="auto11"))
    image = attention_grid(probs, labels, Colorize(method="red_blue", transform="auto11"))
    assert layout.scale == 22 and (layout.cell_w, layout.cell_h) == (440, 66)
    assert image.size == (layout.width, layout.height)
    assert layout.labels[0] == ("???",)
    assert len(layout.labels[1]) > 1 and "".join(layout.labels[1]) == "x" * 200
    with pytest.raises(ValueError):
        attention_grid(probs, ["only one"], Colorize())
    with pytest.raises(ValueError):
        attention_grid(np.zeros((2, 8, 8)), [], Colorize())


def test_attention_grid_large_maps_are_not_scaled():
    assert attention_scale(64) == 1 and attention_scale(8) == 8 and attention_scale(3) == 22


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
