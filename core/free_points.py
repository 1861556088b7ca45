"""Weight-free point descriptor of the `m3dm-free` preset: local surface geometry on the organised xyz grid.

Runs on a station in place of the Point-MAE runner. For every valid pixel a plane is fitted by masked PCA
over square windows at several scales (window sums from integral images, so dropouts carry no weight); the
descriptor is the signed height of the point over that plane, the RMS residual of the window and the spread
of the normals inside it, in units of the scan's own point spacing. The per-point features are projected
onto the 56x56 grid by `core.pfa.project_to_grid`, like Point-MAE features (background stays exactly 0).
"""

from __future__ import annotations

import numpy as np

from core.errors import ShapeError
from core.scan import PreparedScan

IMAGE_SIZE = 224
GRID = 56
# Square windows of 5, 9, 17 px on the 224 grid. A 33 px window was measured too: its large, pose-dependent
# spread dominated the distances and cost 5 points of image AUROC (bench/free_features_eval.py).
WINDOW_RADII_PX = (2, 4, 8)
MIN_NEIGHBOURS = 4  # fewer valid pixels than this in a window: no plane, features 0
HEIGHT_SCALE = 2.0  # heights are divided by HEIGHT_SCALE x point spacing
SPREAD_SCALE = 0.05  # 1 - |mean normal| of a smooth surface is ~0; a crease or dent gives ~0.05..0.3


def point_spacing_m(xyz_hwc_m: np.ndarray, valid_hw: np.ndarray) -> float:
    """Median distance between 4-connected valid grid neighbours, metres (0.0 if none)."""
    steps = []
    for axis in (0, 1):
        a = np.take(xyz_hwc_m, np.arange(xyz_hwc_m.shape[axis] - 1), axis=axis)
        b = np.take(xyz_hwc_m, np.arange(1, xyz_hwc_m.shape[axis]), axis=axis)
        both = np.take(valid_hw, np.arange(valid_hw.shape[axis] - 1), axis=axis) & np.take(
            valid_hw, np.arange(1, valid_hw.shape[axis]), axis=axis
        )
        steps.append(np.linalg.norm((a - b)[both], axis=-1))
    all_steps = np.concatenate(steps)
    return float(np.median(all_steps)) if all_steps.size else 0.0


def integral_image(stack_hwc: np.ndarray) -> np.ndarray:
    """Summed-area table with a leading zero row and column, (H, W, C) -> (H+1, W+1, C) float64."""
    table = np.zeros((stack_hwc.shape[0] + 1, stack_hwc.shape[1] + 1, stack_hwc.shape[2]))
    np.cumsum(np.cumsum(stack_hwc, axis=0, dtype=np.float64), axis=1, out=table[1:, 1:])
    return table


def window_sums(table: np.ndarray, rows_n: np.ndarray, cols_n: np.ndarray, radius_px: int) -> np.ndarray:
    """Sums over the (2r+1)² window, clipped to the image, around each (row, col), (N, C) float64."""
    h, w = table.shape[0] - 1, table.shape[1] - 1
    r0, r1 = np.maximum(rows_n - radius_px, 0), np.minimum(rows_n + radius_px + 1, h)
    c0, c1 = np.maximum(cols_n - radius_px, 0), np.minimum(cols_n + radius_px + 1, w)
    return table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]


def _minus_diagonal(m_n33: np.ndarray, value_n: np.ndarray) -> np.ndarray:
    """m - value * I per matrix; off-diagonal entries copied (bit-equal to subtracting value * eye(3))."""
    out = m_n33.copy()
    out[:, [0, 1, 2], [0, 1, 2]] -= value_n[:, None]
    return out


def _cross(a_n3: np.ndarray, b_n3: np.ndarray) -> np.ndarray:
    """Row-wise cross product, the same products and differences as np.cross without its per-call setup."""
    a0, a1, a2 = a_n3[:, 0], a_n3[:, 1], a_n3[:, 2]
    b0, b1, b2 = b_n3[:, 0], b_n3[:, 1], b_n3[:, 2]
    return np.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], axis=-1)


def _det3(m_n33: np.ndarray) -> np.ndarray:
    """Determinants of (N, 3, 3) matrices by cofactor expansion: batched LAPACK LU costs ~50x more on 3x3s
    (measured 13.5 vs 0.15 ms for 12k matrices), and the results agree to ~1e-15 relative."""
    m = m_n33
    return (
        m[:, 0, 0] * (m[:, 1, 1] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 1])
        - m[:, 0, 1] * (m[:, 1, 0] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 0])
        + m[:, 0, 2] * (m[:, 1, 0] * m[:, 2, 1] - m[:, 1, 1] * m[:, 2, 0])
    )


