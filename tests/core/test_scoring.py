"""Tests for core.scoring: exact kNN, PatchCore reweighting, bilinear upsampling, blur, bank scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist

from core.config import ScoreConfig
from core.errors import ConfigError, InputError, ShapeError
from core.scoring import (
    MemoryBank,
    gaussian_blur,
    nearest_neighbours,
    reweighted_image_score,
    score_bank,
    upsample_bilinear,
)


def _rand(shape: tuple[int, ...], seed: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=shape) * scale + shift).astype(np.float32)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_nearest_neighbours_matches_brute_force(k: int) -> None:
    query, bank = _rand((300, 48), 0, shift=5.0), _rand((500, 48), 1, shift=5.0)
    dist, idx = nearest_neighbours(query, bank, k=k, chunk_rows=64)
    ref = cdist(query.astype(np.float64), bank.astype(np.float64))
    ref_idx = np.argsort(ref, axis=1)[:, :k]
    ref_dist = np.take_along_axis(ref, ref_idx, axis=1)
    assert dist.dtype == np.float32 and idx.dtype == np.int64 and dist.shape == (300, k)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4)
    np.testing.assert_array_equal(idx, ref_idx)


def test_nearest_neighbours_exact_zero_for_bank_rows() -> None:
    bank = _rand((40, 16), 2, shift=100.0)  # large norms: the expanded form alone would not give 0
    dist, idx = nearest_neighbours(bank, bank, k=1)
    assert np.all(dist == 0.0)
    np.testing.assert_array_equal(idx[:, 0], np.arange(40))


def test_nearest_neighbours_rejects_bad_input() -> None:
    with pytest.raises(ShapeError, match=r"query \(3, 4\) and bank \(5, 3\) must be \(N, C\) and \(M, C\)"):
        nearest_neighbours(np.zeros((3, 4), np.float32), np.zeros((5, 3), np.float32))
    with pytest.raises(ConfigError, match=r"k=3 must lie in \[1, bank rows=2\]"):
        nearest_neighbours(np.zeros((3, 4), np.float32), np.zeros((2, 4), np.float32), k=3)


def _literal_reweight(query: np.ndarray, bank: np.ndarray, k: int) -> float:
    """Spec §6 written out directly in float64, no stabilisation."""
    dists = cdist(query.astype(np.float64), bank.astype(np.float64))
    min_val, min_idx = dists.min(axis=1), dists.argmin(axis=1)
    patch = int(np.argmax(min_val))
    s_star = min_val[patch]
    m_star = bank[min_idx[patch]].astype(np.float64)
    nn_idx = np.argsort(np.linalg.norm(bank - m_star, axis=1), kind="stable")[:k]
    d_j = np.linalg.norm(bank[nn_idx[1:]] - query[patch], axis=1)
    root_dim = np.sqrt(query.shape[1])
    w = 1 - np.exp(s_star / root_dim) / np.sum(np.exp(d_j / root_dim))
    return float(w * s_star)


@pytest.mark.parametrize(("k", "dim"), [(3, 32), (5, 8), (2, 64)])
def test_reweighting_matches_literal_formula(k: int, dim: int) -> None:
    query, bank = _rand((200, dim), 3), _rand((150, dim), 4)
    dist, idx = nearest_neighbours(query, bank)
    got = reweighted_image_score(query, bank, dist[:, 0], idx[:, 0], k=k)
    assert got == pytest.approx(_literal_reweight(query, bank, k), rel=1e-5)
    # d_j >= s* bounds w to [1 - 1/(k-1), 1)
    assert (1 - 1 / (k - 1)) * dist.max() <= got < dist.max()


def test_reweighting_is_stable_for_huge_distances() -> None:
    query, bank = _rand((50, 4), 5, scale=3000.0), _rand((30, 4), 6, scale=3000.0)
    dist, idx = nearest_neighbours(query, bank)
    got = reweighted_image_score(query, bank, dist[:, 0], idx[:, 0], k=3)
    # The naive exp(s*/D) overflows float64 here; the stable form saturates w at 1.
    assert np.isfinite(got) and 0.5 * dist.max() <= got <= dist.max()
    with pytest.raises(ConfigError, match="reweighting needs k >= 2, got 1"):
        reweighted_image_score(query, bank, dist[:, 0], idx[:, 0], k=1)


@pytest.mark.parametrize(("in_hw", "out"), [((28, 28), 224), ((56, 56), 224), ((56, 56), 20), ((5, 9), 13)])
def test_upsample_matches_torch_bilinear(in_hw: tuple[int, int], out: int) -> None:
    src = _rand(in_hw, 7)
    ref = F.interpolate(
        torch.from_numpy(src)[None, None], size=(out, out), mode="bilinear", align_corners=False
    )
    got = upsample_bilinear(src, out)
    assert got.shape == (out, out) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref[0, 0].numpy(), atol=1e-5)


def _reference_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Explicit separable convolution with a 4σ-truncated normalised kernel and edge replication."""
    radius = int(4 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(img.astype(np.float64), radius, mode="edge")
    rows = sum(t * padded[:, i : i + img.shape[1]] for i, t in enumerate(taps))
    return sum(t * rows[i : i + img.shape[0], :] for i, t in enumerate(taps))


def test_blur_matches_explicit_gaussian_and_has_sigma_4() -> None:
    img = _rand((64, 80), 8)
    np.testing.assert_allclose(gaussian_blur(img, 4.0), _reference_blur(img, 4.0), atol=1e-5)
    impulse = np.zeros((101, 101), np.float32)
    impulse[50, 50] = 1.0
    out = gaussian_blur(impulse, 4.0).astype(np.float64)
    offsets = np.arange(101) - 50
    assert out.sum() == pytest.approx(1.0, abs=1e-5)
    assert (out.sum(axis=0) * offsets**2).sum() == pytest.approx(16.0, rel=1e-3)


def test_blur_keeps_float_resolution() -> None:
    # The original quantised to 256 levels of the map max; tiny differences must survive here.
    img = np.full((32, 32), 10.0, np.float32)
    img[16, 16] += 1e-3
    out = gaussian_blur(img, 4.0)
    assert out[16, 16] > out[0, 0]
    np.testing.assert_allclose(gaussian_blur(3.0 * img, 4.0), 3.0 * out, rtol=1e-6)


def _bank(feats: np.ndarray, grid: int, name: str = "point") -> MemoryBank:
    return MemoryBank(name, feats, grid, np.zeros(feats.shape[1], np.float32), 1.0)


def test_memory_bank_validates_and_caches_norms() -> None:
    feats = _rand((10, 4), 9)
    bank = _bank(feats, 8)
    np.testing.assert_allclose(bank.sq_norms_m, (feats**2).sum(axis=1), rtol=1e-6)
    with pytest.raises(ShapeError, match=r"feat_mean_c \(3,\) does not match C=4"):
        MemoryBank("x", feats, 8, np.zeros(3, np.float32), 1.0)
    with pytest.raises(ConfigError, match="bank 'x': feat_scale must be > 0 and grid positive"):
        MemoryBank("x", feats, 8, np.zeros(4, np.float32), 0.0)
    with pytest.raises(ShapeError, match="bank feats contain NaN or inf"):
        _bank(np.full((3, 4), np.nan, np.float32), 8)


def test_constant_features_score_zero() -> None:
    vec = _rand((12,), 10, shift=2.0)
    mean, scale = _rand((12,), 11), 3.5
    bank = MemoryBank("rgb", np.tile((vec - mean) / scale, (4, 1)), 28, mean, scale)
    result = score_bank(np.broadcast_to(vec, (28, 28, 12)).copy(), bank, ScoreConfig())
    assert result.image_score == pytest.approx(0.0, abs=1e-6)
    assert result.map_hw.shape == (224, 224) and result.map_hw.dtype == np.float32
    assert np.abs(result.patch_dist_hw).max() < 1e-5 and np.abs(result.map_hw).max() < 1e-5


def test_score_bank_normalises_with_bank_stats_and_finds_anomaly() -> None:
    rng = np.random.default_rng(12)
    mean, scale = rng.normal(size=6).astype(np.float32), 0.25
    raw_train = (rng.normal(size=(400, 6)) * scale + mean).astype(np.float32)
    bank = MemoryBank("point", (raw_train - mean) / scale, 14, mean, scale)
    query = raw_train[rng.integers(0, 400, 14 * 14)].reshape(14, 14, 6).copy()
    query[3, 9] += 10 * scale
    result = score_bank(query, bank, ScoreConfig(output_size=56))
    assert np.unravel_index(np.argmax(result.patch_dist_hw), (14, 14)) == (3, 9)
    # Distances are measured in the bank's normalised space (units of its scale).
    ref = cdist((query.reshape(-1, 6) - mean) / scale, bank.feats_mc).min(axis=1).reshape(14, 14)
    np.testing.assert_allclose(result.patch_dist_hw, ref, rtol=1e-4, atol=1e-6)
    row, col = np.unravel_index(np.argmax(result.map_hw), (56, 56))
    assert abs(row - 13.5) <= 2 and abs(col - 37.5) <= 2
    with pytest.raises(ShapeError, match=r"bank 'point' expects \(14, 14, 6\) features, got \(14, 14, 5\)"):
        score_bank(query[:, :, :5], bank, ScoreConfig())
    query[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="features for bank 'point' contain NaN or inf"):
        score_bank(query, bank, ScoreConfig())


# A hand-made 2x2 grid of 1-d patches against rows [0], [10], [20]: distances [1, 0, 0, 3], rows [0, 0, 1, 1].
_RULE_BANK_ROWS = np.array([[0.0], [10.0], [20.0]], np.float32)
_RULE_QUERY_HWC = np.array([[[1.0], [0.0]], [[10.0], [13.0]]], np.float32)


def _rule_score(rule: str, local_scale: np.ndarray | None = None, **cfg: object) -> float:
    bank = MemoryBank("rgb", _RULE_BANK_ROWS, 2, np.zeros(1, np.float32), 1.0, local_scale_k=local_scale)
    cfg = {"blur_sigma_px": 0.0, "output_size": 2} | cfg
    return score_bank(_RULE_QUERY_HWC, bank, ScoreConfig(image_rule=rule, **cfg)).image_score


def test_each_image_score_rule_on_a_hand_made_grid() -> None:
    from core.scoring import bank_image_score

    query_nc, dist_n = _RULE_QUERY_HWC.reshape(4, 1), np.array([1.0, 0.0, 0.0, 3.0], np.float32)
    expected_max_patch = reweighted_image_score(query_nc, _RULE_BANK_ROWS, dist_n, np.array([0, 0, 1, 1]))
    assert 1.5 < expected_max_patch < 3.0  # w·s*, w in [0.5, 1)
    assert _rule_score("max_patch") == pytest.approx(expected_max_patch, rel=1e-6)
    assert _rule_score("topk_mean", topk_fraction=0.5) == pytest.approx(2.0)  # mean of 3 and 1
    assert _rule_score("topk_mean", topk_fraction=0.01) == pytest.approx(3.0)  # at least one patch
    assert _rule_score("max_blurred_map") == pytest.approx(3.0)  # no blur, 2x2 map: the patch maximum
    blurred = _rule_score("max_blurred_map", blur_sigma_px=1.0, output_size=8)
    patch_map = np.array([[1.0, 0.0], [0.0, 3.0]], np.float32)
    assert blurred == pytest.approx(gaussian_blur(upsample_bilinear(patch_map, 8), 1.0).max())
    assert blurred < 2.99  # the blur lowers the lone peak
    # per row: distance / scale of its nearest row -> [2, 0, 0, 0.5]; patch 0 wins, not the raw max
    assert _rule_score("local_norm", np.array([0.5, 6.0, 1.0], np.float32)) == pytest.approx(2.0)
    # per position: [1, 0, 0, 3] / [1, 1, 1, 0.1]
    by_position = np.array([1.0, 1.0, 1.0, 0.1], np.float32)
    assert _rule_score("local_norm", by_position, local_key="position") == pytest.approx(30.0, rel=1e-6)
    bank = MemoryBank("rgb", _RULE_BANK_ROWS, 2, np.zeros(1, np.float32), 1.0)
    with pytest.raises(ConfigError, match="'rgb' has no local scales"):
        bank_image_score(ScoreConfig(image_rule="local_norm"), query_nc, bank, dist_n, np.zeros(4, int), None)


def test_local_scales_are_checked_against_their_key() -> None:
    with pytest.raises(ShapeError, match=r"per row or \(4,\) per position, got \(5,\)"):
        MemoryBank("rgb", _RULE_BANK_ROWS, 2, np.zeros(1, np.float32), 1.0, local_scale_k=np.ones(5))
    with pytest.raises(ConfigError, match="local scales must be finite and > 0"):
        MemoryBank("rgb", _RULE_BANK_ROWS, 2, np.zeros(1, np.float32), 1.0, local_scale_k=np.zeros(3))
    with pytest.raises(ConfigError, match=r"local scales are \(3,\), the 'position' key needs \(4,\)"):
        _rule_score("local_norm", np.ones(3, np.float32), local_key="position")
    with pytest.raises(ConfigError, match="image_rule must be one of"):
        ScoreConfig(image_rule="median")
