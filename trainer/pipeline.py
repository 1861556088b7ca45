"""What the `m3dm` commands do, one function each: train, export, bundle build and verify."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from core.config import SITE_BACKBONE, CoresetConfig, FitConfig, PreprocessConfig, UFFConfig, get_preset
from core.errors import ConfigError, M3DMError
from core.mvtec3d import discover_classes

log = logging.getLogger("m3dm.trainer")


def resolve_classes(data_root: Path, class_names: list[str], all_classes: bool) -> list[str]:
    found = discover_classes(data_root)
    if all_classes:
        if not found:
            raise ConfigError(f"no classes found under {data_root}")
        return found
    if not class_names:
        raise ConfigError("name at least one --class, or pass --all")
    unknown = [c for c in class_names if c not in found]
    if unknown:
        raise ConfigError(f"unknown class(es) {unknown} under {data_root}; found {found}")
    return class_names


def train_classes(
    data_root: Path,
    out: Path,
    class_names: list[str],
    all_classes: bool,
    preset_name: str,
    weights_dir: Path | None,
    allow_random_weights: bool,
    seed: int,
    uff_epochs: int | None = None,
    coreset: CoresetConfig | None = None,
    false_reject_rate: float = 0.01,
    point_bn: str | None = None,
    coreset_device: str = "cpu",
    site: Any = None,
) -> dict[str, Any]:
    """Fit each class into `out/<class>/`; check weights and options before reading any data.

    site: trainer.site.train.SiteConfig for m3dm-site (default: its defaults with this seed); that preset
    first trains its rgb encoder on each class's training normals into the class folder.

    point_bn overrides the preset's Point-MAE BatchNorm mode ("batch" | "stored"); the mode is recorded with
    the preset in model.json and baked into the exported ONNX graph. coreset_device: torch device of the
    greedy coreset selection (checked before any data is read).
    """
    from dataclasses import replace

    from core.config import score_config_for
    from trainer.backbones import WeightPaths, build_feature_runners, check_weights_available
    from trainer.coreset import check_device
    from trainer.fit import fit_class

    preset = get_preset(preset_name)
    if point_bn is not None:
        if preset.point_backbone != "point_mae":
            raise ConfigError(f"--point-bn applies to Point-MAE presets; {preset.name} has no point network")
        preset = replace(preset, point_bn=point_bn)
    if preset.random_weights and not allow_random_weights:
        raise ConfigError(
            f"preset {preset.name} has RANDOM weights (speed tests only); "
            "pass --allow-random-weights to use it"
        )
    weights = WeightPaths(weights_dir=weights_dir)
    check_weights_available(preset, weights)
    check_device(coreset_device)
    classes = resolve_classes(data_root, class_names, all_classes)
    if uff_epochs is not None and uff_epochs < 1:
        # 0 divides by zero in the warm-up schedule, a negative count trains nothing and saves noise
        raise ConfigError(f"--uff-epochs must be >= 1, got {uff_epochs}")
    uff = UFFConfig(seed=seed) if uff_epochs is None else UFFConfig(seed=seed, epochs=uff_epochs, min_steps=0)
    if not 0.0 <= false_reject_rate < 1.0:
        raise ConfigError("--false-reject-rate must lie in [0, 1)")
    cfg = FitConfig(
        preset=preset,
        preprocess=PreprocessConfig(
            rgb_input_size=preset.rgb_input_size, keep_largest_cluster=preset.largest_cluster
        ),
        coreset=coreset if coreset is not None else CoresetConfig(seed=seed),
        uff=uff,
        score=score_config_for(preset),  # the preset's image-score rule
        false_reject_rate=false_reject_rate,
        seed=seed,
    )
    per_class = preset.rgb_backbone == SITE_BACKBONE
    runners = None if per_class else build_feature_runners(preset, weights)
    summaries = []
    t0 = time.perf_counter()
    for class_name in classes:
        class_runners, site_s = runners, None
        if per_class:
            from trainer.site.train import SiteConfig, train_site_for_class

            t_site = time.perf_counter()
            site_cfg = site if site is not None else SiteConfig(seed=seed)
            train_site_for_class(
                data_root, class_name, cfg.preprocess, site_cfg, out / class_name, preset.rgb_dim
            )
            site_s = time.perf_counter() - t_site
            class_runners = build_feature_runners(preset, weights, out / class_name)
        summaries.append(
            fit_class(
                data_root, class_name, cfg, class_runners, out / class_name, coreset_device=coreset_device
            )
        )
        if site_s is not None:
            summaries[-1]["site_train_s"] = site_s
    summary = {"preset": preset.name, "classes": summaries, "seconds": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _uff_real_inputs(class_dir: Path, info: Any) -> dict[str, Any]:
    """Real UFF inputs for the parity check: training rows of the point and rgb banks, un-normalised."""
    import numpy as np

    from edge.model_store import load_banks

    banks = load_banks(info)
    rows = info.preset.point_grid**2

    def raw_rows(name: str) -> np.ndarray:
        bank = banks[name]
        idx = np.arange(rows) % bank.feats_mc.shape[0]
        return bank.feats_mc[idx] * bank.feat_scale + bank.feat_mean_c

    return {"point_feats": raw_rows("point")[None], "rgb_feats": raw_rows("rgb")[None]}


def _real_network_inputs(info: Any) -> dict[str, Any]:
    """Backbone inputs from a real training scan (when the data set is still where training read it), so the
    parity check covers real value ranges as well as the random inputs `check_parity` adds itself."""
    import numpy as np

    from core.grouping import group_points
    from core.mvtec3d import list_samples, load_scan
    from core.preprocess import prepare_scan

    preset = info.preset
    data_root = Path(info.raw.get("provenance", {}).get("data_root", ""))
    try:
        scan = prepare_scan(load_scan(list_samples(data_root, info.class_name, "train")[0]), info.preprocess)
        if info.manifest is not None and "point" not in info.manifest.modalities:
            log.info("parity inputs: real scan %s (rgb only)", scan.source)
            return {"image": scan.rgb_chw[None]}
        points = scan.xyz_hwc_m.reshape(-1, 3)[scan.valid_hw.reshape(-1)]
        neighborhood, centers = group_points(points, preset.num_groups, preset.group_size)
        log.info("parity inputs: real scan %s", scan.source)
        return {"image": scan.rgb_chw[None], "neighborhood": neighborhood[None], "centers": centers[None]}
    except (OSError, IndexError, M3DMError) as err:
        log.warning(
            "parity on synthetic inputs only: no training scan readable under %s (%s)", data_root, err
        )
    rng = np.random.default_rng(1)
    size = preset.rgb_input_size
    return {
        "image": rng.standard_normal((1, 3, size, size)).astype(np.float32),
        "centers": (rng.uniform(-0.05, 0.05, (1, preset.num_groups, 3)) + [0, 0, 0.4]).astype(np.float32),
        "neighborhood": rng.normal(0, 0.002, (1, preset.num_groups, preset.group_size, 3)).astype(np.float32),
    }


def export_class(
    class_dir: Path, weights_dir: Path | None, engine: bool, engine_precision: str = "fp16"
) -> dict[str, Any]:
    """Export this class's networks to `class_dir/onnx/` and check each against torch.

    engine_precision (with `engine`): TensorRT "fp32" | "fp16" | "int8"; int8 calibrates on the same real
    inputs as the parity check and writes `onnx/<name>.int8.calib`, which later builds (and stations) reuse.
    """
    if engine and engine_precision not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"engine precision must be fp32, fp16 or int8, not {engine_precision!r}")
    import numpy as np
    import torch

    from edge.model_store import load_model_info, read_model_json
    from trainer.backbones import WeightPaths, point_module_for_export, rgb_module_for_export
    from trainer.export import check_parity, export_onnx
    from trainer.model_io import write_model_json
    from trainer.models.uff import UFFExport
    from trainer.point_export import pointwise_point_module
    from trainer.train_uff import load_uff

    info = load_model_info(class_dir)
    preset, weights = info.preset, WeightPaths(weights_dir=weights_dir)
    onnx_dir = class_dir / "onnx"
    jobs: list[tuple[str, Any, dict[str, np.ndarray], list[str]]] = []
    rgb_only = info.manifest is not None and "point" not in info.manifest.modalities
    if not rgb_only:  # an RGB-only model has no UFF and no point network to export
        uff_inputs = _uff_real_inputs(class_dir, info)
        jobs.append(("uff", UFFExport(load_uff(class_dir / "uff.safetensors")), uff_inputs, ["fused"]))
    real = _real_network_inputs(info)
    if preset.rgb_backbone != "free":
        rgb_module = rgb_module_for_export(preset, weights, class_dir)
        jobs.append(("rgb", rgb_module, {"image": real["image"]}, ["tokens"]))
    if preset.point_backbone != "free" and not rgb_only:
        point_inputs = {"neighborhood": real["neighborhood"], "centers": real["centers"]}
        # The mini-PointNet's kernel-1 convolutions as MatMuls, so `bundle build --precision int8` can
        # quantise them (ORT has no fast ConvInteger). Parity is checked against the rewritten module, which
        # tests/trainer/test_point_export.py proves equal to the Conv1d one (float64) and to its ONNX graph.
        point_module = point_module_for_export(preset, weights)
        jobs.append(("point", pointwise_point_module(point_module), point_inputs, ["group_features"]))
    networks, parity, calibration = {}, {}, {}
    for name, module, inputs, outputs in jobs:
        calibration[name] = [inputs]
        path = export_onnx(
            module,
            {k: torch.from_numpy(v) for k, v in inputs.items()},
            outputs,
            onnx_dir / f"{name}.onnx",
            # UFF is per patch: a dynamic patch axis lets the station run it on foreground patches only.
            extra_dynamic_axes={1: "patches"} if name == "uff" else None,
        )
        report = check_parity(module, path, inputs)
        networks[name] = f"onnx/{name}.onnx"
        parity[name] = {"max_abs_err": report.max_abs_err, "max_rel_err": report.max_rel_err, "ok": report.ok}
        log.info(
            "%s: exported %s (parity max abs %.2e, rel %.2e)",
            info.class_name,
            name,
            report.max_abs_err,
            report.max_rel_err,
        )
    raw = read_model_json(class_dir)
    raw.pop("format", None)
    raw["networks"] = networks
    raw["export"] = {
        "opset": 17,
        "parity": parity,
        "exported_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_model_json(class_dir, raw)
    engines = _build_engines(class_dir, networks, engine_precision, calibration) if engine else {}
    return {"class": info.class_name, "networks": networks, "parity": parity, "engines": engines}


def _build_engines(
    class_dir: Path,
    networks: dict[str, str],
    precision: str = "fp16",
    calibration: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, str]:
    """TensorRT engines next to the ONNX files (needs TensorRT and a GPU: never on CI machines).

    INT8 reads `onnx/<name>.int8.calib` when it exists, else calibrates on `calibration[name]` and writes it.
    """
    from edge.runners import build_engine, tensorrt_available

    if not tensorrt_available():
        raise ConfigError("--engine needs TensorRT and an NVIDIA GPU; neither is available here")
    engines = {}
    for name, rel in networks.items():
        onnx_path = class_dir / rel
        engine_path = onnx_path.with_suffix(f".{precision}.engine")
        build_engine(
            onnx_path,
            engine_path,
            timing_cache_path=class_dir / "onnx" / "timing.cache",
            precision=precision,
            calibration_cache=onnx_path.with_suffix(".int8.calib") if precision == "int8" else None,
            calibration_batches=(calibration or {}).get(name) if precision == "int8" else None,
        )
        engines[name] = str(engine_path.relative_to(class_dir))
    return engines


def export_models(
    model: Path, weights_dir: Path | None, engine: bool, engine_precision: str = "fp16"
) -> dict[str, Any]:
    from trainer.evaluate import class_dirs

    return {"classes": [export_class(d, weights_dir, engine, engine_precision) for d in class_dirs(model)]}
