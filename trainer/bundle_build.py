"""`m3dm bundle build`: a fitted, exported model folder -> encoded banks + golden samples -> signed bundle.

Golden samples are scored by staging the bundle and loading it through `edge.station_model`, the station's
own loader, so the expected values are what a station will compute from exactly these files.
"""

from __future__ import annotations

import logging
import platform
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from core.errors import ConfigError
from core.model import BANKS
from core.mvtec3d import list_samples, load_scan
from edge.bundle import golden_map_sha256
from edge.model_store import ModelInfo, load_banks, load_model_info
from edge.station_model import (
    StationModel,
    golden_scan,
    info_from_manifest,
    replay_golden,
    scorer_from_manifest,
    station_model_from_manifest,
)
from protocol.manifest import ArtifactRef, BankSpec, BundleManifest, GoldenSample, format_utc, new_bundle_id
from trainer.bank_encode import (
    bank_suffix,
    choose_encoding_for_budget,
    default_pq_m,
    encode_bank,
    save_encoded_bank,
)
from trainer.bundle import BundleContents, build_bundle, tar_path_for

log = logging.getLogger("m3dm.trainer")
DECISION_VARIANT = "rgb+point+fusion"
GOLDEN_COUNT = 3


def bank_encodings(info: ModelInfo, encoding: str | None, budget_mb: float | None) -> dict[str, str]:
    if encoding is not None and budget_mb is not None:
        raise ConfigError("give --bank-encoding or --bank-budget-mb, not both")
    names = [n for n in BANKS if n in info.raw["banks"]]  # "rgb" alone for an RGB-only model
    if encoding is not None:
        return dict.fromkeys(names, encoding)
    if budget_mb is not None:
        shapes = {n: (info.raw["banks"][n]["rows"], info.raw["banks"][n]["dim"]) for n in names}
        return choose_encoding_for_budget(shapes, budget_mb)
    return dict.fromkeys(names, "fp32")


def stage_banks(info: ModelInfo, encodings: dict[str, str], staging: Path) -> dict[str, BankSpec]:
    specs = {}
    for name, bank in load_banks(info).items():
        enc = encodings[name]
        pq_m = default_pq_m(bank.dim) if enc == "pq" else None
        rel = f"banks/{name}{bank_suffix(enc)}"
        save_encoded_bank(encode_bank(bank.feats_mc, enc, pq_m=pq_m, seed=0), staging / rel)
        # Row 0: per-channel mean, row 1: per-channel scale (a scalar scale is broadcast).
        stats_rel = f"banks/{name}_stats.npy"
        scale_c = np.broadcast_to(np.asarray(bank.feat_scale, np.float32), bank.feat_mean_c.shape)
        np.save(staging / stats_rel, np.stack([bank.feat_mean_c, scale_c]), allow_pickle=False)
        source = info.manifest.banks[name] if info.manifest is not None else None
        index_rel = None
        if source is not None and source.index_path is not None:  # the trainer's ANN index, as chosen
            index_rel = f"banks/{name}.faiss"
            shutil.copyfile(info.root / source.index_path, staging / index_rel)
        local_rel = None
        if bank.local_scale_k is not None:  # local_norm's scales, per row: the encoded rows keep their order
            local_rel = f"banks/{name}_local_scale.npy"
            np.save(staging / local_rel, bank.local_scale_k, allow_pickle=False)
        specs[name] = BankSpec(
            path=rel,
            encoding=enc,
            rows=int(bank.feats_mc.shape[0]),
            dim=bank.dim,
            grid=bank.grid,
            feat_mean=0.0,
            feat_std=1.0,  # the per-channel scale lives in the stats file
            stats_path=stats_rel,
            pq_m=pq_m,
            index_path=index_rel,
            index_kind=source.index_kind if index_rel else None,
            index_params=source.index_params if index_rel else None,
            index_recall=source.index_recall if index_rel else None,
            local_scale_path=local_rel,
        )
    return specs


def draft_manifest(
    info: ModelInfo, banks: dict[str, BankSpec], version: str, counter: int, expires_days: int
) -> BundleManifest:
    """The model folder's draft manifest (the one schema), stamped for this release with its staged banks."""
    if info.manifest is None:
        raise ConfigError(f"{info.root}: model folder has no draft manifest")
    base = info.manifest
    now = datetime.now(UTC).replace(microsecond=0)
    return msgspec.structs.replace(
        base,
        bundle_id=new_bundle_id(),
        version=version,
        created_utc=format_utc(now),
        expires_utc=format_utc(now + timedelta(days=expires_days)),
        anti_rollback_counter=counter,
        networks={name: ArtifactRef(ref.path) for name, ref in base.networks.items()},
        banks=banks,
        provenance=msgspec.structs.replace(
            base.provenance, trainer_version=package_version("m3dm-fleet"), host=platform.node()
        ),
        golden=[],
        files={},
    )


