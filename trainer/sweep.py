"""`m3dm sweep`: quality as mean ± sd over seeds of data and training, on one or both generated families.

For each seed and family: generate the data with that seed (family a: trainer.synth, family b:
trainer.synth_b), train with that seed (`train_classes`, the same call as `m3dm train`) and evaluate with
`evaluate_models` (the same call as `m3dm eval`, scoring through the station's FrameScorer). Each seed's
class-mean metric is one sample; the table gives the mean and the sample sd (ddof 1) over seeds.
A seed whose report already exists is read back instead of rerun, so an interrupted sweep resumes.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError

log = logging.getLogger("m3dm.trainer")

FAMILIES = ("a", "b")
SWEEP_METRICS = {"i_auroc": "I-AUROC", "p_auroc": "P-AUROC", "aupro": "AUPRO@30%"}
VARIANT_ORDER = ("rgb", "point", "fusion", "rgb+point", "rgb+point+fusion")


@dataclass(frozen=True)
class SweepConfig:
    """What one sweep runs. classes maps a family to its class names (empty: the family's defaults)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    families: tuple[str, ...] = FAMILIES
    classes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    preset: str = "m3dm-free"
    size_px: int = 400
    n_train: int = 40
    n_validation: int = 20
    n_test_good: int = 10
    n_test_per_defect: int = 5
    workers: int = 2
    uff_epochs: int | None = None

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct and at least one, got {self.seeds}")
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families or len(set(self.families)) != len(self.families):
            raise ConfigError(f"families must be distinct names from {FAMILIES}, got {self.families}")


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); also accepts a range '0-4'."""
    try:
        if "-" in text.strip()[1:]:
            lo, hi = text.split("-", 1)
            return tuple(range(int(lo), int(hi) + 1))
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--seeds wants integers like 0,1,2 or 0-2, got {text!r}") from None


def family_of_classes(names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Split class names by the family that defines them (the two families share no name)."""
    from trainer.synth import CLASS_NAMES as A
    from trainer.synth_b import CLASS_NAMES as B

    out: dict[str, list[str]] = {"a": [], "b": []}
    for name in names:
        if name in A:
            out["a"].append(name)
        elif name in B:
            out["b"].append(name)
        else:
            raise ConfigError(f"unknown class {name!r}; family a: {', '.join(A)}; family b: {', '.join(B)}")
    return {f: tuple(v) for f, v in out.items() if v}


def _default_classes(family: str) -> tuple[str, ...]:
    if family == "a":
        from trainer.synth import CLASS_NAMES
    else:
        from trainer.synth_b import CLASS_NAMES
    return tuple(CLASS_NAMES)


def generate(family: str, data: Path, seed: int, classes: tuple[str, ...], cfg: SweepConfig) -> dict:
    """Write one family's data set for `seed`, replacing what was there."""
    if family == "a":
        from trainer.synth import SynthConfig, synthesize

        return synthesize(
            data,
            SynthConfig(
                seed=seed,
                classes=classes,
                n_train=cfg.n_train,
                n_validation=cfg.n_validation,
                n_test_good=cfg.n_test_good,
                n_test_per_defect=cfg.n_test_per_defect,
                width_px=cfg.size_px,
                height_px=cfg.size_px,
                workers=cfg.workers,
            ),
            overwrite=True,
        )
    from trainer.synth_b import SynthBConfig, synthesize_b

    return synthesize_b(
        data,
        SynthBConfig(
            seed=seed,
            classes=classes,
            n_train=cfg.n_train,
            n_validation=cfg.n_validation,
            n_test_good=cfg.n_test_good,
            n_test_per_defect=cfg.n_test_per_defect,
            size_px=cfg.size_px,
            workers=cfg.workers,
        ),
        overwrite=True,
    )


