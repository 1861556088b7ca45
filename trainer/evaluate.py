"""`m3dm eval`: score a class's test split through the station's scoring path and report the five variants.

`evaluate_models` runs the trainer's torch networks; `evaluate_bundle` runs a shipped bundle through
`edge` runners (ONNX Runtime). Both call `score_split`, which calls `core.model.FrameScorer.score`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import SITE_BACKBONE
from core.features import FeatureRunners
from core.model import FrameScorer
from edge.model_store import DECISION_VARIANT, ModelInfo, load_model_info
from trainer.dataset_features import SplitFeatures, extract_split
from trainer.defect_types import auroc_by_defect_type, defect_types_markdown, scan_records
from trainer.metrics import VariantMetrics, evaluate_variant
from trainer.progress import track
from trainer.report import (
    plot_pro_curves,
    plot_roc_curves,
    results_to_json,
    results_to_markdown,
    write_heatmap_overlays,
)

log = logging.getLogger("m3dm.trainer")


@dataclass
class ScoredSplit:
    """Per-variant image scores (N,) and maps (N, 224, 224) of a test split, with its ground truth."""

    split: SplitFeatures
    image: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]
    score_ms: float


def score_split(split: SplitFeatures, scorer: FrameScorer) -> ScoredSplit:
    """Every variant the scorer has (five, or "rgb" alone for an RGB-only model) on every scan."""
    variants = scorer.variants
    image: dict[str, list[float]] = {v: [] for v in variants}
    maps: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    t0 = time.perf_counter()
    for feats in track(split.features, "scoring", total=len(split.features)):
        scores = scorer.score(feats)
        for v in variants:
            image[v].append(scores.image[v])
            maps[v].append(scores.maps[v].astype(np.float32))
    ms = 1000 * (time.perf_counter() - t0) / max(len(split.features), 1)
    return ScoredSplit(
        split=split,
        image={v: np.asarray(image[v]) for v in variants},
        maps={v: np.stack(maps[v]) for v in variants},
        score_ms=ms,
    )


def metrics_of(scored: ScoredSplit) -> dict[str, VariantMetrics]:
    labels, masks = scored.split.labels, scored.split.masks_nhw()
    return {v: evaluate_variant(labels, scored.image[v], masks, scored.maps[v]) for v in scored.image}


def write_class_report(out_dir: Path, class_name: str, scored: ScoredSplit, info: ModelInfo) -> None:
    """ROC and PRO plots plus heatmap overlays of a sample of test images, so a person can look."""
    out_dir.mkdir(parents=True, exist_ok=True)
    split = scored.split
    plot_roc_curves(out_dir / "roc.png", split.labels, scored.image, f"{class_name}: image ROC")
    plot_pro_curves(out_dir / "pro.png", split.masks_nhw(), scored.maps, f"{class_name}: PRO")
    decision = info.manifest.thresholds.variant if info.manifest is not None else DECISION_VARIANT
    full = scored.maps[decision]
    order = _overlay_sample(split.labels, max_images=8)
    names = [f"{split.refs[i].defect_type}_{split.refs[i].stem}" for i in order]
    write_heatmap_overlays(
        out_dir / "overlays",
        [split.rgb_u8[i] for i in order],
        [full[i] for i in order],
        [split.masks[i] for i in order],
        names,
        threshold=None,
        max_images=len(order),
        vmin=float(np.percentile(full, 1)),
        vmax=float(np.percentile(full, 99.9)),
        image_scores=[float(scored.image[decision][i]) for i in order],
    )


def _overlay_sample(labels: np.ndarray, max_images: int) -> list[int]:
    """A few defective and a few good images, spread over the split."""
    bad, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    pick_bad = (
        bad[np.linspace(0, len(bad) - 1, min(len(bad), max_images - max_images // 4)).astype(int)]
        if len(bad)
        else []
    )
    pick_good = (
        good[np.linspace(0, len(good) - 1, min(len(good), max_images // 4)).astype(int)] if len(good) else []
    )
    return sorted({int(i) for i in [*pick_bad, *pick_good]})


def class_dirs(model: Path) -> list[Path]:
    """A model folder, or every class folder below a parent."""
    if (model / "model.json").is_file():
        return [model]
    found = sorted(p.parent for p in model.glob("*/model.json"))
    if not found:
        from core.errors import ConfigError

        raise ConfigError(f"{model} holds no model.json (nor class folders with one)")
    return found


def evaluate_class(
    data_root: Path, info: ModelInfo, runners: FeatureRunners, scorer: FrameScorer, report_dir: Path | None
) -> tuple[dict[str, VariantMetrics], ScoredSplit]:
    modalities = info.manifest.modalities if info.manifest is not None else ("rgb", "point")
    split = extract_split(
        data_root,
        info.class_name,
        "test",
        info.preset,
        info.preprocess,
        runners,
        keep_images=True,
        modalities=modalities,
    )
    scored = score_split(split, scorer)
    metrics = metrics_of(scored)
    if report_dir is not None:
        write_class_report(report_dir / info.class_name, info.class_name, scored, info)
    return metrics, scored


def record_defect_types(extra: dict[str, Any], class_name: str, scored: ScoredSplit) -> None:
    """Per-defect-type I-AUROC and every scan's image scores into the results' `extra` (results.json)."""
    types = [r.defect_type for r in scored.split.refs]
    stems = [r.stem for r in scored.split.refs]
    extra.setdefault("i_auroc_by_defect_type", {})[class_name] = auroc_by_defect_type(types, scored.image)
    extra.setdefault("scan_scores", {})[class_name] = scan_records(types, stems, scored.image)


def _skipped_banner(classes_meta: dict[str, Any]) -> str:
    """Unreadable test scans are left out of the metrics: say how many, per class, above the tables."""
    counts = {c: len(m.get("skipped") or []) for c, m in classes_meta.items()}
    if not any(counts.values()):
        return ""
    for class_name, count in counts.items():
        if count:
            log.warning(
                "%s: %d test scan(s) could not be read and are left out of the metrics", class_name, count
            )
    listed = ", ".join(
        f"{c}: {n} of {classes_meta[c].get('test_count', 0) + n}" for c, n in counts.items() if n
    )
    return f"> **Skipped test scans** (unreadable, not in the metrics; see results.json): {listed}\n\n"


def summarise(
    results: dict[str, dict[str, VariantMetrics]], out: Path, extra: dict[str, Any]
) -> dict[str, Any]:
    from trainer.report import write_json

    out.mkdir(parents=True, exist_ok=True)
    markdown = results_to_markdown(results)
    random = sorted(c for c, m in extra.get("classes_meta", {}).items() if m.get("random_weights"))
    if random:
        # Random backbones exist for speed tests only; no table from them may pass as a quality result.
        markdown = f"> **RANDOM WEIGHTS** ({', '.join(random)}): these numbers measure nothing.\n\n{markdown}"
    markdown = _skipped_banner(extra.get("classes_meta", {})) + markdown
    by_type = defect_types_markdown(extra.get("i_auroc_by_defect_type", {}))
    if by_type:
        markdown += "\n## I-AUROC per defect type\n\n" + by_type
    (out / "results.md").write_text(markdown)
    write_json(out / "results.json", results, extra)
    payload = results_to_json(results)
    payload.update(extra)
    payload["markdown"] = markdown
    return payload


def evaluate_models(
    data_root: Path, model: Path, out: Path | None, weights_dir: Path | None, encodings: bool = False
) -> dict[str, Any]:
    """Torch-path evaluation of one or more fitted class folders."""
    from edge.station_model import open_model_folder
    from trainer.backbones import WeightPaths, build_feature_runners
    from trainer.fit import uff_runner
    from trainer.train_uff import load_uff

    report_dir = out or (model / "report")
    results: dict[str, dict[str, VariantMetrics]] = {}
    extra: dict[str, Any] = {"path": "torch", "classes_meta": {}}
    runners_by_preset: dict[str, FeatureRunners] = {}  # backbones load once, not once per class
    for class_dir in class_dirs(model):
        info = load_model_info(class_dir)
        # m3dm-site's rgb encoder is the class's own: its runners are per class folder
        key = str(class_dir) if info.preset.rgb_backbone == SITE_BACKBONE else info.preset.name
        if key not in runners_by_preset:
            weights = WeightPaths(weights_dir=weights_dir)
            runners_by_preset[key] = build_feature_runners(info.preset, weights, class_dir)
        runners = runners_by_preset[key]
        # The one loader a station uses too (draft manifest instead of a signed one), with torch runners.
        rgb_only = info.raw.get("uff") is None and info.raw.get("modalities") == ["rgb"]
        uff = None if rgb_only else uff_runner(load_uff(class_dir / "uff.safetensors"))
        model_view = open_model_folder(class_dir, runners, uff)
        info, scorer = model_view.info, model_view.scorer
        metrics, scored = evaluate_class(data_root, info, runners, scorer, report_dir)
        results[info.class_name] = metrics
        record_defect_types(extra, info.class_name, scored)
        extra["classes_meta"][info.class_name] = {
            "test_count": len(scored.split.refs),
            "skipped": scored.split.skipped,
            "score_ms_per_frame": scored.score_ms,
            "preset": info.preset.name,
            "random_weights": info.preset.random_weights,
        }
        if encodings:
            from trainer.encoding_eval import compare_encodings

            extra.setdefault("encodings", {})[info.class_name] = compare_encodings(info, scorer, scored)
    if encodings:
        from trainer.encoding_eval import encodings_markdown

        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "encodings.md").write_text(encodings_markdown(extra["encodings"]))
    return summarise(results, report_dir, extra)


def evaluate_bundle(data_root: Path, bundle: Path, key: Path | None, out: Path | None) -> dict[str, Any]:
    """Station-path evaluation: the bundle's ONNX graphs on ONNX Runtime, its encoded banks, core scoring."""
    from edge.station_model import open_bundle

    station = open_bundle(bundle, key)
    report_dir = out or (station.root.parent / f"{station.root.name}-report")
    metrics, scored = evaluate_class(data_root, station.info, station.runners, station.scorer, report_dir)
    extra: dict[str, Any] = {
        "path": f"bundle ({station.backend})",
        "bundle": station.summary,
        "classes_meta": {
            station.info.class_name: {
                "test_count": len(scored.split.refs),
                "skipped": scored.split.skipped,
                "score_ms_per_frame": scored.score_ms,
                "preset": station.info.preset.name,
                "random_weights": station.manifest.random_weights,
            }
        },
    }
    record_defect_types(extra, station.info.class_name, scored)
    return summarise({station.info.class_name: metrics}, report_dir, extra)