def stage_int8_networks(draft: BundleManifest, staging: Path) -> BundleManifest:
    """Quantise each staged fp32 graph to `<name>.int8.onnx` beside it; the int8 graphs become the bundle's
    networks and the fp32 ones its `fp32_networks` (shipped, hashed and signed like every file)."""
    from trainer.export import quantize_int8

    int8 = {}
    for name, ref in draft.networks.items():
        rel = str(Path(ref.path).with_suffix(".int8.onnx").as_posix())
        quantize_int8(staging / ref.path, staging / rel)
        int8[name] = ArtifactRef(rel)
    fp32 = {name: ArtifactRef(ref.path) for name, ref in draft.networks.items()}
    return msgspec.structs.replace(draft, precision="int8", networks=int8, fp32_networks=fp32)


def stage_golden_inputs(data_root: Path | None, class_name: str, staging: Path) -> list[str]:
    """A few test scans (good and defective) saved as .npz inputs; none when no data root is given."""
    if data_root is None:
        return []
    refs = list_samples(data_root, class_name, "test")
    good = [r for r in refs if r.label == 0][:1]
    bad = [r for r in refs if r.label == 1]
    picks = good + bad[:: max(1, len(bad) // (GOLDEN_COUNT - len(good)))][: GOLDEN_COUNT - len(good)]
    paths = []
    for i, ref in enumerate(picks):
        raw = load_scan(ref)
        rel = f"golden/{i:03d}_{ref.defect_type}.npz"
        (staging / "golden").mkdir(exist_ok=True)
        # An RGB-only class has no points: its golden input is the rgb array alone.
        arrays = {"rgb": raw.rgb_hwc_u8} | ({} if raw.xyz_hwc_m is None else {"xyz": raw.xyz_hwc_m})
        np.savez_compressed(staging / rel, **arrays)
        paths.append(rel)
    return paths


def golden_samples(
    staging: Path, manifest: BundleManifest, inputs: list[str], precision: str | None = None
) -> list[GoldenSample]:
    """Expected outputs, computed by the station's own loader on exactly the staged files (ONNX Runtime);
    precision "fp32" scores an int8 bundle's fp32 graphs (see `edge.station_model.networks_to_run`)."""
    model = station_model_from_manifest(staging, manifest, backend="ort", precision=precision)
    variant, needs_xyz = manifest.thresholds.variant, "point" in manifest.modalities
    samples = []
    for rel in inputs:
        scores = model.score_raw(golden_scan(staging, rel, needs_xyz))
        image, map_hw = scores.image[variant], scores.maps[variant]
        tol = max(1e-4, 1e-3 * abs(image))
        samples.append(
            GoldenSample(rel, image, golden_map_sha256(map_hw), float(map_hw.mean()), tol, variant)
        )
    return samples


def cross_check_golden(
    staging: Path, manifest: BundleManifest, model_dir: Path, weights_dir: Path | None
) -> list[dict[str, float]]:
    """Score every golden input a second, independent way: the trainer's torch networks (not the exported
    ONNX graphs) over the same staged banks. A golden expectation both paths do not agree on is refused, so
    replaying it on a station checks the station against the trainer, not only against itself."""
    from trainer.backbones import WeightPaths, build_feature_runners
    from trainer.fit import uff_runner
    from trainer.train_uff import load_uff

    info = info_from_manifest(staging, manifest)
    runners = build_feature_runners(info.preset, WeightPaths(weights_dir=weights_dir), Path(model_dir))
    uff = uff_runner(load_uff(Path(model_dir) / "uff.safetensors")) if "uff" in manifest.networks else None
    scorer = scorer_from_manifest(staging, manifest, uff, info.score)
    trainer_model = StationModel(staging, manifest, info, runners, scorer, "torch")
    checked = []
    # int8 expectations differ from torch fp32 by design: an int8 bundle's fp32 ones are cross-checked
    for sample in manifest.golden if manifest.precision == "fp32" else manifest.fp32_golden:
        scores = trainer_model.score_raw(
            golden_scan(staging, sample.input_path, "point" in manifest.modalities)
        )
        image = scores.image[sample.variant]
        map_mean = float(scores.maps[sample.variant].mean())
        off = max(abs(image - sample.expected_image_score), abs(map_mean - sample.expected_map_mean))
        if off > sample.tolerance_abs:
            raise ConfigError(
                f"golden {sample.input_path}: station path scores {sample.expected_image_score:.6g} "
                f"(map mean {sample.expected_map_mean:.6g}), trainer path {image:.6g} ({map_mean:.6g}); "
                f"differ by {off:.3g} > tolerance {sample.tolerance_abs:.3g}"
            )
        checked.append({"station": sample.expected_image_score, "trainer": image, "abs_diff": off})
    return checked


def build_model_bundle(
    model_dir: Path,
    key_dir: Path,
    out: Path,
    version: str,
    counter: int,
    expires_days: int,
    bank_encoding: str | None,
    budget_mb: float | None,
    data_root: Path | None,
    weights_dir: Path | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """precision "int8" ships ONNX Runtime dynamic-int8 graphs (`trainer.export.quantize_int8`) as the
    bundle's networks AND the fp32 graphs, with golden expectations for both; the manifest records it."""
    if precision not in ("fp32", "int8"):
        raise ConfigError(f"bundle precision must be fp32 or int8, not {precision!r}")
    info = load_model_info(model_dir)
    if "networks" not in info.raw:
        # Not exported yet: export here (ONNX + parity check) instead of sending the user away.
        from trainer.pipeline import export_class

        log.info("%s: no ONNX graphs yet, exporting first", info.class_name)
        export_class(Path(model_dir), weights_dir, engine=False)
        info = load_model_info(model_dir)
    staging = Path(tempfile.mkdtemp(prefix="m3dm-stage-"))
    try:
        for rel in info.raw["networks"].values():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_dir / rel, staging / rel)
        banks = stage_banks(info, bank_encodings(info, bank_encoding, budget_mb), staging)
        draft = draft_manifest(info, banks, version, counter, expires_days)
        if precision == "int8":
            draft = stage_int8_networks(draft, staging)
        inputs = stage_golden_inputs(data_root, info.class_name, staging)
        golden = golden_samples(staging, draft, inputs)
        fp32_golden = golden_samples(staging, draft, inputs, "fp32") if draft.fp32_networks else []
        draft = msgspec.structs.replace(draft, golden=golden, fp32_golden=fp32_golden)
        cross_checked = cross_check_golden(staging, draft, model_dir, weights_dir)
        files = {str(p.relative_to(staging).as_posix()): p for p in sorted(staging.rglob("*")) if p.is_file()}
        bundle_dir = build_bundle(BundleContents(manifest=draft, files=files), key_dir, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "bundle_id": draft.bundle_id,
        "version": version,
        "path": str(bundle_dir),
        "tar": str(tar_path_for(bundle_dir)),
        "banks": {n: s.encoding for n, s in banks.items()},
        "precision": draft.precision,
        "golden": len(golden),
        "golden_cross_check": cross_checked,
    }


def verify_model_bundle(bundle: Path, key_dir: Path, min_counter: int | None) -> dict[str, Any]:
    """Signature/hash/expiry/counter checks, then (if they pass) the golden replay on ONNX Runtime.

    Each check has `status` ok | failed | skipped (a check after a failure is not run, so it is not a FAIL).
    A tar is extracted into a temporary folder that is removed again, whatever the outcome.
    """
    from edge.bundle import safe_extract, verify_report
    from edge.station_model import open_bundle

    scratch = Path(tempfile.mkdtemp(prefix="m3dm-verify-")) if bundle.is_file() else None
    try:
        root = safe_extract(bundle, scratch / bundle.stem) if scratch is not None else bundle
        public = key_dir / "bundle_signing.pub" if key_dir.is_dir() else key_dir
        report = verify_report(root, public, min_counter=min_counter).to_dict()
        checks = {
            name: {"ok": c["status"] == "ok", "status": c["status"], "message": c["message"]}
            for name, c in report["checks"].items()
        }
        ok = all(c["ok"] for c in checks.values())
        if not ok:
            checks["golden"] = {"ok": False, "status": "skipped", "message": "not replayed: a check failed"}
            return {"ok": False, "bundle": str(bundle), "checks": checks}
        results = replay_golden(open_bundle(root, key_dir, backend="ort", min_counter=min_counter))
        golden_ok = all(r.ok for r in results)
        detail = "; ".join(
            f"{r.input_path}: {r.actual:.5g} vs {r.expected:.5g}"
            + (f" FAILED, {r.reason}" if not r.ok else "")
            for r in results
        )
        checks["golden"] = {
            "ok": golden_ok,
            "status": "ok" if golden_ok else "failed",
            "message": f"{len(results)} replayed on ONNX Runtime: {detail or 'no golden samples'}",
        }
        return {"ok": golden_ok, "bundle": str(bundle), "checks": checks}
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
