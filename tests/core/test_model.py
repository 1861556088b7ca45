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
from core.scoring import MemoryBank, score_bank

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


class _PerPatchUFF:
    """A numpy stand-in with UFF's structure: per patch and per modality, fused = [f(point), g(rgb)], and a
    bias, so a zero point row maps to a non-zero constant. `fixed` mimics an older graph with a fixed patch
    axis (it refuses any other length)."""

    backend = "numpy"

    def __init__(self, fixed: int | None = None) -> None:
        rng = np.random.default_rng(11)
        self.w_point = rng.normal(size=(C_POINT, C_POINT)).astype(np.float32)
        self.w_rgb = rng.normal(size=(C_RGB, C_RGB)).astype(np.float32)
        self.b_point = rng.normal(size=C_POINT).astype(np.float32)
        self.fixed = fixed
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        if fixed is not None:
            self.input_shapes = {
                "point_feats": ("batch", fixed, C_POINT),
                "rgb_feats": ("batch", fixed, C_RGB),
            }

    def fuse(self, point_nc: np.ndarray, rgb_nc: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [np.tanh(point_nc @ self.w_point + self.b_point), np.tanh(rgb_nc @ self.w_rgb)], -1
        )

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        point, rgb = inputs["point_feats"], inputs["rgb_feats"]
        assert point.dtype == rgb.dtype == np.float32 and point.shape[:2] == rgb.shape[:2]
        if self.fixed is not None:
            assert point.shape[1] == self.fixed, point.shape
        self.calls.append((point.shape, rgb.shape))
        return {"fused": self.fuse(point[0], rgb[0])[None].astype(np.float32)}


def _frame_with_background(seed: int, background_rows: int = 20) -> PatchFeatures:
    """A frame whose point grid is all-zero (background) on its top `background_rows` rows."""
    frame = _frame(np.random.default_rng(seed))
    point = frame.point_hwc.copy()
    point[:background_rows] = 0
    return PatchFeatures(rgb_hwc=frame.rgb_hwc, point_hwc=point)


def _uff_scorer(uff: _PerPatchUFF, skip_background: bool) -> FrameScorer:
    train = [_frame_with_background(s) for s in (20, 21)]
    reference = FrameScorer(
        _dummy_banks() | {"rgb": _bank("rgb", np.zeros((3, C_RGB), np.float32), 28)},
        None,
        None,
        uff,
        ScoreConfig(),
    )
    banks = {
        "rgb": _bank("rgb", np.concatenate([f.rgb_hwc.reshape(-1, C_RGB) for f in train]), 28),
        "point": _bank("point", np.concatenate([f.point_hwc.reshape(-1, C_POINT) for f in train]), 56),
        "fusion": _bank(
            "fusion", np.concatenate([reference.fused_features(f).reshape(-1, 9) for f in train]), 56
        ),
    }
    return FrameScorer(banks, _dlf(), None, uff, ScoreConfig(), skip_background=skip_background)  # type: ignore[arg-type]


@pytest.mark.parametrize("fixed", [None, 3136], ids=["dynamic-patch-axis", "fixed-patch-axis"])
@pytest.mark.parametrize("skip_background", [True, False])
def test_uff_fused_features_are_the_per_patch_fusion_of_point_and_upsampled_rgb(
    fixed: int | None, skip_background: bool
) -> None:
    uff = _PerPatchUFF(fixed)
    scorer = _uff_scorer(uff, skip_background)
    frame = _frame_with_background(5)
    expected = uff.fuse(
        frame.point_hwc.reshape(-1, C_POINT), upsample_nearest(frame.rgb_hwc, 2).reshape(-1, C_RGB)
    )
    fused = scorer.fused_features(frame)
    assert fused.shape == (56, 56, C_POINT + C_RGB) and fused.dtype == np.float32
    np.testing.assert_allclose(fused.reshape(-1, 9), expected, rtol=1e-5, atol=1e-6)
    # the constant point half of a background patch: UFF of a zero point row, computed at construction
    np.testing.assert_allclose(scorer.uff_zero_point, np.tanh(uff.b_point), rtol=1e-6)
    np.testing.assert_allclose(fused[0, 0, :C_POINT], np.tanh(uff.b_point), rtol=1e-6)
    if fixed is not None:
        assert all(p[1] == fixed for p, _ in uff.calls)  # every call padded to the graph's patch count


def test_skipping_background_changes_no_score_with_a_uff() -> None:
    frame = _frame_with_background(6)
    fast = _uff_scorer(_PerPatchUFF(), skip_background=True).score(frame)
    full = _uff_scorer(_PerPatchUFF(), skip_background=False).score(frame)
    np.testing.assert_allclose(fast.bank_image, full.bank_image, rtol=1e-5)
    np.testing.assert_allclose(fast.bank_maps, full.bank_maps, rtol=1e-5, atol=1e-6)
    for variant in VARIANTS:
        assert fast.image[variant] == pytest.approx(full.image[variant], rel=1e-5), variant
    uff = _PerPatchUFF()
    scorer = _uff_scorer(uff, skip_background=True)
    uff.calls.clear()
    scorer.fused_features(frame)
    # one call: the 36x56 foreground patches' point rows and the 784 rgb tokens side by side
    assert uff.calls == [((1, 36 * 56, C_POINT), (1, 36 * 56, C_RGB))]
    assert scorer.fusion_prefix() is scorer.fusion_prefix()  # cached once per scorer