def run_one(family: str, seed: int, classes: tuple[str, ...], cfg: SweepConfig, root: Path) -> dict[str, Any]:
    """Generate, train, evaluate one (family, seed); return {"mean", "classes", "train_seconds", ...}."""
    from trainer.evaluate import evaluate_models
    from trainer.pipeline import train_classes

    run_dir = root / f"family-{family}" / f"seed-{seed}"
    done = run_dir / "sweep_run.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("classes_run") == list(classes) and record.get("preset") == cfg.preset:
            log.info("family %s seed %d: reusing %s", family, seed, done)
            return record
    data, models = run_dir / "data", run_dir / "models"
    synth = generate(family, data, seed, classes, cfg)
    train = train_classes(data, models, list(classes), False, cfg.preset, None, False, seed, cfg.uff_epochs)
    results = evaluate_models(data, models, run_dir / "report", None)
    record = {
        "family": family,
        "seed": seed,
        "preset": cfg.preset,
        "classes_run": list(classes),
        "mean": results["mean"],
        "classes": results["classes"],
        "i_auroc_by_defect_type": results.get("i_auroc_by_defect_type", {}),
        "train_seconds": train["seconds"],
        "synth_seconds": synth["seconds"],
    }
    done.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def mean_sd(values: Sequence[float | None]) -> tuple[float, float, int]:
    """(mean, sample sd, n) of the defined values; sd is NaN below two values, mean NaN with none."""
    defined = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not defined:
        return math.nan, math.nan, 0
    sd = statistics.stdev(defined) if len(defined) > 1 else math.nan
    return statistics.fmean(defined), sd, len(defined)


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Runs of one family (one per seed) -> {"variants": {v: {metric: {mean, sd, n}}}, "train_seconds",
    "per_class_i_auroc": {class: {v: {mean, sd, n}}}, "per_defect_type_i_auroc": {class: {defect type:
    {v: {mean, sd, n}}}}, "seeds"}."""
    variants = [v for v in VARIANT_ORDER if any(v in r["mean"] for r in runs)]

    def stat(values: Sequence[float | None]) -> dict[str, float | int | None]:
        m, s, n = mean_sd(values)
        return {"mean": None if math.isnan(m) else m, "sd": None if math.isnan(s) else s, "n": n}

    table = {
        v: {m: stat([r["mean"].get(v, {}).get(m) for r in runs]) for m in SWEEP_METRICS} for v in variants
    }
    class_names = sorted({c for r in runs for c in r["classes"]})
    per_class = {
        c: {v: stat([r["classes"].get(c, {}).get(v, {}).get("i_auroc") for r in runs]) for v in variants}
        for c in class_names
    }
    # class -> defect type -> variant; runs recorded before the breakdown existed simply add nothing
    by_type = [r.get("i_auroc_by_defect_type", {}) for r in runs]
    kinds = {c: sorted({k for t in by_type for v in t.get(c, {}).values() for k in v}) for c in class_names}
    per_type = {
        c: {
            k: {v: stat([t.get(c, {}).get(v, {}).get(k) for t in by_type]) for v in variants}
            for k in kinds[c]
        }
        for c in class_names
        if kinds[c]
    }
    return {
        "seeds": [r["seed"] for r in runs],
        "variants": table,
        "per_class_i_auroc": per_class,
        "per_defect_type_i_auroc": per_type,
        "train_seconds": stat([r["train_seconds"] for r in runs]),
    }


def _cell(stat: Mapping[str, Any]) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.3f}" + ("" if stat["sd"] is None else f" ± {stat['sd']:.3f}")


def _stat_table(corner: str, columns: list[str], rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown lines of one table: a row per key of `rows`, its {column: stat} cells as mean ± sd."""
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, per_column in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(s) for s in per_column.values()) + " |")
    return lines


def sweep_markdown(summary: Mapping[str, Any]) -> str:
    """One table per family: variants x (I-AUROC, P-AUROC, AUPRO@30%) as mean ± sd over seeds, then the
    full variant's I-AUROC per class and the training wall time."""
    parts = []
    for family, agg in summary["families"].items():
        seeds = ",".join(str(s) for s in agg["seeds"])
        classes = ", ".join(agg["per_class_i_auroc"])
        lines = [
            f"### Family {family}, preset {summary['preset']}, seeds {seeds} (classes: {classes})",
            "",
            "| variant | " + " | ".join(SWEEP_METRICS.values()) + " |",
            "|---|" + "---:|" * len(SWEEP_METRICS),
        ]
        for variant, metrics in agg["variants"].items():
            lines.append(f"| {variant} | " + " | ".join(_cell(metrics[m]) for m in SWEEP_METRICS) + " |")
        variants = list(agg["variants"])
        lines += ["", *_stat_table("class", [f"I-AUROC {v}" for v in variants], agg["per_class_i_auroc"])]
        for name, per_kind in agg.get("per_defect_type_i_auroc", {}).items():
            lines += ["", *_stat_table(f"{name}: defect type", variants, per_kind)]
        t = agg["train_seconds"]
        lines += [
            "",
            f"Training wall time per seed (all {len(agg['per_class_i_auroc'])} classes): {_cell(t)} s",
        ]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def run_sweep(
    out: Path, cfg: SweepConfig, on_run: Callable[[Mapping[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Every (family, seed) run, then the aggregate; writes <out>/sweep.json and <out>/sweep.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for family in cfg.families:
        classes = cfg.classes.get(family) or _default_classes(family)
        for seed in cfg.seeds:
            record = run_one(family, seed, tuple(classes), cfg, out)
            runs.setdefault(family, []).append(record)
            if on_run is not None:
                on_run(record)
    summary: dict[str, Any] = {
        "preset": cfg.preset,
        "size_px": cfg.size_px,
        "counts": {
            "train": cfg.n_train,
            "validation": cfg.n_validation,
            "test_good": cfg.n_test_good,
            "test_per_defect": cfg.n_test_per_defect,
        },
        "families": {f: aggregate(r) for f, r in runs.items()},
        "runs": runs,
    }
    summary["markdown"] = sweep_markdown(summary)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (out / "sweep.md").write_text(summary["markdown"])
    return summary
