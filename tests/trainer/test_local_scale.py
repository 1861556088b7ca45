"""trainer.local_scale: leave-one-image-out distances and shrunk, floored per-key scales (hand-made)."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ConfigError
from core.scoring import MemoryBank
from trainer.local_scale import (
    LocalScaleConfig,
    attach_local_scales,
    fit_local_scale,
    leave_one_image_out_distances,
    local_scales,
)

# Three one-patch images (grid 1) with values 0, 1, 3; the bank holds all three rows.
_GRIDS = np.array([0.0, 1.0, 3.0], np.float32).reshape(3, 1, 1, 1)
_BANK = MemoryBank("rgb", _GRIDS.reshape(3, 1), 1, np.zeros(1, np.float32), 1.0)


def test_each_image_is_scored_without_its_own_rows() -> None:
    dist, rows, positions = leave_one_image_out_distances(_GRIDS, _BANK, LocalScaleConfig())
    # 0 -> nearest of {1, 3} is 1; 1 -> {0, 3}: 0; 3 -> {0, 1}: 1. With its own row each would be 0.
    np.testing.assert_allclose(dist, [1.0, 1.0, 2.0])
    np.testing.assert_array_equal(rows, [1, 0, 1])
    np.testing.assert_array_equal(positions, [0, 0, 0])


def test_scales_shrink_toward_the_bank_wide_rms_by_hits() -> None:
    cfg = LocalScaleConfig(prior=4.0, floor=0.25)
    # squared distances 1, 1, 4: global mean 2; row 0 one hit (1), row 1 two (1, 4), row 2 none
    expected = np.sqrt([(1 + 4 * 2) / 5, (1 + 4 + 4 * 2) / 6, 2.0])
    np.testing.assert_allclose(fit_local_scale(_GRIDS, _BANK, "row", cfg), expected, rtol=1e-6)
    np.testing.assert_allclose(fit_local_scale(_GRIDS, _BANK, "position", cfg), [np.sqrt(2.0)], rtol=1e-6)


def test_no_scale_falls_below_the_floor() -> None:
    cfg = LocalScaleConfig(prior=1e-6, floor=0.25)
    scale = local_scales(np.array([0.01, 10.0]), np.array([0, 1]), 2, cfg)
    global_rms = np.sqrt((0.01**2 + 100.0) / 2)
    assert scale[0] == pytest.approx(0.25 * global_rms, rel=1e-5)  # 0.01 alone would blow distances up
    assert scale[1] == pytest.approx(10.0, rel=1e-4)
    with pytest.raises(ConfigError, match="all sit on bank rows"):
        local_scales(np.zeros(3), np.zeros(3, np.int64), 1, cfg)
    with pytest.raises(ConfigError, match="prior must be > 0"):
        LocalScaleConfig(prior=0.0)


def test_attached_scales_fit_each_bank_and_key() -> None:
    rng = np.random.default_rng(0)
    grids = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
    bank = MemoryBank("point", grids.reshape(-1, 2)[::3].copy(), 3, np.zeros(2, np.float32), 1.0)
    by_row = attach_local_scales({"point": bank}, {"point": grids}, "row")["point"]
    by_position = attach_local_scales({"point": bank}, {"point": grids}, "position")["point"]
    assert by_row.local_scale_k.shape == (12,) and by_position.local_scale_k.shape == (9,)
    np.testing.assert_allclose(by_row.local_inv_k, 1.0 / by_row.local_scale_k, rtol=1e-6)
    assert by_row.feats_mc is bank.feats_mc or np.array_equal(by_row.feats_mc, bank.feats_mc)
