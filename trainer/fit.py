"""Fit one class: training features -> rgb/point banks -> UFF -> fusion bank -> DLF on held-out normals.

Every score here comes from `core.model.FrameScorer`, the station's own scoring path.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from core.config import FitConfig
from core.errors import InputError
from core.features import FeatureRunners
from core.model import FrameScorer
from core.mvtec3d import RGB_ONLY, class_modalities
from core.scan import PatchFeatures
from trainer.ann import AnnConfig, attach_indexes, held_out_queries, index_entry
from trainer.coreset import build_memory_bank
from trainer.dataset_features import SplitFeatures, extract_split
from trainer.dlf import fit_dlf, fit_score_normaliser
from trainer.local_scale import attach_local_scales
from trainer.model_io import bank_to_files, normaliser_to_dict, svm_to_dict, write_model_json
from trainer.models.uff import UFFExport
from trainer.progress import track
from trainer.thresholds import ThresholdReport, cross_fitted_thresholds, held_out_threshold
from trainer.torch_runner import TorchRunner
from trainer.train_uff import save_uff, train_uff

log = logging.getLogger("m3dm.trainer")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stack_features(features: list[PatchFeatures]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 56, 56, Cp) point and (N, 28, 28, Cr) rgb stacks."""
    return np.stack([f.point_hwc for f in features]), np.stack([f.rgb_hwc for f in features])


def bank_from_grids(
    name: str, feats_nhwc: np.ndarray, fraction: float, cfg: FitConfig, device: str = "cpu"
) -> Any:
    """A coreset bank from (N, g, g, C) training grids, normalised as the preset says.

    device: torch device of the greedy selection ("cuda" on a training GPU; same arithmetic as cpu).
    """
    rows_nc = feats_nhwc.reshape(-1, feats_nhwc.shape[-1])
    per_dim = cfg.preset.bank_norm == "per_dim"
    grid = feats_nhwc.shape[1]
    return build_memory_bank(name, rows_nc, grid, fraction, cfg.coreset, device=device, per_dim=per_dim)


def uff_runner(block: Any) -> TorchRunner:
    return TorchRunner(UFFExport(block), UFFExport.input_names, UFFExport.output_names)


def provisional_scorer(banks: dict, uff: TorchRunner | None, cfg: FitConfig) -> FrameScorer:
    """A scorer without DLF: only its per-bank scores are used, to fit the real DLF."""
    return FrameScorer(banks=banks, dlf=None, normaliser=None, uff=uff, score_cfg=cfg.score)


def held_out_bank_scores(scorer: FrameScorer, split: SplitFeatures) -> tuple[np.ndarray, np.ndarray]:
    """(V, 3) image and (V, 3, 224, 224) map scores of held-out normal scans."""
    images, maps = [], []
    for feats in track(split.features, "held-out scores", total=len(split.features)):
        bank_image, bank_maps = scorer.bank_scores(feats)
        images.append(bank_image)
        maps.append(bank_maps)
    return np.stack(images), np.stack(maps)


