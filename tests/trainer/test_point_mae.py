"""Point-MAE encoder: parameter count, checkpoint key layout, shapes, eval-mode semantics, ONNX export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from trainer.checkpoints import random_init
from trainer.models.point_mae import POINT_MAE_PARAMETERS, PointMAEEncoder, build_point_backbone


def _spec_encoder_keys() -> dict[str, tuple[int, ...]]:
    """The 156 encoder keys of Point-MAE's pretrain.pth after stripping `module.MAE_encoder.` (spec §10)."""
    keys: dict[str, tuple[int, ...]] = {}
    for stage, convs in (("first_conv", ((128, 3), (256, 128))), ("second_conv", ((512, 512), (384, 512)))):
        keys[f"encoder.{stage}.0.weight"], keys[f"encoder.{stage}.0.bias"] = (*convs[0], 1), convs[0][:1]
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            keys[f"encoder.{stage}.1.{leaf}"] = convs[0][:1]
        keys[f"encoder.{stage}.1.num_batches_tracked"] = ()
        keys[f"encoder.{stage}.3.weight"], keys[f"encoder.{stage}.3.bias"] = (*convs[1], 1), convs[1][:1]
    keys |= {"pos_embed.0.weight": (128, 3), "pos_embed.0.bias": (128,)}
    keys |= {"pos_embed.2.weight": (384, 128), "pos_embed.2.bias": (384,)}
    for i in range(12):
        block = f"blocks.blocks.{i}."
        keys |= {
            block + "norm1.weight": (384,),
            block + "norm1.bias": (384,),
            block + "attn.qkv.weight": (1152, 384),
        }
        keys |= {block + "attn.proj.weight": (384, 384), block + "attn.proj.bias": (384,)}
        keys |= {block + "norm2.weight": (384,), block + "norm2.bias": (384,)}
        keys |= {block + "mlp.fc1.weight": (1536, 384), block + "mlp.fc1.bias": (1536,)}
        keys |= {block + "mlp.fc2.weight": (384, 1536), block + "mlp.fc2.bias": (384,)}
    return keys | {"norm.weight": (384,), "norm.bias": (384,)}


def test_parameter_count_and_key_layout() -> None:
    model = build_point_backbone()
    assert sum(p.numel() for p in model.parameters()) == POINT_MAE_PARAMETERS == 21_825_024
    spec = _spec_encoder_keys()
    assert len(spec) == 156
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == spec


def test_forward_shape_is_one_1152_vector_per_group() -> None:
    model = build_point_backbone()
    assert not model.training
    generator = torch.Generator().manual_seed(0)
    neighborhood = torch.randn(1, 1024, 8, 3, generator=generator) * 0.01  # K=8 keeps the test fast
    with torch.no_grad():
        features = model(neighborhood, torch.randn(1, 1024, 3, generator=generator) * 0.05)
    assert features.shape == (1, 1024, 1152) and features.dtype == torch.float32
    # Each third is the shared final LayerNorm (unit weight, zero bias) of one of blocks 3, 7, 11.
    thirds = features.reshape(1, 1024, 3, 384)
    torch.testing.assert_close(thirds.mean(-1), torch.zeros(1, 1024, 3), atol=1e-4, rtol=0)
    assert not torch.allclose(thirds[..., 0, :], thirds[..., 2, :])


def test_eval_mode_is_deterministic_and_batch_independent() -> None:
    model = random_init(build_point_backbone(), seed=1)
    model.encoder.first_conv[1].running_mean.fill_(0.3)  # running statistics must be what BatchNorm uses
    generator = torch.Generator().manual_seed(0)
    neighborhood = torch.randn(2, 64, 16, 3, generator=generator) * 0.01
    centers = torch.randn(2, 64, 3, generator=generator) * 0.05
    with torch.no_grad():
        both = model(neighborhood, centers)
        single = model(neighborhood[:1], centers[:1])
        again = model(neighborhood[:1], centers[:1])
    assert torch.equal(single, again)
    # BatchNorm uses running statistics (eval), so another cloud in the batch changes nothing.
    torch.testing.assert_close(both[:1], single, atol=1e-5, rtol=1e-5)


def test_onnx_export_with_dynamic_batch(tmp_path) -> None:  # noqa: ANN001
    model = random_init(PointMAEEncoder(dim=48, heads=6).eval(), seed=0)
    from trainer.export import export_onnx

    # the exporter the product uses (names, dynamic batch, opset), not a hand-rolled torch.onnx.export call
    example = {"neighborhood": torch.randn(1, 16, 8, 3), "centers": torch.randn(1, 16, 3)}
    path = export_onnx(model, example, ["group_features"], tmp_path / "point.onnx")
    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(3, 16, 8, 3, generator=generator), torch.randn(3, 16, 3, generator=generator))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(
        ["group_features"], {"neighborhood": inputs[0].numpy(), "centers": inputs[1].numpy()}
    )
    with torch.no_grad():
        want = model(*inputs).numpy()
    assert got.shape == (3, 16, 144)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_point_layers_choose_the_blocks_whose_normed_outputs_form_the_feature() -> None:
    from dataclasses import replace

    import pytest

    from core.config import get_preset
    from core.errors import ConfigError
    from trainer.backbones import WeightPaths, point_module_for_export

    preset = get_preset("m3dm-random")  # seeded random weights: both modules below are the same network
    assert preset.point_layers == (3, 7, 11)  # the original's blocks (spec §4)
    full = point_module_for_export(preset, WeightPaths())
    last = point_module_for_export(replace(preset, point_layers=(11,), point_dim=384), WeightPaths())
    gen = torch.Generator().manual_seed(0)
    neighborhood = torch.randn(1, 16, 32, 3, generator=gen) * 0.002
    centers = torch.randn(1, 16, 3, generator=gen) * 0.05
    with torch.no_grad():
        want, got = full(neighborhood, centers), last(neighborhood, centers)
    assert want.shape == (1, 16, 1152) and got.shape == (1, 16, 384)
    assert torch.allclose(got, want[..., 768:], atol=1e-6)
    with pytest.raises(ConfigError, match=r"point_dim 1152 != 384 x 1 point_layers \(11,\)"):
        point_module_for_export(replace(preset, point_layers=(11,)), WeightPaths())
    with pytest.raises(ConfigError, match="ascending and distinct"):
        point_module_for_export(replace(preset, point_layers=(7, 3), point_dim=768), WeightPaths())
