"""Procedural scalar fields for the scan generator: smooth value noise and bilinear grid sampling.

Used by shapes (surface relief, textures), defects (irregular outlines) and the renderer (looking up an
object's heightfield and albedo at the points where pixel rays hit it).
"""

from __future__ import annotations

import numpy as np


def _resample_axis(coarse: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Resample `coarse` along `axis` to n_out samples with smoothstep-blended linear interpolation."""
    n_in = coarse.shape[axis]
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 2)
    frac = pos - lo
    frac = frac * frac * (3.0 - 2.0 * frac)  # smoothstep hides the grid of control points
    shape = [1, 1]
    shape[axis] = n_out
    frac = frac.reshape(shape)
    return np.take(coarse, lo, axis=axis) * (1.0 - frac) + np.take(coarse, lo + 1, axis=axis) * frac


def value_noise(
    rng: np.random.Generator, shape_hw: tuple[int, int], cells: int, octaves: int = 3, gain: float = 0.5
) -> np.ndarray:
    """Fractal value noise, (H, W) float64 with roughly zero mean and unit peak amplitude.

    `cells` control points span the shorter side at the coarsest octave; each octave doubles them.
    Gathers rather than BLAS products: as fast, and bit-identical whatever the thread count.
    """
    height, width = shape_hw
    total = np.zeros(shape_hw)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        n = cells * 2**octave
        n_h = max(2, round(n * height / min(shape_hw)) + 1)
        n_w = max(2, round(n * width / min(shape_hw)) + 1)
        coarse = rng.uniform(-1.0, 1.0, size=(n_h, n_w))
        total += amplitude * _resample_axis(_resample_axis(coarse, height, 0), width, 1)
        norm += amplitude
        amplitude *= gain
    return total / norm


def periodic_noise_1d(rng: np.random.Generator, angle_rad: np.ndarray, cells: int) -> np.ndarray:
    """Smooth periodic noise of an angle, same shape as `angle_rad`, values in [-1, 1]."""
    knots = rng.uniform(-1.0, 1.0, size=cells)
    pos = (np.mod(angle_rad, 2 * np.pi) / (2 * np.pi)) * cells
    lo = np.floor(pos).astype(np.int64) % cells
    frac = pos - np.floor(pos)
    frac = frac * frac * (3.0 - 2.0 * frac)
    return knots[lo] * (1.0 - frac) + knots[(lo + 1) % cells] * frac


def sample_bilinear(grid: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Bilinear lookup of `grid` (G, G[, C]) at float indices; indices are clamped to the grid.

    Returns an array shaped like `row` (plus the channel axis when the grid has one).
    """
    size_r, size_c = grid.shape[:2]
    row = np.clip(row, 0.0, size_r - 1.000001)
    col = np.clip(col, 0.0, size_c - 1.000001)
    r0 = row.astype(np.int64)
    c0 = col.astype(np.int64)
    fr = row - r0
    fc = col - c0
    flat = grid.reshape(size_r * size_c, *grid.shape[2:])
    idx = r0 * size_c + c0
    if grid.ndim == 3:
        fr, fc = fr[..., None], fc[..., None]
    top = flat[idx] * (1 - fc) + flat[idx + 1] * fc
    bottom = flat[idx + size_c] * (1 - fc) + flat[idx + size_c + 1] * fc
    return top * (1 - fr) + bottom * fr


def sample_nearest(grid: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Nearest-cell lookup of a 2-D grid at float indices (clamped); shaped like `row`."""
    r = np.clip(np.rint(row).astype(np.int64), 0, grid.shape[0] - 1)
    c = np.clip(np.rint(col).astype(np.int64), 0, grid.shape[1] - 1)
    return grid[r, c]
