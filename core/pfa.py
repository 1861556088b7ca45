"""Point feature alignment (spec §4): group features -> every valid point -> pooled image grid (numpy).

Interpolation is 3-NN inverse squared distance. Projection writes point features into a zero image grid,
then AvgPool 3×3 (stride 1, no padding) and PyTorch-style adaptive average pooling to `grid`×`grid`.
Both poolings are linear and separable, so the whole projection is one sparse (grid², N) matrix built from
per-axis window weights; background cells come out exactly 0 and no (C, H, W) image is ever materialised.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from core.errors import ShapeError

__all__ = ["interpolate_to_points", "project_to_grid", "align_point_features", "pooling_matrix"]

INTERP_EPS = 1e-8  # added to squared distances before inversion, as M3DM's interpolating_points
POOL_KERNEL = 3


@lru_cache(maxsize=8)
def pooling_matrix(image_size: int, grid: int) -> np.ndarray:
    """Per-axis weights of AvgPool(3, stride 1) followed by AdaptiveAvgPool to `grid`.

    Adaptive window i covers pooled rows [floor(i·L/grid), ceil((i+1)·L/grid)), L = image_size − 2.

    Returns:
        (grid, image_size) float64, read-only; output = M @ image @ M.T for each channel.
    """
    pooled = image_size - POOL_KERNEL + 1
    if pooled < grid or grid <= 0:
        raise ShapeError(f"cannot pool a {image_size}-pixel grid to {grid} cells")
    avg = np.zeros((pooled, image_size))
    rows = np.arange(pooled)
    for offset in range(POOL_KERNEL):
        avg[rows, rows + offset] = 1.0 / POOL_KERNEL
    starts = (np.arange(grid) * pooled) // grid
    ends = -((-(np.arange(grid) + 1) * pooled) // grid)  # ceil division
    adaptive = np.zeros((grid, pooled))
    for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
        adaptive[i, start:end] = 1.0 / (end - start)
    matrix = adaptive @ avg
    matrix.flags.writeable = False
    return matrix


def _projection_matrix(pixel_index_n: np.ndarray, image_size: int, grid: int) -> sparse.csr_matrix:
    """Sparse (grid², N) float32 map from point features to pooled grid cells."""
    pixel_index_n = np.asarray(pixel_index_n)
    n_pixels = image_size * image_size
    if pixel_index_n.ndim != 1 or not np.issubdtype(pixel_index_n.dtype, np.integer):
        raise ShapeError(
            f"pixel_index_n must be a 1-D integer array, got {pixel_index_n.dtype} {pixel_index_n.shape}"
        )
    if pixel_index_n.size and (pixel_index_n.min() < 0 or pixel_index_n.max() >= n_pixels):
        raise ShapeError(f"pixel indices must lie in [0, {n_pixels})")
    if np.bincount(pixel_index_n, minlength=1).max(initial=0) > 1:
        raise ShapeError("pixel indices must be unique (one point per pixel)")
    return sparse.csr_matrix(
        _pixel_to_cell(image_size, grid)[:, pixel_index_n.astype(np.int64)], dtype=np.float32
    )


@lru_cache(maxsize=8)
def _pixel_to_cell(image_size: int, grid: int) -> sparse.csc_matrix:
    """Sparse (grid², image_size²): weight(cell i·grid + j, pixel r·size + c) = M[i, r] · M[j, c]."""
    axis = sparse.csc_matrix(pooling_matrix(image_size, grid))
    return sparse.kron(axis, axis, format="csc")


def _check_features(feats: np.ndarray, n_rows: int, name: str) -> np.ndarray:
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] != n_rows:
        raise ShapeError(f"{name} must be ({n_rows}, C), got {feats.shape}")
    return feats


def _interpolation_matrix(points_n3: np.ndarray, centers_g3: np.ndarray, k: int) -> sparse.csr_matrix:
    """Sparse (N, G) float32: row n holds the normalised 1/(d²+eps) weights of its k nearest centres."""
    points_n3 = np.asarray(points_n3, dtype=np.float64)
    centers_g3 = np.asarray(centers_g3, dtype=np.float64)
    if points_n3.ndim != 2 or points_n3.shape[1] != 3 or centers_g3.ndim != 2 or centers_g3.shape[1] != 3:
        raise ShapeError(f"points/centers must be (N, 3)/(G, 3), got {points_n3.shape}/{centers_g3.shape}")
    if not 0 < k <= centers_g3.shape[0]:
        raise ShapeError(f"k={k} needs 1..{centers_g3.shape[0]} centres")
    n_points = points_n3.shape[0]
    dist_nk, index_nk = cKDTree(centers_g3).query(points_n3, k=k)
    dist_nk = np.asarray(dist_nk).reshape(n_points, k)
    weight_nk = 1.0 / (dist_nk * dist_nk + INTERP_EPS)  # M3DM's distances are already squared: 1/d²
    weight_nk /= weight_nk.sum(axis=1, keepdims=True)
    rows = np.repeat(np.arange(n_points), k)
    columns = np.asarray(index_nk, dtype=np.int64).ravel()
    shape = (n_points, centers_g3.shape[0])
    return sparse.csr_matrix((weight_nk.ravel().astype(np.float32), (rows, columns)), shape=shape)


def interpolate_to_points(
    points_n3: np.ndarray, centers_g3: np.ndarray, group_feats_gc: np.ndarray, k: int = 3
) -> np.ndarray:
    """Group features -> every point, k-NN inverse squared distance weighted.

    Args:
        points_n3: (N, 3) valid points, metres.
        centers_g3: (G, 3) group centres, metres.
        group_feats_gc: (G, C) group features.
        k: nearest centres per point.

    Returns:
        (N, C) float32 point features.
    """
    group_feats_gc = _check_features(group_feats_gc, len(centers_g3), "group_feats_gc")
    interp = _interpolation_matrix(points_n3, centers_g3, k)
    return np.asarray(interp @ group_feats_gc.astype(np.float32, copy=False), dtype=np.float32)


def project_to_grid(
    point_feats_nc: np.ndarray, pixel_index_n: np.ndarray, image_size: int = 224, grid: int = 56
) -> np.ndarray:
    """Scatter point features on a zero image, AvgPool 3×3 (no padding), AdaptiveAvgPool to grid×grid.

    Args:
        point_feats_nc: (N, C) features of the valid pixels.
        pixel_index_n: (N,) unique flat pixel indices row·image_size + col.
        image_size: side of the square pixel grid the indices refer to.
        grid: output side.

    Returns:
        (grid, grid, C) float32; cells with no valid pixel in their window are exactly 0.
    """
    point_feats_nc = _check_features(point_feats_nc, len(np.asarray(pixel_index_n)), "point_feats_nc")
    projection = _projection_matrix(pixel_index_n, image_size, grid)
    pooled = projection @ point_feats_nc.astype(np.float32, copy=False)
    return np.asarray(pooled, dtype=np.float32).reshape(grid, grid, -1)


def align_point_features(
    points_n3: np.ndarray,
    pixel_index_n: np.ndarray,
    centers_g3: np.ndarray,
    group_feats_gc: np.ndarray,
    image_size: int = 224,
    grid: int = 56,
) -> np.ndarray:
    """Interpolate group features to points and project them on the pooled grid (M3DM's point features).

    Equal to project_to_grid(interpolate_to_points(...)) but never forms the (N, C) point features: the
    interpolation is a sparse (N, G) matrix folded into the projection first.

    Returns:
        (grid, grid, C) float32.
    """
    group_feats_gc = _check_features(group_feats_gc, len(centers_g3), "group_feats_gc")
    projection = _projection_matrix(pixel_index_n, image_size, grid)
    if projection.shape[1] != len(points_n3):
        raise ShapeError(f"{len(points_n3)} points but {projection.shape[1]} pixel indices")
    # (grid², N) @ (N, G) is sparse and small; multiplying it first avoids the (N, C) point features.
    cell_to_group = projection @ _interpolation_matrix(points_n3, centers_g3, 3)
    pooled = cell_to_group @ group_feats_gc.astype(np.float32, copy=False)
    return np.asarray(pooled, dtype=np.float32).reshape(grid, grid, -1)
