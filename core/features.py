"""Scan -> per-patch features on aligned grids (PFA). The one feature path for trainer and station.

Networks run behind `core.runner.Runner` (torch in the trainer, ONNX Runtime / TensorRT on a station);
grouping, interpolation and projection are numpy here so every backend shares them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.config import SITE_BACKBONE, FeaturePreset
from core.errors import ConfigError, EmptyCloudError
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
    """(3, S, S) float32: the normalised image with the object's own mean colour taken off its pixels.

    The site CNN is trained on one class's few normals, so a part colour it rarely saw (family A draws a
    colour per part) made every token of that scan far from the bank: a good orange ring scored 19 against 6
    for a cracked grey one. Colour differences inside the part (stains, burns) are kept; the trainer feeds
    its encoder the same input (trainer/site/train.py).
    """
    image = np.array(scan.rgb_chw, dtype=np.float32)
    valid = mask_at_size(scan.valid_hw, image.shape[-1])
    if valid.any():
        image[:, valid] -= image[:, valid].mean(axis=1, keepdims=True)
    return image


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
