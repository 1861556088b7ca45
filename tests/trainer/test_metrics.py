"""Metrics against literal references: AU-PRO as a per-threshold loop, AUROCs as Mann-Whitney rank sums."""

from __future__ import annotations

import logging
import math
from bisect import bisect

import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from core.errors import ConfigError, InputError, ShapeError
from trainer.metrics import (
    AUPRO_1PCT_THRESHOLDS,
    VariantMetrics,
    aupro,
    evaluate_variant,
    image_auroc,
    pixel_auroc,
    pro_curve,
    threshold_at_false_reject_rate,
)

# ---------------------------------------------------------------- references (literal, slow, obviously right)


def _trapezoid_reference(x: list[float], y: list[float], x_max: float) -> float:
    """MVTec's `trapezoid`: cut at x_max, interpolating the curve there."""
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    area = 0.0
    for i in range(1, len(x)):
        if x[i] <= x_max:
            area += 0.5 * (y[i] + y[i - 1]) * (x[i] - x[i - 1])
    return area + correction


def aupro_reference(masks_nhw, maps_nhw, fpr_limit=0.3, num_thresholds=100) -> float:
    """Spec §9 step by step: per-image 8-connected components, one Python pass per threshold."""
    components, ok_scores = [], []
    for mask, amap in zip(masks_nhw, maps_nhw.astype(np.float32), strict=True):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        ok_scores.append(amap[labeled == 0])
        components += [amap[labeled == k + 1] for k in range(n)]
    ok_sorted = np.sort(np.concatenate(ok_scores))
    n_ok = len(ok_sorted)
    fprs, pros = [1.0], [1.0]
    for pos in np.linspace(0, n_ok - 1, num=num_thresholds, dtype=int):
        threshold = ok_sorted[pos]
        fprs.append(1.0 - (pos + 1) / n_ok)
        pros.append(sum(float(np.mean(c > threshold)) for c in components) / len(components))
    order = sorted(range(len(fprs)), key=lambda i: fprs[i])
    x, y = [fprs[i] for i in order], [pros[i] for i in order]
    return _trapezoid_reference(x, y, fpr_limit) / fpr_limit


def auroc_mann_whitney(labels, scores) -> float:
    """AUROC = P(score_pos > score_neg) + 0.5 P(tie), from average ranks."""
    labels, scores = np.asarray(labels).astype(bool).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    ranks = rankdata(scores)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ---------------------------------------------------------------- synthetic data


