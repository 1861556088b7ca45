"""core.features: what each backbone is fed, how its outputs land on the patch grids, and the free path.

The networks are small numpy Runners (the `core.runner.Runner` protocol) that record their inputs and
return features computed from them, so the wiring (shapes, grouping, alignment, row-major grids) is
checked against the real core functions it composes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from core.config import get_preset
from core.errors import ConfigError, EmptyCloudError
from core.features import (
    FeatureRunners,
    extract_features,
    patch_has_object,
    point_features,
    rgb_features,
    site_network_input,
)
from core.free_features import point_descriptor, rgb_descriptor
from core.free_rgb import BORDER_PX
from core.grouping import group_points
from core.pfa import align_point_features
from core.runner import Runner
from core.scan import PreparedScan

S = 224
# The m3dm preset with a small point grouping: the wiring is the same, the FPS is ~100x cheaper.
NET = replace(get_preset("m3dm"), num_groups=32, group_size=8)
FREE = get_preset("m3dm-free")
SITE = get_preset("m3dm-site")


class TokenRunner:
    """A ViT stand-in: token t of (grid x grid) is the mean of its 8x8 pixel patch, plus t itself."""

    backend = "numpy"

    def __init__(self) -> None:
        self.calls: list[dict[str, np.ndarray]] = []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(inputs)
        image = inputs["image"]
        b, c, h, w = image.shape
        patches = image.reshape(b, c, h // 8, 8, w // 8, 8).mean(axis=(3, 5))  # (b, c, 28, 28)
        tokens = patches.transpose(0, 2, 3, 1).reshape(b, -1, c)
        index = np.arange(tokens.shape[1], dtype=np.float64)[None, :, None]
        return {"tokens": np.concatenate([tokens, np.broadcast_to(index, (b, tokens.shape[1], 1))], -1)}


class GroupRunner:
    """A Point-MAE stand-in: each group's feature is its centre and its mean neighbour offset."""

    backend = "numpy"

    def __init__(self) -> None:
        self.calls: list[dict[str, np.ndarray]] = []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(inputs)
        feats = np.concatenate([inputs["centers"], inputs["neighborhood"].mean(axis=2)], -1)
        return {"group_features": feats.astype(np.float32)}


def _scan(valid_hw: np.ndarray | None = None, source: str = "cam0/17") -> PreparedScan:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:S, 0:S]
    if valid_hw is None:
        valid_hw = (yy - 112) ** 2 + (xx - 100) ** 2 < 60**2
    xyz = np.stack([xx * 4e-4, yy * 4e-4, 0.5 + 1e-3 * np.sin(xx / 9.0)], -1)
    xyz = np.where(valid_hw[..., None], xyz, 0.0).astype(np.float32)
    rgb = np.where(valid_hw[..., None], rng.integers(0, 256, (S, S, 3)), 0).astype(np.uint8)
    rgb_chw = rng.standard_normal((3, S, S)).astype(np.float32)
    return PreparedScan(rgb_chw, rgb, xyz, valid_hw, source=source)


def test_the_stand_ins_are_runners() -> None:
    assert isinstance(TokenRunner(), Runner) and isinstance(GroupRunner(), Runner)


def test_rgb_tokens_are_laid_out_row_major_on_the_rgb_grid() -> None:
    scan, runner = _scan(), TokenRunner()
    feats = rgb_features(scan, NET, runner)
    (call,) = runner.calls
    assert list(call) == ["image"] and call["image"].dtype == np.float32
    np.testing.assert_array_equal(call["image"], scan.rgb_chw[None])
    assert feats.shape == (28, 28, 4) and feats.dtype == np.float32 and feats.flags.c_contiguous
    np.testing.assert_array_equal(
        feats[..., 3], np.arange(28 * 28).reshape(28, 28)
    )  # token t -> (t // 28, t % 28)
    patch_mean = scan.rgb_chw[:, 8:16, 16:24].mean(axis=(1, 2))  # grid cell (1, 2)
    np.testing.assert_allclose(feats[1, 2, :3], patch_mean, rtol=1e-5)


