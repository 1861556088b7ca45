"""Cross-fitted thresholds: out-of-fold scores, order-statistic false-reject rates, a check on new normals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.thresholds import exceedance_of_order_statistic, fold_indices


def test_folds_partition_the_validation_scans() -> None:
    folds = fold_indices(11, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(11))
    assert all(len(f) >= 2 for f in folds)


@pytest.mark.parametrize(("k", "n", "mean"), [(8, 8, 1 / 9), (99, 100, 2 / 101), (1, 4, 4 / 5)])
def test_exceedance_of_the_kth_order_statistic(k: int, n: int, mean: float) -> None:
    expected, upper = exceedance_of_order_statistic(k, n)
    assert expected == pytest.approx(mean)
    # Monte Carlo: the k-th smallest of n uniform normals is exceeded by a new one with that probability.
    rng = np.random.default_rng(0)
    samples = np.sort(rng.random((20000, n)), axis=1)[:, k - 1]
    assert np.mean(1 - samples) == pytest.approx(mean, abs=0.01)
    assert np.mean((1 - samples) <= upper) == pytest.approx(0.95, abs=0.01)


def test_model_reports_the_false_reject_rate_its_few_validation_scans_support(fleet_bundle: dict) -> None:
    report = json.loads((Path(fleet_bundle["model"]) / "model.json").read_text())["threshold_report"]
    full = report["rgb+point+fusion"]
    # 4 validation normals cannot support 1%: the threshold is their out-of-fold maximum, exceeded by a
    # new normal with probability 1/5 on average, and the report says so.
    assert full["n_normals"] == 4 and full["order_statistic"] == 4
    assert full["expected_false_reject_rate"] == pytest.approx(1 / 5)
    assert 0.5 < full["interval_95"][1] < 0.6


def test_false_reject_rate_on_fresh_normals_lies_within_the_reported_interval(fleet_bundle: dict) -> None:
    from core.scan import RawScan
    from edge.station_model import open_bundle
    from trainer.synth import render_sample

    model = open_bundle(fleet_bundle["bundle"], fleet_bundle["keys"])
    threshold = model.manifest.thresholds
    report = json.loads((Path(fleet_bundle["model"]) / "model.json").read_text())["threshold_report"]
    assert threshold.image_threshold == pytest.approx(report[threshold.variant]["threshold"])
    fresh = [
        render_sample(fleet_bundle["class_name"], 90_000 + i, width_px=224, height_px=224) for i in range(12)
    ]
    scores = [model.score_raw(RawScan(s.rgb_hwc_u8, s.xyz_hwc_m)).image[threshold.variant] for s in fresh]
    rejected = float(np.mean(np.array(scores) > threshold.image_threshold))
    low, high = report[threshold.variant]["interval_95"]
    assert low <= rejected <= high, (rejected, (low, high))


def test_an_rgb_only_threshold_reads_the_order_statistic_of_raw_held_out_scores() -> None:
    from trainer.thresholds import held_out_threshold

    scores_n = np.arange(1.0, 21.0)  # 20 validation normals, nothing fitted on them
    report = held_out_threshold(scores_n, false_reject_rate=0.1)
    k = report.order_statistic
    assert report.folds == 1 and report.n_normals == 20
    assert report.threshold == scores_n[k - 1] and report.out_of_fold_rejects == int(
        (scores_n > report.threshold).sum()
    )
    assert report.out_of_fold_rejects == 1  # the "higher" 90 % quantile (19): at most 10 % of 20 above it
    assert report.expected_false_reject_rate == pytest.approx((20 + 1 - k) / 21)
    assert report.score_quantiles[0] == 1.0 and report.score_quantiles[-1] == 20.0
