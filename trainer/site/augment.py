"""Synthetic anomalies for the `m3dm-site` objective: cut-paste patches and noise blobs on normal images.

All arrays are ImageNet-normalised (3, H, W) float32 as the encoder sees them (a training crop of the
224 px input); masks are (H, W) float32 in {0, 1}. Defect sizes are in input pixels (SCALE_PX = 224 frame),
not fractions of the crop, so a crop sees defects of the size they have on a full image. Anomalies are
centred on foreground pixels (the object): the background is blank after plane removal and a defect there
teaches nothing about the part. Deterministic for a given numpy Generator.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["SCALE_PX", "cut_paste", "noise_blob", "synthetic_anomaly"]

SCALE_PX = 224  # the frame defect sizes refer to: the encoder input


def _centre(valid_hw: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    ys, xs = np.nonzero(valid_hw)
    if ys.size == 0:  # empty mask (a crop of background only): anywhere
        return int(rng.integers(valid_hw.shape[0])), int(rng.integers(valid_hw.shape[1]))
    i = int(rng.integers(ys.size))
    return int(ys[i]), int(xs[i])


def _box(centre: tuple[int, int], h: int, w: int, shape: tuple[int, ...]) -> tuple[slice, slice]:
    h, w = min(h, shape[0]), min(w, shape[1])
    y0 = int(np.clip(centre[0] - h // 2, 0, shape[0] - h))
    x0 = int(np.clip(centre[1] - w // 2, 0, shape[1] - w))
    return slice(y0, y0 + h), slice(x0, x0 + w)


def cut_paste(
    image_chw: np.ndarray, valid_hw: np.ndarray, source_chw: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paste a rectangle (or a thin scar) of `source_chw`, flipped and colour-shifted, onto the object.

    Returns (image, mask): a new array and where it changed.
    """
    shape = valid_hw.shape
    if rng.random() < 0.3:  # scar: long and thin, like a scratch
        h, w = int(rng.integers(3, 8)), int(rng.integers(SCALE_PX // 8, SCALE_PX // 3))
    else:
        h, w = (int(v) for v in rng.integers(SCALE_PX // 16, SCALE_PX // 4, size=2))
    if rng.random() < 0.5:
        h, w = w, h
    src = _box(_centre(np.ones_like(valid_hw), rng), h, w, source_chw.shape[1:])
    dst = _box(_centre(valid_hw, rng), h, w, shape)
    h, w = (
        min(dst[0].stop - dst[0].start, src[0].stop - src[0].start),
        min(dst[1].stop - dst[1].start, src[1].stop - src[1].start),
    )
    src = slice(src[0].start, src[0].start + h), slice(src[1].start, src[1].start + w)
    dst = slice(dst[0].start, dst[0].start + h), slice(dst[1].start, dst[1].start + w)
    patch = source_chw[:, src[0], src[1]].copy()
    if rng.random() < 0.5:
        patch = patch[:, :, ::-1]
    if rng.random() < 0.5:
        patch = patch[:, ::-1, :]
    patch = patch * rng.uniform(0.7, 1.3) + rng.normal(0.0, 0.3, size=(3, 1, 1))
    out = image_chw.copy()
    out[:, dst[0], dst[1]] = patch
    mask = np.zeros(valid_hw.shape, np.float32)
    mask[dst] = 1.0
    return out, mask


def noise_blob(
    image_chw: np.ndarray, valid_hw: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Blend an irregular blob (thresholded smooth noise) with a random colour and texture into the object."""
    h, w = valid_hw.shape
    radius = int(rng.integers(SCALE_PX // 32, SCALE_PX // 8))
    cy, cx = _centre(valid_hw, rng)
    yy, xx = np.mgrid[:h, :w]
    ellipse = ((yy - cy) / (radius * rng.uniform(0.5, 1.5))) ** 2 + ((xx - cx) / radius) ** 2
    rough = gaussian_filter(rng.standard_normal((h, w)), sigma=max(1.0, radius / 3))
    rough /= rough.std() + 1e-8
    mask = (ellipse + 0.35 * rough < 1.0).astype(np.float32)
    colour = rng.normal(0.0, 1.0, size=(3, 1, 1))
    texture = gaussian_filter(rng.standard_normal((3, h, w)), sigma=(0, 1.0, 1.0)) * rng.uniform(0.1, 1.0)
    alpha = rng.uniform(0.4, 1.0)
    fill = colour + texture
    out = image_chw * (1 - alpha * mask) + alpha * mask * fill
    return out.astype(np.float32), mask


def synthetic_anomaly(
    image_chw: np.ndarray, valid_hw: np.ndarray, source_chw: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One cut-paste or noise blob, chosen at random (even odds)."""
    if rng.random() < 0.5:
        return cut_paste(image_chw, valid_hw, source_chw, rng)
    return noise_blob(image_chw, valid_hw, rng)