def _random_case(seed: int, n: int = 6, size: int = 40, quantise: bool = False):
    """Masks with blobs, single pixels and diagonal-touching pairs; maps correlated with the masks."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n):  # image 0 stays good
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 6, size=2)
            h, w = rng.integers(1, 6, size=2)
            masks[i, r : r + h, c : c + w] = True
        r, c = rng.integers(1, size - 2, size=2)  # two pixels touching only at a corner
        masks[i, r, c] = masks[i, r + 1, c + 1] = True
    masks |= rng.random(masks.shape) < 0.01  # scattered specks, many single-pixel components
    maps = rng.normal(size=masks.shape) + 1.5 * masks * rng.random(masks.shape)
    if quantise:  # ties between normal and defect scores exercise the strict ">" of the PRO
        maps = np.round(maps, 1)
    return masks, maps.astype(np.float32)


# ---------------------------------------------------------------- AU-PRO


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("quantise", [False, True])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.01])
def test_aupro_matches_reference(seed, quantise, fpr_limit):
    masks, maps = _random_case(seed, quantise=quantise)
    expected = aupro_reference(masks, maps, fpr_limit=fpr_limit)
    assert 0.0 < expected < 1.0
    value = aupro(masks, maps, fpr_limit=fpr_limit)
    assert type(value) is float
    assert value == pytest.approx(expected, abs=1e-6)


def test_aupro_matches_reference_with_more_thresholds_than_normal_pixels():
    masks, maps = _random_case(7, n=2, size=8)
    masks[:, :, :6] = True  # 16 normal pixels, 100 thresholds: repeated positions
    assert aupro(masks, maps) == pytest.approx(aupro_reference(masks, maps), abs=1e-6)


def test_diagonal_neighbours_are_one_component():
    """One hot pixel touching three cold ones at a corner: 8-connectivity gives PRO 1/4, not mean(1, 0)."""
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1, 1] = True
    masks[0, 2:4, 2] = masks[0, 2, 3] = True  # 3 pixels, touching (1, 1) only diagonally
    maps = np.zeros((1, 6, 6), dtype=np.float32)
    maps[0, 1, 1] = 5.0
    fpr, pro = pro_curve(masks, maps)
    assert ndimage.label(masks[0])[1] == 2  # 4-connectivity would split it
    np.testing.assert_allclose(pro[:-1], 0.25)
    assert fpr[0] == 0.0 and fpr[-1] == 1.0 and pro[-1] == 1.0


def test_perfect_and_inverted_maps():
    masks, _ = _random_case(3)
    perfect = masks.astype(np.float32) + 1.0
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, perfect, fpr_limit=0.01) == pytest.approx(1.0)
    assert aupro(masks, -perfect) == pytest.approx(0.0)


def test_pro_curve_is_sorted_and_bounded():
    fpr, pro = pro_curve(*_random_case(5), num_thresholds=50)
    assert fpr.shape == pro.shape == (51,)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    assert np.all((pro >= 0) & (pro <= 1))


def test_aupro_undefined_without_defects_is_nan(caplog):
    maps = np.random.default_rng(0).random((3, 8, 8))
    with caplog.at_level(logging.WARNING):
        assert math.isnan(aupro(np.zeros((3, 8, 8), dtype=bool), maps))
    assert "AU-PRO undefined" in caplog.text


def test_aupro_rejects_bad_input():
    masks, maps = _random_case(0)
    with pytest.raises(ShapeError, match=r"masks \(6, 40, 40\) and maps \(6, 39, 40\) must be equal"):
        aupro(masks, maps[:, :-1])
    maps[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="anomaly maps contain NaN or inf"):
        aupro(masks, maps)
    with pytest.raises(ConfigError, match=r"fpr_limit must be in \(0, 1\], got 0.0"):
        aupro(masks, np.nan_to_num(maps), fpr_limit=0.0)


# ---------------------------------------------------------------- AUROCs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_auroc_matches_mann_whitney(seed):
    masks, maps = _random_case(seed, quantise=seed == 2)
    value = pixel_auroc(masks, maps)
    assert type(value) is float
    assert value == pytest.approx(auroc_mann_whitney(masks, maps), abs=1e-9)
    assert value == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_matches_mann_whitney(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=40)
    scores = np.round(rng.normal(size=40) + labels, 1)  # ties included
    assert image_auroc(labels, scores) == pytest.approx(auroc_mann_whitney(labels, scores), abs=1e-12)


def test_auroc_single_class_is_nan_with_reason(caplog):
    with caplog.at_level(logging.WARNING):
        assert math.isnan(image_auroc(np.zeros(5), np.arange(5.0)))
        assert math.isnan(pixel_auroc(np.zeros((2, 4, 4), dtype=bool), np.ones((2, 4, 4))))
    assert "only one class present" in caplog.text


def test_image_auroc_rejects_mismatched_shapes():
    with pytest.raises(ShapeError, match=r"labels \(4,\) and scores \(5,\) must be equal"):
        image_auroc(np.zeros(4), np.zeros(5))


# ---------------------------------------------------------------- composition and thresholds


def test_evaluate_variant_combines_the_four_metrics():
    masks, maps = _random_case(4)
    labels = masks.any(axis=(1, 2)).astype(int)
    labels[0] = 0
    scores = maps.max(axis=(1, 2))
    result = evaluate_variant(labels, scores, masks, maps)
    assert isinstance(result, VariantMetrics)
    assert result.i_auroc == pytest.approx(auroc_mann_whitney(labels, scores))
    assert result.p_auroc == pytest.approx(auroc_mann_whitney(masks, maps))
    assert result.aupro == pytest.approx(aupro_reference(masks, maps), abs=1e-6)
    fine = aupro_reference(masks, maps, fpr_limit=0.01, num_thresholds=AUPRO_1PCT_THRESHOLDS)
    assert result.aupro_1pct == pytest.approx(fine, abs=1e-6)


@pytest.mark.parametrize("n", [7, 20, 101])
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.1, 0.5])
def test_threshold_never_rejects_more_than_the_rate(n, rate):
    scores = np.random.default_rng(n).normal(size=n)
    threshold = threshold_at_false_reject_rate(scores, rate)
    rejected = np.mean(scores > threshold)
    assert rejected <= rate
    assert threshold in scores  # "higher" picks an order statistic
    if rate == 0.0:
        assert threshold == scores.max()


def test_threshold_known_value_and_bad_input():
    assert threshold_at_false_reject_rate(np.arange(11.0), 0.1) == 9.0  # 1 of 11 above
    with pytest.raises(ConfigError, match=r"false_reject_rate must be in \[0, 1\), got 1.0"):
        threshold_at_false_reject_rate(np.arange(5.0), 1.0)
    with pytest.raises(InputError, match=r"must be non-empty and finite \(got 0 values\)"):
        threshold_at_false_reject_rate(np.array([]), 0.1)
