"""Checkpoint loaders: official key layouts load exactly; anything else fails loudly and names the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError, CorruptFileError, MissingWeightsError
from trainer.checkpoints import LoadReport, load_dino, load_dinov2, load_point_mae, random_init
from trainer.models.point_mae import build_point_backbone
from trainer.models.vit import VisionTransformer, ViTConfig, build_rgb_backbone, resample_pos_embed

SMALL_DINO = ViTConfig(patch_size=8, input_size=32, dim=32, depth=2, heads=2)
SMALL_DINOV2 = ViTConfig(patch_size=14, input_size=392, dim=32, depth=2, heads=2, layer_scale=True)


def _official_vit_keys(
    dim: int, depth: int, patch: int, tokens: int, dinov2: bool
) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of dino_vitbase8_pretrain.pth / dinov2_vitb14_pretrain.pth (spec §10)."""
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, tokens, dim)}
    keys |= {"patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys |= {b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "norm2.weight": (dim,)}
        keys |= {
            b + "norm2.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim),
            b + "attn.qkv.bias": (3 * dim,),
        }
        keys |= {b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,)}
        keys |= {b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,)}
        keys |= {b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)}
        if dinov2:
            keys |= {b + "ls1.gamma": (dim,), b + "ls2.gamma": (dim,)}
    keys |= {"norm.weight": (dim,), "norm.bias": (dim,)}
    return keys | ({"mask_token": (1, dim)} if dinov2 else {})


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def _point_mae_checkpoint(model: torch.nn.Module) -> dict:
    """Point-MAE pretrain.pth layout: base_model = module.MAE_encoder.* + unused pretraining parts."""
    base = {
        f"module.MAE_encoder.{k}": torch.randn_like(v.float()).to(v.dtype)
        for k, v in model.state_dict().items()
    }
    base |= {f"module.MAE_decoder.blocks.{i}.norm1.weight": torch.ones(384) for i in range(4)}
    base |= {
        "module.decoder_pos_embed.0.weight": torch.zeros(128, 3),
        "module.increase_dim.0.weight": torch.zeros(96, 384, 1),
    }
    base["module.mask_token"] = torch.zeros(1, 1, 384)
    return {"base_model": base, "optimizer": {"state": {}}, "epoch": 300, "metrics": {}, "best_metrics": {}}


def test_full_size_models_have_the_official_key_layouts() -> None:
    for name, patch, dinov2, tokens in (("dino_vitb8", 8, False, 785), ("dinov2_vitb14", 14, True, 785)):
        got = {k: tuple(v.shape) for k, v in build_rgb_backbone(name).state_dict().items()}
        assert got == _official_vit_keys(768, 12, patch, tokens, dinov2)


def test_dino_flat_state_dict_loads_exactly(tmp_path: Path) -> None:
    state = _random_state(_official_vit_keys(32, 2, 8, 17, dinov2=False))
    torch.save(state, tmp_path / "dino.pth")
    model = VisionTransformer(SMALL_DINO)
    report = load_dino(model, tmp_path / "dino.pth")
    assert isinstance(report, LoadReport) and len(report.loaded) == len(state)
    assert report.missing == report.unexpected == report.ignored == ()
    assert torch.equal(model.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])


def test_dino_full_checkpoint_teacher_loads_and_ignores_head(tmp_path: Path) -> None:
    state = _random_state(_official_vit_keys(32, 2, 8, 17, dinov2=False))
    teacher = {f"module.backbone.{k}": v for k, v in state.items()}
    teacher |= {
        "module.head.mlp.0.weight": torch.zeros(8, 32),
        "module.head.last_layer.weight_g": torch.ones(4, 1),
    }
    checkpoint = {
        "teacher": teacher,
        "student": teacher,
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_base"),
    }
    torch.save(checkpoint, tmp_path / "full.pth")
    model = VisionTransformer(SMALL_DINO)
    report = load_dino(model, tmp_path / "full.pth")
    assert report.ignored == ("head.last_layer.weight_g", "head.mlp.0.weight") and report.missing == ()
    assert torch.equal(model.cls_token, state["cls_token"])


