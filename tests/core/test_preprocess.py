"""Tests for core.preprocess: resizing, padding, normalisation and the whole prepare_scan path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from core.errors import EmptyCloudError, InvalidCloudError, ShapeError
from core.plane import fit_border_plane
from core.preprocess import (
    normalise_rgb,
    pad_to_square,
    prepare_scan,
    resize_nearest,
    resize_rgb,
    sanitize_xyz,
)
from core.scan import RawScan


def scene(h: int, w: int, seed: int = 0) -> RawScan:
    """A tilted plane (z = 0.4 + 0.1 x + 0.05 y) with a 15 mm box in the middle, σ = 0.3 mm noise."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:h, 0:w]
    x, y = (u - w / 2) * 0.0004, (v - h / 2) * 0.0004
    z = 0.4 + 0.1 * x + 0.05 * y + rng.normal(0, 0.0003, (h, w))
    box = (np.abs(u - w / 2) < w / 6) & (np.abs(v - h / 2) < h / 6)
    z[box] -= 0.015
    xyz = np.stack([x, y, z], -1).astype(np.float32)
    xyz[rng.random((h, w)) < 0.01] = 0
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    gt = np.where(box & (u < w / 2), 253, 0).astype(np.uint8)
    return RawScan(rgb, xyz, gt, source=f"synthetic-{h}x{w}")


@pytest.mark.parametrize("in_size", [800, 600, 500, 448, 400, 350, 300, 224, 112, 100, 37])
@pytest.mark.parametrize("out_size", [224, 56, 392])
def test_resize_nearest_matches_torch_legacy_nearest(in_size, out_size):
    arr = np.arange(in_size * (in_size + 13) * 3, dtype=np.float32).reshape(in_size, in_size + 13, 3)
    ours = resize_nearest(arr, out_size)
    chw = torch.from_numpy(arr).permute(2, 0, 1)[None]
    ref = F.interpolate(chw, size=(out_size, out_size), mode="nearest")
    assert np.array_equal(ours, ref[0].permute(1, 2, 0).numpy())


def test_resize_nearest_is_not_nearest_exact():
    arr = np.arange(800, dtype=np.float32).reshape(800, 1)[:, :, None].repeat(800, 1)
    exact = F.interpolate(torch.from_numpy(arr[..., 0])[None, None], size=(224, 224), mode="nearest-exact")
    assert not np.array_equal(resize_nearest(arr, 224)[..., 0], exact[0, 0].numpy())


@pytest.mark.parametrize(
    ("hw", "side"),
    [((600, 800), 800), ((350, 420), 500), ((800, 600), 800), ((224, 224), 300), ((400, 400), 400)],
)
def test_pad_to_square_shapes_and_centring(hw, side):
    h, w = hw
    arr = np.ones((h, w, 3), np.float32)
    out = pad_to_square(arr, 100)
    assert out.shape == (side, side, 3)
    top, left = (side - h) // 2, (side - w) // 2
    assert out[top : top + h, left : left + w].all()
    assert out.sum() == arr.sum()  # only zeros were added
    gt = pad_to_square(np.ones((h, w), np.uint8), 100)
    assert gt.shape == (side, side) and np.array_equal(gt, out[..., 0].astype(np.uint8))


def test_pad_to_square_puts_the_odd_pixel_at_the_end():
    out = pad_to_square(np.ones((351, 400), np.uint8), 100)
    rows = np.flatnonzero(out.any(axis=1))
    assert (rows[0], 400 - 1 - rows[-1]) == (24, 25)


def test_normalise_rgb_matches_totensor_normalize():
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    ref = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
    ref = (ref - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    ours = normalise_rgb(rgb, IMAGENET_MEAN, IMAGENET_STD)
    assert ours.dtype == np.float32 and ours.shape == (3, 16, 16)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=1e-6)


