"""ViT backbones: token shapes, determinism, position-table resampling, ONNX export with dynamic batch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from trainer.checkpoints import random_init
from trainer.models.vit import VisionTransformer, ViTConfig, build_rgb_backbone, resample_pos_embed


@pytest.mark.parametrize(("name", "size"), [("dino_vitb8", 224), ("dinov2_vitb14", 392)])
def test_full_backbone_gives_28x28_tokens(name: str, size: int) -> None:
    model = build_rgb_backbone(name)  # default init: seeded random_init is tested on small models
    assert not model.training
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = model(image)
    assert tokens.shape == (1, 784, 768) and tokens.dtype == torch.float32
    assert torch.isfinite(tokens).all()
    # Final LayerNorm with unit weight, zero bias: each token is standardised.
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(1, 784), atol=1e-4, rtol=0)


def test_forward_is_bitwise_deterministic_and_batch_independent() -> None:
    config = ViTConfig(patch_size=8, input_size=64, dim=64, depth=2, heads=4)
    first = random_init(VisionTransformer(config).eval(), seed=3)
    second = random_init(VisionTransformer(config).eval(), seed=3)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, single = first(images), second(images), first(images[1:])
    assert torch.equal(a, b)
    torch.testing.assert_close(single, a[1:], atol=1e-5, rtol=1e-5)


def test_resample_pos_embed_keeps_cls_and_follows_dinov2_rule() -> None:
    table = torch.randn(1, 1 + 37 * 37, 16, generator=torch.Generator().manual_seed(0))
    resampled = resample_pos_embed(table, 28)
    assert resampled.shape == (1, 1 + 28 * 28, 16)
    assert torch.equal(resampled[:, 0], table[:, 0])
    grid = table[:, 1:].reshape(1, 37, 37, 16).permute(0, 3, 1, 2)
    expected = (
        F.interpolate(grid, scale_factor=28.1 / 37, mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 16)
    )
    torch.testing.assert_close(resampled[:, 1:], expected)
    assert torch.equal(resample_pos_embed(table, 37), table)
    with pytest.raises(ConfigError, match="pos_embed has 10 patch entries, not a square grid"):
        resample_pos_embed(torch.zeros(1, 1 + 10, 16), 3)


def test_unknown_backbone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="dino_vitb8"):
        build_rgb_backbone("vit_huge")


def test_onnx_export_with_dynamic_batch(tmp_path) -> None:  # noqa: ANN001
    config = ViTConfig(patch_size=14, input_size=56, dim=32, depth=2, heads=2, layer_scale=True)
    model = random_init(VisionTransformer(config).eval(), seed=0)
    from trainer.export import export_onnx

    # the exporter the product uses (names, dynamic batch, opset), not a hand-rolled torch.onnx.export call
    path = export_onnx(model, {"image": torch.randn(1, 3, 56, 56)}, ["tokens"], tmp_path / "rgb.onnx")
    images = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["tokens"], {"image": images.numpy()})
    with torch.no_grad():
        want = model(images).numpy()
    assert got.shape == (3, 16, 32)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
