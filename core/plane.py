"""Background removal for organised point clouds (spec §2a, steps 1-3 and 5).

Sits between capture and resizing: fit the support plane on the image-border points, zero the plane
pixels in xyz and RGB, and optionally keep only the largest DBSCAN cluster. Open3D is imported lazily so
that reading a dataset does not pay for it.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from core.config import PreprocessConfig
from core.errors import EmptyCloudError

__all__ = [
    "border_points",
    "fit_border_plane",
    "keep_largest_cluster",
    "keep_largest_cluster_dbscan",
    "remove_plane",
    "valid_mask",
]


def _open3d() -> ModuleType:
    import open3d as o3d  # lazy: ~1 s import, only needed when a plane is fitted

    return o3d


def valid_mask(xyz_hwc_m: np.ndarray) -> np.ndarray:
    """(H, W) bool: True where all three coordinates are non-zero (the M3DM validity rule)."""
    # Per-channel compares are ~10x faster than np.all(..., axis=-1) over a length-3 axis.
    return (xyz_hwc_m[..., 0] != 0) & (xyz_hwc_m[..., 1] != 0) & (xyz_hwc_m[..., 2] != 0)


def border_points(xyz_hwc_m: np.ndarray, border_px: int) -> np.ndarray:
    """Valid points of the four border strips, (N, 3) float64.

    As in the original (BTF `get_edges_of_pc`), the strips are concatenated, so the corner blocks count twice.
    """
    b = border_px
    strips = [xyz_hwc_m[:b], xyz_hwc_m[-b:], xyz_hwc_m[:, :b], xyz_hwc_m[:, -b:]]
    points = np.concatenate([s.reshape(-1, 3) for s in strips], axis=0)
    return points[np.all(points != 0, axis=1)].astype(np.float64)


def fit_border_plane(xyz_hwc_m: np.ndarray, cfg: PreprocessConfig, source: str = "") -> np.ndarray:
    """Fit the support plane on the border strips with Open3D RANSAC.

    Args:
        xyz_hwc_m: (H, W, 3) float32 metres, zeros = missing.
        cfg: preprocessing settings (border width, RANSAC threshold, ransac_n, iterations, seed).
        source: name of the scan, for error messages.

    Returns:
        (4,) float64 plane (a, b, c, d) with unit normal, so |a x + b y + c z + d| is a distance in metres.

    Raises:
        EmptyCloudError: fewer than `cfg.ransac_n` valid border points (typically a scan that was already
            plane-removed, whose borders are all zero: the original's "at least 'ransac_n' points" crash).
    """
    points = border_points(xyz_hwc_m, cfg.border_px)
    if len(points) < cfg.ransac_n:
        raise EmptyCloudError(
            f"only {len(points)} valid points in the {cfg.border_px}-px border strips, the plane fit needs "
            f"ransac_n={cfg.ransac_n}; was this scan already plane-removed (preprocessed in place)?",
            source or None,
        )
    o3d = _open3d()
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    # Open3D's RANSAC draws from a global RNG; seeding it makes the fit reproducible (the original is not).
    o3d.utility.random.seed(cfg.seed)
    plane, _ = cloud.segment_plane(
        distance_threshold=cfg.ransac_threshold_m,
        ransac_n=cfg.ransac_n,
        num_iterations=cfg.ransac_iterations,
    )
    plane = np.asarray(plane, dtype=np.float64).reshape(4)
    norm = np.linalg.norm(plane[:3])
    if not np.isfinite(norm) or norm == 0:
        raise EmptyCloudError("RANSAC returned a degenerate plane", source or None)
    return plane / norm


def remove_plane(
    xyz_hwc_m: np.ndarray, rgb_hwc_u8: np.ndarray, plane: np.ndarray, cfg: PreprocessConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Zero xyz and RGB of every valid pixel closer than `cfg.plane_removal_m` to the plane.

    Args:
        xyz_hwc_m: (H, W, 3) float32 metres. rgb_hwc_u8: (H, W, 3) uint8. plane: (4,) unit-normal plane.

    Returns:
        New (xyz, rgb) arrays; the inputs are not modified.
    """
    # float32 is 4x faster than the original's float64; the distance error (~0.1 µm at 0.5 m) only
    # matters for points within 0.1 µm of the threshold.
    a, b, c, d = plane.astype(np.float32)
    x, y, z = xyz_hwc_m[..., 0], xyz_hwc_m[..., 1], xyz_hwc_m[..., 2]
    on_plane = (np.abs(a * x + b * y + c * z + d) < cfg.plane_removal_m) & valid_mask(xyz_hwc_m)
    return _zero_where(xyz_hwc_m, rgb_hwc_u8, on_plane)


def _zero_where(
    xyz_hwc_m: np.ndarray, rgb_hwc_u8: np.ndarray, drop_hw: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Copies of xyz and rgb with the `drop_hw` pixels set to zero."""
    # A full (H, W, 3) mask and a multiply are ~3x faster than masked writes broadcast over a length-3 axis;
    # "+ 0" turns the -0.0 of negative coordinates into +0.0.
    keep_hw3 = np.repeat(~drop_hw, 3).reshape(xyz_hwc_m.shape)
    return xyz_hwc_m * keep_hw3 + np.float32(0), rgb_hwc_u8 * keep_hw3


# A dropout hole of up to this many pixels between two object pixels still connects them (DBSCAN's eps
# ball spans several pixels at MVTec resolutions, so it bridges such holes too).
CLUSTER_MAX_GAP_PX = 2


def _grid_edges(xyz_hwc_m: np.ndarray, index_hw: np.ndarray, eps_m: float, max_gap_px: int):  # noqa: ANN202
    """Pairs (a, b) of valid pixels at most `max_gap_px` apart on the grid and closer than eps in 3-D."""
    h, w = index_hw.shape
    heads, tails = [], []
    offsets = [
        (dy, dx) for dy in range(max_gap_px + 1) for dx in range(-max_gap_px, max_gap_px + 1) if dy or dx > 0
    ]
    for dy, dx in offsets:  # half the neighbourhood: the graph is undirected
        src = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
        dst = (slice(dy, h), slice(max(0, dx), w + min(0, dx)))
        a, b = index_hw[src], index_hw[dst]
        near = (a >= 0) & (b >= 0)
        near &= ((xyz_hwc_m[src] - xyz_hwc_m[dst]) ** 2).sum(axis=-1) < eps_m * eps_m
        heads.append(a[near])
        tails.append(b[near])
    return np.concatenate(heads), np.concatenate(tails)


def keep_largest_cluster(
    xyz_hwc_m: np.ndarray, rgb_hwc_u8: np.ndarray, cfg: PreprocessConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Keep only the largest connected cluster of valid points; zero the rest in xyz and RGB.

    The official preprocessing runs Open3D DBSCAN(eps, min_points) on the cloud (3-10 s at 400 px here).
    An organised scan lets us build the eps-graph from grid neighbours instead: two valid pixels at most
    CLUSTER_MAX_GAP_PX apart and closer than eps in 3-D are connected, and the largest connected component
    is kept (scipy csgraph, ~20-40x faster). On generated scans with floating clutter it keeps the same
    points as DBSCAN (tests/core/test_plane.py measures it against `keep_largest_cluster_dbscan`). A cluster
    smaller than `cluster_min_points` never wins; if none is that large, every point is zeroed.

    Args:
        xyz_hwc_m: (H, W, 3) float32 metres. rgb_hwc_u8: (H, W, 3) uint8.

    Returns:
        New (xyz, rgb) arrays.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    valid = valid_mask(xyz_hwc_m)
    count = int(valid.sum())
    if count == 0:
        return xyz_hwc_m.copy(), rgb_hwc_u8.copy()
    index_hw = np.full(valid.shape, -1, dtype=np.int64)
    index_hw[valid] = np.arange(count)
    heads, tails = _grid_edges(xyz_hwc_m, index_hw, cfg.cluster_eps_m, CLUSTER_MAX_GAP_PX)
    graph = coo_matrix((np.ones(heads.size, dtype=np.int8), (heads, tails)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    keep_valid = np.zeros(count, dtype=bool)
    if sizes.max() >= cfg.cluster_min_points:
        keep_valid = labels == int(np.argmax(sizes))  # ties: lowest label, deterministic
    drop = valid.copy()
    drop[valid] = ~keep_valid
    return _zero_where(xyz_hwc_m, rgb_hwc_u8, drop)


def keep_largest_cluster_dbscan(
    xyz_hwc_m: np.ndarray, rgb_hwc_u8: np.ndarray, cfg: PreprocessConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The reference: keep the largest Open3D DBSCAN cluster of the valid points; zero the rest.

    Unlike the original, the noise label -1 never wins the "largest" vote: when noise outnumbers every
    cluster the original kept only the noise points. If DBSCAN finds no cluster at all, every point is
    zeroed and the caller sees an empty cloud.

    Args:
        xyz_hwc_m: (H, W, 3) float32 metres. rgb_hwc_u8: (H, W, 3) uint8.

    Returns:
        New (xyz, rgb) arrays.
    """
    valid = valid_mask(xyz_hwc_m)
    if not valid.any():
        return xyz_hwc_m.copy(), rgb_hwc_u8.copy()
    o3d = _open3d()
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz_hwc_m[valid].astype(np.float64)))
    labels = np.asarray(cloud.cluster_dbscan(eps=cfg.cluster_eps_m, min_points=cfg.cluster_min_points))
    keep_valid = np.zeros(len(labels), dtype=bool)
    if labels.max(initial=-1) >= 0:
        counts = np.bincount(labels[labels >= 0])
        keep_valid = labels == int(np.argmax(counts))  # ties: lowest label, deterministic
    drop = valid.copy()
    drop[valid] = ~keep_valid
    return _zero_where(xyz_hwc_m, rgb_hwc_u8, drop)
