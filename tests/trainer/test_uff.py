"""UFF block, patch pairing, schedule, contrastive training and checkpoint I/O."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.config import UFFConfig
from core.errors import CorruptFileError, MissingWeightsError, ShapeError
from trainer.errors import TrainingError
from trainer.models.uff import FeatureFusionBlock
from trainer.train_uff import (
    contrastive_loss,
    load_official_uff,
    load_uff,
    lr_at,
    pair_patches,
    save_uff,
    train_uff,
)

OFFICIAL_KEYS = {
    f"{prefix}.{p}"
    for prefix in (
        "xyz_norm",
        "xyz_mlp.fc1",
        "xyz_mlp.fc2",
        "rgb_norm",
        "rgb_mlp.fc1",
        "rgb_mlp.fc2",
        "xyz_head",
        "rgb_head",
    )
    for p in ("weight", "bias")
}


def test_m3dm_block_matches_official_keys_and_parameter_count() -> None:
    block = FeatureFusionBlock(1152, 768)
    state = block.state_dict()
    assert set(state) == OFFICIAL_KEYS
    assert state["xyz_mlp.fc1.weight"].shape == (4608, 1152)
    assert state["rgb_mlp.fc2.weight"].shape == (768, 3072)
    assert state["xyz_head.weight"].shape == (256, 1152)
    assert sum(p.numel() for p in block.parameters()) == 15_840_896  # spec §7


def test_fuse_is_concat_of_normed_mlps_without_residual() -> None:
    torch.manual_seed(0)
    block = FeatureFusionBlock(12, 8, mlp_ratio=2, head_dim=4).eval()
    point, rgb = torch.randn(2, 5, 12), torch.randn(2, 5, 8)
    fused = block.fuse(point, rgb)
    assert fused.shape == (2, 5, 20)
    expected_point = block.xyz_mlp.fc2(torch.nn.functional.gelu(block.xyz_mlp.fc1(block.xyz_norm(point))))
    torch.testing.assert_close(fused[..., :12], expected_point)
    with torch.no_grad():  # zero second layers: a residual connection would leak the input through
        for fc in (block.xyz_mlp.fc2, block.rgb_mlp.fc2):
            fc.weight.zero_()
            fc.bias.zero_()
    assert torch.count_nonzero(block.fuse(point, rgb)) == 0


def _location_coded_grids(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Point (n,56,56,3) = (image, row, col) + 1; rgb (n,28,28,3) the same on its own grid."""
    images, rows, cols = np.meshgrid(np.arange(n), np.arange(56), np.arange(56), indexing="ij")
    point = np.stack([images, rows, cols], axis=-1).astype(np.float32) + 1
    images, rows, cols = np.meshgrid(np.arange(n), np.arange(28), np.arange(28), indexing="ij")
    rgb = np.stack([images, rows, cols], axis=-1).astype(np.float32) + 1
    return point, rgb


