"""Evaluation metrics of `m3dm eval`: I-AUROC, P-AUROC and AU-PRO exactly as the M3DM code computes them.

Spec §9. AU-PRO follows `utils/au_pro_util.py` (a copy of the MVTec 3D-AD evaluation code): 8-connected
ground-truth components, 100 thresholds at quantile positions of the normal-pixel scores, trapezoid up to the
FPR limit, divided by it. It is vectorised here (one `searchsorted` over all defect pixels) instead of walking
every component per threshold. Also the image-level decision threshold taken from validation normals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from core.errors import ConfigError, InputError, ShapeError

__all__ = [
    "VariantMetrics",
    "area_under_pro",
    "aupro",
    "evaluate_variant",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "threshold_at_false_reject_rate",
]

log = logging.getLogger(__name__)

# 8-connectivity inside each image, none across images: labelling the whole (N, H, W) stack at once.
_STRUCTURE_8_CONNECTED_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8_CONNECTED_3D[1] = True


AUPRO_1PCT_THRESHOLDS = 1000


@dataclass(frozen=True, slots=True)
class VariantMetrics:
    """The four numbers reported per class and variant; NaN where the metric is undefined."""

    i_auroc: float
    p_auroc: float
    aupro: float
    aupro_1pct: float


def _is_single_class(labels: np.ndarray, scores: np.ndarray, what: str) -> bool:
    """Validate scores; True (and log why) when the AUROC is undefined because one class is missing."""
    if not np.isfinite(scores).all():
        raise InputError(f"{what}: scores contain NaN or inf")
    n_positive = int(np.count_nonzero(labels))
    if 0 < n_positive < labels.size:
        return False
    log.warning(
        "%s undefined (NaN): only one class present (%d of %d positive)", what, n_positive, labels.size
    )
    return True


def _auroc_by_counting(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact Mann-Whitney AUROC, P(pos > neg) + P(tie) / 2, by binary search in the sorted negatives.

    Same value as `roc_auc_score` (ties included) but ~15x faster on 5M pixels: one float32 sort of the
    negatives instead of sklearn's float64 argsort of everything; the counts stay exact in int64.
    """
    negatives_sorted = np.sort(scores[~labels])
    positives = scores[labels]
    n_below = np.searchsorted(negatives_sorted, positives, side="left")
    n_below_or_tied = np.searchsorted(negatives_sorted, positives, side="right")
    twice_wins = int(n_below.sum()) + int(n_below_or_tied.sum())  # 2 * below + tied
    return twice_wins / (2.0 * positives.size * negatives_sorted.size)


def image_auroc(labels_n: np.ndarray, scores_n: np.ndarray) -> float:
    """Image-level ROC AUC.

    Args:
        labels_n: (N,) int/bool, 1 = anomalous (good = 0).
        scores_n: (N,) float image anomaly scores, larger = more anomalous.

    Returns:
        AUROC in [0, 1]; NaN if all labels are equal.
    """
    labels_n, scores_n = np.asarray(labels_n), np.asarray(scores_n, dtype=np.float64)
    if labels_n.ndim != 1 or labels_n.shape != scores_n.shape:
        raise ShapeError(
            f"image_auroc: labels {labels_n.shape} and scores {scores_n.shape} must be equal (N,)"
        )
    if _is_single_class(labels_n, scores_n, "I-AUROC"):
        return float("nan")
    return float(roc_auc_score(labels_n.astype(bool), scores_n))


