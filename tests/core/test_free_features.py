"""Known-answer tests of the weight-free descriptors (core.free_features, core.free_rgb, core.free_points)."""

from __future__ import annotations

import numpy as np
import pytest

import core.free_features as ff
from core.config import FREE_POINT_DIM, FREE_RGB_DIM
from core.errors import ShapeError
from core.free_points import (
    WINDOW_RADII_PX,
    _cross,
    _minus_diagonal,
    integral_image,
    point_descriptor_per_point,
    smallest_eigenpairs,
    window_sums,
)
from core.free_rgb import BORDER_PX, statistics_mask
from core.pfa import project_to_grid
from core.scan import PreparedScan

S = 224
SPACING_M = 0.0004
N_SCALES = len(WINDOW_RADII_PX)


def make_scan(
    height_m: np.ndarray, valid_hw: np.ndarray, rgb_hwc_u8: np.ndarray | None = None
) -> PreparedScan:
    """Scan of a surface z = 0.5 m - height seen by a camera at the origin, 0.4 mm grid spacing."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    xyz = np.stack([(xx - S / 2) * SPACING_M, (yy - S / 2) * SPACING_M, 0.5 - height_m], axis=-1)
    xyz = np.where(valid_hw[..., None], xyz, 0.0).astype(np.float32)
    if rgb_hwc_u8 is None:
        rgb_hwc_u8 = np.full((S, S, 3), 128, np.uint8)
    rgb = np.where(valid_hw[..., None], rgb_hwc_u8, 0).astype(np.uint8)
    return PreparedScan(np.zeros((3, S, S), np.float32), rgb, xyz, valid_hw)


def disc(radius_px: float = 90.0) -> np.ndarray:
    yy, xx = np.mgrid[0:S, 0:S]
    return (yy - S / 2) ** 2 + (xx - S / 2) ** 2 < radius_px**2


def bump(cy: float, cx: float, sigma_px: float, amp_m: float) -> np.ndarray:
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    return amp_m * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma_px**2))


def textured_scan(seed: int = 0) -> PreparedScan:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:S, 0:S]
    rgb = np.stack([100 + 50 * np.sin(xx / 7.0), 120 + 40 * np.cos(yy / 5.0), 90 + 0 * xx], -1)
    rgb = np.clip(rgb + rng.normal(0, 5, rgb.shape), 0, 255).astype(np.uint8)
    height = 0.01 * np.sqrt(np.clip(1 - ((yy - 112) ** 2 + (xx - 112) ** 2) / 150.0**2, 0, 1))
    return make_scan(height + rng.normal(0, 2e-5, (S, S)), disc() & (rng.random((S, S)) > 0.03), rgb)


def test_public_api_and_dims_come_from_config():
    assert set(ff.__all__) == {"FREE_POINT_DIM", "FREE_RGB_DIM", "point_descriptor", "rgb_descriptor"}
    assert ff.FREE_RGB_DIM == FREE_RGB_DIM and ff.FREE_POINT_DIM == FREE_POINT_DIM


def test_shapes_dtypes_and_determinism():
    scan = textured_scan()
    rgb_a, rgb_b = ff.rgb_descriptor(scan), ff.rgb_descriptor(textured_scan())
    pts_a, pts_b = ff.point_descriptor(scan), ff.point_descriptor(textured_scan())
    assert rgb_a.shape == (28, 28, FREE_RGB_DIM) and rgb_a.dtype == np.float32
    assert pts_a.shape == (56, 56, FREE_POINT_DIM) and pts_a.dtype == np.float32
    np.testing.assert_array_equal(rgb_a, rgb_b)
    np.testing.assert_array_equal(pts_a, pts_b)
    assert np.isfinite(rgb_a).all() and np.isfinite(pts_a).all()


def test_point_background_patches_are_exactly_zero():
    scan = textured_scan()
    feats = ff.point_descriptor(scan)
    index = np.flatnonzero(scan.valid_hw)
    covered = project_to_grid(np.ones((index.size, 1), np.float32), index)[..., 0] > 0
    assert (~covered).sum() > 100, "fixture must have background cells"
    assert np.all(feats[~covered] == 0.0)
    assert np.abs(feats[covered]).sum(axis=-1).min() > 0


def test_tilted_plane_gives_near_zero_geometry():
    yy, xx = np.mgrid[0:S, 0:S]
    tilt_m = 0.3 * SPACING_M * xx + 0.2 * SPACING_M * yy
    feats, _ = point_descriptor_per_point(make_scan(tilt_m, np.ones((S, S), bool)))
    assert np.abs(feats).max() < 1e-3


def test_bump_and_dent_respond_with_opposite_signs():
    valid = np.ones((S, S), bool)
    flat, _ = point_descriptor_per_point(make_scan(np.zeros((S, S)), valid))
    up, _ = point_descriptor_per_point(make_scan(bump(112, 112, 4.0, 0.001), valid))
    down, _ = point_descriptor_per_point(make_scan(-bump(112, 112, 4.0, 0.001), valid))
    centre = 112 * S + 112
    heights = slice(0, 3 * N_SCALES, 3)
    assert np.all(up[centre, heights] > 0.1) and np.all(down[centre, heights] < -0.1)
    # A 1 mm bump at 0.4 mm spacing is a large response in units of the spacing; a flat plane is ~0.
    assert np.abs(up[centre]).max() > 0.5
    assert np.abs(flat).max() < 1e-3
    far_away = 20 * S + 20
    assert np.abs(up[far_away]).max() < 1e-3


def test_random_dropouts_barely_change_a_smooth_surface():
    yy, xx = np.mgrid[0:S, 0:S]
    sphere_m = 0.01 * np.sqrt(np.clip(1 - ((yy - 112) ** 2 + (xx - 112) ** 2) / 200.0**2, 0, 1))
    valid = np.ones((S, S), bool)
    full, _ = point_descriptor_per_point(make_scan(sphere_m, valid))
    holes = valid & (np.random.default_rng(0).random((S, S)) > 0.1)
    sparse, idx = point_descriptor_per_point(make_scan(sphere_m, holes))
    diff = np.abs(full[idx] - sparse)
    assert np.percentile(diff, 99) < 0.05 * np.abs(full).max()
    assert np.median(diff) < 0.01


def test_few_or_no_valid_points_are_nan_free():
    valid = np.zeros((S, S), bool)
    none = ff.point_descriptor(make_scan(np.zeros((S, S)), valid))
    assert np.all(none == 0.0)
    valid[100, 100:103] = True
    few = ff.point_descriptor(make_scan(np.zeros((S, S)), valid))
    rgb_few = ff.rgb_descriptor(make_scan(np.zeros((S, S)), valid))
    assert np.isfinite(few).all() and np.isfinite(rgb_few).all()


def test_smallest_eigenpairs_matches_lapack():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 3, 3))
    cov = a @ a.transpose(0, 2, 1)
    value, vector = smallest_eigenpairs(cov)
    ref_values, ref_vectors = np.linalg.eigh(cov)
    np.testing.assert_allclose(value, ref_values[:, 0], atol=1e-9)
    np.testing.assert_allclose(np.abs(np.einsum("nc,nc->n", vector, ref_vectors[:, :, 0])), 1.0, atol=1e-9)


def test_rgb_of_constant_colour_is_spatially_constant():
    rgb = np.full((S, S, 3), (200, 60, 30), np.uint8)
    feats = ff.rgb_descriptor(make_scan(np.zeros((S, S)), np.ones((S, S), bool), rgb))
    np.testing.assert_allclose(feats, np.broadcast_to(feats[14, 14], feats.shape), atol=1e-6)


def test_rgb_stain_changes_only_nearby_patches():
    rng = np.random.default_rng(2)
    rgb = np.clip(rng.normal(128, 20, (S, S, 3)), 0, 255).astype(np.uint8)
    stained = rgb.copy()
    stained[80:88, 120:128] = (200, 40, 40)  # exactly patch (10, 15)
    valid = np.ones((S, S), bool)
    clean = ff.rgb_descriptor(make_scan(np.zeros((S, S)), valid, rgb))
    dirty = ff.rgb_descriptor(make_scan(np.zeros((S, S)), valid, stained))
    changed = np.abs(dirty - clean).max(axis=-1)
    assert changed[10, 15] > 10 * np.median(changed[changed > 0])
    rows, cols = np.nonzero(changed > 1e-4)
    # Smoothing (8 px) plus the widest context window (12 px) reaches at most 3 patches away.
    assert np.abs(rows - 10).max() <= 3 and np.abs(cols - 15).max() <= 3


def test_rgb_background_dominance_and_bad_shapes():
    scan = textured_scan()
    feats = ff.rgb_descriptor(scan)
    assert np.all(feats[0, 0] == 0.0)  # a window with no valid pixel is the background value
    bad = PreparedScan(scan.rgb_chw, scan.rgb_hwc_u8[:100], scan.xyz_hwc_m, scan.valid_hw)
    with pytest.raises(ShapeError, match=r"rgb must be \(224,224,3\) uint8"):
        ff.rgb_descriptor(bad)
    bad = PreparedScan(scan.rgb_chw, scan.rgb_hwc_u8, scan.xyz_hwc_m[:, :100], scan.valid_hw)
    with pytest.raises(ShapeError, match=r"xyz must be \(224,224,3\)"):
        ff.point_descriptor(bad)


def test_bounding_box_integral_image_equals_the_full_frame_bit_for_bit():
    """The point descriptor sums windows over the valid points' bounding box only; zeros outside it make the
    box's prefix sums equal the full frame's exactly, windows crossing the box edge included."""
    rng = np.random.default_rng(4)
    frame = np.zeros((S, S, 13))
    frame[60:130, 90:170] = rng.normal(size=(70, 80, 13)) * (rng.random((70, 80, 1)) < 0.7)
    rows, cols = np.nonzero(frame.any(-1))
    top, left = rows.min(), cols.min()
    box = frame[top : rows.max() + 1, left : cols.max() + 1]
    for radius in WINDOW_RADII_PX:
        full = window_sums(integral_image(frame), rows, cols, radius)
        cropped = window_sums(integral_image(box), rows - top, cols - left, radius)
        np.testing.assert_array_equal(cropped, full)
        assert np.abs(full).max() > 1.0  # real sums, not zeros on both sides


def test_cross_and_diagonal_helpers_are_bit_equal_to_numpy():
    rng = np.random.default_rng(5)
    a, b, m, v = (
        rng.normal(size=(64, 3)),
        rng.normal(size=(64, 3)),
        rng.normal(size=(64, 3, 3)),
        rng.normal(size=64),
    )
    np.testing.assert_array_equal(_cross(a, b), np.cross(a, b))
    np.testing.assert_array_equal(_minus_diagonal(m, v), m - v[:, None, None] * np.eye(3))


def test_statistics_mask_drops_the_silhouette_rim_but_not_speckle_or_the_frame():
    square = np.zeros((S, S), bool)
    square[60:160, 60:160] = True
    speckled = square.copy()
    speckled[100, 100] = speckled[120, 90] = False  # isolated dropouts inside the object
    inner = statistics_mask(speckled)
    # The rim: BORDER_PX pixels (4-connected erosion) next to the background are dropped; dropouts stay out.
    assert not inner[60 : 60 + BORDER_PX].any() and inner[60 + BORDER_PX, 100]
    assert inner[99, 100] and inner[101, 100] and not inner[100, 100] and not inner[120, 90]
    assert inner.sum() == (100 - 2 * BORDER_PX) ** 2 - 2
    everything = np.ones((S, S), bool)  # an RGB-only scan: the frame edge is no silhouette
    assert statistics_mask(everything).all()
    thin = np.zeros((S, S), bool)
    thin[100:102, 50:150] = True  # thinner than the rim: kept whole rather than emptied
    assert np.array_equal(statistics_mask(thin), thin)


def test_rgb_ignores_the_colour_of_the_silhouette_rim():
    rng = np.random.default_rng(3)
    valid = disc(80.0)
    rim = valid & ~statistics_mask(valid)
    assert 0 < rim.sum() < 0.1 * valid.sum()
    rgb = np.clip(rng.normal(128, 20, (S, S, 3)), 0, 255).astype(np.uint8)
    blended = rgb.copy()
    blended[rim] = rng.integers(0, 40, (int(rim.sum()), 3))  # object colour mixed with a dark background
    flat = np.zeros((S, S))
    np.testing.assert_array_equal(
        ff.rgb_descriptor(make_scan(flat, valid, blended)), ff.rgb_descriptor(make_scan(flat, valid, rgb))
    )
