"""Known-answer tests of the weight-free descriptors (core.free_features, core.free_rgb, core.free_points)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

import core.free_features as ff
import core.free_rgb as free_rgb
from core.config import FREE_POINT_DIM, FREE_RGB_DIM
from core.errors import ShapeError
from core.free_points import (
    WINDOW_RADII_PX,
    _cross,
    _minus_diagonal,
    integral_image,
    point_descriptor_per_point,
    point_spacing_m,
    smallest_eigenpairs,
    window_sums,
)
from core.free_rgb import BORDER_PX, srgb_to_lab, statistics_mask
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


@pytest.mark.parametrize("shape", [(224, 224), (57, 91), (3, 3)])
def test_statistics_mask_equals_scipys_closing_then_erosion(shape: tuple[int, int]) -> None:
    """The shift-based morphology is the scipy definition (cross, outside the frame set), on masks that
    touch the frame, are speckled at several rates, or are noise."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    for trial in range(60):
        cy, cx = rng.uniform(-0.2, 1.2, 2) * shape
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (rng.uniform(0.05, 0.8) * max(shape)) ** 2
        if trial % 4 == 0:
            mask = rng.random(shape) < 0.6
        mask &= rng.random(shape) >= rng.choice([0.0, 0.01, 0.1])
        closed = ndimage.binary_closing(mask, iterations=1, border_value=1)
        reference = ndimage.binary_erosion(closed, iterations=BORDER_PX, border_value=1) & mask
        reference = reference if reference.any() else mask
        np.testing.assert_array_equal(statistics_mask(mask), reference)


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


# --- independent references (issue 16: mutation survivors of core/free_rgb.py, free_points.py) ------------
#
# Each reference below is written from the descriptor's definition in the module docstrings, not from the
# code's fast paths: CIE formulas with exact constants, per-patch window weights as separable matrices
# instead of 4-px block sums, LBP by clipped indexing, local planes by numpy's eigh on each window's points.


