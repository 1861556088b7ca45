"""Plain data carried between pipeline stages: a raw scan from disk or sensor, and a prepared scan."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RawScan:
    """One capture as read: sizes need not be square.

    rgb_hwc_u8: (H, W, 3) uint8. xyz_hwc_m: (H, W, 3) float32 metres, (0,0,0) = missing, or None
    for RGB-only data. gt_ids_hw: (H, W) uint8 defect-type ids (0 = normal) or None.
    """

    rgb_hwc_u8: np.ndarray
    xyz_hwc_m: np.ndarray | None
    gt_ids_hw: np.ndarray | None = None
    source: str = ""


@dataclass(frozen=True)
class PreparedScan:
    """A scan after plane removal, square padding and resizing to the model input size.

    rgb_chw: (3, S, S) float32, ImageNet-normalised (S = rgb input size, 224 or 392).
    rgb_hwc_u8: (224, 224, 3) uint8 after plane removal, for descriptors and overlays.
    xyz_hwc_m: (224, 224, 3) float32 metres, zeros where invalid.
    valid_hw: (224, 224) bool, True where all three coordinates are non-zero.
    gt_ids_hw: (224, 224) uint8 defect-type ids (nearest-resized) or None.
    """

    rgb_chw: np.ndarray
    rgb_hwc_u8: np.ndarray
    xyz_hwc_m: np.ndarray
    valid_hw: np.ndarray
    gt_ids_hw: np.ndarray | None = None
    source: str = ""


@dataclass(frozen=True)
class PatchFeatures:
    """Per-patch features on aligned grids.

    rgb_hwc: (28, 28, C_rgb) float32. point_hwc: (56, 56, C_point) float32 (exact zeros on background).
    """

    rgb_hwc: np.ndarray
    point_hwc: np.ndarray
