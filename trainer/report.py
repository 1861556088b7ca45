"""Human-facing reports of `m3dm eval`: results JSON, the paper's markdown tables, ROC/PRO plots, overlays.

Input is `results[class_name][variant] -> VariantMetrics` (trainer.metrics). Plots use matplotlib's
object API with the Agg canvas (no pyplot, no GUI, no global backend switch), so they are safe in workers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from core.errors import ConfigError, ShapeError
from trainer.metrics import VariantMetrics, area_under_pro, image_auroc, pro_curve

__all__ = [
    "METRIC_TITLES",
    "VARIANTS",
    "class_means",
    "plot_pro_curves",
    "plot_roc_curves",
    "results_from_json",
    "results_to_json",
    "results_to_markdown",
    "write_heatmap_overlays",
    "write_json",
]

Results = Mapping[str, Mapping[str, VariantMetrics]]

VARIANTS = ("rgb", "point", "fusion", "rgb+point", "rgb+point+fusion")
METRIC_TITLES = {"i_auroc": "I-AUROC", "p_auroc": "P-AUROC", "aupro": "AUPRO@30%", "aupro_1pct": "AUPRO@1%"}
_METRICS = tuple(field.name for field in dataclasses.fields(VariantMetrics))


def _variants_in(results: Results) -> list[str]:
    """Variants present in any class, in the paper's order, unknown ones last in first-seen order."""
    seen = dict.fromkeys(variant for per_class in results.values() for variant in per_class)
    return [v for v in VARIANTS if v in seen] + [v for v in seen if v not in VARIANTS]


def _mean_ignoring_nan(values: Sequence[float]) -> float:
    """Mean of the defined values; NaN if none (a class without defects has no P-AUROC/AU-PRO)."""
    defined = [v for v in values if not math.isnan(v)]
    return math.fsum(defined) / len(defined) if defined else float("nan")


def class_means(results: Results) -> dict[str, VariantMetrics]:
    """Per variant, each metric averaged over the classes that have that variant (NaNs skipped)."""
    means = {}
    for variant in _variants_in(results):
        rows = [per_class[variant] for per_class in results.values() if variant in per_class]
        means[variant] = VariantMetrics(
            **{m: _mean_ignoring_nan([getattr(row, m) for row in rows]) for m in _METRICS}
        )
    return means


def _metrics_to_json(metrics: VariantMetrics) -> dict[str, float | None]:
    """One VariantMetrics as a JSON object, NaN as null."""
    return {m: None if math.isnan(v := float(getattr(metrics, m))) else v for m in _METRICS}


def results_to_json(results: Results) -> dict[str, Any]:
    """`{"mean": {variant: {metric: x}}, "classes": {class: {variant: {metric: x}}}}`, NaN as null."""
    return {
        "mean": {v: _metrics_to_json(m) for v, m in class_means(results).items()},
        "classes": {c: {v: _metrics_to_json(m) for v, m in per.items()} for c, per in results.items()},
    }


def results_from_json(document: Mapping[str, Any]) -> dict[str, dict[str, VariantMetrics]]:
    """Inverse of `results_to_json` (the "classes" part; the mean is derived), null back to NaN."""

    def metrics(obj: Mapping[str, float | None]) -> VariantMetrics:
        return VariantMetrics(**{m: float("nan") if obj[m] is None else float(obj[m]) for m in _METRICS})

    return {c: {v: metrics(m) for v, m in per.items()} for c, per in document["classes"].items()}


