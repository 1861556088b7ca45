"""Tests for core.model.FrameScorer: fused features, five variants, anomaly ranking, DLF inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import ScoreConfig
from core.errors import ConfigError, ShapeError
from core.fusion import LinearOneClassSVM, ScoreNormaliser
from core.model import VARIANTS, FrameScorer, prepare_dlf_inputs, upsample_nearest
from core.scan import PatchFeatures
from core.scoring import MemoryBank

C_RGB, C_POINT = 5, 4


def _frame(rng: np.random.Generator) -> PatchFeatures:
    return PatchFeatures(
        rgb_hwc=rng.normal(size=(28, 28, C_RGB)).astype(np.float32),
        point_hwc=rng.normal(size=(56, 56, C_POINT)).astype(np.float32),
    )


def _bank(name: str, rows: np.ndarray, grid: int) -> MemoryBank:
    return MemoryBank(name, rows, grid, np.zeros(rows.shape[1], np.float32), 1.0)


def _dlf() -> dict[str, tuple[LinearOneClassSVM, LinearOneClassSVM]]:
    two, three = np.array([0.3, 0.7]), np.array([0.2, 0.5, 0.3])
    return {
        "rgb+point": (LinearOneClassSVM(two, 1.0), LinearOneClassSVM(two, 1.0)),
        "rgb+point+fusion": (LinearOneClassSVM(three, 1.0), LinearOneClassSVM(three, 1.0)),
    }


def _scorer(normaliser: ScoreNormaliser | None = None, uff: object | None = None) -> FrameScorer:
    rng = np.random.default_rng(0)
    train = [_frame(rng) for _ in range(3)]
    plain = FrameScorer(
        {"rgb": _bank("rgb", np.zeros((3, C_RGB), np.float32), 28)} | _dummy_banks(),
        _dlf(),
        None,
        None,
        ScoreConfig(),
    )
    banks = {
        "rgb": _bank("rgb", np.concatenate([f.rgb_hwc.reshape(-1, C_RGB) for f in train]), 28),
        "point": _bank("point", np.concatenate([f.point_hwc.reshape(-1, C_POINT) for f in train]), 56),
        "fusion": _bank(
            "fusion", np.concatenate([plain.fused_features(f).reshape(-1, 9) for f in train]), 56
        ),
    }
    return FrameScorer(banks, _dlf(), normaliser, uff, ScoreConfig())  # type: ignore[arg-type]


def _dummy_banks() -> dict[str, MemoryBank]:
    return {
        "point": _bank("point", np.zeros((3, C_POINT), np.float32), 56),
        "fusion": _bank("fusion", np.zeros((3, C_POINT + C_RGB), np.float32), 56),
    }


def test_nearest_duplication_equals_adaptive_avg_pool() -> None:
    rgb = np.random.default_rng(1).normal(size=(28, 28, C_RGB)).astype(np.float32)
    pooled = torch.nn.AdaptiveAvgPool2d((56, 56))(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    np.testing.assert_array_equal(upsample_nearest(rgb, 2), pooled[0].permute(1, 2, 0).numpy())


def test_without_uff_fused_is_concatenation() -> None:
    frame = _frame(np.random.default_rng(2))
    fused = _scorer().fused_features(frame)
    assert fused.shape == (56, 56, C_POINT + C_RGB)
    np.testing.assert_array_equal(fused[..., :C_POINT], frame.point_hwc)
    np.testing.assert_array_equal(fused[40, 17, C_POINT:], frame.rgb_hwc[20, 8])
    np.testing.assert_array_equal(fused[41, 16, C_POINT:], frame.rgb_hwc[20, 8])


class _FakeUFF:
    backend = "fake"

    def __init__(self, out_rows: int = 3136) -> None:
        self.out_rows = out_rows
        self.seen: dict[str, tuple[int, ...]] = {}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.seen = {k: v.shape for k, v in inputs.items()}
        fused = 2.0 * np.concatenate([inputs["point_feats"], inputs["rgb_feats"]], axis=-1)
        return {"fused": fused[:, : self.out_rows]}


def test_uff_runner_gets_named_inputs_and_its_output_is_used() -> None:
    frame = _frame(np.random.default_rng(3))
    uff = _FakeUFF()
    fused = _scorer(uff=uff).fused_features(frame)
    assert uff.seen == {"point_feats": (1, 3136, C_POINT), "rgb_feats": (1, 3136, C_RGB)}
    np.testing.assert_allclose(fused, 2.0 * _scorer().fused_features(frame))
    with pytest.raises(ShapeError, match=r"uff runner returned \(1, 100, 9\), expected \(1, 3136, 9\)"):
        _scorer(uff=_FakeUFF(out_rows=100)).fused_features(frame)


def test_score_gives_five_variants_and_ranks_injected_anomaly_first() -> None:
    scorer = _scorer()
    rng = np.random.default_rng(4)
    normal = _frame(rng)
    rgb, point = normal.rgb_hwc.copy(), normal.point_hwc.copy()
    rgb[10, 20] += 8.0
    point[20:22, 40:42] += 8.0  # the four point patches under rgb patch (10, 20)
    normal_scores = scorer.score(normal)
    anomalous = scorer.score(PatchFeatures(rgb_hwc=rgb, point_hwc=point))
    assert set(anomalous.image) == set(VARIANTS) == set(anomalous.maps)
    assert anomalous.bank_image.shape == (3,) and anomalous.bank_maps.shape == (3, 224, 224)
    for variant in VARIANTS:
        heat = anomalous.maps[variant]
        assert heat.shape == (224, 224) and heat.dtype == np.float32
        row, col = np.unravel_index(np.argmax(heat), heat.shape)
        assert 80 - 4 <= row < 88 + 4 and 160 - 4 <= col < 168 + 4, variant
        assert anomalous.image[variant] > normal_scores.image[variant], variant


def test_combine_uses_dlf_on_lambda_weighted_inputs_without_normaliser() -> None:
    scorer = _scorer()
    bank_image = np.array([10.0, 2.0, 3.0], np.float32)
    bank_maps = np.stack([np.full((224, 224), v, np.float32) for v in (10.0, 2.0, 3.0)])
    scores = scorer.combine(bank_image, bank_maps)
    assert scores.image["rgb"] == 10.0 and scores.image["point"] == 2.0
    assert scores.image["rgb+point"] == pytest.approx(0.3 * 1.0 + 0.7 * 2.0)  # rgb * 0.1
    assert scores.maps["rgb+point+fusion"][5, 5] == pytest.approx(0.2 * 1.0 + 0.5 * 2.0 + 0.3 * 3.0)


def test_prepare_dlf_inputs_skips_lambda_when_normalised() -> None:
    norm = ScoreNormaliser(np.full(3, 1.0), np.full(3, 2.0), np.full(3, 1.0), np.full(3, 2.0))
    image, maps = prepare_dlf_inputs(np.array([5.0, 5.0, 5.0]), np.full((3, 2, 2), 5.0), norm, 0.1)
    np.testing.assert_allclose(image, np.full(3, 5.0))  # (5 - 1) / 2 + 3, same for every bank
    np.testing.assert_allclose(maps, np.full((3, 2, 2), 5.0))
    image, maps = prepare_dlf_inputs(np.array([5.0, 5.0, 5.0]), np.full((3, 2, 2), 5.0), None, 0.1)
    np.testing.assert_allclose(image, [0.5, 5.0, 5.0])
    np.testing.assert_allclose(maps[:, 0, 0], [0.5, 5.0, 5.0])


def test_scorer_rejects_missing_parts() -> None:
    banks = _dummy_banks() | {"rgb": _bank("rgb", np.zeros((3, C_RGB), np.float32), 28)}
    with pytest.raises(ConfigError, match="missing banks / DLF models: rgb$"):
        FrameScorer(_dummy_banks(), _dlf(), None, None, ScoreConfig())
    with pytest.raises(ConfigError, match="missing banks / DLF models: rgb\\+point\\+fusion"):
        FrameScorer(banks, {"rgb+point": _dlf()["rgb+point"]}, None, None, ScoreConfig())
    wrong = _dlf() | {"rgb+point": _dlf()["rgb+point+fusion"]}
    with pytest.raises(ConfigError, match="DLF for 'rgb\\+point' must take 2 features"):
        FrameScorer(banks, wrong, None, None, ScoreConfig())


def test_prepare_dlf_inputs_applies_each_banks_own_normalisation() -> None:
    """Distinct stats per bank and an input the normaliser moves: skipping it cannot go unnoticed."""
    norm = ScoreNormaliser(
        np.array([1.0, 2.0, 4.0]),
        np.array([2.0, 0.5, 4.0]),
        np.array([0.5, 1.0, 3.0]),
        np.array([1.0, 2.0, 0.5]),
    )
    image, maps = prepare_dlf_inputs(np.array([3.0, 3.0, 3.0]), np.full((3, 2, 2), 2.0), norm, 0.1)
    # (x - mean_b) / std_b + NORMALISED_SHIFT (3), bank by bank
    np.testing.assert_allclose(image, [4.0, 5.0, 2.75], rtol=1e-6)
    np.testing.assert_allclose(maps[:, 0, 0], [4.5, 3.5, 1.0], rtol=1e-6)
    assert image.dtype == np.float32 and maps.dtype == np.float32