def test_resize_rgb_is_antialiased_bicubic():
    stripes = np.zeros((800, 800, 3), np.uint8)
    stripes[:, ::2] = 255  # 1-px stripes: antialiasing averages them, point sampling would not
    out = resize_rgb(stripes, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert 110 <= out[50:-50, 50:-50].mean() <= 145 and out[50:-50, 50:-50].std() < 20


def test_sanitize_xyz_zeros_nan_and_inf_points():
    xyz = np.full((4, 5, 3), 0.5, np.float32)
    xyz[0, 0, 1] = np.nan
    xyz[1, 2, 0] = np.inf
    xyz[3, 4, 2] = -np.inf
    out = sanitize_xyz(xyz)
    bad = [(0, 0), (1, 2), (3, 4)]
    assert all((out[p] == 0).all() for p in bad) and np.isfinite(out).all()
    assert (out != 0).all(axis=-1).sum() == 20 - 3


@pytest.mark.parametrize("fill", [0.0, np.nan, np.inf])
def test_sanitize_xyz_rejects_clouds_without_a_valid_point(fill):
    with pytest.raises(InvalidCloudError, match="src-1"):
        sanitize_xyz(np.full((8, 8, 3), fill, np.float32), "src-1")


def test_prepare_scan_shapes_values_and_removal():
    raw = scene(300, 400)
    cfg = PreprocessConfig()
    out = prepare_scan(raw, cfg)
    assert out.rgb_chw.shape == (3, 224, 224) and out.rgb_chw.dtype == np.float32
    assert out.rgb_hwc_u8.shape == (224, 224, 3) and out.rgb_hwc_u8.dtype == np.uint8
    assert out.xyz_hwc_m.shape == (224, 224, 3) and out.xyz_hwc_m.dtype == np.float32
    assert out.valid_hw.dtype == bool and np.array_equal(out.valid_hw, (out.xyz_hwc_m != 0).all(-1))
    assert out.gt_ids_hw.dtype == np.uint8 and set(np.unique(out.gt_ids_hw)) == {0, 253}
    assert out.source == raw.source
    # Only the box survives: 1/9 of a 400x300 frame padded to 400x400 -> ~1/12 of the grid.
    assert 0.06 < out.valid_hw.mean() < 0.1
    assert np.all(out.xyz_hwc_m[out.valid_hw][:, 2] < 0.393)  # box top <= 0.389 m, plane >= 0.396 m
    # gt and xyz stay aligned through padding and resizing: defect pixels lie on the box. Not all of them:
    # the mask is PIL-nearest resized (pixel centres) and xyz legacy-nearest (pixel corners), as in the
    # original, so the mask sits up to half a source pixel off the cloud at the box edges.
    assert out.valid_hw[out.gt_ids_hw > 0].mean() > 0.93


def test_prepare_scan_rgb_input_size_and_largest_cluster():
    cfg = PreprocessConfig(rgb_input_size=392, keep_largest_cluster=True)
    out = prepare_scan(scene(200, 200), cfg)
    assert out.rgb_chw.shape == (3, 392, 392) and out.rgb_hwc_u8.shape == (224, 224, 3)
    assert out.valid_hw.any()


def test_prepare_scan_is_bitwise_deterministic():
    raw = scene(150, 190, seed=3)
    cfg = PreprocessConfig(keep_largest_cluster=True)
    first, second = prepare_scan(raw, cfg), prepare_scan(raw, cfg)
    for name in ("rgb_chw", "rgb_hwc_u8", "xyz_hwc_m", "valid_hw", "gt_ids_hw"):
        assert np.array_equal(getattr(first, name), getattr(second, name)), name


def test_prepare_scan_rgb_only_marks_every_pixel_valid():
    raw = scene(120, 160)
    out = prepare_scan(RawScan(raw.rgb_hwc_u8, None, raw.gt_ids_hw, "rgb-only"), PreprocessConfig())
    assert out.valid_hw.all() and not out.xyz_hwc_m.any()
    assert out.rgb_hwc_u8.any() and out.gt_ids_hw.shape == (224, 224)


def test_prepare_scan_accepts_scans_already_plane_removed_offline():
    """Data preprocessed by the official script has zero backgrounds; it must pass through, not crash."""
    raw = scene(300, 400)
    once = prepare_scan(raw, PreprocessConfig())
    v, u = np.mgrid[0:300, 0:400]
    box = (np.abs(u - 200) < 400 / 6) & (np.abs(v - 150) < 300 / 6)  # the object of scene()
    object_only = np.where(box[..., None], raw.xyz_hwc_m, 0).astype(np.float32)
    offline = RawScan(raw.rgb_hwc_u8, object_only, raw.gt_ids_hw, source="offline")
    with pytest.raises(EmptyCloudError, match="only 0 valid points in the 10-px border strips"):
        fit_border_plane(object_only, PreprocessConfig())  # no border points: the original crashes here
    again = prepare_scan(offline, PreprocessConfig())
    # The same object survives: online plane removal only ever removed plane points around it.
    assert (again.valid_hw & once.valid_hw).sum() / once.valid_hw.sum() > 0.98
    assert again.valid_hw.sum() <= 1.02 * once.valid_hw.sum()


def test_prepare_scan_only_a_plane_is_empty():
    raw = scene(200, 200)
    xyz = raw.xyz_hwc_m.copy()
    xyz[..., 2] = 0.4 + 0.1 * xyz[..., 0] + 0.05 * xyz[..., 1]
    xyz[(xyz == 0).any(-1)] = 0
    with pytest.raises(EmptyCloudError, match="plane-only.*after plane removal"):
        prepare_scan(RawScan(raw.rgb_hwc_u8, xyz, None, "plane-only"), PreprocessConfig())


def test_prepare_scan_sanitises_nan_and_accepts_float64():
    raw = scene(200, 200)
    xyz = raw.xyz_hwc_m.astype(np.float64)
    xyz[100, 100] = np.nan
    out = prepare_scan(RawScan(raw.rgb_hwc_u8, xyz, None, "nan"), PreprocessConfig())
    assert np.isfinite(out.xyz_hwc_m).all() and out.xyz_hwc_m.dtype == np.float32


@pytest.mark.parametrize(
    ("rgb", "xyz", "gt"),
    [
        (np.zeros((10, 10, 3), np.float32), None, None),  # rgb not uint8
        (np.zeros((10, 10), np.uint8), None, None),  # rgb not 3-channel
        (np.zeros((10, 10, 3), np.uint8), np.ones((10, 10, 4), np.float32), None),
        (np.zeros((10, 10, 3), np.uint8), np.ones((10, 10, 3), np.int32), None),
        (np.zeros((10, 10, 3), np.uint8), np.ones((10, 12, 3), np.float32), None),
        (np.zeros((10, 10, 3), np.uint8), None, np.zeros((10, 11), np.uint8)),
    ],
)
def test_prepare_scan_rejects_bad_shapes(rgb, xyz, gt):
    with pytest.raises(ShapeError, match="bad-src"):
        prepare_scan(RawScan(rgb, xyz, gt, "bad-src"), PreprocessConfig())


def test_prepare_scan_rejects_all_zero_cloud():
    raw = scene(100, 100)
    with pytest.raises(InvalidCloudError, match="point cloud has no valid"):
        prepare_scan(RawScan(raw.rgb_hwc_u8, np.zeros_like(raw.xyz_hwc_m), None, "z"), PreprocessConfig())


def test_masks_are_resized_with_pil_nearest_as_the_original_reads_them() -> None:
    from PIL import Image

    from core.preprocess import resize_mask, resize_nearest

    rng = np.random.default_rng(0)
    mask = np.zeros((800, 800), np.uint8)
    for _ in range(6):
        y, x, r = rng.integers(50, 750), rng.integers(50, 750), rng.integers(3, 12)
        mask[y - r : y + r, x - r : x + r] = 255
    expected = np.array(Image.fromarray(mask).resize((224, 224), Image.Resampling.NEAREST))
    assert np.array_equal(resize_mask(mask, 224), expected)
    # ... which is not what legacy nearest gives: the difference this fix is about.
    assert (resize_nearest(mask, 224) != expected).sum() > 0


BAD_SHAPES = [
    (
        np.zeros((10, 10, 3), np.float32),
        None,
        None,
        r"rgb must be \(H, W, 3\) uint8, got \(10, 10, 3\) float32",
    ),
    (np.zeros((10, 10), np.uint8), None, None, r"rgb must be \(H, W, 3\) uint8, got \(10, 10\) uint8"),
    (
        np.zeros((10, 10, 3), np.uint8),
        np.ones((10, 10, 4), np.float32),
        None,
        r"xyz must be \(H, W, 3\) float32 metres, got \(10, 10, 4\) float32",
    ),
    (
        np.zeros((10, 10, 3), np.uint8),
        np.ones((10, 10, 3), np.int32),
        None,
        r"xyz must be \(H, W, 3\) float32 metres, got \(10, 10, 3\) int32",
    ),
    (
        np.zeros((10, 10, 3), np.uint8),
        np.ones((10, 12, 3), np.float32),
        None,
        r"rgb is \(10, 10\) but xyz is \(10, 12\)",
    ),
    (
        np.zeros((10, 10, 3), np.uint8),
        None,
        np.zeros((10, 11), np.uint8),
        r"gt must be \(10, 10\) uint8, got \(10, 11\) uint8",
    ),
    (
        np.zeros((10, 10, 3), np.uint8),
        None,
        np.zeros((10, 10), np.int16),
        r"gt must be \(10, 10\) uint8, got \(10, 10\) int16",
    ),
]


@pytest.mark.parametrize(("rgb", "xyz", "gt", "message"), BAD_SHAPES)
def test_each_bad_shape_is_named_with_its_source(rgb, xyz, gt, message) -> None:
    with pytest.raises(ShapeError, match=f"^bad-src: {message}$"):
        prepare_scan(RawScan(rgb, xyz, gt, "bad-src"), PreprocessConfig())


def test_a_cloud_without_points_names_its_source_only_when_it_has_one() -> None:
    with pytest.raises(
        InvalidCloudError, match=r"^point cloud has no valid \(finite, non-zero\) point$"
    ) as caught:
        sanitize_xyz(np.zeros((4, 4, 3), np.float32))
    assert caught.value.path is None
    rgb = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(
        InvalidCloudError, match=r"^cam-3: point cloud has no valid \(finite, non-zero\) point$"
    ):
        prepare_scan(
            RawScan(rgb, np.full((20, 20, 3), np.nan, np.float32), None, "cam-3"), PreprocessConfig()
        )


def test_each_empty_stage_is_named() -> None:
    raw = scene(200, 200)
    xyz = raw.xyz_hwc_m.copy()
    xyz[..., 2] = 0.4 + 0.1 * xyz[..., 0] + 0.05 * xyz[..., 1]
    xyz[(raw.xyz_hwc_m == 0).any(-1)] = 0
    with pytest.raises(EmptyCloudError, match="^plane-only: no valid point left after plane removal$"):
        prepare_scan(RawScan(raw.rgb_hwc_u8, xyz, None, "plane-only"), PreprocessConfig())
    # One point at (1, 1) of an 800-px frame: no border plane to fit, and legacy nearest never samples row 1.
    one = np.zeros((800, 800, 3), np.float32)
    one[1, 1] = (0.1, 0.1, 0.5)
    rgb = np.zeros((800, 800, 3), np.uint8)
    with pytest.raises(EmptyCloudError, match="^one-point: no valid point left after resizing to 224x224$"):
        prepare_scan(RawScan(rgb, one, None, "one-point"), PreprocessConfig())
    # Scattered single points: no cluster reaches cluster_min_points, so clustering leaves nothing.
    sparse = np.zeros((200, 200, 3), np.float32)
    sparse[20:180:20, 20:180:20] = (0.1, 0.1, 0.5)
    cfg = PreprocessConfig(keep_largest_cluster=True)
    with pytest.raises(
        EmptyCloudError, match="^sparse: no valid point left after keeping the largest cluster$"
    ):
        prepare_scan(RawScan(np.zeros((200, 200, 3), np.uint8), sparse, None, "sparse"), cfg)


def test_a_scan_without_border_plane_is_logged_and_used_as_is(caplog: pytest.LogCaptureFixture) -> None:
    raw = scene(200, 200)
    xyz = np.zeros_like(raw.xyz_hwc_m)
    xyz[60:140, 60:140] = raw.xyz_hwc_m[60:140, 60:140]
    with caplog.at_level("DEBUG", logger="m3dm.preprocess"):
        prepare_scan(RawScan(raw.rgb_hwc_u8, xyz, None, "offline-7"), PreprocessConfig())
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "m3dm.preprocess",
            "DEBUG",
            "offline-7: no support plane on the borders; treating the scan as already plane-removed",
        )
    ]


