"""The background skip is exact: skipping zero patches in UFF and every bank's kNN changes no score.

Generated scans (`tiny_dataset`) go through the real preprocessing and weight-free features; banks are real
coresets of their training features; UFF is a real (randomly initialised) fusion block, run in torch and as
an exported ONNX graph with a dynamic patch axis and with the older fixed one. Official-size dimensions are
covered with synthetic features that have the same structure (zero point rows on the background).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import CoresetConfig, PreprocessConfig, ScoreConfig, get_preset
from core.features import FeatureRunners, extract_features
from core.model import VARIANTS, FrameScorer
from core.mvtec3d import list_samples, load_scan
from core.preprocess import prepare_scan
from core.scan import PatchFeatures
from core.scoring import MemoryBank, score_bank
from edge.runners import OrtRunner
from trainer.coreset import build_memory_bank
from trainer.export import export_onnx
from trainer.models.uff import FeatureFusionBlock, UFFExport
from trainer.torch_runner import TorchRunner

TOL = 1e-5


def _features(root: Path, split: str) -> list[PatchFeatures]:
    preset, cls = get_preset("m3dm-free"), sorted(p.name for p in root.iterdir() if p.is_dir())[0]
    return [
        extract_features(prepare_scan(load_scan(r), PreprocessConfig()), preset, FeatureRunners())
        for r in list_samples(root, cls, split)
    ]


def _uff_module(point_dim: int, rgb_dim: int) -> UFFExport:
    torch.manual_seed(0)
    return UFFExport(FeatureFusionBlock(point_dim, rgb_dim)).eval()


def _banks(train: list[PatchFeatures], uff: object | None) -> dict[str, MemoryBank]:
    cfg = CoresetConfig()
    rgb = np.stack([f.rgb_hwc for f in train])
    point = np.stack([f.point_hwc for f in train])
    banks = {
        "rgb": build_memory_bank("rgb", rgb, 28, 0.2, cfg, per_dim=True),
        "point": build_memory_bank("point", point, 56, 0.2, cfg, per_dim=True),
    }
    plain = FrameScorer({**banks, "fusion": banks["point"]}, None, None, uff, ScoreConfig())  # type: ignore[arg-type]
    fused = np.stack([plain.fused_features(f) for f in train])
    banks["fusion"] = build_memory_bank("fusion", fused, 56, 0.2, cfg, per_dim=True)
    return banks


def _assert_same(fast: FrameScorer, full: FrameScorer, frames: list[PatchFeatures]) -> None:
    for frame in frames:
        fast_image, fast_maps = fast.bank_scores(frame)
        full_image, full_maps = full.bank_scores(frame)
        np.testing.assert_allclose(fast_image, full_image, atol=TOL, rtol=0)
        np.testing.assert_allclose(fast_maps, full_maps, atol=TOL, rtol=0)
        np.testing.assert_allclose(fast.fused_features(frame), full.fused_features(frame), atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def scans(tiny_dataset: Path) -> tuple[list[PatchFeatures], list[PatchFeatures]]:
    return _features(tiny_dataset, "train"), _features(tiny_dataset, "test")[::2]


@pytest.fixture(scope="module")
def fitted(scans) -> tuple[UFFExport, dict[str, MemoryBank]]:
    """A UFF block and the three banks built with it from the training scans (shared by the graph cases)."""
    train = scans[0]
    module = _uff_module(train[0].point_hwc.shape[-1], train[0].rgb_hwc.shape[-1])
    return module, _banks(train, TorchRunner(module, UFFExport.input_names, UFFExport.output_names))


def test_generated_scans_have_background_and_zero_point_rows(scans) -> None:
    _, test = scans
    fills = [float(f.point_hwc.any(axis=-1).mean()) for f in test]
    assert 0.02 < min(fills) and max(fills) < 0.6  # the skip has something to skip, and something to score


@pytest.mark.parametrize("graph", ["torch", "onnx-dynamic", "onnx-fixed"])
def test_skip_equals_full_computation_on_generated_scans(scans, fitted, graph, tmp_path) -> None:
    test = scans[1]
    module, banks = fitted
    uff: object = TorchRunner(module, UFFExport.input_names, UFFExport.output_names)
    if graph != "torch":
        example = {
            "point_feats": torch.zeros(1, 3136, banks["point"].dim),
            "rgb_feats": torch.zeros(1, 3136, banks["rgb"].dim),
        }
        dynamic = {1: "patches"} if graph == "onnx-dynamic" else None
        path = export_onnx(module, example, ["fused"], tmp_path / "uff.onnx", extra_dynamic_axes=dynamic)
        uff = OrtRunner(path)
    fast = FrameScorer(banks, None, None, uff, ScoreConfig())  # type: ignore[arg-type]
    full = FrameScorer(banks, None, None, uff, ScoreConfig(), skip_background=False)  # type: ignore[arg-type]
    _assert_same(fast, full, test)


def test_skip_equals_full_computation_for_all_variants_of_a_fitted_model(tiny_model: Path, scans) -> None:
    from edge.model_store import load_model_info, load_scorer
    from trainer.train_uff import load_uff

    info = load_model_info(tiny_model)
    uff = TorchRunner(UFFExport(load_uff(tiny_model / "uff.safetensors")), UFFExport.input_names, ["fused"])
    fast = load_scorer(info, uff)
    full = FrameScorer(fast.banks, fast.dlf, fast.normaliser, uff, fast.score_cfg, skip_background=False)
    for frame in scans[1]:
        a, b = fast.score(frame), full.score(frame)
        for variant in VARIANTS:
            assert abs(a.image[variant] - b.image[variant]) <= TOL, variant
            np.testing.assert_allclose(a.maps[variant], b.maps[variant], atol=TOL, rtol=0)


def _official_like_frame(rng: np.random.Generator, fill: float) -> PatchFeatures:
    """Official dims (rgb 768 @28, point 1152 @56) with a blob of foreground covering `fill` of the grid."""
    yy, xx = np.mgrid[:56, :56]
    radius = np.sqrt(fill * 56 * 56 / np.pi)
    fg = (yy - 28) ** 2 + (xx - 27) ** 2 <= radius**2
    point = rng.normal(size=(56, 56, 1152)).astype(np.float32) * fg[..., None]
    rgb = rng.normal(size=(28, 28, 768)).astype(np.float32)
    return PatchFeatures(rgb_hwc=rgb, point_hwc=point)


@pytest.mark.parametrize("fill", [0.1, 0.45])
def test_skip_is_exact_at_official_dims_and_both_fills(fill: float) -> None:
    rng = np.random.default_rng(1)
    uff = TorchRunner(_uff_module(1152, 768), UFFExport.input_names, UFFExport.output_names)
    frames = [_official_like_frame(rng, fill) for _ in range(2)]
    dims = {"rgb": (768, 28), "point": (1152, 56), "fusion": (1920, 56)}
    banks = {
        n: MemoryBank(n, rng.normal(size=(300, d)).astype(np.float32), g, np.zeros(d, np.float32), 1.0)
        for n, (d, g) in dims.items()
    }
    fast = FrameScorer(banks, None, None, uff, ScoreConfig())  # type: ignore[arg-type]
    full = FrameScorer(banks, None, None, uff, ScoreConfig(), skip_background=False)  # type: ignore[arg-type]
    _assert_same(fast, full, frames[1:])
    # An all-background frame: its highest patch is background, so the reweighting uses the constant.
    empty = PatchFeatures(rgb_hwc=frames[0].rgb_hwc, point_hwc=np.zeros_like(frames[0].point_hwc))
    _assert_same(fast, full, [empty])


def test_point_bank_background_distance_is_the_precomputed_constant() -> None:
    rng = np.random.default_rng(2)
    mean, scale = rng.normal(size=8).astype(np.float32), rng.uniform(0.5, 2, 8).astype(np.float32)
    bank = MemoryBank("point", rng.normal(size=(300, 8)).astype(np.float32), 14, mean, scale)
    query = rng.normal(size=(14, 14, 8)).astype(np.float32)
    query[:7] = 0.0
    fast = score_bank(query, bank, ScoreConfig(output_size=56))
    full = score_bank(query, bank, ScoreConfig(output_size=56), skip_background=False)
    assert fast.image_score == pytest.approx(full.image_score, abs=TOL)
    np.testing.assert_allclose(fast.patch_dist_hw, full.patch_dist_hw, atol=TOL, rtol=0)
    np.testing.assert_allclose(fast.patch_dist_hw[:7], bank.zero_query.nn_dist, atol=TOL, rtol=0)
    # The constant is the distance from -mean/scale (the normalised zero) to its nearest bank row.
    expected = np.linalg.norm(bank.feats_mc - (-mean / scale), axis=1).min()
    assert bank.zero_query.nn_dist == pytest.approx(expected, abs=TOL)
