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


def test_svm_takes_sklearns_row_shaped_integer_coefficients_as_float64() -> None:
    # sklearn's OneClassSVM.coef_ is (1, F); the bundle may also carry integers or a numpy scalar offset
    svm = LinearOneClassSVM(coef_f=[[1, 2, -1]], offset=np.float32(0.5))
    assert svm.coef_f.shape == (3,) and svm.coef_f.dtype == np.float64
    assert type(svm.offset) is float and svm.offset == 0.5
    np.testing.assert_allclose(svm.decision_function(np.array([[1.0, 1.0, 1.0]])), [1.5])


def test_svm_with_a_single_feature_is_valid_and_empty_or_inf_is_not() -> None:
    assert LinearOneClassSVM(coef_f=np.array([2.0]), offset=0.0).score_samples(np.array([[3.0]]))[0] == 6.0
    with pytest.raises(ConfigError, match="^one-class SVM coefficients must be finite and non-empty$"):
        LinearOneClassSVM(coef_f=np.array([]), offset=0.0)
    with pytest.raises(ConfigError, match="^one-class SVM coefficients must be finite and non-empty$"):
        LinearOneClassSVM(coef_f=np.array([1.0]), offset=np.inf)


def test_normaliser_stores_flat_float64_statistics_and_allows_one_bank() -> None:
    norm = ScoreNormaliser([[1]], [[2]], [[3]], [[4]])  # (1, 1) int lists: one bank
    for name in ("image_mean_b", "image_std_b", "pixel_mean_b", "pixel_std_b"):
        value = getattr(norm, name)
        assert value.shape == (1,) and value.dtype == np.float64, name
    assert norm.n_banks == 1
    image, maps = norm.apply(np.array([5.0]), np.full((1, 2, 2), 7.0))
    assert image[0] == pytest.approx(2.0 + NORMALISED_SHIFT) and maps[0, 0, 0] == pytest.approx(
        1.0 + NORMALISED_SHIFT
    )


@pytest.mark.parametrize("which", [1, 3])  # image_std_b, pixel_std_b: each std is checked on its own
@pytest.mark.parametrize("bad_std", [0.0, -1.0])
def test_normaliser_refuses_a_zero_or_negative_std_in_either_std(which: int, bad_std: float) -> None:
    stats = [np.zeros(3), np.ones(3), np.zeros(3), np.ones(3)]
    stats[which] = np.array([1.0, bad_std, 1.0])
    with pytest.raises(ConfigError, match="^normaliser statistics must be finite with positive std$"):
        ScoreNormaliser(*stats)
    with pytest.raises(ConfigError, match=r"^normaliser statistics must all be \(B,\) with the same B > 0$"):
        ScoreNormaliser(np.zeros(0), np.ones(0), np.zeros(0), np.ones(0))


@pytest.mark.parametrize(
    ("image_shape", "maps_shape"),
    [((3,), (4, 4)), ((3,), (2, 4, 4)), ((2,), (3, 4, 4))],
    ids=["maps-without-bank-axis", "maps-with-2-banks", "scores-with-2-banks"],
)
def test_normaliser_apply_refuses_any_bank_count_mismatch(image_shape: tuple, maps_shape: tuple) -> None:
    with pytest.raises(ShapeError, match="^expected 3 banks, got scores"):
        _normaliser().apply(np.zeros(image_shape), np.zeros(maps_shape))