def test_the_plane_is_fitted_from_exactly_ransac_n_border_points() -> None:
    # A noise-free plane with a box on it, its border strips empty but for 50 points (none in a corner
    # block, which border_points counts twice): exactly ransac_n=50 points are enough for the plane fit.
    v, u = np.mgrid[0:200, 0:200]
    x, y = (u - 100) * 0.0004, (v - 100) * 0.0004
    box = (np.abs(u - 100) < 33) & (np.abs(v - 100) < 33)
    xyz = np.stack([x, y, 0.4 + 0.1 * x + 0.05 * y - 0.015 * box], -1).astype(np.float32)
    border = np.zeros((200, 200), bool)
    border[:10], border[-10:], border[:, :10], border[:, -10:] = True, True, True, True
    keep = np.zeros((200, 200), bool)
    keep[[2, 7], 12:187:7] = True  # 2 rows x 25 columns
    xyz[border & ~keep] = 0
    rgb = np.zeros((200, 200, 3), np.uint8)
    fitted = prepare_scan(RawScan(rgb, xyz, None, "edge"), PreprocessConfig(ransac_n=50))
    assert 0.08 < fitted.valid_hw.mean() < 0.14  # the plane is gone, the box (1/9 of the frame) stays
    as_is = prepare_scan(RawScan(rgb, xyz, None, "edge"), PreprocessConfig(ransac_n=51))
    assert as_is.valid_hw.mean() > 0.6  # one point short: the scan is taken as already plane-removed


