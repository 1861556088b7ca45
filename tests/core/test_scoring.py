"""Tests for core.scoring: exact kNN, PatchCore reweighting, bilinear upsampling, blur, bank scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist

from core.ann import FaissIndex
from core.config import ScoreConfig
from core.errors import ConfigError, InputError, ShapeError
from core.scoring import (
    KnownRows,
    MemoryBank,
    _search_known,
    argmin_rerank,
    bank_image_score,
    gaussian_blur,
    local_norm_max,
    nearest_neighbours,
    nearest_per_patch,
    normalise_features,
    reweighted_image_score,
    score_bank,
    search_bank,
    topk_mean,
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


# ---------------------------------------------------------------- bank validation and stored forms


def test_memory_bank_rejects_each_malformed_field() -> None:
    feats, mean = _rand((10, 4), 20), np.zeros(4, np.float32)
    with pytest.raises(ShapeError, match=r"bank feats must be \(M>0, C\), got \(0, 4\)"):
        MemoryBank("x", np.zeros((0, 4), np.float32), 8, mean, 1.0)
    with pytest.raises(ShapeError, match=r"bank feats must be \(M>0, C\), got \(4,\)"):
        MemoryBank("x", np.zeros(4, np.float32), 8, mean, 1.0)
    with pytest.raises(ShapeError, match=r"feat_scale must be a scalar or \(4,\), got \(3,\)"):
        MemoryBank("x", feats, 8, mean, np.ones(3, np.float32))
    for scale in (np.array([1.0, 1.0, 0.0, 1.0], np.float32), np.inf, -1.0, np.nan):
        with pytest.raises(ConfigError, match="feat_scale must be > 0 and grid positive"):
            MemoryBank("x", feats, 8, mean, scale)
    for grid in (0, -1):
        with pytest.raises(ConfigError, match="feat_scale must be > 0 and grid positive"):
            MemoryBank("x", feats, grid, mean, 1.0)
    with pytest.raises(ShapeError, match=r"local scale must be \(10,\) per row or \(64,\) per position"):
        MemoryBank("x", feats, 8, mean, 1.0, local_scale_k=np.ones((10, 1), np.float32))
    for bad in (np.full(10, np.nan), np.full(64, np.inf), -np.ones(10)):
        with pytest.raises(ConfigError, match="bank 'x': local scales must be finite and > 0"):
            MemoryBank("x", feats, 8, mean, 1.0, local_scale_k=bad)


def test_memory_bank_stores_float32_and_the_scale_in_its_own_form() -> None:
    feats64 = _rand((10, 4), 21).astype(np.float64)
    scalar = MemoryBank("x", feats64, 8, np.ones(4), 2)
    assert scalar.feats_mc.dtype == np.float32 and scalar.feats_mc.flags.c_contiguous
    assert scalar.feat_mean_c.dtype == np.float32 and scalar.dim == 4
    assert type(scalar.feat_scale) is float and scalar.feat_scale == 2.0
    assert scalar.local_scale_k is None and scalar.local_inv_k is None
    per_channel = MemoryBank("x", feats64, 8, np.ones(4), np.array([1.0, 2.0, 4.0, 8.0]))
    assert per_channel.feat_scale.dtype == np.float32 and per_channel.feat_scale.shape == (4,)
    for count in (10, 64):  # per bank row or per grid position
        local = np.linspace(0.5, 4.0, count)
        bank = MemoryBank("x", feats64, 8, np.ones(4), 1.0, local_scale_k=local)
        assert bank.local_scale_k.dtype == np.float32 and bank.local_inv_k.dtype == np.float32
        np.testing.assert_allclose(bank.local_inv_k, 1.0 / local, rtol=1e-6)


# --------------------------------------------------------------------- known prefixes (background skip)


def _scaled_bank(rows: int, dim: int, grid: int, seed: int, index: object | None = None) -> MemoryBank:
    """A bank with a per-channel mean and std, so every prefix channel is normalised differently."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=dim).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, dim).astype(np.float32)
    feats = rng.normal(size=(rows, dim)).astype(np.float32)
    return MemoryBank("fusion", feats, grid, mean, scale, index=index)  # type: ignore[arg-type]


