"""A verified bundle, ready to score: runners for its ONNX graphs, decoded banks, the FrameScorer.

Everything here comes from the signed manifest (input spec, feature dims, bank encodings, score
normalisation, DLF weights, thresholds), so a station needs no other configuration about the model.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.bank_codec import decode
from core.config import FeaturePreset, PreprocessConfig, ScoreConfig
from core.errors import ConfigError, M3DMError
from core.features import FeatureRunners, extract_features
from core.fusion import LinearOneClassSVM, ScoreNormaliser
from core.model import BANKS, FrameScorer, FrameScores
from core.preprocess import prepare_scan
from core.scan import PatchFeatures, PreparedScan, RawScan
from core.scoring import MemoryBank
from edge.bundle import golden_map_sha256, load_banks, safe_extract, verify_bundle
from edge.model_store import ModelInfo, load_array
from edge.runners import make_runner
from protocol.manifest import MANIFEST_NAME, BundleManifest, GoldenSample, manifest_from_json

log = logging.getLogger("m3dm.edge")


@dataclass
class StationModel:
    """Everything needed to score frames with one bundle."""

    root: Path
    manifest: BundleManifest
    info: ModelInfo
    runners: FeatureRunners
    scorer: FrameScorer
    backend: str
    summary: dict[str, Any] = field(default_factory=dict)

    def score_raw(self, raw: RawScan) -> FrameScores:
        """capture -> preprocess -> features -> scores, exactly as the station runs it."""
        return self.score_prepared(self.prepare(raw))

    def prepare(self, raw: RawScan) -> PreparedScan:
        """Stage 1 of `score_raw` (the station pipeline runs each stage on its own thread)."""
        return prepare_scan(raw, self.info.preprocess)

    def score_prepared(self, scan: PreparedScan) -> FrameScores:
        """Stages 2 + 3 of `score_raw`: features (runner backend), then kNN scoring -> DLF."""
        return self.score_features(self.features(scan))

    def features(self, scan: PreparedScan) -> PatchFeatures:
        """Stage 2 of `score_raw`: per-patch rgb and point features through the runner backend."""
        return extract_features(scan, self.info.preset, self.runners)

    def score_features(self, features: PatchFeatures) -> FrameScores:
        """Stage 3 of `score_raw`: UFF, kNN scoring against the banks, DLF."""
        return self.scorer.score(features)


def info_from_manifest(root: Path, manifest: BundleManifest) -> ModelInfo:
    fs, spec = manifest.feature_spec, manifest.scoring
    preset = FeaturePreset(
        name=manifest.preset,
        rgb_backbone=fs.rgb_backbone,
        point_backbone=fs.point_backbone,
        rgb_input_size=manifest.input_spec.rgb_input_size,
        rgb_dim=fs.rgb_dim,
        point_dim=fs.point_dim,
        rgb_grid=fs.rgb_grid,
        point_grid=fs.point_grid,
        num_groups=fs.num_groups,
        group_size=fs.group_size,
        random_weights=manifest.random_weights,
    )
    preprocess = PreprocessConfig(**manifest.input_spec.to_dict())
    score = ScoreConfig(
        reweight_k=spec.reweight_k,
        blur_sigma_px=spec.blur_sigma_px,
        output_size=spec.output_size,
        rgb_lambda=spec.rgb_lambda,
    )
    thr = manifest.thresholds
    return ModelInfo(
        root=root,
        class_name=manifest.class_name,
        preset=preset,
        preprocess=preprocess,
        score=score,
        thresholds={thr.variant: thr.image_threshold},
        false_reject_rate=thr.false_reject_rate,
        raw=manifest.to_dict(),
    )


def memory_banks_from_manifest(root: Path, manifest: BundleManifest) -> dict[str, MemoryBank]:
    """Decode every encoded bank to float32 rows: BLAS kNN on decoded rows beats PQ lookup tables on CPU."""
    encoded = load_banks(root, manifest)
    banks = {}
    for name in BANKS:
        spec = manifest.banks[name]
        if spec.stats_path is None:
            raise ConfigError(f"bank {name!r} has no per-dimension stats file")
        stats_2c = load_array(root / spec.stats_path)  # row 0 mean, row 1 scale, per channel
        if stats_2c.shape != (2, spec.dim):
            raise ConfigError(f"bank {name!r}: stats must be (2, {spec.dim}), got {stats_2c.shape}")
        banks[name] = MemoryBank(
            name=name,
            feats_mc=decode(encoded[name]),
            grid=spec.grid,
            feat_mean_c=stats_2c[0],
            feat_scale=stats_2c[1] * np.float32(spec.feat_std),
        )
    return banks


def scorer_parts(manifest: BundleManifest) -> tuple[dict, ScoreNormaliser | None]:
    dlf = {
        variant: (
            LinearOneClassSVM(np.asarray(c.image_coef), c.image_offset),
            LinearOneClassSVM(np.asarray(c.pixel_coef), c.pixel_offset),
        )
        for variant, c in manifest.scoring.dlf.items()
    }
    stats = manifest.scoring.score_stats
    normaliser = None
    if stats:
        normaliser = ScoreNormaliser(
            **{
                f"{kind}_b": np.array([stats[b][kind] for b in BANKS])
                for kind in ("image_mean", "image_std", "pixel_mean", "pixel_std")
            }
        )
    return dlf, normaliser


DEFAULT_ENGINE_CACHE = Path.home() / ".cache" / "m3dm" / "engines"


def station_model_from_manifest(
    root: Path, manifest: BundleManifest, backend: str = "auto", engine_cache_dir: Path | None = None
) -> StationModel:
    """Runners and scorer for a bundle directory whose manifest is verified (or being built).

    TensorRT engines are cached OUTSIDE the bundle (default ~/.cache/m3dm/engines, keyed by ONNX hash,
    TensorRT version, GPU and precision): a file written into the bundle would fail its next verification.
    """
    info = info_from_manifest(root, manifest)
    cache = engine_cache_dir if engine_cache_dir is not None else DEFAULT_ENGINE_CACHE
    runner_of = {
        name: make_runner(root / ref.path, backend=backend, engine_cache_dir=cache)
        for name, ref in manifest.networks.items()
    }
    runners = FeatureRunners(rgb=runner_of.get("rgb"), point=runner_of.get("point"))
    dlf, normaliser = scorer_parts(manifest)
    scorer = FrameScorer(
        banks=memory_banks_from_manifest(root, manifest),
        dlf=dlf,
        normaliser=normaliser,
        uff=runner_of["uff"],
        score_cfg=info.score,
    )
    backend_name = runner_of["uff"].backend
    summary = {
        "bundle_id": manifest.bundle_id,
        "version": manifest.version,
        "class": manifest.class_name,
        "preset": manifest.preset,
        "random_weights": manifest.random_weights,
        "backend": backend_name,
        "banks": {n: f"{s.encoding} {s.rows}x{s.dim}" for n, s in manifest.banks.items()},
    }
    log.info(
        "bundle %s v%s (%s) loaded, backend %s",
        manifest.bundle_id[:8],
        manifest.version,
        manifest.class_name,
        backend_name,
    )
    return StationModel(root, manifest, info, runners, scorer, backend_name, summary)


def open_bundle(
    bundle: Path,
    key: Path | None,
    backend: str = "auto",
    min_counter: int | None = None,
    engine_cache_dir: Path | None = None,
) -> StationModel:
    """Extract (if a tar), verify (if a key is given), load. Without a key the bundle is loaded UNVERIFIED."""
    bundle = Path(bundle)
    root = bundle
    if bundle.is_file():
        root = safe_extract(bundle, Path(tempfile.mkdtemp(prefix="m3dm-bundle-")) / bundle.stem)
    if key is not None:
        public = key / "bundle_signing.pub" if Path(key).is_dir() else Path(key)
        manifest = verify_bundle(root, public, min_counter=min_counter)
    else:
        log.warning("bundle %s loaded WITHOUT signature verification (no --key given)", bundle)
        manifest = manifest_from_json((root / MANIFEST_NAME).read_bytes())
    return station_model_from_manifest(root, manifest, backend, engine_cache_dir)


@dataclass(frozen=True)
class GoldenResult:
    input_path: str
    expected: float
    actual: float
    map_mean_expected: float
    map_mean_actual: float
    map_sha256_exact: bool
    ok: bool


def golden_scan(root: Path, sample: GoldenSample) -> RawScan:
    with np.load(root / sample.input_path, allow_pickle=False) as data:
        return RawScan(rgb_hwc_u8=data["rgb"], xyz_hwc_m=data["xyz"], source=sample.input_path)


def replay_golden(model: StationModel) -> list[GoldenResult]:
    """Score each golden input; a bundle is activated only if every result is within its tolerance."""
    results = []
    for sample in model.manifest.golden:
        try:
            scores = model.score_raw(golden_scan(model.root, sample))
        except M3DMError as err:
            log.error("golden %s failed to score: %s", sample.input_path, err)
            results.append(
                GoldenResult(
                    sample.input_path,
                    sample.expected_image_score,
                    float("nan"),
                    sample.expected_map_mean,
                    float("nan"),
                    False,
                    False,
                )
            )
            continue
        actual = scores.image[sample.variant]
        map_hw = scores.maps[sample.variant]
        map_mean = float(map_hw.mean())
        tol = sample.tolerance_abs
        ok = (
            abs(actual - sample.expected_image_score) <= tol
            and abs(map_mean - sample.expected_map_mean) <= tol
        )
        results.append(
            GoldenResult(
                sample.input_path,
                sample.expected_image_score,
                actual,
                sample.expected_map_mean,
                map_mean,
                golden_map_sha256(map_hw) == sample.expected_map_sha256,
                ok,
            )
        )
    return results