def smallest_eigenpairs(cov_n33: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form smallest eigenvalue and unit eigenvector of symmetric 3x3 matrices (N, 3, 3) float64.

    The trigonometric solution is ~20x faster than batched LAPACK on 3x3s; where the eigenvector is undefined
    (isotropic or line-like windows), it falls back to the z axis.
    """
    q = np.trace(cov_n33, axis1=1, axis2=2) / 3.0
    off = cov_n33[:, 0, 1] ** 2 + cov_n33[:, 0, 2] ** 2 + cov_n33[:, 1, 2] ** 2
    diag = cov_n33[:, [0, 1, 2], [0, 1, 2]] - q[:, None]
    p = np.sqrt(((diag**2).sum(axis=1) + 2.0 * off) / 6.0)
    r = _det3(_minus_diagonal(cov_n33, q) / np.maximum(p, 1e-30)[:, None, None]) / 2.0
    phi = np.arccos(np.clip(r, -1.0, 1.0)) / 3.0
    smallest = np.where(p > 0, q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0), q)
    rows = _minus_diagonal(cov_n33, smallest)
    crosses = np.stack(
        [_cross(rows[:, 0], rows[:, 1]), _cross(rows[:, 0], rows[:, 2]), _cross(rows[:, 1], rows[:, 2])],
        axis=1,
    )
    norms = np.linalg.norm(crosses, axis=-1)
    best = norms.argmax(axis=1)
    vec = crosses[np.arange(len(best)), best]
    length = norms[np.arange(len(best)), best]
    vec = np.where(
        length[:, None] > 1e-12, vec / np.maximum(length, 1e-300)[:, None], np.array([0.0, 0.0, 1.0])
    )
    return smallest, vec


def fit_local_planes(table: np.ndarray, rows_n: np.ndarray, cols_n: np.ndarray, radius_px: int) -> tuple:
    """Masked PCA plane of every valid pixel's window, from the integral image of [w, p, p p^T] (13 channels).

    Returns:
        (normal (N, 3) unit, unoriented; window mean (N, 3); residual variance (N,); valid count (N,)),
        in the (spacing-scaled) units of the points that built `table`.
    """
    sums = window_sums(table, rows_n, cols_n, radius_px)
    count = sums[:, 0]
    mean = sums[:, 1:4] / np.maximum(count, 1.0)[:, None]
    cov = (
        sums[:, 4:].reshape(-1, 3, 3) / np.maximum(count, 1.0)[:, None, None]
        - mean[:, :, None] * mean[:, None, :]
    )
    variance, normal = smallest_eigenpairs(cov)
    return normal, mean, np.maximum(variance, 0.0), count


def point_descriptor_per_point(scan: PreparedScan) -> tuple[np.ndarray, np.ndarray]:
    """Geometric descriptor of every valid point, before projection.

    Returns:
        (features (N, 3 * len(WINDOW_RADII_PX)) float32, per scale [height, rms residual, normal spread];
        pixel index (N,) int64 flat row-major into the 224x224 grid).
    """
    xyz, valid = scan.xyz_hwc_m, scan.valid_hw
    if xyz.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or valid.shape != xyz.shape[:2]:
        raise ShapeError(f"xyz must be ({IMAGE_SIZE},{IMAGE_SIZE},3) with a matching mask", scan.source)
    index = np.flatnonzero(valid)
    n_cols = 3 * len(WINDOW_RADII_PX)
    if index.size == 0:
        return np.zeros((0, n_cols), np.float32), index.astype(np.int64)
    rows, cols = np.divmod(index, IMAGE_SIZE)
    points = xyz.reshape(-1, 3)[index].astype(np.float64)
    # Work in units of HEIGHT_SCALE x spacing, centred: covariances stay O(1) and the features unit-sized.
    unit_m = HEIGHT_SCALE * max(point_spacing_m(xyz, valid), 1e-6)
    centred = (points - points.mean(axis=0)) / unit_m
    # Integral images over the valid points' bounding box only (the object covers 7-60% of the frame): every
    # entry outside it is 0, so prefix sums from the box corner equal the full-frame ones bit for bit, and a
    # window reaching past the box adds only zeros, like one clipped at the image border.
    top, left = rows.min(), cols.min()
    box_h, box_w = rows.max() - top + 1, cols.max() - left + 1
    rows, cols = rows - top, cols - left
    box_index = rows * box_w + cols
    grid = np.zeros((box_h * box_w, 13))
    grid[box_index, 0] = 1.0
    grid[box_index, 1:4] = centred
    grid[box_index, 4:] = (centred[:, :, None] * centred[:, None, :]).reshape(-1, 9)
    table = integral_image(grid.reshape(box_h, box_w, 13))
    normals = []
    columns = np.zeros((index.size, n_cols))
    for k, radius in enumerate(WINDOW_RADII_PX):
        normal, mean, variance, count = fit_local_planes(table, rows, cols, radius)
        # Orient towards the camera (the sensor origin) so a bump and a dent differ in sign.
        normal *= np.where(np.einsum("nc,nc->n", normal, points) > 0, -1.0, 1.0)[:, None]
        normals.append(normal)
        enough = count >= MIN_NEIGHBOURS
        columns[:, 3 * k] = np.where(enough, np.einsum("nc,nc->n", normal, centred - mean), 0.0)
        columns[:, 3 * k + 1] = np.where(enough, np.sqrt(variance), 0.0)
    field = np.zeros((box_h * box_w, 4))
    field[box_index, 0] = 1.0
    field[box_index, 1:] = normals[
        0
    ]  # spread of the finest normals inside each window: creases, dents, scratches
    normal_table = integral_image(field.reshape(box_h, box_w, 4))
    for k, radius in enumerate(WINDOW_RADII_PX):
        sums = window_sums(normal_table, rows, cols, radius)
        spread = 1.0 - np.linalg.norm(sums[:, 1:], axis=-1) / np.maximum(sums[:, 0], 1.0)
        columns[:, 3 * k + 2] = np.where(sums[:, 0] >= MIN_NEIGHBOURS, spread / SPREAD_SCALE, 0.0)
    return columns.astype(np.float32), index.astype(np.int64)
