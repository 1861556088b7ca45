"""Heatmap overlays for the dashboard: a colormapped anomaly map blended over the part's RGB thumbnail.

Pillow + numpy only (no matplotlib on the collector). The map arrives the way it travels and is stored:
uint8 codes 0..255 spanning the frame's own min..max (`protocol.frames.quantise_map`), so the hottest colour
marks the frame's most anomalous pixel. Cold pixels stay almost transparent, so the part remains readable
under them.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["COLORMAP_RGB", "blend_overlay", "colorize", "render_overlay_png", "thumbnail_jpeg"]

# "inferno"-like control points (position 0..1 -> RGB), interpolated to a 256-entry table below.
_STOPS = np.array(
    [
        (0.00, 0, 0, 4),
        (0.15, 40, 11, 84),
        (0.30, 101, 21, 110),
        (0.45, 159, 42, 99),
        (0.60, 212, 72, 66),
        (0.75, 245, 125, 21),
        (0.90, 250, 193, 39),
        (1.00, 252, 255, 164),
    ],
    dtype=np.float64,
)
_CODES = np.linspace(0.0, 1.0, 256)
COLORMAP_RGB: np.ndarray = np.stack(
    [np.interp(_CODES, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)], axis=1
).astype(np.uint8)  # (256, 3); row 255 is the hottest colour

# Opacity of the heat layer at the hottest pixel, and how fast it fades towards cold (alpha = max * v**gamma).
ALPHA_MAX = 0.75
ALPHA_GAMMA = 1.0
# Thumbnails smaller than this are upscaled for the overlay, so the heat pattern is legible on the page.
MIN_SIDE_PX = 192
_NO_THUMB_GREY = 48


def colorize(codes_hw: np.ndarray) -> np.ndarray:
    """uint8 map codes (H, W) -> (H, W, 3) uint8 colours through `COLORMAP_RGB`."""
    codes = np.asarray(codes_hw)
    if codes.ndim != 2 or codes.dtype != np.uint8:
        raise ValueError(f"map codes must be a 2-D uint8 array, got {codes.dtype} {codes.shape}")
    return COLORMAP_RGB[codes]


def _to_codes(map_hw: np.ndarray) -> np.ndarray:
    """A float map -> uint8 codes spanning its own min..max; uint8 input is taken as codes already."""
    values = np.asarray(map_hw)
    if values.dtype == np.uint8:
        return values
    values = values.astype(np.float32)
    if values.ndim != 2 or not np.isfinite(values).all():
        raise ValueError(f"anomaly map must be a finite 2-D array, got shape {values.shape}")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def blend_overlay(rgb_hw3: np.ndarray, codes_hw: np.ndarray) -> np.ndarray:
    """Blend colorized codes over an RGB image of the same (H, W): alpha grows with the code."""
    rgb = np.asarray(rgb_hw3)
    if rgb.shape[:2] != codes_hw.shape or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image {rgb.shape} and map {codes_hw.shape} do not match")
    heat = colorize(codes_hw).astype(np.float32)
    alpha = (ALPHA_MAX * (codes_hw.astype(np.float32) / 255.0) ** ALPHA_GAMMA)[..., None]
    out = rgb.astype(np.float32) * (1.0 - alpha) + heat * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _open_rgb(image_bytes: bytes) -> Image.Image:
    """Decode JPEG/PNG bytes to RGB; raises ValueError on anything Pillow cannot read."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"thumbnail is not a readable image: {err}") from None


def _target_size(size_wh: tuple[int, int]) -> tuple[int, int]:
    width, height = size_wh
    factor = max(1.0, MIN_SIDE_PX / max(1, min(width, height)))
    return round(width * factor), round(height * factor)


def render_overlay_png(map_hw: np.ndarray, thumbnail: bytes | None) -> bytes:
    """The overlay PNG: the map resized to the thumbnail (upscaled to >= MIN_SIDE_PX), blended over it.

    Without a thumbnail the heat is drawn over flat grey at the map's own size. Raises ValueError for a map
    or thumbnail that cannot be read, so a route can answer 404 instead of 500.
    """
    codes = _to_codes(map_hw)
    if codes.ndim != 2 or min(codes.shape) < 1:
        raise ValueError(f"anomaly map must be 2-D and non-empty, got shape {codes.shape}")
    if thumbnail is not None:
        base = _open_rgb(thumbnail)
    else:
        base = Image.new("RGB", (codes.shape[1], codes.shape[0]), (_NO_THUMB_GREY,) * 3)
    size_wh = _target_size(base.size)
    base = base.resize(size_wh, Image.Resampling.BICUBIC) if base.size != size_wh else base
    codes_img = Image.fromarray(codes).resize(size_wh, Image.Resampling.BILINEAR)
    blended = blend_overlay(np.asarray(base), np.asarray(codes_img))
    out = io.BytesIO()
    Image.fromarray(blended).save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


def thumbnail_jpeg(image_bytes: bytes, quality: int = 85) -> bytes:
    """The thumbnail as JPEG: JPEG bytes pass through untouched, anything else Pillow reads is re-encoded."""
    if image_bytes[:3] == b"\xff\xd8\xff":
        return image_bytes
    out = io.BytesIO()
    _open_rgb(image_bytes).save(out, format="JPEG", quality=quality)
    return out.getvalue()