def test_point_groups_are_fed_and_aligned_as_the_core_functions_define() -> None:
    scan, runner = _scan(), GroupRunner()
    feats = point_features(scan, NET, runner)
    (call,) = runner.calls
    pixel_index = np.flatnonzero(scan.valid_hw)
    points = scan.xyz_hwc_m.reshape(-1, 3)[pixel_index]
    neighborhood, centers = group_points(points, 32, 8)
    assert sorted(call) == ["centers", "neighborhood"]
    np.testing.assert_array_equal(call["neighborhood"], neighborhood[None])
    np.testing.assert_array_equal(call["centers"], centers[None])
    want = align_point_features(points, pixel_index, centers, runner.run(call)["group_features"][0], S, 56)
    assert feats.shape == (56, 56, 6) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats, want)
    assert (feats[0, 0] == 0).all() and (feats[28, 25] != 0).all()  # background corner, object centre


def test_a_scan_without_points_names_its_source() -> None:
    empty = _scan(np.zeros((S, S), bool))
    with pytest.raises(EmptyCloudError, match="^cam0/17: no valid points to group$"):
        point_features(empty, NET, GroupRunner())
    with pytest.raises(EmptyCloudError, match="^no valid points to group$"):
        point_features(_scan(np.zeros((S, S), bool), source=""), NET, GroupRunner())


def test_network_presets_need_their_runners() -> None:
    with pytest.raises(ConfigError, match="^preset m3dm needs an rgb network runner$"):
        rgb_features(_scan(), NET, None)
    with pytest.raises(ConfigError, match="^preset m3dm needs a point network runner$"):
        point_features(_scan(), NET, None)
    with pytest.raises(ConfigError, match="needs a point network runner"):
        extract_features(_scan(), NET, FeatureRunners(rgb=TokenRunner()))


def test_the_free_preset_uses_the_descriptors_and_no_runner() -> None:
    scan = _scan()
    got = extract_features(scan, FREE, FeatureRunners())
    np.testing.assert_array_equal(got.rgb_hwc, rgb_descriptor(scan))
    np.testing.assert_array_equal(got.point_hwc, point_descriptor(scan))
    np.testing.assert_array_equal(rgb_features(scan, FREE, None), rgb_descriptor(scan))
    np.testing.assert_array_equal(point_features(scan, FREE, None), point_descriptor(scan))


def test_both_modalities_by_default_and_an_empty_point_grid_for_rgb_only() -> None:
    scan = _scan()
    both = extract_features(scan, NET, FeatureRunners(rgb=TokenRunner(), point=GroupRunner()))
    assert both.rgb_hwc.shape == (28, 28, 4) and both.point_hwc.shape == (56, 56, 6)
    points = GroupRunner()
    rgb_only = extract_features(scan, NET, FeatureRunners(rgb=TokenRunner(), point=points), ("rgb",))
    np.testing.assert_array_equal(rgb_only.rgb_hwc, both.rgb_hwc)
    assert rgb_only.point_hwc.shape == (56, 56, 0) and rgb_only.point_hwc.dtype == np.float32
    assert points.calls == []  # no point network run for an RGB-only model


def test_patch_has_object_marks_every_patch_with_a_valid_pixel() -> None:
    valid = np.zeros((S, S), bool)
    valid[9, 17] = True  # one pixel in patch (1, 2)
    valid[200:224, 0:8] = True  # patches (25..27, 0)
    got = patch_has_object(valid, 28)
    want = np.zeros((28, 28), bool)
    want[1, 2] = True
    want[25:28, 0] = True
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ConfigError, match="does not tile into a 28x28 grid"):
        patch_has_object(np.ones((S, S + 8), bool), 28)
    with pytest.raises(ConfigError, match="does not tile"):
        patch_has_object(np.ones((100, 100), bool), 28)