def test_known_prefix_holds_the_distance_of_the_constant_half_to_every_row() -> None:
    bank = _scaled_bank(50, 6, 4, seed=22)
    raw = np.array([0.5, -1.0], np.float32)
    prefix = bank.known_prefix(raw)
    value = (raw - bank.feat_mean_c[:2]) / bank.feat_scale[:2]
    np.testing.assert_array_equal(prefix.value_d, value)
    feats = bank.feats_mc.astype(np.float64)
    expected_m = ((feats[:, :2] - value) ** 2).sum(axis=1) + (feats[:, 2:] ** 2).sum(axis=1)
    assert prefix.dims == 2 and prefix.partial_m.dtype == np.float32
    np.testing.assert_allclose(prefix.partial_m, expected_m, rtol=1e-6)
    assert prefix.nn_idx == int(np.argmin(expected_m)) and np.isnan(prefix.nn_dist)


def test_a_whole_query_prefix_is_bit_equal_to_the_per_frame_search() -> None:
    bank = _scaled_bank(50, 6, 4, seed=23)
    raw = np.array([0.5, -1.0, 2.0, 0.0, 0.3, -0.7], np.float32)
    prefix = bank.known_prefix(raw)
    dist, idx = nearest_neighbours(normalise_features(raw[None], bank), bank.feats_mc)
    assert prefix.nn_idx == idx[0, 0] and prefix.nn_dist == dist[0, 0]
    zero_dist, zero_idx = nearest_neighbours(normalise_features(np.zeros((1, 6)), bank), bank.feats_mc)
    assert bank.zero_query.dims == 6 and bank.zero_query.nn_idx == zero_idx[0, 0]
    assert bank.zero_query.nn_dist == zero_dist[0, 0]


def test_known_prefix_rejects_empty_too_long_or_non_finite_prefixes() -> None:
    bank = _scaled_bank(20, 6, 4, seed=24)
    for raw, dims in ((np.zeros(0), 0), (np.zeros(7), 7), (np.array([1.0, np.nan]), 2), ([np.inf], 1)):
        with pytest.raises(ShapeError, match=rf"finite with 1\.\.6 channels, got {dims}"):
            bank.known_prefix(np.asarray(raw, np.float32))


def _queries_with_prefix(bank: MemoryBank, raw_prefix: np.ndarray, seed: int) -> tuple[np.ndarray, KnownRows]:
    """16 normalised queries; rows 2..13 start with `raw_prefix`, in identical pairs (one group per pair)."""
    rng = np.random.default_rng(seed)
    raw_nc = rng.normal(size=(16, bank.dim)).astype(np.float32)
    rows = np.arange(2, 14)
    raw_nc[rows[1::2]] = raw_nc[rows[0::2]]  # pairs share their tail: same token, same query
    raw_nc[rows, : raw_prefix.shape[0]] = raw_prefix
    groups = np.repeat(np.arange(6), 2)
    return normalise_features(raw_nc, bank), KnownRows(rows, bank.known_prefix(raw_prefix), groups)


@pytest.mark.parametrize("grouped", [True, False])
def test_known_rows_find_the_same_rows_and_distances_as_a_full_search(grouped: bool) -> None:
    bank = _scaled_bank(200, 6, 4, seed=25)
    query, known = _queries_with_prefix(bank, np.array([0.5, -1.0, 0.2, 0.0], np.float32), seed=26)
    if not grouped:
        known = KnownRows(known.rows_n, known.prefix)
    full_dist, full_idx = search_bank(query, bank)
    dist, idx = nearest_per_patch(query, bank, known)
    np.testing.assert_array_equal(idx, full_idx)
    np.testing.assert_allclose(dist, full_dist, rtol=1e-6)
    assert dist.dtype == np.float32 and idx.dtype == np.int64
    # searched in blocks of 5 representatives (6 groups or 12 rows): the same result
    block_dist, block_idx = _search_known(query, bank, known, chunk_rows=5)
    np.testing.assert_array_equal(block_idx, full_idx[known.rows_n])
    np.testing.assert_allclose(block_dist, full_dist[known.rows_n], rtol=1e-6)


