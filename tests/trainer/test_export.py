"""ONNX export with a dynamic batch, the parity gate, and the torch runner."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from core.errors import ShapeError
from core.runner import Runner
from edge.runners.ort import OrtRunner
from trainer.export import (
    FP32_ATOL,
    FP32_RTOL,
    ExportError,
    check_parity,
    export_onnx,
    inline_identity_initializers,
    quantize_int8,
)
from trainer.models.point_mae import PointMAEEncoder
from trainer.models.uff import FeatureFusionBlock, UFFExport
from trainer.torch_runner import TorchRunner


def _uff(point_dim: int = 48, rgb_dim: int = 32) -> UFFExport:
    torch.manual_seed(0)
    return UFFExport(FeatureFusionBlock(point_dim, rgb_dim)).eval()


def _uff_inputs(batch: int = 1, patches: int = 3136, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    point = rng.standard_normal((batch, patches, 48)).astype(np.float32)
    point[:, :100] = 0  # background rows, as in real features
    return {"point_feats": point, "rgb_feats": rng.uniform(0, 3, (batch, patches, 32)).astype(np.float32)}


def _export_uff(tmp_path, module: nn.Module) -> object:
    example = {k: torch.from_numpy(v) for k, v in _uff_inputs().items()}
    return export_onnx(module, example, ["fused"], tmp_path / "uff.onnx")


def test_uff_export_names_dynamic_batch_and_parity(tmp_path) -> None:
    module = _uff()
    path = _export_uff(tmp_path, module)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["point_feats", "rgb_feats"]
    assert [o.name for o in graph.output] == ["fused"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3136, 48]
    report = check_parity(module, path, _uff_inputs())
    assert report.ok
    assert report.max_abs_err < FP32_ATOL and report.max_rel_err < FP32_RTOL
    # The batch axis really is dynamic: a batch of 3 runs and matches torch.
    three = _uff_inputs(batch=3, seed=2)
    fused = OrtRunner(path).run(three)["fused"]
    expected = TorchRunner(module, ["point_feats", "rgb_feats"], ["fused"]).run(three)["fused"]
    np.testing.assert_allclose(fused, expected, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_parity_failure_raises_with_the_numbers(tmp_path) -> None:
    module = _uff()
    path = _export_uff(tmp_path, module)
    with torch.no_grad():
        module.block.rgb_mlp.fc2.bias.add_(0.01)  # eager weights drift from the exported graph
    with pytest.raises(ExportError, match=r"max abs (1\.00\de-02|9\.99\de-03), max rel"):
        check_parity(module, path, _uff_inputs())
    report = check_parity(module, path, _uff_inputs(), raise_on_fail=False)
    assert not report.ok and report.max_abs_err == pytest.approx(0.01, rel=1e-3)


def test_export_error_names_the_module(tmp_path) -> None:
    class Eigen(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eigvalsh(x)  # no ONNX symbolic: the exporter must fail

    with pytest.raises(ExportError, match="Eigen.*eigvalsh"):
        export_onnx(Eigen(), {"x": torch.eye(3)[None]}, ["y"], tmp_path / "eigen.onnx")


@pytest.mark.slow  # ~5-15 s: exports the real 22M-parameter encoder
def test_point_mae_encoder_exports_with_parity(tmp_path) -> None:
    torch.manual_seed(0)
    encoder = PointMAEEncoder().eval()
    rng = np.random.default_rng(0)
    inputs = {
        "neighborhood": (0.01 * rng.standard_normal((1, 64, 32, 3))).astype(np.float32),
        "centers": (0.05 * rng.standard_normal((1, 64, 3))).astype(np.float32),
    }
    example = {k: torch.from_numpy(v) for k, v in inputs.items()}
    path = export_onnx(encoder, example, ["group_features"], tmp_path / "point.onnx")
    report = check_parity(encoder, path, inputs)
    assert report.ok, report
    assert OrtRunner(path).run(inputs)["group_features"].shape == (1, 64, 1152)


def test_torch_runner_is_a_runner_and_checks_names() -> None:
    runner = TorchRunner(_uff(), ["point_feats", "rgb_feats"], ["fused"])
    assert isinstance(runner, Runner) and runner.backend == "torch"
    out = runner.run(_uff_inputs(patches=10))
    assert out["fused"].dtype == np.float32 and out["fused"].shape == (1, 10, 80)
    with pytest.raises(ShapeError, match="expects inputs"):
        runner.run({"point_feats": np.zeros((1, 10, 48), np.float32)})


class _SharedWeight(nn.Module):
    """One Linear applied twice: the TorchScript exporter gives the second use its weight via Identity."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.lin(x), self.lin(2 * x)], dim=1)


def test_identity_of_a_weight_is_inlined_so_every_use_is_quantised(tmp_path) -> None:
    example = {"x": torch.randn(1, 4, 16)}
    path = export_onnx(_SharedWeight(), example, ["y"], tmp_path / "shared.onnx")
    model = onnx.load(str(path))
    identities = [n for n in model.graph.node if n.op_type == "Identity"]
    assert identities  # the exporter's pattern this guards against is still there

    x = np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32)
    expected = OrtRunner(path).run({"x": x})["y"]
    assert inline_identity_initializers(model) == len(identities)
    assert not [n for n in model.graph.node if n.op_type == "Identity"]
    onnx.save(model, str(tmp_path / "inlined.onnx"))
    np.testing.assert_array_equal(OrtRunner(tmp_path / "inlined.onnx").run({"x": x})["y"], expected)
    assert inline_identity_initializers(model) == 0  # nothing left to do

    int8 = onnx.load(str(quantize_int8(path, tmp_path / "shared.int8.onnx")))
    ops = [n.op_type for n in int8.graph.node]
    assert sum(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in ops) == 2
    assert "MatMul" not in ops