def write_json(path: str | Path, results: Results, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `results_to_json(results)` plus top-level `extra` entries (config, timings) as strict JSON."""
    document = results_to_json(results)
    clashes = set(document) & set(extra or {})
    if clashes:
        raise ConfigError(f"write_json: extra keys {sorted(clashes)} would overwrite the results", path)
    document.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _format_cell(value: float) -> str:
    """3 decimals as in the paper; undefined as an en dash."""
    return "–" if math.isnan(value) else f"{value:.3f}"


def results_to_markdown(results: Results) -> str:
    """The paper's Tables 1–3 layout: one table per metric, rows = variants, columns = classes + mean."""
    classes, variants, means = list(results), _variants_in(results), class_means(results)
    sections = []
    for metric, title in METRIC_TITLES.items():
        lines = [f"### {title}", "", "| variant | " + " | ".join([*classes, "mean"]) + " |"]
        lines.append("|---|" + "---:|" * (len(classes) + 1))
        for variant in variants:
            cells = [
                _format_cell(getattr(results[c][variant], metric)) if variant in results[c] else "–"
                for c in classes
            ]
            cells.append(_format_cell(getattr(means[variant], metric)))
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def _save(figure: Figure, path: str | Path) -> Path:
    """Save a PNG, creating the folder; no software/date metadata so reruns give identical bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", metadata={"Software": None})
    return path


def plot_roc_curves(
    path: str | Path, labels_n: np.ndarray, scores_by_variant: Mapping[str, np.ndarray], title: str
) -> Path:
    """Image-level ROC curve per variant, AUROC in the legend.

    Args:
        path: output PNG.
        labels_n: (N,) 1 = anomalous image.
        scores_by_variant: variant -> (N,) image scores.
        title: figure title (e.g. the class name).
    """
    figure = Figure(figsize=(5, 5), dpi=100)
    ax = figure.add_subplot()
    labels_n = np.asarray(labels_n).astype(bool)
    single_class = labels_n.all() or not labels_n.any()
    for variant, scores in scores_by_variant.items():
        if single_class:  # roc_curve would warn; the curve is undefined
            continue
        fpr, tpr, _ = roc_curve(labels_n, np.asarray(scores, dtype=np.float64))
        ax.plot(fpr, tpr, label=f"{variant} ({image_auroc(labels_n, scores):.3f})")
    if single_class:
        ax.text(0.5, 0.5, "undefined: one class only", ha="center", va="center")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(
        xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small", title="I-AUROC")
    return _save(figure, path)


def plot_pro_curves(
    path: str | Path,
    masks_nhw: np.ndarray,
    maps_by_variant: Mapping[str, np.ndarray],
    title: str,
    fpr_limit: float = 0.3,
) -> Path:
    """PRO curve per variant on [0, fpr_limit], normalised AU-PRO in the legend.

    Args:
        path: output PNG.
        masks_nhw: (N, H, W) bool ground truth.
        maps_by_variant: variant -> (N, H, W) float anomaly maps.
        title: figure title.
        fpr_limit: right end of the plot and of the integration.
    """
    figure = Figure(figsize=(5, 5), dpi=100)
    ax = figure.add_subplot()
    for variant, maps in maps_by_variant.items():
        fpr, pro = pro_curve(masks_nhw, maps)
        if np.isnan(pro).all():
            continue
        shown = fpr <= fpr_limit
        label = f"{variant} ({area_under_pro(fpr, pro, fpr_limit):.3f})"
        ax.plot(fpr[shown], pro[shown], marker=".", markersize=3, label=label)
    ax.set(xlim=(0, fpr_limit), ylim=(0, 1.01), xlabel="false positive rate", ylabel="per-region overlap")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small", title=f"AU-PRO@{fpr_limit:g}")
    else:
        ax.text(fpr_limit / 2, 0.5, "undefined: no defect pixels", ha="center", va="center")
    return _save(figure, path)


def _safe_stem(name: str) -> str:
    """A file-name-safe stem of an image name ("hole/rgb/003.png" -> "hole_rgb_003")."""
    stem = re.sub(r"\.(png|jpe?g|tiff?)$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") or "image"


def _outline(ax: Any, region_hw: np.ndarray, color: str) -> None:
    """Draw the boundary of a boolean region; nothing when it is empty or full (contour would warn)."""
    if region_hw.any() and not region_hw.all():
        ax.contour(region_hw.astype(np.float32), levels=[0.5], colors=color, linewidths=1.2)


def _overlay_figure(
    rgb_hwc: np.ndarray,
    map_hw: np.ndarray,
    mask_hw: np.ndarray,
    title: str,
    value_range: tuple[float, float],
    threshold: float | None,
) -> Figure:
    """Three panels: rgb | jet heatmap over rgb on the shared scale | rgb with ground-truth outline."""
    figure = Figure(figsize=(9, 3.3), dpi=100, layout="constrained")
    axes = figure.subplots(1, 3)
    axes[0].imshow(rgb_hwc)
    axes[1].imshow(rgb_hwc)
    image = axes[1].imshow(map_hw, cmap=colormaps["jet"], alpha=0.5, vmin=value_range[0], vmax=value_range[1])
    figure.colorbar(image, ax=axes[1], fraction=0.046, pad=0.02)
    axes[2].imshow(rgb_hwc)
    _outline(axes[2], mask_hw, "lime")
    if threshold is not None:  # predicted region, to compare with the ground truth
        _outline(axes[2], map_hw > threshold, "red")
    truth_title = "ground truth (green)" if threshold is None else "ground truth (green), map > thr (red)"
    for ax, panel in zip(axes, ("rgb", "anomaly map", truth_title), strict=True):
        ax.set_title(panel, fontsize=8)
        ax.set_axis_off()
    figure.suptitle(title, fontsize=9)
    return figure


def write_heatmap_overlays(
    out_dir: str | Path,
    rgb_hwc_u8_list: Sequence[np.ndarray],
    maps_list: Sequence[np.ndarray],
    masks_list: Sequence[np.ndarray],
    names: Sequence[str],
    threshold: float | None = None,
    max_images: int = 8,
    vmin: float | None = None,
    vmax: float | None = None,
    image_scores: Sequence[float] | None = None,
) -> list[Path]:
    """One PNG per image (the first `max_images`): rgb | heatmap overlay | ground-truth contour.

    The colour scale is shared by all images of the call (one class), so good images look calm:
    vmin/vmax default to the min/max over all given maps, never per image.

    Args:
        out_dir: folder for the PNGs, created if missing.
        rgb_hwc_u8_list: per image (H, W, 3) uint8.
        maps_list: per image (H, W) float anomaly map, same H, W as the rgb.
        masks_list: per image (H, W) bool ground truth.
        names: per image name, used in the title and file name.
        threshold: optional pixel threshold in map units; outlines map > threshold, verdict on the map max.
        max_images: how many images to write.
        vmin, vmax: shared display range (score units) for the class.
        image_scores: optional per image score shown in the title next to the map maximum.

    Returns:
        The written paths, in input order.
    """
    count = min(max_images, len(names))
    if not len(rgb_hwc_u8_list) == len(maps_list) == len(masks_list) == len(names):
        raise ShapeError("write_heatmap_overlays: rgb, maps, masks and names must have equal lengths")
    maps = [np.asarray(m, dtype=np.float32) for m in maps_list[:count]]
    lo = float(min(m.min() for m in maps)) if vmin is None and maps else vmin
    hi = float(max(m.max() for m in maps)) if vmax is None and maps else vmax
    out_dir = Path(out_dir)
    paths = []
    for index in range(count):
        rgb, mask = np.asarray(rgb_hwc_u8_list[index]), np.asarray(masks_list[index]).astype(bool)
        if rgb.shape != (*maps[index].shape, 3) or mask.shape != maps[index].shape:
            raise ShapeError(
                f"overlay {names[index]}: rgb {rgb.shape}, map {maps[index].shape}, mask {mask.shape} differ"
            )
        map_max = float(maps[index].max())
        title = f"{names[index]}   map max {map_max:.4g}"
        if image_scores is not None:
            title += f"   image score {float(image_scores[index]):.4g}"
        if threshold is not None:
            title += f"   thr {threshold:.4g}: {'DEFECT' if map_max > threshold else 'good'}"
        figure = _overlay_figure(rgb, maps[index], mask, title, (lo, hi), threshold)
        paths.append(_save(figure, out_dir / f"{index:03d}_{_safe_stem(names[index])}.png"))
    return paths
