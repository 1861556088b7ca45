"""Point-MAE per-cloud BatchNorm ("batch"): the original train-mode BatchNorm, deterministic, also in ONNX."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch

from core.config import PRESETS, FeaturePreset
from core.errors import ConfigError
from trainer.checkpoints import random_init
from trainer.export import export_onnx
from trainer.models.point_mae import PointMAEEncoder


def _model(point_bn: str) -> PointMAEEncoder:
    """A small encoder (4 blocks) with random weights and BatchNorm running stats far from the batch's."""
    torch.manual_seed(0)
    model = PointMAEEncoder(
        depth=4, point_bn=point_bn, output_blocks=(3,)
    )  # the original's first output block
    random_init(model, seed=3)
    for bn in (model.encoder.first_conv[1], model.encoder.second_conv[1]):
        bn.running_mean.uniform_(-2.0, 2.0)
        bn.running_var.uniform_(0.5, 4.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _cloud(seed: int, groups: int = 32, k: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Metric local coordinates of a few millimetres, like MVTec scans (30-60x smaller than unit-sphere data).
    return torch.randn(1, groups, k, 3, generator=gen) * 0.003, torch.randn(
        1, groups, 3, generator=gen
    ) * 0.05


def _original_train_mode_bn(model: PointMAEEncoder) -> PointMAEEncoder:
    """What M3DM runs: the same weights, BatchNorm in training mode (no drop-path: we have none)."""
    reference = copy.deepcopy(model)
    reference.encoder.point_bn = "stored"  # plain nn.BatchNorm1d calls ...
    for bn in (reference.encoder.first_conv[1], reference.encoder.second_conv[1]):
        bn.train()  # ... in training mode: batch statistics of the one cloud in the batch
    return reference


def test_batch_mode_equals_original_train_mode_batchnorm() -> None:
    model = _model("batch")
    neighborhood, centers = _cloud(1)
    with torch.no_grad():
        ours = model(neighborhood, centers)
        original = _original_train_mode_bn(model)(neighborhood, centers)
        stored = _model("stored")(neighborhood, centers)
    assert torch.allclose(ours, original, atol=1e-5, rtol=1e-5)
    # The two modes really differ on metric-scale clouds (otherwise this test would prove nothing).
    assert (ours - stored).abs().max() > 1e-2


def test_batch_mode_normalises_each_cloud_alone_and_leaves_running_stats() -> None:
    model = _model("batch")
    (n1, c1), (n2, c2) = _cloud(1), _cloud(2)
    before = model.encoder.first_conv[1].running_mean.clone()
    with torch.no_grad():
        pair = model(torch.cat([n1, n2]), torch.cat([c1, c2]))
        alone = torch.cat([model(n1, c1), model(n2, c2)])
        again = model(torch.cat([n1, n2]), torch.cat([c1, c2]))
    assert torch.allclose(pair, alone, atol=1e-5)
    assert torch.equal(pair, again)  # deterministic: no drop-path, no stat updates
    assert torch.equal(model.encoder.first_conv[1].running_mean, before)


def test_batch_mode_exports_to_onnx_with_the_same_output(tmp_path) -> None:  # noqa: ANN001
    model = _model("batch")
    neighborhood, centers = _cloud(4)
    path = export_onnx(
        model, {"neighborhood": neighborhood, "centers": centers}, ["group_features"], tmp_path / "p.onnx"
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed in (5, 6):  # a different cloud than the export example: the statistics are computed, not baked
        n, c = _cloud(seed)
        (onnx_out,) = session.run(None, {"neighborhood": n.numpy(), "centers": c.numpy()})
        with torch.no_grad():
            reference = _original_train_mode_bn(model)(n, c).numpy()
        np.testing.assert_allclose(onnx_out, reference, atol=1e-4, rtol=1e-4)


def test_official_presets_use_per_cloud_statistics_and_bad_modes_are_refused() -> None:
    assert {PRESETS[name].point_bn for name in ("m3dm", "m3dm-v2", "m3dm-random")} == {"batch"}
    with pytest.raises(ConfigError, match="point_bn"):
        FeaturePreset("x", "free", "free", 224, 3, 3, point_bn="running")
    with pytest.raises(ValueError, match="point_bn"):
        PointMAEEncoder(depth=1, point_bn="train", output_blocks=(0,))
