"""The overlay renderer: hottest colour at the map's peak, the part visible where cold, bad input refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from collector.dashboard.overlay import (
    ALPHA_MAX,
    COLORMAP_RGB,
    MIN_SIDE_PX,
    colorize,
    render_overlay_png,
    thumbnail_jpeg,
)
from protocol.frames import dequantise_map, quantise_map


def _png_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def _thumb(rgb: tuple[int, int, int], size_wh: tuple[int, int], fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size_wh, rgb).save(out, format=fmt)
    return out.getvalue()


def _peak_map(hw: tuple[int, int], peak_yx: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float32)
    return np.exp(-((yy - peak_yx[0]) ** 2 + (xx - peak_yx[1]) ** 2) / (2 * 12.0**2)).astype(np.float32)


def test_colormap_runs_dark_to_bright() -> None:
    luminance = COLORMAP_RGB.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert COLORMAP_RGB.shape == (256, 3)
    assert np.all(np.diff(luminance) >= -1e-9), "the colormap must brighten monotonically towards hot"
    np.testing.assert_array_equal(colorize(np.array([[0, 255]], dtype=np.uint8))[0], COLORMAP_RGB[[0, 255]])


def test_hottest_colour_sits_at_the_maps_maximum() -> None:
    # The map travels quantised (as the station sends it) and is dequantised, as the collector stores it.
    meta, payload = quantise_map(_peak_map((224, 224), (150, 60)), frame=1)
    map_hw = dequantise_map(meta, payload)
    black = _thumb((0, 0, 0), (224, 224))

    pixels = _png_rgb(render_overlay_png(map_hw, black))

    assert pixels.shape == (224, 224, 3)
    # Over black, each pixel is alpha * colour: the brightest is the peak, coloured like the table's last row.
    brightest = np.unravel_index(np.argmax(pixels.astype(np.int32).sum(axis=2)), pixels.shape[:2])
    assert abs(int(brightest[0]) - 150) <= 2 and abs(int(brightest[1]) - 60) <= 2
    expected = np.rint(COLORMAP_RGB[255] * ALPHA_MAX)
    np.testing.assert_allclose(pixels[150, 60], expected, atol=3)


def test_cold_pixels_leave_the_part_visible() -> None:
    grey = (120, 130, 140)
    map_hw = _peak_map((224, 224), (20, 20))
    pixels = _png_rgb(render_overlay_png(map_hw, _thumb(grey, (224, 224), "JPEG")))
    far_corner = pixels[210, 210].astype(int)
    assert np.all(np.abs(far_corner - np.array(grey)) <= 6), far_corner
    assert np.abs(pixels[20, 20].astype(int) - np.array(grey)).max() > 60, "the hot spot must stand out"


def test_small_thumbnail_is_upscaled_and_map_resized_to_it() -> None:
    map_hw = _peak_map((224, 224), (112, 112))
    pixels = _png_rgb(render_overlay_png(map_hw, _thumb((0, 0, 0), (96, 64))))
    assert min(pixels.shape[:2]) == MIN_SIDE_PX
    assert pixels.shape[:2] == (MIN_SIDE_PX, round(96 * MIN_SIDE_PX / 64))


def test_uint8_codes_and_missing_thumbnail() -> None:
    codes = np.zeros((200, 200), dtype=np.uint8)
    codes[100, 100] = 255
    pixels = _png_rgb(render_overlay_png(codes, None))
    assert pixels.shape == (200, 200, 3)
    assert pixels[100, 100].astype(int).sum() > pixels[0, 0].astype(int).sum() + 200


def test_flat_map_draws_no_heat() -> None:
    grey = (90, 90, 90)
    pixels = _png_rgb(render_overlay_png(np.full((224, 224), 0.3, np.float32), _thumb(grey, (224, 224))))
    assert np.abs(pixels.astype(int) - 90).max() <= 1


@pytest.mark.parametrize(
    ("map_hw", "thumb"),
    [
        (np.zeros((224, 224, 3), np.float32), None),
        (np.array([[np.nan, 1.0]], np.float32), None),
        (np.zeros((0, 4), np.uint8), None),
        (np.zeros((8, 8), np.float32), b"not an image at all"),
        (np.zeros((8, 8), np.float32), _thumb((1, 2, 3), (8, 8))[:40]),
    ],
)
def test_unreadable_input_raises_value_error(map_hw: np.ndarray, thumb: bytes | None) -> None:
    with pytest.raises(ValueError):
        render_overlay_png(map_hw, thumb)


def test_thumbnail_jpeg_passes_jpeg_through_and_converts_png() -> None:
    jpeg = _thumb((10, 200, 30), (32, 32), "JPEG")
    assert thumbnail_jpeg(jpeg) is jpeg
    converted = thumbnail_jpeg(_thumb((10, 200, 30), (32, 32), "PNG"))
    with Image.open(io.BytesIO(converted)) as img:
        assert img.format == "JPEG" and img.size == (32, 32)
    with pytest.raises(ValueError):
        thumbnail_jpeg(b"\x89PNG broken")