def test_known_rows_with_a_whole_query_prefix_take_its_constant() -> None:
    bank = _scaled_bank(200, 6, 4, seed=27)
    raw = np.array([0.5, -1.0, 0.2, 0.0, 1.5, -2.0], np.float32)
    query, known = _queries_with_prefix(bank, raw, seed=28)
    dist, idx = nearest_per_patch(query, bank, known)
    assert np.all(idx[known.rows_n] == known.prefix.nn_idx)
    assert np.all(dist[known.rows_n] == np.float32(known.prefix.nn_dist))
    full_dist, full_idx = search_bank(query, bank)
    np.testing.assert_array_equal(idx, full_idx)
    np.testing.assert_allclose(dist, full_dist, rtol=1e-6)
    empty = KnownRows(np.empty(0, np.int64), known.prefix)
    np.testing.assert_array_equal(nearest_per_patch(query, bank, empty)[1], full_idx)


# ------------------------------------------------------------------------------- approximate index


def _ivf_index(bank: MemoryBank, nlist: int, nprobe: int) -> FaissIndex:
    import faiss

    quantizer = faiss.IndexFlatL2(bank.dim)
    ivf = faiss.IndexIVFFlat(quantizer, bank.dim, nlist)
    ivf.train(bank.feats_mc)
    ivf.add(bank.feats_mc)
    return FaissIndex(ivf, "ivf-flat", {"nprobe": nprobe})


def test_an_index_picks_the_rows_and_the_distance_is_exact_to_the_row_it_picked() -> None:
    plain = _scaled_bank(400, 8, 4, seed=29)
    index = _ivf_index(plain, nlist=16, nprobe=1)  # one list of 16: many recall misses
    bank = MemoryBank("fusion", plain.feats_mc, 4, plain.feat_mean_c, plain.feat_scale, index=index)
    query = _rand((300, 8), 30)
    dist, idx = search_bank(query, bank)
    np.testing.assert_array_equal(idx, index.search(query))
    exact = np.linalg.norm(query.astype(np.float64) - bank.feats_mc[idx], axis=1)
    np.testing.assert_allclose(dist, exact, rtol=1e-6)
    assert dist.dtype == np.float32 and idx.dtype == np.int64
    true_dist, true_idx = search_bank(query, plain)
    assert (idx != true_idx).mean() > 0.1 and np.all(dist >= true_dist - 1e-5)  # the index really ran
    empty_dist, empty_idx = search_bank(query[:0], bank)
    assert empty_dist.shape == empty_idx.shape == (0,)
    assert empty_dist.dtype == np.float32 and empty_idx.dtype == np.int64
    # known rows with an index: one index search per group, broadcast to the group's rows
    raw_prefix = np.array([0.5, -1.0, 0.2], np.float32)
    known_query, known = _queries_with_prefix(bank, raw_prefix, seed=31)
    k_dist, k_idx = nearest_per_patch(known_query, bank, known)
    ref_dist, ref_idx = search_bank(known_query, bank)
    np.testing.assert_array_equal(k_idx, ref_idx)
    np.testing.assert_allclose(k_dist, ref_dist, rtol=1e-6)


# --------------------------------------------------------------------------------- near-tie re-ranking


def test_rerank_resolves_near_ties_by_exact_distance_then_lowest_row() -> None:
    bank_mc = np.array([[3.0], [1.0], [2.0], [1.0], [9.0]], np.float32)
    query_nc = np.array([[0.0], [0.0], [0.0]], np.float32)
    tiny = 1e-7  # inside the band 16 eps * magnitude 1
    ranking = np.array(
        [
            [1.0, 1.0 + tiny, 1.0 - tiny, 5.0, 5.0],  # rows 0-2 in band: row 1 is nearest exactly
            [5.0, 1.0, 5.0, 1.0 - tiny, 5.0],  # rows 1 and 3 tie exactly: the lower index wins
            [1.0, 5.0, 5.0, 5.0, 0.5],  # row 4 alone in band (far outside the others): plain argmin
        ],
        np.float32,
    )
    idx = argmin_rerank(ranking, np.ones(3, np.float32), query_nc, bank_mc)
    np.testing.assert_array_equal(idx, [1, 1, 4])
    # a band of exactly 1 + 16 eps: 1.0 + 2 eps is in, 1.0 + 32 eps is not
    eps = float(np.finfo(np.float32).eps)
    edge = np.array([[1.0, 1.0 + 32 * eps, 1.0 + 2 * eps, 5.0, 5.0]], np.float32)
    assert argmin_rerank(edge, np.ones(1, np.float32), query_nc[:1], bank_mc)[0] == 2
    far = np.array([[1.0, 1.0 + 32 * eps, 5.0, 5.0, 5.0]], np.float32)
    assert argmin_rerank(far, np.ones(1, np.float32), query_nc[:1], bank_mc)[0] == 0


