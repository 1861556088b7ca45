"""Tests for trainer.dlf: sklearn parity, score normaliser fitting, DLF per combination variant."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import SGDOneClassSVM

from core.config import CoresetConfig, DLFConfig, ScoreConfig
from core.errors import ConfigError, ShapeError
from core.fusion import NORMALISED_SHIFT
from core.model import VARIANTS, FrameScorer, prepare_dlf_inputs
from core.scan import PatchFeatures
from trainer.coreset import build_memory_bank
from trainer.dlf import fit_dlf, fit_linear_ocsvm, fit_score_normaliser, sample_pixels


def _normal_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = np.array([20.0, 3.0, 0.5])
    image = np.abs(rng.normal(1.0, 0.15, size=(n, 3))) * scale
    maps = np.abs(rng.normal(1.0, 0.3, size=(n, 3, 16, 16))) * scale[None, :, None, None]
    return image, maps


def test_exported_svm_matches_sklearn() -> None:
    x = np.abs(np.random.default_rng(0).normal(2.0, 0.5, size=(300, 3)))
    cfg = DLFConfig()
    ours = fit_linear_ocsvm(x, cfg)
    ref = SGDOneClassSVM(nu=cfg.nu, max_iter=cfg.max_iter, random_state=cfg.seed).fit(x)
    test_x = np.random.default_rng(1).normal(2.0, 1.0, size=(50, 3))
    np.testing.assert_allclose(ours.score_samples(test_x), ref.score_samples(test_x), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        ours.decision_function(test_x), ref.decision_function(test_x), rtol=1e-6, atol=1e-9
    )
    assert (ours.coef_f > 0).all()  # positive inputs give positive weights (spec §8)
    with pytest.raises(ShapeError, match=r"DLF inputs must be finite \(N>=2, F\), got \(2, 2\)"):
        fit_linear_ocsvm(np.array([[np.nan, 1.0], [1.0, 1.0]]), cfg)


def test_score_normaliser_statistics() -> None:
    image, maps = _normal_scores(40, 2)
    maps[:, 2] = 7.0  # constant bank: std falls back to 1
    norm = fit_score_normaliser(image, maps)
    np.testing.assert_allclose(norm.image_mean_b, image.mean(axis=0))
    np.testing.assert_allclose(norm.image_std_b, image.std(axis=0))
    np.testing.assert_allclose(norm.pixel_mean_b[:2], maps[:, :2].mean(axis=(0, 2, 3)))
    assert norm.pixel_std_b[2] == 1.0
    norm_image, _ = norm.apply(image, maps)
    np.testing.assert_allclose(norm_image.mean(axis=0), NORMALISED_SHIFT, atol=1e-5)
    with pytest.raises(ShapeError, match=r"bank image scores must be \(N, 3\), got \(40, 2\)"):
        fit_score_normaliser(image[:, :2], maps)


def test_sample_pixels_is_seeded_and_sized() -> None:
    _, maps = _normal_scores(5, 3)
    rows = sample_pixels(maps, 10, seed=1)
    assert rows.shape == (50, 3)
    np.testing.assert_array_equal(rows, sample_pixels(maps, 10, seed=1))
    flat = maps.reshape(5, 3, -1)
    assert all(any(np.array_equal(r, flat[0, :, p]) for p in range(256)) for r in rows[:10])
    assert sample_pixels(maps, 10**6, seed=1).shape == (5 * 256, 3)


@pytest.mark.parametrize("normalised", [True, False])
def test_fit_dlf_gives_two_variants_that_rank_anomalies_higher(normalised: bool) -> None:
    image, maps = _normal_scores(60, 4)
    norm = fit_score_normaliser(image, maps) if normalised else None
    cfg = DLFConfig(pixel_samples_per_image=32)
    dlf = fit_dlf(image, maps, norm, cfg)
    assert set(dlf) == {"rgb+point", "rgb+point+fusion"}
    assert [s.n_features for s in dlf["rgb+point"]] == [2, 2]
    assert [s.n_features for s in dlf["rgb+point+fusion"]] == [3, 3]
    test_image, test_maps = _normal_scores(20, 5)
    bad_image = test_image * np.array([1.0, 1.8, 1.8])
    dlf_normal, _ = prepare_dlf_inputs(test_image, test_maps, norm, ScoreConfig().rgb_lambda)
    dlf_bad, _ = prepare_dlf_inputs(bad_image, test_maps, norm, ScoreConfig().rgb_lambda)
    for variant, cols in {"rgb+point": [0, 1], "rgb+point+fusion": [0, 1, 2]}.items():
        img_svm = dlf[variant][0]
        assert (img_svm.score_samples(dlf_bad[:, cols]) > img_svm.score_samples(dlf_normal[:, cols])).all()
    again = fit_dlf(image, maps, norm, cfg)
    np.testing.assert_array_equal(again["rgb+point"][1].coef_f, dlf["rgb+point"][1].coef_f)


def test_train_then_score_end_to_end() -> None:
    """Banks -> held-out bank scores -> normaliser + DLF -> FrameScorer ranks an anomalous frame higher."""
    rng = np.random.default_rng(6)

    def frame() -> PatchFeatures:
        return PatchFeatures(
            rgb_hwc=rng.normal(size=(28, 28, 4)).astype(np.float32),
            point_hwc=rng.normal(size=(56, 56, 3)).astype(np.float32),
        )

    train, held_out = [frame() for _ in range(2)], [frame() for _ in range(4)]
    cfg = CoresetConfig(max_rows=1500)
    banks = {
        "rgb": build_memory_bank("rgb", [f.rgb_hwc for f in train], 28, 0.2, cfg),
        "point": build_memory_bank("point", [f.point_hwc for f in train], 56, 0.05, cfg),
    }
    # fused_features does not touch the fusion bank, so a placeholder lets us build the real one.
    placeholder = FrameScorer(banks | {"fusion": banks["point"]}, None, None, None, ScoreConfig())
    with pytest.raises(ConfigError, match="has no DLF models"):
        placeholder.combine(np.zeros(3, np.float32), np.zeros((3, 224, 224), np.float32))
    fusion_rows = [placeholder.fused_features(f) for f in train]
    banks["fusion"] = build_memory_bank("fusion", fusion_rows, 56, 0.05, cfg)
    pre_dlf = FrameScorer(banks, None, None, None, ScoreConfig())
    scored = [pre_dlf.bank_scores(f) for f in held_out]
    image_nb, maps_nbhw = np.stack([s[0] for s in scored]), np.stack([s[1] for s in scored])
    norm = fit_score_normaliser(image_nb, maps_nbhw)
    scorer = FrameScorer(banks, fit_dlf(image_nb, maps_nbhw, norm, DLFConfig()), norm, None, ScoreConfig())
    normal = frame()
    rgb, point = normal.rgb_hwc.copy(), normal.point_hwc.copy()
    rgb[5, 5] += 6.0
    point[10:12, 10:12] += 6.0
    good, bad = scorer.score(normal), scorer.score(PatchFeatures(rgb_hwc=rgb, point_hwc=point))
    for variant in VARIANTS:
        assert bad.image[variant] > good.image[variant], variant
        row, col = np.unravel_index(np.argmax(bad.maps[variant]), (224, 224))
        assert abs(row - 42) <= 8 and abs(col - 42) <= 8, variant
