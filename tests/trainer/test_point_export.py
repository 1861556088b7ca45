"""Point-MAE's MatMul-form mini-PointNet: equals the Conv1d form, exports without Conv, int8 on MatMuls."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edge.runners.ort import OrtRunner
from trainer.checkpoints import random_init
from trainer.export import check_parity, export_onnx, quantize_int8
from trainer.models.point_mae import build_point_backbone
from trainer.point_export import pointwise_point_module

GROUPS, POINTS = 32, 16  # the module runs on any G and K; small keeps the test fast


def _inputs(clouds: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "neighborhood": rng.normal(0, 0.004, (clouds, GROUPS, POINTS, 3)).astype(np.float32),
        "centers": (rng.uniform(-0.05, 0.05, (clouds, GROUPS, 3)) + [0, 0, 0.4]).astype(np.float32),
    }


def _module(point_bn: str) -> torch.nn.Module:
    model = random_init(build_point_backbone(point_bn), seed=1)
    generator = torch.Generator().manual_seed(2)
    for bn in (model.encoder.first_conv[1], model.encoder.second_conv[1]):
        # non-trivial affine and running statistics, so a wrong fold or a skipped norm shows
        bn.weight.data.uniform_(0.5, 1.5, generator=generator)
        bn.bias.data.normal_(0, 0.3, generator=generator)
        bn.running_mean.normal_(0, 0.01, generator=generator)
        bn.running_var.uniform_(1e-5, 1e-4, generator=generator)
    for conv in (*model.encoder.first_conv[::3], *model.encoder.second_conv[::3]):
        conv.bias.data.normal_(0, 0.05, generator=generator)
    return model.eval()


@pytest.mark.parametrize("chunk_groups", [5, 64])  # 7 chunks (the last of 2 groups) / one chunk
@pytest.mark.parametrize("point_bn", ["batch", "stored"])
def test_matmul_form_equals_the_conv_form_per_cloud(point_bn: str, chunk_groups: int) -> None:
    # float64: the rewrite is exact algebra (chunks, the first BatchNorm's statistics from the input
    # covariance, the second's from per-chunk sums), so only float64 rounding may remain (fp32 differs by
    # summation order, amplified through 12 blocks to ~1e-4; the export parity test covers fp32)
    model = _module(point_bn).double()
    rewritten = pointwise_point_module(model, chunk_groups=chunk_groups)
    assert rewritten.encoder.chunk_groups == chunk_groups
    inputs = {k: torch.from_numpy(v).double() for k, v in _inputs().items()}
    with torch.no_grad():
        expected = model(**inputs)
        actual = rewritten(**inputs)
        alone = rewritten(**{k: v[:1] for k, v in inputs.items()})  # per-cloud BN: batch-independent
    assert float(expected.abs().max()) > 0.5  # a real signal, not all-zero features
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(alone, expected[:1], rtol=1e-9, atol=1e-9)
    assert rewritten.blocks is model.blocks  # the transformer is shared, not copied
    assert isinstance(model.encoder.first_conv[0], torch.nn.Conv1d)  # the original is left as it was


def test_chunk_groups_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_groups must be >= 1, got 0"):
        pointwise_point_module(_module("batch"), chunk_groups=0)


def test_exported_graph_has_no_conv_and_int8_quantises_the_pointwise_layers(tmp_path) -> None:
    model = _module("batch")
    chunks = 4
    rewritten = pointwise_point_module(model, chunk_groups=GROUPS // chunks)
    example = {k: torch.from_numpy(v) for k, v in _inputs(clouds=1).items()}
    path = export_onnx(rewritten, example, ["group_features"], tmp_path / "point.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Conv" not in ops
    # parity against the ORIGINAL Conv1d module: the graph computes what the trainer's network computes
    assert check_parity(model, path, _inputs(clouds=1)).ok

    int8 = quantize_int8(path, tmp_path / "point.int8.onnx")
    int8_graph = onnx.load(str(int8)).graph
    int8_ops = [n.op_type for n in int8_graph.node]
    assert "ConvInteger" not in int8_ops
    # per chunk lin2, lin3 (split in two) and lin4 (every chunk's, though the exporter gives repeated weights
    # as Identity nodes), + 12 blocks x 4 projections + 2 position-embedding layers; lin1 is not: with
    # per-cloud BatchNorm folded in, its weights are computed per cloud
    quantised = sum(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in int8_ops)
    assert quantised == 4 * chunks + 12 * 4 + 2
    assert "Identity" not in int8_ops
    fp32 = OrtRunner(path).run(_inputs(clouds=1, seed=3))["group_features"][0]
    low = OrtRunner(int8).run(_inputs(clouds=1, seed=3))["group_features"][0]
    cos_g = (fp32 * low).sum(-1) / (np.linalg.norm(fp32, axis=-1) * np.linalg.norm(low, axis=-1))
    assert cos_g.min() > 0.995  # 0.9997 mean on a generated scan at full size (BENCHMARKS.md)
    assert np.abs(fp32 - low).max() > 0  # really int8: not the fp32 graph under another name
