"""edge/station_model.py on bundles built here in seconds, with no trained model (so mutation testing can
afford a fresh pytest start per mutant): loading, verification refusals, precision selection, golden
replay, rgb-only mode, and scores that must equal a reference computed without the station's loader.

The reference (`Ref`) builds its FrameScorer from the very arrays the bundle was made of (banks, per-dim
stats, local scales, DLF weights, score stats) and runs UFF in numpy, so a loader that misreads any of them
disagrees with it. Nothing in the fixture calls edge.station_model.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import numpy as np
import pytest
from manifest_factory import draft_manifest
from onnx import TensorProto, helper, numpy_helper

from core.config import PRESETS, PreprocessConfig, ScoreConfig
from core.errors import ConfigError, CorruptFileError, MissingFileError
from core.features import FeatureRunners, extract_features
from core.fusion import LinearOneClassSVM, ScoreNormaliser
from core.model import BANKS, FrameScorer, FrameScores, upsample_nearest
from core.preprocess import prepare_scan
from core.scan import PatchFeatures, RawScan
from core.scoring import MemoryBank
from edge.bundle import golden_map_sha256
from edge.decision import decide
from edge.model_store import MODEL_FORMAT
from edge.station_model import (
    StationModel,
    golden_scan,
    info_from_manifest,
    networks_to_run,
    open_bundle,
    open_model_folder,
    replay_golden,
)
from protocol.errors import HashMismatchError, RollbackError, SignatureError
from protocol.manifest import (
    MANIFEST_NAME,
    ArtifactRef,
    BankSpec,
    BundleManifest,
    DLFCoefficients,
    FeatureSpec,
    GoldenSample,
    InputSpec,
    ScoringSpec,
    Thresholds,
    format_utc,
)
from trainer.bank_encode import encode_bank, save_encoded_bank
from trainer.bundle import BundleContents, build_bundle, keygen

FREE = PRESETS["m3dm-free"]
RGB_DIM, POINT_DIM = FREE.rgb_dim, FREE.point_dim
# Preprocessing as the bundle states it; non-default values where the station must not fall back on defaults.
PRE = dict(
    rgb_input_size=224,
    image_size=224,
    rgb_mean=(0.4, 0.5, 0.6),
    rgb_std=(0.2, 0.25, 0.3),
    border_px=10,
    ransac_threshold_m=0.003,
    ransac_n=40,
    ransac_iterations=200,
    plane_removal_m=0.004,
    pad_multiple=100,
    keep_largest_cluster=False,
    cluster_eps_m=0.007,
    cluster_min_points=20,
    seed=3,
)
FEAT_STD = 2.0  # BankSpec.feat_std: the station multiplies the stats file's scale row by it
MAIN_SCORE = ScoreConfig(
    reweight_k=2,
    blur_sigma_px=2.0,
    output_size=112,
    rgb_lambda=0.3,
    image_rule="local_norm",
    topk_fraction=0.05,
    local_key="row",
)
RGB_SCORE = ScoreConfig(reweight_k=3, blur_sigma_px=1.5, output_size=112, rgb_lambda=0.1)
VARIANT = "rgb+point+fusion"
# Distinct per bank and per statistic, so that any mix-up of banks or fields changes the scores.
SCORE_STATS = {
    "rgb": {"image_mean": 0.5, "image_std": 0.7, "pixel_mean": 0.2, "pixel_std": 0.9},
    "point": {"image_mean": 1.1, "image_std": 0.4, "pixel_mean": 0.6, "pixel_std": 0.3},
    "fusion": {"image_mean": 0.8, "image_std": 1.3, "pixel_mean": 0.1, "pixel_std": 0.6},
}
DLF = {
    "rgb+point": DLFCoefficients((0.7, 0.4), -0.2, (0.3, 0.9), 0.1),
    VARIANT: DLFCoefficients((0.5, 0.3, 0.6), 0.4, (0.2, 0.7, 0.5), -0.3),
}
COUNTER = 3


def frame(seed: int, defect: bool = False, side: int = 100) -> RawScan:
    """A small synthetic part: a gently curved 40x40 px patch with texture; background and border are zero
    (an already plane-removed scan, so no RANSAC runs). A defect is a red, raised square."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    base = 120 + 40 * np.sin(xx / 5) + 30 * np.cos(yy / 7)
    rgb = np.clip(base[..., None] * [1.0, 0.8, 0.6] + rng.normal(0, 6, (side, side, 3)), 0, 255)
    z = 0.3 + 0.004 * np.sin(xx / 9) * np.cos(yy / 11) + rng.normal(0, 2e-4, (side, side))
    if defect:
        rgb[45:58, 45:58] = [220, 30, 30]
        z[45:58, 45:58] += 0.006
    xyz = np.stack([(xx - side / 2) * 1e-3, (yy - side / 2) * 1e-3, z], -1).astype(np.float32)
    mask = np.zeros((side, side), bool)
    mask[30:70, 30:70] = True
    xyz[~mask] = 0
    return RawScan(rgb_hwc_u8=rgb.astype(np.uint8), xyz_hwc_m=xyz, source=f"synthetic-{seed}")


