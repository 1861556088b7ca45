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
from edge.station_model import replay_golden, station_model_from_manifest
from protocol.manifest import (
    SCHEMA_VERSION,
    ArtifactRef,
    BankSpec,
    BundleManifest,
    DLFCoefficients,
    FeatureSpec,
    GoldenSample,
    InputSpec,
    Provenance,
    ScoringSpec,
    Thresholds,
    format_utc,
    new_bundle_id,
)
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
    if encoding is not None:
        return dict.fromkeys(BANKS, encoding)
    if budget_mb is not None:
        shapes = {n: (info.raw["banks"][n]["rows"], info.raw["banks"][n]["dim"]) for n in BANKS}
        return choose_encoding_for_budget(shapes, budget_mb)
    return dict.fromkeys(BANKS, "fp32")


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
        )
    return specs


def scoring_spec(info: ModelInfo) -> ScoringSpec:
    raw = info.raw
    norm = raw.get("normaliser") or {}
    stats = (
        {
            bank: {
                kind: float(norm[f"{kind}_b"][i])
                for kind in ("image_mean", "image_std", "pixel_mean", "pixel_std")
            }
            for i, bank in enumerate(BANKS)
        }
        if norm
        else {}
    )
    dlf = {
        v: DLFCoefficients(
            tuple(d["image"]["coef"]), d["image"]["offset"], tuple(d["pixel"]["coef"]), d["pixel"]["offset"]
        )
        for v, d in raw["dlf"].items()
    }
    s = info.score
    return ScoringSpec(s.rgb_lambda, s.blur_sigma_px, s.reweight_k, s.output_size, stats, dlf)


def draft_manifest(
    info: ModelInfo, banks: dict[str, BankSpec], version: str, counter: int, expires_days: int
) -> BundleManifest:
    p = info.preset
    now = datetime.now(UTC).replace(microsecond=0)
    raw = info.raw
    return BundleManifest(
        schema_version=SCHEMA_VERSION,
        bundle_id=new_bundle_id(),
        version=version,
        class_name=info.class_name,
        preset=p.name,
        random_weights=p.random_weights,
        created_utc=format_utc(now),
        expires_utc=format_utc(now + timedelta(days=expires_days)),
        anti_rollback_counter=counter,
        input_spec=InputSpec(
            **{k: v for k, v in raw["preprocess"].items() if k in InputSpec.__struct_fields__}
        ),
        feature_spec=FeatureSpec(
            p.rgb_backbone,
            p.point_backbone,
            p.rgb_dim,
            p.point_dim,
            p.fusion_dim,
            p.rgb_grid,
            p.point_grid,
            p.num_groups,
            p.group_size,
        ),
        networks={name: ArtifactRef(rel) for name, rel in raw["networks"].items()},
        banks=banks,
        scoring=scoring_spec(info),
        thresholds=Thresholds(DECISION_VARIANT, info.thresholds[DECISION_VARIANT], info.false_reject_rate),
        precision="fp32",
        provenance=Provenance(
            dataset=str(raw["provenance"].get("data_root", "")),
            training_config={
                "fit": raw.get("fit", {}),
                "preset": raw["preset"],
                "export": raw.get("export", {}),
            },
            git_commit=raw["provenance"].get("git_commit", "unknown"),
            trainer_version=package_version("m3dm-fleet"),
            host=platform.node(),
        ),
    )


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
        np.savez_compressed(staging / rel, rgb=raw.rgb_hwc_u8, xyz=raw.xyz_hwc_m)
        paths.append(rel)
    return paths


def golden_samples(staging: Path, manifest: BundleManifest, inputs: list[str]) -> list[GoldenSample]:
    model = station_model_from_manifest(staging, manifest, backend="ort")
    samples = []
    for rel in inputs:
        with np.load(staging / rel, allow_pickle=False) as data:
            from core.scan import RawScan

            scores = model.score_raw(RawScan(rgb_hwc_u8=data["rgb"], xyz_hwc_m=data["xyz"], source=rel))
        image, map_hw = scores.image[DECISION_VARIANT], scores.maps[DECISION_VARIANT]
        tol = max(1e-4, 1e-3 * abs(image))
        samples.append(
            GoldenSample(rel, image, golden_map_sha256(map_hw), float(map_hw.mean()), tol, DECISION_VARIANT)
        )
    return samples


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
) -> dict[str, Any]:
    info = load_model_info(model_dir)
    if "networks" not in info.raw:
        raise ConfigError(f"{model_dir} has no ONNX graphs yet: run `m3dm export --model {model_dir}` first")
    staging = Path(tempfile.mkdtemp(prefix="m3dm-stage-"))
    try:
        for rel in info.raw["networks"].values():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_dir / rel, staging / rel)
        banks = stage_banks(info, bank_encodings(info, bank_encoding, budget_mb), staging)
        draft = draft_manifest(info, banks, version, counter, expires_days)
        inputs = stage_golden_inputs(data_root, info.class_name, staging)
        golden = golden_samples(staging, draft, inputs)
        draft = msgspec.structs.replace(draft, golden=golden)
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
        "golden": len(golden),
    }


def verify_model_bundle(bundle: Path, key_dir: Path, min_counter: int | None) -> dict[str, Any]:
    """Signature/hash/expiry/counter checks, then (if they pass) the golden replay on ONNX Runtime."""
    from edge.bundle import verify_report
    from edge.station_model import open_bundle

    root = bundle
    if bundle.is_file():
        from edge.bundle import safe_extract

        root = safe_extract(bundle, Path(tempfile.mkdtemp(prefix="m3dm-verify-")) / bundle.stem)
    public = key_dir / "bundle_signing.pub" if key_dir.is_dir() else key_dir
    report = verify_report(root, public, min_counter=min_counter).to_dict()
    checks = {
        name: {"ok": c["status"] == "ok", "message": c["message"]} for name, c in report["checks"].items()
    }
    ok = all(c["ok"] for c in checks.values())
    if ok:
        results = replay_golden(open_bundle(root, key_dir, backend="ort", min_counter=min_counter))
        golden_ok = all(r.ok for r in results)
        detail = ", ".join(f"{r.actual:.5g} vs {r.expected:.5g}" for r in results) or "no golden samples"
        checks["golden"] = {"ok": golden_ok, "message": f"{len(results)} replayed on ONNX Runtime: {detail}"}
        ok = golden_ok
    return {"ok": ok, "bundle": str(bundle), "checks": checks}
