"""Tests for core.plane: border RANSAC plane, plane removal, largest cluster."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import PreprocessConfig
from core.errors import EmptyCloudError
from core.plane import (
    border_points,
    fit_border_plane,
    keep_largest_cluster,
    keep_largest_cluster_dbscan,
    remove_plane,
    valid_mask,
)

# Support plane z = Z0 + A x + B y (metres); the camera looks along +z.
A, B, Z0 = 0.15, 0.10, 0.40


def tilted_scene(h: int = 200, w: int = 240, noise_m: float = 0.0003, seed: int = 0):
    """A tilted plane carrying a 20 mm box and a 30 mm dome, z noise σ = noise_m, 2% missing pixels.

    Returns (xyz (H,W,3) f32, rgb (H,W,3) u8, true height above the plane (H,W) metres, missing (H,W) bool).
    """
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:h, 0:w]
    x = (u - w / 2) * 0.0005
    y = (v - h / 2) * 0.0005
    height = np.where((np.abs(x + 0.03) < 0.012) & (np.abs(y) < 0.015), 0.020, 0.0)
    dome = 1.2 * np.sqrt(np.clip(0.025**2 - (x - 0.025) ** 2 - y**2, 0, None))
    height = np.maximum(height, dome)
    normal = np.array([A, B, -1.0]) / np.linalg.norm([A, B, -1.0])  # unit, towards the camera
    on_plane = np.stack([x, y, Z0 + A * x + B * y], axis=-1)
    xyz = on_plane + height[..., None] * normal
    xyz[..., 2] += rng.normal(0, noise_m, (h, w))
    missing = rng.random((h, w)) < 0.02
    xyz[missing] = 0
    rgb = rng.integers(1, 256, (h, w, 3), dtype=np.uint8)
    return xyz.astype(np.float32), rgb, height, missing


def test_border_points_drop_zeros_and_count_corners_twice():
    xyz = np.ones((30, 40, 3), np.float32)
    xyz[0, 5] = (1, 0, 1)  # one zero coordinate makes the point invalid
    pts = border_points(xyz, 10)
    assert pts.dtype == np.float64
    assert len(pts) == 2 * 10 * 40 + 2 * 30 * 10 - 2  # (0, 5) lies in the top and the left strip


def test_fit_border_plane_recovers_tilted_plane_deterministically():
    xyz, _, _, _ = tilted_scene()
    cfg = PreprocessConfig()
    plane = fit_border_plane(xyz, cfg)
    again = fit_border_plane(xyz, cfg)
    assert np.array_equal(plane, again)
    assert plane.shape == (4,) and np.isclose(np.linalg.norm(plane[:3]), 1.0)
    truth = np.array([A, B, -1.0, Z0]) / np.linalg.norm([A, B, -1.0])
    truth *= np.sign(truth[2]) * np.sign(plane[2])
    assert np.degrees(np.arccos(np.clip(plane[:3] @ truth[:3], -1, 1))) < 0.5
    assert abs(plane[3] - truth[3]) < 0.001


def test_fit_border_plane_on_preprocessed_scan_raises_clear_error():
    xyz, _, _, _ = tilted_scene()
    xyz[:10] = 0
    xyz[-10:] = 0
    xyz[:, :10] = 0
    xyz[:, -10:] = 0
    with pytest.raises(EmptyCloudError, match="already plane-removed") as info:
        fit_border_plane(xyz, PreprocessConfig(), source="bagel/test/crack/000")
    assert "bagel/test/crack/000" in str(info.value)


def test_remove_plane_keeps_object_and_removes_plane():
    xyz, rgb, height_m, missing = tilted_scene()
    cfg = PreprocessConfig()
    out_xyz, out_rgb = remove_plane(xyz, rgb, fit_border_plane(xyz, cfg), cfg)
    kept = valid_mask(out_xyz)
    object_px = (height_m > cfg.plane_removal_m + 0.0015) & ~missing  # 5σ above the removal threshold
    plane_px = (height_m == 0) & ~missing
    object_kept = kept[object_px].mean()
    plane_removed = 1 - kept[plane_px].mean()
    assert object_px.sum() > 2000 and plane_px.sum() > 20000
    assert object_kept >= 0.98, object_kept
    assert plane_removed >= 0.98, plane_removed
    removed = valid_mask(xyz) & ~kept
    assert (out_rgb[removed] == 0).all() and np.array_equal(out_rgb[kept], rgb[kept])
    assert np.array_equal(out_xyz[kept], xyz[kept]) and (out_xyz[removed] == 0).all()
    assert valid_mask(xyz).sum() > kept.sum()  # inputs untouched


def _blobs() -> np.ndarray:
    """An organised 40x40 scan: blobs of 400 (20x20, top-left), 150 and 100 points on a 2 mm grid, 5 cm apart,
    and 950 isolated noise points everywhere else (noise outnumbers every blob)."""
    rng = np.random.default_rng(1)
    xyz = np.c_[rng.uniform(0.2, 2.0, (1600, 2)), rng.uniform(0.3, 2.0, 1600)].reshape(40, 40, 3)
    yy, xx = np.mgrid[0:20, 0:20]
    xyz[:20, :20] = np.stack([xx * 0.002 + 0.01, yy * 0.002 + 0.01, np.full((20, 20), 0.4)], -1)
    yy, xx = np.mgrid[0:10, 0:15]
    xyz[22:32, :15] = np.stack([xx * 0.002 + 0.06, yy * 0.002 + 0.06, np.full((10, 15), 0.4)], -1)
    yy, xx = np.mgrid[0:10, 0:10]
    xyz[22:32, 20:30] = np.stack([xx * 0.002 + 0.11, yy * 0.002 + 0.11, np.full((10, 10), 0.4)], -1)
    return xyz.astype(np.float32)


def test_keep_largest_cluster_ignores_dbscan_noise_label():
    xyz = _blobs()
    rgb = np.full((40, 40, 3), 7, np.uint8)
    cfg = PreprocessConfig(cluster_eps_m=0.0025, cluster_min_points=4)
    out_xyz, out_rgb = keep_largest_cluster(xyz, rgb, cfg)
    kept = valid_mask(out_xyz)
    blob = np.zeros((40, 40), bool)
    blob[:20, :20] = True
    assert np.array_equal(kept, blob)  # the 400-point blob, not the 950 noise points nor smaller blobs
    assert (out_rgb[~kept] == 0).all() and (out_rgb[kept] == 7).all()
    reference = valid_mask(keep_largest_cluster_dbscan(xyz, rgb, cfg)[0])
    assert np.array_equal(kept, reference)


def test_keep_largest_cluster_without_any_cluster_empties_the_cloud():
    rng = np.random.default_rng(2)
    xyz = rng.uniform(0.3, 2.0, (20, 20, 3)).astype(np.float32)  # sparse: no 30 points within 6 mm
    out_xyz, _ = keep_largest_cluster(xyz, np.ones_like(xyz, dtype=np.uint8), PreprocessConfig())
    assert not valid_mask(out_xyz).any()


def test_fit_border_plane_is_deterministic_with_cluttered_borders():
    # 30% outliers on the border: RANSAC runs all its iterations, so seeding is what makes runs agree.
    xyz, _, _, _ = tilted_scene(120, 150, seed=4)
    rng = np.random.default_rng(5)
    clutter = rng.random(xyz.shape[:2]) < 0.3
    xyz[clutter, 2] -= rng.uniform(0.005, 0.05, clutter.sum()).astype(np.float32)
    cfg = PreprocessConfig(seed=7)
    fits = [fit_border_plane(xyz, cfg) for _ in range(3)]
    assert all(np.array_equal(fits[0], f) for f in fits[1:])
    # No accuracy check: with ransac_n=50 no sample is outlier-free at 30% clutter (0.7^50), so the fit is
    # biased by a few degrees; that is the original's behaviour, not something this function can fix.


def _cluttered_generated_scan(seed: int):  # noqa: ANN202 - (xyz, rgb) after plane removal, padded
    """A generated scan with floating clutter blobs and scattered stray points above the removed plane."""
    from core.plane import remove_plane
    from core.preprocess import pad_to_square
    from trainer.synth import render_sample

    raw = render_sample("gland", seed, width_px=300, height_px=300)
    cfg = PreprocessConfig()
    xyz, rgb = remove_plane(raw.xyz_hwc_m, raw.rgb_hwc_u8, fit_border_plane(raw.xyz_hwc_m, cfg), cfg)
    rng = np.random.default_rng(seed)
    h, w = xyz.shape[:2]
    for _ in range(4):  # 8x8 blobs lifted 2-5 cm off the plane: clusters of their own
        y, x = rng.integers(8, h - 8), rng.integers(8, w - 8)
        block = (slice(y - 4, y + 4), slice(x - 4, x + 4))
        lifted = raw.xyz_hwc_m[block].copy()
        lifted[..., 2] -= rng.uniform(0.02, 0.05)
        xyz[block] = lifted
    stray = rng.random((h, w)) < 0.01
    xyz[stray] = raw.xyz_hwc_m[stray] - np.array([0, 0, 0.03], np.float32)
    return pad_to_square(xyz, 100), pad_to_square(rgb, 100)


@pytest.mark.parametrize("seed", [1, 2])
def test_grid_largest_cluster_keeps_the_same_points_as_open3d_dbscan(seed: int) -> None:
    xyz, rgb = _cluttered_generated_scan(seed)
    cfg = PreprocessConfig()
    ours = valid_mask(keep_largest_cluster(xyz, rgb, cfg)[0])
    reference = valid_mask(keep_largest_cluster_dbscan(xyz, rgb, cfg)[0])
    assert reference.sum() > 1000  # the object, not a clutter blob
    assert (ours & reference).sum() / (ours | reference).sum() > 0.999
    assert not (ours & ~valid_mask(xyz)).any()


# Measured with the real code (seed 4 scene, seed 5 clutter, RANSAC seed 7; 1000 iterations): tilt error
# 0.011° / 0.009° / 0.100° / 4.5° and plane removed 100% / 100% / 100% / 60% at 10 / 20 / 30 / 40% clutter.
# One RANSAC iteration gives 2.7° (20%) and 5.6° with 24% of the plane removed (30%), so the bounds at 20% and
# 30% catch a RANSAC that stops early. At 40% the fit breaks down (no 50-point sample is clean): the bounds
# record that honestly rather than pretend.
CLUTTER_BOUNDS = {0.1: (0.2, 0.995), 0.2: (0.2, 0.995), 0.3: (0.5, 0.995), 0.4: (8.0, 0.4)}


@pytest.mark.parametrize("fraction", sorted(CLUTTER_BOUNDS))
def test_plane_fit_accuracy_under_border_clutter(fraction: float) -> None:
    max_tilt_deg, min_removed = CLUTTER_BOUNDS[fraction]
    xyz, rgb, height_m, missing = tilted_scene(seed=4)  # the object stays clear of the 10-px border strips
    rng = np.random.default_rng(5)
    clutter = (rng.random(xyz.shape[:2]) < fraction) & ~missing  # debris 5-50 mm above the support
    xyz[clutter, 2] -= rng.uniform(0.005, 0.05, clutter.sum()).astype(np.float32)
    cfg = PreprocessConfig(seed=7)
    plane = fit_border_plane(xyz, cfg)
    truth = np.array([A, B, -1.0]) / np.linalg.norm([A, B, -1.0])
    tilt_deg = np.degrees(np.arccos(min(1.0, abs(float(plane[:3] @ truth)))))
    out_xyz, _ = remove_plane(xyz, rgb, plane, cfg)
    clean_plane_px = (height_m == 0) & ~missing & ~clutter
    removed = 1 - valid_mask(out_xyz)[clean_plane_px].mean()
    assert tilt_deg < max_tilt_deg, (fraction, tilt_deg)
    assert removed >= min_removed, (fraction, removed)


def test_valid_mask_needs_every_coordinate_non_zero_and_only_zero_is_missing():
    xyz = np.array([[[1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0], [0, 0, 0], [2, -1, 0.5]]], np.float32)
    assert valid_mask(xyz).tolist() == [[True, False, False, False, False, True]]


def _top_strip_points(n_valid: int) -> np.ndarray:
    """30x30 scan whose only valid points lie on a tilted plane in the top strip, away from the corner blocks
    (so border_points counts each once): exactly `n_valid` of them."""
    xyz = np.zeros((30, 30, 3), np.float32)
    rows, cols = np.divmod(np.arange(n_valid), 10)
    x, y = cols * 0.001 + 0.01, rows * 0.001 + 0.01
    xyz[rows, cols + 10] = np.stack([x, y, 0.4 + 0.1 * x + 0.05 * y], -1)
    return xyz


def test_fit_border_plane_takes_exactly_ransac_n_points_and_refuses_one_fewer():
    cfg = PreprocessConfig()
    plane = fit_border_plane(_top_strip_points(cfg.ransac_n), cfg)
    truth = np.array([0.1, 0.05, -1.0, 0.4]) / np.linalg.norm([0.1, 0.05, -1.0])
    assert np.allclose(plane, truth, atol=1e-4) or np.allclose(plane, -truth, atol=1e-4)
    with pytest.raises(EmptyCloudError, match=f"only {cfg.ransac_n - 1} valid points in the 10-px border"):
        fit_border_plane(_top_strip_points(cfg.ransac_n - 1), cfg, source="scan 7")


def _grid_cluster_cfg(min_points: int = 5) -> PreprocessConfig:
    return PreprocessConfig(cluster_eps_m=0.006, cluster_min_points=min_points)


def _pixels(coords: list[tuple[int, int]], shape: tuple[int, int] = (20, 20)) -> np.ndarray:
    """Valid pixels at `coords` on a 1 mm grid at z = 0.5 m (so grid gaps decide, not 3-D distance)."""
    xyz = np.zeros((*shape, 3), np.float32)
    for r, c in coords:
        xyz[r, c] = (0.01 + c * 0.001, 0.01 + r * 0.001, 0.5)
    return xyz


def _kept(coords: list[tuple[int, int]], min_points: int = 5) -> set[tuple[int, int]]:
    xyz = _pixels(coords)
    out_xyz, out_rgb = keep_largest_cluster(
        xyz, np.full(xyz.shape, 9, np.uint8), _grid_cluster_cfg(min_points)
    )
    kept = valid_mask(out_xyz)
    dropped = valid_mask(xyz) & ~kept  # pixels that were never valid keep their rgb
    assert (out_rgb[kept] == 9).all() and (out_rgb[dropped] == 0).all()
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(kept), strict=True)}


def test_grid_cluster_bridges_a_one_pixel_hole_but_not_a_two_pixel_hole():
    six = [(5, c) for c in range(6)]
    assert _kept([*six, (5, 7), (5, 8)]) == {*six, (5, 7), (5, 8)}  # cols 5 -> 7: 2 px apart, joined
    assert _kept([*six, (5, 8), (5, 9), (5, 10)]) == set(six)  # cols 5 -> 8: 3 px apart, apart
    column = [(r, 3) for r in range(6)]
    assert _kept([*column, (8, 3), (9, 3), (10, 3)]) == set(column)  # the same along the rows


def test_grid_cluster_follows_down_left_diagonals():
    anti_diagonal = [(r, 10 - r) for r in range(7)]  # each pixel touches the next only at (+1, -1)
    assert _kept(anti_diagonal) == set(anti_diagonal)
    steep = [(r, 10 - 2 * (r // 2) - (r % 2) * 2) for r in range(6)]  # steps of (+1, -2) and (+1, 0)
    assert _kept(steep) == set(steep)


def test_grid_cluster_of_exactly_min_points_is_kept_and_one_point_alone_is_not():
    five = [(2, c) for c in range(5)]
    assert _kept(five, min_points=5) == set(five)
    assert _kept(five, min_points=6) == set()
    assert _kept([(4, 4)], min_points=2) == set()  # a single valid point is no cluster of 2


def test_dbscan_reference_keeps_its_only_cluster_and_empties_a_cloud_without_one():
    cfg = PreprocessConfig(cluster_eps_m=0.0025, cluster_min_points=4)
    xyz = _blobs()
    xyz[22:, :] = 0  # only the 400-point blob (label 0) and the noise above it are left
    xyz[:20, 20:] = 0
    kept = valid_mask(keep_largest_cluster_dbscan(xyz, np.ones(xyz.shape, np.uint8), cfg)[0])
    blob = np.zeros((40, 40), bool)
    blob[:20, :20] = True
    assert np.array_equal(kept, blob)
    sparse = np.random.default_rng(2).uniform(0.3, 2.0, (20, 20, 3)).astype(np.float32)
    out_xyz, out_rgb = keep_largest_cluster_dbscan(
        sparse, np.ones(sparse.shape, np.uint8), PreprocessConfig()
    )
    assert not valid_mask(out_xyz).any() and not out_rgb.any()
