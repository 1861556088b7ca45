"""Point-cloud grouping for the point network: farthest point sampling + exact kNN (numpy, station path).

Replaces M3DM's CUDA kernels (pointnet2 FPS, KNN_CUDA) with deterministic CPU code that trainer and
stations share: FPS starts at index 0 with squared Euclidean distance; kNN includes the centre itself.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from core.errors import ShapeError

__all__ = ["farthest_point_sample", "knn_indices", "group_points"]


def _check_points(points_n3: np.ndarray, name: str = "points") -> np.ndarray:
    points_n3 = np.asarray(points_n3)
    if points_n3.ndim != 2 or points_n3.shape[1] != 3 or points_n3.shape[0] == 0:
        raise ShapeError(f"{name} must be a non-empty (N, 3) array, got shape {points_n3.shape}")
    if not np.isfinite(points_n3).all():
        raise ShapeError(f"{name} contain NaN or inf")
    return points_n3


def farthest_point_sample(points_n3: np.ndarray, n_samples: int, start_index: int = 0) -> np.ndarray:
    """Greedy farthest point sampling, as pointnet2's `furthest_point_sample` kernel.

    Squared Euclidean distances in float32; ties go to the lowest index. Unlike the kernel, points within
    sqrt(1e-3) m of the origin are not skipped (irrelevant for real scans; it would break clouds near 0).
    If N < n_samples, the N-point FPS order is repeated cyclically to fill n_samples.

    Args:
        points_n3: (N, 3) coordinates, metres.
        n_samples: number of indices to return (> 0).
        start_index: first selected index (the kernel uses 0).

    Returns:
        (n_samples,) int64 indices into points_n3.
    """
    points_n3 = _check_points(points_n3)
    n_points = points_n3.shape[0]
    if n_samples <= 0 or not 0 <= start_index < n_points:
        raise ShapeError(f"need n_samples > 0 and 0 <= start_index < {n_points}")
    # Separate contiguous coordinate rows keep each iteration at a few in-place passes over N floats.
    x, y, z = np.ascontiguousarray(points_n3.T, dtype=np.float32)
    n_unique = min(n_samples, n_points)
    selected = np.empty(n_unique, dtype=np.int64)
    min_dist_sq = np.full(n_points, np.inf, dtype=np.float32)
    dist_sq = np.empty(n_points, dtype=np.float32)
    scratch = np.empty(n_points, dtype=np.float32)
    current = start_index
    for i in range(n_unique):
        selected[i] = current
        np.subtract(x, x[current], out=dist_sq)
        np.multiply(dist_sq, dist_sq, out=dist_sq)
        for coord in (y, z):
            np.subtract(coord, coord[current], out=scratch)
            np.multiply(scratch, scratch, out=scratch)
            np.add(dist_sq, scratch, out=dist_sq)
        np.minimum(min_dist_sq, dist_sq, out=min_dist_sq)
        current = int(np.argmax(min_dist_sq))
    return np.resize(selected, n_samples)


def knn_indices(points_n3: np.ndarray, centers_g3: np.ndarray, k: int) -> np.ndarray:
    """Exact k nearest points of each centre (centre itself included), nearest first.

    Uses a float64 KD-tree (exact, eps=0). If N < k, the nearest indices repeat cyclically to fill k.

    Args:
        points_n3: (N, 3) cloud, metres.
        centers_g3: (G, 3) query centres, metres.
        k: neighbours per centre (> 0).

    Returns:
        (G, k) int64 indices into points_n3.
    """
    points_n3 = _check_points(points_n3)
    centers_g3 = _check_points(centers_g3, "centers")
    if k <= 0:
        raise ShapeError(f"k must be positive, got {k}")
    n_query = min(k, points_n3.shape[0])
    tree = cKDTree(points_n3.astype(np.float64))
    _, index_gk = tree.query(centers_g3.astype(np.float64), k=n_query)
    index_gk = np.asarray(index_gk, dtype=np.int64).reshape(centers_g3.shape[0], n_query)
    if n_query < k:
        index_gk = index_gk[:, np.arange(k) % n_query]
    return index_gk


def group_points(
    points_n3: np.ndarray, num_groups: int = 1024, group_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """FPS centres + kNN neighbourhoods in local coordinates, the point network's inputs.

    Args:
        points_n3: (N, 3) valid points, raw metres (not normalised).
        num_groups: G, number of FPS centres.
        group_size: K, neighbours per centre.

    Returns:
        neighborhood_gk3: (G, K, 3) float32, neighbour minus its centre.
        centers_g3: (G, 3) float32 centre coordinates.
    """
    points_n3 = _check_points(points_n3).astype(np.float32, copy=False)
    centers_g3 = points_n3[farthest_point_sample(points_n3, num_groups)]
    index_gk = knn_indices(points_n3, centers_g3, group_size)
    neighborhood_gk3 = points_n3[index_gk] - centers_g3[:, None, :]
    return neighborhood_gk3.astype(np.float32, copy=False), np.ascontiguousarray(centers_g3)
