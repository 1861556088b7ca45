"""Weight-free feature descriptors of the `m3dm-free` preset: a real detector without official checkpoints.

Feature extraction for a station (numpy / scipy only): `rgb_descriptor` replaces the DINO tokens on the 28x28
grid and `point_descriptor` replaces the Point-MAE features on the 56x56 grid; both feed the same memory banks
and scoring as the network presets. The maths lives in core.free_rgb and core.free_points.
"""

from __future__ import annotations

import numpy as np

from core.config import FREE_POINT_DIM, FREE_RGB_DIM
from core.errors import ShapeError
from core.free_points import GRID as POINT_GRID
from core.free_points import IMAGE_SIZE, point_descriptor_per_point
from core.free_rgb import RGB_GROUPS, rgb_descriptor_groups
from core.pfa import project_to_grid
from core.scan import PreparedScan

__all__ = ["FREE_POINT_DIM", "FREE_RGB_DIM", "point_descriptor", "rgb_descriptor"]


def rgb_descriptor(scan: PreparedScan) -> np.ndarray:
    """Colour, gradient and texture statistics per 8x8 patch with context.

    Args:
        scan: prepared scan; uses rgb_hwc_u8 (224, 224, 3) uint8 and valid_hw (224, 224) bool.

    Returns:
        (28, 28, FREE_RGB_DIM) float32, row-major patch grid; windows without valid pixels are exactly 0.
    """
    groups = rgb_descriptor_groups(scan)
    feats = np.concatenate([groups[name] for name in RGB_GROUPS], axis=-1).astype(np.float32)
    if feats.shape[-1] != FREE_RGB_DIM:
        raise ShapeError(
            f"rgb descriptor has {feats.shape[-1]} dims, config says {FREE_RGB_DIM}", scan.source
        )
    return feats


def point_descriptor(scan: PreparedScan) -> np.ndarray:
    """Local surface geometry (height over fitted plane, residual, normal spread) at several scales.

    Args:
        scan: prepared scan; uses xyz_hwc_m (224, 224, 3) float32 metres and valid_hw (224, 224) bool.

    Returns:
        (56, 56, FREE_POINT_DIM) float32 on the point-feature grid; background patches are exactly 0.
    """
    feats_nc, index_n = point_descriptor_per_point(scan)
    if feats_nc.shape[-1] != FREE_POINT_DIM:
        raise ShapeError(
            f"point descriptor has {feats_nc.shape[-1]} dims, config says {FREE_POINT_DIM}", scan.source
        )
    grid = project_to_grid(feats_nc, index_n, image_size=IMAGE_SIZE, grid=POINT_GRID)
    return np.asarray(grid, dtype=np.float32).reshape(POINT_GRID, POINT_GRID, FREE_POINT_DIM)
