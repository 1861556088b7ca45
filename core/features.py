"""Scan -> per-patch features on aligned grids (PFA). The one feature path for trainer and station.

Networks run behind `core.runner.Runner` (torch in the trainer, ONNX Runtime / TensorRT on a station);
grouping, interpolation and projection are numpy here so every backend shares them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from core.config import SITE_BACKBONE, FeaturePreset
from core.errors import ConfigError, EmptyCloudError
from core.free_rgb import statistics_mask
from core.scan import PatchFeatures, PreparedScan


@dataclass(frozen=True)
class FeatureRunners:
    """The networks a preset needs; None where the preset is weight-free."""

    rgb: object | None = None  # core.runner.Runner
    point: object | None = None  # core.runner.Runner


def rgb_features(scan: PreparedScan, preset: FeaturePreset, runner: object | None) -> np.ndarray:
    """(rgb_grid, rgb_grid, C_rgb) float32 patch features."""
    if preset.rgb_backbone == "free":
        from core.free_features import rgb_descriptor

        return rgb_descriptor(scan)
    if runner is None:
        raise ConfigError(f"preset {preset.name} needs an rgb network runner")
    site = preset.rgb_backbone == SITE_BACKBONE
    image_chw = site_network_input(scan) if site else scan.rgb_chw
    tokens_bpc = runner.run({"image": image_chw[None].astype(np.float32, copy=False)})["tokens"]
    grid = preset.rgb_grid
    feats_hwc = np.ascontiguousarray(tokens_bpc[0].reshape(grid, grid, -1), dtype=np.float32)
    if site:
        # The site CNN's receptive field reaches into the removed background, so its tokens there vary with
        # the object's pose and outline: on ring (a hole in the middle) the image score of good scans sat in
        # the hole and rgb I-AUROC fell below chance (0.33). Like the weight-free descriptor, a token whose
        # patch holds no object pixel is exactly 0, which the banks score as background.
        feats_hwc[~patch_has_object(scan.valid_hw, grid)] = 0.0
    return feats_hwc


def site_network_input(scan: PreparedScan) -> np.ndarray:
    """(3, S, S) float32: each pixel is its nearest pixel of the object's interior (`statistics_mask`: the
    interior the weight-free statistics use; interior pixels are themselves) less the interior's mean colour.

    Mean colour: the site CNN is trained on one class's few normals, so a part colour it rarely saw (family
    A draws a colour per part) made every token of that scan far from the bank: a good orange ring scored
    19 against 6 for a cracked grey one. Colour differences inside the part (stains, burns) are kept.
    Background fill: with the removed background left black, the silhouette was the strongest edge the CNN
    saw and it moves with every pose; the rgb maxima of good scans sat 1-2 px from it. Filling outwards
    from the interior (the rim too: its antialiased pixels mix object and background) leaves the CNN no
    outline to respond to: rgb I-AUROC 0.52 -> 0.66 on family A validation defects (BENCHMARKS.md, "m3dm-site:
    background fill"). The trainer feeds its encoder the same input (trainer/site/train.py).
    """
    image = np.asarray(scan.rgb_chw, dtype=np.float32)
    size = image.shape[-1]
    valid = mask_at_size(scan.valid_hw, size)
    if not valid.any():
        return image.copy()
    # The weight-free statistics' interior: the 2 px antialiased rim left out, speckle dropouts and the image
    # frame not counted as outline, a part thinner than the rim kept whole. Changing it changes what the
    # site CNN saw in training: bump SITE_BACKBONE's input version with it.
    interior = statistics_mask(valid)
    pixels_cp = image.reshape(3, -1)
    weight_p = interior.reshape(-1).astype(np.float32)
    mean_c = (pixels_cp @ weight_p) / weight_p.sum()  # a BLAS matvec, ~4x a boolean gather
    # Every output pixel is its nearest interior pixel (itself when interior), less the mean colour.
    near_p = ndimage.distance_transform_edt(~interior, return_distances=False, return_indices=True)
    near_flat_p = (near_p[0] * size + near_p[1]).reshape(-1)
    filled_cp = np.take(pixels_cp, near_flat_p, axis=1)
    filled_cp -= mean_c[:, None]
    return filled_cp.reshape(3, size, size)


def mask_at_size(valid_hw: np.ndarray, size: int) -> np.ndarray:
    """(H, H) bool mask -> (size, size) by nearest index (the rgb input may be 392 px, the mask 224)."""
    if valid_hw.shape[0] == size:
        return valid_hw
    idx = (np.arange(size) * valid_hw.shape[0]) // size
    return valid_hw[np.ix_(idx, idx)]


def patch_has_object(valid_hw: np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid) bool: that patch of the (S, S) mask holds a valid pixel (S a multiple of grid)."""
    size = valid_hw.shape[0]
    if valid_hw.shape != (size, size) or size % grid:
        raise ConfigError(f"valid mask {valid_hw.shape} does not tile into a {grid}x{grid} grid")
    step = size // grid
    return valid_hw.reshape(grid, step, grid, step).any(axis=(1, 3))


def point_features(scan: PreparedScan, preset: FeaturePreset, runner: object | None) -> np.ndarray:
    """(point_grid, point_grid, C_point) float32; background patches are exact zeros."""
    if preset.point_backbone == "free":
        from core.free_features import point_descriptor

        return point_descriptor(scan)
    if runner is None:
        raise ConfigError(f"preset {preset.name} needs a point network runner")
    from core.grouping import group_points
    from core.pfa import align_point_features

    pixel_index_n = np.flatnonzero(scan.valid_hw.reshape(-1))
    if pixel_index_n.size == 0:
        raise EmptyCloudError("no valid points to group", scan.source or None)
    points_n3 = scan.xyz_hwc_m.reshape(-1, 3)[pixel_index_n]
    neighborhood_gk3, centers_g3 = group_points(points_n3, preset.num_groups, preset.group_size)
    outputs = runner.run({"neighborhood": neighborhood_gk3[None], "centers": centers_g3[None]})
    group_feats_gc = outputs["group_features"][0]
    size = scan.valid_hw.shape[0]
    return align_point_features(
        points_n3, pixel_index_n, centers_g3, group_feats_gc, image_size=size, grid=preset.point_grid
    )


def extract_features(
    scan: PreparedScan,
    preset: FeaturePreset,
    runners: FeatureRunners,
    modalities: tuple[str, ...] = ("rgb", "point"),
) -> PatchFeatures:
    """Both modalities for one prepared scan, or ("rgb",) alone for an RGB-only model: its point grid is
    then (point_grid, point_grid, 0), since there are no points to describe and no point bank to query."""
    if "point" not in modalities:
        empty = np.zeros((preset.point_grid, preset.point_grid, 0), np.float32)
        return PatchFeatures(rgb_hwc=rgb_features(scan, preset, runners.rgb), point_hwc=empty)
    return PatchFeatures(
        rgb_hwc=rgb_features(scan, preset, runners.rgb),
        point_hwc=point_features(scan, preset, runners.point),
    )
