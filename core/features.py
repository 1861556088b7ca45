"""Scan -> per-patch features on aligned grids (PFA). The one feature path for trainer and station.

Networks run behind `core.runner.Runner` (torch in the trainer, ONNX Runtime / TensorRT on a station);
grouping, interpolation and projection are numpy here so every backend shares them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.config import FeaturePreset
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
    tokens_bpc = runner.run({"image": scan.rgb_chw[None].astype(np.float32, copy=False)})["tokens"]
    grid = preset.rgb_grid
    return np.ascontiguousarray(tokens_bpc[0].reshape(grid, grid, -1), dtype=np.float32)


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