def _check_masks_maps(
    masks_nhw: np.ndarray, maps_nhw: np.ndarray, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (bool, float32) arrays of the same (N, H, W) shape."""
    masks_nhw, maps_nhw = np.asarray(masks_nhw), np.asarray(maps_nhw)
    if masks_nhw.ndim != 3 or masks_nhw.shape != maps_nhw.shape:
        raise ShapeError(f"{what}: masks {masks_nhw.shape} and maps {maps_nhw.shape} must be equal (N, H, W)")
    maps_f32 = maps_nhw.astype(np.float32, copy=False)
    if not np.isfinite(maps_f32).all():
        raise InputError(f"{what}: anomaly maps contain NaN or inf")
    return masks_nhw.astype(bool, copy=False), maps_f32


def pixel_auroc(masks_nhw: np.ndarray, maps_nhw: np.ndarray) -> float:
    """Pixel-level ROC AUC over every pixel of every test image, good images and background included.

    Equals `roc_auc_score(masks.ravel(), maps.ravel())` (spec §9), computed by exact counting to save time.

    Args:
        masks_nhw: (N, H, W) bool ground truth, True = defect.
        maps_nhw: (N, H, W) float anomaly maps (cast to float32).

    Returns:
        AUROC in [0, 1]; NaN if no pixel (or every pixel) is a defect.
    """
    masks_nhw, maps_nhw = _check_masks_maps(masks_nhw, maps_nhw, "P-AUROC")
    if _is_single_class(masks_nhw, maps_nhw, "P-AUROC"):
        return float("nan")
    return _auroc_by_counting(masks_nhw.ravel(), maps_nhw.ravel())


def pro_curve(
    masks_nhw: np.ndarray, maps_nhw: np.ndarray, num_thresholds: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve sampled at quantiles of the normal-pixel scores (MVTec 3D-AD `compute_pro`).

    Args:
        masks_nhw: (N, H, W) bool ground truth, True = defect.
        maps_nhw: (N, H, W) float anomaly maps (cast to float32).
        num_thresholds: number of thresholds, at integer positions linspace(0, n_ok - 1) of the sorted scores.

    Returns:
        (fpr, pro): (num_thresholds + 1,) float64 each, FPR ascending, ending at the prepended (1, 1).
        Both NaN-filled if there is no defect component or no normal pixel.
    """
    masks_nhw, maps_nhw = _check_masks_maps(masks_nhw, maps_nhw, "AU-PRO")
    if num_thresholds < 1:
        raise ConfigError(f"AU-PRO: num_thresholds must be >= 1, got {num_thresholds}")
    labels_nhw, n_components = ndimage.label(masks_nhw, structure=_STRUCTURE_8_CONNECTED_3D)
    ok_scores_sorted = np.sort(maps_nhw[~masks_nhw])
    n_ok = ok_scores_sorted.size
    if n_components == 0 or n_ok == 0:
        log.warning("AU-PRO undefined (NaN): %d defect components, %d normal pixels", n_components, n_ok)
        nan = np.full(num_thresholds + 1, np.nan)
        return nan, nan.copy()
    positions = np.linspace(0, n_ok - 1, num=num_thresholds, dtype=np.int64)
    thresholds = ok_scores_sorted[positions]  # non-decreasing
    fpr = 1.0 - (positions + 1) / n_ok

    defect_labels = labels_nhw[masks_nhw]
    defect_scores = maps_nhw[masks_nhw]
    # Each defect pixel weighs 1/|its component|, so summing weights of pixels above a threshold and dividing
    # by the component count is the mean per-component overlap. `searchsorted(left)` = how many thresholds lie
    # strictly below the pixel's score, i.e. the thresholds at which the pixel counts as detected.
    component_sizes = np.bincount(defect_labels, minlength=n_components + 1)
    weights = 1.0 / component_sizes[defect_labels]
    n_thresholds_below = np.searchsorted(thresholds, defect_scores, side="left")
    weight_by_count = np.bincount(n_thresholds_below, weights=weights, minlength=num_thresholds + 1)
    # Detected weight at threshold j = weight of pixels with more than j thresholds below them.
    pro = np.cumsum(weight_by_count[::-1])[::-1][1:] / n_components

    # Positions ascend, so FPR descends: reversing gives ascending FPR, with (1, 1) last as in the original.
    fpr = np.concatenate([fpr[::-1], [1.0]])
    pro = np.concatenate([pro[::-1], [1.0]])
    return fpr, pro


def area_under_pro(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Trapezoid area under (fpr, pro) up to fpr_limit, value interpolated at the limit, divided by fpr_limit.

    Args:
        fpr: (K,) ascending false positive rates in [0, 1], containing 0 and 1.
        pro: (K,) per-region overlaps.
        fpr_limit: integration limit in (0, 1], e.g. 0.3 (AU-PRO) or 0.01 (AU-PRO@1%).

    Returns:
        Normalised area in [0, 1]; NaN if the curve is NaN.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ConfigError(f"AU-PRO: fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = np.asarray(fpr, dtype=np.float64), np.asarray(pro, dtype=np.float64)
    if not (np.isfinite(fpr).all() and np.isfinite(pro).all()):
        return float("nan")
    correction = 0.0
    if fpr_limit not in fpr:
        # As MVTec's `trapezoid`: the piece from the last sample below the limit to the limit, with the curve
        # value there interpolated linearly between its neighbours.
        ins = int(np.searchsorted(fpr, fpr_limit, side="right"))
        x0, x1, y0, y1 = fpr[ins - 1], fpr[ins], pro[ins - 1], pro[ins]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        correction = 0.5 * (y_limit + y0) * (fpr_limit - x0)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]))) + correction
    return float(area / fpr_limit)