@pytest.mark.parametrize(("columns", "expected"), [(64, 3), (65, 5)])
def test_rerank_gives_up_beyond_64_candidates_per_query(columns: int, expected: int) -> None:
    bank_mc = np.full((columns, 1), 2.0, np.float32)
    bank_mc[3] = 1.0  # exactly nearest to the zero query
    ranking = np.full((1, columns), 1.0, np.float32)
    ranking[0, 5] = 1.0 - 1e-7  # plain argmin
    assert (
        argmin_rerank(ranking, np.ones(1, np.float32), np.zeros((1, 1), np.float32), bank_mc)[0] == expected
    )


# ------------------------------------------------------------------------ maps and image-score rules


def test_upsample_rejects_a_map_that_is_not_2d() -> None:
    for shape in ((4,), (2, 2, 2)):
        with pytest.raises(ShapeError, match=rf"map must be 2-D, got \({shape[0]},"):
            upsample_bilinear(np.zeros(shape, np.float32), 8)


def test_upsample_of_a_constant_is_the_constant_and_of_one_row_repeats_it() -> None:
    np.testing.assert_array_equal(
        upsample_bilinear(np.full((3, 5), 2.5, np.float32), 7), np.full((7, 7), 2.5)
    )
    line = np.array([[0.0, 4.0]], np.float32)  # (1, 2) -> (4, 4): every row the same ramp
    got = upsample_bilinear(line, 4)
    np.testing.assert_allclose(got, np.tile([0.0, 1.0, 3.0, 4.0], (4, 1)), atol=1e-6)


def test_no_blur_returns_a_float32_copy() -> None:
    img = np.arange(12, dtype=np.float64).reshape(3, 4)
    for sigma in (0.0, -1.0):
        out = gaussian_blur(img, sigma)
        assert out.dtype == np.float32 and np.array_equal(out, img)
        out[0, 0] = 99.0
        assert img[0, 0] == 0.0


@pytest.mark.parametrize(
    ("fraction", "expected"), [(0.4, 4.5), (0.41, 4.0), (1.0, 3.0), (2.0, 3.0), (0.0, 5.0), (0.2, 5.0)]
)
def test_topk_mean_averages_the_ceil_share_of_largest_distances(fraction: float, expected: float) -> None:
    assert topk_mean(np.array([5.0, 1.0, 4.0, 2.0, 3.0], np.float32), fraction) == pytest.approx(expected)


def test_local_norm_row_key_divides_by_the_scale_of_each_patchs_nearest_row() -> None:
    feats = _rand((3, 2), 32)
    bank = MemoryBank("rgb", feats, 2, np.zeros(2, np.float32), 1.0, local_scale_k=np.array([1.0, 4.0, 0.5]))
    dist = np.array([1.0, 8.0, 1.0, 2.0], np.float32)
    assert local_norm_max(dist, np.array([1, 1, 2, 0]), bank, "row") == pytest.approx(2.0)
    with pytest.raises(ConfigError, match=r"local scales are \(3,\), the 'position' key needs \(4,\)"):
        local_norm_max(dist, np.array([1, 1, 2, 0]), bank, "position")


def test_an_unknown_image_rule_is_refused_at_scoring_time() -> None:
    cfg = ScoreConfig()
    object.__setattr__(cfg, "image_rule", "median")  # a config mutated after its own validation
    bank = MemoryBank("rgb", _RULE_BANK_ROWS, 2, np.zeros(1, np.float32), 1.0)
    with pytest.raises(ConfigError, match="unknown image_rule 'median'"):
        bank_image_score(cfg, _RULE_QUERY_HWC.reshape(4, 1), bank, np.zeros(4), np.zeros(4, int), None)


# ----------------------------------------------------------------------------------- score_bank paths


