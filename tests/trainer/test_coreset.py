"""Tests for trainer.coreset: per-bank sizing, greedy k-centre, memory-bank construction."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from core.config import CoresetConfig
from core.errors import ConfigError, ShapeError
from trainer.coreset import build_memory_bank, coreset_size, feature_stats, greedy_coreset


def test_each_bank_is_sized_from_its_own_rows() -> None:
    n_images = 244
    rgb_rows, point_rows = n_images * 784, n_images * 3136
    point_target = coreset_size(point_rows, 0.1, 10**9)
    assert point_target == 76518
    # M3DM sized rgb and fusion as 10% of the xyz coreset (7651); we use each bank's own count.
    assert coreset_size(rgb_rows, 0.1, 10**9) == 19129
    assert coreset_size(point_rows, 0.1, 20000) == 20000
    assert coreset_size(5, 0.1, 100) == 1
    assert coreset_size(7, 1.0, 100) == 7
    for bad in [(0, 0.1, 10), (10, 0.0, 10), (10, 1.5, 10), (10, 0.5, 0)]:
        with pytest.raises(ConfigError, match="bad coreset sizing"):
            coreset_size(*bad)


def test_greedy_picks_farthest_points_first() -> None:
    feats = np.array([[0.0], [1.0], [2.0], [10.0], [5.0], [9.0]], np.float32)
    np.testing.assert_array_equal(greedy_coreset(feats, 4), [0, 3, 4, 2])


def _covering_radius(feats: np.ndarray, idx: np.ndarray | tuple[int, ...]) -> float:
    return float(cdist(feats, feats[list(idx)]).min(axis=1).max())


def test_greedy_is_a_two_approximation_of_k_centre() -> None:
    feats = np.random.default_rng(0).normal(size=(13, 2)).astype(np.float32)
    for k in (2, 3, 4):
        optimum = min(_covering_radius(feats, c) for c in itertools.combinations(range(13), k))
        assert _covering_radius(feats, greedy_coreset(feats, k)) <= 2 * optimum + 1e-6


def test_projected_selection_is_deterministic_and_unique() -> None:
    feats = np.random.default_rng(1).normal(size=(600, 512)).astype(np.float32)  # JL dim < 512: projects
    first = greedy_coreset(feats, 60, eps=0.9, seed=3)
    assert first.dtype == np.int64 and first[0] == 0 and len(set(first.tolist())) == 60
    np.testing.assert_array_equal(first, greedy_coreset(feats, 60, eps=0.9, seed=3))
    assert not np.array_equal(first, greedy_coreset(feats, 60, eps=0.9, seed=4))
    with pytest.raises(ConfigError, match=r"target_rows=601 must lie in \[1, 600\]"):
        greedy_coreset(feats, 601)
    with pytest.raises(ShapeError, match=r"coreset input must be \(N>0, C\), got \(512,\)"):
        greedy_coreset(feats[0], 1)


def test_feature_stats_mean_per_channel_and_one_scale() -> None:
    feats = np.random.default_rng(2).normal(loc=[1.0, -2.0, 5.0], scale=[1.0, 2.0, 3.0], size=(5000, 3))
    mean_c, scale = feature_stats(feats.astype(np.float32))
    np.testing.assert_allclose(mean_c, feats.mean(axis=0), rtol=1e-5)
    assert scale == pytest.approx(np.sqrt(((feats - feats.mean(axis=0)) ** 2).mean()), rel=1e-5)
    assert feature_stats(np.ones((4, 3), np.float32))[1] == 1.0


def test_build_memory_bank_normalises_with_all_rows_then_subsamples() -> None:
    rng = np.random.default_rng(3)
    per_image = [rng.normal(loc=4.0, scale=0.5, size=(28, 28, 6)).astype(np.float32) for _ in range(5)]
    rows = np.concatenate([p.reshape(-1, 6) for p in per_image])
    bank = build_memory_bank("rgb", per_image, 28, 0.05, CoresetConfig(max_rows=150))
    assert bank.feats_mc.shape == (150, 6) and bank.grid == 28 and bank.name == "rgb"
    mean_c, scale = feature_stats(rows)
    np.testing.assert_allclose(bank.feat_mean_c, mean_c)
    assert bank.feat_scale == pytest.approx(scale)
    raw_kept = bank.feats_mc * bank.feat_scale + bank.feat_mean_c
    assert cdist(raw_kept, rows).min(axis=1).max() < 1e-5  # every kept row is a real training row
    with pytest.raises(ShapeError, match="disagree on the channel count"):
        build_memory_bank("rgb", [rows, rows[:, :5]], 28, 0.1, CoresetConfig())


def test_no_cap_by_default_and_a_binding_cap_warns(caplog: pytest.LogCaptureFixture) -> None:
    assert CoresetConfig().max_rows is None
    assert coreset_size(244 * 3136, 0.1) == 76518  # the method's full 10%: no 20k cap any more
    feats = np.random.default_rng(0).normal(size=(2000, 8)).astype(np.float32)
    with caplog.at_level("WARNING", logger="m3dm.trainer"):
        free = build_memory_bank("point", feats, 56, 0.1, CoresetConfig())
        assert not caplog.records
        capped = build_memory_bank("point", feats, 56, 0.1, CoresetConfig(max_rows=50))
    assert free.feats_mc.shape[0] == 200 and capped.feats_mc.shape[0] == 50
    assert any("max-bank-rows 50 binds" in r.getMessage() for r in caplog.records)


def test_the_fit_passes_its_coreset_device_to_the_selection() -> None:
    from core.config import FitConfig, get_preset
    from trainer.fit import bank_from_grids

    feats_nhwc = np.random.default_rng(0).standard_normal((2, 8, 8, 6)).astype(np.float32)
    cfg = FitConfig(preset=get_preset("m3dm-free"))
    on_cpu = bank_from_grids("rgb", feats_nhwc, 0.25, cfg, device="cpu")
    if torch.cuda.is_available():  # the accelerator path selects the same rows
        on_gpu = bank_from_grids("rgb", feats_nhwc, 0.25, cfg, device="cuda")
        assert np.array_equal(on_gpu.feats_mc, on_cpu.feats_mc)
    else:  # the device reaches the selection: asking for CUDA here is a clear error, not a silent cpu run
        with pytest.raises(ConfigError, match="torch sees no CUDA device"):
            bank_from_grids("rgb", feats_nhwc, 0.25, cfg, device="cuda")
    with pytest.raises(ConfigError, match="only cpu and cuda"):
        bank_from_grids("rgb", feats_nhwc, 0.25, cfg, device="meta")
