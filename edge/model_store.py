"""A fitted model folder on disk: `model.json` (the training record) + its DRAFT bundle manifest. numpy only.

One schema carries the scoring facts: `protocol.manifest.BundleManifest`. A model folder holds a draft of it
(`manifest.json`: unsigned, `files` empty, network hashes unset) written by `m3dm train` and refreshed by
`m3dm export`; `m3dm bundle build` seals and signs a copy. `model.json` keeps what only the trainer needs
(fit settings, per-variant thresholds, parity reports, timings, raw bank files for re-encoding).

`edge.station_model` is the one loader for both a model folder and a bundle: it turns a manifest into a
`ModelInfo` and a `FrameScorer`. `load_model_info` / `load_scorer` here are the model-folder entry points.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from core.config import FeaturePreset, PreprocessConfig, ScoreConfig
from core.errors import ConfigError, CorruptFileError
from core.model import BANKS
from core.runner import Runner
from core.scoring import MemoryBank
from protocol.errors import SchemaError
from protocol.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ArtifactRef,
    BankSpec,
    BundleManifest,
    DLFCoefficients,
    FeatureSpec,
    InputSpec,
    Provenance,
    ScoringSpec,
    Thresholds,
    canonical_json,
    format_utc,
    new_bundle_id,
)

if TYPE_CHECKING:
    from core.model import FrameScorer

MODEL_FORMAT = "m3dm-model/1"
DECISION_VARIANT = "rgb+point+fusion"
DRAFT_VERSION = "0.0.0"  # a draft is not a release; `bundle build` sets the real version
DRAFT_VALID_DAYS = 365


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder or bundle says about itself, parsed into frozen configs.

    `raw` is model.json for a model folder and the manifest as a dict for a bundle; `manifest` is the draft
    (model folder) or the verified manifest (bundle).
    """

    root: Path
    class_name: str
    preset: FeaturePreset
    preprocess: PreprocessConfig
    score: ScoreConfig
    thresholds: dict[str, float]
    false_reject_rate: float
    raw: dict[str, Any]
    manifest: BundleManifest | None = None