def test_the_site_input_removes_the_interior_mean_colour_and_fills_the_rest_from_the_interior() -> None:
    scan = _scan()
    image = site_network_input(scan)
    valid = scan.valid_hw
    interior = ndimage.binary_erosion(valid, iterations=BORDER_PX)
    assert 0 < interior.sum() < valid.sum()
    mean_c = scan.rgb_chw[:, interior].mean(axis=1)
    np.testing.assert_allclose(image[:, interior], scan.rgb_chw[:, interior] - mean_c[:, None], atol=1e-5)
    np.testing.assert_allclose(image[:, interior].mean(axis=1), 0.0, atol=1e-5)
    # Background and rim copy their nearest interior pixel: the left-most background pixel of the middle
    # row takes the colour of the disc's left-most interior pixel on that row (the disc is centred at x 100).
    row = 112
    first = int(np.flatnonzero(interior[row])[0])
    for x in (0, first - 1):
        np.testing.assert_allclose(image[:, row, x], image[:, row, first], atol=1e-6)
    assert not valid[row, 0] and not interior[row, first - 1]
    # A part of another colour (a constant shift on its pixels) gives the same network input everywhere.
    shifted = scan.rgb_chw.copy()
    shifted[:, valid] += np.array([0.7, -0.3, 1.1], np.float32)[:, None]
    np.testing.assert_allclose(site_network_input(replace(scan, rgb_chw=shifted)), image, atol=1e-5)
    # So does another background, which the CNN no longer sees.
    other_bg = np.where(valid, scan.rgb_chw, np.float32(-2.1))
    np.testing.assert_allclose(site_network_input(replace(scan, rgb_chw=other_bg)), image, atol=1e-6)
    # An empty mask leaves the image as it is; the scan itself is never written to.
    empty = _scan(np.zeros((S, S), bool))
    np.testing.assert_array_equal(site_network_input(empty), empty.rgb_chw)
    assert image is not scan.rgb_chw and not np.shares_memory(image, scan.rgb_chw)


def test_speckle_dropouts_and_the_image_frame_are_not_outline_to_the_site_input() -> None:
    """Isolated invalid pixels inside the part are filled from their neighbours without eroding the interior
    around them, and a part that fills the frame (an RGB-only scan) keeps its pixels at the frame."""
    valid = np.ones((S, S), bool)
    speckle = [(60, 60), (120, 90), (150, 170)]
    for y, x in speckle:
        valid[y, x] = False
    scan = _scan(valid)
    image = site_network_input(scan)
    mean_c = scan.rgb_chw[:, valid].mean(axis=1)
    # Every valid pixel, those next to a dropout and those on the frame too, is itself less the mean.
    np.testing.assert_allclose(image[:, valid], scan.rgb_chw[:, valid] - mean_c[:, None], atol=1e-5)
    for y, x in speckle:  # a dropout takes a neighbour's colour, not its own (invalid) one
        neighbours = image[:, y - 1 : y + 2, x - 1 : x + 2].reshape(3, -1)
        assert np.isclose(neighbours, image[:, y, x][:, None], atol=1e-6).all(axis=0).sum() >= 2
        assert not np.allclose(image[:, y, x], scan.rgb_chw[:, y, x] - mean_c, atol=1e-3)


def test_a_part_thinner_than_the_rim_fills_from_all_of_its_pixels() -> None:
    thin = np.zeros((S, S), bool)
    thin[100:103, 20:200] = True  # 3 px: erosion by the rim leaves nothing
    scan = _scan(thin)
    image = site_network_input(scan)
    np.testing.assert_allclose(image[:, thin].mean(axis=1), 0.0, atol=1e-5)
    assert np.isfinite(image).all()
    np.testing.assert_allclose(image[:, 0, 100], image[:, 100, 100], atol=1e-6)


def test_the_site_preset_feeds_that_input_and_zeroes_background_tokens() -> None:
    scan, runner = _scan(), TokenRunner()
    feats = rgb_features(scan, SITE, runner)
    (call,) = runner.calls
    np.testing.assert_array_equal(call["image"], site_network_input(scan)[None])
    on_object = patch_has_object(scan.valid_hw, 28)
    assert 0 < on_object.sum() < 28 * 28
    assert (feats[~on_object] == 0).all()
    np.testing.assert_array_equal(feats[on_object, 3], np.arange(28 * 28).reshape(28, 28)[on_object])