def test_dinov2_loads_and_resamples_pos_embed(tmp_path: Path) -> None:
    state = _random_state(_official_vit_keys(32, 2, 14, 1370, dinov2=True))
    torch.save(state, tmp_path / "dinov2.pth")
    model = VisionTransformer(SMALL_DINOV2)
    report = load_dinov2(model, tmp_path / "dinov2.pth")
    assert report.missing == report.unexpected == () and "blocks.0.ls1.gamma" in report.loaded
    assert model.pos_embed.shape == (1, 785, 32)
    assert torch.equal(model.pos_embed, resample_pos_embed(state["pos_embed"], 28))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 392, 392)).shape == (1, 784, 32)


def test_point_mae_loads_encoder_and_ignores_pretraining_parts(tmp_path: Path) -> None:
    model = build_point_backbone()
    checkpoint = _point_mae_checkpoint(model)
    torch.save(checkpoint, tmp_path / "pretrain.pth")
    report = load_point_mae(model, tmp_path / "pretrain.pth")
    assert len(report.loaded) == 156 and report.missing == report.unexpected == ()
    assert len(report.ignored) == 7 and "module.mask_token" in report.ignored
    want = checkpoint["base_model"]["module.MAE_encoder.blocks.blocks.11.attn.qkv.weight"]
    assert torch.equal(model.blocks.blocks[11].attn.qkv.weight, want)


def test_renamed_key_fails_loudly_and_names_it(tmp_path: Path) -> None:
    state = _random_state(_official_vit_keys(32, 2, 8, 17, dinov2=False))
    state["blocks.0.attn.qkv.weights"] = state.pop("blocks.0.attn.qkv.weight")
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(
        ConfigError, match="checkpoint does not match VisionTransformer: missing keys"
    ) as error:
        load_dino(VisionTransformer(SMALL_DINO), tmp_path / "renamed.pth")
    assert "blocks.0.attn.qkv.weight'" in str(error.value) and "blocks.0.attn.qkv.weights" in str(error.value)
    assert "renamed.pth" in str(error.value)


def test_wrong_shape_and_stray_point_mae_key_fail(tmp_path: Path) -> None:
    state = _random_state(_official_vit_keys(32, 2, 8, 17, dinov2=False))
    state["norm.bias"] = torch.zeros(31)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ConfigError, match=r"norm\.bias \(31,\)"):
        load_dino(VisionTransformer(SMALL_DINO), tmp_path / "shape.pth")
    model = build_point_backbone()
    checkpoint = _point_mae_checkpoint(model)
    checkpoint["base_model"]["module.cls_head.0.weight"] = torch.zeros(2)
    torch.save(checkpoint, tmp_path / "stray.pth")
    with pytest.raises(ConfigError, match=r"module\.cls_head\.0\.weight"):
        load_point_mae(model, tmp_path / "stray.pth")


@pytest.mark.parametrize(
    ("loader", "expected_file"),
    [
        (load_dino, "dino_vitbase8_pretrain.pth"),
        (load_dinov2, "dinov2_vitb14_pretrain.pth"),
        (load_point_mae, "Point-MAE"),
    ],
)
def test_missing_file_names_file_and_source(tmp_path: Path, loader, expected_file: str) -> None:  # noqa: ANN001
    with pytest.raises(MissingWeightsError, match=r"absent\.pth not found; expected ") as error:
        loader(VisionTransformer(SMALL_DINO), tmp_path / "absent.pth")
    assert "absent.pth" in str(error.value) and expected_file in str(error.value)


def test_unreadable_or_wrong_checkpoints_are_typed_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptFileError, match="junk.pth"):
        load_dino(VisionTransformer(SMALL_DINO), tmp_path / "junk.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="base_model"):
        load_point_mae(build_point_backbone(), tmp_path / "other.pth")


def test_random_init_is_seeded_and_bitwise_reproducible() -> None:
    first, second = (random_init(VisionTransformer(SMALL_DINOV2), seed=7) for _ in range(2))
    other = random_init(VisionTransformer(SMALL_DINOV2), seed=8)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert not torch.equal(first.pos_embed, other.pos_embed)
    assert torch.equal(first.blocks[0].ls1.gamma, torch.ones(32)) and torch.equal(
        first.norm.bias, torch.zeros(32)
    )
    image = torch.randn(1, 3, 392, 392, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(first.eval()(image), second.eval()(image))
