"""`m3dm eval --point-bn batch|stored`: the one-command A/B of Point-MAE's BatchNorm mode.

Banks are built from the features of one mode, so comparing modes means fitting twice. The model as
given is evaluated as it is; then every class is refitted with the other mode (same preset, seed and
default fit settings) into `<out>/point-bn-<mode>/` and evaluated on the same test split, and the two
result tables are returned side by side with the per-variant differences. This needs the official
Point-MAE checkpoint to mean anything: with random weights both modes measure nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge.model_store import load_model_info

__all__ = ["point_bn_ab"]


def _delta_markdown(base: dict[str, Any], other: dict[str, Any], modes: tuple[str, str]) -> str:
    lines = [
        f"### Point-MAE BatchNorm A/B: {modes[1]} minus {modes[0]} (class mean)",
        "",
        "| variant | ΔI-AUROC | ΔP-AUROC | ΔAUPRO@30% |",
        "|---|---:|---:|---:|",
    ]
    for variant, metrics in base["mean"].items():
        if variant not in other["mean"]:
            continue
        cells = []
        for metric in ("i_auroc", "p_auroc", "aupro"):
            a, b = metrics.get(metric), other["mean"][variant].get(metric)
            cells.append("–" if a is None or b is None else f"{b - a:+.4f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def point_bn_ab(
    data_root: Path, model: Path, mode: str, weights_dir: Path | None, out: Path | None
) -> dict[str, Any]:
    """Evaluate `model`, refit it with BatchNorm mode `mode`, evaluate that, and compare."""
    from trainer.evaluate import class_dirs, evaluate_models
    from trainer.pipeline import train_classes

    infos = [load_model_info(d) for d in class_dirs(model)]
    fitted_modes = {info.preset.point_bn for info in infos}
    preset = infos[0].preset
    if preset.point_backbone != "point_mae":
        from core.errors import ConfigError

        raise ConfigError(f"--point-bn compares Point-MAE modes; preset {preset.name} has no point network")
    report = out or (model / "report")
    base = evaluate_models(data_root, model, report / "as-fitted", weights_dir)
    if fitted_modes == {mode}:
        return {**base, "point_bn": {"fitted": mode, "compared": None}}
    refit = report / f"point-bn-{mode}" / "models"
    train_classes(
        data_root,
        refit,
        [info.class_name for info in infos],
        False,
        preset.name,
        weights_dir,
        preset.random_weights,
        0,
        point_bn=mode,
    )
    other = evaluate_models(data_root, refit, report / f"point-bn-{mode}", weights_dir)
    fitted = ",".join(sorted(fitted_modes))
    markdown = (
        f"## as fitted (point_bn={fitted})\n\n{base['markdown']}\n"
        f"## refitted (point_bn={mode})\n\n{other['markdown']}\n"
        + _delta_markdown(base, other, (fitted, mode))
    )
    return {
        "as_fitted": base,
        "refitted": other,
        "point_bn": {"fitted": fitted, "compared": mode},
        "markdown": markdown,
    }
