"""A verified bundle, ready to score: runners for its ONNX graphs, decoded banks, the FrameScorer.

Everything here comes from the signed manifest (input spec, feature dims, bank encodings, score
normalisation, DLF weights, thresholds), so a station needs no other configuration about the model.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.bank_codec import decode
from core.config import PRESETS, FeaturePreset, PreprocessConfig, ScoreConfig, check_backbones
from core.errors import ConfigError, CorruptFileError, M3DMError, MissingFileError
from core.features import FeatureRunners, extract_features
from core.fusion import LinearOneClassSVM, ScoreNormaliser
from core.model import BANKS, FrameScorer, FrameScores
from core.preprocess import prepare_scan
from core.runner import Runner
from core.scan import PatchFeatures, PreparedScan, RawScan
from core.scoring import MemoryBank
from edge.bundle import golden_map_sha256, load_banks, safe_extract, verify_bundle
from edge.model_store import ModelInfo, load_array
from edge.runners import make_runner
from protocol.manifest import MANIFEST_NAME, ArtifactRef, BundleManifest, GoldenSample, manifest_from_json

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
        """Stage 1 of `score_raw` (the station pipeline runs each stage on its own thread).

        An RGB-only model ignores a frame's points (it was trained without them, so plane removal must not
        touch the rgb either); a model that uses points refuses a frame that has none.
        """
        if "point" not in self.manifest.modalities:
            raw = dataclasses.replace(raw, xyz_hwc_m=None)
        elif raw.xyz_hwc_m is None:
            raise MissingFileError("frame has no point cloud, but this model scores rgb + points", raw.source)
        return prepare_scan(raw, self.info.preprocess)

    def score_prepared(self, scan: PreparedScan) -> FrameScores:
        """Stages 2 + 3 of `score_raw`: features (runner backend), then kNN scoring -> DLF."""
        return self.score_features(self.features(scan))

    def features(self, scan: PreparedScan) -> PatchFeatures:
        """Stage 2 of `score_raw`: per-patch rgb and point features through the runner backend."""
        return extract_features(scan, self.info.preset, self.runners, self.manifest.modalities)

    def score_features(self, features: PatchFeatures) -> FrameScores:
        """Stage 3 of `score_raw`: UFF, kNN scoring against the banks, DLF."""
        return self.scorer.score(features)


def _preset_from_manifest(manifest: BundleManifest, raw_preset: dict[str, Any] | None) -> FeaturePreset:
    """The manifest's feature facts over the preset's trainer-only settings (point layers, weight needs,
    BatchNorm mode): from model.json for a model folder, else the named preset's defaults."""
    fs = manifest.feature_spec
    check_backbones(fs.rgb_backbone, fs.point_backbone)
    base = PRESETS.get(manifest.preset) or FeaturePreset(manifest.preset, "free", "free", 224, 1, 1)
    if raw_preset:
        known = {f.name for f in dataclasses.fields(FeaturePreset)}
        extra = {k: tuple(v) if isinstance(v, list) else v for k, v in raw_preset.items() if k in known}
        base = dataclasses.replace(base, **extra)
    return dataclasses.replace(
        base,
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


def info_from_manifest(root: Path, manifest: BundleManifest, raw: dict[str, Any] | None = None) -> ModelInfo:
    """ModelInfo from a manifest: a bundle's (sealed) or a model folder's draft, whose model.json is `raw`.

    A model folder keeps every variant's threshold in model.json; a bundle ships the decision variant's.
    """
    spec = manifest.scoring
    input_spec = manifest.input_spec.to_dict()
    preprocess = PreprocessConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in input_spec.items()}
    )
    score = ScoreConfig(
        reweight_k=spec.reweight_k,
        blur_sigma_px=spec.blur_sigma_px,
        output_size=spec.output_size,
        rgb_lambda=spec.rgb_lambda,
        image_rule=spec.image_score_rule,
        topk_fraction=spec.image_topk_fraction,
        local_key=spec.local_norm_key,
    )
    thr = manifest.thresholds
    thresholds = {thr.variant: thr.image_threshold}
    if raw is not None:
        thresholds = {k: float(v) for k, v in raw.get("thresholds", {}).items()} or thresholds
    return ModelInfo(
        root=root,
        class_name=manifest.class_name,
        preset=_preset_from_manifest(manifest, None if raw is None else raw.get("preset")),
        preprocess=preprocess,
        score=score,
        thresholds=thresholds,
        false_reject_rate=thr.false_reject_rate,
        raw=raw if raw is not None else manifest.to_dict(),
        manifest=manifest,
    )