def read_model_json(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "model.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{model_dir} is not a model folder (no model.json)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"unreadable model.json: {err}", path) from None
    if not isinstance(raw, dict) or raw.get("format") != MODEL_FORMAT:
        fmt = raw.get("format") if isinstance(raw, dict) else None
        raise ConfigError(f"{path}: unsupported model format {fmt!r}, expected {MODEL_FORMAT}")
    return raw


# ------------------------------------------------------------------------ model.json -> draft manifest


def _modalities(raw: dict[str, Any]) -> tuple[str, ...]:
    """("rgb", "point"), or ("rgb",) for a model fitted on a class without xyz files (older: always both)."""
    return tuple(raw.get("modalities") or ("rgb", "point"))


def _network_paths(raw: dict[str, Any]) -> dict[str, str]:
    """Exported graphs, or where `m3dm export` will write them (the draft names them before they exist).

    An RGB-only model has no UFF and no point network (and with the weight-free preset, no graph at all).
    """
    if "networks" in raw:
        return dict(raw["networks"])
    preset, modalities = raw["preset"], _modalities(raw)
    names = (["uff"] if "point" in modalities else []) + [
        n for n in modalities if preset[f"{n}_backbone"] != "free"
    ]
    return {name: f"onnx/{name}.onnx" for name in names}


def _bank_specs(raw: dict[str, Any]) -> dict[str, BankSpec]:
    specs = {}
    for name in (b for b in BANKS if b in raw["banks"]):  # all three, or "rgb" alone for RGB-only
        entry = raw["banks"][name]
        index = entry.get("index") or {}  # a faiss ANN index chosen by the trainer (trainer/ann.py)
        specs[name] = BankSpec(
            path=entry["file"],
            encoding="fp32",
            rows=int(entry["rows"]),
            dim=int(entry["dim"]),
            grid=int(entry["grid"]),
            stats_path=entry.get("stats_file"),  # row 0 mean, row 1 scale per channel
            index_path=index.get("file"),
            index_kind=index.get("kind"),
            index_params=index.get("params"),
            index_recall=index.get("recall_at_1"),
            local_scale_path=entry.get("local_scale_file"),
        )
    return specs


def _scoring_spec(raw: dict[str, Any]) -> ScoringSpec:
    norm = raw.get("normaliser") or {}
    kinds = ("image_mean", "image_std", "pixel_mean", "pixel_std")
    stats = {b: {k: float(norm[f"{k}_b"][i]) for k in kinds} for i, b in enumerate(BANKS)} if norm else {}
    # (an RGB-only model has no normaliser and no DLF: both stay empty)
    dlf = {
        v: DLFCoefficients(
            tuple(d["image"]["coef"]), d["image"]["offset"], tuple(d["pixel"]["coef"]), d["pixel"]["offset"]
        )
        for v, d in raw["dlf"].items()
    }
    s = raw["score"]
    return ScoringSpec(
        s["rgb_lambda"],
        s["blur_sigma_px"],
        s["reweight_k"],
        s["output_size"],
        stats,
        dlf,
        image_score_rule=s.get("image_rule", "max_patch"),  # model folders from before the rule: max_patch
        image_topk_fraction=s.get("topk_fraction", 0.01),
        local_norm_key=s.get("local_key", "row"),
    )


def draft_manifest_from_model_json(raw: dict[str, Any], trainer_version: str, host: str) -> BundleManifest:
    """The model folder's scoring facts as an unsigned draft manifest (the one schema)."""
    p, prov = raw["preset"], raw.get("provenance", {})
    modalities = _modalities(raw)
    decision = DECISION_VARIANT if "point" in modalities else "rgb"
    now = datetime.now(UTC).replace(microsecond=0)
    try:
        return BundleManifest(
            schema_version=SCHEMA_VERSION,
            bundle_id=new_bundle_id(),
            version=DRAFT_VERSION,
            class_name=raw["class_name"],
            preset=p["name"],
            random_weights=bool(p.get("random_weights", False)),
            created_utc=format_utc(now),
            expires_utc=format_utc(now + timedelta(days=DRAFT_VALID_DAYS)),
            anti_rollback_counter=0,
            input_spec=InputSpec(
                **{k: v for k, v in raw["preprocess"].items() if k in InputSpec.__struct_fields__}
            ),
            feature_spec=FeatureSpec(
                p["rgb_backbone"],
                p["point_backbone"],
                p["rgb_dim"],
                p["point_dim"],
                p["rgb_dim"] + p["point_dim"],
                p["rgb_grid"],
                p["point_grid"],
                p["num_groups"],
                p["group_size"],
            ),
            networks={name: ArtifactRef(rel) for name, rel in _network_paths(raw).items()},
            banks=_bank_specs(raw),
            scoring=_scoring_spec(raw),
            thresholds=Thresholds(
                decision,
                float(raw["thresholds"][decision]),
                raw.get("false_reject_rate", 0.01),
                score_quantiles=_score_quantiles(raw),
            ),
            precision="fp32",
            provenance=Provenance(
                dataset=str(prov.get("data_root", "")),
                training_config={"fit": raw.get("fit", {}), "preset": p, "export": raw.get("export", {})},
                git_commit=prov.get("git_commit", "unknown"),
                trainer_version=trainer_version,
                host=host,
            ),
            modalities=modalities,
        )
    except (KeyError, TypeError) as err:
        raise ConfigError(f"model.json of {raw.get('class_name')!r} lacks a scoring fact: {err!r}") from None


def _score_quantiles(raw: dict[str, Any]) -> dict[str, tuple[float, ...]]:
    """variant -> validation-normal score quantiles from model.json's threshold report (older: none)."""
    reports = raw.get("threshold_report") or {}
    return {v: tuple(r["score_quantiles"]) for v, r in reports.items() if r.get("score_quantiles")}


def write_draft_manifest(model_dir: Path, manifest: BundleManifest) -> Path:
    """Write the draft atomically (canonical JSON, same bytes a bundle would hold before sealing)."""
    path = Path(model_dir) / MANIFEST_NAME
    tmp = path.with_name(MANIFEST_NAME + ".tmp")
    tmp.write_bytes(canonical_json(manifest))
    tmp.replace(path)
    return path


def read_draft_manifest(model_dir: Path) -> BundleManifest:
    """The model folder's draft manifest; a folder from before drafts existed gets one built in memory."""
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        return draft_manifest_from_model_json(read_model_json(model_dir), "unknown", "unknown")
    try:
        return msgspec.convert(json.loads(path.read_bytes()), BundleManifest, strict=True)
    except (json.JSONDecodeError, UnicodeDecodeError, msgspec.ValidationError, SchemaError) as err:
        raise CorruptFileError(f"unreadable draft manifest: {err}", path) from None


# ----------------------------------------------------------------------------------- model folder


def load_model_info(model_dir: Path) -> ModelInfo:
    """model.json + draft manifest -> ModelInfo (scoring facts from the manifest, through the one loader)."""
    from edge.station_model import info_from_manifest

    raw = read_model_json(model_dir)
    return info_from_manifest(Path(model_dir), read_draft_manifest(model_dir), raw=raw)


def load_array(path: Path) -> np.ndarray:
    """A .npy array, never unpickled."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CorruptFileError(f"unreadable array: {err}", path) from None


def load_banks(info: ModelInfo) -> dict[str, MemoryBank]:
    """The fp32 memory banks of a model folder (or a bundle), through the manifest's bank specs."""
    from edge.station_model import memory_banks_from_manifest

    if info.manifest is None:
        raise ConfigError(f"{info.root}: no manifest to load banks from")
    return memory_banks_from_manifest(info.root, info.manifest)


def load_scorer(
    info: ModelInfo, uff: Runner | None, banks: dict[str, MemoryBank] | None = None
) -> FrameScorer:
    """The FrameScorer of a model folder. `uff` is None only for a model fitted without UFF."""
    from edge.station_model import scorer_from_manifest

    if info.raw.get("uff") is not None and uff is None:
        raise ConfigError(f"model {info.root} was fitted with UFF; a UFF runner is required")
    if info.manifest is None:
        raise ConfigError(f"{info.root}: no manifest to build a scorer from")
    return scorer_from_manifest(info.root, info.manifest, uff, info.score, banks)