def aupro(
    masks_nhw: np.ndarray, maps_nhw: np.ndarray, fpr_limit: float = 0.3, num_thresholds: int = 100
) -> float:
    """Normalised area under the PRO curve up to fpr_limit (spec §9).

    Args:
        masks_nhw: (N, H, W) bool ground truth, True = defect.
        maps_nhw: (N, H, W) float anomaly maps.
        fpr_limit: 0.3 for the paper's AU-PRO, 0.01 for AU-PRO@1%.
        num_thresholds: quantile thresholds on normal-pixel scores (100 in the original).

    Returns:
        AU-PRO in [0, 1]; NaN if no defect or no normal pixel.
    """
    return area_under_pro(*pro_curve(masks_nhw, maps_nhw, num_thresholds), fpr_limit)


def evaluate_variant(
    labels_n: np.ndarray, image_scores_n: np.ndarray, masks_nhw: np.ndarray, maps_nhw: np.ndarray
) -> VariantMetrics:
    """All four metrics of one variant on one class's test set (the PRO curve is computed once).

    Args:
        labels_n: (N,) 1 = anomalous image.
        image_scores_n: (N,) float image scores.
        masks_nhw: (N, H, W) bool ground truth.
        maps_nhw: (N, H, W) float anomaly maps.
    """
    fpr, pro = pro_curve(masks_nhw, maps_nhw)
    return VariantMetrics(
        i_auroc=image_auroc(labels_n, image_scores_n),
        p_auroc=pixel_auroc(masks_nhw, maps_nhw),
        aupro=area_under_pro(fpr, pro, 0.3),
        # With the spec's 100 thresholds the FPR samples are ~0.0101 apart, so AUPRO@1% would rest on one
        # interpolated segment; 1000 thresholds put ten samples below 1% (AUPRO@30% keeps the spec's 100).
        aupro_1pct=area_under_pro(*pro_curve(masks_nhw, maps_nhw, AUPRO_1PCT_THRESHOLDS), 0.01),
    )


def threshold_at_false_reject_rate(normal_scores_n: np.ndarray, false_reject_rate: float) -> float:
    """Image decision threshold from validation normals: the (1 - rate) quantile, `method="higher"`.

    "higher" takes the order statistic at or above the linear quantile position, so with the decision rule
    `score > threshold` at most a fraction `false_reject_rate` of these normals is rejected (never more,
    unlike linear interpolation, which can reject one extra normal on small sets). Rate 0 gives the max.

    Args:
        normal_scores_n: (N,) float image scores of normal validation images (never test images).
        false_reject_rate: wanted fraction of normals flagged anomalous, in [0, 1).

    Returns:
        Threshold in score units.
    """
    scores = np.asarray(normal_scores_n, dtype=np.float64).ravel()
    if not 0.0 <= false_reject_rate < 1.0:
        raise ConfigError(f"false_reject_rate must be in [0, 1), got {false_reject_rate}")
    if scores.size == 0 or not np.isfinite(scores).all():
        raise InputError(f"validation normal scores must be non-empty and finite (got {scores.size} values)")
    return float(np.quantile(scores, 1.0 - false_reject_rate, method="higher"))