def lab_reference(rgb_u8: np.ndarray) -> np.ndarray:
    """sRGB (D65) -> CIELAB from the CIE definitions, float64 (exact 6/29 constants)."""
    c = rgb_u8.astype(np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    t = np.einsum("...c,rc->...r", lin, to_xyz) / np.array([0.95047, 1.0, 1.08883])
    d = 6.0 / 29.0
    f = np.where(t > d**3, np.cbrt(t), t / (3 * d * d) + 4.0 / 29.0)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def test_srgb_to_lab_matches_published_values_and_the_cie_formula():
    # Published sRGB D65 values (Lindbloom's calculator): white, the primaries, mid grey.
    colours = np.array([[[255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], np.uint8)
    published = np.array(
        [
            [100.0, 0.0, 0.0],
            [53.2408, 80.0925, 67.2032],
            [87.7347, -86.1827, 83.1793],
            [32.2970, 79.1875, -107.8602],
            [53.5850, 0.0, 0.0],
        ]
    )
    lab = srgb_to_lab(colours)
    assert lab.dtype == np.float32 and lab.shape == (1, 5, 3)
    np.testing.assert_allclose(lab[0], published, atol=0.01)
    # Every 8-bit grey and a random spread of colours, the darkest (linear-segment) ones included.
    greys = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    rng = np.random.default_rng(11)
    mixed = rng.integers(0, 256, (1, 500, 3), dtype=np.uint8)
    dark = rng.integers(0, 12, (1, 100, 3), dtype=np.uint8)
    for rgb in (greys, mixed, dark):
        np.testing.assert_allclose(srgb_to_lab(rgb), lab_reference(rgb), atol=2e-3)
    # (10, 10, 10) by hand: c = 10/255 lies on the linear segment, Y = c / 12.92 = 0.0030353 < 0.008856,
    # f = 7.787 Y + 16/116 = 0.161567, L = 116 f - 16 = 2.7418.
    assert abs(float(srgb_to_lab(np.full((1, 1, 3), 10, np.uint8))[0, 0, 0]) - 2.7418) < 1e-3


def _smooth_reference(scan: PreparedScan, sigma: float) -> np.ndarray:
    """Normalised convolution of the Lab image: Gaussian of weight * value over Gaussian of weight."""
    weight = statistics_mask(scan.valid_hw).astype(np.float64)
    lab = lab_reference(scan.rgb_hwc_u8)
    num = ndimage.gaussian_filter(lab * weight[..., None], sigma=(sigma, sigma, 0), mode="nearest")
    den = ndimage.gaussian_filter(weight, sigma=sigma, mode="nearest")
    return num / np.maximum(den, 1e-3)[..., None]


def _window_matrix(lo: int, weights: np.ndarray) -> np.ndarray:
    """(28, 224) per-patch pixel weights along one axis: block b of patch i weighs weights[b - 2i + lo]."""
    out = np.zeros((28, S))
    for i in range(28):
        for k, w in enumerate(weights):
            block = 2 * i - lo + k
            if 0 <= block < S // 4:
                out[i, 4 * block : 4 * block + 4] = w
    return out


def _pool(m_hwc: np.ndarray, weight_hw: np.ndarray, window: tuple[int, np.ndarray]):
    """Masked window mean, std (coverage-shrunk below 1/4) and coverage of every patch, float64."""
    a = _window_matrix(*window)

    def s(x: np.ndarray) -> np.ndarray:  # sum_yx a[i, y] a[j, x] x[y, x, ...]
        return np.swapaxes(np.tensordot(a, np.tensordot(a, x, axes=(1, 0)), axes=(1, 1)), 0, 1)

    s0, total = s(weight_hw), s(np.ones_like(weight_hw))
    den = np.maximum(s0, 0.25 * total)[..., None]
    first = s(m_hwc * weight_hw[..., None])
    second = s(m_hwc * m_hwc * weight_hw[..., None])
    exact = np.maximum(s0, 1e-9)[..., None]
    std = np.sqrt(np.maximum(second / exact - (first / exact) ** 2, 0.0)) * (s0[..., None] / den)
    return first / den, std, s0 / total


def _gradient(f_hw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d/dy, d/dx): central differences inside, one-sided at the edges."""
    out = []
    for axis in (0, 1):
        g = np.zeros_like(f_hw)
        fm = np.moveaxis(f_hw, axis, 0)
        gm = np.moveaxis(g, axis, 0)
        gm[1:-1] = (fm[2:] - fm[:-2]) / 2.0
        gm[0], gm[-1] = fm[1] - fm[0], fm[-1] - fm[-2]
        out.append(g)
    return out[0], out[1]


def _lbp_reference(gray_hw: np.ndarray, r: int) -> np.ndarray:
    """8 neighbours at distance r, circular order from north, edge-replicated; on = not darker by > 1 L."""
    h, w = gray_hw.shape
    yy, xx = np.mgrid[0:h, 0:w]
    ring = [(-r, 0), (-r, r), (0, r), (r, r), (r, 0), (r, -r), (0, -r), (-r, -r)]
    bits = [
        gray_hw[np.clip(yy + dy, 0, h - 1), np.clip(xx + dx, 0, w - 1)] >= gray_hw - 1.0 for dy, dx in ring
    ]
    changes = sum((bits[k] != bits[(k + 1) % 8]).astype(int) for k in range(8))
    return np.where(changes <= 2, sum(b.astype(int) for b in bits), 9)


def _coherence_reference(jxx, jyy, jxy):
    lam_sum, lam_diff = jxx + jyy, np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2)  # eigenvalue sum and difference
    return lam_diff / (lam_sum + 1e-3)


def rgb_descriptor_reference(scan: PreparedScan) -> np.ndarray:
    """The 35-dim RGB descriptor from its definition (module docstring of core.free_rgb), float64."""
    weight = statistics_mask(scan.valid_hw).astype(np.float64)
    lab = lab_reference(scan.rgb_hwc_u8)
    fine, coarse = _smooth_reference(scan, 1.0), _smooth_reference(scan, 2.0)
    gy, gx = _gradient(fine[..., 0])
    cgy, cgx = _gradient(coarse[..., 0])
    (ay, ax), (by, bx) = _gradient(fine[..., 1]), _gradient(fine[..., 2])
    grad_fine, grad_coarse = np.hypot(gx, gy), np.hypot(cgx, cgy)
    chroma = np.sqrt(ax**2 + ay**2 + bx**2 + by**2)
    tensor = np.stack([gx * gx, gy * gy, gx * gy], -1)
    # The LBP codes are thresholded, so a float32 rounding step may flip one: they are taken from the code's
    # own float32 smoothing (itself checked against `smooth` above by the caller).
    lab32 = free_rgb.srgb_to_lab(scan.rgb_hwc_u8)
    w32 = weight.astype(np.float32)
    codes = [
        _lbp_reference(free_rgb.normalized_smooth(lab32, w32, sigma)[..., 0], r)
        for sigma, r in ((1.0, 1), (2.0, 2))
    ]
    one_hot = np.concatenate([(c[..., None] == np.arange(10)).astype(np.float64) for c in codes], -1)
    near, far = free_rgb.NEAR_WINDOW, free_rgb.FAR_WINDOW
    stat = np.concatenate([lab, grad_fine[..., None], grad_coarse[..., None], chroma[..., None]], -1)
    mean, std, coverage = _pool(stat, weight, near)
    t_near, _, _ = _pool(tensor, weight, near)
    lbp, _, _ = _pool(one_hot, weight, near)
    far_mean, _, _ = _pool(
        np.concatenate([grad_fine[..., None], grad_coarse[..., None], tensor], -1), weight, far
    )
    return np.concatenate(
        [
            mean[..., :3] / 100.0,
            std[..., :3] / 20.0,
            np.concatenate([mean[..., 3:6], std[..., 3:4], far_mean[..., :2]], -1) / 4.0,
            _coherence_reference(*np.moveaxis(t_near, -1, 0))[..., None],
            _coherence_reference(*np.moveaxis(far_mean[..., 2:], -1, 0))[..., None],
            lbp,
            coverage[..., None],
        ],
        -1,
    )


def reference_rgb_scan() -> PreparedScan:
    """Texture with edges and colour, valid up to the image frame with a hole, a thin tail and dropouts."""
    rng = np.random.default_rng(21)
    yy, xx = np.mgrid[0:S, 0:S]
    rgb = np.stack(
        [120 + 80 * np.sin(xx / 6.0 + yy / 17.0), 110 + 60 * np.cos(yy / 4.0), 60 + (xx > 130) * 120], -1
    )
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    valid = ~((yy - 90) ** 2 + (xx - 100) ** 2 < 40**2)  # a cavity: windows of every coverage
    valid &= rng.random((S, S)) > 0.05
    valid[0:3, :] = False  # a rim along the top frame edge
    valid[95:97, 40:90] = True  # a thin bar inside the cavity
    return make_scan(np.zeros((S, S)), valid, rgb)


def test_rgb_descriptor_matches_an_independent_per_patch_computation():
    scan = reference_rgb_scan()
    got = ff.rgb_descriptor(scan)
    ref = rgb_descriptor_reference(scan)
    weight = statistics_mask(scan.valid_hw).astype(np.float32)
    lab32 = free_rgb.srgb_to_lab(scan.rgb_hwc_u8)
    coverage = ref[..., -1]
    assert ((coverage > 0) & (coverage < 0.25)).sum() > 3 and (coverage == 0).any() and coverage.max() > 0.95
    assert np.percentile(ref[..., 6:12], 50) > 0.1 and ref[..., 12:14].max() > 0.3  # edges, orientation
    for sigma in (1.0, 2.0):
        assert (
            np.abs(free_rgb.normalized_smooth(lab32, weight, sigma) - _smooth_reference(scan, sigma)).max()
            < 1e-3
        )
    groups = free_rgb.rgb_descriptor_groups(scan)
    assert [g.shape[-1] for g in groups.values()] == [6, 6, 2, 20, 1] and list(groups) == list(
        free_rgb.RGB_GROUPS
    )
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5)


def spacing_reference(xyz: np.ndarray, valid: np.ndarray) -> float:
    steps = [
        np.linalg.norm(xyz[y, x] - xyz[y + dy, x + dx])
        for y, x in zip(*np.nonzero(valid), strict=True)
        for dy, dx in ((1, 0), (0, 1))
        if y + dy < valid.shape[0] and x + dx < valid.shape[1] and valid[y + dy, x + dx]
    ]
    return float(np.median(steps)) if steps else 0.0


def point_descriptor_reference(scan: PreparedScan) -> np.ndarray:
    """Per-point features from the definition: eigh of each window's population covariance, float64."""
    xyz, valid = scan.xyz_hwc_m.astype(np.float64), scan.valid_hw
    pts = xyz[valid]
    unit = 2.0 * max(spacing_reference(scan.xyz_hwc_m, valid), 1e-6)
    centred = np.zeros_like(xyz)
    centred[valid] = (pts - pts.mean(axis=0)) / unit
    pad = max(WINDOW_RADII_PX)
    c_pad = np.pad(centred, ((pad, pad), (pad, pad), (0, 0)))
    v_pad = np.pad(valid, pad).astype(np.float64)

    def window_total(values_pad: np.ndarray, r: int) -> np.ndarray:  # sum over the (2r+1)^2 window, per pixel
        out = np.zeros((S, S, *values_pad.shape[2:]))
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                out += values_pad[pad + dy : pad + dy + S, pad + dx : pad + dx + S]
        return out[valid]

    outer_pad = c_pad[..., :, None] * c_pad[..., None, :]
    feats, normals_fine = [], None
    for r in WINDOW_RADII_PX:
        count = window_total(v_pad, r)
        mean = window_total(c_pad, r) / np.maximum(count, 1)[:, None]
        cov = (
            window_total(outer_pad, r) / np.maximum(count, 1)[:, None, None]
            - mean[:, :, None] * mean[:, None, :]
        )
        values, vectors = np.linalg.eigh(cov)
        normal = (
            vectors[:, :, 0] * np.where(np.einsum("nc,nc->n", vectors[:, :, 0], pts) > 0, -1.0, 1.0)[:, None]
        )
        normals_fine = normal if normals_fine is None else normals_fine
        enough = count >= 4
        height = np.where(enough, np.einsum("nc,nc->n", normal, centred[valid] - mean), 0.0)
        feats.append((height, np.where(enough, np.sqrt(np.maximum(values[:, 0], 0.0)), 0.0)))
    n_pad = np.zeros((S + 2 * pad, S + 2 * pad, 3))
    n_pad[pad:-pad, pad:-pad][valid] = normals_fine
    columns = []
    for (height, rms), r in zip(feats, WINDOW_RADII_PX, strict=True):
        count = window_total(v_pad, r)
        spread = 1.0 - np.linalg.norm(window_total(n_pad, r), axis=-1) / np.maximum(count, 1)
        columns += [height, rms, np.where(count >= 4, spread / 0.05, 0.0)]
    return np.stack(columns, -1)


def reference_point_scan() -> PreparedScan:
    """A curved, bumpy, noisy patch with dropouts, plus a 4-point and a 3-point cluster far from it."""
    rng = np.random.default_rng(31)
    yy, xx = np.mgrid[0:S, 0:S]
    height = (
        0.004 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
        + bump(110, 100, 3.0, 0.0015)
        - bump(120, 125, 2.0, 0.001)
    )
    height += rng.normal(0, 3e-5, (S, S))
    valid = (yy >= 80) & (yy < 140) & (xx >= 70) & (xx < 140) & (rng.random((S, S)) > 0.08)
    valid[30, 30] = valid[30, 31] = valid[31, 30] = valid[31, 32] = True  # 4 points: exactly MIN_NEIGHBOURS
    height[31, 32] += 0.0005  # not coplanar
    valid[30, 180] = valid[31, 181] = valid[30, 182] = True  # 3 points: too few for a plane
    valid[100, 140:150] = True  # a 2-px spur whose tip window (100, 149) holds exactly 4 points
    valid[101, 140:148] = True
    valid[101, 148:150] = False
    return make_scan(height, valid)


def test_point_descriptor_matches_an_independent_per_window_computation():
    scan = reference_point_scan()
    feats, index = point_descriptor_per_point(scan)
    assert feats.dtype == np.float32 and index.dtype == np.int64
    np.testing.assert_array_equal(index, np.flatnonzero(scan.valid_hw))
    ref = point_descriptor_reference(scan)
    four = np.isin(index, [30 * S + 30, 30 * S + 31, 31 * S + 30, 31 * S + 32])
    three = np.isin(index, [30 * S + 180, 31 * S + 181, 30 * S + 182])
    assert np.all(np.abs(ref[four][:, :2]) > 1e-3) and np.all(ref[three] == 0.0)
    tip = np.flatnonzero(index == 100 * S + 149)[0]
    assert abs(ref[tip, 2]) > 0.01  # spread over exactly MIN_NEIGHBOURS normals
    assert np.percentile(np.abs(ref[:, 2::3]), 90) > 0.05  # the spread columns are not all ~0
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-4)
    grid = ff.point_descriptor(scan)
    np.testing.assert_array_equal(grid, project_to_grid(feats, index, image_size=224, grid=56))
    assert grid.dtype == np.float32 and grid.shape == (56, 56, FREE_POINT_DIM)


def test_point_spacing_takes_both_axes_and_only_valid_pairs():
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    xyz = np.stack([xx * 0.0004, yy * 0.001, np.full((S, S), 0.5)], -1).astype(np.float32)  # 0.4 mm x 1 mm
    tall = (yy >= 5) & (yy < 25) & (xx >= 5) & (xx < 15)  # 190 vertical pairs, 180 horizontal
    wide = (yy >= 5) & (yy < 15) & (xx >= 5) & (xx < 25)  # 190 horizontal, 180 vertical
    line = (yy == 50) & (xx >= 40) & (xx < 60)  # no vertical pair at all
    for mask, expected in ((tall, 0.001), (wide, 0.0004), (line, 0.0004)):
        cloud = np.where(mask[..., None], xyz, 0.0).astype(np.float32)
        assert point_spacing_m(cloud, mask) == pytest.approx(expected, rel=1e-5)
        assert point_spacing_m(cloud, mask) == pytest.approx(spacing_reference(cloud, mask), rel=1e-6)
    single = (yy == 7) & (xx == 9)
    assert point_spacing_m(np.where(single[..., None], xyz, 0.0), single) == 0.0


def test_window_sums_equal_explicit_slices_and_the_eigen_fallbacks():
    rng = np.random.default_rng(8)
    stack = rng.normal(size=(20, 30, 2))
    table = integral_image(stack)
    assert table.shape == (21, 31, 2) and table.dtype == np.float64
    rows, cols = np.array([0, 5, 19, 10, 3]), np.array([0, 29, 7, 15, 1])
    for r in (1, 2, 4):
        expected = [
            stack[max(y - r, 0) : y + r + 1, max(x - r, 0) : x + r + 1].sum(axis=(0, 1))
            for y, x in zip(rows, cols, strict=True)
        ]
        np.testing.assert_allclose(window_sums(table, rows, cols, r), expected, rtol=1e-12, atol=1e-12)
    # Diagonal covariances: the smallest axis is found whichever pair of rows of (C - l I) is non-zero.
    cov = np.array([np.diag(d) for d in ((1.0, 2.0, 3.0), (2.0, 1.0, 3.0), (2.0, 3.0, 1.0), (1.0, 1.0, 1.0))])
    value, vector = smallest_eigenpairs(cov)
    np.testing.assert_allclose(value, [1.0, 1.0, 1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(np.abs(vector[:3]), np.eye(3), atol=1e-12)
    np.testing.assert_array_equal(vector[3], [0.0, 0.0, 1.0])  # isotropic: the documented z fallback


def test_bad_point_inputs_and_empty_scans():
    scan = textured_scan()
    bad = PreparedScan(
        scan.rgb_chw, scan.rgb_hwc_u8, scan.xyz_hwc_m, scan.valid_hw[:, :100], source="s7.tiff"
    )
    with pytest.raises(ShapeError, match=r"^s7\.tiff: xyz must be \(224,224,3\) with a matching mask$"):
        point_descriptor_per_point(bad)
    empty = make_scan(np.zeros((S, S)), np.zeros((S, S), bool))
    feats, index = point_descriptor_per_point(empty)
    assert feats.shape == (0, 3 * N_SCALES) and feats.dtype == np.float32 and index.dtype == np.int64


def test_descriptor_dims_are_checked_against_the_config(monkeypatch: pytest.MonkeyPatch):
    scan = textured_scan()
    scan = PreparedScan(scan.rgb_chw, scan.rgb_hwc_u8, scan.xyz_hwc_m, scan.valid_hw, source="s9.png")
    monkeypatch.setattr(ff, "FREE_RGB_DIM", 34)
    with pytest.raises(ShapeError, match=r"^s9\.png: rgb descriptor has 35 dims, config says 34$"):
        ff.rgb_descriptor(scan)
    monkeypatch.setattr(ff, "FREE_POINT_DIM", 8)
    with pytest.raises(ShapeError, match=r"^s9\.png: point descriptor has 9 dims, config says 8$"):
        ff.point_descriptor(scan)


def test_rgb_helpers_keep_their_documented_dtypes_and_the_count_cache_is_only_a_cache():
    scan = reference_rgb_scan()
    weight = statistics_mask(scan.valid_hw).astype(np.float32)
    lab = free_rgb.srgb_to_lab(scan.rgb_hwc_u8)
    assert free_rgb.normalized_smooth(lab, weight, 1.0).dtype == np.float32
    blocks = free_rgb.block_sums(lab * weight[..., None])
    assert blocks.dtype == np.float64 and blocks.shape == (56, 56, 3)
    np.testing.assert_allclose(
        blocks[3, 5], (lab * weight[..., None])[12:16, 20:24].sum(axis=(0, 1)), rtol=1e-6
    )
    cached = free_rgb.pooled_moments(blocks, weight, free_rgb.NEAR_WINDOW, 3, free_rgb.block_counts(weight))
    fresh = free_rgb.pooled_moments(blocks, weight, free_rgb.NEAR_WINDOW, 3)
    for a, b in zip(cached, fresh, strict=True):
        np.testing.assert_array_equal(a, b)


def test_rgb_input_checks_name_the_scan():
    scan = textured_scan()
    floats = scan.rgb_hwc_u8.astype(np.float32)  # right shape, wrong dtype
    narrow_mask = scan.valid_hw[:, :100]  # right image, wrong mask
    for rgb, valid in ((floats, scan.valid_hw), (scan.rgb_hwc_u8, narrow_mask)):
        bad = PreparedScan(scan.rgb_chw, rgb, scan.xyz_hwc_m, valid, source="s3.png")
        with pytest.raises(
            ShapeError, match=r"^s3\.png: rgb must be \(224,224,3\) uint8 with a matching mask$"
        ):
            ff.rgb_descriptor(bad)


def test_statistics_mask_treats_a_3px_hole_as_background():
    square = np.zeros((S, S), bool)
    square[60:160, 60:160] = True
    square[100:103, 100:103] = False  # larger than one 3x3 closing can fill
    # The closing (4-connected) gives back only the hole's corners, so the hole stays background as a plus
    # shape; everything within BORDER_PX 4-connected steps of the background is rim, around the hole too.
    closed = square.copy()
    closed[[100, 100, 102, 102], [100, 102, 100, 102]] = True
    expected = (ndimage.distance_transform_cdt(closed, metric="taxicab") > BORDER_PX) & square
    assert not expected[101, 102 + BORDER_PX] and expected[101, 103 + BORDER_PX]
    np.testing.assert_array_equal(statistics_mask(square), expected)
