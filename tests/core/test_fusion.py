"""Tests for core.fusion: the exported linear one-class SVM and the per-bank score normaliser."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ConfigError, ShapeError
from core.fusion import NORMALISED_SHIFT, LinearOneClassSVM, ScoreNormaliser


def test_linear_ocsvm_scores_are_the_raw_dot_product() -> None:
    svm = LinearOneClassSVM(coef_f=np.array([0.5, 2.0, -1.0]), offset=1.5)
    x = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(svm.score_samples(x), [1.5, -3.0])
    np.testing.assert_allclose(svm.decision_function(x), [0.0, -4.5])
    assert svm.n_features == 3
    with pytest.raises(ShapeError, match=r"expected \(N, 3\) inputs, got \(2, 2\)"):
        svm.score_samples(np.ones((2, 2)))
    with pytest.raises(ConfigError, match="one-class SVM coefficients must be finite"):
        LinearOneClassSVM(coef_f=np.array([np.nan]), offset=0.0)


def _normaliser() -> ScoreNormaliser:
    return ScoreNormaliser(
        image_mean_b=np.array([10.0, 1.0, 0.1]),
        image_std_b=np.array([2.0, 0.5, 0.01]),
        pixel_mean_b=np.array([5.0, 0.5, 0.05]),
        pixel_std_b=np.array([1.0, 0.25, 0.02]),
    )


def test_normaliser_maps_each_bank_to_shifted_z_scores() -> None:
    norm = _normaliser()
    maps = np.stack([np.full((4, 4), v) for v in (7.0, 1.0, 0.05)])
    image, maps_out = norm.apply(np.array([10.0, 2.0, 0.13]), maps)
    np.testing.assert_allclose(image, np.array([0.0, 2.0, 3.0]) + NORMALISED_SHIFT, rtol=1e-5)
    np.testing.assert_allclose(maps_out[:, 0, 0], np.array([2.0, 2.0, 0.0]) + NORMALISED_SHIFT, rtol=1e-5)
    assert image.dtype == np.float32 and maps_out.shape == (3, 4, 4)
    batch_image, batch_maps = norm.apply(np.tile([10.0, 2.0, 0.13], (5, 1)), np.tile(maps, (5, 1, 1, 1)))
    np.testing.assert_allclose(batch_image[4], image)
    np.testing.assert_allclose(batch_maps[4], maps_out)


def test_normaliser_rejects_bad_statistics_and_shapes() -> None:
    with pytest.raises(ConfigError, match="normaliser statistics must be finite with positive std"):
        ScoreNormaliser(np.zeros(3), np.array([1.0, 0.0, 1.0]), np.zeros(3), np.ones(3))
    with pytest.raises(ConfigError, match=r"normaliser statistics must all be \(B,\)"):
        ScoreNormaliser(np.zeros(3), np.ones(2), np.zeros(3), np.ones(3))
    with pytest.raises(ShapeError, match=r"expected 3 banks, got scores \(2,\)"):
        _normaliser().apply(np.zeros(2), np.zeros((2, 4, 4)))