def memory_banks_from_manifest(root: Path, manifest: BundleManifest) -> dict[str, MemoryBank]:
    """Decode every encoded bank to float32 rows: BLAS kNN on decoded rows beats PQ lookup tables on CPU."""
    encoded = load_banks(root, manifest)
    banks = {}
    for name in (b for b in BANKS if b in manifest.banks):  # all three, or "rgb" alone (RGB-only model)
        spec = manifest.banks[name]
        if spec.stats_path is None:
            raise ConfigError(f"bank {name!r} has no per-dimension stats file")
        stats_2c = load_array(root / spec.stats_path)  # row 0 mean, row 1 scale, per channel
        if stats_2c.shape != (2, spec.dim):
            raise ConfigError(f"bank {name!r}: stats must be (2, {spec.dim}), got {stats_2c.shape}")
        index = None
        if spec.index_path is not None:  # faiss is imported only for a bank that ships an index
            from core.ann import load_index

            index = load_index(
                root / spec.index_path, spec.index_kind, spec.index_params, spec.rows, spec.dim
            )
        banks[name] = MemoryBank(
            name=name,
            feats_mc=decode(encoded[name]),
            grid=spec.grid,
            feat_mean_c=stats_2c[0],
            feat_scale=stats_2c[1] * np.float32(spec.feat_std),
            index=index,
            # local_norm's scales: read once here; the bank takes their inverse once (core.scoring)
            local_scale_k=None if spec.local_scale_path is None else load_array(root / spec.local_scale_path),
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


def scorer_from_manifest(
    root: Path,
    manifest: BundleManifest,
    uff: Runner | None,
    score_cfg: ScoreConfig,
    banks: dict[str, MemoryBank] | None = None,
) -> FrameScorer:
    """The FrameScorer of a manifest: its banks, DLF weights and score normaliser, and this UFF runner."""
    dlf, normaliser = scorer_parts(manifest)
    return FrameScorer(
        banks=banks if banks is not None else memory_banks_from_manifest(root, manifest),
        dlf=dlf,
        normaliser=normaliser,
        uff=uff,
        score_cfg=score_cfg,
    )


DEFAULT_ENGINE_CACHE = Path.home() / ".cache" / "m3dm" / "engines"


def networks_to_run(manifest: BundleManifest, precision: str | None) -> tuple[str, dict[str, ArtifactRef]]:
    """(precision, graphs) a station runs: the bundle's own (None), or its fp32 graphs ("fp32"), which an
    int8 bundle also carries so a station can fall back when a precision problem is suspected."""
    if precision is None or precision == manifest.precision:
        return manifest.precision, dict(manifest.networks)
    if precision != "fp32":
        raise ConfigError(
            f"a station runs a bundle's own precision ({manifest.precision}) or fp32, not {precision!r}"
        )
    if not manifest.fp32_networks:
        raise ConfigError(
            f"bundle {manifest.bundle_id[:8]} is {manifest.precision} and carries no fp32 graphs; "
            "rebuild it with `m3dm bundle build --precision int8` (which ships both) or run its own precision"
        )
    return "fp32", {**manifest.networks, **manifest.fp32_networks}


def station_model_from_manifest(
    root: Path,
    manifest: BundleManifest,
    backend: str = "auto",
    engine_cache_dir: Path | None = None,
    precision: str | None = None,
) -> StationModel:
    """Runners and scorer for a bundle directory whose manifest is verified (or being built).

    TensorRT engines are cached OUTSIDE the bundle (default ~/.cache/m3dm/engines, keyed by ONNX hash,
    TensorRT version, GPU and precision): a file written into the bundle would fail its next verification.
    precision None runs the bundle's own graphs; "fp32" its fp32 graphs (see `networks_to_run`).
    """
    running, networks = networks_to_run(manifest, precision)
    info = info_from_manifest(root, manifest)
    cache = engine_cache_dir if engine_cache_dir is not None else DEFAULT_ENGINE_CACHE
    runner_of = {
        name: make_runner(root / ref.path, backend=backend, engine_cache_dir=cache)
        for name, ref in networks.items()
    }
    runners = FeatureRunners(rgb=runner_of.get("rgb"), point=runner_of.get("point"))
    # An RGB-only model has no UFF (and with the weight-free preset no graph at all: numpy scoring only).
    scorer = scorer_from_manifest(root, manifest, runner_of.get("uff"), info.score)
    backend_name = next((r.backend for r in runner_of.values()), "numpy")
    summary = {
        "bundle_id": manifest.bundle_id,
        "version": manifest.version,
        "class": manifest.class_name,
        "preset": manifest.preset,
        "random_weights": manifest.random_weights,
        "backend": backend_name,
        "banks": {n: f"{s.encoding} {s.rows}x{s.dim}" for n, s in manifest.banks.items()},
        "precision": running,
        "variants": list(manifest.variants),
    }
    log.info(
        "bundle %s v%s (%s) loaded, backend %s",
        manifest.bundle_id[:8],
        manifest.version,
        manifest.class_name,
        backend_name,
    )
    return StationModel(root, manifest, info, runners, scorer, backend_name, summary)


def open_model_folder(model_dir: Path, runners: FeatureRunners, uff: Runner | None) -> StationModel:
    """A trainer's model folder through the same loader as a bundle: its draft manifest, the caller's
    (torch) runners. `m3dm eval --model` scores with this; a station never does (drafts are unsigned).
    uff is None for an RGB-only model."""
    from edge.model_store import load_model_info

    info = load_model_info(model_dir)
    assert info.manifest is not None
    scorer = scorer_from_manifest(info.root, info.manifest, uff, info.score)
    backend = "torch" if uff is None else uff.backend
    summary = {"class": info.class_name, "preset": info.preset.name, "backend": backend, "draft": True}
    return StationModel(info.root, info.manifest, info, runners, scorer, backend, summary)


def open_bundle(
    bundle: Path,
    key: Path | None,
    backend: str = "auto",
    min_counter: int | None = None,
    engine_cache_dir: Path | None = None,
    precision: str | None = None,
) -> StationModel:
    """Extract (if a tar), verify (if a key is given), load. Without a key the bundle is loaded UNVERIFIED."""
    bundle = Path(bundle)
    root, scratch = bundle, None
    if bundle.is_file():
        scratch = Path(tempfile.mkdtemp(prefix="m3dm-bundle-"))
    try:
        if scratch is not None:
            root = safe_extract(bundle, scratch / bundle.stem)
        if key is not None:
            public = key / "bundle_signing.pub" if Path(key).is_dir() else Path(key)
            manifest = verify_bundle(root, public, min_counter=min_counter)
        else:
            log.warning("bundle %s loaded WITHOUT signature verification (no --key given)", bundle)
            manifest = manifest_from_json((root / MANIFEST_NAME).read_bytes())
        model = station_model_from_manifest(root, manifest, backend, engine_cache_dir, precision)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    if scratch is not None:
        # the extracted copy lives as long as the model (golden inputs are read from it), then goes
        weakref.finalize(model, shutil.rmtree, scratch, True)
    return model


@dataclass(frozen=True)
class GoldenResult:
    input_path: str
    expected: float
    actual: float
    map_mean_expected: float
    map_mean_actual: float
    map_sha256_exact: bool
    ok: bool
    reason: str = ""  # why it failed: a score off by how much, or an input that could not be scored


def golden_scan(root: Path, sample: GoldenSample | str, needs_xyz: bool = True) -> RawScan:
    """The golden input (.npz with uint8 `rgb` (H,W,3) and float `xyz` (H,W,3)); CorruptFileError if not.

    needs_xyz=False (an RGB-only model): `xyz` may be absent, and is then None.
    """
    rel = sample if isinstance(sample, str) else sample.input_path
    path = Path(root) / rel
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = sorted({"rgb", "xyz"} - set(data.files) - (set() if needs_xyz else {"xyz"}))
            if missing:
                raise CorruptFileError(f"golden input lacks array(s) {missing}; it holds {data.files}", path)
            rgb, xyz = data["rgb"], data["xyz"] if "xyz" in data.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptFileError(f"unreadable golden input: {type(err).__name__}: {err}", path) from None
    if xyz is None:
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise CorruptFileError(f"golden input shape rgb {rgb.shape}; need (H,W,3)", path)
        return RawScan(rgb_hwc_u8=rgb, xyz_hwc_m=None, source=rel)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or xyz.shape != rgb.shape:
        raise CorruptFileError(
            f"golden input shapes rgb {rgb.shape}, xyz {xyz.shape}; need (H,W,3) both", path
        )
    return RawScan(rgb_hwc_u8=rgb, xyz_hwc_m=xyz, source=rel)


def _replay_one(model: StationModel, sample: GoldenSample) -> GoldenResult:
    try:
        needs_xyz = "point" in model.manifest.modalities
        scores = model.score_raw(golden_scan(model.root, sample, needs_xyz))
    except M3DMError as err:
        log.error("golden %s failed to score: %s", sample.input_path, err)
        nan = float("nan")
        return GoldenResult(
            sample.input_path, sample.expected_image_score, nan, sample.expected_map_mean, nan, False, False,
            f"could not be scored: {err}",
        )  # fmt: skip
    actual = scores.image[sample.variant]
    map_hw = scores.maps[sample.variant]
    map_mean = float(map_hw.mean())
    tol = sample.tolerance_abs
    image_off, map_off = abs(actual - sample.expected_image_score), abs(map_mean - sample.expected_map_mean)
    ok = image_off <= tol and map_off <= tol
    reason = (
        "" if ok else f"image score off by {image_off:.3g}, map mean by {map_off:.3g} (tolerance {tol:.3g})"
    )
    return GoldenResult(
        sample.input_path,
        sample.expected_image_score,
        actual,
        sample.expected_map_mean,
        map_mean,
        golden_map_sha256(map_hw) == sample.expected_map_sha256,
        ok,
        reason,
    )


def replay_golden(model: StationModel) -> list[GoldenResult]:
    """Score each golden input; a bundle is activated only if every result is within its tolerance.

    Never raises for a bad golden input: a missing array or unreadable file is a failed result with a reason.
    """
    # The expectations of the graphs this model runs: an int8 bundle told to run fp32 replays its fp32 ones.
    own = model.summary.get("precision", model.manifest.precision) == model.manifest.precision
    samples = model.manifest.golden if own else model.manifest.fp32_golden
    return [_replay_one(model, sample) for sample in samples]
