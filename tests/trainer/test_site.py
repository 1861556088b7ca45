"""m3dm-site's rgb encoder: deterministic training, a non-finite loss refused, ONNX export equal to torch.

The bundle / station path is in test_site_e2e.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import SITE_RGB_DIM, get_preset
from trainer.site.augment import synthetic_anomaly
from trainer.site.model import SiteEncoder
from trainer.site.train import SiteConfig, TrainingDivergedError, load_site, save_site, train_site

TINY = SiteConfig(steps=2, batch_images=2, crop_px=32, warmup_steps=1, seed=5)


def _images(n: int = 3, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), bool)
    masks[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    return images, masks


def test_encoder_tokens_match_the_preset_grid_and_dims() -> None:
    tokens = SiteEncoder().eval()(torch.zeros(1, 3, 224, 224))
    assert tokens.shape == (1, 28 * 28, SITE_RGB_DIM) == (1, 784, get_preset("m3dm-site").rgb_dim)


def test_synthetic_anomaly_changes_exactly_its_mask() -> None:
    images, masks = _images(size=96)
    rng = np.random.default_rng(1)
    for _ in range(20):
        out, mask = synthetic_anomaly(images[0], masks[0], images[1], rng)
        changed = np.any(out != images[0], axis=0)
        assert mask.any() and not changed[mask == 0].any()


def test_training_is_seeded_and_learns() -> None:
    images, masks = _images()
    a, hist_a = train_site(images, masks, TINY, progress=False)
    b, hist_b = train_site(images, masks, TINY, progress=False)
    assert hist_a == hist_b and len(hist_a) == TINY.steps
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(wa, wb), name
    c, _ = train_site(images, masks, SiteConfig(**{**TINY.__dict__, "seed": 6}), progress=False)
    assert not torch.equal(a.stem[0].weight, c.stem[0].weight)
    fresh = SiteEncoder()
    assert not torch.equal(a.stem[0].weight, fresh.stem[0].weight)  # the optimiser moved it


def test_non_finite_loss_raises() -> None:
    images, masks = _images()
    images[:, 0, 10, 10] = np.nan
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 1/2"):
        train_site(images, masks, TINY, progress=False)


def test_save_load_round_trip(tmp_path: Path) -> None:
    images, masks = _images()
    encoder, _ = train_site(images, masks, TINY, progress=False)
    path = save_site(encoder, tmp_path / "site_rgb.safetensors", {"note": "test"})
    loaded = load_site(path)
    x = torch.from_numpy(images[:1])
    with torch.inference_mode():
        assert torch.equal(
            encoder(torch.nn.functional.pad(x, (80, 80, 80, 80))),
            loaded(torch.nn.functional.pad(x, (80, 80, 80, 80))),
        )


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    from edge.runners.ort import OrtRunner
    from trainer.export import check_parity, export_onnx

    images, masks = _images()
    encoder, _ = train_site(images, masks, TINY, progress=False)
    rng = np.random.default_rng(3)
    image = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    path = export_onnx(encoder, {"image": torch.from_numpy(image)}, ["tokens"], tmp_path / "rgb.onnx")
    report = check_parity(encoder, path, {"image": image})
    assert report.ok and report.max_abs_err < 1e-4
    with torch.inference_mode():
        expected = encoder(torch.from_numpy(image)).numpy()
    got = OrtRunner(path, providers=["CPUExecutionProvider"]).run({"image": image})["tokens"]
    assert got.shape == (1, 784, SITE_RGB_DIM)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