def test_pair_patches_pairs_each_point_patch_with_the_rgb_token_above_it() -> None:
    point, rgb = _location_coded_grids(3)
    point[1, :10] = 0  # background rows of image 1
    point_rows, rgb_rows, valid = pair_patches(point, rgb)
    assert point_rows.shape == (3 * 3136, 3) and rgb_rows.shape == (3 * 3136, 3)
    kept = point_rows[valid] - 1
    expected_rgb = np.stack([kept[:, 0], kept[:, 1] // 2, kept[:, 2] // 2], axis=1)
    np.testing.assert_array_equal(rgb_rows[valid] - 1, expected_rgb)
    assert valid.sum() == 3 * 3136 - 10 * 56
    assert not valid[3136 : 3136 + 560].any()


def test_pair_patches_rejects_mismatched_grids() -> None:
    with pytest.raises(ShapeError, match="rgb grid"):
        pair_patches(np.zeros((2, 56, 56, 4), np.float32), np.zeros((2, 27, 28, 4), np.float32))


def test_lr_schedule_warms_up_linearly_then_half_cosine_to_zero() -> None:
    base = 0.003
    assert lr_at(0, 30, 10, base) == 0.0
    assert lr_at(5, 30, 10, base) == pytest.approx(base / 2)
    assert lr_at(10, 30, 10, base) == pytest.approx(base)
    assert lr_at(20, 30, 10, base) == pytest.approx(base / 2)
    assert lr_at(30, 30, 10, base) == pytest.approx(0.0, abs=1e-12)
    decay = [lr_at(s, 30, 10, base) for s in range(10, 31)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert lr_at(0, 5, 0, base) == pytest.approx(base)  # no warm-up


def test_contrastive_loss_is_cross_entropy_on_the_diagonal_times_two_t() -> None:
    torch.manual_seed(0)
    block = FeatureFusionBlock(6, 4, mlp_ratio=2, head_dim=3)
    point, rgb = torch.randn(7, 6), torch.randn(7, 4)
    temperature = 0.5
    loss = contrastive_loss(block, point, rgb, temperature)
    point_out, rgb_out = block.branches(point, rgb)
    q = block.rgb_head(rgb_out)
    k = block.xyz_head(point_out)
    cos = (q[:, None, :] * k[None, :, :]).sum(-1) / (q.norm(dim=1)[:, None] * k.norm(dim=1)[None, :])
    log_p = torch.log_softmax(cos / temperature, dim=1)
    torch.testing.assert_close(loss, -log_p.diagonal().mean() * 2 * temperature)


def _correlated_features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Both modalities are noisy linear views of one latent per rgb location; a background strip is zero."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 28, 28, 6)).astype(np.float32)
    rgb = latent @ rng.standard_normal((6, 16)).astype(np.float32)
    latent_up = latent.repeat(2, axis=1).repeat(2, axis=2)
    point = latent_up @ rng.standard_normal((6, 24)).astype(np.float32)
    point += 0.1 * rng.standard_normal(point.shape).astype(np.float32)
    point[:, :8] = 0
    return point, rgb


CFG = UFFConfig(
    epochs=4, warmup_epochs=1, batch_images=2, max_patches_per_step=256, lr=0.003, head_dim=32, min_steps=0
)


def test_training_lowers_the_loss_and_is_deterministic() -> None:
    point, rgb = _correlated_features(4, seed=1)
    block_a, history_a = train_uff(point, rgb, CFG, progress=False)
    block_b, history_b = train_uff(point, rgb, CFG, progress=False)
    assert len(history_a) == 4 * 2
    assert history_a == history_b
    for (name, a), b in zip(block_a.state_dict().items(), block_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # Chance is 2*ln(256) ~ 11.1 (T = 1); 2x2 point patches share an rgb token, so the floor is ~2*ln(4).
    assert history_a[0] > 0.95 * 2 * math.log(256)
    assert np.mean(history_a[-2:]) < history_a[0] - 0.5
    _, history_c = train_uff(point, rgb, UFFConfig(**{**CFG.__dict__, "seed": 1}), progress=False)
    assert history_c != history_a


def test_small_data_sets_train_at_least_min_steps() -> None:
    point, rgb = _correlated_features(4, seed=1)
    cfg = UFFConfig(**{**CFG.__dict__, "epochs": 1, "min_steps": 10})
    _, history = train_uff(point, rgb, cfg, progress=False)
    assert len(history) == 10  # 2 steps per epoch -> 5 epochs


def test_training_rejects_mismatched_grids() -> None:
    with pytest.raises(ShapeError, match=r"point grid \(1, 56, 56, 4\) must be \(N,2H,2W,Cp\) for rgb grid"):
        train_uff(
            np.ones((2, 56, 56, 4), np.float32), np.ones((2, 56, 56, 4), np.float32), CFG, progress=False
        )


def test_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    block = FeatureFusionBlock(10, 6, mlp_ratio=3, head_dim=5).eval()
    path = save_uff(block, tmp_path / "model" / "uff.safetensors")
    assert set(load_file(str(path))) == OFFICIAL_KEYS
    loaded = load_uff(path)
    assert loaded.dims == {"point_dim": 10, "rgb_dim": 6, "mlp_ratio": 3, "head_dim": 5}
    point, rgb = torch.randn(1, 4, 10), torch.randn(1, 4, 6)
    torch.testing.assert_close(loaded.fuse(point, rgb), block.fuse(point, rgb), rtol=0, atol=0)


def test_load_uff_errors(tmp_path) -> None:
    with pytest.raises(MissingWeightsError, match="absent.safetensors or dims .* not found"):
        load_uff(tmp_path / "absent.safetensors")
    path = save_uff(FeatureFusionBlock(4, 4), tmp_path / "uff.safetensors")
    path.write_bytes(b"garbage")
    with pytest.raises(CorruptFileError, match="uff.safetensors"):
        load_uff(path)


def _official_checkpoint(tmp_path, state: dict) -> str:
    ckpt = {"model": state, "optimizer": {}, "epoch": 0, "scaler": {}, "args": argparse.Namespace(lr=0.003)}
    path = tmp_path / "checkpoint-0.pth"
    torch.save(ckpt, path)
    return path


def test_load_official_uff_reads_the_checkpoint_format(tmp_path) -> None:
    torch.manual_seed(0)
    block = FeatureFusionBlock(12, 8, mlp_ratio=4, head_dim=16).eval()
    loaded = load_official_uff(_official_checkpoint(tmp_path, block.state_dict()))
    assert loaded.dims == block.dims
    point, rgb = torch.randn(1, 3, 12), torch.randn(1, 3, 8)
    torch.testing.assert_close(loaded.fuse(point, rgb), block.fuse(point, rgb), rtol=0, atol=0)


def test_load_official_uff_fails_loudly_on_key_mismatch(tmp_path) -> None:
    state = FeatureFusionBlock(12, 8).state_dict()
    state.pop("rgb_head.bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CorruptFileError, match=r"missing \['rgb_head.bias'\], unexpected \['extra.weight'\]"):
        load_official_uff(_official_checkpoint(tmp_path, state))
    with pytest.raises(MissingWeightsError, match="official UFF checkpoint .*nope.pth not found"):
        load_official_uff(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(CorruptFileError, match="junk.pth"):
        load_official_uff(tmp_path / "junk.pth")


def test_a_nan_loss_fails_training_naming_epoch_and_step() -> None:
    point, rgb = _correlated_features(4, seed=1)
    point[0, 10, 10, 0] = np.nan  # one NaN feature in the first step's images poisons its loss
    cfg = UFFConfig(**{**CFG.__dict__, "batch_images": 4, "max_patches_per_step": 100_000})
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 1/4, step 1/4 .*no model was saved"):
        train_uff(point, rgb, cfg, progress=False)


def test_a_diverging_learning_rate_fails_training_instead_of_returning_nan_weights() -> None:
    point, rgb = _correlated_features(4, seed=1)
    cfg = UFFConfig(**{**CFG.__dict__, "lr": 1e12, "warmup_epochs": 0})
    with pytest.raises(TrainingError, match=r"UFF training diverged: loss is nan at epoch \d+/4, step \d+/8"):
        train_uff(point, rgb, cfg, progress=False)


def test_all_background_point_features_fail_training_as_learning_nothing() -> None:
    point, rgb = _correlated_features(4, seed=1)
    with pytest.raises(TrainingError, match="learned nothing: none of its 8 steps had two foreground"):
        train_uff(np.zeros_like(point), rgb, CFG, progress=False)
