"""Honest decision thresholds: cross-fitted over the held-out normals, with the expected false-reject rate.

The score normaliser and the DLF are fitted on the same validation normals the threshold is read from, so
a threshold taken from their in-sample scores is optimistic: on new normal parts more would be rejected
than configured. Here every validation scan is scored by a normaliser + DLF fitted WITHOUT it (K folds),
the threshold is the (1 - rate) order statistic of those out-of-fold scores, and the false-reject rate
it will have on new normal parts is reported from order statistics: if the threshold is the k-th smallest
of n exchangeable normal scores, a new normal exceeds it with probability p ~ Beta(n + 1 - k, k), mean
(n + 1 - k) / (n + 1). With few validation scans this is much more than the configured rate, and the
report says so instead of pretending: 8 validation normals cannot support a 1% false-reject rate. The
interval is one-sided, [0, 95th percentile of p]. The shipped normaliser and DLF are still fitted on
all validation scans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import beta

from core.config import FitConfig
from core.model import FrameScorer
from trainer.dlf import fit_dlf, fit_score_normaliser
from trainer.metrics import threshold_at_false_reject_rate

__all__ = [
    "ThresholdReport",
    "cross_fitted_thresholds",
    "exceedance_of_order_statistic",
    "fold_indices",
    "held_out_threshold",
]


@dataclass(frozen=True)
class ThresholdReport:
    """One variant's threshold and what it is expected to reject on new normal parts."""

    threshold: float
    folds: int
    n_normals: int
    order_statistic: int  # the threshold is the k-th smallest out-of-fold score
    out_of_fold_rejects: int
    expected_false_reject_rate: float
    interval_95: tuple[float, float]  # [0, upper 95% bound] of the false-reject rate on new normals
    # 0, 5, ..., 100 % quantiles of the out-of-fold normal scores (the manifest's drift reference)
    score_quantiles: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "folds": self.folds,
            "n_normals": self.n_normals,
            "order_statistic": self.order_statistic,
            "out_of_fold_rejects": self.out_of_fold_rejects,
            "expected_false_reject_rate": self.expected_false_reject_rate,
            "interval_95": list(self.interval_95),
            "score_quantiles": list(self.score_quantiles),
        }


def exceedance_of_order_statistic(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, upper bound) of P(new normal > k-th smallest of n normals) ~ Beta(n + 1 - k, k)."""
    a, b = n + 1 - k, k
    return a / (a + b), float(beta.ppf(confidence, a, b))


def fold_indices(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """`folds` disjoint, seeded index sets covering range(n)."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, folds)]


def _out_of_fold_scores(
    held_image_nb: np.ndarray, held_maps_nbhw: np.ndarray, banks: dict, uff: Any, cfg: FitConfig, folds: int
) -> dict[str, np.ndarray]:
    """variant -> (N,) image scores, each from a normaliser + DLF fitted on the other folds."""
    n = held_image_nb.shape[0]
    scores: dict[str, np.ndarray] = {}
    for test_idx in fold_indices(n, folds, cfg.seed):
        fit_idx = np.setdiff1d(np.arange(n), test_idx)
        normaliser = fit_score_normaliser(held_image_nb[fit_idx], held_maps_nbhw[fit_idx])
        dlf = fit_dlf(held_image_nb[fit_idx], held_maps_nbhw[fit_idx], normaliser, cfg.dlf, cfg.score)
        scorer = FrameScorer(banks=banks, dlf=dlf, normaliser=normaliser, uff=uff, score_cfg=cfg.score)
        for i in test_idx:
            for variant, value in scorer.combine(held_image_nb[i], held_maps_nbhw[i]).image.items():
                scores.setdefault(variant, np.zeros(n))[i] = value
    return scores


def cross_fitted_thresholds(
    held_image_nb: np.ndarray, held_maps_nbhw: np.ndarray, banks: dict, uff: Any, cfg: FitConfig
) -> dict[str, ThresholdReport]:
    """variant -> cross-fitted threshold at cfg.false_reject_rate and its expected false-reject rate.

    Folds: min(5, N) (leave-one-out for small validation sets; a fold needs >= 2 scans left to fit on).
    Single-bank variants need no DLF, but their scores pass through the same out-of-fold path unchanged.
    """
    n = held_image_nb.shape[0]
    folds = max(2, min(5, n))
    out_of_fold = _out_of_fold_scores(held_image_nb, held_maps_nbhw, banks, uff, cfg, folds)
    return {
        variant: _report(scores_n, cfg.false_reject_rate, folds) for variant, scores_n in out_of_fold.items()
    }


def held_out_threshold(scores_n: np.ndarray, false_reject_rate: float) -> ThresholdReport:
    """Threshold and expected false-reject rate from (N,) held-out normal scores nothing was fitted on.

    An RGB-only model's "rgb" score is the raw rgb-bank score (no normaliser, no DLF), so the validation
    scores are out of sample as they are; `folds` is 1 (no cross-fitting needed).
    """
    return _report(np.asarray(scores_n, dtype=np.float64), false_reject_rate, folds=1)


def _report(scores_n: np.ndarray, false_reject_rate: float, folds: int) -> ThresholdReport:
    n = scores_n.shape[0]
    threshold = threshold_at_false_reject_rate(scores_n, false_reject_rate)
    k = int((scores_n <= threshold).sum())
    expected, upper = exceedance_of_order_statistic(k, n)
    return ThresholdReport(
        threshold=threshold,
        folds=folds,
        n_normals=n,
        order_statistic=k,
        out_of_fold_rejects=n - k,
        expected_false_reject_rate=expected,
        interval_95=(0.0, upper),
        score_quantiles=tuple(float(q) for q in np.quantile(scores_n, np.linspace(0.0, 1.0, 21))),
    )