@dataclass(frozen=True)
class UffWeights:
    """Per-patch UFF as the exported graph computes it: concat(point @ wp + bp, rgb @ wr + br)."""

    wp: np.ndarray
    bp: np.ndarray
    wr: np.ndarray
    br: np.ndarray

    def fuse(self, point_lc: np.ndarray, rgb_lc: np.ndarray) -> np.ndarray:
        return np.concatenate([point_lc @ self.wp + self.bp, rgb_lc @ self.wr + self.br], axis=-1)

    def onnx_bytes(self) -> bytes:
        inits = [
            numpy_helper.from_array(a.astype(np.float32), name)
            for name, a in (("wp", self.wp), ("bp", self.bp), ("wr", self.wr), ("br", self.br))
        ]
        nodes = [
            helper.make_node("MatMul", ["point_feats", "wp"], ["pm"]),
            helper.make_node("Add", ["pm", "bp"], ["pa"]),
            helper.make_node("MatMul", ["rgb_feats", "wr"], ["rm"]),
            helper.make_node("Add", ["rm", "br"], ["ra"]),
            helper.make_node("Concat", ["pa", "ra"], ["fused"], axis=-1),
        ]
        graph = helper.make_graph(
            nodes,
            "uff",
            [
                helper.make_tensor_value_info("point_feats", TensorProto.FLOAT, [1, "L", POINT_DIM]),
                helper.make_tensor_value_info("rgb_feats", TensorProto.FLOAT, [1, "L", RGB_DIM]),
            ],
            [helper.make_tensor_value_info("fused", TensorProto.FLOAT, [1, "L", POINT_DIM + RGB_DIM])],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model.SerializeToString()


class NumpyUff:
    """The reference UFF runner (core.runner.Runner)."""

    backend = "numpy-reference"

    def __init__(self, weights: UffWeights) -> None:
        self.weights = weights

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fused = self.weights.fuse(inputs["point_feats"][0], inputs["rgb_feats"][0])
        return {"fused": fused[None].astype(np.float32)}


def uff_weights(seed: int) -> UffWeights:
    rng = np.random.default_rng(seed)
    return UffWeights(
        wp=rng.normal(0, 0.4, (POINT_DIM, POINT_DIM)).astype(np.float32),
        bp=rng.normal(0, 0.1, POINT_DIM).astype(np.float32),
        wr=rng.normal(0, 0.2, (RGB_DIM, RGB_DIM)).astype(np.float32),
        br=rng.normal(0, 0.1, RGB_DIM).astype(np.float32),
    )


@dataclass(frozen=True)
class BankArrays:
    """One bank as the trainer would hand it over: normalised rows, per-dim mean and scale, local scales."""

    name: str
    rows_mc: np.ndarray
    mean_c: np.ndarray
    scale_c: np.ndarray
    grid: int
    local_m: np.ndarray

    @staticmethod
    def of(name: str, raw_mc: np.ndarray, grid: int, seed: int) -> BankArrays:
        raw = raw_mc.astype(np.float32)
        mean = raw.mean(axis=0).astype(np.float32)
        scale = (raw.std(axis=0) + 0.05).astype(np.float32)
        local = np.random.default_rng(seed).uniform(0.5, 2.0, raw.shape[0]).astype(np.float32)
        return BankArrays(name, ((raw - mean) / scale).astype(np.float32), mean, scale, grid, local)

    def memory_bank(self, local: bool) -> MemoryBank:
        return MemoryBank(
            name=self.name,
            feats_mc=self.rows_mc,
            grid=self.grid,
            feat_mean_c=self.mean_c,
            feat_scale=self.scale_c,
            local_scale_k=self.local_m if local else None,
        )

    def stage(self, staging: Path, local: bool) -> tuple[BankSpec, dict[str, Path]]:
        """Bank, stats and local-scale files and their spec; the stats scale row is divided by FEAT_STD
        (exact: a power of 2), which the station multiplies back."""
        save_encoded_bank(encode_bank(self.rows_mc, "fp32"), staging / f"{self.name}.npy")
        stats = np.stack([self.mean_c, self.scale_c / np.float32(FEAT_STD)])
        np.save(staging / f"{self.name}_stats.npy", stats, allow_pickle=False)
        np.save(staging / f"{self.name}_local.npy", self.local_m, allow_pickle=False)
        rows, dim = self.rows_mc.shape
        spec = BankSpec(
            f"banks/{self.name}.npy",
            "fp32",
            rows,
            dim,
            self.grid,
            feat_std=FEAT_STD,
            stats_path=f"banks/{self.name}_stats.npy",
            local_scale_path=f"banks/{self.name}_local.npy" if local else None,
        )
        files = {
            f"banks/{self.name}.npy": staging / f"{self.name}.npy",
            f"banks/{self.name}_stats.npy": staging / f"{self.name}_stats.npy",
        }
        if local:
            files[f"banks/{self.name}_local.npy"] = staging / f"{self.name}_local.npy"
        return spec, files


def reference_scorer(banks: dict[str, BankArrays], uff: UffWeights | None) -> FrameScorer:
    """The scorer built by hand from the source arrays, never through the station's loader."""
    if uff is None:
        return FrameScorer({"rgb": banks["rgb"].memory_bank(False)}, None, None, None, RGB_SCORE)
    dlf = {
        v: (
            LinearOneClassSVM(np.array(c.image_coef), c.image_offset),
            LinearOneClassSVM(np.array(c.pixel_coef), c.pixel_offset),
        )
        for v, c in DLF.items()
    }
    normaliser = ScoreNormaliser(
        **{f"{k}_b": np.array([SCORE_STATS[b][k] for b in BANKS]) for k in SCORE_STATS["rgb"]}
    )
    return FrameScorer(
        {n: banks[n].memory_bank(True) for n in BANKS}, dlf, normaliser, NumpyUff(uff), MAIN_SCORE
    )


def reference_features(raw: RawScan, rgb_only: bool = False) -> PatchFeatures:
    """Features of a frame as the bundle's settings make them (an RGB-only model never sees the points)."""
    if rgb_only:
        raw = dataclasses.replace(raw, xyz_hwc_m=None)
    scan = prepare_scan(raw, PreprocessConfig(**PRE))
    return extract_features(scan, FREE, FeatureRunners(), ("rgb",) if rgb_only else ("rgb", "point"))


@dataclass(frozen=True)
class Fast:
    keys: Path  # holds bundle_signing.key / .pub
    main: Path  # int8 rgb+point bundle (UFF graph "a") that also carries its fp32 graph ("b")
    rgb_only: Path  # fp32 RGB-only bundle, no network at all
    frames: dict[str, RawScan]  # "good", "defect"
    ref: dict[str, FrameScorer]  # "int8" (UFF a), "fp32" (UFF b), "rgb"
    expected: dict[str, dict[str, FrameScores]]  # the reference scores of each frame, per scorer (once)
    banks: dict[str, BankArrays]
    threshold: float  # the main bundle's decision threshold (VARIANT)
    rgb_threshold: float


def sealed(path: Path) -> BundleManifest:
    from protocol.manifest import manifest_from_json

    return manifest_from_json((path / MANIFEST_NAME).read_bytes())


def golden_of(scores: FrameScores, rel: str, variant: str, tol: float | None) -> GoldenSample:
    image, map_hw = scores.image[variant], scores.maps[variant]
    tolerance = 1e-4 + 1e-3 * abs(image) if tol is None else tol
    return GoldenSample(rel, image, golden_map_sha256(map_hw), float(map_hw.mean()), tolerance, variant)


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Fast:
    root = tmp_path_factory.mktemp("fast-station")
    keygen(root / "keys")
    staging = root / "staging"
    staging.mkdir()
    frames = {"good": frame(10), "defect": frame(11, defect=True)}
    train = [reference_features(frame(s)) for s in (1, 2)]
    a, b = uff_weights(5), uff_weights(6)
    rgb_rows = np.concatenate([f.rgb_hwc.reshape(-1, RGB_DIM) for f in train])[::3]
    point_rows = np.concatenate([f.point_hwc.reshape(-1, POINT_DIM) for f in train])[::7]
    fused_rows = np.concatenate(
        [
            a.fuse(
                f.point_hwc.reshape(-1, POINT_DIM),
                upsample_nearest(f.rgb_hwc, 2).reshape(-1, RGB_DIM),
            )
            for f in train
        ]
    )[::7]
    banks = {
        "rgb": BankArrays.of("rgb", rgb_rows, 28, 0),
        "point": BankArrays.of("point", point_rows, 56, 1),
        "fusion": BankArrays.of("fusion", fused_rows, 56, 2),
    }
    ref = {
        "int8": reference_scorer(banks, a),
        "fp32": reference_scorer(banks, b),
        "rgb": reference_scorer(banks, None),
    }
    feats = {kind: reference_features(raw) for kind, raw in frames.items()}
    rgb_feats = {kind: reference_features(raw, rgb_only=True) for kind, raw in frames.items()}
    expected = {
        key: {kind: scorer.score((rgb_feats if key == "rgb" else feats)[kind]) for kind in frames}
        for key, scorer in ref.items()
    }
    threshold = (expected["int8"]["good"].image[VARIANT] + expected["int8"]["defect"].image[VARIANT]) / 2
    rgb_threshold = (expected["rgb"]["good"].image["rgb"] + expected["rgb"]["defect"].image["rgb"]) / 2

    now = datetime.now(UTC).replace(microsecond=0)
    common = dict(
        created_utc=format_utc(now - timedelta(days=1)),
        expires_utc=format_utc(now + timedelta(days=3650)),
        anti_rollback_counter=COUNTER,
        input_spec=InputSpec(**PRE),
        feature_spec=FeatureSpec("free", "free", RGB_DIM, POINT_DIM, RGB_DIM + POINT_DIM, 28, 56, 16, 8),
    )

    files: dict[str, Path | bytes] = {"onnx/uff.int8.onnx": a.onnx_bytes(), "onnx/uff.onnx": b.onnx_bytes()}
    specs = {}
    for name in BANKS:
        specs[name], bank_files = banks[name].stage(staging, local=True)
        files.update(bank_files)
    golden, fp32_golden = [], []
    for i, (kind, raw) in enumerate(frames.items()):
        rel = f"golden/{i:03d}_{kind}.npz"
        np.savez_compressed(staging / f"{kind}.npz", rgb=raw.rgb_hwc_u8, xyz=raw.xyz_hwc_m)
        files[rel] = staging / f"{kind}.npz"
        golden.append(golden_of(expected["int8"][kind], rel, VARIANT, None))
        fp32_golden.append(golden_of(expected["fp32"][kind], rel, VARIANT, None))
    main_manifest = draft_manifest(
        **common,
        networks={"uff": ArtifactRef("onnx/uff.int8.onnx")},
        fp32_networks={"uff": ArtifactRef("onnx/uff.onnx")},
        banks=specs,
        scoring=ScoringSpec(
            MAIN_SCORE.rgb_lambda,
            MAIN_SCORE.blur_sigma_px,
            MAIN_SCORE.reweight_k,
            MAIN_SCORE.output_size,
            score_stats=SCORE_STATS,
            dlf=DLF,
            image_score_rule="local_norm",
            image_topk_fraction=MAIN_SCORE.topk_fraction,
            local_norm_key="row",
        ),
        thresholds=Thresholds(VARIANT, threshold, 0.05),
        precision="int8",
        golden=golden,
        fp32_golden=fp32_golden,
    )
    main = build_bundle(BundleContents(main_manifest, files), root / "keys", root / "bundles" / "main")

    rgb_staging = root / "rgb-staging"
    rgb_staging.mkdir()
    rgb_spec, rgb_files = banks["rgb"].stage(rgb_staging, local=False)
    np.savez_compressed(rgb_staging / "good.npz", rgb=frames["good"].rgb_hwc_u8)
    rgb_files["golden/000_good.npz"] = rgb_staging / "good.npz"
    # tolerance 0: the station's numpy path must reproduce the reference bit for bit
    rgb_golden = golden_of(expected["rgb"]["good"], "golden/000_good.npz", "rgb", 0.0)
    rgb_manifest = draft_manifest(
        **common,
        bundle_id="fedcba9876543210fedcba9876543210",
        modalities=("rgb",),
        networks={},
        banks={"rgb": rgb_spec},
        scoring=ScoringSpec(
            RGB_SCORE.rgb_lambda, RGB_SCORE.blur_sigma_px, RGB_SCORE.reweight_k, RGB_SCORE.output_size
        ),
        thresholds=Thresholds("rgb", rgb_threshold, 0.02),
        precision="fp32",
        golden=[rgb_golden],
    )
    rgb_only = build_bundle(
        BundleContents(rgb_manifest, rgb_files), root / "keys", root / "bundles" / "rgb-only"
    )
    return Fast(root / "keys", main, rgb_only, frames, ref, expected, banks, threshold, rgb_threshold)


def assert_same_scores(actual: FrameScores, expected: FrameScores, rtol: float = 1e-5) -> None:
    assert actual.bank_names == expected.bank_names
    assert set(actual.image) == set(expected.image)
    for variant, value in expected.image.items():
        assert actual.image[variant] == pytest.approx(value, rel=rtol, abs=1e-6), variant
        np.testing.assert_allclose(actual.maps[variant], expected.maps[variant], rtol=rtol, atol=1e-5)
    np.testing.assert_allclose(actual.bank_image, expected.bank_image, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(actual.bank_maps, expected.bank_maps, rtol=rtol, atol=1e-5)


def with_golden(model: StationModel, golden: list[GoldenSample]) -> StationModel:
    return dataclasses.replace(model, manifest=msgspec.structs.replace(model.manifest, golden=golden))


def shifted(samples: list[GoldenSample], image: float = 0.0, map_mean: float = 0.0) -> list[GoldenSample]:
    """Expectations moved by `image` / `map_mean` times each sample's own tolerance."""
    return [
        msgspec.structs.replace(
            g,
            expected_image_score=g.expected_image_score + image * g.tolerance_abs,
            expected_map_mean=g.expected_map_mean + map_mean * g.tolerance_abs,
        )
        for g in samples
    ]


# ------------------------------------------------------------------------------------------- loading


def test_the_loaded_model_carries_every_fact_of_the_manifest(fast: Fast) -> None:
    model = open_bundle(fast.main, fast.keys, backend="ort")
    manifest = sealed(fast.main)
    assert model.manifest == manifest and model.root == fast.main
    info = model.info
    assert info.root == fast.main and info.class_name == "bagel" and info.manifest == manifest
    assert info.preprocess == PreprocessConfig(**PRE)
    assert info.score == MAIN_SCORE
    assert info.thresholds == {VARIANT: fast.threshold} and info.false_reject_rate == 0.05
    assert info.raw == manifest.to_dict()
    preset = info.preset
    assert (preset.name, preset.rgb_backbone, preset.point_backbone) == ("m3dm-free", "free", "free")
    assert (preset.rgb_input_size, preset.rgb_dim, preset.point_dim) == (224, RGB_DIM, POINT_DIM)
    assert (preset.rgb_grid, preset.point_grid, preset.num_groups, preset.group_size) == (28, 56, 16, 8)
    assert preset.bank_norm == FREE.bank_norm and preset.random_weights is False
    assert model.backend == "onnxruntime-cpu"
    assert model.summary == {
        "bundle_id": manifest.bundle_id,
        "version": "0.1.0",
        "class": "bagel",
        "preset": "m3dm-free",
        "random_weights": False,
        "backend": "onnxruntime-cpu",
        "banks": {n: f"fp32 {s.rows}x{s.dim}" for n, s in manifest.banks.items()},
        "precision": "int8",
        "variants": list(manifest.variants),
    }
    assert model.runners == FeatureRunners(rgb=None, point=None)  # weight-free: no feature graph


def test_banks_are_decoded_with_their_own_stats_feat_std_and_local_scales(fast: Fast) -> None:
    scorer = open_bundle(fast.main, fast.keys, backend="ort").scorer
    assert list(scorer.banks) == list(BANKS)
    for name, src in fast.banks.items():
        bank = scorer.banks[name]
        assert bank.name == name and bank.grid == src.grid
        np.testing.assert_array_equal(bank.feats_mc, src.rows_mc)
        np.testing.assert_array_equal(bank.feat_mean_c, src.mean_c)
        np.testing.assert_array_equal(bank.feat_scale, src.scale_c)  # stats row 1 x feat_std
        np.testing.assert_array_equal(bank.local_scale_k, src.local_m)
        assert bank.index is None


def test_dlf_weights_and_score_stats_reach_the_scorer_in_bank_order(fast: Fast) -> None:
    scorer = open_bundle(fast.main, fast.keys, backend="ort").scorer
    for variant, coefs in DLF.items():
        image_svm, pixel_svm = scorer.dlf[variant]
        np.testing.assert_array_equal(image_svm.coef_f, coefs.image_coef)
        np.testing.assert_array_equal(pixel_svm.coef_f, coefs.pixel_coef)
        assert (image_svm.offset, pixel_svm.offset) == (coefs.image_offset, coefs.pixel_offset)
    norm = scorer.normaliser
    for kind in ("image_mean", "image_std", "pixel_mean", "pixel_std"):
        np.testing.assert_array_equal(getattr(norm, f"{kind}_b"), [SCORE_STATS[b][kind] for b in BANKS])


def test_a_scorer_takes_the_banks_it_is_given(fast: Fast) -> None:
    from edge.station_model import scorer_from_manifest

    given = {"rgb": fast.banks["rgb"].memory_bank(False)}
    scorer = scorer_from_manifest(fast.rgb_only, sealed(fast.rgb_only), None, RGB_SCORE, banks=given)
    assert scorer.banks["rgb"] is given["rgb"]
    loaded = scorer_from_manifest(fast.rgb_only, sealed(fast.rgb_only), None, RGB_SCORE)
    assert loaded.banks["rgb"] is not given["rgb"]
    np.testing.assert_array_equal(loaded.banks["rgb"].feats_mc, given["rgb"].feats_mc)


def test_a_bank_without_a_stats_file_or_with_wrong_stats_is_refused(fast: Fast, tmp_path: Path) -> None:
    from edge.station_model import memory_banks_from_manifest

    manifest = sealed(fast.main)
    no_stats = {**manifest.banks, "point": msgspec.structs.replace(manifest.banks["point"], stats_path=None)}
    with pytest.raises(ConfigError, match="bank 'point' has no per-dimension stats file"):
        memory_banks_from_manifest(fast.main, msgspec.structs.replace(manifest, banks=no_stats))
    copy = Path(shutil.copytree(fast.main, tmp_path / "copy"))
    np.save(copy / "banks" / "point_stats.npy", np.ones((2, POINT_DIM - 1), np.float32))
    with pytest.raises(ConfigError, match=r"bank 'point': stats must be \(2, 9\), got \(2, 8\)"):
        memory_banks_from_manifest(copy, manifest)
    np.save(copy / "banks" / "point_stats.npy", np.ones((3, POINT_DIM), np.float32))
    with pytest.raises(ConfigError, match=r"stats must be \(2, 9\), got \(3, 9\)"):
        memory_banks_from_manifest(copy, manifest)


# ------------------------------------------------------------------------------------------- scoring


def test_station_scores_equal_the_reference_computation(fast: Fast) -> None:
    model = open_bundle(fast.main, fast.keys, backend="ort")
    for kind, raw in fast.frames.items():
        expected = fast.expected["int8"][kind]
        assert_same_scores(model.score_raw(raw), expected)
        staged = model.score_features(model.features(model.prepare(raw)))
        assert_same_scores(staged, expected)


def test_decisions_follow_the_bundles_threshold(fast: Fast) -> None:
    model = open_bundle(fast.main, fast.keys, backend="ort")
    threshold = model.info.thresholds[model.manifest.thresholds.variant]
    decisions = {k: decide(model.score_raw(raw).image[VARIANT], threshold) for k, raw in fast.frames.items()}
    assert decisions == {"good": "OK", "defect": "NOK"}


def test_a_frame_without_points_is_refused_by_an_rgb_point_model(fast: Fast) -> None:
    model = open_bundle(fast.main, fast.keys, backend="ort")
    raw = dataclasses.replace(fast.frames["good"], xyz_hwc_m=None)
    with pytest.raises(MissingFileError, match="frame has no point cloud, but this model scores rgb") as err:
        model.prepare(raw)
    assert str(err.value) == "synthetic-10: frame has no point cloud, but this model scores rgb + points"
    assert err.value.path == "synthetic-10"


# ----------------------------------------------------------------------------------------- precision


def test_an_int8_bundle_runs_its_own_graphs_or_its_fp32_ones_on_request(fast: Fast) -> None:
    raw = fast.frames["defect"]
    own = open_bundle(fast.main, fast.keys, backend="ort")
    also_own = open_bundle(fast.main, fast.keys, backend="ort", precision="int8")
    fp32 = open_bundle(fast.main, fast.keys, backend="ort", precision="fp32")
    assert (own.summary["precision"], also_own.summary["precision"], fp32.summary["precision"]) == (
        "int8",
        "int8",
        "fp32",
    )
    assert_same_scores(also_own.score_raw(raw), fast.expected["int8"]["defect"])
    assert_same_scores(fp32.score_raw(raw), fast.expected["fp32"]["defect"])
    # the two graphs differ enough that running the wrong one cannot pass for the right one
    a = fast.expected["int8"]["defect"].image[VARIANT]
    b = fast.expected["fp32"]["defect"].image[VARIANT]
    assert abs(a - b) > 100 * (1e-4 + 1e-3 * abs(a))
    results = replay_golden(fp32)
    assert [r.ok for r in results] == [True, True]
    assert [r.expected for r in results] == [g.expected_image_score for g in fp32.manifest.fp32_golden]


def test_networks_to_run_refuses_what_a_bundle_does_not_carry(fast: Fast) -> None:
    main, rgb = sealed(fast.main), sealed(fast.rgb_only)
    assert networks_to_run(main, None) == ("int8", dict(main.networks))
    assert networks_to_run(main, "fp32") == ("fp32", {"uff": main.fp32_networks["uff"]})
    assert networks_to_run(rgb, "fp32") == ("fp32", {})
    with pytest.raises(ConfigError, match=r"runs a bundle's own precision \(int8\) or fp32, not 'fp16'"):
        networks_to_run(main, "fp16")
    bare = msgspec.structs.replace(main, fp32_networks={}, fp32_golden=[])
    advice = (
        r"; rebuild it with `m3dm bundle build --precision int8` \(which ships both\) "
        r"or run its own precision$"
    )
    with pytest.raises(
        ConfigError, match=f"^bundle {main.bundle_id[:8]} is int8 and carries no fp32 graphs{advice}"
    ):
        networks_to_run(bare, "fp32")
    with pytest.raises(ConfigError, match="not 'fp16'"):
        open_bundle(fast.main, fast.keys, backend="ort", precision="fp16")


# ------------------------------------------------------------------------------------- verification


def test_a_key_may_be_the_public_key_file_or_its_folder(fast: Fast) -> None:
    by_dir = open_bundle(fast.main, fast.keys, backend="ort")
    by_file = open_bundle(fast.main, fast.keys / "bundle_signing.pub", backend="ort")
    assert by_dir.manifest == by_file.manifest == sealed(fast.main)


def test_a_wrong_key_a_rollback_or_a_tampered_file_is_refused(fast: Fast, tmp_path: Path) -> None:
    _, other = keygen(tmp_path / "other")
    with pytest.raises(SignatureError, match="signature does not match"):
        open_bundle(fast.main, other, backend="ort")
    with pytest.raises(RollbackError, match=f"counter {COUNTER}"):
        open_bundle(fast.main, fast.keys, backend="ort", min_counter=COUNTER + 1)
    assert open_bundle(fast.main, fast.keys, backend="ort", min_counter=COUNTER).manifest == sealed(fast.main)
    copy = Path(shutil.copytree(fast.main, tmp_path / "tampered"))
    bank = copy / "banks" / "rgb.npy"
    data = bytearray(bank.read_bytes())
    data[-1] ^= 0x01
    bank.write_bytes(bytes(data))
    with pytest.raises(HashMismatchError, match="banks/rgb.npy"):
        open_bundle(copy, fast.keys, backend="ort")


def test_without_a_key_a_bundle_loads_unverified_and_says_so(
    fast: Fast, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = Path(shutil.copytree(fast.main, tmp_path / "unsigned"))
    (copy / "manifest.sig").write_bytes(b"not a signature")
    with caplog.at_level(logging.WARNING, logger="m3dm.edge"):
        model = open_bundle(copy, None, backend="ort")
    assert model.manifest == sealed(fast.main)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"bundle {copy} loaded WITHOUT signature verification (no --key given)"]
    with pytest.raises(SignatureError, match="signature"):
        open_bundle(copy, fast.keys, backend="ort")


def test_the_backend_choice_reaches_the_runners(fast: Fast, caplog: pytest.LogCaptureFixture) -> None:
    from edge.runners import tensorrt_available
    from edge.station_model import station_model_from_manifest

    with caplog.at_level(logging.INFO, logger="m3dm.edge"):
        by_default = open_bundle(fast.main, fast.keys)  # "auto"
    manifest = sealed(fast.main)
    expected = f"bundle {manifest.bundle_id[:8]} v0.1.0 (bagel) loaded, backend {by_default.backend}"
    assert expected in [r.getMessage() for r in caplog.records]
    assert station_model_from_manifest(fast.main, manifest).backend == by_default.backend
    if tensorrt_available():  # a GPU station: "trt" would work, so this refusal cannot be shown here
        assert open_bundle(fast.main, fast.keys, backend="trt").backend.startswith("tensorrt")
        return
    with pytest.raises(ConfigError, match="backend 'trt' requested but TensorRT"):
        open_bundle(fast.main, fast.keys, backend="trt")
    with pytest.raises(ConfigError, match="unknown runner backend 'cuda'"):
        open_bundle(fast.main, fast.keys, backend="cuda")
    assert by_default.backend == "onnxruntime-cpu"  # "auto" without TensorRT


def test_opening_a_tar_keeps_its_extracted_copy_as_long_as_the_model(fast: Fast) -> None:
    model = open_bundle(fast.main.with_suffix(".tar"), fast.keys, backend="ort")
    scratch = model.root.parent
    assert model.root.name == "main" and scratch.name.startswith("m3dm-bundle-")
    assert (model.root / MANIFEST_NAME).is_file() and model.manifest == sealed(fast.main)
    assert all(r.ok for r in replay_golden(model))  # golden inputs are read from the extracted copy
    del model
    gc.collect()
    assert not scratch.exists()


def test_a_tar_that_fails_verification_leaves_no_extracted_copy(
    fast: Fast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    _, other = keygen(tmp_path / "other")
    with pytest.raises(SignatureError, match="signature does not match"):
        open_bundle(fast.main.with_suffix(".tar"), other, backend="ort")
    assert list((tmp_path / "tmp").iterdir()) == []


# ------------------------------------------------------------------------------------ golden replay


def test_the_shipped_golden_samples_replay_ok_with_the_reference_values(fast: Fast) -> None:
    model = open_bundle(fast.main, fast.keys, backend="ort")
    results = replay_golden(model)
    golden = model.manifest.golden
    assert [r.input_path for r in results] == [g.input_path for g in golden]
    assert all(r.ok and r.reason == "" for r in results)
    for r, g, kind in zip(results, golden, fast.frames, strict=True):
        assert (r.expected, r.map_mean_expected) == (g.expected_image_score, g.expected_map_mean)
        ref = fast.expected["int8"][kind]
        assert r.actual == pytest.approx(ref.image[VARIANT], rel=1e-5)
        assert r.map_mean_actual == pytest.approx(float(ref.maps[VARIANT].mean()), rel=1e-5)


def test_wrong_image_or_map_expectations_fail_with_the_offset_in_the_reason(fast: Fast) -> None:
    model = open_bundle(fast.main, fast.keys, backend="ort")
    golden = model.manifest.golden[-1:]  # one sample: each replay scores its input again
    for image, map_mean in ((3.0, 0.0), (0.0, -3.0), (-2.0, 2.0)):
        moved = shifted(golden, image=image, map_mean=map_mean)
        results = replay_golden(with_golden(model, moved))
        assert [r.ok for r in results] == [False]
        for r, g in zip(results, moved, strict=True):
            image_off, map_off = abs(r.actual - r.expected), abs(r.map_mean_actual - r.map_mean_expected)
            tol = g.tolerance_abs
            assert (
                r.reason
                == f"image score off by {image_off:.3g}, map mean by {map_off:.3g} (tolerance {tol:.3g})"
            )
            assert image_off == pytest.approx(abs(image) * tol, rel=0.05, abs=0.05 * tol)
            assert map_off == pytest.approx(abs(map_mean) * tol, rel=0.05, abs=0.05 * tol)
    near = replay_golden(with_golden(model, shifted(golden, image=0.5, map_mean=-0.5)))
    assert [r.ok for r in near] == [True] and near[0].reason == ""


def test_int8_expectations_do_not_pass_for_the_fp32_graphs_or_the_other_way(fast: Fast) -> None:
    """replay_golden picks the expectations of the graphs it runs; the wrong set must fail."""
    own = open_bundle(fast.main, fast.keys, backend="ort")
    fp32 = open_bundle(fast.main, fast.keys, backend="ort", precision="fp32")
    assert not any(r.ok for r in replay_golden(with_golden(own, own.manifest.fp32_golden[-1:])))
    swapped = dataclasses.replace(
        fp32, manifest=msgspec.structs.replace(fp32.manifest, fp32_golden=fp32.manifest.golden[-1:])
    )
    assert not any(r.ok for r in replay_golden(swapped))


def test_a_golden_input_that_cannot_be_scored_is_a_failed_result(
    fast: Fast, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = Path(shutil.copytree(fast.main, tmp_path / "copy"))
    victim = sealed(fast.main).golden[0]
    with np.load(copy / victim.input_path) as data:
        rgb = data["rgb"]
    np.savez_compressed(copy / victim.input_path, rgb=rgb)  # xyz gone
    model = open_bundle(copy, None, backend="ort")
    with caplog.at_level(logging.ERROR, logger="m3dm.edge"):
        bad, other = replay_golden(model)
    assert (bad.input_path, bad.ok, bad.map_sha256_exact) == (victim.input_path, False, False)
    assert (bad.expected, bad.map_mean_expected) == (victim.expected_image_score, victim.expected_map_mean)
    assert np.isnan(bad.actual) and np.isnan(bad.map_mean_actual)
    assert bad.reason.startswith("could not be scored: ") and "lacks array(s) ['xyz']" in bad.reason
    assert other.ok and other.reason == ""
    why = bad.reason.removeprefix("could not be scored: ")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"golden {victim.input_path} failed to score: {why}"]


# --------------------------------------------------------------------------------- golden_scan input


def test_golden_scan_reads_a_well_formed_input(fast: Fast, tmp_path: Path) -> None:
    sample = sealed(fast.main).golden[1]
    raw = golden_scan(fast.main, sample)
    assert raw.source == sample.input_path
    np.testing.assert_array_equal(raw.rgb_hwc_u8, fast.frames["defect"].rgb_hwc_u8)
    np.testing.assert_array_equal(raw.xyz_hwc_m, fast.frames["defect"].xyz_hwc_m)
    by_name = golden_scan(fast.main, sample.input_path, needs_xyz=False)  # xyz kept when it is there
    np.testing.assert_array_equal(by_name.xyz_hwc_m, raw.xyz_hwc_m)
    rgb_only = golden_scan(fast.rgb_only, "golden/000_good.npz", needs_xyz=False)
    assert rgb_only.xyz_hwc_m is None and rgb_only.source == "golden/000_good.npz"
    np.testing.assert_array_equal(rgb_only.rgb_hwc_u8, fast.frames["good"].rgb_hwc_u8)


@pytest.mark.parametrize(
    ("arrays", "needs_xyz", "message"),
    [
        ({"rgb": np.zeros((4, 4, 3), np.uint8)}, True, r"lacks array\(s\) \['xyz'\]; it holds \['rgb'\]"),
        ({"xyz": np.zeros((4, 4, 3), np.float32)}, True, r"lacks array\(s\) \['rgb'\]"),
        ({"xyz": np.zeros((4, 4, 3), np.float32)}, False, r"lacks array\(s\) \['rgb'\]"),
        ({"other": np.zeros(2)}, True, r"lacks array\(s\) \['rgb', 'xyz'\]"),
        ({"rgb": np.zeros((4, 4), np.uint8)}, False, r"golden input shape rgb \(4, 4\); need \(H,W,3\)"),
        ({"rgb": np.zeros((4, 4, 4), np.uint8)}, False, r"shape rgb \(4, 4, 4\); need"),
        (
            {"rgb": np.zeros((4, 4, 3), np.uint8), "xyz": np.zeros((4, 5, 3), np.float32)},
            True,
            r"shapes rgb \(4, 4, 3\), xyz \(4, 5, 3\); need \(H,W,3\) both",
        ),
        (
            {"rgb": np.zeros((4, 4, 2), np.uint8), "xyz": np.zeros((4, 4, 2), np.float32)},
            False,
            r"shapes rgb \(4, 4, 2\), xyz \(4, 4, 2\)",
        ),
        (
            {"rgb": np.zeros((4, 4), np.uint8), "xyz": np.zeros((4, 4), np.float32)},
            True,
            r"shapes rgb \(4, 4\), xyz \(4, 4\)",
        ),
    ],
)
def test_a_malformed_golden_input_is_a_corrupt_file(
    tmp_path: Path, arrays: dict, needs_xyz: bool, message: str
) -> None:
    np.savez(tmp_path / "g.npz", **arrays)
    with pytest.raises(CorruptFileError, match=message) as err:
        golden_scan(tmp_path, "g.npz", needs_xyz)
    assert err.value.path == str(tmp_path / "g.npz")


def test_golden_scan_wants_points_unless_told_otherwise(tmp_path: Path) -> None:
    np.savez(tmp_path / "g.npz", rgb=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(CorruptFileError, match=r"lacks array\(s\) \['xyz'\]"):
        golden_scan(tmp_path, "g.npz")
    assert golden_scan(tmp_path, "g.npz", needs_xyz=False).xyz_hwc_m is None


def test_an_unreadable_or_missing_golden_input_is_a_corrupt_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    leaks: list = []
    # numpy 2.4's np.load leaves its file handle open when a "PK" file is no zip; the handle is freed (and
    # reported) once the exception goes, so it is collected here instead of failing the session at exit
    monkeypatch.setattr(sys, "unraisablehook", leaks.append)
    with pytest.raises(CorruptFileError, match="unreadable golden input: BadZipFile: ") as err:
        golden_scan(tmp_path, "junk.npz")
    assert err.value.path == str(tmp_path / "junk.npz")
    del err
    gc.collect()
    monkeypatch.undo()
    with pytest.raises(CorruptFileError, match="unreadable golden input: FileNotFoundError: "):
        golden_scan(tmp_path, "absent.npz")
    np.savez(tmp_path / "obj.npz", rgb=np.array([object()], dtype=object))
    with pytest.raises(CorruptFileError, match="unreadable golden input: ValueError: "):
        golden_scan(tmp_path, "obj.npz", needs_xyz=False)


# ------------------------------------------------------------------------------------------ rgb-only


def test_an_rgb_only_bundle_scores_in_numpy_and_ignores_a_frames_points(fast: Fast) -> None:
    model = open_bundle(fast.rgb_only, fast.keys, backend="ort")
    assert model.backend == "numpy" and model.summary["backend"] == "numpy"
    assert model.summary["precision"] == "fp32" and model.summary["variants"] == ["rgb"]
    assert model.summary["banks"] == {"rgb": f"fp32 {fast.banks['rgb'].rows_mc.shape[0]}x{RGB_DIM}"}
    assert model.info.score == RGB_SCORE and model.info.thresholds == {"rgb": fast.rgb_threshold}
    assert list(model.scorer.banks) == ["rgb"] and model.scorer.banks["rgb"].local_scale_k is None
    scan = model.prepare(fast.frames["good"])
    assert not scan.xyz_hwc_m.any() and scan.valid_hw.all()  # points dropped before preprocessing
    assert model.features(scan).point_hwc.shape == (56, 56, 0)  # and no point descriptor computed
    decisions = {}
    for kind, raw in fast.frames.items():
        scores = model.score_raw(raw)  # the frame HAS points; the model must not use them
        expected = fast.expected["rgb"][kind]
        assert set(scores.image) == {"rgb"} and scores.image == expected.image  # bit for bit
        np.testing.assert_array_equal(scores.maps["rgb"], expected.maps["rgb"])
        decisions[kind] = decide(scores.image["rgb"], model.info.thresholds["rgb"])
    assert decisions == {"good": "OK", "defect": "NOK"}


def test_an_rgb_only_golden_replays_exactly_at_zero_tolerance(fast: Fast) -> None:
    model = open_bundle(fast.rgb_only, fast.keys, backend="ort")
    [result] = replay_golden(model)
    assert result.ok and result.reason == "" and result.map_sha256_exact
    assert result.actual == result.expected and result.map_mean_actual == result.map_mean_expected
    golden = model.manifest.golden
    nudged = [msgspec.structs.replace(golden[0], expected_image_score=golden[0].expected_image_score + 1e-9)]
    [off] = replay_golden(with_golden(model, nudged))
    assert not off.ok and off.map_sha256_exact and off.reason.startswith("image score off by 1e-09, map")
    other_sha = [msgspec.structs.replace(golden[0], expected_map_sha256="0" * 64)]
    [sha] = replay_golden(with_golden(model, other_sha))
    assert sha.ok and not sha.map_sha256_exact  # the hash is reported, the tolerance decides


# -------------------------------------------------------------------------------------- model folder


def model_folder(bundle: Path, out: Path, raw: dict) -> Path:
    folder = Path(shutil.copytree(bundle, out))
    (folder / "manifest.sig").unlink()
    (folder / "model.json").write_text(json.dumps({"format": MODEL_FORMAT, **raw}))
    return folder


def test_a_model_folder_loads_through_the_same_loader_with_its_own_thresholds_and_preset(
    fast: Fast, tmp_path: Path
) -> None:
    raw = {
        "thresholds": {VARIANT: 7, "rgb": 2.5},
        "preset": {"point_layers": [1, 2], "point_bn": "batch", "rgb_dim": 999, "not_a_field": 1},
    }
    folder = model_folder(fast.main, tmp_path / "model", raw)
    model = open_model_folder(folder, FeatureRunners(), NumpyUff(uff_weights(5)))
    assert model.summary == {
        "class": "bagel",
        "preset": "m3dm-free",
        "backend": "numpy-reference",
        "draft": True,
    }
    assert model.backend == "numpy-reference" and model.root == folder
    assert model.info.thresholds == {VARIANT: 7.0, "rgb": 2.5}
    assert isinstance(model.info.thresholds[VARIANT], float)
    preset = model.info.preset
    assert preset.point_layers == (1, 2) and preset.point_bn == "batch"
    assert preset.rgb_dim == RGB_DIM  # the manifest's feature facts win over model.json's
    raw_scores = model.score_raw(fast.frames["defect"])
    assert_same_scores(raw_scores, fast.expected["int8"]["defect"])
    assert [r.ok for r in replay_golden(model)] == [True, True]  # a draft replays its own golden set


def test_a_model_folder_without_thresholds_keeps_the_manifests(fast: Fast, tmp_path: Path) -> None:
    folder = model_folder(fast.rgb_only, tmp_path / "model", {"thresholds": {}})
    model = open_model_folder(folder, FeatureRunners(), None)
    assert model.info.thresholds == {"rgb": fast.rgb_threshold}
    assert (
        model.summary["backend"] == "torch"
        and model.info.preset == open_bundle(fast.rgb_only, fast.keys).info.preset
    )


def test_info_from_manifest_carries_every_scoring_and_threshold_fact(tmp_path: Path) -> None:
    """Every scoring knob and the shipped threshold reach the station's configs, none left at a default."""
    spec = ScoringSpec(0.3, 2.5, 5, 112, image_score_rule="topk_mean", image_topk_fraction=0.05)
    manifest = draft_manifest(scoring=spec, thresholds=Thresholds("rgb", 1.75, 0.02))
    info = info_from_manifest(tmp_path, manifest)
    assert info.score == ScoreConfig(
        reweight_k=5,
        blur_sigma_px=2.5,
        output_size=112,
        rgb_lambda=0.3,
        image_rule="topk_mean",
        topk_fraction=0.05,
        local_key="row",
    )
    local = draft_manifest(scoring=ScoringSpec(0.1, 4.0, 3, 224, local_norm_key="position"))
    assert info_from_manifest(tmp_path, local).score.local_key == "position"
    assert (info.thresholds, info.false_reject_rate) == ({"rgb": 1.75}, 0.02)
    assert (info.root, info.class_name, info.raw, info.manifest) == (
        tmp_path,
        "bagel",
        manifest.to_dict(),
        manifest,
    )
    # the input spec's lists become the preprocessing config's tuples
    assert info.preprocess.rgb_mean == (0.5, 0.5, 0.5) and info.preprocess.rgb_std == (0.2, 0.2, 0.2)
    # a model folder's model.json holds every variant's threshold (floats); an empty one falls back
    folder = info_from_manifest(tmp_path, manifest, {"thresholds": {"rgb": 2, "rgb+point": 3.5}})
    assert folder.thresholds == {"rgb": 2.0, "rgb+point": 3.5}
    assert all(type(v) is float for v in folder.thresholds.values())
    assert info_from_manifest(tmp_path, manifest, {"thresholds": {}}).thresholds == {"rgb": 1.75}
