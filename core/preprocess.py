"""M3DM preprocessing of one scan (spec §2): RawScan -> PreparedScan, the same on the trainer and a station.

Order: sanitise, border-plane fit on the raw scan, plane removal in xyz and RGB, pad to a square, optional
largest cluster, then resize (RGB antialiased bicubic + ImageNet normalisation; xyz legacy nearest; gt PIL
nearest, as the original reads its masks).
The original ran the first half offline and in place; here it runs per frame and never writes files.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from core.config import PreprocessConfig
from core.errors import EmptyCloudError, InvalidCloudError, ShapeError
from core.plane import border_points, fit_border_plane, keep_largest_cluster, remove_plane, valid_mask
from core.scan import PreparedScan, RawScan

log = logging.getLogger("m3dm.preprocess")

__all__ = [
    "normalise_rgb",
    "pad_to_square",
    "prepare_scan",
    "resize_mask",
    "resize_nearest",
    "resize_rgb",
    "sanitize_xyz",
]


def sanitize_xyz(xyz_hwc_m: np.ndarray, source: str = "") -> np.ndarray:
    """Zero every point with a NaN/inf coordinate; reject a cloud with no valid point.

    Args:
        xyz_hwc_m: (H, W, 3) float32 metres.
        source: scan or file name for the error.

    Returns:
        (H, W, 3) float32, a copy only when something had to be zeroed.

    Raises:
        InvalidCloudError: no point has three finite non-zero coordinates (all-zero, all-NaN, all-inf).
    """
    if not np.isfinite(xyz_hwc_m).all():  # flat reduction: cheap when (as usual) everything is finite
        x, y, z = xyz_hwc_m[..., 0], xyz_hwc_m[..., 1], xyz_hwc_m[..., 2]
        finite = np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
        xyz_hwc_m = np.where(finite[..., None], xyz_hwc_m, np.float32(0))
    if not valid_mask(xyz_hwc_m).any():
        raise InvalidCloudError("point cloud has no valid (finite, non-zero) point", source or None)
    return xyz_hwc_m


def pad_to_square(arr: np.ndarray, multiple: int) -> np.ndarray:
    """Zero-pad (H, W, ...) to (S, S, ...), S = the larger side rounded up to `multiple`.

    The padding is split evenly; an odd extra pixel goes at the end (bottom / right), as in the original.
    """
    h, w = arr.shape[:2]
    side = max(-(-h // multiple), -(-w // multiple)) * multiple
    top, left = (side - h) // 2, (side - w) // 2
    pad = [(top, side - h - top), (left, side - w - left)] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, pad, mode="constant")


def resize_nearest(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize (H, W, ...) to (size, size, ...) with legacy PyTorch "nearest" (not "nearest-exact").

    Source index = floor(dst * (in / out)), computed in float32 exactly as ATen's CPU kernel does, and
    clamped to in - 1.
    """
    rows = _nearest_index(arr.shape[0], size)
    cols = _nearest_index(arr.shape[1], size)
    return arr[rows[:, None], cols[None, :]]


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    scale = np.float32(in_size / out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def resize_mask(gt_hw_u8: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 ids -> (size, size) with PIL NEAREST, as the original reads masks (pixel-centre sampling,
    which differs from the legacy-nearest xyz resize: 24 of 154 defect pixels on an 800 -> 224 mask)."""
    return np.array(Image.fromarray(gt_hw_u8).resize((size, size), Image.Resampling.NEAREST))


def resize_rgb(rgb_hwc_u8: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, PIL BICUBIC (antialiased, as torchvision Resize on PIL)."""
    return np.array(Image.fromarray(rgb_hwc_u8).resize((size, size), Image.Resampling.BICUBIC))


def normalise_rgb(
    rgb_hwc_u8: np.ndarray, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> np.ndarray:
    """(S, S, 3) uint8 -> (3, S, S) float32, (x / 255 - mean) / std in float32 (ToTensor + Normalize)."""
    x = rgb_hwc_u8.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean_c = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_c = np.asarray(std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean_c) / std_c)


def _validated(raw: RawScan) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Check shapes and dtypes of a RawScan; return (rgb, xyz float32 sanitised or None, gt or None)."""
    src = raw.source or None
    rgb = np.asarray(raw.rgb_hwc_u8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ShapeError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}", src)
    hw = rgb.shape[:2]
    xyz = None
    if raw.xyz_hwc_m is not None:
        xyz = np.asarray(raw.xyz_hwc_m)
        if xyz.ndim != 3 or xyz.shape[2] != 3 or not np.issubdtype(xyz.dtype, np.floating):
            raise ShapeError(f"xyz must be (H, W, 3) float32 metres, got {xyz.shape} {xyz.dtype}", src)
        if xyz.shape[:2] != hw:
            raise ShapeError(f"rgb is {hw} but xyz is {xyz.shape[:2]}", src)
        xyz = sanitize_xyz(xyz.astype(np.float32, copy=False), raw.source)
    gt = None if raw.gt_ids_hw is None else np.asarray(raw.gt_ids_hw)
    if gt is not None and (gt.shape != hw or gt.dtype != np.uint8):
        raise ShapeError(f"gt must be {hw} uint8, got {gt.shape} {gt.dtype}", src)
    return rgb, xyz, gt


def _require_points(xyz_hwc_m: np.ndarray, stage: str, source: str) -> None:
    if not valid_mask(xyz_hwc_m).any():
        raise EmptyCloudError(f"no valid point left {stage}", source or None)


def prepare_scan(raw: RawScan, cfg: PreprocessConfig) -> PreparedScan:
    """Preprocess one scan as M3DM does (spec §2a + §2b), deterministically.

    Args:
        raw: rgb (H, W, 3) uint8; xyz (H, W, 3) float metres (float64 is cast to float32; NaN/inf points
            are zeroed) or None for RGB-only data; gt (H, W) uint8 ids or None.
        cfg: preprocessing settings.

    Returns:
        PreparedScan with rgb_chw (3, R, R) float32 (R = cfg.rgb_input_size), rgb_hwc_u8 (S, S, 3),
        xyz (S, S, 3) float32, valid (S, S) bool, gt (S, S) uint8 or None (S = cfg.image_size).
        RGB-only input: xyz is all zeros but `valid_hw` is all True, so RGB consumers treat every pixel as
        foreground (an all-False mask would blank every RGB score map downstream).

    Raises:
        ShapeError, InvalidCloudError: bad input. EmptyCloudError: no object point left after plane
        removal, clustering or resizing.
    """
    rgb, xyz, gt = _validated(raw)
    if xyz is not None:
        if border_points(xyz, cfg.border_px).shape[0] < cfg.ransac_n:
            # Data preprocessed offline by the official script has all-zero backgrounds, borders included:
            # the plane is already gone and cannot be fitted (the original crashes here). Use the scan as is.
            log.debug(
                "%s: no support plane on the borders; treating the scan as already plane-removed", raw.source
            )
        else:
            xyz, rgb = remove_plane(xyz, rgb, fit_border_plane(xyz, cfg, raw.source), cfg)
        _require_points(xyz, "after plane removal", raw.source)
        xyz = pad_to_square(xyz, cfg.pad_multiple)
    rgb = pad_to_square(rgb, cfg.pad_multiple)
    gt = None if gt is None else pad_to_square(gt, cfg.pad_multiple)
    if xyz is not None and cfg.keep_largest_cluster:
        xyz, rgb = keep_largest_cluster(xyz, rgb, cfg)
        _require_points(xyz, "after keeping the largest cluster", raw.source)
    size = cfg.image_size
    if xyz is None:
        xyz_small = np.zeros((size, size, 3), dtype=np.float32)
        valid = np.ones((size, size), dtype=bool)
    else:
        xyz_small = resize_nearest(xyz, size)
        valid = valid_mask(xyz_small)
        _require_points(xyz_small, f"after resizing to {size}x{size}", raw.source)
    rgb_model = resize_rgb(rgb, cfg.rgb_input_size)
    return PreparedScan(
        rgb_chw=normalise_rgb(rgb_model, cfg.rgb_mean, cfg.rgb_std),
        rgb_hwc_u8=rgb_model if cfg.rgb_input_size == size else resize_rgb(rgb, size),
        xyz_hwc_m=np.ascontiguousarray(xyz_small),
        valid_hw=valid,
        gt_ids_hw=None if gt is None else resize_mask(gt, size),
        source=raw.source,
    )