def split_off_validation(train: SplitFeatures, class_name: str) -> tuple[SplitFeatures, SplitFeatures]:
    """A data set without a validation split: hold out the last fifth of the training scans (>= 2).

    Those scans never enter a bank, so their scores are held out like real validation scans. A seeded
    split would be no more honest; reader order is already deterministic.
    """
    n_held = max(2, len(train.features) // 5)
    keep = len(train.features) - n_held
    log.info(
        "class %s has no validation split: %d training scans held out for DLF and thresholds",
        class_name,
        n_held,
    )
    fields = ("refs", "features", "masks", "rgb_u8")
    head = SplitFeatures(
        **{f: getattr(train, f)[:keep] for f in fields if getattr(train, f)}, skipped=train.skipped
    )
    tail = SplitFeatures(**{f: getattr(train, f)[keep:] for f in fields if getattr(train, f)})
    return head, tail


def fit_class(
    data_root: Path,
    class_name: str,
    cfg: FitConfig,
    runners: FeatureRunners,
    out_dir: Path,
    ann: AnnConfig | None = None,
    coreset_device: str = "cpu",
) -> dict[str, Any]:
    """Fit and write `out_dir/model.json` with banks, UFF and DLF. Returns a summary with stage timings.

    ann: per-bank ANN choice (default `AnnConfig()`; its docstring says when a bank gets an index).
    coreset_device: torch device of the greedy coreset selection.
    A class without xyz files (core.mvtec3d.class_modalities) is fitted RGB-only: the rgb bank alone, no
    UFF, point or fusion bank, no DLF; its one variant "rgb" gets the threshold. A mixed class is refused.
    """
    modalities = class_modalities(data_root, class_name)
    if modalities == RGB_ONLY:
        log.info(
            "class %s is RGB-only (no xyz/ files): training the RGB bank alone; UFF, point and fusion banks "
            "and DLF are not trained, and the model scores the 'rgb' variant only",
            class_name,
        )
    timings: dict[str, float] = {}
    train, held = _train_and_held_features(data_root, class_name, cfg, runners, modalities, timings)
    t0 = time.perf_counter()
    point_nhwc, rgb_nhwc = stack_features(train.features)
    banks = {"rgb": bank_from_grids("rgb", rgb_nhwc, cfg.coreset.rgb_fraction, cfg, coreset_device)}
    if modalities == RGB_ONLY:
        if cfg.score.image_rule == "local_norm":  # the rgb bank's scales, as for a full model below
            banks = attach_local_scales(banks, {"rgb": rgb_nhwc}, cfg.score.local_key)
        timings["banks_s"] = time.perf_counter() - t0
        fitted = (banks, train, held, out_dir, ann, timings)
        return _fit_rgb_only(data_root, class_name, cfg, *fitted, coreset_device)
    banks["point"] = bank_from_grids("point", point_nhwc, cfg.coreset.point_fraction, cfg, coreset_device)
    timings["banks_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    block, history = train_uff(point_nhwc, rgb_nhwc, cfg.uff, progress=sys.stderr.isatty())
    uff = uff_runner(block)
    timings["uff_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fusion_scorer = provisional_scorer({**banks, "fusion": banks["point"]}, uff, cfg)
    fused_nhwc = np.stack([fusion_scorer.fused_features(f) for f in train.features])
    fraction = cfg.coreset.fusion_fraction
    banks["fusion"] = bank_from_grids("fusion", fused_nhwc, fraction, cfg, coreset_device)
    if cfg.score.image_rule == "local_norm":  # its scales, from leave-one-image-out training distances
        grids = {"rgb": rgb_nhwc, "point": point_nhwc, "fusion": fused_nhwc}
        banks = attach_local_scales(banks, grids, cfg.score.local_key)
    del fused_nhwc
    timings["fusion_bank_s"] = time.perf_counter() - t0

    # Large banks get an ANN index meeting the recall target on held-out normals; everything below
    # (normaliser, DLF, thresholds) is then computed through the search the station will run.
    t0 = time.perf_counter()
    queries = held_out_queries(provisional_scorer(banks, uff, cfg), held.features)
    banks, ann_choices = attach_indexes(banks, queries, ann or AnnConfig())
    timings["ann_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    held_image, held_maps = held_out_bank_scores(provisional_scorer(banks, uff, cfg), held)
    normaliser = fit_score_normaliser(held_image, held_maps)
    dlf = fit_dlf(held_image, held_maps, normaliser, cfg.dlf, cfg.score)
    # Thresholds from out-of-fold scores: the normaliser and DLF above saw every validation scan.
    threshold_reports = cross_fitted_thresholds(held_image, held_maps, banks, uff, cfg)
    _log_supported_rate(class_name, threshold_reports.get("rgb+point+fusion"), cfg)
    timings["dlf_s"] = time.perf_counter() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    save_uff(block, out_dir / "uff.safetensors")
    finite = [v for v in history[-3:] if np.isfinite(v)] or [v for v in history if np.isfinite(v)]
    payload = _payload(data_root, class_name, cfg, banks, ann_choices, out_dir, ann, train, held, timings)
    payload |= {
        "modalities": list(modalities),
        "uff": {"file": "uff.safetensors", "dims_file": "uff.json", "final_loss": float(np.mean(finite))},
        "normaliser": normaliser_to_dict(normaliser),
        "dlf": {v: {"image": svm_to_dict(i), "pixel": svm_to_dict(p)} for v, (i, p) in dlf.items()},
        **_threshold_entries(threshold_reports, cfg),
    }
    payload["fit"]["coreset_device"] = coreset_device
    return _write(out_dir, class_name, payload, timings)


def _train_and_held_features(
    data_root: Path,
    class_name: str,
    cfg: FitConfig,
    runners: FeatureRunners,
    modalities: tuple[str, ...],
    timings: dict[str, float],
) -> tuple[SplitFeatures, SplitFeatures]:
    """Training and held-out features (the last fifth of train when there is no validation split)."""
    t0 = time.perf_counter()
    args = (cfg.preset, cfg.preprocess, runners)
    train = extract_split(data_root, class_name, "train", *args, modalities=modalities)
    held = extract_split(data_root, class_name, "validation", *args, modalities=modalities)
    timings["features_s"] = time.perf_counter() - t0
    if not held.refs and len(train.features) >= 6:
        train, held = split_off_validation(train, class_name)
    if len(train.features) < 2:
        raise InputError(f"class {class_name}: fewer than 2 usable training scans", data_root / class_name)
    if len(held.features) < 2:
        raise InputError(f"class {class_name}: DLF needs at least 2 validation scans", data_root / class_name)
    return train, held


def _fit_rgb_only(
    data_root: Path,
    class_name: str,
    cfg: FitConfig,
    banks: dict[str, Any],
    train: SplitFeatures,
    held: SplitFeatures,
    out_dir: Path,
    ann: AnnConfig | None,
    timings: dict[str, float],
    coreset_device: str,
) -> dict[str, Any]:
    """The rest of an RGB-only fit: ANN choice, held-out rgb scores, threshold; no UFF, no DLF."""
    t0 = time.perf_counter()
    scorer = provisional_scorer(banks, None, cfg)
    banks, ann_choices = attach_indexes(banks, held_out_queries(scorer, held.features), ann or AnnConfig())
    timings["ann_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    held_image, _ = held_out_bank_scores(provisional_scorer(banks, None, cfg), held)
    # Nothing is fitted on the validation scans, so their raw rgb scores are already out of sample.
    reports = {"rgb": held_out_threshold(held_image[:, 0], cfg.false_reject_rate)}
    _log_supported_rate(class_name, reports["rgb"], cfg)
    timings["threshold_s"] = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = _payload(data_root, class_name, cfg, banks, ann_choices, out_dir, ann, train, held, timings)
    payload |= {
        "modalities": list(RGB_ONLY),
        "uff": None,
        "normaliser": None,
        "dlf": {},
        **_threshold_entries(reports, cfg),
    }
    payload["fit"]["coreset_device"] = coreset_device
    return _write(out_dir, class_name, payload, timings)


def _log_supported_rate(class_name: str, report: ThresholdReport | None, cfg: FitConfig) -> None:
    if report is not None and report.expected_false_reject_rate > 2 * cfg.false_reject_rate:
        log.info(
            "class %s: %d validation normals support a false-reject rate of ~%.1f%% (<= %.1f%% at 95%%), "
            "not the %.1f%% asked for; more validation scans tighten it",
            class_name,
            report.n_normals,
            100 * report.expected_false_reject_rate,
            100 * report.interval_95[1],
            100 * cfg.false_reject_rate,
        )


def _threshold_entries(reports: dict[str, ThresholdReport], cfg: FitConfig) -> dict[str, Any]:
    return {
        "thresholds": {v: report.threshold for v, report in reports.items()},
        "false_reject_rate": cfg.false_reject_rate,
        "threshold_report": {v: r.to_dict() for v, r in reports.items()},
    }


def _payload(
    data_root: Path,
    class_name: str,
    cfg: FitConfig,
    banks: dict[str, Any],
    ann_choices: dict[str, Any],
    out_dir: Path,
    ann: AnnConfig | None,
    train: SplitFeatures,
    held: SplitFeatures,
    timings: dict[str, float],
) -> dict[str, Any]:
    """model.json entries every fit has: configs, bank files (with their ANN index), provenance."""
    return {
        "class_name": class_name,
        "preset": asdict(cfg.preset),
        "preprocess": asdict(cfg.preprocess),
        "score": asdict(cfg.score),
        "fit": {
            "coreset": asdict(cfg.coreset),
            "uff": asdict(cfg.uff),
            "dlf": asdict(cfg.dlf),
            "ann": asdict(ann or AnnConfig()),
            "seed": cfg.seed,
        },
        "banks": {
            name: bank_to_files(bank, out_dir) | {"index": index_entry(ann_choices[name], name, out_dir)}
            for name, bank in banks.items()
        },
        "provenance": {
            "data_root": str(data_root),
            "train_count": len(train.features),
            "validation_count": len(held.features),
            "skipped": train.skipped + held.skipped,
            "git_commit": git_commit(),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "random_weights": cfg.preset.random_weights,
        },
        "timings_s": timings,
    }


def _write(
    out_dir: Path, class_name: str, payload: dict[str, Any], timings: dict[str, float]
) -> dict[str, Any]:
    write_model_json(out_dir, payload)
    log.info("class %s fitted in %.1f s -> %s", class_name, sum(timings.values()), out_dir)
    return {
        "class": class_name,
        "model_dir": str(out_dir),
        "modalities": payload["modalities"],
        "timings_s": timings,
        "thresholds": payload["thresholds"],
    }