def test_fixed_patch_count_is_read_only_from_an_int_point_axis() -> None:
    assert _uff_scorer(_PerPatchUFF(3136), True)._fixed_patches == 3136
    assert _uff_scorer(_PerPatchUFF(), True)._fixed_patches is None
    dynamic = _PerPatchUFF()
    dynamic.input_shapes = {"point_feats": ("batch", "patches", C_POINT)}  # type: ignore[attr-defined]
    assert _uff_scorer(dynamic, True)._fixed_patches is None


def test_rgb_only_scorer_scores_the_rgb_bank_alone() -> None:
    rng = np.random.default_rng(7)
    train = [_frame(rng) for _ in range(2)]
    bank = _bank("rgb", np.concatenate([f.rgb_hwc.reshape(-1, C_RGB) for f in train]), 28)
    scorer = FrameScorer({"rgb": bank}, None, None, None, ScoreConfig())
    assert scorer.rgb_only and scorer.bank_names == scorer.variants == ("rgb",)
    frame = _frame(rng)
    scores = scorer.score(PatchFeatures(rgb_hwc=frame.rgb_hwc.astype(np.float64), point_hwc=None))  # type: ignore[arg-type]
    direct = score_bank(frame.rgb_hwc, bank, ScoreConfig(), None, True)
    assert scores.bank_names == ("rgb",) and set(scores.image) == set(scores.maps) == {"rgb"}
    assert scores.bank_image.shape == (1,) and scores.bank_image.dtype == np.float32
    assert scores.image["rgb"] == pytest.approx(direct.image_score, rel=1e-6)
    assert scores.bank_maps.shape == (1, 224, 224) and scores.bank_maps.dtype == np.float32
    np.testing.assert_allclose(scores.maps["rgb"], direct.map_hw, rtol=1e-6)
    message = r"^an RGB-only FrameScorer \(rgb bank alone\) takes no UFF, DLF or normaliser$"
    norm = ScoreNormaliser(np.zeros(1), np.ones(1), np.zeros(1), np.ones(1))
    for uff, dlf, normaliser in [(_PerPatchUFF(), None, None), (None, _dlf(), None), (None, None, norm)]:
        with pytest.raises(ConfigError, match=message):
            FrameScorer({"rgb": bank}, dlf, normaliser, uff, ScoreConfig())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("point_shape", "rgb_shape"),
    [
        ((56, 56, C_POINT), (27, 27, C_RGB)),
        ((56, 55, C_POINT), (28, 28, C_RGB)),
        ((56, C_POINT), (28, 28, C_RGB)),
        ((56, 56, C_POINT), (28, C_RGB)),
    ],
    ids=["grid-not-a-multiple", "point-not-square", "point-2d", "rgb-2d"],
)
def test_misaligned_grids_are_refused(point_shape: tuple, rgb_shape: tuple) -> None:
    features = PatchFeatures(
        rgb_hwc=np.ones(rgb_shape, np.float32), point_hwc=np.ones(point_shape, np.float32)
    )
    with pytest.raises(ShapeError, match=r"^point \(.*\) / rgb \(.*\) grids are not aligned$"):
        _scorer().fused_features(features)


def test_a_normaliser_for_another_bank_count_is_refused() -> None:
    banks = _dummy_banks() | {"rgb": _bank("rgb", np.zeros((3, C_RGB), np.float32), 28)}
    two = ScoreNormaliser(np.zeros(2), np.ones(2), np.zeros(2), np.ones(2))
    with pytest.raises(ConfigError, match="^normaliser must cover 3 banks, got 2$"):
        FrameScorer(banks, _dlf(), two, None, ScoreConfig())


def test_combine_feeds_the_dlf_normalised_scores_when_the_model_has_a_normaliser() -> None:
    norm = ScoreNormaliser(
        np.array([1.0, 2.0, 4.0]),
        np.array([2.0, 0.5, 4.0]),
        np.array([0.5, 1.0, 3.0]),
        np.array([1.0, 2.0, 0.5]),
    )
    scorer = _scorer(normaliser=norm)
    bank_image = np.array([10.0, 2.0, 3.0], np.float32)
    bank_maps = np.stack([np.full((224, 224), v, np.float32) for v in (10.0, 2.0, 3.0)])
    scores = scorer.combine(bank_image, bank_maps)
    image_z = (bank_image - [1.0, 2.0, 4.0]) / [2.0, 0.5, 4.0] + 3.0  # no rgb lambda on z-scores
    pixel_z = (bank_image - [0.5, 1.0, 3.0]) / [1.0, 2.0, 0.5] + 3.0
    assert scores.image["rgb"] == 10.0  # single banks stay raw
    assert scores.image["rgb+point"] == pytest.approx(0.3 * image_z[0] + 0.7 * image_z[1], rel=1e-6)
    assert scores.maps["rgb+point+fusion"][7, 9] == pytest.approx(
        float(np.dot([0.2, 0.5, 0.3], pixel_z)), rel=1e-6
    )