def test_keep_largest_cluster_drops_a_separate_blob_only_when_asked() -> None:
    raw = scene(200, 200)
    xyz = raw.xyz_hwc_m.copy()
    xyz[20:30, 20:30, 2] -= 0.03  # a 10x10 blob 3 cm above the plane, far from the box
    kept = prepare_scan(RawScan(raw.rgb_hwc_u8, xyz, None, "blob"), PreprocessConfig())
    dropped = prepare_scan(
        RawScan(raw.rgb_hwc_u8, xyz, None, "blob"), PreprocessConfig(keep_largest_cluster=True)
    )
    blob = kept.valid_hw.copy()
    blob[40:, :] = False  # the blob maps to rows/cols ~22-34 of the 224 grid; the box lies below row 70
    assert blob.sum() > 50 and not (dropped.valid_hw & blob).any()
    assert dropped.valid_hw.sum() > 0.9 * (kept.valid_hw.sum() - blob.sum())


def test_rgb_only_scans_get_float32_zero_points_and_a_bool_mask_and_skip_clustering() -> None:
    raw = scene(120, 160)
    cfg = PreprocessConfig(keep_largest_cluster=True)
    out = prepare_scan(RawScan(raw.rgb_hwc_u8, None, raw.gt_ids_hw, "rgb-only"), cfg)
    assert out.xyz_hwc_m.shape == (224, 224, 3) and out.xyz_hwc_m.dtype == np.float32
    assert out.valid_hw.shape == (224, 224) and out.valid_hw.dtype == bool and out.valid_hw.all()