def test_score_bank_skip_uses_the_zero_constant_only_for_all_zero_rows() -> None:
    bank = _scaled_bank(300, 6, 8, seed=33)
    query = _rand((8, 8, 6), 34)
    query[:3] = 0.0
    query[5, 5, 1:] = 0.0  # one zero channel short of background: searched like any patch
    cfg = ScoreConfig(output_size=32)
    fast, full = score_bank(query, bank, cfg), score_bank(query, bank, cfg, skip_background=False)
    np.testing.assert_allclose(fast.patch_dist_hw, full.patch_dist_hw, rtol=1e-6)
    assert fast.image_score == pytest.approx(full.image_score, rel=1e-6)
    np.testing.assert_allclose(fast.map_hw, full.map_hw, rtol=1e-5)
    assert np.all(fast.patch_dist_hw[:3] == np.float32(bank.zero_query.nn_dist))
    np.testing.assert_array_equal(fast.query_nc, normalise_features(query.reshape(64, 6), bank))
    np.testing.assert_array_equal(fast.nearest_n, search_bank(fast.query_nc, bank)[1])
    assert fast.patch_dist_hw.shape == (8, 8) and fast.map_hw.shape == (32, 32)


def test_score_bank_without_skip_ignores_given_known_rows() -> None:
    bank = _scaled_bank(300, 6, 8, seed=35)
    query = _rand((8, 8, 6), 36)
    # a wrong claim: these rows do not start with this prefix; only the skip path would believe it
    wrong = KnownRows(np.arange(10), bank.known_prefix(np.full(6, 7.0, np.float32)))
    cfg = ScoreConfig(output_size=32)
    full = score_bank(query, bank, cfg, skip_background=False)
    ignored = score_bank(query, bank, cfg, known=wrong, skip_background=False)
    np.testing.assert_array_equal(ignored.patch_dist_hw, full.patch_dist_hw)
    believed = score_bank(query, bank, cfg, known=wrong)
    assert not np.allclose(believed.patch_dist_hw.reshape(-1)[:10], full.patch_dist_hw.reshape(-1)[:10])


def test_nearest_neighbours_refuses_a_zero_chunk_instead_of_returning_unfilled_indices() -> None:
    from core.errors import ConfigError
    from core.scoring import nearest_neighbours

    bank_mc = np.eye(4, dtype=np.float32)
    with pytest.raises(ConfigError, match=r"chunk_rows=0 must be >= 1"):
        nearest_neighbours(bank_mc[:2], bank_mc, k=1, chunk_rows=0)


def _reweight_with_support(
    query: np.ndarray, bank_mc: np.ndarray, dist_n: np.ndarray, support: np.ndarray
) -> float:
    """Spec §6 in float64 with the support rows of m* given (m* itself first)."""
    patch = int(np.argmax(dist_n))
    s_star = float(dist_n[patch])
    d_j = np.linalg.norm(bank_mc[support[1:]].astype(np.float64) - query[patch], axis=1)
    root_dim = np.sqrt(query.shape[1])
    return float((1 - np.exp(s_star / root_dim) / np.exp(d_j / root_dim).sum()) * s_star)


def test_reweighting_takes_the_neighbours_of_m_star_from_the_banks_index() -> None:
    plain = _scaled_bank(400, 8, 4, seed=29)
    bank_mc, query = plain.feats_mc, _rand((60, 8), 31)
    full = _ivf_index(plain, nlist=16, nprobe=16)  # every list probed: the exact neighbours
    dist, idx = nearest_neighbours(query, bank_mc)
    exact = reweighted_image_score(query, bank_mc, dist[:, 0], idx[:, 0], k=3)
    assert reweighted_image_score(query, bank_mc, dist[:, 0], idx[:, 0], k=3, index=full) == pytest.approx(
        exact, rel=1e-6
    )
    # One list probed: the support is whatever the index finds near m*, and that is what is used.
    coarse = _ivf_index(plain, nlist=40, nprobe=1)
    m_star_row = int(idx[int(np.argmax(dist[:, 0])), 0])
    support = coarse.neighbours(bank_mc[m_star_row][None], 3)[0]
    exact_support = nearest_neighbours(bank_mc[m_star_row][None], bank_mc, k=3)[1][0]
    assert support[0] == m_star_row and set(support) != set(exact_support)  # the fixture tells them apart
    got = reweighted_image_score(query, bank_mc, dist[:, 0], idx[:, 0], k=3, index=coarse)
    assert got == pytest.approx(_reweight_with_support(query, bank_mc, dist[:, 0], support), rel=1e-6)
    assert got != pytest.approx(exact, rel=1e-6)


def test_reweighting_falls_back_to_exact_when_the_index_finds_too_few_rows() -> None:
    plain = _scaled_bank(400, 8, 4, seed=29)
    bank_mc, query = plain.feats_mc, _rand((60, 8), 31)
    coarse = _ivf_index(plain, nlist=40, nprobe=1)  # lists of ~10 rows cannot supply 60 neighbours
    dist, idx = nearest_neighbours(query, bank_mc)
    m_star_row = int(idx[int(np.argmax(dist[:, 0])), 0])
    assert (coarse.neighbours(bank_mc[m_star_row][None], 60) < 0).any()
    exact = reweighted_image_score(query, bank_mc, dist[:, 0], idx[:, 0], k=60)
    assert reweighted_image_score(query, bank_mc, dist[:, 0], idx[:, 0], k=60, index=coarse) == exact
    with pytest.raises(ConfigError, match=r"^neighbours needs k >= 1, got 0$"):
        coarse.neighbours(query[:1], 0)


def test_score_bank_reweights_through_the_banks_index() -> None:
    plain = _scaled_bank(400, 8, 4, seed=29)
    coarse = _ivf_index(plain, nlist=40, nprobe=1)
    bank = MemoryBank("fusion", plain.feats_mc, 4, plain.feat_mean_c, plain.feat_scale, index=coarse)
    raw = _rand((4, 4, 8), 33, scale=2.0)
    result = score_bank(raw, bank, ScoreConfig(image_rule="max_patch"))
    dist_n = result.patch_dist_hw.reshape(-1)
    patch = int(np.argmax(dist_n))
    support = coarse.neighbours(bank.feats_mc[result.nearest_n[patch]][None], 3)[0]
    expected = _reweight_with_support(result.query_nc, bank.feats_mc, dist_n, support)
    assert result.image_score == pytest.approx(expected, rel=1e-6)
    exact = reweighted_image_score(result.query_nc, bank.feats_mc, dist_n, result.nearest_n)
    assert result.image_score != pytest.approx(exact, rel=1e-6)  # the index's support, not the exact one


def _bank_whose_index_misses_the_zero_query() -> MemoryBank:
    """Two IVF lists around (1, 0) and (-1.2, 0), and one row at (-0.3, 0) in the far list: the zero
    query probes the near list only (nprobe 1) and finds a row ~1 away, while its true neighbour is 0.3."""
    import faiss

    rng = np.random.default_rng(41)
    near = np.c_[1.0 + 0.02 * rng.normal(size=50), 0.02 * rng.normal(size=50)]
    far = np.c_[-1.2 + 0.02 * rng.normal(size=49), 0.02 * rng.normal(size=49)]
    feats = np.vstack([near, far, [[-0.3, 0.0]]]).astype(np.float32)
    quantizer = faiss.IndexFlatL2(2)
    quantizer.add(np.array([[1.0, 0.0], [-1.2, 0.0]], np.float32))
    ivf = faiss.IndexIVFFlat(quantizer, 2, 2)
    ivf.add(feats)
    index = FaissIndex(ivf, "ivf-flat", {"nprobe": 1})
    return MemoryBank("point", feats, 4, np.zeros(2, np.float32), 1.0, index=index)


def test_background_patches_keep_their_exact_distance_where_the_index_would_miss() -> None:
    """The skip is not only faster: a background patch gets the exact distance of the zero query (computed
    once per bank), where searching it through an approximate index would report a farther row."""
    bank = _bank_whose_index_misses_the_zero_query()
    query = np.zeros((4, 4, 2), np.float32)
    query[2:, :] = np.array([0.9, 0.05], np.float32)  # half the grid is object, near the first list
    cfg = ScoreConfig(output_size=16)
    fast = score_bank(query, bank, cfg)
    searched = score_bank(query, bank, cfg, skip_background=False)
    assert bank.zero_query.nn_dist == pytest.approx(0.3, abs=1e-6)
    np.testing.assert_allclose(fast.patch_dist_hw[:2], 0.3, atol=1e-6)  # exact, from the constant
    assert searched.patch_dist_hw[:2].min() > 0.9  # the index alone never sees the (-0.3, 0) row
    np.testing.assert_array_equal(fast.patch_dist_hw[2:], searched.patch_dist_hw[2:])  # object: same search
